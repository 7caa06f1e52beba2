"""Sparse ResNet bottleneck block (spconv.sbnet.SparseBlockResNet) vs the same block run densely, CPU.

For each ResNet-stage shape and mask density, a mask with a solid top-left rectangle of that area
(SBNet's benchmark mask) or a set of road-like bands (--mask roads) is reduced to active blocks
("tiles" = fraction of the image covered by the active output tiles, what the sparse block computes); the
sparse time includes reduce_mask, gather, the three BN-ReLU-convs on the block stack and the in-place
scatter-add (SBNet's sparse_scatter_var) on a channels-last input; the out-of-place column adds the copy
of the dense input. The dense baseline is the same module's dense_forward in eval mode, in NCHW or
channels-last memory format, whichever is faster. Block sizes are searched per row and the best kept
(as SBNet did). Cases are timed round-robin in chunks of 3 runs after a warm-up run (see
timed_rounds); the figures are medians.

glibc's malloc unmaps every freed block above 32 MB, so by default each big dense tensor page-faults
again on every call (dense ~8x slower here). The benchmark re-executes itself with
MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ raised so that both sides run at compute speed; pass
--system-malloc to measure with the default allocator instead.

usage: python bench/sbnet_block.py [--shapes 64x400x352 128x200x176] [--densities 0.5 0.2 0.1 0.05]
                                   [--blocks 10 18 26 34] [--mask topleft|roads] [--rounds 7]
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
        width = max(2.0, 0.08 * min(h, w))  # a ~6 m road on a ~70 m wide bird's-eye view
        while mask.mean() < density:
            angle = torch.rand((), generator=g).item() * math.pi
            cy, cx = torch.rand((), generator=g).item() * h, torch.rand((), generator=g).item() * w
            dist = ((yy - cy) * math.cos(angle) - (xx - cx) * math.sin(angle)).abs()
            mask[0][dist < width / 2] = 1
    return mask


def timed_rounds(cases, rounds, chunk=3):
    """Medians (ms) of named (fn, before) cases, timed round-robin in chunks: each round runs every
    case 1 + chunk times and keeps the last chunk (the first run re-warms caches after the other
    cases), so background load hits all cases alike without one case's cache misses leaking into the
    next case's timing. ``before`` runs untimed before each call."""
    samples = {name: [] for name in cases}
    for _ in range(rounds):
        for name, (fn, before) in cases.items():
            for k in range(1 + chunk):
                if before is not None:
                    before()
                t = time.perf_counter()
                fn()
                if k:
                    samples[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) * 1e3 for name, v in samples.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["64x400x352", "128x200x176", "256x100x88"],
                    help="CxHxW of the block input (batch 1); mid channels = C/4")
    ap.add_argument("--densities", nargs="+", type=float, default=[0.5, 0.2, 0.1, 0.05])
    ap.add_argument("--blocks", nargs="+", type=int, default=[10, 14, 18, 26, 34],
                    help="input block sizes to try (halo included: output tile = size - 2)")
    ap.add_argument("--mask", choices=["topleft", "roads"], default="topleft")
    ap.add_argument("--rounds", type=int, default=7,
                    help="round-robin rounds; each round times every case 3 times after 1 warm-up run")
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
    head = (f"{'shape':<14} {'density':>7} {'blocks':>6} {'block':>6} {'tiles':>6} {'dense ms':>9} {'sparse ms':>9} "
            f"{'speed-up':>8} {'out-of-place ms':>15}  (dense NCHW / channels-last ms)")
    print(head)
    rows = []
    for shape in a.shapes:
        c, h, w = parse_shape(shape)
        x0 = torch.randn(1, c, h, w).contiguous(memory_format=torch.channels_last)
        inputs = {"nchw": x0.contiguous(), "channels_last": x0}
        dense_mod = sb.SparseBlockResNet(c, c // 4, 3, 18).eval()
        with torch.no_grad():
            dense_ms = timed_rounds({fmt: (lambda xin=xin: dense_mod.dense_forward(xin), None)
                                     for fmt, xin in inputs.items()}, a.rounds)
        fmt = min(dense_ms, key=dense_ms.get)
        for density in a.densities:
            mask = make_mask(a.mask, h, w, density)
            x = x0.clone()
            restore = lambda: x.copy_(x0)  # noqa: E731  (the in-place block always starts from x0)

            def sparse_case(m, xin=x):
                return lambda: m(xin, m.reduce_mask(mask, tol=0.5).indices)

            # block-size search (as SBNet's benchmark did), then dense vs the best size
            mods = {b: sb.SparseBlockResNet(c, c // 4, 3, b, inplace=True).eval()
                    for b in a.blocks if b - 2 <= min(h, w)}
            with torch.no_grad():
                tried = timed_rounds({b: (sparse_case(m), restore) for b, m in mods.items()},
                                     max(2, a.rounds // 2))
                bsize = min(tried, key=tried.get)
                mod = mods[bsize]
                oop = sb.SparseBlockResNet(c, c // 4, 3, bsize, inplace=False).eval()
                t = timed_rounds({"dense": (lambda: dense_mod.dense_forward(inputs[fmt]), None),
                                  "sparse": (sparse_case(mod), restore),
                                  "oop": (sparse_case(oop, x0), None)}, a.rounds)
            dense, sparse_ms, oop_ms = t["dense"], t["sparse"], t["oop"]
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
            print(f"{row['shape']:<14} {density:7.2f} {count:6d} {bsize:3d}/{p.bsize_out[0]:<2d} {tile_density:6.3f} {dense:9.2f} "
                  f"{sparse_ms:9.2f} {dense / sparse_ms:7.1f}x {oop_ms:15.2f}  "
                  f"({dense_ms['nchw']:.1f} / {dense_ms['channels_last']:.1f})", flush=True)
    meta = dict(torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.machine(),
                malloc="system" if a.system_malloc else MALLOC_ENV, rounds=a.rounds, runs_per_round=3,
                mask=a.mask, blocks_tried=a.blocks)
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"# wrote {a.json}")


if __name__ == "__main__":
    main()
