"""Bad inputs must fail early with the right exception type and a message naming the problem;
edge cases (empty inputs) must work; user inputs must never be modified."""
import numpy as np
import pytest
import torch

import spconv.pytorch as spconv


# --------------------------------------------------------------------------------------------------
# helpers (local on purpose: independent of the library and of other test files)

def _sites(shape, batch_size, n_per_batch, seed=0):
    """Unique random sites: int32 indices [B * n, 1 + D], batch in column 0."""
    g = np.random.default_rng(seed)
    volume = int(np.prod(shape))
    rows = []
    for b in range(batch_size):
        flat = g.choice(volume, size=n_per_batch, replace=False)
        coords = np.stack(np.unravel_index(flat, shape), 1)
        rows.append(np.concatenate([np.full((n_per_batch, 1), b), coords], 1))
    return torch.from_numpy(np.concatenate(rows)).int()


def _tensor(shape=(6, 6, 6), batch_size=2, n=12, channels=4, dtype=torch.float32, seed=0, requires_grad=False):
    indices = _sites(shape, batch_size, n, seed)
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(indices.shape[0], channels, generator=g, dtype=dtype)
    features.requires_grad_(requires_grad)
    return spconv.SparseConvTensor(features, indices, list(shape), batch_size)


def _empty(shape=(5, 5, 5), batch_size=2, channels=4):
    features = torch.zeros(0, channels, requires_grad=True)
    indices = torch.zeros(0, len(shape) + 1, dtype=torch.int32)
    return spconv.SparseConvTensor(features, indices, list(shape), batch_size)


def _good_inputs():
    indices = torch.tensor([[0, 0, 1, 2], [0, 2, 2, 2], [1, 3, 0, 1]], dtype=torch.int32)
    features = torch.randn(3, 4)
    return features, indices, [4, 4, 4], 2


# --------------------------------------------------------------------------------------------------
# SparseConvTensor construction

def test_good_inputs_are_accepted():
    features, indices, shape, bs = _good_inputs()
    x = spconv.SparseConvTensor(features, indices, shape, bs)
    assert x.features.shape == (3, 4)


def test_indices_int64_rejected():
    features, indices, shape, bs = _good_inputs()
    with pytest.raises(ValueError, match=r"(?i)int32"):
        spconv.SparseConvTensor(features, indices.long(), shape, bs)


def test_indices_float_rejected():
    features, indices, shape, bs = _good_inputs()
    with pytest.raises(ValueError, match=r"(?i)int32"):
        spconv.SparseConvTensor(features, indices.float(), shape, bs)


def test_indices_1d_rejected():
    features, _, shape, bs = _good_inputs()
    with pytest.raises(ValueError, match=r"(?i)indices"):
        spconv.SparseConvTensor(features[:1], torch.tensor([0, 1, 2, 3], dtype=torch.int32), shape, bs)


def test_features_1d_rejected():
    _, indices, shape, bs = _good_inputs()
    with pytest.raises(ValueError, match=r"(?i)features"):
        spconv.SparseConvTensor(torch.randn(3), indices, shape, bs)


@pytest.mark.parametrize("ncols", [3, 5])
def test_indices_wrong_number_of_columns_rejected(ncols):
    features, indices, shape, bs = _good_inputs()
    bad = torch.zeros(3, ncols, dtype=torch.int32)
    bad[:, 0] = indices[:, 0]
    with pytest.raises(ValueError, match=r"(?i)spatial.?shape"):
        spconv.SparseConvTensor(features, bad, shape, bs)


@pytest.mark.parametrize("shape", [[4, 4], [4, 4, 4, 4]])
def test_spatial_shape_length_differs_from_ndim(shape):
    features, indices, _, bs = _good_inputs()
    with pytest.raises(ValueError, match=r"(?i)spatial.?shape"):
        spconv.SparseConvTensor(features, indices, shape, bs)


