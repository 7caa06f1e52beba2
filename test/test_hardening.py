"""Calls real code makes that used to fail or crash: a tensor edited after construction, odd
``batch_size`` values, output grids past the int32/int64 limits, kernel-1 convs with keys, max pooling of
negative values, empty tensors. Values are checked against dense PyTorch ops on the densified tensor.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import spconv.pytorch as spconv


def _sites(n, shape, batch_size=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    volume = int(np.prod(shape))
    rows = []
    for b in range(batch_size):
        flat = torch.randperm(volume, generator=g)[:n]
        coords = np.stack(np.unravel_index(flat.numpy(), shape), 1)
        rows.append(np.concatenate([np.full((n, 1), b), coords], 1))
    return torch.from_numpy(np.concatenate(rows)).int().contiguous()


def _dense_subm(x, conv):
    w = conv.weight.detach().permute(0, 4, 1, 2, 3)
    out = F.conv3d(x.dense(), w, padding=[k // 2 for k in conv.kernel_size])
    return out


def _at_sites(dense, indices):
    i = indices.long()
    return dense[i[:, 0], :, i[:, 1], i[:, 2], i[:, 3]]


# ------------------------------------------------------------------ replace_feature / reassigned parts
def test_replace_feature_with_more_rows_then_indices_runs():
    """VoxelNeXt's combine_out: replace_feature(cat(features)), then x.indices = cat(indices)."""
    idx_a, idx_b = _sites(30, [6, 6, 6], seed=1), _sites(20, [6, 6, 6], seed=2)
    idx_b = idx_b[~(idx_b[:, None, :] == idx_a[None]).all(-1).any(1)]  # sites of b not in a
    fa, fb = torch.randn(idx_a.shape[0], 3), torch.randn(idx_b.shape[0], 3)
    x = spconv.SparseConvTensor(fa, idx_a, [6, 6, 6], 1)
    conv = spconv.SubMConv3d(3, 4, 3, bias=False, indice_key="k")
    y = conv(x)  # caches map "k" for idx_a
    y = y.replace_feature(torch.cat([fa, fb]))  # accepted, as in spconv 2.3.8
    y.indices = torch.cat([idx_a, idx_b])
    out = conv(y)  # key "k" was built on the old sites: it must be rebuilt, not reused
    ref = spconv.SparseConvTensor(torch.cat([fa, fb]), torch.cat([idx_a, idx_b]), [6, 6, 6], 1)
    torch.testing.assert_close(out.dense(), _dense_subm(ref, conv) * (ref.dense().abs().sum(1, keepdim=True) > 0),
                               rtol=1e-5, atol=1e-5)


def test_replace_feature_row_mismatch_raises_at_next_use():
    x = spconv.SparseConvTensor(torch.randn(10, 3), _sites(10, [5, 5, 5]), [5, 5, 5], 1)
    y = x.replace_feature(torch.randn(12, 3))
    with pytest.raises(ValueError, match=r"12 rows but indices has 10"):
        spconv.SubMConv3d(3, 3, 3)(y)
    with pytest.raises(ValueError, match=r"12 rows but indices has 10"):
        y.dense()
    with pytest.raises(ValueError, match=r"12 rows but indices has 10"):
        spconv.SparseMaxPool3d(2, 2)(y)


def test_in_place_edit_of_indices_drops_cached_maps():
    idx = _sites(40, [8, 8, 8], seed=3)
    idx = idx[(idx[:, 1:] < 7).all(1)].contiguous()
    x = spconv.SparseConvTensor(torch.randn(idx.shape[0], 2), idx, [8, 8, 8], 1)
    conv = spconv.SubMConv3d(2, 2, 3, bias=False, indice_key="s")
    y = conv(x)
    y.indices[:, 1:] += 1  # in place: the map cached under "s" no longer fits
    out = conv(y)
    torch.testing.assert_close(out.dense(), _dense_subm(y, conv) * (y.dense().abs().sum(1, keepdim=True) > 0),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attr,value,match", [
    ("indices", torch.tensor([[0, 9, 0, 0]], dtype=torch.int32), r"rows but indices"),
    ("spatial_shape", [2, 2, 2], r"outside spatial_shape"),
    ("batch_size", 1, r"batch indices"),
])
def test_reassigned_parts_are_validated_at_next_use(attr, value, match):
    idx = _sites(6, [4, 4, 4], batch_size=2)
    x = spconv.SparseConvTensor(torch.randn(12, 2), idx, [4, 4, 4], 2)
    setattr(x, attr, value)
    with pytest.raises(ValueError, match=match):
        spconv.SparseConv3d(2, 2, 3, 2)(x)


