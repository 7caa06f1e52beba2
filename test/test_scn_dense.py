"""spconv.scn modules against dense PyTorch on the densified input (values and gradients), 1-6D.

References are torch.nn.functional conv / conv_transpose / pool calls on ``helpers.to_dense``
tensors, with SparseConvNet's weight layout converted by plain permutes here (independent of the
conversion in spconv.scn). 4D convs use helpers.dense_conv (3D convs summed over dimension 0);
5D and 6D are checked by embedding a 3D problem (extra size-1 dimensions, filter 1 there) and by
a brute-force rulebook reference.
"""
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import spconv.scn as scn
from helpers import dense_conv, dense_conv_transpose, gather_sites, random_sparse, to_dense
from spconv.pytorch import ops
from spconv.pytorch import reference_maps

SHAPES = {1: [21], 2: [9, 11], 3: [7, 9, 5], 4: [5, 5, 3, 5]}
DENSE_POOL = {"max": {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d},
              "avg": {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}}
DENSE_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _pool4d(kind, x, k, s):
    """4D max/avg pooling: 3D pooling of each slice of dimension 0, reduced over the window there."""
    n0 = (x.shape[2] - k[0]) // s[0] + 1
    pool = DENSE_POOL[kind][3]
    out = []
    for t in range(n0):
        parts = torch.stack([pool(x[:, :, t * s[0] + r], k[1:], s[1:]) for r in range(k[0])])
        out.append(parts.amax(0) if kind == "max" else parts.mean(0))
    return torch.stack(out, 2)


def scn_input(shape, batch=2, cin=3, seed=0, density=0.35):
    """(SparseConvNetTensor, leaf features [N, C] float64, spconv indices [N, 1+D])."""
    feats, idx = random_sparse(shape, batch, density, cin, dtype=torch.float64, seed=seed)
    coords = torch.cat([idx[:, 1:], idx[:, :1]], 1).long()  # SparseConvNet: batch index last
    f = feats.clone().requires_grad_(True)
    x = scn.InputLayer(len(shape), shape, mode=0)([coords, f, batch])
    return x, f, idx


def dense_weight(w, groups=1):
    """SparseConvNet [V, G, I/G, O/G] -> torch conv weight [O, I/G, *k] (k from the caller)."""
    v, g, i, o = w.shape
    return w.permute(1, 3, 2, 0).reshape(g * o, i, v)


def dense_t_weight(w):
    """SparseConvNet [V, 1, I, O] -> torch transposed-conv weight [I, O, V]."""
    return w[:, 0].permute(1, 2, 0)


def _k(w, ksize):
    return w.reshape(*w.shape[:2], *ksize)


def _backward_pair(out_sparse, ref, seed=1):
    g = torch.Generator().manual_seed(seed)
    grad = torch.randn(ref.shape, generator=g, dtype=ref.dtype)
    (out_sparse * grad).sum().backward()
    return grad


@pytest.mark.parametrize("nd,k,groups,bias", [
    (1, 3, 1, True), (1, 5, 1, False), (2, 3, 1, True), (2, (3, 5), 2, False), (2, 2, 1, False),
    (3, 3, 1, True), (3, (1, 3, 3), 1, False), (3, 3, 3, False), (4, 3, 1, False)])
