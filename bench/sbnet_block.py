"""Sparse ResNet bottleneck block (spconv.sbnet.SparseBlockResNet) vs the same block run densely, CPU.

For each ResNet-stage shape and mask density, a mask with a solid top-left rectangle of that area
(SBNet's benchmark mask) or a set of road-like bands (--mask roads) is reduced to active blocks; the
sparse time includes reduce_mask, gather, the three BN-ReLU-convs on the block stack and the in-place
scatter-add (SBNet's sparse_scatter_var) on a channels-last input; the out-of-place column adds the copy
of the dense input. The dense baseline is the same module's dense_forward in eval mode, in NCHW or
channels-last memory format, whichever is faster. Block sizes are searched per row and the best kept
(as SBNet did). Dense and sparse runs alternate; medians over --reps runs after --warmup runs.

glibc's malloc unmaps every freed block above 32 MB, so by default each big dense tensor page-faults
again on every call (dense ~8x slower here). The benchmark re-executes itself with
MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ raised so that both sides run at compute speed; pass
--system-malloc to measure with the default allocator instead.

usage: python bench/sbnet_block.py [--shapes 64x400x352 128x200x176] [--densities 0.5 0.2 0.1 0.05]
                                   [--blocks 10 18 26 34] [--mask topleft|roads] [--reps 15]
                                   [--json bench/results/sbnet_block.json] [--system-malloc]
"""
import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 32), "MALLOC_TRIM_THRESHOLD_": str(1 << 32),
              "MALLOC_TOP_PAD_": str(1 << 28)}

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def parse_shape(s):
    c, h, w = (int(v) for v in s.lower().split("x"))
    return c, h, w


def make_mask(kind, h, w, density, seed=0):
    import torch
    mask = torch.zeros(1, h, w)
    if kind == "topleft":
        side = math.sqrt(density)
        mask[0, : max(1, round(h * side)), : max(1, round(w * side))] = 1
    else:  # roads: random straight bands (horizontal/vertical/diagonal) until the area is reached
        g = torch.Generator().manual_seed(seed)
        yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                indexing="ij")
        width = max(2.0, 0.03 * min(h, w))
        while mask.mean() < density:
            angle = torch.rand((), generator=g).item() * math.pi
            cy, cx = torch.rand((), generator=g).item() * h, torch.rand((), generator=g).item() * w
            dist = ((yy - cy) * math.cos(angle) - (xx - cx) * math.sin(angle)).abs()
            mask[0][dist < width / 2] = 1
    return mask


