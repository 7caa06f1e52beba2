"""Smoke tests of the examples in example/, each run in-process with tiny settings (--quick), checked
on what it computes: losses fall, voxel sets match open3d's, DDP gradients equal single-process
gradients, PNG files are written. The real scans in ../shared/data are used when present, generated
stand-ins otherwise (the examples fall back by themselves)."""
import importlib
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "example")
if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)

pytest.importorskip("matplotlib", reason="the examples write PNGs with matplotlib: run bash scripts/setup.sh")


def _open3d_reason():
    try:
        import open3d  # noqa: F401
    except Exception as e:  # ImportError, or OSError when Debian's libusb-1.0-0 is missing
        return f"open3d is not importable ({type(e).__name__}: {e}); bash scripts/setup.sh installs it"
    return None


OPEN3D_MISSING = _open3d_reason()
needs_open3d = pytest.mark.skipif(OPEN3D_MISSING is not None, reason=str(OPEN3D_MISSING))


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("SPCONV_EXAMPLE_QUIET", "1")  # no progress bars in the test log


def example(name):
    return importlib.import_module(name)


def assert_png(path):
    assert os.path.exists(path), path
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    import matplotlib.image
    img = matplotlib.image.imread(path)
    assert img.shape[0] > 100 and img.shape[1] > 100
    assert img[..., :3].std() > 0.01, f"{path} is blank"


# --------------------------------------------------------------------------------------------------

def test_second_kitti(tmp_path):
    mod = example("second_kitti")
    res = mod.main(["--quick", "--out", str(tmp_path)])
    points, _ = example("_common").load_kitti()
    points = points[::4]
    # voxel count against an independent numpy voxelisation (float32, as spconv computes it)
    lo = np.array([0, -40, -3], np.float32)
    vs = np.array([0.05, 0.05, 0.1], np.float32)
    cells = np.floor((points[:, :3] - lo) / vs).astype(np.int64)
    inside = ((cells >= 0) & (cells < [1408, 1600, 40])).all(1)
    expected = len(np.unique(cells[inside], axis=0))
    assert abs(res["num_voxels"] - expected) <= 2, (res["num_voxels"], expected)
    stages = res["stages"]
    assert stages[0][0] == res["num_voxels"] and stages[0][1] == [41, 1600, 1408]
    assert stages[-1][1:] == ([2, 200, 176], 128)
    # pictures: the input BEV has one cell per occupied (y, x) column; every active output cell lies
    # over (within one 8x cell of) the input's footprint
    coords = res["coords"].long()
    assert int((res["input_bev"] > 0).sum()) == len(torch.unique(coords[:, 1] * 1408 + coords[:, 2]))
    foot = torch.zeros(200, 176)
    foot[coords[:, 1] // 8, coords[:, 2] // 8] = 1
    near = torch.nn.functional.max_pool2d(foot[None, None], 3, 1, 1)[0, 0] > 0
    active = torch.from_numpy(res["feature_norm_bev"]) > 0
    assert active.sum() > 0 and bool((active <= near).all())
    for p in res["pngs"]:
        assert_png(p)


def test_segmentation_scannet_trains(tmp_path):
    res = example("segmentation_scannet").main(["--quick", "--steps", "25", "--out", str(tmp_path)])
    losses = res["losses"]
    assert len(losses) == 25 and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    assert res["miou"] > 0.3, res["ious"]
    assert 0 <= res["miou_heldout"] <= 1
    assert res["point_accuracy"] > 0.6
    for p in res["pngs"]:
        assert_png(p)


def test_examples_fall_back_to_generated_scenes(tmp_path):
    """Without ../shared/data the examples run on generated stand-ins of the same layout."""
    missing = str(tmp_path / "no-data")
    res = example("second_kitti").main(["--quick", "--data", missing, "--out", str(tmp_path)])
    assert res["source"].startswith("generated") and res["num_voxels"] > 1000
    res = example("segmentation_scannet").main(["--quick", "--steps", "6", "--data", missing, "--out", str(tmp_path)])
    assert res["source"].startswith("generated") and res["losses"][-1] < res["losses"][0]


def test_segmentation_augment_keeps_rows_and_sites():
    seg = example("segmentation_scannet")
    idx = torch.tensor([[0, 1, 1, 3], [0, 0, 4, 1]], dtype=torch.int32)
    feats = torch.arange(16, dtype=torch.float32).view(2, 8)
    x = seg.spconv.SparseConvTensor(feats, idx, [3, 5, 6], 1)
    seen = set()
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        a = seg.augment(x, gen)
        seen.add((tuple(a.spatial_shape), tuple(a.indices[0].tolist())))
        assert a.indices[:, :2].tolist() == idx[:, :2].tolist()  # batch and z unchanged, rows in order
        assert torch.equal(a.features[:, 3:], feats[:, 3:]) and torch.equal(a.features[:, 0], feats[:, 0])
        assert sorted(a.features[0, 1:3].abs().tolist()) == [1.0, 2.0]
    assert len(seen) == 8  # all flips and quarter turns occur


def test_segmentation_scannet_amp(tmp_path):
    res = example("segmentation_scannet").main(["--quick", "--steps", "8", "--amp", "--out", str(tmp_path)])
    losses = res["losses"]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses


def test_unet_restores_sites_and_runs_under_bf16_autocast():
    seg = example("segmentation_scannet")
    g = torch.Generator().manual_seed(0)
    flat = torch.randperm(12 ** 3, generator=g)[:300]
    coords = torch.stack([flat // 144, flat // 12 % 12, flat % 12], 1).int()
    x = seg.spconv.SparseConvTensor(torch.randn(300, 7, generator=g),
                                    torch.cat([torch.zeros(300, 1, dtype=torch.int32), coords], 1), [12, 12, 12], 1)
    torch.manual_seed(0)
    net = seg.SparseUNet(7, 3, width=8)
    logits = net(x)
    assert logits.shape == (300, 3) and logits.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = net(x)
    assert low.dtype == torch.bfloat16
    assert torch.allclose(low.float(), logits, atol=0.1, rtol=0.1)
    low.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in net.parameters())


def test_per_sample_loss_is_mean_of_sample_means():
    seg = example("segmentation_scannet")
    logits = torch.randn(7, 3)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 2])
    batch = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    a = torch.nn.functional.cross_entropy(logits[:3], labels[:3])
    b = torch.nn.functional.cross_entropy(logits[3:], labels[3:])
    assert torch.allclose(seg.per_sample_loss(logits, labels, batch, 2), (a + b) / 2)