@pytest.mark.parametrize("n_features", [2, 4])
def test_features_indices_length_mismatch(n_features):
    _, indices, shape, bs = _good_inputs()
    with pytest.raises(ValueError, match=r"(?i)rows|length|same|number"):
        spconv.SparseConvTensor(torch.randn(n_features, 4), indices, shape, bs)


@pytest.mark.parametrize("dim", [0, 1, 2])
def test_negative_coordinate_names_dimension(dim):
    features, indices, shape, bs = _good_inputs()
    bad = indices.clone()
    bad[1, dim + 1] = -1
    with pytest.raises(ValueError, match=rf"(?i)negative.*dimension {dim}"):
        spconv.SparseConvTensor(features, bad, shape, bs)


@pytest.mark.parametrize("dim", [0, 1, 2])
def test_coordinate_out_of_spatial_shape_names_dimension(dim):
    features, indices, shape, bs = _good_inputs()
    bad = indices.clone()
    bad[2, dim + 1] = shape[dim]  # first invalid value: == spatial_shape[dim]
    with pytest.raises(ValueError, match=rf"(?i)dimension {dim}"):
        spconv.SparseConvTensor(features, bad, shape, bs)


def test_coordinate_far_outside_spatial_shape_names_value():
    features, indices, shape, bs = _good_inputs()
    bad = indices.clone()
    bad[0, 3] = 1000
    with pytest.raises(ValueError, match=r"1000"):
        spconv.SparseConvTensor(features, bad, shape, bs)


def test_batch_index_not_below_batch_size():
    features, indices, shape, bs = _good_inputs()
    bad = indices.clone()
    bad[0, 0] = bs
    with pytest.raises(ValueError, match=r"(?i)batch"):
        spconv.SparseConvTensor(features, bad, shape, bs)


def test_negative_batch_index():
    features, indices, shape, bs = _good_inputs()
    bad = indices.clone()
    bad[0, 0] = -1
    with pytest.raises(ValueError, match=r"(?i)batch"):
        spconv.SparseConvTensor(features, bad, shape, bs)


@pytest.mark.parametrize("bs", [0, -1])
def test_non_positive_batch_size(bs):
    features, indices, shape, _ = _good_inputs()
    indices = indices.clone()
    indices[:, 0] = 0
    with pytest.raises(ValueError, match=r"(?i)batch.?size"):
        spconv.SparseConvTensor(features, indices, shape, bs)


# --------------------------------------------------------------------------------------------------
# Module construction

_CONV_CLASSES_3D = [spconv.SubMConv3d, spconv.SparseConv3d, spconv.SparseConvTranspose3d]


@pytest.mark.parametrize("cls", _CONV_CLASSES_3D)
@pytest.mark.parametrize("arg", ["kernel_size", "stride", "padding", "dilation"])
@pytest.mark.parametrize("value", [(3, 3), (1, 1, 1, 1)])
def test_conv_param_wrong_length_at_construction(cls, arg, value):
    kwargs = {"kernel_size": 3}
    if arg == "kernel_size":
        value = tuple(3 for _ in value)
    kwargs[arg] = value
    with pytest.raises(ValueError, match=rf"(?i){arg}"):
        cls(4, 4, **kwargs)


@pytest.mark.parametrize("cls, ndim", [(spconv.SubMConv2d, 2), (spconv.SparseConv1d, 1), (spconv.SparseConv4d, 4)])
def test_kernel_size_wrong_length_other_ndims(cls, ndim):
    with pytest.raises(ValueError, match=r"(?i)kernel.?size"):
        cls(2, 2, [3] * (ndim + 1))


def test_inverse_conv_kernel_size_wrong_length():
    with pytest.raises(ValueError, match=r"(?i)kernel.?size"):
        spconv.SparseInverseConv3d(4, 4, (3, 3), indice_key="k")


@pytest.mark.parametrize("ksize", [2, (3, 2, 3), (4, 4, 4)])
def test_subm_even_kernel_size_rejected(ksize):
    with pytest.raises(ValueError, match=r"(?i)odd"):
        spconv.SubMConv3d(4, 4, ksize)


