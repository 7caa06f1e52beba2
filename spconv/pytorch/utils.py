"""Point clouds in: PointToVoxel (voxelisation) and gather_features_by_pc_voxel_id."""
from typing import List, Tuple

import numpy as np
import torch


class PointToVoxel:
    """Groups points into voxels, as spconv's CPU PointToVoxel does.

    Args:
        vsize_xyz: voxel size per axis (x, y, z, ...), 1-4 axes.
        coors_range_xyz: ``[xmin, ymin, zmin, xmax, ymax, zmax]`` (2 x ndim values).
        num_point_features: columns of the point array (x, y, z first).
        max_num_voxels: voxels kept, in order of first appearance.
        max_num_points_per_voxel: points stored per voxel, in input order.
    ``grid_size``, ``vsize`` and ``coors_range`` are in reversed (z, y, x) order, as spconv has them.
    """

    def __init__(self, vsize_xyz: List[float], coors_range_xyz: List[float], num_point_features: int,
                 max_num_voxels: int, max_num_points_per_voxel: int, device: torch.device = torch.device("cpu:0")):
        ndim = len(vsize_xyz)
        if not 1 <= ndim <= 4:
            raise ValueError(f"vsize_xyz must have 1-4 entries, got {len(vsize_xyz)}")
        if len(coors_range_xyz) != 2 * ndim:
            raise ValueError(f"coors_range_xyz must have {2 * ndim} entries (mins then maxs), got {len(coors_range_xyz)}")
        if any(v <= 0 for v in vsize_xyz):
            raise ValueError(f"voxel sizes must be > 0, got {list(vsize_xyz)}")
        for i in range(ndim):
            if not coors_range_xyz[i] < coors_range_xyz[ndim + i]:
                raise ValueError(f"coors_range_xyz: min {coors_range_xyz[i]} must be < max "
                                 f"{coors_range_xyz[ndim + i]} on axis {i}")
        if num_point_features < ndim:
            raise ValueError(f"num_point_features ({num_point_features}) must be >= the number of axes ({ndim})")
        if max_num_voxels <= 0 or max_num_points_per_voxel <= 0:
            raise ValueError("max_num_voxels and max_num_points_per_voxel must be positive")
        self.ndim = ndim
        self.device = torch.device(device)
        self.num_point_features = num_point_features
        self.max_num_voxels = max_num_voxels
        self.max_num_points_per_voxel = max_num_points_per_voxel
        self.vsize = [float(v) for v in vsize_xyz[::-1]]
        mins = [float(v) for v in coors_range_xyz[:ndim]][::-1]
        maxs = [float(v) for v in coors_range_xyz[ndim:]][::-1]
        self.coors_range = mins + maxs
        self.grid_size = [int(round((hi - lo) / vs)) for lo, hi, vs in zip(mins, maxs, self.vsize)]
        volume = int(np.prod(self.grid_size))
        if volume >= 2 ** 31 - 1:
            raise ValueError(f"grid {self.grid_size} has {volume} cells, too many for int32 voxel indices: use larger "
                             "voxels or a smaller range")
        self.grid_stride = [int(np.prod(self.grid_size[i + 1:])) for i in range(ndim)]

    def __call__(self, pc: torch.Tensor, clear_voxels: bool = True, empty_mean: bool = False):
        """pc ``[N, num_point_features]`` -> (voxels ``[M, max_points, F]``, indices ``[M, ndim]`` int32 ZYX,
        num_points_per_voxel ``[M]`` int32)."""
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
        n, ndim = pc.shape[0], self.ndim
        xyz = pc[:, :ndim].float().flip(1)  # z, y, x; float32 arithmetic, as spconv's kernel
        lo = torch.tensor(self.coors_range[:ndim], dtype=torch.float32)
        vs = torch.tensor(self.vsize, dtype=torch.float32)
        grid = torch.tensor(self.grid_size, dtype=torch.int64)
        coords = torch.floor((xyz - lo) / vs)
        valid = torch.isfinite(coords).all(1)
        coords = torch.where(valid.unsqueeze(1), coords, torch.zeros_like(coords)).long()
        valid &= ((coords >= 0) & (coords < grid)).all(1)
        key = (coords * torch.tensor(self.grid_stride, dtype=torch.int64)).sum(1)
        pid = torch.nonzero(valid).squeeze(1)
        vkeys = key[pid]
        uniq, inverse = torch.unique(vkeys, return_inverse=True)
        # first appearance of each voxel decides its row (points are scanned in input order)
        first = torch.full((len(uniq),), n, dtype=torch.int64).scatter_reduce_(0, inverse, pid, "amin")
        order = torch.argsort(first)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(len(order))
        vid = rank[inverse]  # voxel row of each valid point, before the cap
        keep_voxel = vid < self.max_num_voxels
        num_vox = min(len(uniq), self.max_num_voxels)
        pid, vid = pid[keep_voxel], vid[keep_voxel]
        # position of each point inside its voxel, in input order
        sort = torch.argsort(vid, stable=True)
        vid_sorted = vid[sort]
        counts = torch.bincount(vid_sorted, minlength=num_vox)
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(len(vid_sorted)) - starts[vid_sorted]
        stored = slot < self.max_num_points_per_voxel
        voxels = pc.new_zeros((num_vox, self.max_num_points_per_voxel, pc.shape[1]), dtype=torch.float32)
        voxels[vid_sorted[stored], slot[stored]] = pc[pid[sort][stored]].float()
        num_per_voxel = counts.clamp(max=self.max_num_points_per_voxel).int()
        if empty_mean and num_vox > 0:
            mean = voxels.sum(1) / num_per_voxel.clamp(min=1).unsqueeze(1).float()
            empty = torch.arange(self.max_num_points_per_voxel).unsqueeze(0) >= num_per_voxel.unsqueeze(1)
            voxels = torch.where(empty.unsqueeze(2), mean.unsqueeze(1), voxels)
        indices = torch.empty((num_vox, ndim), dtype=torch.int32)
        voxel_coords = coords[pid[sort]][slot == 0] if num_vox > 0 else indices.long()
        indices[vid_sorted[slot == 0]] = voxel_coords.int()
        pc_voxel_id = torch.full((n,), -1, dtype=torch.int64)
        pc_voxel_id[pid] = vid
        return voxels, indices, num_per_voxel, pc_voxel_id


def gather_features_by_pc_voxel_id(seg_res_features: torch.Tensor, pc_voxel_id: torch.Tensor,
                                   invalid_value=0) -> torch.Tensor:
    """Per-point features ``[N_points, ...]`` from per-voxel ones; points with id -1 get invalid_value."""
    pc_voxel_id = pc_voxel_id.to(seg_res_features.device)
    valid = pc_voxel_id != -1
    res = seg_res_features.new_full((pc_voxel_id.shape[0], *seg_res_features.shape[1:]), invalid_value)
    res[valid] = seg_res_features[pc_voxel_id[valid]]
    return res
