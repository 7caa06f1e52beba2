"""Tables and sparse_add against dense sums."""
import pytest
import torch

import spconv.pytorch as spconv
from spconv.pytorch import functional as Fsp
from spconv.pytorch.tables import AddTableMisaligned
from helpers import random_sparse, to_dense


def _tensor(seed, density=0.2, channels=3, shape=(6, 7, 5), batch=2):
    feats, idx = random_sparse(list(shape), batch, density, channels, dtype=torch.float64, seed=seed)
    return spconv.SparseConvTensor(feats.requires_grad_(True), idx, list(shape), batch)


@pytest.mark.parametrize("fn", [Fsp.sparse_add, Fsp.sparse_add_hash_based, lambda *t: AddTableMisaligned()(list(t))])
def test_sparse_add_different_sites_equals_dense_sum(fn):
    a, b, c = _tensor(1), _tensor(2, 0.4), _tensor(3, 0.05)
    out = fn(a, b, c)
    dense = sum(to_dense(t.features, t.indices, t.spatial_shape, t.batch_size) for t in (a, b, c))
    torch.testing.assert_close(out.dense(), dense)
    rows = [tuple(r) for r in out.indices.tolist()]
    assert len(rows) == len(set(rows))
    union = {tuple(r) for t in (a, b, c) for r in t.indices.tolist()}
    assert set(rows) == union
    out.features.sum().backward()
    for t in (a, b, c):
        torch.testing.assert_close(t.features.grad, torch.ones_like(t.features))


def test_sparse_add_keeps_indice_dict_of_the_superset():
    feats, idx = random_sparse([10, 10, 10], 1, 0.1, 4, seed=1)
    x = spconv.SparseConvTensor(feats, idx, [10, 10, 10], 1)
    down = spconv.SparseConv3d(4, 4, 3, 2, 1, indice_key="d")(x)
    sub = down.select_by_index(torch.arange(0, down.indices.shape[0], 2))
    summed = Fsp.sparse_add(down, sub)
    assert "d" in summed.indice_dict and torch.equal(summed.indices, down.indices)
    up = spconv.SparseInverseConv3d(4, 2, 3, indice_key="d")(summed)
    assert torch.equal(up.indices, idx)


def test_add_and_join_tables():
    feats, idx = random_sparse([6, 6, 6], 1, 0.3, 4)
    x = spconv.SparseConvTensor(feats, idx, [6, 6, 6], 1)
    branches = spconv.ConcatTable(spconv.SubMConv3d(4, 4, 3), spconv.SubMConv3d(4, 4, 1), spconv.Identity())
    outs = branches(x)
    assert len(outs) == 3 and len(branches) == 3
    added = spconv.AddTable()(outs)
    torch.testing.assert_close(added.features, outs[0].features + outs[1].features + feats)
    joined = spconv.JoinTable()(outs)
    torch.testing.assert_close(joined.features, torch.cat([o.features for o in outs], 1))
    other = spconv.SparseConvTensor(feats, random_sparse([6, 6, 6], 1, 0.3, 4, seed=9)[1], [6, 6, 6], 1)
    with pytest.raises(ValueError, match="same sites"):
        spconv.AddTable()([x, other])
    with pytest.raises(ValueError, match="channel"):
        spconv.AddTable()([x, outs[0].replace_feature(torch.cat([feats, feats], 1))])


def test_sparse_add_bad_input():
    a, b = _tensor(1), _tensor(2, shape=(6, 7, 6))
    with pytest.raises(ValueError, match="spatial_shape"):
        Fsp.sparse_add(a, b)
    with pytest.raises(ValueError, match="channel"):
        Fsp.sparse_add(a, _tensor(3, channels=5))


def test_remove_duplicate_keeps_first():
    from spconv.pytorch.spatial import RemoveDuplicate
    idx = torch.tensor([[0, 1, 1], [0, 2, 2], [0, 1, 1], [1, 1, 1]], dtype=torch.int32)
    feats = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    # the constructor rejects nothing here: duplicates only fail when a kernel map is built
    out = RemoveDuplicate()(spconv.SparseConvTensor(feats, idx, [3, 3], 2))
    assert out.indices.tolist() == [[0, 1, 1], [0, 2, 2], [1, 1, 1]]
    assert out.features.squeeze(1).tolist() == [1.0, 2.0, 4.0]