def test_submanifold_convolution(nd, k, groups, bias):
    shape = SHAPES[nd]
    torch.manual_seed(0)
    x, f, idx = scn_input(shape, cin=6 if groups > 1 else 3, seed=nd)
    cin = f.shape[1]
    conv = scn.SubmanifoldConvolution(nd, cin, 6, k, bias, groups=groups).double()
    if bias:
        torch.nn.init.uniform_(conv.bias, -1, 1)
    out = conv(x)
    assert list(out.spatial_size) == shape and out.features.shape == (f.shape[0], 6)
    ksize = conv.filter_size.tolist()

    f2 = f.detach().clone().requires_grad_(True)
    w2 = conv.weight.detach().clone().requires_grad_(True)
    pad = []
    for kk in reversed(ksize):  # SparseConvNet's window: site - k // 2 ... site + k - 1 - k // 2
        pad += [kk // 2, kk - 1 - kk // 2]
    dense = F.pad(to_dense(f2, idx, shape, 2), pad)
    ref = dense_conv(dense, _k(dense_weight(w2, groups), ksize), [1] * nd, [0] * nd, [1] * nd, groups)
    ref = gather_sites(ref, idx)
    if bias:
        ref = ref + conv.bias.detach()
    torch.testing.assert_close(out.features, ref)
    grad = _backward_pair(out.features, ref)
    (ref * grad).sum().backward()
    torch.testing.assert_close(f.grad, f2.grad)
    torch.testing.assert_close(conv.weight.grad, w2.grad)
    if bias:
        torch.testing.assert_close(conv.bias.grad, grad.sum(0))


def _reachable(idx, shape, ksize, stride, batch=2):
    """Output sites of a valid strided conv: windows holding at least one input site."""
    ind = to_dense(torch.ones(idx.shape[0], 1, dtype=torch.float64), idx, shape, batch)
    nd = len(shape)
    ones = torch.ones([1, 1] + list(ksize), dtype=torch.float64)
    return dense_conv(ind, ones, stride, [0] * nd, [1] * nd) > 0


@pytest.mark.parametrize("nd,k,s,groups", [(1, 3, 2, 1), (1, 2, 2, 1), (2, 3, 2, 1), (2, (3, 2), (2, 1), 1),
                                           (2, 3, 2, 2), (3, 2, 2, 1), (3, 3, 2, 1), (4, 3, 2, 1)])
def test_convolution_and_deconvolution(nd, k, s, groups):
    shape = SHAPES[nd]
    x, f, idx = scn_input(shape, cin=4 if groups > 1 else 3, seed=10 + nd)
    cin = f.shape[1]
    conv = scn.Convolution(nd, cin, 4, k, s, False, groups=groups).double()
    ksize, stride = conv.filter_size.tolist(), conv.filter_stride.tolist()
    fit = [(i - kk) // ss * ss + kk for i, kk, ss in zip(shape, ksize, stride)]  # largest valid input size
    if fit != shape:  # crop the input to a size the valid conv accepts
        keep = torch.ones(idx.shape[0], dtype=torch.bool)
        for d in range(nd):
            keep &= idx[:, d + 1] < fit[d]
        x, f, idx = scn_input(fit, cin=cin, seed=10 + nd)
        shape = fit
    out = conv(x)
    out_size = [(i - kk) // ss + 1 for i, kk, ss in zip(shape, ksize, stride)]
    assert out.spatial_size.tolist() == out_size

    f2 = f.detach().clone().requires_grad_(True)
    w2 = conv.weight.detach().clone().requires_grad_(True)
    ref = dense_conv(to_dense(f2, idx, shape, 2), _k(dense_weight(w2, groups), ksize), stride, [0] * nd, [1] * nd,
                     groups)
    active = _reachable(idx, shape, ksize, stride)[:, 0]
    out_dense = scn.SparseToDense(nd, 4)(out)
    assert torch.equal((out_dense != 0).any(1) | active, active)  # no output outside the reachable set
    assert out.features.shape[0] == int(active.sum())  # one output row per reachable site
    torch.testing.assert_close(out_dense, ref)
    grad = _backward_pair(out_dense, ref)
    (ref * grad).sum().backward()
    torch.testing.assert_close(f.grad, f2.grad)
    torch.testing.assert_close(conv.weight.grad, w2.grad)

    if groups > 1:
        return
    # Deconvolution back to the input sites, reusing the convolution's rulebook
    deconv = scn.Deconvolution(nd, 4, 5, k, s, False).double()
    g = torch.randn(out.features.shape, dtype=torch.float64, requires_grad=True)
    y = deconv(scn.SparseConvNetTensor(g, out.metadata, out.spatial_size))
    assert y.spatial_size.tolist() == shape
    assert torch.equal(y.get_spatial_locations(), x.get_spatial_locations())
    g2 = g.detach().clone().requires_grad_(True)
    wd = deconv.weight.detach().clone().requires_grad_(True)
    coarse = scn.SparseToDense(nd, 4)(scn.SparseConvNetTensor(g2, out.metadata, out.spatial_size))
    ref = dense_conv_transpose(coarse, _k(dense_t_weight(wd), ksize), stride, [0] * nd, [1] * nd)
    ref = gather_sites(ref, idx)
    torch.testing.assert_close(y.features, ref)
    grad = _backward_pair(y.features, ref, 2)
    (ref * grad).sum().backward()
    torch.testing.assert_close(g.grad, g2.grad)
    torch.testing.assert_close(deconv.weight.grad, wd.grad)


@pytest.mark.parametrize("nd,k,s", [(1, 3, 2), (2, 3, 2), (2, 2, 1), (3, 2, 2), (3, (3, 1, 2), (2, 1, 1))])
def test_full_convolution(nd, k, s):
    shape = SHAPES[nd]
    x, f, idx = scn_input(shape, seed=20 + nd, density=0.2)
    conv = scn.FullConvolution(nd, 3, 4, k, s, True).double()
    torch.nn.init.uniform_(conv.bias, -1, 1)
    out = conv(x)
    ksize, stride = conv.filter_size.tolist(), conv.filter_stride.tolist()
    assert out.spatial_size.tolist() == [(i - 1) * ss + kk for i, kk, ss in zip(shape, ksize, stride)]
    assert out.metadata is not x.metadata  # generative: new metadata
    f2 = f.detach().clone().requires_grad_(True)
    w2 = conv.weight.detach().clone().requires_grad_(True)
    ref = DENSE_CONV_T[nd](to_dense(f2, idx, shape, 2), _k(dense_t_weight(w2), ksize), None, stride)
    ind = to_dense(torch.ones(idx.shape[0], 1, dtype=torch.float64), idx, shape, 2)
    reach = DENSE_CONV_T[nd](ind, torch.ones([1, 1] + ksize, dtype=torch.float64), None, stride)[:, 0] > 0
    assert out.features.shape[0] == int(reach.sum())
    ref = ref + conv.bias.detach().view(1, -1, *[1] * nd) * reach.unsqueeze(1)
    out_dense = scn.SparseToDense(nd, 4)(out)
    torch.testing.assert_close(out_dense, ref)
    grad = _backward_pair(out_dense, ref)
    (ref * grad).sum().backward()
    torch.testing.assert_close(f.grad, f2.grad)
    torch.testing.assert_close(conv.weight.grad, w2.grad)


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("nd,k,s", [(1, 3, 2), (2, 3, 2), (2, 2, 2), (2, (3, 2), (2, 1)), (3, 2, 2), (3, 3, 2),
                                    (4, (3, 2, 3, 3), (2, 1, 1, 2))])
def test_pooling_and_unpooling(kind, nd, k, s):
    shape = SHAPES[nd]
    ksize = scn.toLongTensor(nd, k).tolist()
    stride = scn.toLongTensor(nd, s).tolist()
    shape = [(i - kk) // ss * ss + kk for i, kk, ss in zip(shape, ksize, stride)]
    x, f, idx = scn_input(shape, seed=30 + nd)
    pool = (scn.MaxPooling if kind == "max" else scn.AveragePooling)(nd, k, s)
    out = pool(x)
    f2 = f.detach().clone().requires_grad_(True)
    if nd == 4:
        ref = _pool4d(kind, to_dense(f2, idx, shape, 2), ksize, stride)
    else:
        ref = DENSE_POOL[kind][nd](to_dense(f2, idx, shape, 2), ksize, stride)
    if kind == "max":  # SparseConvNet's max pooling starts from 0
        ref = ref.clamp_min(0)
    out_dense = scn.SparseToDense(nd, 3)(out)
    torch.testing.assert_close(out_dense, ref)
    grad = _backward_pair(out_dense, ref)
    (ref * grad).sum().backward()
    torch.testing.assert_close(f.grad, f2.grad)

    # UnPooling copies every coarse site to the fine sites of its windows
    g = torch.randn(out.features.shape, dtype=torch.float64, requires_grad=True)
    up = scn.UnPooling(nd, k, s)(scn.SparseConvNetTensor(g, out.metadata, out.spatial_size))
    assert torch.equal(up.get_spatial_locations(), x.get_spatial_locations())
    g2 = g.detach().clone().requires_grad_(True)
    coarse = scn.SparseToDense(nd, 3)(scn.SparseConvNetTensor(g2, out.metadata, out.spatial_size))
    eye = torch.eye(3, dtype=torch.float64).view(3, 3, *[1] * nd).expand(3, 3, *ksize)
    ref = gather_sites(dense_conv_transpose(coarse, eye, stride, [0] * nd, [1] * nd), idx)
    torch.testing.assert_close(up.features, ref)
    grad = _backward_pair(up.features, ref, 3)
    (ref * grad).sum().backward()
    torch.testing.assert_close(g.grad, g2.grad)


def test_max_pooling_drops_leading_planes():
    x, f, idx = scn_input([9, 9], cin=4, seed=3)
    out = scn.MaxPooling(2, 3, 2, nFeaturesToDrop=1)(x)
    ref = F.max_pool2d(to_dense(f.detach()[:, 1:], idx, [9, 9], 2), 3, 2).clamp_min(0)
    torch.testing.assert_close(scn.SparseToDense(2, 3)(out), ref)


def test_network_in_network_and_dense_round_trip():
    x, f, idx = scn_input([6, 7], cin=3, seed=4)
    nin = scn.NetworkInNetwork(3, 5, True).double()
    out = nin(x)
    torch.testing.assert_close(out.features, f @ nin.weight + nin.bias)
    dense = scn.SparseToDense(2, 3)(x)
    torch.testing.assert_close(dense, to_dense(f, idx, [6, 7], 2))
    back = scn.DenseToSparse(2)(dense)
    assert back.spatial_size.tolist() == [6, 7]
    torch.testing.assert_close(scn.SparseToDense(2, 3)(back), dense)
    assert back.features.shape[0] == f.shape[0]
    back.features.sum().backward()
    torch.testing.assert_close(f.grad, torch.ones_like(f))


# ---------------------------------------------------------------------------------------- 5D / 6D
def _embed(idx, nd):
    """3D sites [N, 4] -> nd-D sites with size-1 dimensions inserted after each of the first nd-3 axes."""
    cols = [idx[:, :1]]
    for d in range(3):
        cols.append(idx[:, d + 1:d + 2])
        if d < nd - 3:
            cols.append(torch.zeros_like(idx[:, :1]))
    return torch.cat(cols, 1)


@pytest.mark.parametrize("nd", [5, 6])
def test_higher_dimensions_match_dense_3d(nd):
    shape3 = [9, 7, 9]
    feats, idx3 = random_sparse(shape3, 2, 0.15, 3, dtype=torch.float64, seed=nd)
    idx = _embed(idx3, nd)
    shape = [9, 1, 7, 1, 9] if nd == 5 else [9, 1, 7, 1, 9, 1]
    ksize = [3, 1, 3, 1, 3] if nd == 5 else [3, 1, 3, 1, 3, 1]
    coords = torch.cat([idx[:, 1:], idx[:, :1]], 1).long()
    f = feats.clone().requires_grad_(True)
    x = scn.InputLayer(nd, shape, mode=0)([coords, f, 2])
    subm = scn.SubmanifoldConvolution(nd, 3, 4, ksize, False).double()
    conv = scn.Convolution(nd, 4, 5, ksize, [2 if k == 3 else 1 for k in ksize], False).double()
    y = subm(x)
    z = conv(y)
    w = scn.MaxPooling(nd, ksize, 1)(z)
    deconv = scn.Deconvolution(nd, 5, 2, ksize, conv.filter_stride, False).double()
    back = deconv(z)  # to the input sites, through the PyTorch-built rulebook in reverse
    full = scn.FullConvolution(nd, 3, 2, [2 if k == 3 else 1 for k in ksize], 1, False).double()
    grown = full(x)
    f2 = feats.clone().requires_grad_(True)
    d = to_dense(f2, idx3, shape3, 2)
    d = F.conv3d(d, dense_weight(subm.weight).reshape(4, 3, 3, 3, 3), padding=1)
    mask = to_dense(torch.ones(idx3.shape[0], 1, dtype=torch.float64), idx3, shape3, 2)
    d = d * mask
    d = F.conv3d(d, dense_weight(conv.weight).reshape(5, 4, 3, 3, 3), stride=2)
    ref = F.max_pool3d(d, 3, 1).clamp_min(0)
    got = scn.SparseToDense(nd, 5)(w).reshape(ref.shape)
    torch.testing.assert_close(got, ref)
    ref_back = F.conv_transpose3d(d, deconv.weight[:, 0].permute(1, 2, 0).reshape(5, 2, 3, 3, 3), stride=2)
    ref_back = gather_sites(ref_back, idx3)
    torch.testing.assert_close(back.features, ref_back)
    w_full = full.weight[:, 0].permute(1, 2, 0).reshape(3, 2, 2, 2, 2)
    ref_full = F.conv_transpose3d(to_dense(f2, idx3, shape3, 2), w_full)
    got_full = scn.SparseToDense(nd, 2)(grown).reshape(ref_full.shape)
    torch.testing.assert_close(got_full, ref_full)
    grad = torch.randn(ref.shape, dtype=torch.float64)
    gb = torch.randn(ref_back.shape, dtype=torch.float64)
    gf = torch.randn(ref_full.shape, dtype=torch.float64)
    ((got * grad).sum() + (back.features * gb).sum() + (got_full * gf).sum()).backward()
    ((ref * grad).sum() + (ref_back * gb).sum() + (ref_full * gf).sum()).backward()
    torch.testing.assert_close(f.grad, f2.grad)


def _brute_subm(sites, ksize):
    lut = {tuple(r): i for i, r in enumerate(sites.tolist())}
    offs = list(itertools.product(*[range(k) for k in ksize]))
    out = np.full((len(sites), len(offs)), -1)
    for j, r in enumerate(sites.tolist()):
        for t, o in enumerate(offs):
            q = (r[0],) + tuple(c + oo - k // 2 for c, oo, k in zip(r[1:], o, ksize))
            out[j, t] = lut.get(q, -1)
    return out


def _brute_conv(sites, shape, ksize, stride):
    lut = {tuple(r): i for i, r in enumerate(sites.tolist())}
    offs = list(itertools.product(*[range(k) for k in ksize]))
    out_shape = [(i - k) // s + 1 for i, k, s in zip(shape, ksize, stride)]
    outs = {}
    for r in sites.tolist():
        for o in offs:
            t = [c - oo for c, oo in zip(r[1:], o)]
            if all(v >= 0 and v % s == 0 and v // s < n for v, s, n in zip(t, stride, out_shape)):
                outs[(r[0],) + tuple(v // s for v, s in zip(t, stride))] = True
    keys = sorted(outs)
    table = np.full((len(keys), len(offs)), -1)
    for j, y in enumerate(keys):
        for t, o in enumerate(offs):
            table[j, t] = lut.get((y[0],) + tuple(c * s + oo for c, s, oo in zip(y[1:], stride, o)), -1)
    return np.array(keys), table


@pytest.mark.parametrize("nd", [5, 6])
def test_higher_dimension_rulebooks_brute_force(nd):
    g = np.random.default_rng(nd)
    shape = [5, 4, 5, 3, 4, 3][:nd]
    pts = np.unique(np.concatenate([g.integers(0, 2, (60, 1)), np.stack([g.integers(0, s, 60) for s in shape], 1)],
                                   1), axis=0)
    sites = torch.from_numpy(pts).int()
    ksize = [3, 2, 3, 1, 3, 2][:nd]
    torch.testing.assert_close(ops.build_subm_map(sites, shape, [3] * nd, [1] * nd, 2).numpy(),
                               _brute_subm(sites, [3] * nd),
                               check_dtype=False)
    stride = [2, 1, 2, 1, 1, 2][:nd]
    out_shape = [(i - k) // s + 1 for i, k, s in zip(shape, ksize, stride)]
    out_idx, table = ops.build_conv_map(sites, shape, out_shape, ksize, stride, [0] * nd, [1] * nd, False, 2)
    keys, ref = _brute_conv(sites, shape, ksize, stride)
    np.testing.assert_array_equal(out_idx.numpy(), keys)
    np.testing.assert_array_equal(table.numpy(), ref)


@pytest.mark.parametrize("nd", [1, 2, 3, 4])
def test_reference_maps_equal_compiled(nd):
    """The PyTorch builder used above 4D gives the compiled builder's tables, row for row, with padding
    and dilation too."""
    shape = SHAPES[nd]
    _, idx = random_sparse(shape, 2, 0.3, 1, seed=nd)
    ones, zeros = [1] * nd, [0] * nd
    for k, d in (([3] * nd, ones), ([5] + [1] * (nd - 1), ones), ([3] * nd, [2] * nd)):
        assert torch.equal(reference_maps.build_subm_map(idx, shape, k, d), ops.build_subm_map(idx, shape, k, d, 2))
    for k, s, p, d, transposed in (([3] * nd, [2] * nd, zeros, ones, False), ([2] * nd, [2] * nd, zeros, ones, False),
                                   ([3] * nd, [2] * nd, zeros, ones, True), ([3] * nd, [2] * nd, ones, ones, False),
                                   ([3] * nd, [1] * nd, ones, [2] * nd, False), ([3] * nd, [2] * nd, ones, ones, True)):
        if transposed:
            out = ops.get_deconv_output_size(shape, k, s, p, d, zeros)
        else:
            out = ops.get_conv_output_size(shape, k, s, p, d)
        a = reference_maps.build_conv_map(idx, shape, out, k, s, p, d, transposed)
        b = ops.build_conv_map(idx, shape, out, k, s, p, d, transposed, 2)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), (k, s, p, d, transposed)
