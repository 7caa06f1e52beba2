"""SparseConvTensor API and the small modules around it (spconv 2.x compatible surface)."""
import copy
import itertools
import re
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

import spconv as spconv_pkg
import spconv.pytorch as spconv


# --------------------------------------------------------------------------------------------------
# helpers (local on purpose: independent of the library and of other test files)

def _sites(shape, batch_size, n_per_batch, seed=0):
    g = np.random.default_rng(seed)
    volume = int(np.prod(shape))
    rows = []
    for b in range(batch_size):
        flat = g.choice(volume, size=n_per_batch, replace=False)
        coords = np.stack(np.unravel_index(flat, shape), 1)
        rows.append(np.concatenate([np.full((n_per_batch, 1), b), coords], 1))
    return torch.from_numpy(np.concatenate(rows)).int()


def _tensor(shape=(6, 6, 6), batch_size=2, n=10, channels=3, dtype=torch.float32, seed=0):
    indices = _sites(shape, batch_size, n, seed)
    g = torch.Generator().manual_seed(seed + 1)
    features = torch.randn(indices.shape[0], channels, generator=g, dtype=dtype)
    return spconv.SparseConvTensor(features, indices, list(shape), batch_size)


def _dense_by_loops(features, indices, shape, batch_size, channels_first=True):
    """Reference dense tensor built element by element with python loops."""
    c = features.shape[1]
    out = torch.zeros((batch_size, *shape, c), dtype=features.dtype)
    for row in range(indices.shape[0]):
        site = tuple(int(v) for v in indices[row])
        for ch in range(c):
            out[site + (ch,)] = features[row, ch]
    if channels_first:
        out = out.permute(0, len(shape) + 1, *range(1, len(shape) + 1))
    return out


def _site_map(x):
    """{(batch, *coords): feature row} of a sparse tensor (row-order independent)."""
    return {tuple(int(v) for v in x.indices[i]): x.features[i] for i in range(x.indices.shape[0])}


# --------------------------------------------------------------------------------------------------
# constructor / attributes

@pytest.mark.parametrize("shape_arg", [(5, 6, 7), [5, 6, 7], np.array([5, 6, 7]), torch.Size([5, 6, 7]),
                                       np.array([5, 6, 7], dtype=np.int32)])
def test_constructor_stores_spatial_shape_as_list(shape_arg):
    indices = torch.tensor([[0, 4, 5, 6], [2, 0, 0, 0]], dtype=torch.int32)
    features = torch.randn(2, 3)
    x = spconv.SparseConvTensor(features, indices, shape_arg, 3)
    assert isinstance(x.spatial_shape, list)
    assert x.spatial_shape == [5, 6, 7]
    assert all(type(v) is int for v in x.spatial_shape)
    assert x.batch_size == 3
    assert x.features is features
    assert x.indices is indices
    assert x.indice_dict == {}


def test_constructor_defaults_indice_dict_and_grid():
    x = _tensor()
    assert isinstance(x.indice_dict, dict) and len(x.indice_dict) == 0
    d = {}
    y = spconv.SparseConvTensor(x.features, x.indices, x.spatial_shape, x.batch_size, indice_dict=d)
    assert y.indice_dict is d


def test_features_setter_raises():
    x = _tensor()
    with pytest.raises(ValueError, match="replace_feature"):
        x.features = torch.zeros_like(x.features)


def test_replace_feature_keeps_indices_and_dict():
    x = _tensor(channels=4)
    y = spconv.SubMConv3d(4, 4, 3, indice_key="s")(x)
    assert "s" in y.indice_dict
    old_features = y.features
    new_f = torch.randn(y.indices.shape[0], 7)
    z = y.replace_feature(new_f)
    assert z is not y
    assert z.features is new_f
    assert torch.equal(z.indices, y.indices)
    assert z.indice_dict is y.indice_dict
    assert z.spatial_shape == y.spatial_shape
    assert z.batch_size == y.batch_size
    assert y.features is old_features  # the source is untouched
    # the kept map is still usable by a SubM layer sharing the key
    out = spconv.SubMConv3d(7, 2, 3, indice_key="s")(z)
    assert out.features.shape == (y.indices.shape[0], 2)