def test_reassigned_coordinates_out_of_range_raise():
    x = spconv.SparseConvTensor(torch.randn(6, 2), _sites(6, [4, 4, 4]), [4, 4, 4], 1)
    x.indices = torch.tensor([[0, 1, 1, 1]] * 5 + [[0, 2**30, 1, 1]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"outside spatial_shape"):
        spconv.SubMConv3d(2, 2, 3)(x)
    x.indices = torch.tensor([[0, 1, 1, 1]] * 5 + [[0, -5, 1, 1]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"negative coordinate"):
        x.dense()


@pytest.mark.parametrize("bad", [1.5, 0, -2, "2", None, 2.5])
def test_bad_batch_size(bad):
    idx = _sites(4, [4, 4, 4])
    with pytest.raises((ValueError, TypeError), match=r"batch_size"):
        spconv.SparseConvTensor(torch.randn(4, 2), idx, [4, 4, 4], bad)
    x = spconv.SparseConvTensor(torch.randn(4, 2), idx, [4, 4, 4], 1)
    with pytest.raises((ValueError, TypeError), match=r"batch_size"):
        x.batch_size = bad


@pytest.mark.parametrize("good", [2, np.int64(2), torch.tensor(2), 2.0])
def test_batch_size_integer_likes(good):
    x = spconv.SparseConvTensor(torch.randn(4, 2), _sites(4, [4, 4, 4]), [4, 4, 4], good)
    assert x.batch_size == 2 and type(x.batch_size) is int
    assert spconv.SubMConv3d(2, 2, 3)(x).batch_size == 2


def test_constructor_does_not_modify_inputs():
    idx = _sites(20, [5, 5, 5])
    f = torch.randn(20, 3)
    idx0, f0 = idx.clone(), f.clone()
    x = spconv.SparseConvTensor(f, idx, [5, 5, 5], 1)
    spconv.SparseConv3d(3, 2, 3, 2)(spconv.SubMConv3d(3, 3, 3)(x)).dense()
    assert torch.equal(idx, idx0) and torch.equal(f, f0)


# ------------------------------------------------------------------ output grids beyond int32 / int64
@pytest.mark.parametrize("make_layer,shape", [
    (lambda: spconv.SparseConv2d(4, 4, 3, padding=2**31 - 3), [8, 8]),            # output 2^32 x 2^32
    (lambda: spconv.SparseConvTranspose3d(4, 4, 3, stride=2**22), [8, 8, 8]),      # output volume 2^75
    (lambda: spconv.SparseConvTranspose3d(4, 8, 3, 2), [2**21, 2**21, 2**19]),     # output volume > 2^64
    (lambda: spconv.SparseConvTranspose1d(4, 4, 3, 2), [2**31 - 1]),               # coordinates past int32
])
def test_output_grid_too_large_raises(make_layer, shape):
    ndim = len(shape)
    idx = torch.zeros(2, ndim + 1, dtype=torch.int32)
    idx[1, 1:] = 1
    x = spconv.SparseConvTensor(torch.randn(2, 4), idx, shape, 1)
    with pytest.raises(ValueError, match=r"(?i)2\^31|2\^62|int64|int32"):
        make_layer()(x)


def test_large_valid_grid_transposed_conv_is_right():
    """A transposed conv whose output grid is large but valid: sites from a direct computation."""
    shape = [2**20, 2**20, 2**18]
    idx = torch.tensor([[0, 5, 7, 9], [0, 2**20 - 1, 2**20 - 1, 2**18 - 1]], dtype=torch.int32)
    x = spconv.SparseConvTensor(torch.ones(2, 1), idx, shape, 1)
    conv = spconv.SparseConvTranspose3d(1, 1, 3, 2, bias=False)
    torch.nn.init.ones_(conv.weight)
    out = conv(x)
    assert out.spatial_shape == [(s - 1) * 2 + 3 for s in shape]
    expected = {(0, *(c * 2 + o for c, o in zip(row[1:], offs)))
                for row in idx.tolist() for offs in np.ndindex(3, 3, 3)}
    assert {tuple(r) for r in out.indices.tolist()} == expected
    assert torch.all(out.features == 1)


# ------------------------------------------------------------------ kernel-1 convs
def test_kernel1_conv_key_feeds_inverse_conv():
    idx = _sites(15, [6, 6, 6])
    x = spconv.SparseConvTensor(torch.randn(15, 3), idx, [6, 6, 6], 1)
    down = spconv.SparseConv3d(3, 4, 1, indice_key="k1", bias=False)
    inv = spconv.SparseInverseConv3d(4, 2, 1, indice_key="k1", bias=False)
    y = down(x)
    assert "k1" in y.indice_dict
    z = inv(y)
    assert torch.equal(z.indices, idx) and z.spatial_shape == [6, 6, 6]
    w_down = down.weight.detach().reshape(4, 3)
    w_inv = inv.weight.detach().reshape(2, 4)
    torch.testing.assert_close(z.features, x.features @ w_down.t() @ w_inv.t())


def test_kernel1_inverse_without_key_is_pointwise_like_spconv():
    """spconv 2.3.8 runs a kernel-1 inverse conv as a per-row matmul, even after a SubM key."""
    idx = _sites(10, [5, 5, 5])
    x = spconv.SparseConvTensor(torch.randn(10, 3), idx, [5, 5, 5], 1)
    y = spconv.SubMConv3d(3, 3, 1, indice_key="s1")(x)
    z = spconv.SparseInverseConv3d(3, 2, 1, indice_key="s1", bias=False)(y)
    assert torch.equal(z.indices, idx)


def test_kernel1_transposed_conv_output_padding_shape():
    """``(in - 1) s - 2p + d(k - 1) + output_padding + 1`` holds for kernel 1 too: [8]^3 -> [9]^3."""
    idx = _sites(10, [8, 8, 8])
    x = spconv.SparseConvTensor(torch.randn(10, 2), idx, [8, 8, 8], 1)
    conv = spconv.conv.SparseConvolution(3, 2, 3, 1, transposed=True, output_padding=1, bias=False)
    out = conv(x)
    assert out.spatial_shape == [9, 9, 9]
    dense = out.dense()
    pointwise = F.conv3d(x.dense(), conv.weight.detach().permute(0, 4, 1, 2, 3))
    torch.testing.assert_close(dense[..., :8, :8, :8], pointwise)
    assert dense[..., 8, :, :].abs().sum() == 0 and dense[..., :, 8, :].abs().sum() == 0


# ------------------------------------------------------------------ empty tensors
def test_dense_of_empty_tensor_is_differentiable():
    f = torch.zeros(0, 3, requires_grad=True)
    x = spconv.SparseConvTensor(f, torch.zeros(0, 4, dtype=torch.int32), [4, 4, 4], 2)
    d = x.dense()
    assert d.shape == (2, 3, 4, 4, 4) and d.requires_grad
    d.sum().backward()
    assert f.grad is not None and f.grad.shape == (0, 3)


# ------------------------------------------------------------------ max pooling: spconv 2.3.8's zero floor
def _dense_maxpool_ref(x, k, s, p):
    """max(0, max over active inputs) from dense max_pool3d with -inf at empty sites."""
    d = x.dense()
    active = torch.zeros_like(d[:, :1], dtype=torch.bool)
    i = x.indices.long()
    active[i[:, 0], 0, i[:, 1], i[:, 2], i[:, 3]] = True
    filled = torch.where(active, d, torch.full_like(d, float("-inf")))
    return F.max_pool3d(filled, k, s, p).clamp_min(0)


def test_maxpool_of_negative_values_has_zero_floor():
    idx = _sites(60, [6, 6, 6], batch_size=2, seed=4)
    f = -torch.rand(idx.shape[0], 3) - 0.1  # all negative
    f[::3] += 1.0
    x = spconv.SparseConvTensor(f, idx, [6, 6, 6], 2)
    out = spconv.SparseMaxPool3d(2, 2)(x)
    ref = _dense_maxpool_ref(x, 2, 2, 0)
    torch.testing.assert_close(_at_sites(ref, out.indices), out.features)
    assert (out.features >= 0).all() and (out.features == 0).any()


def test_maxpool_nan_propagates_at_any_tap():
    idx = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 1], [0, 1, 1, 1]], dtype=torch.int32)
    for nan_row in range(3):
        f = torch.tensor([[1.0], [2.0], [3.0]])
        f[nan_row, 0] = float("nan")
        out = spconv.SparseMaxPool3d(2, 2)(spconv.SparseConvTensor(f, idx, [2, 2, 2], 1))
        assert out.features.shape == (1, 1) and torch.isnan(out.features).all(), nan_row


def test_maxpool_zero_floor_gradient():
    idx = _sites(40, [6, 6, 6], seed=5)
    g = torch.Generator().manual_seed(0)
    f = (torch.randperm(40 * 2, generator=g).view(40, 2).double() - 39.5) / 7  # distinct, none 0, half < 0
    f.requires_grad_()
    pool = spconv.SparseMaxPool3d(2, 2)
    fn = lambda t: pool(spconv.SparseConvTensor(t, idx, [6, 6, 6], 1)).features  # noqa: E731
    assert torch.autograd.gradcheck(fn, (f,), eps=1e-6, atol=1e-6)
    out = fn(f)
    out.sum().backward()
    # a negative input never receives gradient (0 wins its window)
    assert (f.grad[f.detach() < 0] == 0).all()
