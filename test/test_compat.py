"""Downstream code paths: OpenPCDet / mmdetection3d-style models written against the public spconv API."""
from functools import partial
from typing import Set

import numpy as np
import torch
from torch import nn

import spconv
import spconv.pytorch as spconv_pt
from spconv.pytorch.modules import SparseSyncBatchNorm
from helpers import random_sparse


def replace_feature(out, new_features):  # the helper OpenPCDet ships
    if "replace_feature" in out.__dir__():
        return out.replace_feature(new_features)
    out.features = new_features
    return out


def find_all_spconv_keys(model: nn.Module, prefix="") -> Set[str]:  # OpenPCDet's checkpoint helper
    found = set()
    for name, child in model.named_children():
        new_prefix = f"{prefix}.{name}" if prefix != "" else name
        if isinstance(child, spconv_pt.conv.SparseConvolution):
            found.add(f"{new_prefix}.weight")
        found.update(find_all_spconv_keys(child, prefix=new_prefix))
    return found


def post_act_block(cin, cout, k, indice_key, stride=1, padding=0, conv_type="subm", norm_fn=None):
    if conv_type == "subm":
        conv = spconv_pt.SubMConv3d(cin, cout, k, bias=False, indice_key=indice_key)
    elif conv_type == "spconv":
        conv = spconv_pt.SparseConv3d(cin, cout, k, stride=stride, padding=padding, bias=False, indice_key=indice_key)
    else:
        conv = spconv_pt.SparseInverseConv3d(cin, cout, k, indice_key=indice_key, bias=False)
    return spconv_pt.SparseSequential(conv, norm_fn(cout), nn.ReLU())


class UNetV2Like(nn.Module):
    """Encoder (VoxelBackBone8x-like) plus a decoder with lateral concat and SparseInverseConv3d."""

    def __init__(self, cin):
        super().__init__()
        norm_fn = partial(nn.BatchNorm1d, eps=1e-3, momentum=0.01)
        self.conv_input = spconv_pt.SparseSequential(
            spconv_pt.SubMConv3d(cin, 16, 3, padding=1, bias=False, indice_key="subm1"), norm_fn(16), nn.ReLU())
        self.conv1 = post_act_block(16, 16, 3, "subm1", norm_fn=norm_fn)
        self.conv2 = spconv_pt.SparseSequential(
            post_act_block(16, 32, 3, "spconv2", 2, 1, "spconv", norm_fn),
            post_act_block(32, 32, 3, "subm2", norm_fn=norm_fn))
        self.conv3 = spconv_pt.SparseSequential(
            post_act_block(32, 64, 3, "spconv3", 2, 1, "spconv", norm_fn),
            post_act_block(64, 64, 3, "subm3", norm_fn=norm_fn))
        self.conv_up_t3 = post_act_block(64, 64, 3, "subm3", norm_fn=norm_fn)
        self.conv_up_m3 = post_act_block(128, 64, 3, "subm3", norm_fn=norm_fn)
        self.inv_conv3 = post_act_block(64, 32, 3, "spconv3", conv_type="inverse", norm_fn=norm_fn)
        self.conv_up_t2 = post_act_block(32, 32, 3, "subm2", norm_fn=norm_fn)
        self.conv_up_m2 = post_act_block(64, 32, 3, "subm2", norm_fn=norm_fn)
        self.inv_conv2 = post_act_block(32, 16, 3, "spconv2", conv_type="inverse", norm_fn=norm_fn)
        self.conv5 = spconv_pt.SparseSequential(post_act_block(16, 16, 3, "subm1", norm_fn=norm_fn))

    @staticmethod
    def channel_reduction(x, out_channels):
        features = x.features
        n, in_channels = features.shape
        return replace_feature(x, features.view(n, out_channels, -1).sum(dim=2))

    def ur_block(self, x_lateral, x_bottom, conv_t, conv_m, conv_inv):
        x_trans = conv_t(x_lateral)
        x = replace_feature(x_trans, torch.cat((x_bottom.features, x_trans.features), dim=1))
        x_m = conv_m(x)
        x = self.channel_reduction(x, x_m.features.shape[1])
        x = replace_feature(x_m, x_m.features + x.features)
        return conv_inv(x)

    def forward(self, voxel_features, voxel_coords, batch_size, sparse_shape):
        x = spconv_pt.SparseConvTensor(features=voxel_features, indices=voxel_coords.int(),
                                       spatial_shape=sparse_shape, batch_size=batch_size)
        x1 = self.conv1(self.conv_input(x))
        x2 = self.conv2(x1)
        x3 = self.conv3(x2)
        x_up3 = self.ur_block(x3, x3, self.conv_up_t3, self.conv_up_m3, self.inv_conv3)
        x_up2 = self.ur_block(x2, x_up3, self.conv_up_t2, self.conv_up_m2, self.inv_conv2)
        return self.conv5(x_up2)


def test_openpcdet_unet_runs_and_trains():
    feats, idx = random_sparse([12, 40, 36], 2, 0.03, 4, seed=0)
    net = UNetV2Like(4)
    keys = find_all_spconv_keys(net)
    assert "conv_input.0.weight" in keys and "inv_conv3.0.weight" in keys and len(keys) == 13
    out = net(feats, idx, 2, [12, 40, 36])
    assert torch.equal(out.indices, idx) and out.features.shape == (len(idx), 16)  # back on the input sites
    out.features.sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    # OpenPCDet's checkpoint loader transposes spconv weights when shapes differ; ours load as they are
    state = net.state_dict()
    net2 = UNetV2Like(4)
    net2.load_state_dict(state)
    net.eval(), net2.eval()
    torch.testing.assert_close(net(feats, idx, 2, [12, 40, 36]).features, net2(feats, idx, 2, [12, 40, 36]).features)


def test_version_and_constants_used_downstream():
    assert float(spconv.__version__[2:]) >= 2.0  # OpenPCDet
    assert spconv.__version__ >= "2.0.0"  # mmdetection3d's string comparison
    spconv.constants.SPCONV_USE_DIRECT_TABLE = False  # OpenPCDet sets this after import
    from spconv.pytorch import constants
    assert constants.TORCH_HAS_AMP and isinstance(constants.PYTORCH_VERSION, list)
    assert constants.is_amp_enabled() is False


def test_sync_batchnorm_and_names():
    bn = SparseSyncBatchNorm(4)
    assert isinstance(bn, nn.SyncBatchNorm)
    net = spconv_pt.SparseSequential(spconv_pt.SubMConv3d(4, 4, 3, name="c1"), spconv_pt.SparseMaxPool3d(2))
    spconv_pt.assign_name_for_sparse_modules(net)
    assert net[0]._sparse_unique_name == "0" and net[1]._sparse_unique_name == "1"


def test_spconv_test_utils():
    from spconv.test_utils import TestCase, generate_sparse_data, params_grid
    assert params_grid([1, 2], ["a"]) == [[1, "a"], [2, "a"]]
    data = generate_sparse_data([5, 6, 7], [20, 10], 3)
    idx = data["indices"]
    assert idx.dtype == np.int32 and idx.shape == (30, 4) and set(idx[:, -1]) == {0, 1}
    dense = data["features_dense"]
    np.testing.assert_array_equal(dense[idx[:, 3], :, idx[:, 0], idx[:, 1], idx[:, 2]], data["features"])
    TestCase().assertAllClose(data["features"], data["features"])
