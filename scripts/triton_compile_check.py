"""Compile every spconv.triton kernel for real GPU targets, without a GPU.

Triton's interpreter (how test/triton runs the kernels) executes the kernels with numpy and so does
not see what only the GPU compiler rejects (layouts, dot shapes, 64-bit atomics, register pressure).
This script runs Triton's full compiler (TTIR -> TTGIR -> LLVM -> PTX/cubin with ptxas for NVIDIA,
AMDGCN/hsaco for AMD) on each kernel and specialisation and reports failures; it checks that the
tensor-core paths are used (mma in the PTX, MFMA in the AMDGCN). It does not run anything.

    .venv/bin/python scripts/triton_compile_check.py            # sm_80, sm_90, gfx942, every config
    .venv/bin/python scripts/triton_compile_check.py --quick    # sm_80, a few configs (used by the tests)

TRITON_INTERPRET must be unset (the script refuses to run otherwise).
"""
import argparse
import os
import sys
import time

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("triton_compile_check: unset TRITON_INTERPRET (the interpreter does not compile kernels)")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from spconv.triton import conv as tconv  # noqa: E402
from spconv.triton import map_kernels as km  # noqa: E402
from spconv.triton import pool as tpool  # noqa: E402

TARGETS = {"sm80": GPUTarget("cuda", 80, 32), "sm90": GPUTarget("cuda", 90, 32), "gfx942": GPUTarget("hip", "gfx942", 64)}


