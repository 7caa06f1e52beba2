"""spconv.pytorch.hash.HashTable against a python dict reference."""
import numpy as np
import pytest
import torch

from spconv.pytorch.hash import HashTable

KEY_DTYPES = [torch.int32, torch.int64]
VALUE_DTYPES = [torch.int32, torch.int64, torch.float32, torch.float64]


def random_keys(g, n, key_dtype, distinct=None):
    info = torch.iinfo(key_dtype)
    if distinct is None:
        return torch.from_numpy(g.integers(info.min, info.max, size=n, endpoint=True)).to(key_dtype)
    pool = torch.from_numpy(g.integers(info.min, info.max, size=distinct, endpoint=True)).to(key_dtype)
    return pool[torch.from_numpy(g.integers(0, distinct, size=n))]


def random_values(g, n, value_dtype):
    if value_dtype.is_floating_point:
        return torch.from_numpy(g.standard_normal(n)).to(value_dtype)
    info = torch.iinfo(value_dtype)
    return torch.from_numpy(g.integers(info.min, info.max, size=n, endpoint=True)).to(value_dtype)


def insert_reference(ref, keys, values):
    """First value wins, for keys already in the table and for repeats within one call."""
    for i, k in enumerate(keys.tolist()):
        if k not in ref:
            ref[k] = values[i].item() if values is not None else 0


@pytest.mark.parametrize("key_dtype", KEY_DTYPES)
@pytest.mark.parametrize("value_dtype", VALUE_DTYPES)
def test_against_dict(key_dtype, value_dtype):
    g = np.random.default_rng(7)
    table = HashTable(torch.device("cpu"), key_dtype, value_dtype)
    assert table.key_itemsize == key_dtype.itemsize and table.value_itemsize == value_dtype.itemsize
    ref = {}
    # batches with repeats inside and across batches, one without values, the extreme keys included
    extremes = torch.tensor([torch.iinfo(key_dtype).min, torch.iinfo(key_dtype).max, -1, 0], dtype=key_dtype)
    batches = [random_keys(g, 3000, key_dtype, distinct=1500), extremes, random_keys(g, 5000, key_dtype),
               random_keys(g, 2000, key_dtype, distinct=700)]
    for b, keys in enumerate(batches):
        values = None if b == 2 else random_values(g, len(keys), value_dtype)
        table.insert(keys, values)
        insert_reference(ref, keys, values)
        assert len(table) == len(ref)

    # query: present and absent keys
    present = torch.tensor(list(ref.keys()), dtype=key_dtype)
    absent = random_keys(g, 500, key_dtype)
    absent = absent[torch.tensor([k not in ref for k in absent.tolist()], dtype=torch.bool)]
    q = torch.cat([present, absent])[torch.from_numpy(g.permutation(len(present) + len(absent)))]
    vals, is_empty = table.query(q)
    assert vals.dtype == value_dtype and is_empty.dtype == torch.bool and vals.shape == q.shape
    for k, v, e in zip(q.tolist(), vals.tolist(), is_empty.tolist()):
        assert e == (k not in ref)
        assert v == (ref[k] if k in ref else 0)

    # query into a caller's buffer: absent entries left unchanged
    buf = torch.full((len(q),), 5, dtype=value_dtype)
    out, is_empty2 = table.query(q, buf)
    assert out.data_ptr() == buf.data_ptr() and torch.equal(is_empty, is_empty2)
    assert torch.equal(buf[~is_empty], vals[~is_empty]) and (buf[is_empty] == 5).all()

    # items: every entry once, in insertion order
    keys, values, count = table.items()
    assert count.dtype == torch.int64 and count.shape == (1,) and count.item() == len(ref)
    assert keys.dtype == key_dtype and values.dtype == value_dtype
    assert keys.tolist() == list(ref.keys())
    assert values.tolist() == list(ref.values())

    # insert_exist_keys: updates present keys only, the last value wins for repeats
    upd_keys = torch.cat([present[::3], absent[:20], present[:5]])
    upd_vals = random_values(g, len(upd_keys), value_dtype)
    failed = table.insert_exist_keys(upd_keys, upd_vals)
    assert failed.dtype == torch.uint8 and failed.shape == upd_keys.shape
    for k, v, f in zip(upd_keys.tolist(), upd_vals.tolist(), failed.tolist()):
        assert bool(f) == (k not in ref)
        if k in ref:
            ref[k] = v
    assert len(table) == len(ref)
    keys, values, _ = table.items()
    assert keys.tolist() == list(ref.keys()) and values.tolist() == list(ref.values())

    # assign_arange_: 0..count-1 in insertion order (int values only)
    if value_dtype in (torch.int32, torch.int64):
        count = table.assign_arange_()
        assert count.dtype == torch.int64 and count.tolist() == [len(ref)]
        vals, is_empty = table.query(present)
        assert not is_empty.any()
        assert vals.tolist() == list(range(len(ref)))
    else:
        with pytest.raises(ValueError, match="int32 or torch.int64"):
            table.assign_arange_()

    table.clear()
    assert len(table) == 0 and table.items()[2].item() == 0


def test_spconv_example():
    # example/simple_hash.py of spconv 2.x
    table = HashTable(torch.device("cpu"), torch.int32, torch.int64)
    keys = torch.tensor([5, 3, 7, 4, 6, 2, 10, 8], dtype=torch.int32)
    values = torch.tensor([1, 6, 4, 77, 23, 756, 12, 12], dtype=torch.int64)
    table.insert(keys, values)
    vq, empty = table.query(torch.tensor([8, 10, 2, 6, 4, 7, 3, 5], dtype=torch.int32))
    assert vq.tolist() == [12, 12, 756, 23, 77, 4, 6, 1] and not empty.any()
    ks, vs, cnt = table.items()
    assert cnt.item() == 8 and dict(zip(ks.tolist(), vs.tolist())) == dict(zip(keys.tolist(), values.tolist()))
    table.assign_arange_()
    ks, vs, cnt = table.items()
    assert ks.tolist() == keys.tolist() and vs.tolist() == list(range(8))