def test_even_kernel_size_allowed_for_regular_conv():
    x = _tensor()
    y = spconv.SparseConv3d(4, 5, 2, stride=2)(x)
    assert y.features.shape[1] == 5


@pytest.mark.parametrize("cls", _CONV_CLASSES_3D)
@pytest.mark.parametrize("cin, cout, groups", [(4, 6, 4), (6, 4, 4), (5, 5, 2)])
def test_groups_not_dividing_channels(cls, cin, cout, groups):
    with pytest.raises(ValueError, match=r"(?i)groups"):
        cls(cin, cout, 3, groups=groups)


# --------------------------------------------------------------------------------------------------
# Forward-time errors

def test_output_spatial_size_not_positive_all_dims():
    x = _tensor(shape=(3, 3, 3), n=4)
    conv = spconv.SparseConv3d(4, 4, 5)
    with pytest.raises(ValueError, match=r"(?i)dimension"):
        conv(x)


@pytest.mark.parametrize("dim", [0, 1, 2])
def test_output_spatial_size_not_positive_names_dimension(dim):
    shape = [8, 8, 8]
    shape[dim] = 3
    x = _tensor(shape=tuple(shape), n=4)
    conv = spconv.SparseConv3d(4, 4, 5)
    with pytest.raises(ValueError, match=rf"(?i)dimension {dim}"):
        conv(x)


def test_output_spatial_size_ok_with_padding():
    x = _tensor(shape=(3, 3, 3), n=4)
    y = spconv.SparseConv3d(4, 4, 5, padding=1)(x)
    assert y.spatial_shape == [1, 1, 1]


@pytest.mark.parametrize("cls", _CONV_CLASSES_3D)
def test_wrong_feature_channel_count(cls):
    x = _tensor(channels=3)
    with pytest.raises(ValueError, match=r"(?i)channel"):
        cls(4, 4, 3)(x)


def test_wrong_channel_count_inverse():
    x = _tensor(channels=4)
    y = spconv.SparseConv3d(4, 8, 3, stride=2, indice_key="d")(x)
    with pytest.raises(ValueError, match=r"(?i)channel"):
        spconv.SparseInverseConv3d(4, 4, 3, indice_key="d")(y)


@pytest.mark.parametrize("cls", _CONV_CLASSES_3D)
def test_feature_dtype_differs_from_weight_dtype(cls):
    x = _tensor(dtype=torch.float64)
    with pytest.raises(ValueError, match=r"(?i)float64|double|dtype"):
        cls(4, 4, 3)(x)


def test_feature_dtype_float32_into_float64_module():
    x = _tensor(dtype=torch.float32)
    with pytest.raises(ValueError, match=r"(?i)float64|double|dtype"):
        spconv.SubMConv3d(4, 4, 3).double()(x)


def test_module_ndim_differs_from_tensor_ndim():
    x = _tensor(shape=(6, 6))
    with pytest.raises(ValueError, match=r"(?i)spatial.?shape|3-?d|ndim"):
        spconv.SubMConv3d(4, 4, 3)(x)


@pytest.mark.parametrize("cls", _CONV_CLASSES_3D)
def test_duplicate_sites_rejected_in_strict_mode(cls, monkeypatch):
    """Duplicates follow spconv 2.3.8 by default (test_client_patterns.py); strict mode makes them an error."""
    from spconv import constants
    monkeypatch.setattr(constants, "SPCONV_STRICT_INDICES", True)
    indices = torch.tensor([[0, 1, 1, 1], [0, 2, 0, 1], [0, 1, 1, 1]], dtype=torch.int32)
    x = spconv.SparseConvTensor(torch.randn(3, 4), indices, [4, 4, 4], 1)
    with pytest.raises(ValueError, match=r"(?i)duplicate"):
        cls(4, 4, 3)(x)


