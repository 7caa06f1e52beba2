"""The SECOND VoxelBackBone8x from ../shared/bench on the real scans: per-stage active sites against an
independent numpy computation of the active sets, and a training step."""
import importlib.util
import os

import numpy as np
import pytest
import torch

import spconv.pytorch as spconv
from spconv.pytorch.utils import PointToVoxel

SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared")
DATA = os.path.join(SHARED, "data")
BENCH = os.path.join(SHARED, "bench", "second_backbone.py")
pytestmark = pytest.mark.skipif(not (os.path.isdir(DATA) and os.path.exists(BENCH)),
                                reason="../shared/data and ../shared/bench are absent (real scans not available)")

CONFIGS = {  # vsize, range, sparse shape (z, y, x), as in the shared benchmark
    "kitti": ([0.05, 0.05, 0.1], [0, -40, -3, 70.4, 40, 1], [41, 1600, 1408]),
    "nuscenes10": ([0.075, 0.075, 0.2], [-54, -54, -5, 54, 54, 3], [41, 1440, 1440]),
    "waymo": ([0.1, 0.1, 0.15], [-75.2, -75.2, -2, 75.2, 75.2, 4], [41, 1504, 1504]),
}
# (kernel, stride, padding) of the strided convs of VoxelBackBone8x, in order
DOWNSAMPLES = [(3, 2, (1, 1, 1)), (3, 2, (1, 1, 1)), (3, 2, (0, 1, 1)), ((3, 1, 1), (2, 1, 1), (0, 0, 0))]


def _bench():
    spec = importlib.util.spec_from_file_location("second_backbone", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def numpy_voxels(points, vsize, rng):
    """Unique floored voxel coordinates (z, y, x) of the in-range points (float32 arithmetic)."""
    xyz = points[:, :3].astype(np.float32)
    c = np.floor((xyz - np.float32(rng[:3])) / np.float32(vsize)).astype(np.int64)[:, ::-1]
    grid = np.round((np.array(rng[3:]) - np.array(rng[:3])) / np.array(vsize)).astype(np.int64)[::-1]
    ok = np.isfinite(xyz).all(1) & (c >= 0).all(1) & (c < grid).all(1)
    return np.unique(c[ok], axis=0), grid


def numpy_strided_sites(coords, shape, k, s, p):
    """Active output set of a strided conv: every y = (x + p - r) / s that is integral and inside."""
    k, s, p = [np.broadcast_to(np.asarray(v), 3) for v in (k, s, p)]
    out_shape = (np.asarray(shape) + 2 * p - k) // s + 1
    found = []
    for r in np.ndindex(*k):
        t = coords + p - np.asarray(r)
        y = t // s
        ok = (t % s == 0).all(1) & (y >= 0).all(1) & (y < out_shape).all(1)
        found.append(y[ok])
    return np.unique(np.concatenate(found), axis=0), out_shape


@pytest.mark.parametrize("scan", ["kitti", "nuscenes10", "waymo"])
def test_second_stage_sites_match_numpy(scan):
    bench = _bench()
    points = bench.load_scan(DATA, scan)
    vsize, rng, shape = CONFIGS[scan]
    expect, grid = numpy_voxels(points, vsize, rng)
    assert [grid[0] + 1, *grid[1:]] == shape  # OpenPCDet pads z by one
    gen = PointToVoxel(vsize, rng, 4, 400000, 10)
    vox, coords, npv = gen(torch.from_numpy(points))
    got = coords.numpy()
    assert len(got) == len(expect)
    np.testing.assert_array_equal(np.unique(got, axis=0), expect)

    feats = vox.sum(1) / npv.clamp(min=1).unsqueeze(-1).float()
    idx = torch.cat([torch.zeros(len(coords), 1, dtype=torch.int32), coords], 1)
    torch.manual_seed(0)
    net = bench.VoxelBackBone8x(4).eval()
    with torch.no_grad():
        out, sizes = net(spconv.SparseConvTensor(feats, idx, shape, 1))
    sites, cur_shape, expected_sizes = expect, shape, [len(expect), len(expect)]
    for k, s, p in DOWNSAMPLES:
        sites, cur_shape = numpy_strided_sites(sites, cur_shape, k, s, p)
        expected_sizes.append(len(sites))
    assert sizes == expected_sizes
    assert out.spatial_shape == list(cur_shape)
    np.testing.assert_array_equal(np.unique(out.indices[:, 1:].numpy(), axis=0), sites)
    assert torch.isfinite(out.features).all()


def test_second_training_step_on_kitti():
    bench = _bench()
    points = bench.load_scan(DATA, "kitti")
    vsize, rng, shape = CONFIGS["kitti"]
    vox, coords, npv = PointToVoxel(vsize, rng, 4, 40000, 5)(torch.from_numpy(points))
    feats = vox.sum(1) / npv.clamp(min=1).unsqueeze(-1).float()
    idx = torch.cat([torch.zeros(len(coords), 1, dtype=torch.int32), coords], 1)
    torch.manual_seed(0)
    net = bench.VoxelBackBone8x(4).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        out, _ = net(spconv.SparseConvTensor(feats, idx, shape, 1))
        loss = (out.features - 1.0).square().mean()  # drive the features towards 1
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    assert losses[-1] < losses[0]