def median_ms(fn, reps, warmup, before=None):
    for _ in range(warmup):
        if before:
            before()
        fn()
    times = []
    for _ in range(reps):
        if before:
            before()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["64x400x352", "128x200x176", "256x100x88"],
                    help="CxHxW of the block input (batch 1); mid channels = C/4")
    ap.add_argument("--densities", nargs="+", type=float, default=[0.5, 0.2, 0.1, 0.05])
    ap.add_argument("--blocks", nargs="+", type=int, default=[10, 14, 18, 26, 34],
                    help="input block sizes to try (halo included: output tile = size - 2)")
    ap.add_argument("--mask", choices=["topleft", "roads"], default="topleft")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", default=os.path.join(HERE, "results", "sbnet_block.json"))
    ap.add_argument("--system-malloc", action="store_true", help="keep glibc's default malloc settings")
    a = ap.parse_args()

    if not a.system_malloc and any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, **MALLOC_ENV})

    import torch
    import spconv.sbnet as sb

    torch.manual_seed(0)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"malloc: {'system default' if a.system_malloc else 'mmap/trim thresholds raised'}, mask: {a.mask}")
    head = (f"{'shape':<14} {'density':>7} {'blocks':>6} {'block':>6} {'dense ms':>9} {'sparse ms':>9} "
            f"{'speed-up':>8} {'out-of-place ms':>15}  (dense NCHW / channels-last ms)")
    print(head)
    rows = []
    for shape in a.shapes:
        c, h, w = parse_shape(shape)
        x0 = torch.randn(1, c, h, w).contiguous(memory_format=torch.channels_last)
        inputs = {"nchw": x0.contiguous(), "channels_last": x0}
        dense_mod = sb.SparseBlockResNet(c, c // 4, 3, 18).eval()
        with torch.no_grad():
            dense_ms = {fmt: median_ms(lambda: dense_mod.dense_forward(xin), a.reps, a.warmup)
                        for fmt, xin in inputs.items()}
        fmt = min(dense_ms, key=dense_ms.get)
        for density in a.densities:
            mask = make_mask(a.mask, h, w, density)
            x = x0.clone()
            restore = lambda: x.copy_(x0)  # noqa: E731  (the in-place block always starts from x0)
            tried = {}
            for bsize in a.blocks:
                if bsize - 2 > min(h, w):
                    continue
                mod = sb.SparseBlockResNet(c, c // 4, 3, bsize, inplace=True).eval()
                with torch.no_grad():
                    tried[bsize] = median_ms(lambda: mod(x, mod.reduce_mask(mask, tol=0.5).indices),
                                             max(5, a.reps // 2), a.warmup, before=restore)
            bsize = min(tried, key=tried.get)
            mod = sb.SparseBlockResNet(c, c // 4, 3, bsize, inplace=True).eval()
            oop = sb.SparseBlockResNet(c, c // 4, 3, bsize, inplace=False).eval()
            # dense and sparse timed in alternation, so that load from elsewhere hits both alike
            t_dense, t_sparse, t_oop = [], [], []
            with torch.no_grad():
                for r in range(a.warmup + a.reps):
                    t0 = time.perf_counter()
                    dense_mod.dense_forward(inputs[fmt])
                    t1 = time.perf_counter()
                    restore()
                    t2 = time.perf_counter()
                    mod(x, mod.reduce_mask(mask, tol=0.5).indices)
                    t3 = time.perf_counter()
                    oop(x0, oop.reduce_mask(mask, tol=0.5).indices)
                    t4 = time.perf_counter()
                    if r >= a.warmup:
                        t_dense.append(t1 - t0)
                        t_sparse.append(t3 - t2)
                        t_oop.append(t4 - t3)
            dense, sparse_ms, oop_ms = (statistics.median(t) * 1e3 for t in (t_dense, t_sparse, t_oop))
            count = mod.reduce_mask(mask, tol=0.5).count
            p = mod.block_params((h, w))
            tile_density = count * p.bsize_out[0] * p.bsize_out[1] / (h * w)
            row = dict(shape=f"1x{c}x{h}x{w}", mid_channels=c // 4, density=density, mask=a.mask,
                       block_size=bsize, tile=p.bsize_out[0], active_blocks=count,
                       tile_density=round(tile_density, 4), dense_ms=round(dense, 3), dense_format=fmt,
                       dense_nchw_ms=round(dense_ms["nchw"], 3),
                       dense_channels_last_ms=round(dense_ms["channels_last"], 3),
                       sparse_ms=round(sparse_ms, 3), speedup=round(dense / sparse_ms, 2),
                       sparse_out_of_place_ms=round(oop_ms, 3),
                       block_search_ms={str(k): round(v, 3) for k, v in tried.items()})
            rows.append(row)
            print(f"{row['shape']:<14} {density:7.2f} {count:6d} {bsize:3d}/{p.bsize_out[0]:<2d} {dense:9.2f} "
                  f"{sparse_ms:9.2f} {dense / sparse_ms:7.1f}x {oop_ms:15.2f}  "
                  f"({dense_ms['nchw']:.1f} / {dense_ms['channels_last']:.1f})", flush=True)
    meta = dict(torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.machine(),
                malloc="system" if a.system_malloc else MALLOC_ENV, reps=a.reps, warmup=a.warmup,
                mask=a.mask, blocks_tried=a.blocks)
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"# wrote {a.json}")


if __name__ == "__main__":
    main()