def test_duplicate_sites_in_different_batches_are_fine():
    indices = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.int32)
    x = spconv.SparseConvTensor(torch.randn(2, 4), indices, [4, 4, 4], 2)
    y = spconv.SubMConv3d(4, 4, 3)(x)
    assert y.features.shape == (2, 4)


def test_meta_device_not_implemented():
    features = torch.empty(5, 4, device="meta")
    indices = torch.empty(5, 4, dtype=torch.int32, device="meta")
    x = spconv.SparseConvTensor(features, indices, [4, 4, 4], 1)
    with pytest.raises(NotImplementedError, match=r"meta"):
        spconv.SubMConv3d(4, 4, 3)(x)


@pytest.mark.parametrize("cls", [spconv.SparseConv3d, spconv.SparseConvTranspose3d])
def test_meta_device_not_implemented_regular(cls):
    features = torch.empty(5, 4, device="meta")
    indices = torch.empty(5, 4, dtype=torch.int32, device="meta")
    x = spconv.SparseConvTensor(features, indices, [4, 4, 4], 1)
    with pytest.raises(NotImplementedError, match=r"meta"):
        cls(4, 4, 3)(x)


# --------------------------------------------------------------------------------------------------
# indice_key misuse

def test_key_shared_by_subm_with_same_kernel_is_fine():
    x = _tensor()
    net = spconv.SparseSequential(spconv.SubMConv3d(4, 4, 3, indice_key="s"),
                                  spconv.SubMConv3d(4, 4, 3, indice_key="s"))
    y = net(x)
    assert torch.equal(y.indices, x.indices)


def test_key_subm_different_kernel_size():
    x = _tensor()
    y = spconv.SubMConv3d(4, 4, 3, indice_key="s")(x)
    with pytest.raises(ValueError, match=r"(?i)kernel.?size"):
        spconv.SubMConv3d(4, 4, 5, indice_key="s")(y)


def test_key_subm_different_dilation():
    x = _tensor()
    y = spconv.SubMConv3d(4, 4, 3, indice_key="s")(x)
    with pytest.raises(ValueError, match=r"(?i)dilation"):
        spconv.SubMConv3d(4, 4, 3, dilation=2, indice_key="s")(y)


def test_key_subm_reused_at_different_resolution():
    x = _tensor(shape=(8, 8, 8), n=20)
    y = spconv.SubMConv3d(4, 4, 3, indice_key="s")(x)
    z = spconv.SparseConv3d(4, 4, 3, stride=2)(y)  # no key: carries "s" to the coarser grid
    assert "s" in z.indice_dict
    with pytest.raises(ValueError, match=r"(?i)resolution|spatial.?shape"):
        spconv.SubMConv3d(4, 4, 3, indice_key="s")(z)


def test_key_subm_reused_with_different_point_count():
    x = _tensor(n=12)
    y = spconv.SubMConv3d(4, 4, 3, indice_key="s")(x)
    # same grid, fewer sites, but carrying the map built on all sites
    keep = torch.arange(y.indices.shape[0]) % 2 == 0
    fewer = spconv.SparseConvTensor(y.features[keep].detach(), y.indices[keep], y.spatial_shape, y.batch_size,
                                    indice_dict=y.indice_dict)
    with pytest.raises(ValueError, match=r"(?i)sites|points|number"):
        spconv.SubMConv3d(4, 4, 3, indice_key="s")(fewer)


def test_key_subm_reuses_strided_conv_key():
    x = _tensor(shape=(8, 8, 8), n=20)
    y = spconv.SparseConv3d(4, 4, 3, stride=2, indice_key="d")(x)
    with pytest.raises(ValueError, match=r"(?i)subm"):
        spconv.SubMConv3d(4, 4, 3, indice_key="d")(y)