def test_shadow_copy():
    x = _tensor(channels=4)
    y = spconv.SubMConv3d(4, 4, 3, indice_key="s")(x)
    c = y.shadow_copy()
    assert c is not y
    assert c.features is y.features
    assert torch.equal(c.indices, y.indices)
    assert c.indice_dict is y.indice_dict
    assert c.spatial_shape == y.spatial_shape
    assert c.batch_size == y.batch_size


def test_minus():
    x = _tensor()
    m = x.minus()
    assert m is not x
    assert torch.equal(m.features, -x.features)
    assert torch.equal(m.indices, x.indices)
    assert m.spatial_shape == x.spatial_shape and m.batch_size == x.batch_size
    assert torch.equal(m.minus().features, x.features)


def _keyed_tensor():
    x = _tensor(channels=4, n=12)
    y = spconv.SubMConv3d(4, 4, 3, indice_key="s")(x)
    assert "s" in y.indice_dict
    return y


def test_select_by_index_bool_mask():
    y = _keyed_tensor()
    dict_before = dict(y.indice_dict)
    n = y.indices.shape[0]
    mask = torch.tensor([i % 3 != 1 for i in range(n)])
    s = y.select_by_index(mask)
    expected_rows = [i for i in range(n) if i % 3 != 1]
    assert s.indices.shape[0] == len(expected_rows)
    for k, i in enumerate(expected_rows):
        assert torch.equal(s.indices[k], y.indices[i])
        assert torch.equal(s.features[k], y.features[i])
    assert len(s.indice_dict) == 0
    assert y.indice_dict == dict_before and "s" in y.indice_dict  # original untouched
    assert y.indices.shape[0] == n and y.features.shape[0] == n
    assert s.spatial_shape == y.spatial_shape and s.batch_size == y.batch_size


def test_select_by_index_index_tensor():
    y = _keyed_tensor()
    dict_before = dict(y.indice_dict)
    rows = [5, 0, 3, 11]
    s = y.select_by_index(torch.tensor(rows))
    assert s.indices.shape == (len(rows), 4)
    assert s.indices.dtype == torch.int32
    for k, i in enumerate(rows):
        assert torch.equal(s.indices[k], y.indices[i])
        assert torch.equal(s.features[k], y.features[i])
    assert len(s.indice_dict) == 0
    assert y.indice_dict == dict_before


def test_select_by_index_result_is_usable_with_same_key():
    y = _keyed_tensor()
    mask = torch.arange(y.indices.shape[0]) < 5
    s = y.select_by_index(mask)
    conv = spconv.SubMConv3d(4, 2, 3, indice_key="s")
    out = conv(s)  # must build a fresh map, not reuse the one for all sites
    fresh = spconv.SparseConvTensor(s.features.detach().clone(), s.indices.clone(), s.spatial_shape, s.batch_size)
    ref = conv(fresh)
    assert torch.allclose(out.dense(), ref.dense())
    assert "s" in y.indice_dict and y.indice_dict["s"] is not out.indice_dict["s"]


def test_select_by_index_gradient():
    x = _tensor()
    f = x.features.clone().requires_grad_()
    x = x.replace_feature(f)
    s = x.select_by_index(torch.tensor([1, 4]))
    s.features.sum().backward()
    expected = torch.zeros_like(f)
    expected[[1, 4]] = 1
    assert torch.equal(f.grad, expected)


# --------------------------------------------------------------------------------------------------
# dense / from_dense

@pytest.mark.parametrize("shape, batch_size", [((5, 4, 3), 2), ((6, 7), 3), ((9,), 2), ((3, 2, 4, 3), 2)])
@pytest.mark.parametrize("channels_first", [True, False])
def test_dense_matches_loop_reference(shape, batch_size, channels_first):
    x = _tensor(shape=shape, batch_size=batch_size, n=5, channels=3, dtype=torch.float64)
    d = x.dense(channels_first=channels_first)
    ref = _dense_by_loops(x.features, x.indices, shape, batch_size, channels_first)
    assert d.dtype == torch.float64
    assert d.shape == ref.shape
    assert torch.equal(d, ref)
    assert d.is_contiguous() or not channels_first  # channels-first result is contiguous (spconv calls .contiguous())


