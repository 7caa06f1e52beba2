"""PointToVoxel (C++ op torch.ops.spconv.point_to_voxel) against independent numpy and plain-python
references, on the real scans in ../../shared/data and on generated points.

The numpy reference floors float32 coordinates (as spconv does) and groups them with np.unique;
the python reference is spconv's CPU loop, written out point by point.
"""
import math
import os

import numpy as np
import pytest
import torch

from spconv.pytorch.utils import PointToVoxel, calc_point2voxel_meta_data, gather_features_by_pc_voxel_id

DATA = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data"))

# (file, loader, vsize_xyz, coors_range_xyz, max_voxels, max_points): the set-ups of data/README.md
SCANS = {
    "kitti": ([0.05, 0.05, 0.1], [0, -40, -3, 70.4, 40, 1], 40000, 5),
    "nuscenes": ([0.075, 0.075, 0.2], [-54, -54, -5, 54, 54, 3], 60000, 10),
    "waymo": ([0.1, 0.1, 0.15], [-75.2, -75.2, -2, 75.2, 75.2, 4], 150000, 5),
}


def load_scan(name):
    files = {"kitti": "kitti_000008.bin", "nuscenes": "nuscenes_lidar_top.bin", "waymo": "waymo_like_198k.npz"}
    path = os.path.join(DATA, files[name])
    if not os.path.exists(path):
        pytest.skip(f"real scan {path} not found (the shared data folder ../../shared/data is absent)")
    if name == "kitti":
        return np.fromfile(path, dtype=np.float32).reshape(-1, 4)
    if name == "nuscenes":
        return np.fromfile(path, dtype=np.float32).reshape(-1, 5)
    return np.load(path)["pc"]


def numpy_cells(points, vsize_xyz, coors_range_xyz):
    """(cells [N, ndim] int64 ZYX, valid [N] bool, grid ZYX): floor((p - min) / vsize) in the points'
    precision with float32 constants; valid when inside the grid on every axis (NaN/inf never are)."""
    ndim = len(vsize_xyz)
    vs = np.asarray(vsize_xyz, np.float32)[::-1]
    lo = np.asarray(coors_range_xyz[:ndim], np.float32)[::-1]
    hi = np.asarray(coors_range_xyz[ndim:], np.float32)[::-1]
    grid = np.floor(((hi - lo) / vs).astype(np.float64) + 0.5).astype(np.int64)  # float32 division, C round
    xyz = points[:, :ndim][:, ::-1]
    with np.errstate(invalid="ignore", over="ignore"):
        t = np.floor((xyz - lo.astype(points.dtype)) / vs.astype(points.dtype))
        valid = np.isfinite(t).all(1) & (t >= 0).all(1) & (t < grid).all(1)
    cells = np.where(valid[:, None], t, 0).astype(np.int64)
    return cells, valid, grid