@needs_open3d
def test_open3d_normals_of_a_plane():
    seg = example("segmentation_scannet")
    rng = np.random.default_rng(0)
    xyz = np.c_[rng.uniform(0, 1, (2000, 2)), np.full(2000, 0.3)]
    normals, method = seg.estimate_normals(xyz)
    assert method.startswith("open3d")
    assert np.allclose(np.abs(normals[:, 2]), 1, atol=1e-6)


@needs_open3d
def test_voxelize_open3d_matches_voxelgrid(tmp_path):
    res = example("voxelize_open3d").main(["--quick", "--out", str(tmp_path)])
    assert res["unexplained"] == 0 and res["point_mismatch_not_boundary"] == 0, res
    assert res["agreement"] >= 0.999, res
    assert res["exact"] or res["boundary_points"] > 0, res
    assert res["outside_grid_open3d"] == 0
    assert res["color_max_abs_err"] < 1e-5
    assert res["gather_ok"]
    assert os.path.exists(res["ply"])
    assert_png(res["png"])


@needs_open3d
def test_voxelize_open3d_pcd_with_points_on_voxel_faces(tmp_path):
    """A .pcd input whose points sit on voxel faces: float32 (PointToVoxel) and float64 (open3d) may
    floor them differently; every difference must be explained by those boundary points."""
    vox = example("voxelize_open3d")
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 2, (3000, 3))
    face = 0.05 + 0.1 * rng.integers(0, 20, (3000, 3))  # lo = min - 0.05 = -0.05: faces at 0.05 + 0.1 k
    pts = np.concatenate([np.zeros((1, 3)), base, np.c_[face[:, 0], base[:, 1:]], face])
    colors = rng.uniform(0, 255, (len(pts), 3))
    path = vox.write_cloud(np.c_[pts, colors], str(tmp_path / "faces.pcd"))
    res = vox.main(["--input", path, "--voxel-size", "0.1", "--out", str(tmp_path)])
    assert res["num_points"] == len(pts)
    assert res["boundary_points"] >= 3000
    assert res["unexplained"] == 0 and res["point_mismatch_not_boundary"] == 0, res
    assert res["gather_ok"]


def test_ddp_gradients_equal_single_process(tmp_path):
    res = example("ddp_train").main(["--quick", "--steps", "4", "--out", str(tmp_path)])
    assert res["grad_rel_diff"] < 1e-5, (res["grad_rel_diff"], res["grad_rel_diff_at"])
    assert abs(res["losses"][0].mean() - res["ref_loss"]) < 1e-5
    assert res["replicas_equal"]
    assert res["losses"][-1].mean() < res["losses"][0].mean()
    assert_png(res["png"])


def test_mnist_sparse(tmp_path):
    res = example("mnist_sparse").main(["--quick", "--out", str(tmp_path)])
    losses = res["losses"]
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses
    assert res["accuracy"] > 0.5  # 10 classes: chance is 0.1
    assert 0.1 < res["density"] < 0.8
    for p in res["pngs"]:
        assert_png(p)


def test_mnist_from_dense_sites():
    mn = example("mnist_sparse")
    images, labels = mn.generated_digits(n=16)
    dense = mn.to_dense_batch(images)
    x = mn.spconv.SparseConvTensor.from_dense(dense)
    assert x.indices.shape[0] == int((dense != 0).sum())
    assert torch.equal(x.dense(channels_first=False), dense)
    assert mn.SparseDigitNet()(x).shape == (16, 10)
