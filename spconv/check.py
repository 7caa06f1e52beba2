"""``python -m spconv.check --device cuda``: every sparse op on the GPU against the CPU kernels, then timings.

For the first GPU this package meets. Each op of ``torch.ops.spconv`` that has a device kernel (kernel maps,
``invert_map``, ``gather_conv`` and its weight gradient, max/avg pooling) runs on random sites on the
device and on the CPU; maps and argmax must be equal, values equal within the dtype's tolerance. Then it
times (medians, ms) SubM layers of 16..128 channels, a strided layer and the SECOND backbone on the KITTI
and nuScenes-x10 scans (``--data DIR`` or ``SPCONV_DATA``) in fp32/fp16/bf16. Without a CUDA device it says
so and exits with status 2.

``--device interpreter`` runs the same checks on CPU tensors through the Triton kernels in Triton's
interpreter (``TRITON_INTERPRET=1`` must be set before the start; tiny sizes, no timings): how the check
itself is tested on a machine without a GPU.
"""
import argparse
import os
import statistics
import sys
import time

import torch

OPS_CHECKED = ("build_subm_map", "build_conv_map", "invert_map", "gather_conv", "gather_conv_weight_grad",
               "maxpool_forward", "maxpool_backward", "avgpool_forward", "active_counts")


