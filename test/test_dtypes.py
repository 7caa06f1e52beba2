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
