"""Point clouds in: PointToVoxel (voxelisation) and gather_features_by_pc_voxel_id.

The work is done by the C++ op ``torch.ops.spconv.point_to_voxel`` (src/point_to_voxel.cpp).
"""
import math
from typing import List, Sequence, Tuple

import numpy as np
import torch

import spconv._C  # noqa: F401  (registers torch.ops.spconv.*)

_AXES = "xyzw"


def calc_point2voxel_meta_data(vsize_xyz: Sequence[float], coors_range_xyz: Sequence[float]
                               ) -> Tuple[List[float], List[int], List[int], List[float]]:
    """``(vsize, grid_size, grid_stride, coors_range)`` in ZYX order, computed as spconv does.

    Sizes and ranges are rounded to float32 first; ``grid_size[i] = round((max_i - min_i) / vsize_i)``
    in float32 with C's round-half-away-from-zero; ``grid_stride`` is row-major. Raises
    ``ValueError`` for a wrong number of entries, non-finite values, voxel sizes <= 0, ranges with
    ``min >= max``, an axis with 0 cells, and grids whose axes do not fit int32 indices.
    """
    ndim = len(vsize_xyz)
    if not 1 <= ndim <= 4:
        raise ValueError(f"vsize_xyz must have 1 to 4 entries (one voxel size per axis), got {len(vsize_xyz)}")
    if len(coors_range_xyz) != 2 * ndim:
        raise ValueError(f"coors_range_xyz must have {2 * ndim} entries ([mins..., maxs...] for {ndim} axes), "
                         f"got {len(coors_range_xyz)}")
    with np.errstate(all="ignore"):
        vs = np.asarray(vsize_xyz, dtype=np.float64).astype(np.float32)
        rng = np.asarray(coors_range_xyz, dtype=np.float64).astype(np.float32)
    if not (np.isfinite(vs).all() and np.isfinite(rng).all()):
        raise ValueError(f"vsize_xyz {list(vsize_xyz)} and coors_range_xyz {list(coors_range_xyz)} must be finite")
    if not (vs > 0).all():
        raise ValueError(f"voxel sizes must be > 0 (in float32), got vsize_xyz={list(vsize_xyz)}")
    lo, hi = rng[:ndim], rng[ndim:]
    for i in range(ndim):
        if not lo[i] < hi[i]:
            raise ValueError(f"coors_range_xyz: min {coors_range_xyz[i]} must be < max {coors_range_xyz[ndim + i]} "
                             f"on axis {_AXES[i]} (the layout is [xmin, ymin, zmin, xmax, ymax, zmax])")
    with np.errstate(all="ignore"):
        cells = (hi - lo) / vs  # float32, as spconv
    grid_xyz = []
    for i in range(ndim):
        c = float(cells[i])
        g = math.floor(c + 0.5) if math.isfinite(c) else math.inf  # std::round (c > 0)
        if g < 1:
            raise ValueError(f"axis {_AXES[i]}: range {float(hi[i] - lo[i])} holds {c:.3g} voxels of size "
                             f"{float(vs[i])}, which rounds to 0 cells: use a voxel size <= the range")
        if g > 2 ** 31 - 1:
            raise ValueError(f"axis {_AXES[i]}: {g:.4g} cells is too large for int32 voxel indices (max 2^31-1): "
                             "use larger voxels or a smaller coors_range_xyz")
        grid_xyz.append(int(g))
    grid_size = grid_xyz[::-1]
    volume = 1
    for g in grid_size:
        volume *= g
    if volume >= 2 ** 61:
        raise ValueError(f"grid {grid_size} has {volume} cells, too many for int64 voxel keys: use larger voxels "
                         "or a smaller coors_range_xyz")
    grid_stride = [1] * ndim
    for i in range(ndim - 2, -1, -1):
        grid_stride[i] = grid_stride[i + 1] * grid_size[i + 1]
    vsize = [float(v) for v in vs[::-1]]
    coors_range = [float(v) for v in lo[::-1]] + [float(v) for v in hi[::-1]]
    return vsize, grid_size, grid_stride, coors_range


def point_to_voxel(points: torch.Tensor, vsize: List[float], grid_size: List[int], coors_range: List[float],
                   max_num_voxels: int, max_num_points_per_voxel: int, empty_mean: bool = False):
    """Functional form on ZYX meta data (see :func:`calc_point2voxel_meta_data`).

    Returns ``(voxels [M, P, F] float32, indices [M, ndim] int32 ZYX, num_points_per_voxel [M] int32,
    pc_voxel_id [N] int64, num_invalid_points int)``.
    """
    if points.device.type != "cpu":
        raise NotImplementedError(f"PointToVoxel: points on '{points.device}' are not supported yet (PointToVoxel has "
                                  "no GPU kernel, only a CPU one); voxelise on the CPU with points.cpu() and move "
                                  "the voxels to the device")
    return torch.ops.spconv.point_to_voxel(points, [float(v) for v in vsize], [int(g) for g in grid_size],
                                           [float(v) for v in coors_range], int(max_num_voxels),
                                           int(max_num_points_per_voxel), bool(empty_mean))


