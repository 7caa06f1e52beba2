"""Voxelise an open3d point cloud with PointToVoxel and cross-check it against open3d's VoxelGrid.

1. Reads a .pcd or .ply with open3d (--input). Without --input it first writes the ScanNet scene
   (../shared/data/scannet_scene0000_00.bin, a generated room when absent) to --out as a .ply.
2. Voxelises the points with spconv's PointToVoxel and with
   open3d.geometry.VoxelGrid.create_from_point_cloud_within_bounds, on the same grid.
3. Compares the two voxel sets and the per-voxel mean colours: they must agree exactly except for
   voxels holding a boundary point (see below); anything else raises an AssertionError.
4. Maps per-voxel features (mean colours, and the output of a SubMConv3d) back to the points with
   gather_features_by_pc_voxel_id.
Writes voxelize_open3d.png (top-down: point colours vs their voxel's mean colour) into --out.

Conventions that matter when comparing (both checked here):
- open3d's grid_index is (ix, iy, iz) with ix = floor((x - min_bound.x) / voxel_size), computed in
  float64; PointToVoxel's indices are (iz, iy, ix) and computed in float32, as spconv does. A point
  lying within float32 rounding of a voxel face (|q - round(q)| ~ 1e-5 for q = (x - min) / size)
  can land in the neighbouring voxel in one of them: such "boundary" points are counted, and every
  voxel that differs must contain one.
- create_from_point_cloud (without bounds) uses min_bound = min(points) - voxel_size / 2, a grid
  shifted by half a voxel; this example passes explicit bounds to both.
- open3d 0.20 keeps points outside [min_bound, max_bound) (negative or too large grid indices);
  PointToVoxel drops them. The bounds here cover every point; open3d voxels outside the grid are
  reported and left out of the comparison.

usage: python example/voxelize_open3d.py [--input FILE.ply|FILE.pcd] [--voxel-size M] [--out DIR] [--quick]
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import spconv.pytorch as spconv  # noqa: E402
from spconv.pytorch.utils import PointToVoxel, gather_features_by_pc_voxel_id  # noqa: E402

from _common import DEFAULT_DATA, DEFAULT_OUT, load_scannet, out_dir, progress, pyplot  # noqa: E402


def write_cloud(points: np.ndarray, path: str):
    """Writes N x 6 (xyz, rgb 0..255) or N x >=3 points to a .ply/.pcd with open3d."""
    import open3d as o3d
    pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points[:, :3].astype(np.float64)))
    if points.shape[1] >= 6:
        pcd.colors = o3d.utility.Vector3dVector(points[:, 3:6].astype(np.float64) / 255.0)
    if not o3d.io.write_point_cloud(path, pcd):
        raise RuntimeError(f"open3d could not write {path}")
    return path


def grid_bounds(xyz: np.ndarray, voxel_size: float):
    """(min_bound, max_bound, grid size xyz): open3d's own margin (half a voxel below the minimum), and
    a whole number of voxels that covers every point with at least half a voxel to spare."""
    lo = xyz.min(0) - voxel_size / 2
    size = np.floor((xyz.max(0) - lo) / voxel_size).astype(np.int64) + 2
    return lo, lo + size * voxel_size, size


def boundary_points(xyz: np.ndarray, lo: np.ndarray, voxel_size: float, tol: float = 1e-4) -> np.ndarray:
    """Points within ``tol`` voxels of a voxel face on some axis (float64 arithmetic): where float32 and
    float64 floors can disagree."""
    q = (xyz - lo) / voxel_size
    return (np.abs(q - np.round(q)) < tol).any(1)


def boundary_voxels(xyz: np.ndarray, lo: np.ndarray, voxel_size: float, tol: float = 1e-4) -> np.ndarray:
    """Every voxel (x, y, z) a point could be floored into when each coordinate may move by ``tol``
    voxels: both neighbours across each face the point is near, in all combinations (up to 8)."""
    q = (xyz - lo) / voxel_size
    lo_i, hi_i = np.floor(q - tol).astype(np.int64), np.floor(q + tol).astype(np.int64)
    combos = [np.stack([(hi_i if (m >> a) & 1 else lo_i)[:, a] for a in range(3)], 1) for m in range(8)]
    return np.unique(np.concatenate(combos), axis=0) if len(xyz) else np.zeros((0, 3), np.int64)


def compare(ptv_xyz_idx: np.ndarray, o3d_idx: np.ndarray, touched_by_boundary: set):
    """Set comparison of two [M, 3] integer voxel index arrays (x, y, z order)."""
    a = set(map(tuple, ptv_xyz_idx.tolist()))
    b = set(map(tuple, o3d_idx.tolist()))
    only_ptv, only_o3d = a - b, b - a
    unexplained = {v for v in only_ptv | only_o3d if v not in touched_by_boundary}
    return {"ptv": len(a), "open3d": len(b), "common": len(a & b), "only_ptv": len(only_ptv),
            "only_open3d": len(only_o3d), "unexplained": len(unexplained),
            "agreement": len(a & b) / max(len(a | b), 1)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", help="a .ply or .pcd file (default: write the ScanNet scene to --out first)")
    ap.add_argument("--data", default=DEFAULT_DATA, help="folder with scannet_scene0000_00.bin (default ../shared/data)")
    ap.add_argument("--out", default=DEFAULT_OUT, help="folder for the .ply and the PNG (default example/output)")
    ap.add_argument("--voxel-size", type=float, default=0.05)
    ap.add_argument("--quick", action="store_true", help="every 4th point only (a smoke test)")
    args = ap.parse_args(argv)
    import open3d as o3d
    out = out_dir(args.out)
    steps = progress(total=5, desc="voxelize_open3d", unit="stage")

    path = args.input
    if path is None:
        points, source = load_scannet(args.data)
        if args.quick:
            points = points[::4]
        path = write_cloud(points, os.path.join(out, "scannet_scene0000_00.ply"))
        print(f"wrote {path} from {source} ({len(points)} points)")
    pcd = o3d.io.read_point_cloud(path)
    xyz = np.asarray(pcd.points)  # float64
    has_colors = pcd.has_colors()
    colors = np.asarray(pcd.colors) if has_colors else np.zeros_like(xyz)
    if len(xyz) == 0:
        raise ValueError(f"{path} holds no points")
    print(f"read {path} with open3d {o3d.__version__}: {len(xyz)} points, colours: {has_colors}")
    steps.update()

    v = args.voxel_size
    lo, hi, size = grid_bounds(xyz, v)
    t0 = time.perf_counter()
    gen = PointToVoxel(vsize_xyz=[v, v, v], coors_range_xyz=[*lo.tolist(), *hi.tolist()], num_point_features=6,
                       max_num_voxels=len(xyz), max_num_points_per_voxel=8)
    pc = torch.from_numpy(np.c_[xyz, colors].astype(np.float32))
    voxels, coords, num, pc_voxel_id = gen.generate_voxel_with_id(pc)
    t_ptv = time.perf_counter() - t0
    # the mean over *all* points of a voxel (voxels[] keeps at most max_num_points_per_voxel of them),
    # accumulated through pc_voxel_id, in float64 as open3d does
    ok = pc_voxel_id >= 0
    count = torch.bincount(pc_voxel_id[ok], minlength=len(coords)).double().unsqueeze(1)
    mean_color = (torch.zeros(len(coords), 3, dtype=torch.float64)
                  .index_add_(0, pc_voxel_id[ok], torch.from_numpy(colors)[ok]) / count.clamp(min=1)).float()
    print(f"PointToVoxel: {len(coords)} voxels of {v} m in a {list(gen.grid_size)} (z, y, x) grid, "
          f"{int((pc_voxel_id < 0).sum())} points dropped, {t_ptv * 1e3:.1f} ms")
    steps.update()

    t0 = time.perf_counter()
    vg = o3d.geometry.VoxelGrid.create_from_point_cloud_within_bounds(pcd, v, lo, hi)
    o3d_voxels = vg.get_voxels()
    o3d_idx = np.array([vx.grid_index for vx in o3d_voxels], dtype=np.int64).reshape(-1, 3)
    o3d_col = np.array([vx.color for vx in o3d_voxels], dtype=np.float64).reshape(-1, 3)
    t_o3d = time.perf_counter() - t0
    inside = ((o3d_idx >= 0) & (o3d_idx < size)).all(1)
    print(f"open3d VoxelGrid: {len(o3d_idx)} voxels ({int((~inside).sum())} outside the grid), "
          f"origin {np.round(vg.origin, 4).tolist()}, {t_o3d * 1e3:.1f} ms")
    steps.update()

    # ---- compare voxel sets: PointToVoxel (z, y, x) -> (x, y, z)
    ptv_idx = coords.numpy()[:, ::-1].astype(np.int64)
    boundary = boundary_points(xyz, lo, v)
    touched = set(map(tuple, boundary_voxels(xyz[boundary], lo, v).tolist()))
    stats = compare(ptv_idx, o3d_idx[inside], touched)
    # per point: PointToVoxel's voxel vs open3d's voxel of the same point (open3d's get_voxel)
    sample = np.arange(len(xyz)) if len(xyz) <= 20000 else np.linspace(0, len(xyz) - 1, 20000).astype(np.int64)
    o3d_point_idx = np.array([vg.get_voxel(xyz[i]) for i in sample], dtype=np.int64)
    ptv_point_idx = ptv_idx[pc_voxel_id.numpy()[sample]]
    point_mismatch = ~(o3d_point_idx == ptv_point_idx).all(1)
    stats["points_checked"] = len(sample)
    stats["point_mismatch"] = int(point_mismatch.sum())
    stats["point_mismatch_not_boundary"] = int((point_mismatch & ~boundary[sample]).sum())
    stats["boundary_points"] = int(boundary.sum())
    stats["outside_grid_open3d"] = int((~inside).sum())
    exact = stats["only_ptv"] == 0 and stats["only_open3d"] == 0
    print(f"voxel sets: {stats['common']} common, {stats['only_ptv']} only in PointToVoxel, {stats['only_open3d']} "
          f"only in open3d -> agreement {stats['agreement'] * 100:.3f}% ({'exact' if exact else 'not exact'})")
    print(f"boundary points (within 1e-4 voxel of a face, where float32 and float64 floors may differ): "
          f"{stats['boundary_points']}; differing voxels not explained by them: {stats['unexplained']}")
    print(f"per point ({stats['points_checked']} checked with VoxelGrid.get_voxel): {stats['point_mismatch']} in a "
          f"different voxel, {stats['point_mismatch_not_boundary']} of them not boundary points")
    if stats["unexplained"] or stats["point_mismatch_not_boundary"]:
        raise AssertionError(f"PointToVoxel and open3d disagree beyond float rounding at voxel faces: {stats}")

    # ---- compare mean colours of the common voxels
    key = lambda idx: (idx[:, 0] * size[1] + idx[:, 1]) * size[2] + idx[:, 2]  # noqa: E731
    o3d_key = key(o3d_idx[inside])
    order = np.argsort(o3d_key)
    pos = np.searchsorted(o3d_key[order], key(ptv_idx))
    pos = np.clip(pos, 0, len(order) - 1)
    # voxels that hold a boundary point may hold different points in the two: leave them out
    clean = np.array([tuple(r) not in touched for r in ptv_idx.tolist()], dtype=bool)
    found = (o3d_key[order][pos] == key(ptv_idx)) & clean
    color_err = 0.0
    if has_colors and found.any():
        color_err = float(np.abs(o3d_col[inside][order][pos][found] - mean_color.numpy()[found]).max())
    stats["color_max_abs_err"] = color_err
    print(f"mean voxel colour vs open3d's (AVG pooling) on {int(found.sum())} common voxels without boundary "
          f"points: max |diff| "
          f"{color_err:.2e}")
    steps.update()

    # ---- per-voxel features back to the points
    point_color = gather_features_by_pc_voxel_id(mean_color, pc_voxel_id)  # [N, 3]
    indices = torch.cat([torch.zeros(len(coords), 1, dtype=torch.int32), coords], 1)
    x = spconv.SparseConvTensor(torch.cat([mean_color, count.float() / 8], 1), indices, gen.grid_size, 1)
    torch.manual_seed(0)
    conv = spconv.SubMConv3d(4, 16, 3, indice_key="subm")
    with torch.no_grad():
        y = conv(x)
    point_feat = gather_features_by_pc_voxel_id(y.features, pc_voxel_id)  # [N, 16]
    gather_ok = bool(torch.equal(point_feat[ok], y.features[pc_voxel_id[ok]])) and \
        bool(torch.equal(point_color[ok], mean_color[pc_voxel_id[ok]]))
    stats["gather_ok"] = gather_ok
    print(f"gather_features_by_pc_voxel_id: voxel colours {list(mean_color.shape)} -> points "
          f"{list(point_color.shape)}, SubMConv3d output {list(y.features.shape)} -> points {list(point_feat.shape)}"
          f"; every point got its own voxel's row: {gather_ok}")

    plt = pyplot()
    png = os.path.join(out, "voxelize_open3d.png")
    fig, axes = plt.subplots(1, 2, figsize=(12, 6))
    order_z = np.argsort(xyz[:, 2])
    for ax, col, title in ((axes[0], colors, "point colours"),
                           (axes[1], point_color.numpy(), f"mean colour of each point's {v} m voxel (gathered)")):
        c = np.clip(col[order_z], 0, 1) if has_colors else xyz[order_z, 2]
        ax.scatter(xyz[order_z, 0], xyz[order_z, 1], c=c, s=1.5, linewidths=0)
        ax.set_aspect("equal")
        ax.set_title(title)
        ax.set_xlabel("x (m)")
        ax.set_ylabel("y (m)")
    fig.suptitle(f"{len(coords)} voxels, open3d agreement {stats['agreement'] * 100:.3f}%")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    steps.update()
    steps.close()
    print(f"wrote {png}")
    stats.update({"png": png, "ply": path, "exact": exact, "num_points": len(xyz)})
    return stats


if __name__ == "__main__":
    main()