def numpy_voxels(points, vsize_xyz, coors_range_xyz, max_voxels, max_points):
    """Independent result: (indices [M, ndim], counts [M], pc_voxel_id [N], slot [N]) with voxels in order
    of first appearance (np.unique's first index), capped like spconv."""
    cells, valid, grid = numpy_cells(points, vsize_xyz, coors_range_xyz)
    pid = np.nonzero(valid)[0]
    uniq, first, inverse, counts = np.unique(cells[pid], axis=0, return_index=True, return_inverse=True,
                                             return_counts=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    keep = order[:max_voxels]
    indices = uniq[keep]
    vid = rank[inverse]
    pc_voxel_id = np.full(len(points), -1, np.int64)
    pc_voxel_id[pid] = np.where(vid < max_voxels, vid, -1)
    # slot: position of each point among its voxel's points, in input order
    slot = np.full(len(points), -1, np.int64)
    srt = np.argsort(vid, kind="stable")
    vs_sorted = vid[srt]
    starts = np.searchsorted(vs_sorted, vs_sorted, side="left")
    slot[pid[srt]] = np.arange(len(srt)) - starts
    return indices, np.minimum(counts[keep], max_points), pc_voxel_id, slot


def python_loop_reference(points, vsize_xyz, coors_range_xyz, max_voxels, max_points, empty_mean=False):
    """spconv's CPU algorithm, one point at a time (first-appearance order, per-voxel input order)."""
    ndim = len(vsize_xyz)
    cells, valid, _ = numpy_cells(points, vsize_xyz, coors_range_xyz)
    table, indices, stored = {}, [], []
    pc_voxel_id = []
    for i in range(len(points)):
        if not valid[i]:
            pc_voxel_id.append(-1)
            continue
        key = tuple(int(c) for c in cells[i])
        v = table.get(key)
        if v is None:
            if len(indices) >= max_voxels:
                pc_voxel_id.append(-1)
                continue
            v = table[key] = len(indices)
            indices.append(key)
            stored.append([])
        pc_voxel_id.append(v)
        if len(stored[v]) < max_points:
            stored[v].append(points[i].astype(np.float32))
    f = points.shape[1]
    voxels = np.zeros((len(indices), max_points, f), np.float32)
    for v, rows in enumerate(stored):
        voxels[v, :len(rows)] = rows
        if empty_mean and len(rows) < max_points:
            voxels[v, len(rows):] = np.mean(np.stack(rows), 0, dtype=np.float32)
    return (voxels, np.asarray(indices, np.int32).reshape(-1, ndim), np.asarray([len(r) for r in stored], np.int32),
            np.asarray(pc_voxel_id, np.int64))


def run(points, vsize, rng, max_voxels, max_points, empty_mean=False):
    gen = PointToVoxel(vsize, rng, points.shape[1], max_voxels, max_points)
    out = gen.generate_voxel_with_id(torch.from_numpy(points), empty_mean=empty_mean)
    return gen, [t.numpy() for t in out]


def check_against_numpy(points, vsize, rng, max_voxels, max_points):
    gen, (voxels, indices, counts, pc_voxel_id) = run(points, vsize, rng, max_voxels, max_points)
    exp_idx, exp_counts, exp_id, slot = numpy_voxels(points, vsize, rng, max_voxels, max_points)
    assert indices.dtype == np.int32 and counts.dtype == np.int32 and pc_voxel_id.dtype == np.int64
    assert voxels.dtype == np.float32 and voxels.shape == (len(exp_idx), max_points, points.shape[1])
    np.testing.assert_array_equal(indices, exp_idx)  # same set, same first-appearance order
    np.testing.assert_array_equal(counts, exp_counts)
    np.testing.assert_array_equal(pc_voxel_id, exp_id)
    # every stored point sits at its slot; everything else in the voxel is zero
    stored = (pc_voxel_id >= 0) & (slot < max_points)
    np.testing.assert_array_equal(voxels[pc_voxel_id[stored], slot[stored]], points[stored].astype(np.float32))
    mask = np.arange(max_points)[None, :] < counts[:, None]
    assert not voxels[~mask].any()
    return gen, indices


@pytest.mark.parametrize("scan", ["kitti", "nuscenes", "waymo"])
def test_real_scan_matches_numpy(scan):
    points = load_scan(scan)
    vsize, rng, max_voxels, max_points = SCANS[scan]
    gen, indices = check_against_numpy(points, vsize, rng, max_voxels, max_points)
    assert gen.num_invalid_points == 0
    assert len(indices) > 1000
    # points outside the range get -1 and no voxel
    cells, valid, grid = numpy_cells(points, vsize, rng)
    assert (~valid).sum() > 0  # every scan has points outside its set-up's range
    assert gen.grid_size == [int(g) for g in grid]


def test_waymo_voxel_count_and_meta():
    points = load_scan("waymo")
    gen, (voxels, indices, counts, _) = run(points, *SCANS["waymo"])
    assert gen.grid_size == [40, 1504, 1504]
    assert gen.grid_stride == [2262016, 1504, 1]
    assert len(indices) == 114940  # "about 115k voxels" (data/README.md); spconv 2.3.8 gives 114940 too


@pytest.mark.parametrize("scan", ["kitti", "nuscenes", "waymo"])
def test_real_scan_order_matches_python_loop(scan):
    points = load_scan(scan)
    vsize, rng, _, _ = SCANS[scan]
    sub = np.concatenate([points[:2500], points[2500::23]])
    for max_voxels, max_points in [(100000, 5), (400, 2), (50000, 1)]:
        _, got = run(sub, vsize, rng, max_voxels, max_points)
        exp = python_loop_reference(sub, vsize, rng, max_voxels, max_points)
        for g, e in zip(got, exp):
            np.testing.assert_array_equal(g, e)


@pytest.mark.parametrize("scan", ["kitti", "waymo"])
def test_caps_on_real_scans(scan):
    points = load_scan(scan)
    vsize, rng, _, _ = SCANS[scan]
    _, (_, indices, counts, pc_voxel_id) = run(points, vsize, rng, 1000000, 1000)
    full = len(indices)
    for max_voxels, max_points in [(full // 3, 1), (full // 7, 2), (full, 3), (5, 100)]:
        _, ind = check_against_numpy(points, vsize, rng, max_voxels, max_points)
        assert len(ind) == min(max_voxels, full)
        np.testing.assert_array_equal(ind, indices[:max_voxels])  # a prefix of the uncapped order


def test_max_points_extra_points_keep_voxel_id():
    pts = np.array([[0.5, 0.5, 0.5]] * 5 + [[1.5, 0.5, 0.5]] + [[0.6, 0.6, 0.6]], np.float32)
    pts[:, 0] += np.arange(7) * 1e-3
    _, (voxels, indices, counts, pc_voxel_id) = run(pts, [1, 1, 1], [0, 0, 0, 4, 4, 4], 10, 2)
    np.testing.assert_array_equal(counts, [2, 1])
    np.testing.assert_array_equal(pc_voxel_id, [0, 0, 0, 0, 0, 1, 0])
    np.testing.assert_array_equal(voxels[0], pts[:2])
    # a voxel cap: the second voxel is dropped, its point gets -1
    _, (voxels, indices, counts, pc_voxel_id) = run(pts, [1, 1, 1], [0, 0, 0, 4, 4, 4], 1, 2)
    np.testing.assert_array_equal(indices, [[0, 0, 0]])
    np.testing.assert_array_equal(pc_voxel_id, [0, 0, 0, 0, 0, -1, 0])


@pytest.mark.parametrize("ndim", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_generated_points_1d_to_4d(ndim, dtype):
    g = np.random.default_rng(ndim)
    n = 40000 if ndim < 4 else 20000
    vsize = [0.37, 0.5, 0.21, 1.0][:ndim]
    rng = [-3.0, -2.0, -1.5, 0.0][:ndim] + [3.0, 2.5, 1.5, 4.0][:ndim]
    points = g.uniform(-4, 4.5, size=(n, ndim + 2)).astype(dtype)
    points = np.concatenate([points, points[: n // 4] * 0.999])  # repeats: several points per voxel
    for max_voxels, max_points in [(10 ** 6, 4), (300, 2)]:
        check_against_numpy(points, vsize, rng, max_voxels, max_points)
    sub = points[:3000]
    _, got = run(sub, vsize, rng, 10 ** 6, 3)
    for a, b in zip(got, python_loop_reference(sub, vsize, rng, 10 ** 6, 3)):
        np.testing.assert_array_equal(a, b)


def test_float64_points_use_float64_arithmetic_with_float32_constants():
    # x = 2.6 - 1e-9 (float64) is in cell 45 of [-2, ...) with 0.1 voxels when computed in float64 with
    # float32(-2) and float32(0.1), and in cell 46 in float32 arithmetic; spconv 2.3.8 gives 45.
    x = np.array([[2.59999997], [3.09999984], [1.89999994]], np.float64)
    _, (_, indices, _, pc_voxel_id) = run(x, [0.1], [-2, 4], 100, 5)
    np.testing.assert_array_equal(indices[pc_voxel_id, 0], [45, 50, 38])
    _, (_, indices32, _, id32) = run(x.astype(np.float32), [0.1], [-2, 4], 100, 5)
    np.testing.assert_array_equal(indices32[id32, 0], [46, 51, 39])


def test_range_boundaries():
    rng = [0, -40, -3, 70.4, 40, 1]
    lo = np.float32([0, -40, -3])
    hi = np.float32([70.4, 40, 1])
    pts = np.array([lo, hi, np.nextafter(lo, -np.inf), np.nextafter(hi, -np.inf), [35, 0, -1]], np.float32)
    gen, (_, indices, _, pc_voxel_id) = run(pts, [0.05, 0.05, 0.1], rng, 100, 5)
    assert pc_voxel_id[0] >= 0 and pc_voxel_id[1] == -1 and pc_voxel_id[2] == -1
    assert pc_voxel_id[4] >= 0
    np.testing.assert_array_equal(indices[pc_voxel_id[0]], [0, 0, 0])
    exp = numpy_voxels(pts, [0.05, 0.05, 0.1], rng, 100, 5)
    np.testing.assert_array_equal(pc_voxel_id, exp[2])
    np.testing.assert_array_equal(indices, exp[0])


def test_empty_mean():
    g = np.random.default_rng(3)
    pts = g.uniform(0, 2, size=(3000, 4)).astype(np.float32)
    for max_points in [1, 3, 8]:
        _, (plain, _, counts, _) = run(pts, [0.5, 0.5, 0.5], [0, 0, 0, 2, 2, 2], 1000, max_points)
        _, (mean, indices, counts2, _) = run(pts, [0.5, 0.5, 0.5], [0, 0, 0, 2, 2, 2], 1000, max_points,
                                            empty_mean=True)
        np.testing.assert_array_equal(counts, counts2)
        slots = np.arange(max_points)[None, :] < counts[:, None]
        np.testing.assert_array_equal(mean[slots], plain[slots])  # stored points unchanged
        for v in range(len(counts)):
            m = plain[v, :counts[v]].mean(0)
            for s in range(counts[v], max_points):
                np.testing.assert_allclose(mean[v, s], m, rtol=1e-6, atol=1e-6)
    sub = pts[:500]
    _, got = run(sub, [0.5, 0.5, 0.5], [0, 0, 0, 2, 2, 2], 1000, 4, empty_mean=True)
    exp = python_loop_reference(sub, [0.5, 0.5, 0.5], [0, 0, 0, 2, 2, 2], 1000, 4, empty_mean=True)
    np.testing.assert_allclose(got[0], exp[0], rtol=1e-6, atol=1e-6)


def test_empty_mean_real_scan_and_call_api():
    points = load_scan("kitti")
    gen = PointToVoxel(*SCANS["kitti"][:2], 4, 40000, 5)
    voxels, indices, counts = gen(torch.from_numpy(points), empty_mean=True)
    assert isinstance(voxels, torch.Tensor) and voxels.shape[1:] == (5, 4)
    full = counts == 5
    assert (~full).any()
    # a voxel with one point is filled with that point
    one = torch.nonzero(counts == 1)[0, 0]
    assert torch.equal(voxels[one], voxels[one, :1].expand(5, 4))


@pytest.mark.parametrize("source", ["generated", "waymo"])
def test_deterministic_over_threads(source):
    # 1-2 threads run the serial scan, 3-4 threads the partitioned path: results must be bitwise the same
    if source == "waymo":
        pts = load_scan("waymo")
        pts = np.concatenate([pts, pts[::3] + 0.01])
        vsize, rng = SCANS["waymo"][:2]
    else:
        g = np.random.default_rng(5)
        pts = g.uniform(-20, 20, size=(120000, 3)).astype(np.float32)
        pts = np.concatenate([pts, pts[::2] + 0.05, pts[:5000]])
        vsize, rng = [0.5, 0.5, 0.5], [-15, -15, -15, 15, 15, 15]
    pts = torch.from_numpy(pts)
    old = torch.get_num_threads()
    try:
        results = []
        for threads in [1, 2, 3, 4]:
            torch.set_num_threads(threads)
            for max_voxels in [10 ** 6, 20000]:
                gen = PointToVoxel(vsize, rng, 3, max_voxels, 5)
                results.append((max_voxels, gen.generate_voxel_with_id(pts, empty_mean=True)))
    finally:
        torch.set_num_threads(old)
    for max_voxels, r in results[2:]:
        ref = results[0][1] if max_voxels == 10 ** 6 else results[1][1]
        for a, b in zip(ref, r):
            assert torch.equal(a, b)
    check_against_numpy(pts.numpy(), vsize, rng, 20000, 5)


def test_non_contiguous_and_numpy_input():
    g = np.random.default_rng(0)
    pts = g.uniform(-1, 5, size=(5000, 8)).astype(np.float32)
    view = torch.from_numpy(pts)[:, ::2]  # non-contiguous [N, 4]
    gen = PointToVoxel([0.5, 0.5, 0.5], [0, 0, 0, 4, 4, 4], 4, 1000, 3)
    a = gen.generate_voxel_with_id(view)
    b = gen.generate_voxel_with_id(view.contiguous())
    c = gen.generate_voxel_with_id(np.ascontiguousarray(pts[:, ::2]))
    for x, y, z in zip(a, b, c):
        assert torch.equal(x, y) and torch.equal(x, z)


def test_nan_inf_points_dropped_and_counted():
    g = np.random.default_rng(1)
    pts = g.uniform(0, 4, size=(2000, 4)).astype(np.float32)
    bad = pts.copy()
    bad[::7, 0] = np.nan
    bad[3::11, 1] = np.inf
    bad[5::13, 2] = -np.inf
    bad[8::17, 3] = np.nan  # not a coordinate: the point is kept, with its NaN feature
    coord_bad = ~np.isfinite(bad[:, :3]).all(1)
    gen, (voxels, indices, counts, pc_voxel_id) = run(bad, [0.5, 0.5, 0.5], [0, 0, 0, 4, 4, 4], 10000, 4)
    assert gen.num_invalid_points == int(coord_bad.sum()) > 0
    assert (pc_voxel_id[coord_bad] == -1).all()
    exp = numpy_voxels(bad, [0.5, 0.5, 0.5], [0, 0, 0, 4, 4, 4], 10000, 4)
    np.testing.assert_array_equal(indices, exp[0])
    np.testing.assert_array_equal(pc_voxel_id, exp[2])
    # the same as voxelising only the finite points (ids shifted to the kept rows)
    _, (v2, i2, c2, id2) = run(bad[~coord_bad], [0.5, 0.5, 0.5], [0, 0, 0, 4, 4, 4], 10000, 4)
    np.testing.assert_array_equal(i2, indices)
    np.testing.assert_array_equal(id2, pc_voxel_id[~coord_bad])
    np.testing.assert_array_equal(v2, voxels)
    # all invalid: empty output, no crash
    gen, (voxels, indices, counts, pc_voxel_id) = run(np.full((10, 4), np.nan, np.float32), [0.5] * 3,
                                                      [0, 0, 0, 4, 4, 4], 10, 4)
    assert voxels.shape == (0, 4, 4) and indices.shape == (0, 3) and counts.shape == (0,)
    assert gen.num_invalid_points == 10 and (pc_voxel_id == -1).all()
    # huge finite values are simply out of range
    gen, (_, _, _, pc_voxel_id) = run(np.array([[1e30, 1, 1, 0], [-3e38, 1, 1, 0]], np.float32), [0.5] * 3,
                                      [0, 0, 0, 4, 4, 4], 10, 4)
    assert gen.num_invalid_points == 0 and (pc_voxel_id == -1).all()


def test_zero_points():
    for dtype in [torch.float32, torch.float64]:
        gen = PointToVoxel([0.1, 0.1, 0.1], [0, 0, 0, 1, 1, 1], 5, 100, 7)
        voxels, indices, counts, pc_voxel_id = gen.generate_voxel_with_id(torch.zeros(0, 5, dtype=dtype))
        assert voxels.shape == (0, 7, 5) and voxels.dtype == torch.float32
        assert indices.shape == (0, 3) and indices.dtype == torch.int32
        assert counts.shape == (0,) and counts.dtype == torch.int32
        assert pc_voxel_id.shape == (0,) and pc_voxel_id.dtype == torch.int64


def test_wrong_feature_count_and_dtype():
    gen = PointToVoxel([0.1, 0.1, 0.1], [0, 0, 0, 1, 1, 1], 4, 100, 5)
    with pytest.raises(ValueError, match="num_point_features"):
        gen(torch.zeros(10, 3))
    with pytest.raises(ValueError, match="num_point_features"):
        gen(torch.zeros(10, 5))
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        gen(torch.zeros(10))
    for dtype in [torch.float16, torch.int32, torch.bfloat16]:
        with pytest.raises(ValueError, match="float32 or float64"):
            gen(torch.zeros(10, 4, dtype=dtype))
    with pytest.raises(ValueError, match="num_point_features"):
        PointToVoxel([0.1, 0.1, 0.1], [0, 0, 0, 1, 1, 1], 2, 100, 5)
    with pytest.raises(ValueError, match="positive"):
        PointToVoxel([0.1, 0.1, 0.1], [0, 0, 0, 1, 1, 1], 3, 0, 5)
    with pytest.raises(ValueError, match="positive"):
        PointToVoxel([0.1, 0.1, 0.1], [0, 0, 0, 1, 1, 1], 3, 10, 0)


def test_bad_ranges_and_voxel_sizes():
    with pytest.raises(ValueError, match="min .* must be < max"):
        PointToVoxel([0.1, 0.1, 0.1], [0, 0, 0, 1, 0, 1], 3, 100, 5)  # y: min == max
    with pytest.raises(ValueError, match="min .* must be < max"):
        PointToVoxel([0.1, 0.1, 0.1], [0, 2, 0, 1, 1, 1], 3, 100, 5)  # y: min > max
    with pytest.raises(ValueError, match="must be > 0"):
        PointToVoxel([0.1, 0.0, 0.1], [0, 0, 0, 1, 1, 1], 3, 100, 5)
    with pytest.raises(ValueError, match="must be > 0"):
        PointToVoxel([0.1, 0.1, -0.2], [0, 0, 0, 1, 1, 1], 3, 100, 5)
    with pytest.raises(ValueError, match="finite"):
        PointToVoxel([0.1, math.nan, 0.1], [0, 0, 0, 1, 1, 1], 3, 100, 5)
    with pytest.raises(ValueError, match="finite"):
        PointToVoxel([0.1, 0.1, 0.1], [0, 0, 0, 1, math.inf, 1], 3, 100, 5)
    with pytest.raises(ValueError, match="0 cells"):
        PointToVoxel([0.1, 0.1, 5.0], [0, 0, 0, 1, 1, 1], 3, 100, 5)
    with pytest.raises(ValueError, match="1 to 4"):
        PointToVoxel([0.1] * 5, [0] * 5 + [1] * 5, 5, 100, 5)
    with pytest.raises(ValueError, match="6 entries"):
        PointToVoxel([0.1, 0.1, 0.1], [0, 0, 0, 1, 1], 3, 100, 5)


def test_grid_too_large_for_int32_indices():
    with pytest.raises(ValueError, match="int32"):
        PointToVoxel([1e-9, 0.1, 0.1], [0, 0, 0, 100, 1, 1], 3, 100, 5)  # 1e11 cells on x
    # large grids whose axes fit int32 work: keys are int64 (spconv would allocate a dense grid)
    gen = PointToVoxel([1e-4, 1e-4, 1e-4], [0, 0, 0, 100, 100, 100], 3, 100, 5)
    assert gen.grid_size == [1000000, 1000000, 1000000]
    pts = torch.tensor([[1.0, 2.0, 3.0], [99.99995, 0.0, 50.0]])
    _, indices, _, pc_voxel_id = gen.generate_voxel_with_id(pts)
    exp = numpy_voxels(pts.numpy(), [1e-4] * 3, [0, 0, 0, 100, 100, 100], 100, 5)
    np.testing.assert_array_equal(indices.numpy(), exp[0])
    np.testing.assert_array_equal(pc_voxel_id.numpy(), exp[2])


def test_meta_data_as_spconv():
    # values printed by spconv 2.3.8 (float32 arithmetic, round half away from zero)
    vsize, grid, stride, rng = calc_point2voxel_meta_data([0.1, 0.1, 0.15], [-75.2, -75.2, -2, 75.2, 75.2, 4])
    assert grid == [40, 1504, 1504] and stride == [2262016, 1504, 1]
    assert vsize == [0.15000000596046448, 0.10000000149011612, 0.10000000149011612]
    assert rng == [-2.0, -75.19999694824219, -75.19999694824219, 4.0, 75.19999694824219, 75.19999694824219]
    assert calc_point2voxel_meta_data([0.05, 0.05, 0.1], [0, -40, -3, 70.4, 40, 1])[1] == [40, 1600, 1408]
    # 1.05/0.3 = 3.4999998 and 0.45/0.3 = 1.4999999 in float32, 0.75/0.3 = 2.5 rounds up
    assert calc_point2voxel_meta_data([0.3, 0.3, 0.3], [0, 0, 0, 0.45, 0.75, 1.05])[1] == [3, 3, 1]
    gen = PointToVoxel([0.3, 0.3, 0.3], [0, 0, 0, 0.45, 0.75, 1.05], 3, 10, 2)
    assert gen.grid_size == [3, 3, 1] and gen.ndim == 3 and gen.device.type == "cpu"
    assert gen.num_point_features == 3 and gen.max_num_voxels == 10 and gen.max_num_points_per_voxel == 2


def test_device_checks():
    with pytest.raises(NotImplementedError, match="CPU"):
        PointToVoxel([0.1] * 3, [0, 0, 0, 1, 1, 1], 3, 10, 2, device=torch.device("meta"))
    gen = PointToVoxel([0.1] * 3, [0, 0, 0, 1, 1, 1], 3, 10, 2)
    with pytest.raises(ValueError, match="device|built for"):
        gen(torch.zeros(4, 3, device="meta"))


def test_gather_features_by_pc_voxel_id():
    points = load_scan("kitti")
    gen = PointToVoxel(*SCANS["kitti"][:2], 4, 40000, 5)
    _, indices, _, pc_voxel_id = gen.generate_voxel_with_id(torch.from_numpy(points))
    feats = indices.double() * torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64)
    per_point = gather_features_by_pc_voxel_id(feats, pc_voxel_id, invalid_value=-7)
    assert per_point.shape == (len(points), 3) and per_point.dtype == torch.float64
    valid = pc_voxel_id >= 0
    assert torch.equal(per_point[valid], feats[pc_voxel_id[valid]])
    assert (per_point[~valid] == -7).all()
    cells, ok, _ = numpy_cells(points, *SCANS["kitti"][:2])
    np.testing.assert_array_equal(per_point[valid].numpy(), cells[valid.numpy()] * np.array([1, 10, 100]))
