"""Micro-benchmark of the bf16 conv kernels against fp32, one SubM layer with its kernel map cached.

For each layer (SubM C->C, 3x3x3, on the voxels of a real scan from ../shared/data, or LiDAR-like random
sites where the folder is absent) it times torch.ops.spconv.gather_conv on the cached neighbour table:
fp32 (AVX-512 implicit GEMM), and bf16 with each kernel (oneDNN brgemm via torch, AVX512-BF16 implicit
GEMM, portable gather + GEMM), switched in-process with spconv._C.set_bf16_kernel, interleaved rep by rep
so that machine noise hits all kernels alike. Prints medians, GFLOP/s, ratio to fp32 and the bf16 error.

usage: python bench/bf16_kernels.py [--scan kitti|nuscenes|waymo|random] [--channels 64 128] [--reps 15]
                                    [--threads 1] [--kernels brgemm avx512 portable] [--json out.json]
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

from spconv.benchmark.cpu import cpu_description, voxelize_scan

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "data"))


def sites(scan):
    """int32 [N, 4] (batch, z, y, x) voxel sites of a scan, and its spatial shape."""
    if scan == "random" or not os.path.isdir(DATA):
        g = torch.Generator().manual_seed(0)  # a LiDAR-like shell: points on a few surfaces of a 41 x 800 x 800 grid
        n = 60000
        yx = torch.randint(0, 800, (n, 2), generator=g)
        z = (yx.float().norm(dim=1) / 40).long().clamp(0, 40)
        idx = torch.unique(torch.cat([torch.zeros(n, 1, dtype=torch.long), z[:, None], yx], 1), dim=0)
        return idx.int().contiguous(), [41, 800, 800]
    name = "nuscenes10" if scan == "nuscenes" else scan
    _, idx, shape = voxelize_scan(DATA, name)
    return idx, shape


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scan", default="kitti", choices=["kitti", "nuscenes", "waymo", "random"])
    ap.add_argument("--channels", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kernels", nargs="+", default=["brgemm", "avx512", "portable"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import spconv._C as ext
    from spconv.pytorch import ops

    idx, shape = sites(args.scan)
    table = ops.build_subm_map(idx, shape, [3, 3, 3], [1, 1, 1], 1)
    pairs = int((table >= 0).sum())
    print(f"cpu: {cpu_description()['model']}; threads {args.threads}; scan {args.scan}: {len(idx)} sites, {pairs} pairs "
          f"({pairs / len(idx):.1f} per site); blocking {ext.cpu_blocking()}")
    results = []
    for c in args.channels:
        torch.manual_seed(c)
        x = torch.randn(len(idx), c)
        w = torch.randn(c, 27, c) / (27 * c) ** 0.5
        xb, wb = x.bfloat16(), w.bfloat16()
        ref = ops.gather_conv(xb.double(), table, wb.double(), 1, False)
        flops = 2.0 * pairs * c * c
        runs = {"fp32": lambda: ops.gather_conv(x, table, w, 1, False)}
        for k in args.kernels:
            runs[f"bf16 {k}"] = (lambda k=k: (ext.set_bf16_kernel(k), ops.gather_conv(xb, table, wb, 1, False))[1])
        times = {name: [] for name in runs}
        errs = {}
        for name, fn in runs.items():  # warm-up (JIT of the brgemm kernels, first-touch of buffers) + error
            out = fn().double()
            errs[name] = float((out - ref).abs().max() / ref.abs().max())
            if name.startswith("bf16"):
                got = name.split()[1]
                if ext.bf16_kernel() != got:
                    errs[name] = float("nan")
                    print(f"  note: {name} ran as {ext.bf16_kernel()} on this CPU")
        for _ in range(args.reps):
            for name, fn in runs.items():
                if name.startswith("bf16"):
                    ext.set_bf16_kernel(name.split()[1])
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        ext.set_bf16_kernel("auto")
        t32 = statistics.median(times["fp32"])
        print(f"SubM {c}->{c} ({flops / 1e9:.2f} GFLOP)")
        for name, ts in times.items():
            med = statistics.median(ts)
            row = {"channels": c, "kernel": name, "median_ms": med * 1e3, "gflops": flops / med / 1e9,
                   "vs_fp32": t32 / med, "rel_err_vs_bf16_inputs": errs[name], "reps": args.reps}
            results.append(row)
            print(f"  {name:<14} {med * 1e3:8.2f} ms  {flops / med / 1e9:7.1f} GFLOP/s  {t32 / med:5.2f}x fp32  "
                  f"err {errs[name]:.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_description()['model'], "threads": args.threads, "scan": args.scan, "sites": len(idx),
                       "pairs": pairs, "blocking": ext.cpu_blocking(),
                       "results": results}, f,
                      indent=1)


if __name__ == "__main__":
    sys.exit(main())
