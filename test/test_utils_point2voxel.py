"""spconv.utils.Point2VoxelCPU1d..4d with numpy, torch and cumm tensorview inputs; OpenPCDet's call."""
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import spconv.utils
from spconv.pytorch.utils import PointToVoxel
from spconv.utils import Point2VoxelCPU1d, Point2VoxelCPU2d, Point2VoxelCPU3d, Point2VoxelCPU4d

DATA = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data"))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # ccimport calls locale.getdefaultlocale
        import cumm.tensorview as tv
except ImportError:  # pragma: no cover - scripts/setup.sh installs cumm
    tv = None
needs_tv = pytest.mark.skipif(tv is None, reason="cumm is not installed (pip install cumm; scripts/setup.sh does): "
                                                 "tv.Tensor inputs cannot be tested")

KITTI = dict(vsize_xyz=[0.05, 0.05, 0.1], coors_range_xyz=[0, -40, -3, 70.4, 40, 1], num_point_features=4,
             max_num_voxels=16000, max_num_points_per_voxel=5)


def kitti_points():
    path = os.path.join(DATA, "kitti_000008.bin")
    if os.path.exists(path):
        return np.fromfile(path, dtype=np.float32).reshape(-1, 4)
    g = np.random.default_rng(0)  # a generated stand-in when the shared data folder is absent
    pts = np.stack([g.uniform(0, 70, 20000), g.uniform(-40, 40, 20000), g.uniform(-3, 1, 20000),
                    g.uniform(0, 1, 20000)], 1).astype(np.float32)
    return np.concatenate([pts, pts[:5000] + 0.01])


def reference(points, cfg, empty_mean=False):
    gen = PointToVoxel(cfg["vsize_xyz"], cfg["coors_range_xyz"], cfg["num_point_features"], cfg["max_num_voxels"],
                       cfg["max_num_points_per_voxel"])
    return [t.numpy() for t in gen(torch.from_numpy(points), empty_mean=empty_mean)]


@needs_tv
def test_openpcdet_call_pattern():
    # pcdet/datasets/processor/data_processor.py (VoxelGeneratorWrapper, spconv 2.x branch)
    points = kitti_points()
    voxel_generator = Point2VoxelCPU3d(**KITTI)
    voxel_output = voxel_generator.point_to_voxel(tv.from_numpy(points))
    tv_voxels, tv_coordinates, tv_num_points = voxel_output
    voxels = tv_voxels.numpy()
    coordinates = tv_coordinates.numpy()
    num_points = tv_num_points.numpy()
    assert isinstance(tv_voxels, tv.Tensor)
    assert voxels.dtype == np.float32 and coordinates.dtype == np.int32 and num_points.dtype == np.int32
    assert voxels.shape[1:] == (5, 4) and coordinates.shape[1] == 3 and len(num_points) == len(voxels)
    exp = reference(points, KITTI)
    for got, e in zip([voxels, coordinates, num_points], exp):
        np.testing.assert_array_equal(got, e)
    assert voxel_generator.grid_size == [40, 1600, 1408]
    # results own their memory: a second call does not change the first one's arrays
    first = tv_voxels.numpy().copy()
    reversed_points = points[::-1].copy()
    voxel_generator.point_to_voxel(tv.from_numpy(reversed_points))
    np.testing.assert_array_equal(tv_voxels.numpy(), first)


@needs_tv
def test_tv_inputs_float64_empty_mean_and_empty():
    points = kitti_points()
    gen = Point2VoxelCPU3d(**KITTI)
    points64 = points.astype(np.float64)  # tv.from_numpy does not keep its array alive: hold it
    out = gen.point_to_voxel_empty_mean(tv.from_numpy(points64))
    exp = reference(points.astype(np.float64), KITTI, empty_mean=True)
    for got, e in zip(out, exp):
        np.testing.assert_array_equal(got.numpy(), e)
    empty = np.zeros((0, 4), np.float32)
    out = gen.point_to_voxel(tv.from_numpy(empty))
    assert [t.numpy().shape for t in out] == [(0, 5, 4), (0, 3), (0,)]
    assert [t.shape for t in out] == [[0, 5, 4], [0, 3], [0]]
    assert gen.voxels is out[0] and gen.indices is out[1] and gen.num_per_voxel is out[2]
    ints, three = np.zeros((4, 4), np.int32), np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match="float32 or float64"):
        gen.point_to_voxel(tv.from_numpy(ints))
    with pytest.raises(ValueError, match="num_point_features"):
        gen.point_to_voxel(tv.from_numpy(three))


