"""Single-layer timings of the Triton backend (spconv.triton) on a real KITTI scan.

Workloads, on the voxels of ../shared/data/kitti_000008.bin voxelised with
PointToVoxel([0.05, 0.05, 0.1], [0, -40, -3, 70.4, 40, 1], 4, 40000, 5) (sparse shape 41 x 1600 x 1408):
SubMConv3d 3x3x3 with 16->16, 32->32, 64->64 and 128->128 channels, and a strided SparseConv3d
3x3x3, stride 2, padding 1, 16->32 (SECOND's first downsampling).

For each: kernel-map build, forward (implicit GEMM), backward (input gradient + weight gradient), as
medians over --reps runs after --warmup runs (which include Triton's autotuning), timed with CUDA
events; GFLOP/s counts 2 * pairs * C_in * C_out per GEMM pass (pairs = valid kernel-map entries).

    python bench/triton_conv.py --device cuda [--dtype fp16] [--reps 20] [--warmup 5]
    python bench/triton_conv.py --device cpu-interpret   # tiny smoke run in Triton's interpreter

Without a GPU, ``--device cuda`` prints that CUDA is unavailable and exits 0. ``cpu-interpret`` runs
each workload once on a few hundred of the scan's voxels through Triton's interpreter and checks the
result against the compiled CPU kernels; its times are not GPU timings.
"""
import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "data"))
sys.path.insert(0, os.path.join(HERE, ".."))

WORKLOADS = [  # name, kind, C_in, C_out
    ("SubM 16->16", "subm", 16, 16), ("SubM 32->32", "subm", 32, 32), ("SubM 64->64", "subm", 64, 64),
    ("SubM 128->128", "subm", 128, 128), ("SpConv s2 16->32", "conv", 16, 32),
]
SHAPE = [41, 1600, 1408]
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu-interpret"], default="cuda")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--tf32", action="store_true", help="allow TF32 for fp32 (spconv.constants.SPCONV_ALLOW_TF32)")
    ap.add_argument("--smoke-sites", type=int, default=300, help="voxels used by --device cpu-interpret")
    return ap.parse_args()


def load_voxels():
    """(indices int32 [N, 4] batch-first z, y, x; source) of the KITTI scan, or a generated scene without data."""
    import numpy as np
    import torch
    from spconv.pytorch.utils import PointToVoxel

    path = os.path.join(DATA, "kitti_000008.bin")
    if os.path.exists(path):
        points = np.fromfile(path, dtype=np.float32).reshape(-1, 4)
        source = "kitti_000008.bin"
    else:  # a generated street scene: ground plane plus boxes
        g = np.random.default_rng(0)
        ground = np.c_[g.uniform(0, 70, 15000), g.uniform(-40, 40, 15000), g.normal(-1.7, 0.03, 15000)]
        boxes = np.concatenate([np.c_[g.uniform(x, x + 4, 300), g.uniform(y, y + 2, 300), g.uniform(-1.7, 0, 300)]
                                for x, y in g.uniform([5, -30], [65, 30], size=(8, 2))])
        xyz = np.concatenate([ground, boxes]).astype(np.float32)
        points = np.c_[xyz, g.uniform(0, 1, len(xyz))].astype(np.float32)
        source = "generated scene (../shared/data absent)"
    gen = PointToVoxel([0.05, 0.05, 0.1], [0, -40, -3, 70.4, 40, 1], 4, 40000, 5)
    _, coords, _ = gen(torch.from_numpy(points))
    indices = torch.cat([torch.zeros(len(coords), 1, dtype=torch.int32), coords.int()], 1)
    return indices, source


def build_map(T, ops, kind, indices):
    if kind == "subm":
        return indices, T.build_subm_map(indices, SHAPE, [3] * 3, [1] * 3)
    out_shape = ops.get_conv_output_size(SHAPE, [3] * 3, [2] * 3, [1] * 3, [1] * 3)
    return T.build_conv_map(indices, SHAPE, out_shape, [3] * 3, [2] * 3, [1] * 3, [1] * 3, False)


