"""Sparse pooling against dense max_poolNd (positive data) and an independent average reference."""
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import spconv.pytorch as spconv
from spconv.pytorch.pool import SparseAvgPool, SparseMaxPool
from helpers import gather_sites, random_sparse, to_dense

SHAPES = {1: [17], 2: [9, 11], 3: [7, 8, 6], 4: [5, 4, 6, 5]}
MAXPOOL = {1: spconv.SparseMaxPool1d, 2: spconv.SparseMaxPool2d, 3: spconv.SparseMaxPool3d, 4: spconv.SparseMaxPool4d}
AVGPOOL = {1: spconv.SparseAvgPool1d, 2: spconv.SparseAvgPool2d, 3: spconv.SparseAvgPool3d, 4: spconv.SparseAvgPool4d}


def dense_max_pool(x, k, s, p, d):
    nd = x.dim() - 2
    if nd == 1:
        return F.max_pool1d(x, k, s, p, d)
    if nd == 2:
        return F.max_pool2d(x, k, s, p, d)
    if nd == 3:
        return F.max_pool3d(x, k, s, p, d)
    # 4-D: max over dim 0 windows of 3-D max pools (padding with -inf)
    k, s, p, d = [list(v) if isinstance(v, (list, tuple)) else [v] * 4 for v in (k, s, p, d)]
    xp = F.pad(x, [0, 0] * 3 + [p[0], p[0]], value=float("-inf"))
    n_out = (xp.shape[2] - d[0] * (k[0] - 1) - 1) // s[0] + 1
    outs = []
    for t in range(n_out):
        m = torch.stack([F.max_pool3d(xp[:, :, t * s[0] + r * d[0]], k[1:], s[1:], p[1:], d[1:])
                         for r in range(k[0])]).amax(0)
        outs.append(m)
    return torch.stack(outs, 2)


def reference_avg(feats, idx, shape, k, s, p, d):
    """Average over the active sites of each window, with python loops over sites (independent of spconv)."""
    nd = len(shape)
    k, s, p, d = [[v] * nd if isinstance(v, int) else list(v) for v in (k, s, p, d)]
    sums, counts = {}, {}
    out_shape = [(i + 2 * pp - dd * (kk - 1) - 1) // ss + 1 for i, kk, ss, pp, dd in zip(shape, k, s, p, d)]
    for row, site in enumerate(idx.tolist()):
        b, x = site[0], site[1:]
        for r in itertools.product(*[range(kk) for kk in k]):
            t = [x[i] + p[i] - r[i] * d[i] for i in range(nd)]
            if any(ti % s[i] for i, ti in enumerate(t)):
                continue
            y = tuple(ti // s[i] for i, ti in enumerate(t))
            if any(yy < 0 or yy >= out_shape[i] for i, yy in enumerate(y)):
                continue
            key = (b, *y)
            sums[key] = sums.get(key, 0) + feats[row]
            counts[key] = counts.get(key, 0) + 1
    return {key: sums[key] / counts[key] for key in sums}, out_shape


CASES = [(nd, k, s, p, d) for nd in (1, 2, 3, 4) for k, s, p, d in
         [(2, 2, 0, 1), (3, 2, 1, 1), (3, 1, 1, 1), (3, 3, 0, 1), (2, 1, 0, 2), ((3, 2, 1, 3)[:nd], 2, 0, 1)]
         if not (nd == 4 and k == 2 and d == 2)]


@pytest.mark.parametrize("nd,k,s,p,d", CASES)
def test_maxpool_matches_dense(nd, k, s, p, d):
    shape = SHAPES[nd]
    feats, idx = random_sparse(shape, 2, 0.3, 4, dtype=torch.float64, seed=nd, low=0.1, high=1.0)
    f_sp = feats.clone().requires_grad_(True)
    out = MAXPOOL[nd](k, s, p, d)(spconv.SparseConvTensor(f_sp, idx, shape, 2))
    f_dn = feats.clone().requires_grad_(True)
    ref = dense_max_pool(to_dense(f_dn, idx, shape, 2), k, s, p, d)
    assert list(ref.shape[2:]) == out.spatial_shape
    torch.testing.assert_close(out.dense(), ref)  # positive data: identical everywhere
    dout = torch.rand_like(out.features)
    out.features.backward(dout)
    gather_sites(ref, out.indices).backward(dout)
    torch.testing.assert_close(f_sp.grad, f_dn.grad)


@pytest.mark.parametrize("nd,k,s,p,d", CASES)
def test_avgpool_matches_reference_and_gradcheck(nd, k, s, p, d):
    shape = SHAPES[nd]
    feats, idx = random_sparse(shape, 2, 0.3, 3, dtype=torch.float64, seed=nd + 7)
    out = AVGPOOL[nd](k, s, p, d)(spconv.SparseConvTensor(feats, idx, shape, 2))
    expect, out_shape = reference_avg(feats, idx, shape, k, s, p, d)
    assert out.spatial_shape == out_shape
    got = {tuple(r): out.features[i] for i, r in enumerate(out.indices.tolist())}
    assert set(got) == set(expect)
    for key, val in expect.items():
        torch.testing.assert_close(got[key], val)
    small, sidx = random_sparse(shape, 1, 0.1, 2, dtype=torch.float64, seed=nd)
    pool = AVGPOOL[nd](k, s, p, d)
    fn = lambda f: pool(spconv.SparseConvTensor(f, sidx, shape, 1)).features
    assert torch.autograd.gradcheck(fn, (small.clone().requires_grad_(True),))


def test_maxpool_of_negative_data_is_zero_as_in_spconv():
    """spconv 2.3.8's max pool starts from 0: a window of only negative inputs gives 0 (spconv.scn keeps the
    plain max, see test_scn.py)."""
    idx = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 2, 2]], dtype=torch.int32)
    feats = torch.tensor([[-3.0], [-1.0], [2.0]])
    out = spconv.SparseMaxPool2d(2, 2)(spconv.SparseConvTensor(feats, idx, [4, 4], 1))
    got = {tuple(i): v for i, v in zip(out.indices.tolist(), out.features[:, 0].tolist())}
    assert got == {(0, 0, 0): 0.0, (0, 1, 1): 2.0}


