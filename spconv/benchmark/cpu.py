"""CPU benchmark of sparse convolution on real LiDAR workloads, this package beside another spconv.

Workloads (../shared/data): SECOND VoxelBackBone8x and CenterPoint-style VoxelResBackBone8x on the
KITTI scan, the nuScenes scan stacked 10x and the Waymo-like frame; single layers (SubM C->C for C
in 16/32/64/128, strided 2x conv) on the same voxels. For each: eval forward, a training step
(forward + backward, train mode), kernel-map build time, peak RSS, useful FLOPs
(2 x pairs x Cin x Cout / groups), GFLOP/s and the ratio to this machine's fp32 matmul peak,
measured in the same run. bf16 autocast is timed on the 64/128-channel layers, with its error.

This file uses only the public spconv 2.x API so that ``--compare PYTHON`` can run the very same
workloads under another install (e.g. the original spconv 2.3.8 made by
../shared/tools/reference-venv.sh) in a subprocess. Each measurement runs in its own process so
peak RSS is per workload.

usage: python -m spconv.benchmark [--scans kitti nuscenes10 waymo] [--models second res layers]
                                  [--reps 5] [--compare PYTHON] [--compare-threads 1] [--json out.json]
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
# The real scans: --data DIR, else $SPCONV_DATA. A source checkout with ../shared beside it finds them there.
_CHECKOUT_DATA = os.path.normpath(os.path.join(HERE, "..", "..", "..", "shared", "data"))
DEFAULT_DATA = os.environ.get("SPCONV_DATA") or (_CHECKOUT_DATA if os.path.isdir(_CHECKOUT_DATA) else None)
SCANS = {  # vsize, range, sparse shape (z, y, x), max voxels
    "kitti": ([0.05, 0.05, 0.1], [0, -40, -3, 70.4, 40, 1], [41, 1600, 1408]),
    "nuscenes10": ([0.075, 0.075, 0.2], [-54, -54, -5, 54, 54, 3], [41, 1440, 1440]),
    "waymo": ([0.1, 0.1, 0.15], [-75.2, -75.2, -2, 75.2, 75.2, 4], [41, 1504, 1504]),
}


# ------------------------------------------------------------------------------------------------
# worker side: runs under any spconv 2.x
def load_points(data_dir, scan):
    if scan == "kitti":
        return np.fromfile(f"{data_dir}/kitti_000008.bin", dtype=np.float32).reshape(-1, 4)
    if scan == "waymo":
        xyz = np.load(f"{data_dir}/waymo_like_198k.npz")["pc"]
        return np.concatenate([xyz, np.zeros((len(xyz), 1), np.float32)], 1)
    pts = np.fromfile(f"{data_dir}/nuscenes_lidar_top.bin", dtype=np.float32).reshape(-1, 5)[:, :4]
    out = []
    for k in range(10):  # ten 'sweeps': the scan turned and shifted
        a = k * 0.31
        rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]], np.float32)
        p = pts.copy()
        p[:, :2] = p[:, :2] @ rot.T + np.float32(0.35 * k)
        out.append(p)
    return np.concatenate(out)


def voxelize_scan(data_dir, scan):
    """``(features [N, 4] mean of the points, indices [N, 4] int32 batch 0, spatial_shape)`` of a scan, with
    spconv's PointToVoxel (any spconv 2.x: the worker also runs under the original)."""
    import torch
    from spconv.pytorch.utils import PointToVoxel
    vsize, rng, shape = SCANS[scan]
    vox, coords, npv = PointToVoxel(vsize, rng, 4, 400000, 10)(torch.from_numpy(load_points(data_dir, scan)))
    feats = vox.sum(1) / npv.clamp(min=1).unsqueeze(-1).to(vox.dtype)
    idx = torch.cat([torch.zeros(len(coords), 1, dtype=torch.int32), coords.int()], 1).contiguous()
    return feats, idx, shape