def test_dense_default_is_channels_first():
    x = _tensor(shape=(4, 5), channels=2)
    assert x.dense().shape == (x.batch_size, 2, 4, 5)
    assert torch.equal(x.dense(), x.dense(channels_first=True))


def test_dense_gradient():
    x = _tensor(shape=(4, 5, 3), channels=2)
    f = x.features.clone().requires_grad_()
    x = x.replace_feature(f)
    w = torch.randn(x.batch_size, 2, 4, 5, 3)
    (x.dense() * w).sum().backward()
    expected = torch.stack([w[(int(i[0]), slice(None)) + tuple(int(v) for v in i[1:])] for i in x.indices])
    assert torch.allclose(f.grad, expected)


def test_dense_empty():
    x = spconv.SparseConvTensor(torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.int32), [4, 5], 2)
    d = x.dense()
    assert d.shape == (2, 3, 4, 5) and torch.all(d == 0)


def _random_dense(shape, batch_size, channels, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, *shape, channels, generator=g, dtype=torch.float64)
    mask = torch.rand(batch_size, *shape, generator=g) < 0.3
    x = x * mask.unsqueeze(-1)
    return x, mask


@pytest.mark.parametrize("shape", [(5, 6), (4, 3, 5)])
def test_from_dense_round_trip(shape):
    batch_size, channels = 2, 3
    x, mask = _random_dense(shape, batch_size, channels, seed=len(shape))
    # a site where only some channels are zero is still active
    site = (1,) + tuple(s - 1 for s in shape)
    x[site] = 0
    x[site + (1,)] = 2.5
    mask[site] = True
    sp = spconv.SparseConvTensor.from_dense(x)
    assert sp.indices.dtype == torch.int32
    assert sp.indices.shape == (int(mask.sum()), len(shape) + 1)
    assert sp.features.shape == (int(mask.sum()), channels)
    assert sp.spatial_shape == list(shape)
    assert sp.batch_size == batch_size
    assert torch.equal(sp.dense(channels_first=False), x)
    assert torch.equal(sp.dense(), x.movedim(-1, 1))
    # every stored site is an active dense site with the same features
    for i in range(sp.indices.shape[0]):
        s = tuple(int(v) for v in sp.indices[i])
        assert mask[s]
        assert torch.equal(sp.features[i], x[s])


@pytest.mark.parametrize("shape", [(5, 6), (4, 3, 5)])
def test_from_dense_gradient(shape):
    x, mask = _random_dense(shape, 2, 3, seed=7)
    x.requires_grad_()
    sp = spconv.SparseConvTensor.from_dense(x)
    w = torch.randn(x.shape, dtype=x.dtype)
    (sp.dense(channels_first=False) * w).sum().backward()
    assert torch.equal(x.grad, w * mask.unsqueeze(-1))


def test_from_dense_then_conv():
    x, _ = _random_dense((6, 6, 6), 2, 4, seed=3)
    sp = spconv.SparseConvTensor.from_dense(x.float())
    y = spconv.SubMConv3d(4, 2, 3)(sp)
    assert y.features.shape == (sp.indices.shape[0], 2)


# --------------------------------------------------------------------------------------------------
# arithmetic

def test_add_two_sparse_tensors_same_indices():
    a = _tensor()
    b = a.replace_feature(torch.randn_like(a.features))
    c = a + b
    assert isinstance(c, spconv.SparseConvTensor)
    assert torch.equal(c.features, a.features + b.features)
    assert torch.equal(c.indices, a.indices)
    assert c.spatial_shape == a.spatial_shape and c.batch_size == a.batch_size


def test_add_sparse_tensors_equal_but_distinct_index_tensors():
    a = _tensor()
    b = spconv.SparseConvTensor(torch.randn_like(a.features), a.indices.clone(), a.spatial_shape, a.batch_size)
    c = a + b
    assert torch.equal(c.features, a.features + b.features)


def test_add_plain_tensor():
    a = _tensor()
    t = torch.randn_like(a.features)
    c = a + t
    assert isinstance(c, spconv.SparseConvTensor)
    assert torch.equal(c.features, a.features + t)
    r = t + a
    assert isinstance(r, spconv.SparseConvTensor)
    assert torch.equal(r.features, t + a.features)