def test_subm_maxpool_keeps_sites():
    feats, idx = random_sparse([8, 8, 8], 1, 0.2, 3, low=0.1, high=1.0)
    x = spconv.SparseConvTensor(feats, idx, [8, 8, 8], 1)
    out = SparseMaxPool(3, 3, subm=True)(x)
    assert torch.equal(out.indices, idx)
    ref = F.max_pool3d(to_dense(feats, idx, [8, 8, 8], 1), 3, 1, 1)
    torch.testing.assert_close(out.features, gather_sites(ref, idx))


def test_pool_stride_defaults_to_kernel():
    assert spconv.SparseMaxPool3d(2).stride == [2, 2, 2] and spconv.SparseAvgPool2d((2, 3)).stride == [2, 3]
    assert SparseMaxPool(3).stride == [1, 1, 1]  # the generic base keeps spconv's default of 1


def test_inverse_conv_undoes_keyed_pool():
    feats, idx = random_sparse([10, 10, 10], 2, 0.1, 4, seed=3)
    net = spconv.SparseSequential(spconv.SparseMaxPool3d(2, 2, indice_key="p1"), spconv.SubMConv3d(4, 4, 3),
                                  spconv.SparseInverseConv3d(4, 4, 2, indice_key="p1"))
    out = net(spconv.SparseConvTensor(feats, idx, [10, 10, 10], 2))
    assert torch.equal(out.indices, idx) and out.spatial_shape == [10, 10, 10]


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_global_pools(batch):
    feats, idx = random_sparse([6, 7, 5], batch, 0.2, 5, dtype=torch.float64, seed=batch, low=0.1, high=0.4)
    f = feats.clone().requires_grad_(True)
    x = spconv.SparseConvTensor(f, idx, [6, 7, 5], batch)
    gmax = spconv.SparseGlobalMaxPool()(x)
    dense = to_dense(feats, idx, [6, 7, 5], batch)
    torch.testing.assert_close(gmax, F.max_pool3d(dense, [6, 7, 5]).view(batch, 5))
    gavg = spconv.SparseGlobalAvgPool()(x)
    assert gavg.shape == (batch, 5)
    for b in range(batch):
        torch.testing.assert_close(gavg[b], feats[idx[:, 0] == b].mean(0))
    assert torch.autograd.gradcheck(lambda t: spconv.SparseGlobalAvgPool()(x.replace_feature(t)),
                                    (feats.clone().requires_grad_(True),))
    gmax.sum().backward()
    expect = torch.zeros_like(feats)
    for b in range(batch):
        rows = (idx[:, 0] == b).nonzero().squeeze(1)
        expect[rows[feats[rows].argmax(0)], torch.arange(5)] = 1.0
    torch.testing.assert_close(f.grad, expect)


def test_global_pool_empty_batch_entry_is_zero():
    idx = torch.tensor([[0, 1, 1]], dtype=torch.int32)
    x = spconv.SparseConvTensor(torch.tensor([[2.0, -1.0]]), idx, [3, 3], 2)
    torch.testing.assert_close(spconv.SparseGlobalMaxPool()(x), torch.tensor([[2.0, -1.0], [0.0, 0.0]]))
    torch.testing.assert_close(spconv.SparseGlobalAvgPool()(x), torch.tensor([[2.0, -1.0], [0.0, 0.0]]))


@pytest.mark.parametrize("pool", [spconv.SparseMaxPool3d, spconv.SparseAvgPool3d])
def test_kernel_larger_than_input_names_the_dimension(pool):
    feats, idx = random_sparse([8, 3, 8], 1, 0.2, 2)
    with pytest.raises(ValueError, match="dimension 1"):
        pool(4, 1)(spconv.SparseConvTensor(feats, idx, [8, 3, 8], 1))


def test_pool_empty_input():
    x = spconv.SparseConvTensor(torch.zeros(0, 3, requires_grad=True), torch.zeros(0, 4, dtype=torch.int32),
                                [4, 4, 4], 1)
    for pool in (spconv.SparseMaxPool3d(2), spconv.SparseAvgPool3d(2)):
        out = pool(x)
        assert out.features.shape == (0, 3)
        out.features.sum().backward()


def test_pool_bf16_matches_fp32():
    feats, idx = random_sparse([8, 8, 8], 1, 0.3, 8, low=0.1, high=1.0)
    x32 = spconv.SparseConvTensor(feats.bfloat16().float(), idx, [8, 8, 8], 1)
    x16 = spconv.SparseConvTensor(feats.bfloat16(), idx, [8, 8, 8], 1)
    for pool in (spconv.SparseMaxPool3d(3, 2, 1), spconv.SparseAvgPool3d(3, 2, 1)):
        torch.testing.assert_close(pool(x16).features.float(), pool(x32).features, rtol=1e-2, atol=1e-2)
