"""The CPU conv kernels at every register blocking: channel counts from 1 to 130 (1-4 vectors of 16 columns,
column tails, row remainders of 8/4/2/1, odd bf16 channel pairs), several destination tiles, against dense
conv3d in float64 (forward, input and weight gradients), bf16 against the same reference on bf16-rounded
inputs, and bitwise equality across thread counts."""
import os
import subprocess
import sys

import pytest
import torch

import spconv.pytorch as spconv
from helpers import dense_conv, gather_sites, random_sparse, to_dense, torch_conv_weight

SHAPE = (14, 13, 12)
CHANNELS = [(1, 1), (3, 5), (4, 16), (16, 16), (5, 17), (16, 32), (33, 48), (32, 64), (64, 64), (70, 130),
            (128, 96)]


def _reference(features, indices, weight, subm):
    """Dense float64 conv3d of the densified input, read back at the output sites, and its gradients."""
    f = features.detach().double().requires_grad_(True)
    w = weight.detach().double().requires_grad_(True)
    dense = to_dense(f, indices, SHAPE, 1)
    out = dense_conv(dense, torch_conv_weight(w), [1] * 3, [1] * 3 if subm else [0] * 3, [1] * 3)
    return f, w, out


def _run(cin, cout, dtype, subm, seed):
    torch.manual_seed(seed)
    features, indices = random_sparse(SHAPE, 1, 0.35, cin, seed=seed)
    features = features.to(dtype)
    conv = (spconv.SubMConv3d(cin, cout, 3, bias=False, indice_key="k") if subm else
            spconv.SparseConv3d(cin, cout, 3, bias=False)).to(dtype)
    x = spconv.SparseConvTensor(features.clone().requires_grad_(True), indices, SHAPE, 1)
    out = conv(x)
    grad = torch.randn(out.features.shape, dtype=torch.float64)
    out.features.backward(grad.to(dtype))
    f, w, ref_dense = _reference(features, indices, conv.weight, subm)
    ref = gather_sites(ref_dense, out.indices)
    ref.backward(grad)
    return out.features.double(), ref, x.features.grad.double(), f.grad, conv.weight.grad.double(), w.grad


def _close(actual, expected, rel):
    scale = expected.abs().max().clamp(min=1e-6)
    err = (actual - expected).abs().max() / scale
    assert err <= rel, f"max error {float(err):.2e} of the largest value (tolerance {rel:.0e})"


@pytest.mark.parametrize("cin,cout", CHANNELS)
@pytest.mark.parametrize("subm", [True, False], ids=["subm", "regular"])
def test_fp32_kernels_match_dense_conv3d(cin, cout, subm):
    out, ref, dx, dx_ref, dw, dw_ref = _run(cin, cout, torch.float32, subm, seed=cin * 131 + cout)
    assert out.shape[0] > 384, "the input must span several destination tiles"
    _close(out, ref, 1e-5)
    _close(dx, dx_ref, 1e-5)
    _close(dw, dw_ref, 1e-5)


@pytest.mark.parametrize("cin,cout", [(3, 5), (5, 17), (16, 32), (33, 48), (64, 64), (70, 130)])
def test_bf16_kernels_match_dense_conv3d(cin, cout):
    # the reference sees the same bf16-rounded features and weights; only accumulation and output rounding differ
    out, ref, dx, dx_ref, dw, dw_ref = _run(cin, cout, torch.bfloat16, True, seed=cin + cout)
    _close(out, ref, 1e-2)
    _close(dx, dx_ref, 1e-2)
    _close(dw, dw_ref, 1e-2)


@pytest.mark.parametrize("cin,cout", [(16, 16), (64, 64), (33, 48)])
def test_bitwise_equal_across_thread_counts(cin, cout):
    features, indices = random_sparse(SHAPE, 2, 0.3, cin, seed=7)
    torch.manual_seed(cin + cout)
    conv = spconv.SubMConv3d(cin, cout, 3, bias=False)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            x = spconv.SparseConvTensor(features.clone().requires_grad_(True), indices, SHAPE, 2)
            out = conv(x)
            out.features.square().sum().backward()
            results.append((out.features.detach().clone(), x.features.grad.clone(), conv.weight.grad.clone()))
            conv.weight.grad = None
    finally:
        torch.set_num_threads(threads)
    (o1, dx1, dw1), (o2, dx2, dw2) = results
    assert torch.equal(o1, o2) and torch.equal(dx1, dx2)
    # weight gradients are per-thread partial sums: equal up to fp32 summation order (relative to their scale)
    torch.testing.assert_close(dw1, dw2, rtol=1e-5, atol=1e-6 * float(dw1.abs().max()))


