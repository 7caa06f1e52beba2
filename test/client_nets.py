"""Downstream-style networks and calls, written against the public spconv 2.x API.

Shared by test/data/make_spconv238_clients.py (run once with the ORIGINAL spconv 2.3.8 to make the
committed fixture) and test/test_client_patterns.py (runs them on this package). Every function takes
the ``spconv.pytorch`` module to use as its first argument and imports no spconv itself. They replay
what real code does, written here from the descriptions of those projects (no code copied):

- ``Mmdet3dStyleEncoder``: mmdetection3d's SparseEncoder shape (SubM stem, stages of SubM + strided
  convs with BatchNorm1d/ReLU, a (3, 1, 1) conv_out, ``dense()`` reshaped to BEV), fed with
  ``torch.randint`` coordinates as its unit tests do, so sites repeat.
- ``voxelnext_style_head``: VoxelNeXt's ``combine_out`` / ``bev_out``: coarser levels' indices scaled in
  place, ``replace_feature`` with more rows plus ``x.indices = torch.cat(...)``, then the 3D->2D
  projection merged with ``torch.unique`` + ``index_add_`` and 2D convs.
- ``PoolAfterConvNet``: convs then ``SparseMaxPool3d`` on features with negative values (spconv's own
  multi-implementation test net has this shape).
- ``duplicate_site_calls``: single layers on inputs with repeated sites (SubM 3D/2D with dilation,
  strided, transposed, inverse, max pool, dense()).
"""
import torch
from torch import nn


def random_coords(seed, n, batch_size, spatial_shape, channels):
    """``torch.randint`` coordinates (sites repeat) and uniform features in [-1, 1)."""
    g = torch.Generator().manual_seed(seed)
    cols = [torch.randint(0, batch_size, (n, 1), generator=g)]
    cols += [torch.randint(0, s, (n, 1), generator=g) for s in spatial_shape]
    indices = torch.cat(cols, 1).to(torch.int32).contiguous()
    features = (torch.rand(n, channels, generator=g) * 2 - 1).contiguous()
    return features, indices


def build_mmdet3d_style_encoder(spconv):
    def block(conv):
        return spconv.SparseSequential(conv, nn.BatchNorm1d(conv.out_channels, eps=1e-3, momentum=0.01), nn.ReLU())

    class Mmdet3dStyleEncoder(nn.Module):
        def __init__(self, in_channels=4, c1=8, c2=16, c3=32):
            super().__init__()
            self.conv_input = block(spconv.SubMConv3d(in_channels, c1, 3, padding=1, bias=False, indice_key="subm1"))
            self.stage1 = block(spconv.SubMConv3d(c1, c1, 3, padding=1, bias=False, indice_key="subm1"))
            self.stage2 = spconv.SparseSequential(
                block(spconv.SparseConv3d(c1, c2, 3, stride=2, padding=1, bias=False, indice_key="spconv2")),
                block(spconv.SubMConv3d(c2, c2, 3, padding=1, bias=False, indice_key="subm2")))
            self.stage3 = spconv.SparseSequential(
                block(spconv.SparseConv3d(c2, c3, 3, stride=2, padding=(0, 1, 1), bias=False, indice_key="spconv3")),
                block(spconv.SubMConv3d(c3, c3, 3, padding=1, bias=False, indice_key="subm3")))
            self.conv_out = block(spconv.SparseConv3d(c3, c3, (3, 1, 1), stride=(2, 1, 1), bias=False,
                                                      indice_key="spconv_down2"))

        def forward(self, x):
            outs = {"conv_input": self.conv_input(x)}
            outs["stage1"] = self.stage1(outs["conv_input"])
            outs["stage2"] = self.stage2(outs["stage1"])
            outs["stage3"] = self.stage3(outs["stage2"])
            outs["conv_out"] = self.conv_out(outs["stage3"])
            dense = outs["conv_out"].dense()
            n, c, d, h, w = dense.shape
            outs["bev"] = dense.view(n, c * d, h, w)
            return outs

    return Mmdet3dStyleEncoder