def build_model(name, spconv, nn, channels):
    def block(cin, cout, k, key, stride=1, padding=0, subm=True):
        conv = (spconv.SubMConv3d(cin, cout, k, bias=False, indice_key=key) if subm else
                spconv.SparseConv3d(cin, cout, k, stride=stride, padding=padding, bias=False, indice_key=key))
        return spconv.SparseSequential(conv, nn.BatchNorm1d(cout, eps=1e-3, momentum=0.01), nn.ReLU())

    class BasicBlock(spconv.SparseModule):
        def __init__(self, c, key):
            super().__init__()
            self.conv1 = spconv.SubMConv3d(c, c, 3, bias=False, indice_key=key)
            self.bn1 = nn.BatchNorm1d(c, eps=1e-3, momentum=0.01)
            self.conv2 = spconv.SubMConv3d(c, c, 3, bias=False, indice_key=key)
            self.bn2 = nn.BatchNorm1d(c, eps=1e-3, momentum=0.01)

        def forward(self, x):
            out = self.conv1(x)
            out = out.replace_feature(torch_relu(self.bn1(out.features)))
            out = self.conv2(out)
            return out.replace_feature(torch_relu(self.bn2(out.features) + x.features))

    import torch
    torch_relu = torch.relu
    c = channels
    if name == "second":
        return spconv.SparseSequential(
            block(c, 16, 3, "subm1"), block(16, 16, 3, "subm1"),
            block(16, 32, 3, "spconv2", 2, 1, False), block(32, 32, 3, "subm2"), block(32, 32, 3, "subm2"),
            block(32, 64, 3, "spconv3", 2, 1, False), block(64, 64, 3, "subm3"), block(64, 64, 3, "subm3"),
            block(64, 64, 3, "spconv4", 2, (0, 1, 1), False), block(64, 64, 3, "subm4"), block(64, 64, 3, "subm4"),
            block(64, 128, (3, 1, 1), "spconv_down2", (2, 1, 1), 0, False))
    if name == "res":
        return spconv.SparseSequential(
            block(c, 16, 3, "subm1"), BasicBlock(16, "res1"), BasicBlock(16, "res1"),
            block(16, 32, 3, "spconv2", 2, 1, False), BasicBlock(32, "res2"), BasicBlock(32, "res2"),
            block(32, 64, 3, "spconv3", 2, 1, False), BasicBlock(64, "res3"), BasicBlock(64, "res3"),
            block(64, 128, 3, "spconv4", 2, (0, 1, 1), False), BasicBlock(128, "res4"), BasicBlock(128, "res4"),
            block(128, 128, (3, 1, 1), "spconv_down2", (2, 1, 1), 0, False))
    kind, width = name.split("_")  # layer workloads: subm_64, strided_32
    width = int(width)
    if kind == "subm":
        return spconv.SparseSequential(spconv.SubMConv3d(width, width, 3, bias=False, indice_key="s"))
    return spconv.SparseSequential(spconv.SparseConv3d(width, width, 3, 2, 1, bias=False, indice_key="d"))


def count_pairs_and_flops(model, x, spconv):
    """Useful FLOPs 2 x pairs x Cin x Cout / groups over the conv layers (needs this package's maps)."""
    try:
        from spconv.pytorch.conv import SparseConvolution
        from spconv.pytorch import indice_keys  # noqa: F401  (only in this package)
    except ImportError:
        return None, None, None
    flops, map_bytes, widest, seen = 0, 0, 0, set()

    def hook(mod, inp, out):
        nonlocal flops, map_bytes, widest
        data = out.indice_dict.get(mod.indice_key) if mod.indice_key else None
        if data is None:
            return
        f_in, f_out = inp[0].features, out.features
        widest = max(widest, f_in.numel() * f_in.element_size() + f_out.numel() * f_out.element_size())
        pairs = int((data.indice_pairs >= 0).sum())
        flops += 2 * pairs * mod.in_channels * mod.out_channels // mod.groups
        if id(data) not in seen:
            seen.add(id(data))
            map_bytes += data.indice_pairs.numel() * 4 + data.out_indices.numel() * 4

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, SparseConvolution)]
    import torch
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return flops, map_bytes, widest


