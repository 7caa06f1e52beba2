"""Every CPU conv kernel path the library can pick, forced with SPCONV_BF16_KERNEL in a fresh process, against
dense conv3d in float64: forward, input gradient (the same kernels with the transposed weight) and weight
gradient, odd channel counts (1, 3, 17, 33, 130: 1-4 vectors of 16 columns with tails, odd bf16 channel
pairs), row remainders, several destination tiles (small cache sizes forced with SPCONV_L1D_BYTES /
SPCONV_L2_BYTES). bf16 within 1.1e-2 of the largest reference value (the reference sees the same
bf16-rounded inputs), fp32 within 1e-5.

Paths: brgemm (oneDNN's batch-reduce GEMM through torch: AMX tiles on CPUs that have them, AVX512-BF16 or
AVX2 code elsewhere, so it runs on this machine either way), avx512 (AVX512-BF16 implicit GEMM), fp32
(bf16 features on the fp32 FMA kernels, where vdpbf16ps gains nothing) and portable (gather + GEMM). A path the CPU cannot run is skipped with the reason."""
import json
import os
import subprocess
import sys

import pytest
import torch

import spconv._C as C

HERE = os.path.dirname(os.path.abspath(__file__))
CHANNELS = [(1, 3), (3, 17), (17, 33), (33, 130), (130, 1), (64, 64)]
BLOCKING = C.cpu_blocking()

WORKER = r"""
import json, sys
sys.path.insert(0, %(here)r)
import torch
import spconv._C as C
import spconv.pytorch as spconv
from helpers import dense_conv, gather_sites, random_sparse, to_dense, torch_conv_weight

SHAPE = (14, 13, 12)
dtype = getattr(torch, %(dtype)r)
out = {"kernel": C.bf16_kernel(), "blocking": C.cpu_blocking(), "cases": []}
for cin, cout in %(channels)r:
    for subm in %(subm)r:
        seed = cin * 131 + cout + subm
        torch.manual_seed(seed)
        features, indices = random_sparse(SHAPE, 1, 0.35, cin, seed=seed)
        features = features.to(dtype)
        conv = (spconv.SubMConv3d(cin, cout, 3, bias=False, indice_key="k") if subm else
                spconv.SparseConv3d(cin, cout, 3, bias=False)).to(dtype)
        x = spconv.SparseConvTensor(features.clone().requires_grad_(True), indices, SHAPE, 1)
        y = conv(x)
        grad = torch.randn(y.features.shape, dtype=torch.float64)
        y.features.backward(grad.to(dtype))
        f = features.detach().double().requires_grad_(True)
        w = conv.weight.detach().double().requires_grad_(True)
        dense = dense_conv(to_dense(f, indices, SHAPE, 1), torch_conv_weight(w), [1] * 3,
                           [1] * 3 if subm else [0] * 3, [1] * 3)
        ref = gather_sites(dense, y.indices)
        ref.backward(grad)
        def err(a, b):
            return float((a.double() - b).abs().max() / b.abs().max().clamp(min=1e-6))
        out["cases"].append({"cin": cin, "cout": cout, "subm": subm, "rows": int(y.features.shape[0]),
                             "fwd": err(y.features, ref), "dx": err(x.features.grad, f.grad),
                             "dw": err(conv.weight.grad, w.grad)})
print(json.dumps(out))
"""


def run_worker(dtype, env_extra, channels=CHANNELS, subm=(True, False)):
    code = WORKER % {"here": HERE, "dtype": dtype, "channels": channels, "subm": list(subm)}
    env = dict(os.environ, **env_extra)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check(result, tol):
    assert result["cases"]
    for case in result["cases"]:
        for what in ("fwd", "dx", "dw"):
            assert case[what] <= tol, (f"{result['kernel']}: {what} error {case[what]:.2e} > {tol:.1e} for "
                                       f"{case['cin']}->{case['cout']} subm={case['subm']}")


def has_avx512_bf16():
    return BLOCKING["bf16_kernel_auto"] in ("avx512", "brgemm") and "avx512_bf16" in open("/proc/cpuinfo").read()


def skip_unless(kernel):
    if kernel == "brgemm" and not BLOCKING["brgemm_compiled"]:
        pytest.skip("this torch build has no bf16 at::native::cpublas::brgemm")
    if kernel == "brgemm" and not torch.backends.mkldnn.is_available():
        pytest.skip("torch is built without oneDNN: no brgemm")
    if kernel == "avx512" and not has_avx512_bf16():
        pytest.skip("this CPU has no AVX512-BF16 (vdpbf16ps): the avx512 bf16 kernel cannot run")
    if kernel == "fp32" and not C.conv_kernels().startswith("AVX-512"):
        pytest.skip("no AVX-512 on this CPU: the fp32 FMA kernels for bf16 features cannot run")


