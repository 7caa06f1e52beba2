"""Sparse convs against dense PyTorch convs on the densified input: outputs, active sets and gradients."""
import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import spconv.pytorch as spconv
from helpers import (dense_conv, dense_conv_transpose, gather_sites, random_sparse, to_dense, torch_conv_t_weight,
                     torch_conv_weight)

SHAPES = {1: [23], 2: [9, 11], 3: [7, 8, 6], 4: [4, 5, 4, 5]}
SUBM = {1: spconv.SubMConv1d, 2: spconv.SubMConv2d, 3: spconv.SubMConv3d, 4: spconv.SubMConv4d}
CONV = {1: spconv.SparseConv1d, 2: spconv.SparseConv2d, 3: spconv.SparseConv3d, 4: spconv.SparseConv4d}
CONV_T = {1: spconv.SparseConvTranspose1d, 2: spconv.SparseConvTranspose2d, 3: spconv.SparseConvTranspose3d,
          4: spconv.SparseConvTranspose4d}
INVERSE = {1: spconv.SparseInverseConv1d, 2: spconv.SparseInverseConv2d, 3: spconv.SparseInverseConv3d,
           4: spconv.SparseInverseConv4d}


def _vec(v, nd):
    return list(v) if isinstance(v, (list, tuple)) else [v] * nd


def _out_len(i, k, s, p, d):
    return (i + 2 * p - d * (k - 1) - 1) // s + 1


