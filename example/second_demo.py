"""Main demo: the SECOND VoxelBackBone8x (OpenPCDet's LiDAR backbone) on a real KITTI scan, on the CPU.

Voxelises ../shared/data/kitti_000008.bin with PointToVoxel (a generated street scene if the data
folder is absent), runs the backbone in eval mode and one training step, and prints the sites per
stage, timings and the dense BEV feature map handed to a detection head.

usage: python example/second_demo.py [--data DIR] [--reps N]
"""
import argparse
import os
import statistics
import time

import numpy as np
import torch
from torch import nn

import spconv.pytorch as spconv
from spconv.pytorch.utils import PointToVoxel

from _common import generated_street as generated_scene  # example/_common.py

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.join(HERE, "..", "..", "shared", "data")


def block(cin, cout, k, key, stride=1, padding=0, subm=True):
    conv = (spconv.SubMConv3d(cin, cout, k, bias=False, indice_key=key) if subm else
            spconv.SparseConv3d(cin, cout, k, stride=stride, padding=padding, bias=False, indice_key=key))
    return spconv.SparseSequential(conv, nn.BatchNorm1d(cout, eps=1e-3, momentum=0.01), nn.ReLU())


class VoxelBackBone8x(nn.Module):
    """SECOND's sparse 3D backbone: 8x downsampling, 16 -> 128 channels."""

    def __init__(self, cin):
        super().__init__()
        self.stages = nn.ModuleList([
            spconv.SparseSequential(block(cin, 16, 3, "subm1"), block(16, 16, 3, "subm1")),
            spconv.SparseSequential(block(16, 32, 3, "spconv2", 2, 1, False), block(32, 32, 3, "subm2"),
                                    block(32, 32, 3, "subm2")),
            spconv.SparseSequential(block(32, 64, 3, "spconv3", 2, 1, False), block(64, 64, 3, "subm3"),
                                    block(64, 64, 3, "subm3")),
            spconv.SparseSequential(block(64, 64, 3, "spconv4", 2, (0, 1, 1), False), block(64, 64, 3, "subm4"),
                                    block(64, 64, 3, "subm4")),
            block(64, 128, (3, 1, 1), "spconv_down2", (2, 1, 1), 0, False),
        ])

    def forward(self, x):
        shapes = []
        for stage in self.stages:
            x = stage(x)
            shapes.append((x.indices.shape[0], list(x.spatial_shape)))
        return x, shapes


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    path = os.path.join(args.data, "kitti_000008.bin")
    if os.path.exists(path):
        points = np.fromfile(path, dtype=np.float32).reshape(-1, 4)
        source = f"KITTI scan {os.path.normpath(path)}"
    else:
        points = generated_scene()
        source = f"generated street scene ({path} not found)"
    print(f"input: {source}, {len(points)} points")

    gen = PointToVoxel(vsize_xyz=[0.05, 0.05, 0.1], coors_range_xyz=[0, -40, -3, 70.4, 40, 1],
                       num_point_features=4, max_num_voxels=40000, max_num_points_per_voxel=5)
    voxels, coords, counts = gen(torch.from_numpy(points))
    features = voxels.sum(1) / counts.clamp(min=1).unsqueeze(1).float()  # mean of the points in each voxel
    indices = torch.cat([torch.zeros(len(coords), 1, dtype=torch.int32), coords], 1)
    shape = [41, 1600, 1408]
    print(f"voxels: {len(coords)} in a {shape} (z, y, x) grid")

    net = VoxelBackBone8x(4)
    net.eval()
    times = []
    with torch.no_grad():
        for _ in range(args.reps + 1):
            t0 = time.perf_counter()
            out, shapes = net(spconv.SparseConvTensor(features, indices, shape, 1))
            times.append(time.perf_counter() - t0)
    for i, (n, s) in enumerate(shapes):
        print(f"  stage {i + 1}: {n:6d} active sites, spatial shape {s}")
    print(f"forward (eval, {torch.get_num_threads()} threads): median {statistics.median(times[1:]) * 1e3:.1f} ms "
          f"over {args.reps} runs (first run {times[0] * 1e3:.1f} ms incl. warm-up)")

    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    t0 = time.perf_counter()
    out, _ = net(spconv.SparseConvTensor(features, indices, shape, 1))
    loss = out.features.square().mean()
    loss.backward()
    opt.step()
    print(f"training step (forward + backward + SGD): {(time.perf_counter() - t0) * 1e3:.1f} ms, loss {loss.item():.4f}")

    bev = out.dense()  # [B, C, D, H, W] -> BEV map [B, C*D, H, W] as OpenPCDet's HeightCompression
    bev = bev.view(bev.shape[0], -1, *bev.shape[3:])
    print(f"BEV feature map for the detection head: {list(bev.shape)}, "
          f"{(bev.abs().sum(1) > 0).float().mean().item() * 100:.1f}% of BEV cells occupied")


if __name__ == "__main__":
    main()
