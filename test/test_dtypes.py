"""Reduced-precision paths: bf16/fp16 kernels accumulate in fp32; CPU autocast runs sparse convs in bf16."""
import pytest
import torch

import spconv.pytorch as spconv
from helpers import random_sparse


def _net():
    torch.manual_seed(0)
    return spconv.SparseSequential(spconv.SubMConv3d(16, 32, 3, indice_key="s"),
                                   spconv.SparseConv3d(32, 32, 3, 2, 1, indice_key="d"),
                                   spconv.SparseInverseConv3d(32, 16, 3, indice_key="d"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_fp32_on_rounded_inputs(dtype):
    feats, idx = random_sparse([12, 12, 12], 2, 0.1, 16)
    net = _net()
    low = _net().to(dtype)
    ref_in = feats.to(dtype).float().requires_grad_(True)
    # the fp32 reference sees exactly the rounded weights and inputs
    with torch.no_grad():
        for p_ref, p_low in zip(net.parameters(), low.parameters()):
            p_ref.copy_(p_low.float())
    out_ref = net(spconv.SparseConvTensor(ref_in, idx, [12, 12, 12], 2))
    x = feats.to(dtype).requires_grad_(True)
    out = low(spconv.SparseConvTensor(x, idx, [12, 12, 12], 2))
    assert out.features.dtype == dtype
    scale = out_ref.features.abs().max()
    err = (out.features.float() - out_ref.features).abs().max() / scale
    assert err < (2e-2 if dtype == torch.bfloat16 else 5e-3)
    g = torch.randn_like(out_ref.features)
    out_ref.features.backward(g)
    out.features.backward(g.to(dtype))
    gerr = (x.grad.float() - ref_in.grad).abs().max() / ref_in.grad.abs().max()
    assert gerr < (3e-2 if dtype == torch.bfloat16 else 5e-3)
    werr = (low[0].weight.grad.float() - net[0].weight.grad).abs().max() / net[0].weight.grad.abs().max()
    assert werr < (3e-2 if dtype == torch.bfloat16 else 5e-3)


def test_cpu_autocast_runs_bf16_and_trains():
    feats, idx = random_sparse([12, 12, 12], 2, 0.1, 16, seed=1)
    net = _net()
    x = feats.clone().requires_grad_(True)
    with torch.no_grad():
        ref = net(spconv.SparseConvTensor(feats, idx, [12, 12, 12], 2)).features
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(spconv.SparseConvTensor(x, idx, [12, 12, 12], 2))
    assert out.features.dtype == torch.bfloat16
    assert ((out.features.float() - ref).abs().max() / ref.abs().max()) < 3e-2
    out.features.float().square().mean().backward()
    assert x.grad.dtype == torch.float32 and net[0].weight.grad.dtype == torch.float32
    assert torch.isfinite(net[0].weight.grad).all()


@pytest.mark.parametrize("cin,cout,groups", [(3, 5, 1), (6, 9, 3), (17, 70, 1), (4, 128, 2)])
@pytest.mark.parametrize("kind", ["subm", "conv", "convt"])
def test_bf16_kernel_odd_channels_and_groups(cin, cout, groups, kind):
    """bf16 features/weights vs the fp32 result on the same rounded values (forward and backward-input)."""
    feats, idx = random_sparse([9, 10, 8], 2, 0.2, cin, seed=cin)
    cls = {"subm": spconv.SubMConv3d, "conv": spconv.SparseConv3d, "convt": spconv.SparseConvTranspose3d}[kind]
    args = (3,) if kind == "subm" else (3, 2, 1)
    layer = cls(cin, cout, *args, groups=groups, bias=False)
    low = cls(cin, cout, *args, groups=groups, bias=False).bfloat16()
    with torch.no_grad():
        layer.weight.copy_(low.weight.float())
    x32 = feats.bfloat16().float().requires_grad_(True)
    x16 = feats.bfloat16().requires_grad_(True)
    ref = layer(spconv.SparseConvTensor(x32, idx, [9, 10, 8], 2)).features
    out = low(spconv.SparseConvTensor(x16, idx, [9, 10, 8], 2)).features
    scale = ref.abs().max()
    assert ((out.float() - ref).abs().max() / scale) < 1e-2
    g = torch.randn_like(ref).bfloat16()
    ref.backward(g.float())
    out.backward(g)
    assert ((x16.grad.float() - x32.grad).abs().max() / x32.grad.abs().max()) < 2e-2