def build_voxelnext_style_head(spconv):
    class VoxelNeXtStyleHead(nn.Module):
        """Three levels (strides 1, 2, 4 of the input), combined at the finest, projected to BEV."""

        def __init__(self, channels=8):
            super().__init__()
            self.conv4 = spconv.SparseSequential(
                spconv.SubMConv3d(channels, channels, 3, padding=1, bias=False, indice_key="subm4"), nn.ReLU())
            self.conv5 = spconv.SparseSequential(
                spconv.SparseConv3d(channels, channels, 3, stride=2, padding=1, bias=False, indice_key="spconv5"),
                nn.ReLU(),
                spconv.SubMConv3d(channels, channels, 3, padding=1, bias=False, indice_key="subm5"), nn.ReLU())
            self.conv6 = spconv.SparseSequential(
                spconv.SparseConv3d(channels, channels, 3, stride=2, padding=1, bias=False, indice_key="spconv6"),
                nn.ReLU())
            self.conv_out = spconv.SparseSequential(
                spconv.SparseConv2d(channels, channels, 3, stride=1, padding=1, bias=False, indice_key="spconv_down2"),
                nn.ReLU())
            self.shared_conv = spconv.SubMConv2d(channels, channels, 3, bias=True, indice_key="subm_head")

        def forward(self, x):
            x4 = self.conv4(x)
            x5 = self.conv5(x4)
            x6 = self.conv6(x5)
            outs = {"x4": x4, "x5": x5, "x6": x6}
            x5.indices[:, 1:] *= 2  # in place, as the original does
            x6.indices[:, 1:] *= 4
            x4 = x4.replace_feature(torch.cat([x4.features, x5.features, x6.features]))
            x4.indices = torch.cat([x4.indices, x5.indices, x6.indices])
            outs["combined"] = x4
            indices_2d = x4.indices[:, [0, 2, 3]]
            uniq, inverse = torch.unique(indices_2d, dim=0, return_inverse=True)
            merged = x4.features.new_zeros((uniq.shape[0], x4.features.shape[1]))
            merged.index_add_(0, inverse, x4.features)
            bev = x4.replace_feature(merged)
            bev.indices = uniq.int()
            bev.spatial_shape = x4.spatial_shape[1:]
            outs["bev"] = bev
            outs["conv_out"] = self.conv_out(bev)
            outs["shared_conv"] = self.shared_conv(outs["conv_out"])
            return outs

    return VoxelNeXtStyleHead


def build_pool_after_conv_net(spconv):
    class PoolAfterConvNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = spconv.SparseSequential(
                spconv.SubMConv3d(3, 8, 3, bias=False, indice_key="c0"),
                spconv.SparseConv3d(8, 8, 3, stride=1, padding=1, bias=False),
            )
            self.pool = spconv.SparseMaxPool3d(2, 2)
            self.after = spconv.SubMConv3d(8, 4, 3, bias=False, indice_key="c1")
            self.pool2 = spconv.SparseMaxPool3d(3, 2, padding=1)

        def forward(self, x):
            a = self.net(x)
            b = self.pool(a)  # a's features are about half negative
            c = self.after(b)
            d = self.pool2(c)
            return {"conv": a, "pool": b, "after": c, "pool2": d}

    return PoolAfterConvNet


def duplicate_site_calls(spconv):
    """name -> (layer factory, (spatial_shape, batch_size, n, channels, seed)); the layer maps a
    SparseConvTensor to a SparseConvTensor or a dense tensor."""
    def inverse_after_down():
        down = spconv.SparseConv3d(3, 4, 3, stride=2, padding=1, bias=False, indice_key="down")
        inv = spconv.SparseInverseConv3d(4, 2, 3, indice_key="down", bias=False)
        return spconv.SparseSequential(down, inv)

    class Dense(nn.Module):
        def forward(self, x):
            return x.dense()

    return {
        "subm3d": (lambda: spconv.SubMConv3d(3, 4, 3, bias=False), ([6, 7, 5], 2, 300, 3, 11)),
        "subm3d_k5_dil2": (lambda: spconv.SubMConv3d(3, 4, 5, dilation=2, bias=False), ([8, 9, 7], 2, 500, 3, 12)),
        "subm2d_k35": (lambda: spconv.SubMConv2d(3, 4, (3, 5), bias=False), ([9, 8], 2, 150, 3, 13)),
        "subm1d": (lambda: spconv.SubMConv1d(3, 4, 3, bias=False), ([20], 2, 50, 3, 14)),
        "strided3d": (lambda: spconv.SparseConv3d(3, 4, 3, stride=2, padding=1, bias=False), ([6, 7, 5], 2, 300, 3, 15)),
        "transposed3d": (lambda: spconv.SparseConvTranspose3d(3, 4, 3, stride=2, bias=False), ([5, 4, 5], 1, 120, 3, 16)),
        "inverse3d": (inverse_after_down, ([6, 7, 5], 2, 300, 3, 17)),
        "maxpool3d": (lambda: spconv.SparseMaxPool3d(2, 2), ([6, 8, 6], 2, 400, 3, 18)),
        "maxpool3d_k3s1": (lambda: spconv.SparseMaxPool3d(3, 1, padding=1), ([5, 6, 5], 1, 150, 3, 19)),
        "dense": (Dense, ([6, 7, 5], 2, 300, 3, 20)),
    }
