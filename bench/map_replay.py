"""Replays the kernel-map calls saved by ``bench/map_breakdown.py --save-calls`` on one or more builds of the
extension, each in its own process (two builds cannot register torch.ops.spconv in one), alternating
between the builds ``--rounds`` times so that a noisy machine affects them alike. Prints per call and per
scan the median over all rounds of each build and the ratio new/old.

usage: python bench/map_replay.py CALLS.pt OLD.so NEW.so [--rounds 5] [--reps 11] [--threads 1]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def worker(calls_file, lib, reps, threads):
    import torch
    torch.set_num_threads(threads)
    import importlib.util
    spec = importlib.util.spec_from_file_location("_C", lib)  # the module init registers torch.ops.spconv.*
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if os.environ.get("SPCONV_CPU_CACHING_ALLOCATOR", "1") != "0":
        mod.use_caching_allocator()  # as spconv.pytorch.ops does by default
    saved = torch.load(calls_file, weights_only=False)
    out = {}
    for scan, calls in saved.items():
        times = []
        for name, args in calls:
            fn = getattr(torch.ops.spconv, name)
            fn(*args)
            t = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn(*args)
                t.append(time.perf_counter() - t0)
            times.append(t)
        out[scan] = {"names": [c[0] for c in calls], "sites": [int(c[1][0].shape[0]) for c in calls], "times": times}
    print(json.dumps(out))


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("calls")
    ap.add_argument("libs", nargs="+")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--stat", choices=["median", "min"], default="median")
    a = ap.parse_args()
    runs = {lib: [] for lib in a.libs}
    for _ in range(a.rounds):
        for lib in a.libs:
            p = subprocess.run([sys.executable, __file__, "--worker", a.calls, lib, str(a.reps), str(a.threads)],
                               capture_output=True, text=True, check=True)
            runs[lib].append(json.loads(p.stdout.strip().splitlines()[-1]))
    first = runs[a.libs[0]][0]
    print(f"threads {a.threads}; {a.stat}s over {a.rounds} rounds x {a.reps} reps (ms); libs: " +
          ", ".join(f"[{i}] {lib}" for i, lib in enumerate(a.libs)))
    for scan, info in first.items():
        print(f"\n{scan}")
        totals = [0.0] * len(a.libs)
        for c, (name, sites) in enumerate(zip(info["names"], info["sites"])):
            meds = []
            for li, lib in enumerate(a.libs):
                ts = [t for r in runs[lib] for t in r[scan]["times"][c]]
                meds.append((min(ts) if a.stat == "min" else statistics.median(ts)) * 1e3)
                totals[li] += meds[-1]
            print(f"  {name:<15} {sites:>7} " + " ".join(f"{m:8.2f}" for m in meds) +
                  (f"  x{meds[-1] / meds[0]:.2f}" if len(meds) > 1 else ""))
        print(f"  {'total':<23} " + " ".join(f"{m:8.2f}" for m in totals) +
              (f"  x{totals[-1] / totals[0]:.2f}" if len(totals) > 1 else ""))


if __name__ == "__main__":
    main()