def _jobs(quick: bool):
    """(name, kernel, argument types, constexprs, expect tensor cores)."""
    jobs = []
    for nd in ((3,) if quick else (1, 2, 3, 4)):
        for tr in (False, True):
            jobs.append((f"gather_map nd={nd} transposed={tr}", km._gather_map_kernel,
                         dict(out_idx_ptr="*i32", geo_ptr="*i64", keys_ptr="*i64", vals_ptr="*i32", nbr_ptr="*i32",
                              m_out="i32", kv="i32", cap_mask="i64"),
                         dict(NDIM=nd, TRANSPOSED=tr, BLOCK=256, TAPS=4), False))
            jobs.append((f"insert_outputs nd={nd} transposed={tr}", km._insert_outputs_kernel,
                         dict(idx_ptr="*i32", geo_ptr="*i64", keys_ptr="*i64", status_ptr="*i32", n="i32", kv="i32",
                              cap_mask="i64"),
                         dict(NDIM=nd, TRANSPOSED=tr, BLOCK=256, TAPS=4), False))
        jobs.append((f"insert_sites nd={nd}", km._insert_sites_kernel,
                     dict(idx_ptr="*i32", geo_ptr="*i64", keys_ptr="*i64", vals_ptr="*i32", status_ptr="*i32", n="i32",
                          cap_mask="i64"), dict(NDIM=nd, BLOCK=256), False))
        jobs.append((f"decode nd={nd}", km._decode_kernel,
                     dict(keys_ptr="*i64", out_idx_ptr="*i32", geo_ptr="*i64", m_out="i32"), dict(NDIM=nd, BLOCK=256),
                     False))
    for dt in (("fp32",) if quick else ("fp32", "fp16", "bf16", "fp64")):
        acc = tl.float64 if dt == "fp64" else tl.float32
        blocks = dict(ACC=acc, BLOCK_R=tpool._BLOCK_ROWS, BLOCK_C=tpool._BLOCK_CHANNELS)
        rows = dict(kv="i32", c="i32")
        for floor in (False, True):
            jobs.append((f"maxpool_forward {dt} zero_floor={floor}", tpool._maxpool_forward_kernel,
                         dict(src_ptr=f"*{dt}", tab_ptr="*i32", out_ptr=f"*{dt}", arg_ptr="*i32", m="i32", **rows),
                         dict(ZERO_FLOOR=floor, **blocks), False))
        jobs.append((f"maxpool_backward {dt}", tpool._maxpool_backward_kernel,
                     dict(grad_ptr=f"*{dt}", arg_ptr="*i32", tab_ptr="*i32", din_ptr=f"*{dt}", n="i32", **rows),
                     blocks, False))
        jobs.append((f"avgpool_forward {dt}", tpool._avgpool_forward_kernel,
                     dict(src_ptr=f"*{dt}", tab_ptr="*i32", out_ptr=f"*{dt}", m="i32", **rows), blocks, False))
        jobs.append((f"avgpool_backward {dt}", tpool._avgpool_backward_kernel,
                     dict(grad_ptr=f"*{dt}", cnt_ptr="*i32", tab_ptr="*i32", din_ptr=f"*{dt}", n="i32", **rows),
                     blocks, False))
    jobs.append(("invert", km._invert_kernel, dict(nbr_ptr="*i32", inv_ptr="*i32", m_out="i32", kv="i32"),
                 dict(BLOCK=256, TAPS=4), False))
    conv_types = dict(tab_ptr="*i32", n_dst="i32", kv="i32", cs="i32", cd="i32", CS_G="i32", CD_G="i32",
                      w_stride_r="i32", w_stride_s="i32", w_stride_d="i32", w_stride_g="i32")
    grad_types = dict(tab_ptr="*i32", n_dst="i32", kv="i32", groups="i32", ci="i32", co="i32", CI_G="i32", CO_G="i32",
                      rows_per_split="i32")
    dtypes = (("fp16", "ieee"), ("fp32", "ieee")) if quick else (
        ("fp32", "ieee"), ("fp32", "tf32"), ("fp16", "ieee"), ("bf16", "ieee"), ("fp64", "ieee"))
    for dt, prec in dtypes:
        acc = tl.float64 if dt == "fp64" else tl.float32
        tensor_cores = dt in ("fp16", "bf16") or prec == "tf32"
        fwd_cfgs, grad_cfgs = tconv.autotune_configs(False), tconv.autotune_configs(True)
        if quick:
            fwd_cfgs, grad_cfgs = fwd_cfgs[3:4], grad_cfgs[3:4]
        for cfg in fwd_cfgs:
            jobs.append((f"gather_conv {dt} {prec} {cfg}", tconv._gather_conv_body,
                         dict(src_ptr=f"*{dt}", w_ptr=f"*{dt}", dst_ptr=f"*{dt}", **conv_types),
                         dict(PRECISION=prec, UPCAST=False, ACC=acc, **cfg), tensor_cores))
        for cfg in grad_cfgs:
            jobs.append((f"weight_grad {dt} {prec} {cfg}", tconv._weight_grad_body,
                         dict(src_ptr=f"*{dt}", dout_ptr=f"*{dt}", part_ptr="*fp64" if dt == "fp64" else "*fp32",
                              **grad_types),
                         dict(PRECISION=prec, UPCAST=False, ACC=acc, **cfg), tensor_cores))
    return jobs


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="sm_80 only, one config per kernel")
    parser.add_argument("--targets", default=None, help=f"comma-separated subset of {','.join(TARGETS)}")
    args = parser.parse_args()
    names = args.targets.split(",") if args.targets else (["sm80"] if args.quick else list(TARGETS))
    failures = 0
    start = time.time()
    for tname in names:
        target = TARGETS[tname]
        for name, fn, types, consts, tensor_cores in _jobs(args.quick):
            if target.backend == "hip" and consts.get("PRECISION") == "tf32":
                continue  # TF32 is an NVIDIA (and gfx942+ only) opt-in
            signature = {a: ("constexpr" if a in consts else types[a]) for a in fn.arg_names}
            try:
                kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts), target=target)
                if tensor_cores:
                    asm = kernel.asm.get("ptx", "") + kernel.asm.get("amdgcn", "")
                    if "mma" not in asm and "v_mfma" not in asm:
                        raise RuntimeError("no tensor-core instruction (mma / v_mfma) in the generated code")
                print(f"ok    {tname:6s} {name}", flush=True)
            except Exception as e:  # report every failure, then exit non-zero
                failures += 1
                print(f"FAIL  {tname:6s} {name}: {type(e).__name__}: {str(e)[:500]}", flush=True)
    print(f"{failures} failure(s), {time.time() - start:.0f} s")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
