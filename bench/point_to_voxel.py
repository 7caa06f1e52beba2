"""PointToVoxel time on the Waymo-like frame (198k points, ~115k voxels), this package beside another spconv.

Waymo set-up: voxel [0.1, 0.1, 0.15] m, range [-75.2, -75.2, -2, 75.2, 75.2, 4], max 150000 voxels,
max 5 points per voxel (data/README.md). Each measurement runs in its own subprocess ("worker") that
imports ``spconv.pytorch.utils.PointToVoxel`` from whichever spconv that interpreter has, times
``generate_voxel_with_id`` (median and min over --reps calls, after warm-up) and prints JSON with a
digest of the result, so the table also says whether both libraries produced the same voxels.

With --compare PYTHON (e.g. /tmp/spconv-ref/bin/python, spconv 2.3.8) that interpreter runs the same
worker with OMP_NUM_THREADS=1 (spconv 2.3.8's CPU build is only trustworthy single-threaded; its
PointToVoxel is a serial loop anyway) and the ratio spconv / ours is printed.

usage: python bench/point_to_voxel.py [--reps 50] [--threads 1 2] [--compare /tmp/spconv-ref/bin/python]
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
FRAME = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "data", "waymo_like_198k.npz"))
VSIZE = [0.1, 0.1, 0.15]
RANGE = [-75.2, -75.2, -2, 75.2, 75.2, 4]
MAX_VOXELS, MAX_POINTS = 150000, 5


def load_points():
    import numpy as np

    if os.path.exists(FRAME):
        return np.load(FRAME)["pc"], "waymo_like_198k.npz"
    # stand-in when the shared data folder is absent: 64 rings of a spinning LiDAR around a ground plane
    g = np.random.default_rng(0)
    az = g.uniform(-np.pi, np.pi, 198130)
    ring = g.integers(0, 64, 198130)
    r = 2.0 + 70.0 * (ring / 63.0) ** 2 + g.normal(0, 0.05, 198130)
    pts = np.stack([r * np.cos(az), r * np.sin(az), -1.8 + 0.02 * g.normal(size=198130)], 1).astype(np.float32)
    return pts, "generated frame (waymo_like_198k.npz not found)"


def worker(reps: int):
    import numpy as np
    import spconv
    import torch
    from spconv.pytorch.utils import PointToVoxel

    points, source = load_points()
    pc = torch.from_numpy(points)
    t0 = time.perf_counter()
    gen = PointToVoxel(VSIZE, RANGE, 3, MAX_VOXELS, MAX_POINTS)
    ctor = time.perf_counter() - t0
    for _ in range(3):
        out = gen.generate_voxel_with_id(pc)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = gen.generate_voxel_with_id(pc)
        times.append(time.perf_counter() - t0)
    voxels, indices, num, pc_voxel_id = out
    digest = hashlib.sha1()
    for t in (voxels, indices, num, pc_voxel_id):
        digest.update(t.contiguous().numpy().tobytes())
    print(json.dumps({"median_ms": float(np.median(times)) * 1e3, "min_ms": float(np.min(times)) * 1e3,
                      "ctor_ms": ctor * 1e3, "voxels": int(indices.shape[0]), "points": int(pc.shape[0]),
                      "threads": torch.get_num_threads(), "digest": digest.hexdigest(), "source": source,
                      "spconv": f"spconv {getattr(spconv, '__version__', '?')} at {os.path.dirname(spconv.__file__)}"}))


def run(python, reps, threads):
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    # cwd = bench/: the worker imports the spconv installed in `python`, never this checkout by accident
    proc = subprocess.run([python, os.path.abspath(__file__), "--worker", "--reps", str(reps)], capture_output=True,
                          text=True, env=env, cwd=HERE)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1],
                    help="thread counts to time this package with (OMP_NUM_THREADS)")
    ap.add_argument("--compare", help="python of another spconv install (e.g. the original 2.3.8), run with 1 thread")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a.reps)
    rows = [("ours", t, run(sys.executable, a.reps, t)) for t in dict.fromkeys(a.threads)]
    if a.compare:
        rows.append(("other", 1, run(a.compare, a.reps, 1)))
    first = next((r for _, _, r in rows if "error" not in r), {})
    print(f"PointToVoxel, {first.get('source', '?')}: {first.get('points', '?')} points -> "
          f"{first.get('voxels', '?')} voxels (voxel {VSIZE}, range {RANGE}, max {MAX_VOXELS} x {MAX_POINTS})")
    for who in dict.fromkeys(w for w, _, _ in rows):
        r = next(r for w, _, r in rows if w == who)
        print(f"  {who}: {r.get('spconv', r.get('error'))}")
    print(f"{'library':<34} {'threads':>7} {'median ms':>10} {'min ms':>8} {'ctor ms':>8} {'same result':>12}")
    ref_digest = rows[0][2].get("digest")
    for who, threads, r in rows:
        if "error" in r:
            print(f"{who:<34} {threads:>7}  error: {r['error']}")
            continue
        name = "this package" if who == "ours" else "other: " + r["spconv"].split(" at ")[0]
        same = "yes" if r["digest"] == ref_digest else "NO"
        print(f"{name[:34]:<34} {r['threads']:>7} {r['median_ms']:10.2f} {r['min_ms']:8.2f} {r['ctor_ms']:8.1f} "
              f"{same:>12}")
    other = rows[-1][2] if a.compare else None
    if other and "error" not in other:
        for who, threads, r in rows[:-1]:
            if "error" not in r:
                print(f"speed-up over the other at {threads} thread(s): {other['median_ms'] / r['median_ms']:.2f}x "
                      f"(median), {other['min_ms'] / r['min_ms']:.2f}x (min)")


if __name__ == "__main__":
    main()