@pytest.mark.parametrize("kernel", ["brgemm", "avx512", "fp32", "portable"])
def test_bf16_path_matches_dense_conv3d(kernel):
    skip_unless(kernel)
    # small L2: the brgemm path's destination tiles hold 32-64 rows, so every input spans many tiles
    result = run_worker("bfloat16", {"SPCONV_BF16_KERNEL": kernel, "SPCONV_L2_BYTES": "65536"})
    assert result["kernel"] == kernel, f"forced {kernel}, ran {result['kernel']}"
    assert all(case["rows"] > 64 for case in result["cases"])
    check(result, 1.1e-2)


@pytest.mark.parametrize("kernel", ["brgemm", "avx512", "fp32"])
def test_bf16_path_default_tiles(kernel):
    """The same path with the cache sizes of this CPU (its own tile sizes), a few channel pairs."""
    skip_unless(kernel)
    result = run_worker("bfloat16", {"SPCONV_BF16_KERNEL": kernel}, channels=[(3, 17), (130, 33), (64, 64)],
                        subm=(True,))
    assert result["kernel"] == kernel
    check(result, 1.1e-2)


@pytest.mark.parametrize("l1d", ["default", "4096"])
def test_fp32_implicit_gemm_blocking_from_cache_size(l1d):
    """fp32 implicit GEMM with tile rows from this CPU's L1d, and from a tiny forced L1d (32-row tiles)."""
    if not C.conv_kernels().startswith("AVX-512"):
        pytest.skip("no AVX-512 on this CPU: fp32 runs the portable path (test_cpu_kernels covers it)")
    env = {} if l1d == "default" else {"SPCONV_L1D_BYTES": l1d}
    result = run_worker("float32", env)
    if l1d != "default":
        assert result["blocking"]["tile_rows_64"] == 32 and result["blocking"]["cache_source"] == "env"
    check(result, 1e-5)


def test_brgemm_on_amx_tiles():
    """On a CPU with AMX the automatic choice is brgemm (oneDNN then runs AMX tile code)."""
    if not BLOCKING["amx_bf16"]:
        pytest.skip("this CPU has no AMX-BF16/AMX-TILE (or Linux refused the tile state): AMX paths cannot run here")
    result = run_worker("bfloat16", {"SPCONV_BF16_KERNEL": "auto"}, channels=[(33, 130), (64, 64), (3, 17)])
    assert result["kernel"] == "brgemm"
    check(result, 1.1e-2)


def test_blocking_derived_from_cache_sizes():
    b = C.cpu_blocking()
    assert b["l1d_bytes"] > 0 and b["l2_bytes"] > 0 and b["cache_source"] in ("sysconf", "sysfs", "env", "default")
    if C.conv_kernels().startswith("AVX-512"):
        floats = b["l1d_bytes"] // 2 // 4
        assert b["tile_rows_64"] == max(32, min(512, floats // 64 // 16 * 16))
        assert b["tile_rows_128"] == max(32, min(512, floats // 128 // 16 * 16))
    assert b["brgemm_tile_rows_128"] % b["brgemm_block_rows"] == 0
    assert b["bf16_small_layers"] == ("avx512" if b["bf16_dot_speedup"] >= 1.3 else "fp32") or \
        b["bf16_small_layers"] == "portable"


def test_set_bf16_kernel_rejects_unknown_names():
    before = C.bf16_kernel()
    with pytest.raises(ValueError, match="brgemm"):
        C.set_bf16_kernel("amx-please")
    assert C.bf16_kernel() == before


def test_python_m_spconv_and_benchmark_name_the_kernel_and_cpu():
    from spconv.__main__ import info
    from spconv.benchmark.cpu import cpu_description
    lines = info()
    assert lines["bf16 kernel"].split()[0] == C.bf16_kernel()
    assert "tile rows" in lines["blocking"] and "L1d" in lines["blocking"]
    cpu = cpu_description()
    assert cpu["model"] and {"avx512_bf16", "amx", "amx_bf16", "bf16_kernel", "blocking"} <= set(cpu)
    assert cpu["amx_bf16"] == (BLOCKING["amx_bf16"] or cpu["amx_bf16"])  # flags may list AMX that Linux withholds