def test_key_subm_reuses_non_strided_regular_conv_key():
    # same resolution and same site count would otherwise look compatible
    x = _tensor(shape=(8, 8, 8), n=20)
    y = spconv.SparseConv3d(4, 4, 3, padding=1, indice_key="d")(x)
    with pytest.raises(ValueError, match=r"(?i)subm"):
        spconv.SubMConv3d(4, 4, 3, indice_key="d")(y)


def test_inverse_unknown_key():
    x = _tensor()
    y = spconv.SparseConv3d(4, 4, 3, stride=2, indice_key="d")(x)
    with pytest.raises(ValueError, match=r"nope"):
        spconv.SparseInverseConv3d(4, 4, 3, indice_key="nope")(y)


def test_inverse_without_key_rejected():
    with pytest.raises(ValueError, match=r"(?i)indice_key"):
        spconv.SparseInverseConv3d(4, 4, 3, indice_key=None)


def test_inverse_with_subm_key():
    x = _tensor()
    y = spconv.SubMConv3d(4, 4, 3, indice_key="s")(x)
    with pytest.raises(ValueError, match=r"(?i)subm"):
        spconv.SparseInverseConv3d(4, 4, 3, indice_key="s")(y)


def test_inverse_with_different_kernel_size():
    x = _tensor(shape=(8, 8, 8), n=20)
    y = spconv.SparseConv3d(4, 4, 3, stride=2, indice_key="d")(x)
    with pytest.raises(ValueError, match=r"(?i)kernel.?size"):
        spconv.SparseInverseConv3d(4, 4, 2, indice_key="d")(y)


def test_inverse_after_layer_that_changed_sites():
    x = _tensor(shape=(8, 8, 8), n=20)
    y = spconv.SparseConv3d(4, 4, 3, stride=2, indice_key="d")(x)
    z = spconv.SparseConv3d(4, 4, 3, padding=1)(y)  # same grid, more sites
    assert z.spatial_shape == y.spatial_shape and z.indices.shape[0] > y.indices.shape[0]
    with pytest.raises(ValueError, match=r"(?i)sites|indice_key"):
        spconv.SparseInverseConv3d(4, 4, 3, indice_key="d")(z)


@pytest.mark.parametrize("second", [spconv.SparseConv3d, spconv.SparseConvTranspose3d])
def test_second_strided_conv_reusing_key(second):
    x = _tensor(shape=(8, 8, 8), n=20)
    y = spconv.SparseConv3d(4, 4, 3, stride=2, indice_key="d")(x)
    with pytest.raises(ValueError, match=r"(?i)already exists|exists"):
        second(4, 4, 3, stride=2, indice_key="d")(y)


def test_regular_conv_reusing_subm_key():
    x = _tensor(shape=(8, 8, 8), n=20)
    y = spconv.SubMConv3d(4, 4, 3, indice_key="s")(x)
    with pytest.raises(ValueError, match=r"(?i)exists"):
        spconv.SparseConv3d(4, 4, 3, stride=2, indice_key="s")(y)


# --------------------------------------------------------------------------------------------------
# Empty input (zero sites)

def _check_empty_grads(x, out, conv, cout):
    assert out.features.shape == (0, cout)
    assert out.indices.shape == (0, x.indices.shape[1])
    assert out.indices.dtype == torch.int32
    (out.features.sum() + 0.0).backward()
    assert x.features.grad is not None and x.features.grad.shape == x.features.shape
    assert conv.weight.grad is not None and conv.weight.grad.shape == conv.weight.shape
    assert torch.all(conv.weight.grad == 0)


def test_empty_input_subm():
    x = _empty()
    conv = spconv.SubMConv3d(4, 6, 3, indice_key="s")
    out = conv(x)
    assert out.spatial_shape == x.spatial_shape
    _check_empty_grads(x, out, conv, 6)


