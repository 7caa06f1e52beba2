"""The CPU benchmark's worker (python -m spconv.benchmark) on the KITTI scan: it runs, and its useful-FLOP
count of a SubM 16->16 layer equals 2 x pairs x 16 x 16 with the pairs counted independently in numpy
(every site pair at Chebyshev distance <= 1). Timings are printed by the benchmark, never asserted."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "..", "shared", "data")
needs_data = pytest.mark.skipif(not os.path.isdir(DATA), reason="../shared/data is absent (real scans not available)")


def _numpy_subm_pairs(coords):
    """Number of (output, tap) pairs of a 3x3x3 SubM map: for each of the 27 offsets, the sites whose
    neighbour at that offset is also a site."""
    keys = {tuple(c) for c in coords.tolist()}
    pairs = 0
    for dz in (-1, 0, 1):
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                shifted = coords + np.array([dz, dy, dx])
                pairs += sum(tuple(c) in keys for c in shifted.tolist())
    return pairs


@needs_data
def test_worker_reports_the_useful_flops_of_a_subm_layer():
    from spconv.benchmark import cpu
    cmd = [sys.executable, cpu.__file__, "--worker", "--scan", "kitti", "--model", "subm_16", "--mode", "eval",
           "--reps", "1", "--data", DATA]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    vsize, rng, shape = cpu.SCANS["kitti"]
    from spconv.pytorch.utils import PointToVoxel
    pts = torch.from_numpy(cpu.load_points(DATA, "kitti"))
    _, coords, _ = PointToVoxel(vsize, rng, 4, 400000, 10)(pts)
    assert res["voxels"] == len(coords) == res["out_sites"]
    assert res["flops"] == 2 * _numpy_subm_pairs(coords.numpy()) * 16 * 16
    assert res["median_s"] > 0 and res["map_s"] > 0 and res["held_mb"] > res["map_mb"] > 0


def test_missing_data_folder_is_named(tmp_path):
    """The packaged command takes its scans from --data or SPCONV_DATA and says so when they are missing."""
    env = dict(os.environ, SPCONV_DATA=str(tmp_path / "nowhere"))
    r = subprocess.run([sys.executable, "-m", "spconv.benchmark", "--models", "second"], cwd=str(tmp_path),
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "SPCONV_DATA" in r.stderr and "--data" in r.stderr