def test_caching_allocator_reuses_large_blocks():
    """Large CPU tensors come from spconv's caching allocator: a freed block is handed out again for the next
    tensor of that size, values written through it are intact, and small tensors are unaffected."""
    from spconv.pytorch import ops
    if not ops.CACHING_ALLOCATOR:
        pytest.skip("SPCONV_CPU_CACHING_ALLOCATOR=0: the caching allocator is off in this process")
    a = torch.empty(3_000_000)  # 12 MB
    ptr = a.data_ptr()
    del a
    b = torch.full((3_000_000,), 2.5)
    assert b.data_ptr() == ptr
    assert torch.equal(b, torch.full_like(b, 2.5))
    c = torch.arange(10) * 2
    assert c.tolist() == list(range(0, 20, 2))
    import spconv._C as C
    stats = C.caching_allocator_stats()
    assert stats["hits"] >= 1 and stats["live_bytes"] >= b.numel() * 4
    assert stats["live_bytes"] + stats["cached_bytes"] <= 1.25 * stats["peak_live_bytes"] + 2 ** 20


def test_caching_allocator_can_be_turned_off():
    """SPCONV_CPU_CACHING_ALLOCATOR=0 keeps PyTorch's default CPU allocator (checked in a fresh process)."""
    code = ("import spconv.pytorch, torch, spconv._C; from spconv.pytorch import ops; assert not ops.CACHING_ALLOCATOR; "
            "assert spconv._C.caching_allocator_stats() is None; "
            "x = spconv.pytorch.SubMConv3d(2, 2, 3)(spconv.pytorch.SparseConvTensor(torch.ones(1, 2), "
            "torch.zeros(1, 4, dtype=torch.int32), [2, 2, 2], 1)); print('ok')")
    env = dict(os.environ, SPCONV_CPU_CACHING_ALLOCATOR="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_portable_kernels_match_dense_conv3d():
    """SPCONV_DISABLE_AVX512=1 runs the portable gather + GEMM kernels (what CPUs without AVX-512 use): the
    same dense-conv3d checks, in a fresh process, for fp32 and bf16 at a few blockings."""
    code = ("import sys; sys.path.insert(0, %r); import test_cpu_kernels as t; "
            "[t.test_fp32_kernels_match_dense_conv3d(ci, co, s) for ci, co in [(3, 5), (16, 32), (70, 130)] "
            "for s in (True, False)]; "
            "[t.test_bf16_kernels_match_dense_conv3d(ci, co) for ci, co in [(5, 17), (64, 64)]]; print('ok')"
            % os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, SPCONV_DISABLE_AVX512="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_kernel_maps_equal_across_thread_counts():
    """SubM and strided/transposed maps (per-thread output bitmaps with 2 threads, shared atomic bitmap
    with 1) are identical for 1 and 2 threads."""
    from spconv.pytorch import ops
    _, idx = random_sparse(SHAPE, 2, 0.3, 1, seed=3)
    perm = torch.randperm(idx.shape[0], generator=torch.Generator().manual_seed(0))
    idx = idx[perm].contiguous()  # unsorted sites, as voxelisation gives them
    out_shape = ops.get_conv_output_size(SHAPE, [3] * 3, [2] * 3, [1] * 3, [1] * 3)
    tr_shape = ops.get_deconv_output_size(SHAPE, [3] * 3, [2] * 3, [1] * 3, [1] * 3, [0] * 3)
    threads = torch.get_num_threads()
    maps = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            maps.append((ops.build_subm_map(idx, SHAPE, [3] * 3, [1] * 3, 2),
                         *ops.build_conv_map(idx, SHAPE, out_shape, [3] * 3, [2] * 3, [1] * 3, [1] * 3, False, 2),
                         *ops.build_conv_map(idx, SHAPE, tr_shape, [3] * 3, [2] * 3, [1] * 3, [1] * 3, True, 2)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*maps):
        assert torch.equal(a, b)