def check_conv(nd, kind, k, s=1, p=0, d=1, groups=1, bias=False, batch=2, density=0.3, seed=0, cin=4, cout=6,
               dtype=torch.float64):
    shape = SHAPES[nd]
    ks, ss, ps, ds = _vec(k, nd), _vec(s, nd), _vec(p, nd), _vec(d, nd)
    torch.manual_seed(seed)
    feats, idx = random_sparse(shape, batch, density, cin, dtype=dtype, seed=seed)
    if kind == "subm":
        layer = SUBM[nd](cin, cout, k, dilation=d, groups=groups, bias=bias)
    elif kind == "conv":
        layer = CONV[nd](cin, cout, k, s, p, d, groups=groups, bias=bias)
    else:
        layer = CONV_T[nd](cin, cout, k, s, p, d, groups=groups, bias=bias)
    layer = layer.to(dtype)
    with torch.no_grad():
        layer.weight.uniform_(-1, 1)
        if bias:
            layer.bias.uniform_(-1, 1)
    f_sp = feats.clone().requires_grad_(True)
    out = layer(spconv.SparseConvTensor(f_sp, idx, shape, batch))

    f_dn = feats.clone().requires_grad_(True)
    w_dn = layer.weight.detach().clone().requires_grad_(True)
    x_dense = to_dense(f_dn, idx, shape, batch)
    if kind == "subm":
        pad = [(kk // 2) * dd for kk, dd in zip(ks, ds)]
        ref = dense_conv(x_dense, torch_conv_weight(w_dn), [1] * nd, pad, ds, groups)
    elif kind == "conv":
        ref = dense_conv(x_dense, torch_conv_weight(w_dn), ss, ps, ds, groups)
    else:
        ref = dense_conv_transpose(x_dense, torch_conv_t_weight(w_dn, groups), ss, ps, ds, groups)
    assert list(ref.shape[2:]) == out.spatial_shape

    # the active output set: SubM keeps the input sites; otherwise every site any input reaches,
    # found independently by a dense conv of the occupancy with an all-ones kernel
    if kind == "subm":
        expect = {tuple(r) for r in idx.tolist()}
    else:
        occ = to_dense(torch.ones(len(idx), 1, dtype=torch.float64), idx, shape, batch)
        ones = torch.ones(1, 1, *ks, dtype=torch.float64)
        reach = (dense_conv(occ, ones, ss, ps, ds) if kind == "conv" else dense_conv_transpose(occ, ones, ss, ps, ds))
        expect = {tuple(r) for r in (reach[:, 0] > 0.5).nonzero().tolist()}
    got = [tuple(r) for r in out.indices.tolist()]
    assert len(got) == len(set(got)), "duplicate output sites"
    assert set(got) == expect

    ref_sites = gather_sites(ref, out.indices)
    if bias:
        ref_sites = ref_sites + layer.bias.detach()
    tol = dict(rtol=1e-6, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.features, ref_sites, **tol)
    if not bias and kind != "subm":  # nothing outside the active set
        torch.testing.assert_close(out.dense(), ref, **tol)

    dout = torch.rand_like(out.features) - 0.5
    out.features.backward(dout)
    (ref_sites * dout).sum().backward()
    torch.testing.assert_close(f_sp.grad, f_dn.grad, **tol)
    torch.testing.assert_close(layer.weight.grad, w_dn.grad, **tol)
    if bias:
        torch.testing.assert_close(layer.bias.grad, dout.sum(0), **tol)


def _valid(nd, k, s, p, d):
    return all(_out_len(i, kk, ss, pp, dd) > 0
               for i, kk, ss, pp, dd in zip(SHAPES[nd], _vec(k, nd), _vec(s, nd), _vec(p, nd), _vec(d, nd)))


ANISO = {1: (3,), 2: (3, 1), 3: (3, 1, 2), 4: (1, 3, 2, 1)}

SUBM_CASES = [(nd, k, d, g, b) for nd in (1, 2, 3, 4) for k in (1, 3, 5, "aniso") for d in (1, 2)
              for g, b in ((1, False), (2, True))]


@pytest.mark.parametrize("nd,k,d,groups,bias", SUBM_CASES)
def test_subm_matches_dense(nd, k, d, groups, bias):
    k = tuple(kk | 1 for kk in ANISO[nd]) if k == "aniso" else k  # SubM needs odd sizes
    check_conv(nd, "subm", k, d=d, groups=groups, bias=bias, seed=nd)


# every combination whose output is non-empty (an empty output is tested as an error in test_errors.py)
CONV_CASES = [(nd, ANISO[nd] if k == "aniso" else k, s, p, d)
              for nd, k, s, p, d in itertools.product((1, 2, 3, 4), (1, 2, 3, 5, "aniso"), (1, 2, 3), (0, 1, 2), (1, 2))
              if not (s > 1 and d > 1) and not (nd == 4 and (k == 5 or p == 2))
              and _valid(nd, ANISO[nd] if k == "aniso" else k, s, p, d)]


@pytest.mark.parametrize("nd,k,s,p,d", CONV_CASES)
def test_conv_matches_dense(nd, k, s, p, d):
    check_conv(nd, "conv", k, s, p, d, seed=s * 10 + p)


CONV_T_CASES = [c for c in itertools.product((1, 2, 3, 4), (1, 2, 3, "aniso"), (1, 2, 3), (0, 1), (1, 2))
                if not (c[2] > 1 and c[4] > 1) and not (c[0] == 4 and c[2] == 3)]


@pytest.mark.parametrize("nd,k,s,p,d", CONV_T_CASES)
def test_conv_transpose_matches_dense(nd, k, s, p, d):
    k = ANISO[nd] if k == "aniso" else k
    check_conv(nd, "convt", k, s, p, d, seed=s * 10 + p)


@pytest.mark.parametrize("kind", ["conv", "convt"])
@pytest.mark.parametrize("groups,bias", [(2, True), (3, False), (6, True)])
def test_groups_and_bias_match_dense(kind, groups, bias):
    check_conv(3, kind, 3, 2, 1, groups=groups, bias=bias, cin=6, cout=12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch,density", [(1, 0.05), (3, 0.6), (2, 1.0)])
def test_batches_densities_dtypes(dtype, batch, density):
    check_conv(3, "subm", 3, batch=batch, density=density, dtype=dtype)
    check_conv(3, "conv", 3, 2, 1, batch=batch, density=density, dtype=dtype)


@settings(max_examples=30, deadline=None)
@given(nd=st.integers(1, 3), kind=st.sampled_from(["subm", "conv", "convt"]), k=st.integers(1, 4),
       s=st.integers(1, 3), p=st.integers(0, 2), d=st.integers(1, 2), groups=st.sampled_from([1, 2]),
       bias=st.booleans(), density=st.floats(0.02, 0.9), seed=st.integers(0, 10 ** 6))
def test_random_configs_match_dense(nd, kind, k, s, p, d, groups, bias, density, seed):
    if kind == "subm":
        k = k | 1
    if kind == "convt":
        p = min(p, (k - 1) * d)  # keep the transposed output non-empty
    if kind == "conv" and not _valid(nd, k, s, p, d):
        return
    check_conv(nd, kind, k, s, p, d, groups, bias, density=density, seed=seed)


@pytest.mark.parametrize("nd", [1, 2, 3, 4])
@pytest.mark.parametrize("k,s,p", [(2, 2, 0), (3, 2, 1), (3, 3, 0), (3, 1, 1)])
def test_inverse_conv_restores_input_and_matches_dense(nd, k, s, p):
    """inverse(conv) = transposed conv with the same k/s/p evaluated at the conv's input sites."""
    shape, batch, cin, cmid, cout = SHAPES[nd], 2, 3, 5, 4
    feats, idx = random_sparse(shape, batch, 0.3, cin, dtype=torch.float64, seed=nd + k)
    down = CONV[nd](cin, cmid, k, s, p, indice_key="down", bias=False).double()
    up = INVERSE[nd](cmid, cout, k, indice_key="down", bias=True).double()
    x = spconv.SparseConvTensor(feats, idx, shape, batch)
    mid = down(x)
    mid_f = mid.features.detach().clone().requires_grad_(True)
    out = up(mid.replace_feature(mid_f))
    assert out.indices is idx or torch.equal(out.indices, idx)  # exactly the input sites, same rows
    assert out.spatial_shape == shape
    w = up.weight.detach().clone().requires_grad_(True)
    mid_dense = to_dense(mid_f, mid.indices, mid.spatial_shape, batch)
    out_pad = [i - ((m - 1) * s - 2 * p + k) for i, m in zip(shape, mid.spatial_shape)]
    ref = dense_conv_transpose(mid_dense, torch_conv_t_weight(w), [s] * nd, [p] * nd, [1] * nd,
                               output_padding=out_pad)
    ref_sites = gather_sites(ref, idx) + up.bias.detach()
    torch.testing.assert_close(out.features, ref_sites)
    dout = torch.rand_like(out.features)
    grads = torch.autograd.grad(out.features, [mid_f, up.weight], dout)
    ref_grads = torch.autograd.grad(ref_sites, [mid_f, w], dout)
    torch.testing.assert_close(grads[0], ref_grads[0])
    torch.testing.assert_close(grads[1], ref_grads[1])


def _gradcheck_layer(layer_fn, nd, extra=None):
    feats, idx = random_sparse(SHAPES[nd], 1, 0.15, 2, dtype=torch.float64, seed=3)
    layers = layer_fn()
    layers = [m.double() for m in layers]

    def run(f, w):
        x = spconv.SparseConvTensor(f, idx, SHAPES[nd], 1)
        for m in layers[:-1]:
            x = m(x)
        last = layers[-1]
        saved = last.weight
        del last.weight
        last.weight = w
        try:
            return last(x).features
        finally:
            del last.weight
            last.weight = saved

    f = feats.clone().requires_grad_(True)
    w = layers[-1].weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(run, (f, w), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("nd", [1, 2, 3, 4])
@pytest.mark.parametrize("kind", ["subm", "conv", "convt", "inverse", "groups"])
def test_gradcheck_fp64(nd, kind):
    if kind == "subm":
        _gradcheck_layer(lambda: [SUBM[nd](2, 3, 3, bias=True)], nd)
    elif kind == "conv":
        _gradcheck_layer(lambda: [CONV[nd](2, 3, 3, 2, 1)], nd)
    elif kind == "convt":
        _gradcheck_layer(lambda: [CONV_T[nd](2, 3, 2, 2, 0)], nd)
    elif kind == "groups":
        _gradcheck_layer(lambda: [CONV[nd](2, 4, 3, 1, 1, groups=2)], nd)
    else:
        _gradcheck_layer(lambda: [CONV[nd](2, 3, 3, 2, 1, indice_key="k"), INVERSE[nd](3, 2, 3, indice_key="k")], nd)


def test_deterministic_bitwise():
    feats, idx = random_sparse([20, 20, 20], 2, 0.1, 16, seed=5)
    net = spconv.SparseSequential(spconv.SubMConv3d(16, 32, 3, indice_key="a"),
                                  spconv.SparseConv3d(32, 32, 3, 2, 1, indice_key="b"),
                                  spconv.SubMConv3d(32, 32, 3, indice_key="c"),
                                  spconv.SparseInverseConv3d(32, 16, 3, indice_key="b"))
    results = []
    for _ in range(3):
        f = feats.clone().requires_grad_(True)
        out = net(spconv.SparseConvTensor(f, idx, [20, 20, 20], 2))
        net.zero_grad()
        out.features.square().sum().backward()
        results.append((out.features.detach().clone(), f.grad.clone(), net[0].weight.grad.clone()))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