class PointToVoxel:
    """Groups points into voxels, with the result of spconv 2.x's CPU ``PointToVoxel``.

    Args:
        vsize_xyz: voxel size per axis (x, y, z, ...), 1-4 axes.
        coors_range_xyz: ``[xmin, ymin, zmin, xmax, ymax, zmax]`` (2 x ndim values).
        num_point_features: columns of the point array (x, y, z first); ``pc.shape[1]`` must equal it.
        max_num_voxels: voxels kept, in order of first appearance; points of later voxels get id -1.
        max_num_points_per_voxel: points stored per voxel, in input order; later points of a full
            voxel are not stored but still get its id in ``pc_voxel_id``.
        device: only the CPU is supported.

    ``grid_size``, ``grid_stride``, ``vsize`` and ``coors_range`` are in reversed (z, y, x) order and
    float32-rounded, as spconv has them. A point's cell is
    ``floor((p[ndim-1-j] - coors_range[j]) / vsize[j])``, computed in float32 for float32 points (in
    float64 with the float32 constants for float64 points, as spconv's CPU code does); points outside
    ``[0, grid_size)`` on any axis are dropped. Points with NaN or infinite coordinates are dropped
    too, and ``num_invalid_points`` holds how many the last call dropped for that reason.

    Differences from spconv 2.3.8: outputs are fresh tensors whose unused point slots are zero
    (``clear_voxels`` is accepted and has no effect); ``empty_mean`` fills unused slots with the
    true mean of the voxel's stored points (spconv's CPU code adds the previous voxel's mean into
    it); no dense ``[grid]`` int32 table is allocated (spconv's takes 370 MB for the Waymo set-up).
    """

    def __init__(self, vsize_xyz: List[float], coors_range_xyz: List[float], num_point_features: int,
                 max_num_voxels: int, max_num_points_per_voxel: int, device: torch.device = torch.device("cpu:0")):
        self.device = torch.device(device)
        if self.device.type != "cpu":
            raise NotImplementedError(f"PointToVoxel on '{self.device}' is not supported yet (PointToVoxel has no GPU "
                                      "kernel, only a CPU one); use device='cpu' and move the voxels to the device")
        vsize, grid_size, grid_stride, coors_range = calc_point2voxel_meta_data(vsize_xyz, coors_range_xyz)
        self.ndim = len(vsize)
        if int(num_point_features) < self.ndim:
            raise ValueError(f"num_point_features ({num_point_features}) must be >= the number of axes ({self.ndim})")
        if int(max_num_voxels) <= 0 or int(max_num_points_per_voxel) <= 0:
            raise ValueError(f"max_num_voxels ({max_num_voxels}) and max_num_points_per_voxel "
                             f"({max_num_points_per_voxel}) must be positive")
        self.num_point_features = int(num_point_features)
        self.max_num_voxels = int(max_num_voxels)
        self.max_num_points_per_voxel = int(max_num_points_per_voxel)
        self.vsize = vsize
        self.grid_size = grid_size
        self.grid_stride = grid_stride
        self.coors_range = coors_range
        self.num_invalid_points = 0

    def __call__(self, pc: torch.Tensor, clear_voxels: bool = True, empty_mean: bool = False):
        """pc ``[N, num_point_features]`` -> (voxels ``[M, max_points, F]`` float32, indices ``[M, ndim]``
        int32 ZYX, num_points_per_voxel ``[M]`` int32)."""
        res = self.generate_voxel_with_id(pc, clear_voxels, empty_mean)
        return res[0], res[1], res[2]

    @torch.no_grad()
    def generate_voxel_with_id(self, pc: torch.Tensor, clear_voxels: bool = True, empty_mean: bool = False):
        """As ``__call__``, plus ``pc_voxel_id [N]`` int64: each point's voxel row, -1 when dropped."""
        if not isinstance(pc, torch.Tensor):
            pc = torch.as_tensor(np.asarray(pc))
        if pc.device.type != self.device.type:
            raise ValueError(f"points are on {pc.device} but this PointToVoxel was built for {self.device}")
        if pc.dim() != 2 or pc.shape[1] != self.num_point_features:
            raise ValueError(f"points must be [N, {self.num_point_features}] (num_point_features), got "
                             f"{tuple(pc.shape)}")
        if pc.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"points must be float32 or float64, got {pc.dtype}")
        voxels, indices, num_per_voxel, pc_voxel_id, num_invalid = point_to_voxel(
            pc, self.vsize, self.grid_size, self.coors_range, self.max_num_voxels, self.max_num_points_per_voxel,
            empty_mean)
        self.num_invalid_points = int(num_invalid)
        return voxels, indices, num_per_voxel, pc_voxel_id


def gather_features_by_pc_voxel_id(seg_res_features: torch.Tensor, pc_voxel_id: torch.Tensor,
                                   invalid_value=0) -> torch.Tensor:
    """Per-point features ``[N_points, ...]`` from per-voxel ones; points with id -1 get invalid_value."""
    pc_voxel_id = pc_voxel_id.to(seg_res_features.device)
    valid = pc_voxel_id != -1
    res = seg_res_features.new_full((pc_voxel_id.shape[0], *seg_res_features.shape[1:]), invalid_value)
    res[valid] = seg_res_features[pc_voxel_id[valid]]
    return res
