"""``python -m spconv``: version, backend, threads and CPU features of this installation.

Prints one ``key: value`` line each: the spconv version (API level), whether the compiled CPU
extension loads (and from where), which conv kernels (and bf16 kernel, and the tile sizes derived from the cache sizes) and CPU allocator it uses, the torch version, torch's intra-op (OpenMP) thread count, the
CPU's AVX2 / AVX-512 / AMX flags from /proc/cpuinfo (and the kernel level torch dispatches to), and
whether Triton imports.
"""
import importlib.util
import os
import platform
import sys


def cpu_flags(path: str = "/proc/cpuinfo") -> set:
    """The ``flags`` of the first processor in /proc/cpuinfo (empty where there is no such file)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _yes(b: bool) -> str:
    return "yes" if b else "no"


def info() -> dict:
    """The facts printed by ``python -m spconv``, as an ordered dict of strings."""
    from spconv.__version__ import __version__
    out = {"spconv": __version__, "python": platform.python_version(), "platform": platform.platform()}
    try:
        import torch
        out["torch"] = torch.__version__
        out["threads"] = f"{torch.get_num_threads()} (torch.get_num_threads(); OMP_NUM_THREADS="\
            f"{os.environ.get('OMP_NUM_THREADS', 'unset')}), {os.cpu_count()} logical CPUs"
    except Exception as e:  # pragma: no cover - torch is a hard dependency
        out["torch"] = f"not importable ({type(e).__name__}: {e})"
    try:
        import spconv._C as ext
        import torch
        n_ops = len([n for n in torch._C._dispatch_get_all_op_names() if n.startswith("spconv::")])
        out["backend"] = f"CPU extension loaded ({os.path.basename(ext.__file__)}, {n_ops} ops in torch.ops.spconv)"
        out["conv kernels"] = ext.conv_kernels()
        b = ext.cpu_blocking()
        kernel = ext.bf16_kernel()
        why = {"brgemm": "oneDNN batch-reduce GEMM via torch" + (", AMX tiles" if b["amx_bf16"] else ""),
               "avx512": "AVX512-BF16 implicit GEMM (vdpbf16ps)", "portable": "gather + GEMM",
               "fp32": "bf16 features on the fp32 FMA kernels"}.get(kernel, kernel)
        forced = os.environ.get("SPCONV_BF16_KERNEL")
        out["bf16 kernel"] = (f"{kernel} ({why}); "
                              + (f"forced by SPCONV_BF16_KERNEL={forced}" if forced else
                                 f"auto on this CPU (AMX {_yes(b['amx_bf16'])}; SPCONV_BF16_KERNEL="
                                 "brgemm|avx512|fp32|portable forces one)"))
        out["blocking"] = (f"L1d {b['l1d_bytes'] // 1024} KB, L2 {b['l2_bytes'] // 1024} KB ({b['cache_source']}); "
                           f"implicit-GEMM tile rows {b['tile_rows_64']} at 64 / {b['tile_rows_128']} at 128 "
                           f"output channels; brgemm tiles {b['brgemm_tile_rows_64']} / {b['brgemm_tile_rows_128']} "
                           f"rows, blocks of {b['brgemm_block_rows']} pairs; vdpbf16ps {b['bf16_dot_speedup']:.2f}x FMA FLOPs "
                           f"-> bf16 layers off brgemm use {b['bf16_small_layers']}")
        from spconv.pytorch import ops
        out["cpu allocator"] = ("spconv caching allocator for tensors >= 1 MB (SPCONV_CPU_CACHING_ALLOCATOR=0 to "
                                "turn off)" if ops.CACHING_ALLOCATOR else "PyTorch default")
    except Exception as e:
        out["backend"] = f"CPU extension NOT loaded ({type(e).__name__}: {e}); build it with bash scripts/setup.sh"
    flags = cpu_flags()
    if flags:
        avx512 = sorted(f for f in flags if f.startswith("avx512"))
        amx = sorted(f for f in flags if f.startswith("amx"))
        out["cpu"] = (f"AVX2 {_yes('avx2' in flags)}, AVX-512 {_yes('avx512f' in flags)}"
                      f"{' (' + ' '.join(avx512) + ')' if avx512 else ''}, AMX {_yes(bool(amx))}"
                      f"{' (' + ' '.join(amx) + ')' if amx else ''}")
        try:
            import torch
            out["cpu"] += f"; torch CPU capability {torch.backends.cpu.get_cpu_capability()}"
        except Exception:  # pragma: no cover
            pass
    else:
        out["cpu"] = f"{platform.machine()} (no /proc/cpuinfo flags)"
    if importlib.util.find_spec("triton") is None:
        out["triton"] = "not installed"
    else:
        try:
            import triton
            out["triton"] = f"importable ({triton.__version__})"
        except Exception as e:
            out["triton"] = f"installed but not importable ({type(e).__name__}: {e})"
    return out


def main() -> int:
    for key, value in info().items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
