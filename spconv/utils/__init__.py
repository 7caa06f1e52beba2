"""spconv 2.x's ``spconv.utils``: ``Point2VoxelCPU1d..4d`` (the voxel generators OpenPCDet uses).

spconv's versions take and return cumm ``tensorview`` tensors. These accept a ``tv.Tensor``, a numpy
array or a torch tensor, and return ``tv.Tensor``s for ``tv`` input and torch tensors otherwise; all
have ``.numpy()``, so OpenPCDet's

    voxels, coordinates, num_points = Point2VoxelCPU3d(...).point_to_voxel(tv.from_numpy(points))
    voxels = voxels.numpy()

works unchanged. cumm is imported only when a ``tv.Tensor`` comes in or goes out, so this module works
without it. Differences from spconv 2.3.8: results are fresh tensors, not views into buffers that the
next call overwrites; unused point slots are always zero (``clear_voxels`` has no effect); the empty
mean is the true mean of the voxel's points (see ``spconv.pytorch.utils.PointToVoxel``). The rotated-box
helpers of spconv's ``spconv.utils`` (``rbbox_iou``, ``non_max_suppression_cpu``, ...) are not provided.
"""
from contextlib import AbstractContextManager
from typing import List, Sequence, Tuple

import numpy as np
import torch

from spconv.pytorch.utils import PointToVoxel, calc_point2voxel_meta_data

__all__ = ["Point2VoxelCPU1d", "Point2VoxelCPU2d", "Point2VoxelCPU3d", "Point2VoxelCPU4d", "nullcontext"]


def _is_tv_tensor(x) -> bool:
    return type(x).__module__.startswith("cumm") and hasattr(x, "numpy_view")


def _to_torch(points) -> Tuple[torch.Tensor, bool]:
    """(CPU torch view of the points, whether they came as a tv.Tensor)."""
    if isinstance(points, torch.Tensor):
        return points, False
    if isinstance(points, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(points)), False
    if _is_tv_tensor(points):
        if points.device != -1:
            raise ValueError(f"points: a tv.Tensor on GPU {points.device} was given; Point2VoxelCPU needs CPU "
                             "points (tv.from_numpy(array) or .cpu())")
        return torch.from_numpy(points.numpy_view()), True
    raise TypeError(f"points must be a cumm tv.Tensor, a numpy array or a torch tensor, got {type(points).__name__}")


def _to_tv(t: torch.Tensor):
    import cumm.tensorview as tv  # only reached for tv input, so cumm is installed

    dtype = {torch.float32: tv.float32, torch.int32: tv.int32, torch.int64: tv.int64}[t.dtype]
    out = tv.zeros(list(t.shape), dtype, -1)  # owns its memory (tv.from_numpy would not)
    if t.numel():
        out.numpy_view()[...] = t.numpy()
    return out


class _Point2VoxelCPU:
    """``Point2VoxelCPU{ndim}d(vsize_xyz, coors_range_xyz, num_point_features, max_num_voxels,
    max_num_points_per_voxel)``: see ``spconv.pytorch.utils.PointToVoxel`` for the semantics."""

    _ndim = 0

    def __init__(self, vsize_xyz: Sequence[float], coors_range_xyz: Sequence[float], num_point_features: int,
                 max_num_voxels: int, max_num_points_per_voxel: int):
        name = type(self).__name__
        if len(vsize_xyz) != self._ndim or len(coors_range_xyz) != 2 * self._ndim:
            raise ValueError(f"{name} needs {self._ndim} voxel sizes and {2 * self._ndim} range values, got "
                             f"vsize_xyz={list(vsize_xyz)}, coors_range_xyz={list(coors_range_xyz)}")
        self._gen = PointToVoxel(vsize_xyz, coors_range_xyz, num_point_features, max_num_voxels,
                                 max_num_points_per_voxel)
        self._last = None

    @staticmethod
    def calc_meta_data(vsize_xyz: Sequence[float], coors_range_xyz: Sequence[float]
                       ) -> Tuple[List[float], List[int], List[int], List[float]]:
        """``(vsize, grid_size, grid_stride, coors_range)``, all in ZYX order."""
        return calc_point2voxel_meta_data(vsize_xyz, coors_range_xyz)

    @property
    def grid_size(self) -> List[int]:
        """Cells per axis, ZYX."""
        return list(self._gen.grid_size)

    @property
    def num_invalid_points(self) -> int:
        """Points with NaN/inf coordinates dropped by the last call."""
        return self._gen.num_invalid_points

    @property
    def voxels(self):
        """Voxels of the last call (spconv exposes its persistent buffer here)."""
        return None if self._last is None else self._last[0]

    @property
    def indices(self):
        return None if self._last is None else self._last[1]

    @property
    def num_per_voxel(self):
        return None if self._last is None else self._last[2]

    def _run(self, points, empty_mean: bool):
        pc, was_tv = _to_torch(points)
        voxels, indices, num_per_voxel, _ = self._gen.generate_voxel_with_id(pc, empty_mean=empty_mean)
        res = (voxels, indices, num_per_voxel)
        if was_tv:
            res = tuple(_to_tv(t) for t in res)
        self._last = res
        return res

    def point_to_voxel(self, points, clear_voxels: bool = True):
        """``points [N, num_point_features]`` -> ``(voxels [M, max_points, F] float32, indices [M, ndim] int32
        (z, y, x), num_per_voxel [M] int32)``, as tv.Tensors for tv input, else torch tensors."""
        return self._run(points, False)

    def point_to_voxel_empty_mean(self, points, clear_voxels: bool = True):
        """As :meth:`point_to_voxel`, with each voxel's unused point slots set to the mean of its points."""
        return self._run(points, True)


class Point2VoxelCPU1d(_Point2VoxelCPU):
    _ndim = 1


class Point2VoxelCPU2d(_Point2VoxelCPU):
    _ndim = 2


class Point2VoxelCPU3d(_Point2VoxelCPU):
    _ndim = 3


class Point2VoxelCPU4d(_Point2VoxelCPU):
    _ndim = 4


class nullcontext(AbstractContextManager):
    """Context manager that does nothing (spconv.utils exports one)."""

    def __init__(self, enter_result=None):
        self.enter_result = enter_result

    def __enter__(self):
        return self.enter_result

    def __exit__(self, *excinfo):
        pass