def _sites(n: int, shape, batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    volume = 1
    for s in shape:
        volume *= s
    rows = []
    for b in range(batch):
        flat = torch.randperm(volume, generator=g)[:n]
        coords = []
        for s in reversed(shape):
            coords.append(flat % s)
            flat = flat // s
        rows.append(torch.cat([torch.full((n, 1), b), torch.stack(coords[::-1], 1)], 1))
    return torch.cat(rows).int().contiguous()


def check_ops(device: str, n: int = 300, channels: int = 16, dtypes=(torch.float32,), on_device=None) -> list:
    """``[(op, dtype, ok, detail)]``: each op on ``device`` against the compiled CPU kernel. ``on_device``: a
    context manager entered around the device calls only (the interpreter's ``triton_on_cpu``)."""
    import contextlib
    import spconv.pytorch  # noqa: F401  (loads the ops and registers the device kernels)
    cpu_ops = torch.ops.spconv

    class _DeviceOps:  # torch.ops.spconv, called inside on_device()
        def __getattr__(self, name):
            op = getattr(cpu_ops, name)

            def call(*args):
                with (on_device() if on_device else contextlib.nullcontext()):
                    return op(*args)
            return call
    ops, dops = cpu_ops, _DeviceOps()
    shape, ksize = [12, 12, 12], [3, 3, 3]
    ones = [1, 1, 1]
    idx = _sites(n, shape, 2, seed=0)
    results = []

    def record(op, dtype, fn):
        try:
            detail = fn()
            results.append((op, str(dtype).replace("torch.", ""), True, detail or "equal"))
        except Exception as e:  # noqa: BLE001  (a report, not a test runner)
            results.append((op, str(dtype).replace("torch.", ""), False, f"{type(e).__name__}: {e}"[:200]))

    def equal(a, b, what):
        if not torch.equal(a.cpu(), b):
            raise AssertionError(f"{what} differs from the CPU kernel")

    dev = lambda t: t.to(device)  # noqa: E731
    subm_cpu = ops.build_subm_map(idx, 2, shape, ksize, ones)
    record("build_subm_map", "int32", lambda: equal(dops.build_subm_map(dev(idx), 2, shape, ksize, ones), subm_cpu,
                                                    "table"))
    out_shape = [6, 6, 6]
    conv_cpu = ops.build_conv_map(idx, 2, shape, out_shape, ksize, [2, 2, 2], ones, ones, False)

    def conv_map():
        o, t = dops.build_conv_map(dev(idx), 2, shape, out_shape, ksize, [2, 2, 2], ones, ones, False)
        equal(o, conv_cpu[0], "output sites")
        equal(t, conv_cpu[1], "table")
    record("build_conv_map", "int32", conv_map)
    inv_cpu = ops.invert_map(conv_cpu[1], idx.shape[0])
    record("invert_map", "int32", lambda: equal(dops.invert_map(dev(conv_cpu[1]), idx.shape[0]), inv_cpu, "table"))
    table = conv_cpu[1]
    g = torch.Generator().manual_seed(1)
    for dtype in dtypes:
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        f = torch.randn(idx.shape[0], channels, generator=g).to(dtype)
        w = (torch.randn(channels, 27, channels, generator=g) / 8).to(dtype)
        dout = torch.randn(table.shape[0], channels, generator=g).to(dtype)

        def close(a, b, what):
            a, b = a.cpu().double(), b.double()
            err = float((a - b).abs().max()) / max(1.0, float(b.abs().max()))
            if err > tol:
                raise AssertionError(f"{what}: relative error {err:.2e} > {tol:.0e}")
            return f"max rel. error {err:.1e}"

        record("gather_conv", dtype, lambda: close(dops.gather_conv(dev(f), dev(table), dev(w), 1, False),
                                                   ops.gather_conv(f.float(), table, w.float(), 1, False), "out"))
        record("gather_conv_weight_grad", dtype, lambda: close(
            dops.gather_conv_weight_grad(dev(f), dev(table), dev(dout), 1),
            ops.gather_conv_weight_grad(f.float(), table, dout.float(), 1), "weight grad"))

        def maxpool():
            o, a = dops.maxpool_forward(dev(f), dev(table), True)
            ro, ra = ops.maxpool_forward(f, table, True)
            equal(a, ra, "argmax")
            equal(o, ro, "max")
            equal(dops.maxpool_backward(dev(dout), a, dev(inv_cpu)), ops.maxpool_backward(dout, ra, inv_cpu),
                  "max-pool gradient") if dtype == torch.float32 else None
        record("maxpool_forward/backward", dtype, maxpool)
        record("avgpool_forward", dtype, lambda: close(dops.avgpool_forward(dev(f), dev(table)),
                                                       ops.avgpool_forward(f.float(), table), "mean"))
    record("active_counts", "int32", lambda: equal(dops.active_counts(dev(table)), ops.active_counts(table), "counts"))
    return results


def _median_ms(fn, reps: int, sync) -> float:
    fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def time_layers(device: str, data, reps: int = 10) -> list:
    """``[(workload, dtype, ms)]`` on the device: SubM 16..128 and a strided layer on the nuScenes-x10 scan (or
    random sites without data), the SECOND backbone on KITTI and nuScenes x10 when the scans are found."""
    import spconv.pytorch as spconv
    from spconv.benchmark import cpu as bench
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    rows = []
    scans = {}
    if data and os.path.isdir(data):
        for scan in ("kitti", "nuscenes10"):
            scans[scan] = bench.voxelize_scan(data, scan)
    else:
        idx = _sites(40000, [40, 400, 400], 1, seed=2)
        scans["random"] = (torch.rand(idx.shape[0], 4), idx, [40, 400, 400])
    layer_scan = "nuscenes10" if "nuscenes10" in scans else next(iter(scans))
    feats, idx, shape = scans[layer_scan]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for c in (16, 32, 64, 128):
            conv = spconv.SubMConv3d(c, c, 3, indice_key="s").to(device, dtype)
            x = spconv.SparseConvTensor(torch.randn(idx.shape[0], c, device=device, dtype=dtype), idx.to(device),
                                        shape, int(idx[:, 0].max()) + 1)
            y = conv(x)  # builds and caches the map
            rows.append((f"SubM {c}->{c} ({layer_scan}, map cached)", dtype,
                         _median_ms(lambda: conv(y), reps, sync)))
        conv = spconv.SparseConv3d(64, 64, 3, 2, 1).to(device, dtype)
        x = spconv.SparseConvTensor(torch.randn(idx.shape[0], 64, device=device, dtype=dtype), idx.to(device),
                                    shape, int(idx[:, 0].max()) + 1)
        rows.append((f"strided 64->64 ({layer_scan}, map included)", dtype, _median_ms(lambda: conv(x), reps, sync)))
        for scan, (f, i, s) in scans.items():
            if scan == "random":
                continue
            net = bench.build_model("second", spconv, torch.nn, 4).to(device, dtype).eval()
            x = spconv.SparseConvTensor(f.to(device, dtype), i.to(device), s, int(i[:, 0].max()) + 1)
            with torch.no_grad():
                rows.append((f"SECOND VoxelBackBone8x ({scan})", dtype, _median_ms(lambda: net(x), reps, sync)))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or interpreter (see above)")
    ap.add_argument("--data", default=os.environ.get("SPCONV_DATA"), help="folder of the scans (default $SPCONV_DATA)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--no-timings", action="store_true")
    args = ap.parse_args(argv)
    import spconv.pytorch  # noqa: F401  (loads the ops and registers the device kernels)
    if args.device == "interpreter":
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("--device interpreter needs TRITON_INTERPRET=1 in the environment before the start")
            return 2
        from spconv.triton.dispatch import triton_on_cpu
        results = check_ops("cpu", n=60, channels=8, on_device=triton_on_cpu)
        timings = []
    else:
        if not args.device.startswith("cuda") or not torch.cuda.is_available():
            print(f"no CUDA device here (torch {torch.__version__}, torch.cuda.is_available() is False): nothing "
                  "checked. On a machine without a GPU, `TRITON_INTERPRET=1 python -m spconv.check --device "
                  "interpreter` runs the checks through Triton's interpreter.")
            return 2
        print(f"device: {torch.cuda.get_device_name(torch.device(args.device))}, torch {torch.__version__}")
        results = check_ops(args.device, dtypes=(torch.float32, torch.float16, torch.bfloat16))
        timings = [] if args.no_timings else time_layers(args.device, args.data, args.reps)
    width = max(len(r[0]) for r in results)
    for op, dtype, ok, detail in results:
        print(f"{'ok  ' if ok else 'FAIL'} {op:<{width}} {dtype:<9} {detail}")
    if timings:
        print(f"\n{'workload':<44} {'dtype':<9} {'median ms':>10}")
        for name, dtype, ms in timings:
            print(f"{name:<44} {str(dtype).replace('torch.', ''):<9} {ms:>10.2f}")
    failed = sum(not r[2] for r in results)
    print(f"\n{len(results) - failed} of {len(results)} op checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