def test_iadd():
    a = _tensor()
    fa = a.features.clone()
    b = a.replace_feature(torch.randn_like(a.features))
    a += b
    assert isinstance(a, spconv.SparseConvTensor)
    assert torch.equal(a.features, fa + b.features)
    t = torch.ones_like(fa)
    a += t
    assert torch.equal(a.features, fa + b.features + 1)


def test_add_gradient_flows_to_both():
    a = _tensor()
    fa = a.features.clone().requires_grad_()
    fb = torch.randn_like(fa, requires_grad=True)
    a = a.replace_feature(fa)
    b = a.replace_feature(fb)
    c = a + b
    c += b
    c.features.sum().backward()
    assert torch.equal(fa.grad, torch.ones_like(fa))
    assert torch.equal(fb.grad, 2 * torch.ones_like(fb))


def test_add_keeps_indice_dict():
    y = _keyed_tensor()
    z = y + y.features
    assert "s" in z.indice_dict


def test_add_different_indices_raises():
    a = _tensor(seed=0)
    other = a.indices.clone()
    # move row 0 to a coordinate not used in the same batch (sites stay unique)
    used = {tuple(int(v) for v in r) for r in a.indices}
    for cand in itertools.product(range(a.spatial_shape[0]), range(a.spatial_shape[1]), range(a.spatial_shape[2])):
        if (int(other[0, 0]),) + cand not in used:
            other[0, 1:] = torch.tensor(cand, dtype=torch.int32)
            break
    b = spconv.SparseConvTensor(torch.randn_like(a.features), other, a.spatial_shape, a.batch_size)
    with pytest.raises(ValueError):
        a + b


def test_add_different_site_count_raises():
    a = _tensor(n=10)
    b = _tensor(n=8)
    with pytest.raises(ValueError):
        a + b


def test_add_permuted_rows_raises():
    a = _tensor()
    perm = torch.arange(a.indices.shape[0]).flip(0)
    b = spconv.SparseConvTensor(a.features[perm], a.indices[perm], a.spatial_shape, a.batch_size)
    with pytest.raises(ValueError):
        a + b


# --------------------------------------------------------------------------------------------------
# misc accessors

def test_find_indice_pair():
    x = _tensor(channels=4)
    y = spconv.SubMConv3d(4, 4, 3, indice_key="s")(x)
    z = spconv.SparseConv3d(4, 4, 3, stride=2, indice_key="d")(y)
    assert y.find_indice_pair("s") is y.indice_dict["s"]
    assert y.find_indice_pair("s") is not None
    assert y.find_indice_pair(None) is None
    assert y.find_indice_pair("missing") is None
    assert x.find_indice_pair("s") is None  # the input is not modified
    assert z.find_indice_pair("s") is y.find_indice_pair("s")  # keys flow forward
    assert z.find_indice_pair("d") is not None
    assert y.find_indice_pair("d") is None


@pytest.mark.parametrize("shape", [(5,), (5, 6), (5, 6, 7), (2, 3, 4, 5)])
def test_spatial_size(shape):
    x = _tensor(shape=shape, n=2)
    expected = 1
    for s in shape:
        expected *= s
    assert x.spatial_size == expected


def test_repr_mentions_shape_and_spatial_shape():
    x = _tensor(shape=(6, 7, 8), n=9, channels=5)
    r = repr(x)
    assert "SparseConvTensor" in r
    assert "shape" in r
    assert "spatial_shape" in r
    assert "[6, 7, 8]" in r
    assert "18" in r and "5" in r  # features [N=18, C=5]


# --------------------------------------------------------------------------------------------------
# package metadata, ConvAlgo

def test_version():
    v = spconv_pkg.__version__
    assert isinstance(v, str)
    assert re.fullmatch(r"2\.\d+\.\d+", v)
    float(v[2:])  # idiom used by downstream code (e.g. OpenPCDet)
    assert v >= "2.0.0"
    assert [int(p) for p in v.split(".")] == list(spconv_pkg.SPCONV_VERSION_NUMBERS)