def run_cuda(args, torch, T, ops, indices):
    dtype = getattr(torch, DTYPES[args.dtype])
    dev = torch.device("cuda")
    indices = indices.to(dev)
    print(f"device: {torch.cuda.get_device_name(dev)}, dtype {args.dtype}"
          + (" (TF32 allowed)" if args.tf32 and args.dtype == "fp32" else ""))
    print(f"{'workload':<18} {'pairs':>9} {'map ms':>8} {'fwd ms':>8} {'fwd GF/s':>9} {'bwd ms':>8} "
          f"{'bwd GF/s':>9} {'peak MiB':>9}")

    def timed(fn):
        for _ in range(args.warmup):
            fn()
        times = []
        for _ in range(args.reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    for name, kind, cin, cout in WORKLOADS:
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(len(indices), cin, generator=g, device=dev).to(dtype)
        w = (torch.randn(cout, 27, cin, generator=g, device=dev) * 0.05).to(dtype)
        out_idx, nbr = build_map(T, ops, kind, indices)
        inv = nbr.flip(1).contiguous() if kind == "subm" else T.invert_map(nbr, len(indices))
        dy = torch.randn(len(out_idx), cout, generator=g, device=dev).to(dtype)
        pairs = int((nbr >= 0).sum())
        flops = 2.0 * pairs * cin * cout
        torch.cuda.reset_peak_memory_stats(dev)
        t_map = timed(lambda: build_map(T, ops, kind, indices))
        t_fwd = timed(lambda: T.gather_conv(x, nbr, w, 1, False))
        t_bwd = timed(lambda: (T.gather_conv(dy, inv, w, 1, True), T.gather_conv_weight_grad(x, nbr, dy, 1)))
        peak = torch.cuda.max_memory_allocated(dev) / 2 ** 20
        print(f"{name:<18} {pairs:>9} {t_map:8.3f} {t_fwd:8.3f} {flops / t_fwd / 1e6:9.0f} {t_bwd:8.3f} "
              f"{2 * flops / t_bwd / 1e6:9.0f} {peak:9.1f}")


def run_interpret(args, torch, T, ops, indices):
    """Each workload once on a crop of the scan, Triton (interpreter) against the compiled CPU kernels."""
    dtype = getattr(torch, DTYPES[args.dtype])
    centre = indices[len(indices) // 2, 1:]
    order = (indices[:, 1:] - centre).abs().amax(1).argsort()  # the voxels nearest one voxel of the scan
    crop = indices[order[:args.smoke_sites].sort().values].contiguous()
    print(f"Triton interpreter smoke run on {len(crop)} of the {len(indices)} voxels, dtype {args.dtype} "
          "(CPU wall times of the interpreter, not GPU timings)")
    print(f"{'workload':<18} {'pairs':>7} {'map s':>7} {'fwd s':>7} {'bwd s':>7} {'max |err| vs CPU':>17}")
    worst = 0.0
    for name, kind, cin, cout in WORKLOADS:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(len(crop), cin, generator=g).to(dtype)
        w = (torch.randn(cout, 27, cin, generator=g) * 0.05).to(dtype)
        t0 = time.perf_counter()
        out_idx, nbr = build_map(T, ops, kind, crop)
        t1 = time.perf_counter()
        y = T.gather_conv(x, nbr, w, 1, False)
        t2 = time.perf_counter()
        inv = nbr.flip(1).contiguous() if kind == "subm" else T.invert_map(nbr, len(crop))
        dy = torch.randn(len(out_idx), cout, generator=g).to(dtype)
        dx = T.gather_conv(dy, inv, w, 1, True)
        dw = T.gather_conv_weight_grad(x, nbr, dy, 1)
        t3 = time.perf_counter()
        ref_idx, ref_nbr = (crop, ops.build_subm_map(crop, SHAPE, [3] * 3, [1] * 3)) if kind == "subm" else \
            ops.build_conv_map(crop, SHAPE, ops.get_conv_output_size(SHAPE, [3] * 3, [2] * 3, [1] * 3, [1] * 3),
                               [3] * 3, [2] * 3, [1] * 3, [1] * 3, False)
        if not (torch.equal(out_idx, ref_idx) and torch.equal(nbr, ref_nbr)):
            raise SystemExit(f"{name}: the Triton kernel map differs from the CPU one")
        err = max((y.float() - ops.gather_conv(x, nbr, w, 1, False).float()).abs().max().item(),
                  (dx.float() - ops.gather_conv(dy, inv, w, 1, True).float()).abs().max().item(),
                  (dw.float() - ops.gather_conv_weight_grad(x, nbr, dy, 1).float()).abs().max().item())
        worst = max(worst, err)
        print(f"{name:<18} {int((nbr >= 0).sum()):>7} {t1 - t0:7.2f} {t2 - t1:7.2f} {t3 - t2:7.2f} {err:17.2e}")
    tol = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 1e-1}[args.dtype]
    if worst > tol:
        raise SystemExit(f"max error {worst:.2e} above {tol:.0e}")


def main():
    args = parse_args()
    if args.device == "cpu-interpret":
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("CUDA is unavailable (no GPU, or a CPU-only torch build): no GPU timings to take. "
              "Use --device cpu-interpret for a small run of the same kernels in Triton's interpreter.")
        return 0
    try:
        import spconv.triton as T
        T.gather_conv  # noqa: B018  (imports triton)
    except ImportError as e:
        print(f"spconv.triton is unavailable: {e}")
        return 0
    from spconv import constants
    from spconv.pytorch import ops

    constants.SPCONV_ALLOW_TF32 = args.tf32
    indices, source = load_voxels()
    print(f"{source}: {len(indices)} voxels, sparse shape {SHAPE}")
    if args.device == "cuda":
        run_cuda(args, torch, T, ops, indices)
    else:
        run_interpret(args, torch, T, ops, indices)
    return 0


if __name__ == "__main__":
    sys.exit(main())
