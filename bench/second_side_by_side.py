"""SECOND VoxelBackBone8x forward (and optionally training) time, this package beside another spconv.

Runs ../shared/bench/second_backbone.py (public spconv API only) once per scan under this package's
python and, with --compare PYTHON, under another interpreter that has e.g. the original spconv 2.3.8
(make it with ../shared/tools/reference-venv.sh). Prints a table of medians and the ratio.

usage: python bench/second_side_by_side.py [--scans kitti nuscenes10 waymo] [--reps 5] [--train]
                                           [--compare /tmp/spconv-ref/bin/python] [--compare-threads 1]
"""
import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.normpath(os.path.join(HERE, "..", "..", "shared"))


def run(python, scan, reps, train, threads=None):
    cmd = [python, os.path.join(SHARED, "bench", "second_backbone.py"), os.path.join(SHARED, "data"),
           "--scan", scan, "--reps", str(reps)] + (["--train"] if train else [])
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scans", nargs="+", default=["kitti", "nuscenes10", "waymo"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--train", action="store_true")
    ap.add_argument("--compare", help="python of another spconv install (e.g. the original 2.3.8)")
    ap.add_argument("--compare-threads", type=int, default=None,
                    help="OMP_NUM_THREADS for the compared install (spconv 2.3.8's CPU build is only correct with 1)")
    a = ap.parse_args()
    print(f"{'scan':<11} {'voxels':>7} {'ours fwd ms':>12} {'ours bwd ms':>12} {'other fwd ms':>13} {'ratio':>6}")
    for scan in a.scans:
        ours = run(sys.executable, scan, a.reps, a.train)
        other = run(a.compare, scan, max(1, a.reps // 2), False, a.compare_threads) if a.compare else {}
        f = ours.get("fwd_median_s")
        b = ours.get("bwd_median_s")
        o = other.get("fwd_median_s")
        ratio = f"{o / f:5.1f}x" if f and o else "-"
        print(f"{scan:<11} {ours.get('voxels', '-'):>7} {f * 1e3 if f else float('nan'):12.1f} "
              f"{b * 1e3 if b else float('nan'):12.1f} {o * 1e3 if o else float('nan'):13.1f} {ratio:>6}")
        if "error" in ours or "error" in other:
            print(f"  errors: ours={ours.get('error')} other={other.get('error')}")


if __name__ == "__main__":
    main()
