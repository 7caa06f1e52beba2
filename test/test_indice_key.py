"""indice_key bookkeeping: maps built once and shared, inverse convs restore the keyed conv's sites."""
import pytest
import torch

import spconv.pytorch as spconv
from spconv.pytorch import ops
from helpers import random_sparse


@pytest.fixture
def build_counter(monkeypatch):
    calls = {"subm": 0, "conv": 0}
    subm, conv = ops.build_subm_map, ops.build_conv_map

    def count_subm(*a, **k):
        calls["subm"] += 1
        return subm(*a, **k)

    def count_conv(*a, **k):
        calls["conv"] += 1
        return conv(*a, **k)

    monkeypatch.setattr(ops, "build_subm_map", count_subm)
    monkeypatch.setattr(ops, "build_conv_map", count_conv)
    return calls


def test_subm_layers_with_one_key_share_one_map(build_counter):
    feats, idx = random_sparse([16, 16, 16], 2, 0.05, 4)
    net = spconv.SparseSequential(
        spconv.SubMConv3d(4, 8, 3, indice_key="s1"), spconv.SubMConv3d(8, 8, 3, indice_key="s1"),
        spconv.SubMConv3d(8, 8, 3, indice_key="s1"),
        spconv.SparseConv3d(8, 16, 3, 2, 1, indice_key="d1"),
        spconv.SubMConv3d(16, 16, 3, indice_key="s2"), spconv.SubMConv3d(16, 16, 3, indice_key="s2"),
        spconv.SparseInverseConv3d(16, 8, 3, indice_key="d1"),
        spconv.SubMConv3d(8, 8, 3, indice_key="s1"))
    out = net(spconv.SparseConvTensor(feats, idx, [16, 16, 16], 2))
    assert build_counter == {"subm": 2, "conv": 1}  # s1, s2 and d1 built once each
    assert set(out.indice_dict) == {"s1", "d1", "s2"}
    assert torch.equal(out.indices, idx)


def test_unkeyed_layers_build_their_own_maps(build_counter):
    feats, idx = random_sparse([10, 10, 10], 1, 0.1, 4)
    net = spconv.SparseSequential(spconv.SubMConv3d(4, 4, 3), spconv.SubMConv3d(4, 4, 3))
    out = net(spconv.SparseConvTensor(feats, idx, [10, 10, 10], 1))
    assert build_counter["subm"] == 2 and out.indice_dict == {}


def test_shared_map_gives_same_result_as_fresh_map():
    feats, idx = random_sparse([12, 12, 12], 1, 0.1, 4, seed=2)
    a = spconv.SubMConv3d(4, 4, 3, indice_key="k")
    b = spconv.SubMConv3d(4, 4, 3, indice_key="k")
    b_fresh = spconv.SubMConv3d(4, 4, 3)
    b_fresh.load_state_dict(b.state_dict())
    x = spconv.SparseConvTensor(feats, idx, [12, 12, 12], 1)
    y = a(x)
    torch.testing.assert_close(b(y).features, b_fresh(y.replace_feature(y.features)).features)


def test_inverse_restores_exact_rows_through_two_levels():
    feats, idx = random_sparse([20, 18, 16], 2, 0.08, 3, seed=4)
    net = spconv.SparseSequential(
        spconv.SparseConv3d(3, 8, 3, 2, 1, indice_key="d1"), spconv.SparseConv3d(8, 8, 2, 2, indice_key="d2"),
        spconv.SparseInverseConv3d(8, 8, 2, indice_key="d2"), spconv.SparseInverseConv3d(8, 3, 3, indice_key="d1"))
    x = spconv.SparseConvTensor(feats, idx, [20, 18, 16], 2)
    mid = net[0](x)
    out = net(x)
    assert torch.equal(out.indices, idx) and out.spatial_shape == [20, 18, 16]
    back = net[2](net[1](mid))
    assert torch.equal(back.indices, mid.indices) and back.spatial_shape == mid.spatial_shape


def test_keys_do_not_leak_into_the_input_tensor():
    feats, idx = random_sparse([8, 8, 8], 1, 0.2, 2)
    x = spconv.SparseConvTensor(feats, idx, [8, 8, 8], 1)
    spconv.SubMConv3d(2, 2, 3, indice_key="k")(x)
    assert x.indice_dict == {}


def _check_same_as_small_grid(net, feats, idx, small_shape, big_shape, shift, batch_size):
    """net (SubM, strided conv with indice_key, ..., inverse conv) on the sites in the big grid gives the small
    grid's features at the shifted sites, and its strided conv the small grid's output sites shifted by half."""
    big_idx = (idx + shift).contiguous()
    small = net(spconv.SparseConvTensor(feats, idx, small_shape, batch_size))
    big = net(spconv.SparseConvTensor(feats, big_idx, big_shape, batch_size))
    assert torch.equal(big.indices, big_idx)
    torch.testing.assert_close(big.features, small.features)
    down_small = net[1](net[0](spconv.SparseConvTensor(feats, idx, small_shape, batch_size)))
    down_big = net[1](net[0](spconv.SparseConvTensor(feats, big_idx, big_shape, batch_size)))
    assert torch.equal(down_big.indices - shift // 2, down_small.indices)


def test_huge_grid_int64_keys_match_small_grid():
    """A grid whose volume x batch passes 2^31 (int64 keys) gives the same results as a small grid
    holding the same sites shifted to the origin."""
    feats, idx = random_sparse([10, 12, 9], 3, 0.1, 4, seed=11)
    torch.manual_seed(0)
    net = spconv.SparseSequential(spconv.SubMConv3d(4, 8, 3, indice_key="s"),
                                  spconv.SparseConv3d(8, 8, 3, 2, 1, indice_key="d"),
                                  spconv.SparseInverseConv3d(8, 4, 3, indice_key="d"))
    # room above the sites, so no output is clipped at the top in either grid; even shift: same stride-2 alignment
    _check_same_as_small_grid(net, feats, idx, [14, 16, 13], [60000, 70000, 5000],
                              torch.tensor([0, 59980, 69980, 4980], dtype=torch.int32), 3)


def test_long_last_dimension_matches_small_grid():
    """A 2-D grid whose last dimension is too long for the dense per-row line and the reach tables of the
    kernel-map builder (its fallbacks) gives the same results as a small grid with the same sites."""
    feats, idx = random_sparse([6, 40], 2, 0.3, 3, seed=5)
    torch.manual_seed(0)
    net = spconv.SparseSequential(spconv.SubMConv2d(3, 5, 3, indice_key="s"),
                                  spconv.SparseConv2d(5, 4, 3, 2, 1, indice_key="d"),
                                  spconv.SubMConv2d(4, 4, 3, indice_key="s2"),
                                  spconv.SparseInverseConv2d(4, 3, 3, indice_key="d"))
    _check_same_as_small_grid(net, feats, idx, [8, 44], [8, 3_000_000],
                              torch.tensor([0, 0, 2_999_950], dtype=torch.int32), 2)