def test_conv_algo_members():
    algo = spconv.ConvAlgo
    assert algo is spconv_pkg.ConvAlgo
    names = {m.name for m in algo}
    assert {"Native", "MaskImplicitGemm", "MaskSplitImplicitGemm"} <= names
    assert algo.Native.value == 0 and algo.MaskImplicitGemm.value == 1 and algo.MaskSplitImplicitGemm.value == 2


_ALGOS = ["Native", "MaskImplicitGemm", "MaskSplitImplicitGemm"]


def _conv_case(kind, ndim):
    shape = {1: (9,), 2: (7, 6), 3: (5, 6, 5), 4: (4, 3, 4, 3)}[ndim]
    cls = getattr(spconv, {"subm": "SubMConv", "conv": "SparseConv", "transpose": "SparseConvTranspose",
                           "inverse": "SparseInverseConv"}[kind] + f"{ndim}d")
    return cls, shape


@pytest.mark.parametrize("ndim", [1, 2, 3, 4])
@pytest.mark.parametrize("kind", ["subm", "conv", "transpose", "inverse"])
def test_every_conv_module_accepts_every_algo(kind, ndim):
    cls, shape = _conv_case(kind, ndim)
    x = _tensor(shape=shape, batch_size=2, n=6, channels=3, seed=ndim)
    outs = []
    for name in _ALGOS:
        algo = getattr(spconv.ConvAlgo, name)
        torch.manual_seed(0)
        if kind == "inverse":
            down = spconv.SparseConvolution(ndim, 3, 3, 3, stride=2, indice_key="down", algo=algo)
            mod = cls(3, 2, 3, indice_key="down", algo=algo)
            assert mod.algo == algo
            inp = down(x)
            out = mod(inp)
            assert out.spatial_shape == x.spatial_shape
        else:
            mod = cls(3, 2, 3, stride=2 if kind != "subm" else 1, algo=algo)
            assert mod.algo == algo
            out = mod(x)
        assert out.features.shape[1] == 2
        out.features.sum().backward()
        assert mod.weight.grad is not None
        outs.append(out.dense())
    for o in outs[1:]:  # same seed, same weights: the algorithm must not change the result
        assert torch.allclose(o, outs[0], atol=1e-5)


# --------------------------------------------------------------------------------------------------
# containers and small modules

def test_sparse_sequential_applies_torch_modules_to_features():
    x = _tensor(channels=4, n=15)
    bn = nn.BatchNorm1d(4)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    ref_bn = copy.deepcopy(bn)
    seq = spconv.SparseSequential(bn, nn.ReLU())
    out = seq(x)
    assert isinstance(out, spconv.SparseConvTensor)
    assert torch.equal(out.indices, x.indices)
    assert torch.allclose(out.features, torch.relu(ref_bn(x.features)))
    # running stats were updated through the sequential as for a plain BatchNorm1d
    assert torch.allclose(bn.running_mean, ref_bn.running_mean)
    assert torch.allclose(bn.running_var, ref_bn.running_var)
    seq.eval()
    ref_bn.eval()
    assert torch.allclose(seq(x).features, torch.relu(ref_bn(x.features)))


def test_sparse_sequential_with_convs_and_keys():
    x = _tensor(channels=4, n=15)
    seq = spconv.SparseSequential(
        spconv.SubMConv3d(4, 8, 3, indice_key="s1"), nn.BatchNorm1d(8), nn.ReLU(),
        spconv.SubMConv3d(8, 8, 3, indice_key="s1"), nn.BatchNorm1d(8), nn.ReLU(),
        spconv.SparseConv3d(8, 6, 3, stride=2, indice_key="d1"),
    )
    out = seq(x)
    assert out.features.shape[1] == 6
    assert {"s1", "d1"} <= set(out.indice_dict)
    out.features.sum().backward()
    assert seq[0].weight.grad is not None