def test_empty_input_sparse_conv():
    x = _empty(shape=(5, 5, 5))
    conv = spconv.SparseConv3d(4, 6, 3, stride=2)
    out = conv(x)
    assert out.spatial_shape == [(5 - 3) // 2 + 1] * 3
    _check_empty_grads(x, out, conv, 6)


def test_empty_input_sparse_conv_transpose():
    x = _empty(shape=(3, 3, 3))
    conv = spconv.SparseConvTranspose3d(4, 6, 3, stride=2)
    out = conv(x)
    assert out.spatial_shape == [(3 - 1) * 2 + 3] * 3
    _check_empty_grads(x, out, conv, 6)


def test_empty_input_inverse_conv():
    x = _empty(shape=(5, 5, 5))
    down = spconv.SparseConv3d(4, 6, 3, stride=2, indice_key="d")
    inv = spconv.SparseInverseConv3d(6, 3, 3, indice_key="d")
    out = inv(down(x))
    assert out.spatial_shape == [5, 5, 5]
    _check_empty_grads(x, out, inv, 3)
    assert down.weight.grad is not None and torch.all(down.weight.grad == 0)


def test_empty_input_through_sequential_with_batchnorm():
    x = _empty()
    net = spconv.SparseSequential(spconv.SubMConv3d(4, 6, 3), torch.nn.BatchNorm1d(6), torch.nn.ReLU())
    out = net(x)
    assert out.features.shape == (0, 6)


# --------------------------------------------------------------------------------------------------
# Nothing the user passed is modified

def _snapshot(x):
    return x.features.detach().clone(), x.indices.clone(), list(x.spatial_shape), dict(x.indice_dict)


def _assert_unchanged(x, snap):
    f, i, s, d = snap
    assert torch.equal(x.features.detach(), f)
    assert torch.equal(x.indices, i)
    assert x.indices.dtype == torch.int32
    assert x.spatial_shape == s
    assert list(x.indice_dict.keys()) == list(d.keys())
    assert all(x.indice_dict[k] is d[k] for k in d)


@pytest.mark.parametrize("make", [
    lambda: spconv.SubMConv3d(4, 5, 3, indice_key="k"),
    lambda: spconv.SparseConv3d(4, 5, 3, stride=2, indice_key="k"),
    lambda: spconv.SparseConvTranspose3d(4, 5, 3, stride=2, indice_key="k"),
    lambda: spconv.SparseConv3d(4, 5, 1),
    lambda: spconv.SubMConv3d(4, 5, 1),
])
def test_inputs_not_modified(make):
    x = _tensor(requires_grad=True)
    # non-contiguous features exercise any internal .contiguous() copy path
    x = x.replace_feature(torch.randn(4, x.indices.shape[0]).t().requires_grad_())
    spatial_shape_obj = x.spatial_shape
    snap = _snapshot(x)
    conv = make()
    out = conv(x)
    out.features.square().sum().backward()
    _assert_unchanged(x, snap)
    assert x.spatial_shape is spatial_shape_obj
    # running again on the same input still works and gives the same result
    out2 = conv(x)
    assert torch.equal(out2.features, out.features)
    _assert_unchanged(x, snap)


def test_inverse_inputs_not_modified():
    x = _tensor(shape=(8, 8, 8), n=20, requires_grad=True)
    snap_x = _snapshot(x)
    y = spconv.SparseConv3d(4, 5, 3, stride=2, indice_key="d")(x)
    snap_y = _snapshot(y)
    z = spconv.SparseInverseConv3d(5, 3, 3, indice_key="d")(y)
    z.features.square().sum().backward()
    _assert_unchanged(x, snap_x)
    _assert_unchanged(y, snap_y)
    assert "d" not in x.indice_dict


def test_user_index_tensor_not_modified_by_constructor():
    features, indices, shape, bs = _good_inputs()
    idx_copy, f_copy = indices.clone(), features.clone()
    shape_copy = list(shape)
    x = spconv.SparseConvTensor(features, indices, shape, bs)
    spconv.SubMConv3d(4, 4, 3)(x)
    assert torch.equal(indices, idx_copy) and torch.equal(features, f_copy) and shape == shape_copy
