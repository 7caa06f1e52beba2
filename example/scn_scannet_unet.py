"""A SparseConvNet-style 3D U-Net (spconv.scn) on a real ScanNet room, forward and backward on the CPU.

Reads ``../shared/data/scannet_scene0000_00.bin`` (N x 6 float32: x, y, z in metres, r, g, b),
voxelises it (``--voxel`` metres, 2-5 cm; points sharing a voxel are averaged by InputLayer mode 4),
runs ``InputLayer -> SubmanifoldConvolution -> scn.UNet -> BatchNormReLU -> OutputLayer`` back to one
feature vector per point, and trains a few steps of a per-point classifier. The scene has no labels
here, so the proxy task is the point's height band (floor / low / high / ceiling, from z); the loss
going down shows the whole network trains.

    python example/scn_scannet_unet.py --voxel 0.02 --steps 5
"""
import argparse
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

import spconv.scn as scn

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
                    "scannet_scene0000_00.bin")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--voxel", type=float, default=0.02, help="voxel size in metres (0.02-0.05)")
    p.add_argument("--m", type=int, default=16, help="planes of the first U-Net level")
    p.add_argument("--levels", type=int, default=5)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--data", default=DATA)
    args = p.parse_args(argv)
    if not os.path.exists(args.data):
        raise SystemExit(f"ScanNet scene not found at {args.data} (expected ../shared/data next to the repository)")
    pts = np.fromfile(args.data, dtype=np.float32).reshape(-1, 6)
    xyz, rgb = torch.from_numpy(pts[:, :3]), torch.from_numpy(pts[:, 3:]) / 127.5 - 1
    coords = torch.floor((xyz - xyz.min(0).values) / args.voxel).long()
    size = 1 << int(np.ceil(np.log2(int(coords.max()) + 1)))  # a power of two: every 2/2 level divides
    size = max(size, 1 << (args.levels - 1))
    z = xyz[:, 2].contiguous()
    bands = torch.bucketize(z, torch.quantile(z, torch.tensor([0.1, 0.5, 0.9])))  # proxy labels, 4 classes
    torch.manual_seed(0)
    m = args.m
    model = scn.Sequential().add(scn.InputLayer(3, size, mode=4)).add(
        scn.SubmanifoldConvolution(3, 3, m, 3, False)).add(
        scn.UNet(3, 1, [m * (i + 1) for i in range(args.levels)], residual_blocks=False)).add(
        scn.BatchNormReLU(m)).add(scn.OutputLayer(3))
    head = torch.nn.Linear(m, 4)
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=0.01)
    n_vox = scn.InputLayer(3, size, mode=4)([coords, rgb]).features.shape[0]
    print(f"{len(pts)} points -> {n_vox} voxels of {args.voxel * 100:.0f} cm in a {size}^3 grid; "
          f"U-Net planes {[m * (i + 1) for i in range(args.levels)]}, {sum(q.numel() for q in params)} parameters")
    for step in range(args.steps):
        t0 = time.time()
        logits = head(model([coords, rgb]))  # [N_points, 4]
        loss = F.cross_entropy(logits, bands)
        t1 = time.time()
        opt.zero_grad()
        loss.backward()
        opt.step()
        t2 = time.time()
        acc = float((logits.argmax(1) == bands).float().mean())
        print(f"step {step + 1}: loss {loss.item():.4f}, point accuracy {acc:.3f}, forward {t1 - t0:.2f}s, "
              f"backward {t2 - t1:.2f}s")


if __name__ == "__main__":
    main()