def _vm_kb(field):
    """VmRSS / VmHWM of this process in kB (Linux), or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss():
    """Resets VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(args):
    import torch
    from torch import nn
    import spconv.pytorch as spconv

    torch.manual_seed(0)
    feats, idx, shape = voxelize_scan(args.data, args.scan)
    channels = 4
    if not args.model in ("second", "res"):
        channels = int(args.model.split("_")[1])
        feats = torch.randn(len(idx), channels)
    model = build_model(args.model, spconv, nn, channels)

    def make_input(grad=False):
        return spconv.SparseConvTensor(feats.clone().requires_grad_(grad), idx, shape, 1)

    res = {"scan": args.scan, "model": args.model, "mode": args.mode, "voxels": int(len(idx)),
           "threads": torch.get_num_threads()}
    times, map_times = [], []
    try:
        from spconv.pytorch import ops as our_ops
        builders = [n for n in ("build_subm_map", "build_conv_map") if hasattr(our_ops, n)]
    except ImportError:
        our_ops, builders = None, []

    def timed(fn):
        def wrapped(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            map_times[-1] += time.perf_counter() - t0
            return out
        return wrapped

    with torch.no_grad():  # one-time initialisations (thread pool, op dispatch) on a few sites, not measured
        model.eval()
        model(spconv.SparseConvTensor(feats[:64].clone(), idx[:64].clone(), shape, 1))
    originals = {n: getattr(our_ops, n) for n in builders}
    for n in builders:
        setattr(our_ops, n, timed(originals[n]))
    out = None
    # peak memory of the first forward on the scan: VmHWM reset just before it, minus the RSS then
    can_reset = args.mode == "eval" and _reset_peak_rss()
    rss_before = _vm_kb("VmRSS")
    for rep in range(args.reps + 1):
        out = None  # the previous output (and the kernel maps it holds) is not kept alive during this rep
        map_times.append(0.0)
        if args.mode == "train":
            model.train()
            x = make_input(False)  # voxel features are data: a training step needs no gradient for them
            t0 = time.perf_counter()
            out = model(x)
            out.features.square().mean().backward()
            times.append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
        else:
            model.eval()
            x = make_input(False)
            with torch.no_grad():
                if args.mode == "bf16":
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        t0 = time.perf_counter()
                        out = model(x)
                        times.append(time.perf_counter() - t0)
                else:
                    t0 = time.perf_counter()
                    out = model(x)
                    times.append(time.perf_counter() - t0)
        if rep == 0 and can_reset and rss_before is not None:
            res["fwd_peak_mb"] = (_vm_kb("VmHWM") - rss_before) / 1024
    for n in builders:
        setattr(our_ops, n, originals[n])
    res["median_s"] = statistics.median(times[1:])
    res["first_s"] = times[0]
    if builders:
        res["map_s"] = statistics.median(map_times[1:])
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res["out_sites"] = int(out.indices.shape[0])
    if args.mode == "bf16":
        model.eval()
        with torch.no_grad():
            ref = model(make_input(False)).features
            with torch.autocast("cpu", dtype=torch.bfloat16):
                low = model(make_input(False)).features.float()
        res["bf16_rel_err"] = float((low - ref).abs().max() / ref.abs().max())
    if args.mode == "eval":
        model.eval()
        out = None
        flops, map_bytes, widest = count_pairs_and_flops(model, make_input(False), spconv)
        if flops is not None:
            res["flops"] = flops
            res["map_mb"] = map_bytes / 2 ** 20
            # what a forward must hold: its kernel maps, the network input and the widest conv's input + output
            res["held_mb"] = (map_bytes + feats.numel() * 4 + widest) / 2 ** 20
    print(json.dumps(res))


# ------------------------------------------------------------------------------------------------
# orchestrator side
def matmul_peak(dtype_name="float32", n=2048, reps=5):
    import torch
    dtype = getattr(torch, dtype_name)
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    a @ b
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        ts.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(ts) / 1e9


def cpu_description():
    """CPU model, the ISA flags that pick the kernels, and which bf16 kernel / blocking this install uses."""
    import platform
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    out = {"model": model, "avx2": "avx2" in flags, "avx512f": "avx512f" in flags,
           "avx512_bf16": "avx512_bf16" in flags, "amx": sorted(f for f in flags if f.startswith("amx")),
           "amx_bf16": "amx_bf16" in flags and "amx_tile" in flags}
    try:
        import spconv._C as ext
        out["bf16_kernel"] = ext.bf16_kernel()
        out["blocking"] = ext.cpu_blocking()
    except (ImportError, AttributeError):
        pass
    return out


def run_worker(python, scan, model, mode, reps, data, threads=None):
    cmd = [python, os.path.abspath(__file__), "--worker", "--scan", scan, "--model", model, "--mode", mode,
           "--reps", str(reps), "--data", data]
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd="/")
    lines = [line for line in proc.stdout.strip().splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        err = proc.stderr.strip().splitlines()
        return {"error": err[-1] if err else f"exit {proc.returncode}"}
    return json.loads(lines[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scans", nargs="+", default=["kitti", "nuscenes10", "waymo"], choices=list(SCANS))
    ap.add_argument("--models", nargs="+", default=["second", "res", "layers"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--data", default=DEFAULT_DATA,
                    help="folder with the scans kitti_000008.bin, nuscenes_lidar_top.bin, waymo_like_198k.npz "
                         "(default: $SPCONV_DATA)")
    ap.add_argument("--compare", help="python of another spconv install, e.g. /tmp/spconv-ref/bin/python")
    ap.add_argument("--compare-threads", type=int, default=None,
                    help="OMP_NUM_THREADS for the compared install (spconv 2.3.8's CPU build is only correct with 1)")
    ap.add_argument("--json", default=None, help="write all results to this file")
    # worker mode
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--scan", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    if not args.data or not os.path.isdir(args.data):
        sys.exit(f"no scan folder ({args.data or 'neither --data nor SPCONV_DATA given'}): pass --data DIR or set "
                 "SPCONV_DATA to the folder holding kitti_000008.bin, nuscenes_lidar_top.bin and waymo_like_198k.npz")

    import torch
    peak32 = matmul_peak("float32")
    peak16 = matmul_peak("bfloat16")
    cpu = cpu_description()
    print(f"machine: {cpu['model']}, {os.cpu_count()} cores (AVX-512 {cpu['avx512f']}, AVX512-BF16 "
          f"{cpu['avx512_bf16']}, AMX {' '.join(cpu['amx']) or 'no'}; bf16 kernel {cpu.get('bf16_kernel', '?')}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"measured matmul peak fp32 {peak32:.0f} GFLOP/s, bf16 {peak16:.0f} GFLOP/s")
    workloads = []
    for model in args.models:
        if model == "layers":
            workloads += [f"subm_{c}" for c in (16, 32, 64, 128)] + ["strided_32", "strided_64"]
        else:
            workloads.append(model)
    results = []
    header = (f"{'workload':<12} {'scan':<11} {'voxels':>7} {'fwd ms':>8} {'train ms':>9} {'train/fwd':>9} "
              f"{'map ms':>7} {'map %':>6} {'GFLOP':>6} {'GFLOP/s':>8} {'conv GF/s':>9} {'x bound':>8} "
              f"{'peak MB':>8} {'held MB':>8} {'bf16 ms':>8} {'bf16 x':>7} {'bf16 err':>9}"
              + (f" {'other ms':>9} {'speed-up':>9}" if args.compare else ""))
    print(header)
    for scan in args.scans:
        for wl in workloads:
            ev = run_worker(sys.executable, scan, wl, "eval", args.reps, args.data)
            tr = run_worker(sys.executable, scan, wl, "train", args.reps, args.data)
            bf = run_worker(sys.executable, scan, wl, "bf16", args.reps, args.data) if wl in (
                "subm_64", "subm_128", "second", "res") else {}
            other = (run_worker(args.compare, scan, wl, "eval", max(1, args.reps // 2), args.data,
                                args.compare_threads) if args.compare else {})
            row = {"workload": wl, "scan": scan, "eval": ev, "train": tr, "bf16": bf, "other": other}
            results.append(row)
            if "error" in ev:
                print(f"{wl:<12} {scan:<11} error: {ev['error']}")
                continue
            fwd = ev["median_s"]
            trn = tr.get("median_s", float("nan"))
            flops = ev.get("flops", 0)
            gflops = flops / fwd / 1e9 if flops else float("nan")
            conv_gflops = flops / (fwd - ev.get("map_s", 0.0)) / 1e9 if flops else float("nan")
            bound = flops / (peak32 * 1e9) if flops else float("nan")
            line = (f"{wl:<12} {scan:<11} {ev['voxels']:>7} {fwd * 1e3:8.1f} {trn * 1e3:9.1f} {trn / fwd:9.2f} "
                    f"{ev.get('map_s', float('nan')) * 1e3:7.1f} {100 * ev.get('map_s', float('nan')) / fwd:6.1f} "
                    f"{flops / 1e9:6.2f} {gflops:8.1f} {conv_gflops:9.1f} {fwd / bound if flops else float('nan'):8.2f} "
                    f"{ev.get('fwd_peak_mb', float('nan')):8.0f} {ev.get('held_mb', float('nan')):8.0f}")
            if bf and "median_s" in bf:
                line += f" {bf['median_s'] * 1e3:8.1f} {fwd / bf['median_s']:7.2f} {bf['bf16_rel_err']:9.1e}"
            else:
                line += f" {'-':>8} {'-':>7} {'-':>9}"
            if args.compare:
                if "median_s" in other:
                    line += f" {other['median_s'] * 1e3:9.1f} {other['median_s'] / fwd:8.1f}x"
                else:
                    line += f" {'error':>9} {'-':>9}"
            print(line, flush=True)
    print("x bound = forward time / (useful FLOPs / measured fp32 matmul peak); conv GF/s = useful FLOPs / "
          "(forward - map) time; map % = kernel-map build time / forward time; peak MB = RSS growth during the first eval forward on the scan; held MB = its kernel "
          "maps + the network input + the widest conv layer's input and output features")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu, "peak_fp32_gflops": peak32, "peak_bf16_gflops": peak16, "results": results}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
