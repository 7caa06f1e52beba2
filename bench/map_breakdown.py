"""Per-layer kernel-map build time of the SECOND VoxelBackBone8x forward, and its share of the forward.

Builds the scans' voxels and the model exactly as ``python -m spconv.benchmark --models second`` does
(spconv/benchmark/cpu.py), wraps ops.build_subm_map / build_conv_map (and, with --train, ops.invert_map,
which the backward calls) with timers, and runs the forward (or the training step) ``--reps`` times per
thread count. Prints, per scan and thread count: the forward median, the map total and its share, then
each map call (in call order) with its sites, its median ms, the median of the raw torch.ops call
replayed on the same inputs (no Python wrapper), and its share of the forward. Medians over reps; the first
rep is a warm-up. Timings on a shared machine are noisy: compare builds by alternating runs.

usage: python bench/map_breakdown.py [--scans kitti waymo nuscenes10] [--threads 1 2] [--reps 15] [--train]
                                     [--json out.json]
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
from torch import nn

import spconv.pytorch as spconv
from spconv.benchmark.cpu import DEFAULT_DATA, build_model, cpu_description, voxelize_scan
from spconv.pytorch import ops


make_scan = voxelize_scan


def run(scan, feats, idx, shape, threads, reps, train):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model("second", spconv, nn, 4)
    names = ["build_subm_map", "build_conv_map"] + (["invert_map"] if train else [])
    originals = {n: getattr(ops, n) for n in names}
    calls = []  # per rep: list of (name, sites, seconds, args)

    def timed(name, fn):
        def wrapped(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            calls[-1].append((name, int(a[0].shape[0]), time.perf_counter() - t0, a, k))
            return out
        return wrapped

    with torch.no_grad():  # thread pool and dispatch warm-up on a few sites
        model.eval()
        model(spconv.SparseConvTensor(feats[:64].clone(), idx[:64].clone(), shape, 1))
    for n in names:
        setattr(ops, n, timed(n, originals[n]))
    fwd = []
    try:
        for _ in range(reps + 1):
            calls.append([])
            x = spconv.SparseConvTensor(feats.clone(), idx, shape, 1)
            if train:
                model.train()
                t0 = time.perf_counter()
                out = model(x)
                out.features.square().mean().backward()
                fwd.append(time.perf_counter() - t0)
                model.zero_grad(set_to_none=True)
            else:
                model.eval()
                with torch.no_grad():
                    t0 = time.perf_counter()
                    out = model(x)
                    fwd.append(time.perf_counter() - t0)
            out = None
    finally:
        for n in names:
            setattr(ops, n, originals[n])
    fwd_med = statistics.median(fwd[1:])
    per_call = list(zip(*[c for c in calls[1:]]))  # call position -> its record in every rep
    layers = []
    for recs in per_call:
        name, sites, _, a, k = recs[0]
        med = statistics.median(r[2] for r in recs)
        raw = []  # the compiled op alone on the same inputs (the last rep's)
        for _ in range(max(3, reps // 2)):
            t0 = time.perf_counter()
            originals[name](*a, **k)
            raw.append(time.perf_counter() - t0)
        layers.append({"op": name, "sites": sites, "ms": med * 1e3, "raw_ms": statistics.median(raw) * 1e3,
                       "share": med / fwd_med})
    total = statistics.median(sum(r[2] for r in c) for c in calls[1:])
    return {"scan": scan, "threads": threads, "voxels": int(idx.shape[0]), "mode": "train" if train else "eval",
            "fwd_ms": fwd_med * 1e3, "map_ms": total * 1e3, "map_share": total / fwd_med, "layers": layers}


def record_calls(feats, idx, shape):
    """[(op name, args, kwargs)] of the map calls of one eval forward (args as the compiled op takes them)."""
    torch.manual_seed(0)
    model = build_model("second", spconv, nn, 4).eval()
    calls, originals = [], {}
    names = ["build_subm_map", "build_conv_map"]
    for n in names:
        originals[n] = getattr(ops._ops, n)

    class Recorder:
        def __getattr__(self, n):
            fn = getattr(torch.ops.spconv, n)
            if n not in names:
                return fn

            def wrapped(*a):
                calls.append((n, a))
                return fn(*a)
            return wrapped

    real, ops._ops = ops._ops, Recorder()
    try:
        with torch.no_grad():
            model(spconv.SparseConvTensor(feats.clone(), idx, shape, 1))
    finally:
        ops._ops = real
    return calls


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scans", nargs="+", default=["kitti", "waymo", "nuscenes10"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--train", action="store_true", help="time the training step (and invert_map) instead")
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--json")
    ap.add_argument("--save-calls", help="save every map call of one forward per scan (inputs and arguments) to "
                    "this .pt file, for bench/map_replay.py")
    a = ap.parse_args()
    if not a.data or not os.path.isdir(a.data):
        sys.exit("no scans: pass --data DIR or set SPCONV_DATA")
    print(f"CPU: {cpu_description()['model']}; torch {torch.__version__}; reps {a.reps}; mode {'train' if a.train else 'eval'}")
    results, saved = [], {}
    for scan in a.scans:
        feats, idx, shape = make_scan(a.data, scan)
        if a.save_calls:
            saved[scan] = record_calls(feats, idx, shape)
        for t in a.threads:
            r = run(scan, feats, idx, shape, t, a.reps, a.train)
            results.append(r)
            print(f"\n{scan} ({r['voxels']} voxels), {t} thread(s): {'step' if a.train else 'forward'} "
                  f"{r['fwd_ms']:.1f} ms, maps {r['map_ms']:.1f} ms = {100 * r['map_share']:.1f} %")
            print(f"  {'op':<15} {'sites':>7} {'ms':>7} {'raw ms':>7} {'%':>5}")
            for lay in r["layers"]:
                print(f"  {lay['op']:<15} {lay['sites']:>7} {lay['ms']:7.2f} {lay['raw_ms']:7.2f} "
                      f"{100 * lay['share']:5.1f}")
    if a.save_calls:
        torch.save(saved, a.save_calls)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"cpu": cpu_description()['model'], "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