def test_unique_like_use():
    # the use spconv's sparse_add_hash_based makes of it: dedupe keys, then map each key to its row
    g = np.random.default_rng(0)
    keys = torch.from_numpy(g.integers(0, 1000, size=20000))
    table = HashTable("cpu", torch.int64, torch.int64)
    table.insert(keys)
    count = table.assign_arange_().item()
    uniq, rows, _ = table.items()
    ids, empty = table.query(keys)
    assert not empty.any() and count == len(torch.unique(keys))
    assert torch.equal(uniq[ids], keys) and torch.equal(rows, torch.arange(count))
    # insertion order == first appearance
    _, first = np.unique(keys.numpy(), return_index=True)
    assert uniq.tolist() == keys[np.sort(first)].tolist()


def test_empty_inputs_and_large_table():
    table = HashTable("cpu", torch.int64, torch.float32)
    table.insert(torch.zeros(0, dtype=torch.int64), torch.zeros(0))
    vals, empty = table.query(torch.zeros(0, dtype=torch.int64))
    assert vals.shape == (0,) and empty.shape == (0,)
    assert table.items()[2].item() == 0
    keys = torch.arange(0, 300000, dtype=torch.int64) * 7919
    table.insert(keys, keys.float())
    vals, empty = table.query(keys.flip(0))
    assert not empty.any() and torch.equal(vals, keys.flip(0).float())
    assert len(table) == 300000


def test_max_size_full_table():
    table = HashTable("cpu", torch.int32, torch.int32, max_size=4)
    table.insert(torch.tensor([1, 2, 3], dtype=torch.int32), torch.tensor([10, 20, 30], dtype=torch.int32))
    table.insert(torch.tensor([3, 2, 1, 3], dtype=torch.int32))  # existing keys: no room needed
    table.insert(torch.tensor([4, 4], dtype=torch.int32), torch.tensor([40, 41], dtype=torch.int32))
    with pytest.raises(ValueError, match="full"):
        table.insert(torch.tensor([1, 5, 6], dtype=torch.int32), torch.tensor([0, 50, 60], dtype=torch.int32))
    # unchanged after the failed insert, and still usable
    keys, values, count = table.items()
    assert keys.tolist() == [1, 2, 3, 4] and values.tolist() == [10, 20, 30, 40] and count.item() == 4
    _, empty = table.query(torch.tensor([5, 6, 1], dtype=torch.int32))
    assert empty.tolist() == [True, True, False]
    table.insert(torch.tensor([2], dtype=torch.int32), torch.tensor([99], dtype=torch.int32))
    assert table.query(torch.tensor([2], dtype=torch.int32))[0].tolist() == [20]


def test_bad_input():
    with pytest.raises(ValueError, match="key_dtype"):
        HashTable("cpu", torch.float32, torch.int32)
    with pytest.raises(ValueError, match="key_dtype"):
        HashTable("cpu", torch.int16, torch.int32)
    with pytest.raises(ValueError, match="value_dtype"):
        HashTable("cpu", torch.int32, torch.float16)
    with pytest.raises(ValueError, match="value_dtype"):
        HashTable("cpu", torch.int32, torch.bool)
    with pytest.raises(ValueError, match="max_size"):
        HashTable("cpu", torch.int32, torch.int32, max_size=0)
    with pytest.raises(NotImplementedError, match="CPU"):
        HashTable(torch.device("meta"), torch.int32, torch.int32)

    table = HashTable("cpu", torch.int32, torch.float32)
    k32 = torch.tensor([1, 2, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match="keys must be torch.int32"):
        table.insert(k32.long(), torch.ones(3))
    with pytest.raises(ValueError, match="keys must be torch.int32"):
        table.insert(k32.float())
    with pytest.raises(ValueError, match="values must be torch.float32"):
        table.insert(k32, torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="values must be torch.float32"):
        table.insert(k32, torch.ones(3, dtype=torch.int32))  # same itemsize, other dtype
    with pytest.raises(ValueError, match="one entry per key"):
        table.insert(k32, torch.ones(2))
    with pytest.raises(ValueError, match="1-D"):
        table.insert(k32.view(3, 1), torch.ones(3))
    assert len(table) == 0  # nothing was inserted by the failed calls
    table.insert(k32, torch.ones(3))
    with pytest.raises(ValueError, match="keys must be torch.int32"):
        table.query(k32.long())
    with pytest.raises(ValueError, match="one entry per key"):
        table.query(k32, torch.zeros(4))
    with pytest.raises(ValueError, match="values must be torch.float32"):
        table.query(k32, torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="contiguous"):
        table.query(k32, torch.zeros(6)[::2])
    with pytest.raises(ValueError, match="one entry per key"):
        table.insert_exist_keys(k32, torch.zeros(2))
    with pytest.raises(ValueError, match="keys must be torch.int32"):
        table.insert_exist_keys(k32.long(), torch.zeros(3))
    with pytest.raises(ValueError, match="int32 or torch.int64"):
        table.assign_arange_()
    # non-contiguous keys are fine
    vals, empty = table.query(torch.tensor([1, 9, 2, 9, 3], dtype=torch.int32)[::2])
    assert vals.tolist() == [1.0, 1.0, 1.0] and not empty.any()