def test_numpy_and_torch_inputs():
    points = kitti_points()
    gen = Point2VoxelCPU3d(**KITTI)
    exp = reference(points, KITTI)
    for inp in [points, torch.from_numpy(points), np.asfortranarray(points)]:
        out = gen.point_to_voxel(inp)
        assert all(isinstance(t, torch.Tensor) for t in out)
        for got, e in zip(out, exp):
            np.testing.assert_array_equal(got.numpy(), e)  # .numpy() works as on tv tensors
    exp_mean = reference(points, KITTI, empty_mean=True)
    for got, e in zip(gen.point_to_voxel_empty_mean(points, clear_voxels=False), exp_mean):
        np.testing.assert_array_equal(got.numpy(), e)
    with pytest.raises(TypeError, match="numpy array"):
        gen.point_to_voxel(points.tolist())


def test_1d_to_4d_classes_and_meta():
    g = np.random.default_rng(2)
    for cls, ndim in [(Point2VoxelCPU1d, 1), (Point2VoxelCPU2d, 2), (Point2VoxelCPU3d, 3), (Point2VoxelCPU4d, 4)]:
        pts = g.uniform(0, 2, size=(3000, ndim + 1)).astype(np.float32)
        cfg = dict(vsize_xyz=[0.25] * ndim, coors_range_xyz=[0] * ndim + [2] * ndim, num_point_features=ndim + 1,
                   max_num_voxels=5000, max_num_points_per_voxel=3)
        gen = cls(**cfg)
        assert gen.grid_size == [8] * ndim
        for got, e in zip(gen.point_to_voxel(pts), reference(pts, cfg)):
            np.testing.assert_array_equal(got.numpy(), e)
        with pytest.raises(ValueError, match=f"needs {ndim} voxel sizes"):
            cls([0.25] * (ndim + 1), [0] * (ndim + 1) + [2] * (ndim + 1), ndim + 2, 10, 3)
    vsize, grid, stride, rng = Point2VoxelCPU3d.calc_meta_data([0.1, 0.1, 0.15], [-75.2, -75.2, -2, 75.2, 75.2, 4])
    assert grid == [40, 1504, 1504] and stride == [2262016, 1504, 1]


def test_nan_points_counted():
    pts = np.array([[1, 1, 0, 0], [np.nan, 1, 0, 0], [1, np.inf, 0, 0]], np.float32)
    gen = Point2VoxelCPU3d(**KITTI)
    voxels, coords, num = gen.point_to_voxel(pts)
    assert len(voxels) == 1 and gen.num_invalid_points == 2


def test_nullcontext():
    with spconv.utils.nullcontext(5) as x:
        assert x == 5


def test_works_without_cumm():
    # cumm is imported lazily: with it unavailable, numpy/torch inputs still work
    code = (
        "import sys; sys.modules['cumm'] = None; sys.modules['cumm.tensorview'] = None\n"
        "import numpy as np\n"
        "from spconv.utils import Point2VoxelCPU3d\n"
        "g = Point2VoxelCPU3d([1, 1, 1], [0, 0, 0, 4, 4, 4], 3, 10, 2)\n"
        "v, i, n = g.point_to_voxel(np.array([[0.5, 0.5, 0.5], [2.5, 0.5, 0.5]], np.float32))\n"
        "assert v.numpy().shape == (2, 2, 3) and i.numpy().tolist() == [[0, 0, 0], [0, 0, 2]]\n"
        "print('ok')\n")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
