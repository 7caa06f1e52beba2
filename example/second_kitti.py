"""SECOND on a KITTI scan, with pictures: voxelise, run VoxelBackBone8x, draw bird's-eye views.

Voxelises ../shared/data/kitti_000008.bin (a generated street when the folder is absent) with
PointToVoxel in the SECOND set-up (voxels 0.05 x 0.05 x 0.1 m, x in [0, 70.4), y in [-40, 40),
z in [-3, 1), grid [41, 1600, 1408] z, y, x), runs OpenPCDet's VoxelBackBone8x (randomly
initialised: this shows the data flow and the sites each stage keeps, not detections) stage by stage and writes
  second_kitti_input_bev.png     occupied voxels seen from above (colour: highest voxel's height)
  second_kitti_feature_norm.png  L2 norm of the [128, 2, 200, 176] output feature map, max over z
into --out (default example/output/).

usage: python example/second_kitti.py [--data DIR] [--out DIR] [--quick]
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import spconv.pytorch as spconv  # noqa: E402
from spconv.pytorch.utils import PointToVoxel  # noqa: E402

from _common import DEFAULT_DATA, DEFAULT_OUT, load_kitti, out_dir, progress, pyplot  # noqa: E402
from second_demo import VoxelBackBone8x  # noqa: E402

VOXEL_SIZE = [0.05, 0.05, 0.1]
POINT_RANGE = [0, -40, -3, 70.4, 40, 1]
SPARSE_SHAPE = [41, 1600, 1408]  # z, y, x: the 40 x 1600 x 1408 grid plus one z layer, as SECOND pads it


def voxelize(points: np.ndarray, max_voxels: int = 40000):
    """points N x 4 -> (SparseConvTensor with mean-of-points features [M, 4], grid indices [M, 3] z, y, x)."""
    gen = PointToVoxel(vsize_xyz=VOXEL_SIZE, coors_range_xyz=POINT_RANGE, num_point_features=4,
                       max_num_voxels=max_voxels, max_num_points_per_voxel=5)
    voxels, coords, counts = gen(torch.from_numpy(points))
    features = voxels.sum(1) / counts.clamp(min=1).unsqueeze(1).float()
    indices = torch.cat([torch.zeros(len(coords), 1, dtype=torch.int32), coords], 1)
    return spconv.SparseConvTensor(features, indices, SPARSE_SHAPE, 1), coords


def input_bev(coords: torch.Tensor) -> np.ndarray:
    """[1600, 1408] (y, x) image: the z index of the highest occupied voxel + 1, 0 where empty."""
    img = torch.zeros(SPARSE_SHAPE[1] * SPARSE_SHAPE[2], dtype=torch.long)
    lin = coords[:, 1].long() * SPARSE_SHAPE[2] + coords[:, 2].long()
    img.scatter_reduce_(0, lin, coords[:, 0].long() + 1, "amax")
    return img.view(SPARSE_SHAPE[1], SPARSE_SHAPE[2]).numpy()


def feature_norm_bev(out: spconv.SparseConvTensor) -> np.ndarray:
    """[H, W] image: max over z of the per-site L2 norm of the output features (0 where no site)."""
    norm = out.features.float().norm(dim=1, keepdim=True)
    dense = out.replace_feature(norm).dense()  # [1, 1, D, H, W]
    return dense[0, 0].amax(0).numpy()


def save_bev(img: np.ndarray, path: str, title: str, label: str, cmap: str, pool: int = 1, gamma: float = 1.0):
    """Draws a [Y, X] grid over the point range as seen from above: x (forward) up, y (left) to the left,
    zoomed to the occupied cells. ``pool`` max-pools the image first so that thin structures stay visible."""
    plt = pyplot()
    from matplotlib.colors import PowerNorm
    if pool > 1:
        img = torch.nn.functional.max_pool2d(torch.from_numpy(img).double()[None, None], pool)[0, 0].numpy()
    ny, nx = img.shape
    x0, y0, x1, y1 = POINT_RANGE[0], POINT_RANGE[1], POINT_RANGE[3], POINT_RANGE[4]
    disp = img[::-1, ::-1].T  # rows: x from x1 (top) down; columns: y from y1 (left) to y0
    fig, ax = plt.subplots(figsize=(7, 7.5))
    ax.set_facecolor("black")
    masked = np.ma.masked_equal(disp, 0)
    im = ax.imshow(masked, cmap=cmap, extent=(y1, y0, x0, x1), interpolation="nearest", aspect="equal",
                   norm=PowerNorm(gamma) if gamma != 1.0 else None)
    rows, cols = np.nonzero(img)
    if len(rows):
        dy, dx = (y1 - y0) / ny, (x1 - x0) / nx
        ax.set_xlim(min(y1, y0 + (rows.max() + 1) * dy + 2), max(y0, y0 + rows.min() * dy - 2))
        ax.set_ylim(max(x0, x0 + cols.min() * dx - 2), min(x1, x0 + (cols.max() + 1) * dx + 2))
    ax.set_xlabel("y (m, left is positive)")
    ax.set_ylabel("x (m, forward)")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, shrink=0.8, label=label)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=DEFAULT_DATA, help="folder with kitti_000008.bin (default ../shared/data)")
    ap.add_argument("--out", default=DEFAULT_OUT, help="folder for the PNGs (default example/output)")
    ap.add_argument("--quick", action="store_true", help="keep every 4th point only (a smoke test)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    out = out_dir(args.out)

    points, source = load_kitti(args.data)
    if args.quick:
        points = points[::4].copy()
    print(f"input: {source}, {len(points)} points")
    x, coords = voxelize(points)
    print(f"voxels: {len(coords)} in a {SPARSE_SHAPE} (z, y, x) grid")

    # Untrained weights: BatchNorm normalises with the batch statistics (train mode, no gradients), so the
    # activations keep their scale through the 13 layers (with fresh running statistics, eval mode
    # would shrink them about 3x per layer).
    net = VoxelBackBone8x(4).train()
    stages = []
    t0 = time.perf_counter()
    with torch.no_grad():
        y = x
        for i, stage in enumerate(progress(net.stages, desc="backbone stages", unit="stage")):
            y = stage(y)
            stages.append((y.indices.shape[0], list(y.spatial_shape), y.features.shape[1]))
    elapsed = time.perf_counter() - t0
    for i, (n, shape, c) in enumerate(stages):
        print(f"  stage {i + 1}: {n:6d} active sites, spatial shape {shape}, {c} channels")
    print(f"forward (no_grad, batch-statistics BatchNorm, {torch.get_num_threads()} threads): {elapsed * 1e3:.1f} ms")

    in_img = input_bev(coords)
    norm_img = feature_norm_bev(y)
    in_png = os.path.join(out, "second_kitti_input_bev.png")
    norm_png = os.path.join(out, "second_kitti_feature_norm.png")
    save_bev(in_img, in_png, f"input voxels from above ({len(coords)} voxels, 4x4 max-pooled for display)",
             "z index of the top voxel + 1", "viridis", pool=4)
    save_bev(norm_img, norm_png, f"output feature norm {list(y.features.shape)} -> BEV {list(norm_img.shape)}",
             "max over z of ||feature|| (square-root scale)", "magma", gamma=0.5)
    occupied = float((norm_img > 0).mean())
    print(f"BEV feature map: {list(norm_img.shape)}, {occupied * 100:.1f}% of cells occupied, "
          f"max norm {norm_img.max():.3g}")
    print(f"wrote {in_png}")
    print(f"wrote {norm_png}")
    return {"num_points": len(points), "num_voxels": len(coords), "coords": coords, "stages": stages,
            "input_bev": in_img, "feature_norm_bev": norm_img, "pngs": [in_png, norm_png], "source": source}


if __name__ == "__main__":
    main()