def test_sparse_sequential_indexing_len_add():
    a, b, c = nn.BatchNorm1d(3), nn.ReLU(), spconv.SubMConv3d(3, 3, 3)
    seq = spconv.SparseSequential(a, b)
    assert len(seq) == 2
    assert seq[0] is a and seq[1] is b and seq[-1] is b
    with pytest.raises(IndexError):
        seq[2]
    seq.add(c)
    assert len(seq) == 3 and seq[2] is c
    lin = nn.Linear(3, 5)
    seq.add(lin, "head")
    assert len(seq) == 4 and seq.head is lin and seq[3] is lin
    out = seq(_tensor(channels=3))
    assert out.features.shape[1] == 5


def test_sparse_sequential_ordered_dict():
    seq = spconv.SparseSequential(OrderedDict([("bn", nn.BatchNorm1d(3)), ("act", nn.ReLU())]))
    assert len(seq) == 2
    assert isinstance(seq.bn, nn.BatchNorm1d) and seq[1] is seq.act


def test_sparse_sequential_plain_tensor_input():
    seq = spconv.SparseSequential(nn.Linear(3, 4), nn.ReLU())
    t = torch.randn(5, 3)
    out = seq(t)
    assert isinstance(out, torch.Tensor) and out.shape == (5, 4)
    assert torch.allclose(out, torch.relu(seq[0](t)))


def test_to_dense():
    x = _tensor(shape=(4, 5, 6), batch_size=3, n=7, channels=2)
    d = spconv.ToDense()(x)
    assert isinstance(d, torch.Tensor)
    assert d.shape == (3, 2, 4, 5, 6)
    assert torch.equal(d, _dense_by_loops(x.features, x.indices, (4, 5, 6), 3, True))


def test_to_dense_in_sequential():
    x = _tensor(shape=(4, 5), channels=2)
    seq = spconv.SparseSequential(spconv.SubMConv2d(2, 3, 3), spconv.ToDense())
    d = seq(x)
    assert d.shape == (x.batch_size, 3, 4, 5)


def test_remove_grid():
    x = _tensor()
    out = spconv.RemoveGrid()(x)
    assert isinstance(out, spconv.SparseConvTensor)
    assert out.grid is None
    assert torch.equal(out.features, x.features) and torch.equal(out.indices, x.indices)


@pytest.mark.parametrize("name, ref", [
    ("SparseBatchNorm", lambda m, t: nn.functional.batch_norm(t, None, None, m.weight, m.bias, True, 0.0, m.eps)),
    ("SparseReLU", lambda m, t: torch.relu(t)),
    ("SparseIdentity", lambda m, t: t),
])
def test_feature_wise_modules_accept_sparse_and_dense(name, ref):
    cls = getattr(spconv, name)
    m = cls(4) if name == "SparseBatchNorm" else cls()
    x = _tensor(channels=4, n=12)
    out = m(x)
    assert isinstance(out, spconv.SparseConvTensor)
    assert torch.equal(out.indices, x.indices)
    assert torch.allclose(out.features, ref(m, x.features), atol=1e-6)
    t = torch.randn(9, 4)
    out_t = m(t)
    assert isinstance(out_t, torch.Tensor) and not isinstance(out_t, spconv.SparseConvTensor)
    assert torch.allclose(out_t, ref(m, t), atol=1e-6)


def test_sparse_batchnorm_is_batchnorm1d_and_relu_is_relu():
    assert isinstance(spconv.SparseBatchNorm(4), nn.BatchNorm1d)
    assert isinstance(spconv.SparseReLU(), nn.ReLU)
    assert isinstance(spconv.SparseIdentity(), nn.Identity)


def test_feature_wise_modules_in_sequential():
    x = _tensor(channels=4, n=12)
    seq = spconv.SparseSequential(spconv.SubMConv3d(4, 4, 3), spconv.SparseBatchNorm(4), spconv.SparseReLU(),
                                  spconv.SparseIdentity())
    out = seq(x)
    assert isinstance(out, spconv.SparseConvTensor)
    assert torch.all(out.features >= 0)


def test_identity():
    ident = spconv.Identity()
    assert isinstance(ident, nn.Module)
    x = _tensor()
    assert ident(x) is x
    t = torch.randn(3)
    assert ident(t) is t
    seq = spconv.SparseSequential(spconv.SubMConv3d(3, 3, 3), ident)
    assert seq(x).features.shape == (x.indices.shape[0], 3)
