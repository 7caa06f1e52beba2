"""maxpool_forward(features, table, zero_floor): max over the active taps with NaN propagation (as
torch.nn.functional.max_pool3d), or spconv 2.x's max(0, max) with zero_floor=True; checked against an
independent reference (torch max over the gathered rows) and dense max_pool3d."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import spconv.pytorch  # noqa: F401
from spconv.pytorch import ops as pyops

ops = torch.ops.spconv


def _table(n_in, n_out, k, seed, p_active=0.5):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, n_in, (n_out, k), generator=g, dtype=torch.int32)
    t[torch.rand(n_out, k, generator=g) > p_active] = -1
    t[0] = -1  # one row without any active tap
    return t


def _reference(features, table, zero_floor):
    """(out, argmax) by gathering: first max on ties, first NaN wins, empty rows 0 / -1."""
    n_out, k = table.shape
    c = features.shape[1]
    out = torch.zeros(n_out, c, dtype=features.dtype)
    arg = torch.full((n_out, c), -1, dtype=torch.int32)
    for j in range(n_out):
        for ch in range(c):
            best, who = None, -1
            for r in range(k):
                i = int(table[j, r])
                if i < 0:
                    continue
                v = float(features[i, ch])
                if who < 0 or v > best or (np.isnan(v) and not np.isnan(best)):
                    best, who = v, i
            if who >= 0 and zero_floor and best < 0:
                best, who = 0.0, -1
            if who >= 0:
                out[j, ch] = best
                arg[j, ch] = who
    return out, arg


@pytest.mark.parametrize("zero_floor", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_matches_reference(zero_floor, dtype):
    f = (torch.randn(30, 5, generator=torch.Generator().manual_seed(1)) - 0.7).to(dtype)  # mostly negative
    table = _table(30, 25, 9, 2)
    out, arg = ops.maxpool_forward(f, table, zero_floor)
    ref, ref_arg = _reference(f, table, zero_floor)
    assert torch.equal(out, ref) and torch.equal(arg, ref_arg)
    if zero_floor:
        assert (out >= 0).all() and (arg == -1).any()
    else:
        assert (out < 0).any()
    # default (no third argument) is zero_floor=False; the Python wrapper passes it through
    if not zero_floor:
        assert torch.equal(ops.maxpool_forward(f, table)[0], out)
    assert torch.equal(pyops.maxpool_forward(f, table, zero_floor=zero_floor)[0], out)


@pytest.mark.parametrize("zero_floor", [False, True])
def test_nan_propagates_at_any_tap(zero_floor):
    f = torch.randn(4, 3)
    table = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [1, -1, 2, -1]], dtype=torch.int32)
    for nan_row in range(4):
        g = f.clone()
        g[nan_row, 1] = float("nan")
        out, arg = ops.maxpool_forward(g, table, zero_floor)
        assert torch.isnan(out[0, 1]) and torch.isnan(out[1, 1]), (nan_row, out)
        assert arg[0, 1] == nan_row and arg[1, 1] == nan_row
        if nan_row in (1, 2):
            assert torch.isnan(out[2, 1]) and arg[2, 1] == nan_row
        else:
            assert not torch.isnan(out[2, 1])
        assert not torch.isnan(out[:, [0, 2]]).any()
    # two NaNs: the first tap's input gets the gradient
    g = f.clone()
    g[2, 0] = g[1, 0] = float("nan")
    _, arg = ops.maxpool_forward(g, table, zero_floor)
    assert arg[0, 0] == 1 and arg[1, 0] == 2


def test_backward_accepts_floor_and_routes_to_argmax():
    f = torch.tensor([[-1.0, 2.0], [-3.0, 1.0], [-0.5, -4.0]])
    table = torch.tensor([[0, 1, -1], [1, 2, 0], [2, -1, -1]], dtype=torch.int32)
    out, arg = ops.maxpool_forward(f, table, True)
    assert torch.equal(out, torch.tensor([[0.0, 2.0], [0.0, 2.0], [0.0, 0.0]]))
    assert torch.equal(arg, torch.tensor([[-1, 0], [-1, 0], [-1, -1]], dtype=torch.int32))
    table_in = ops.invert_map(table, 3)
    din = ops.maxpool_backward(torch.ones(3, 2), arg, table_in)
    assert torch.equal(din, torch.tensor([[0.0, 2.0], [0.0, 0.0], [0.0, 0.0]]))
    out, arg = ops.maxpool_forward(f, table, False)
    assert torch.equal(out, torch.tensor([[-1.0, 2.0], [-0.5, 2.0], [-0.5, -4.0]]))
    din = ops.maxpool_backward(torch.ones(3, 2), arg, table_in)
    assert torch.equal(din, torch.tensor([[1.0, 2.0], [0.0, 0.0], [2.0, 1.0]]))


@pytest.mark.parametrize("nan", [False, True])
def test_dense_max_pool3d_parity(nan):
    """Every site active (a dense grid): SparseMaxPool3d without floor == F.max_pool3d, values and gradient,
    including NaN inputs."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 2, 4, 4, 4, generator=g, dtype=torch.float64) - 1.0
    if nan:
        x[0, 0, 1, 2, 3] = float("nan")
        x[0, 1, 3, 3, 3] = float("nan")
    dense = x.clone().requires_grad_()
    ref = F.max_pool3d(dense, 2, 2)
    ref.backward(torch.ones_like(ref))

    coords = torch.stack(torch.meshgrid(*[torch.arange(4)] * 3, indexing="ij"), -1).reshape(-1, 3)
    idx = torch.cat([torch.zeros(64, 1, dtype=torch.long), coords], 1).int()
    feats = x[0].permute(1, 2, 3, 0).reshape(-1, 2).clone().requires_grad_()
    out_idx, table = ops.build_conv_map(idx, 1, [4, 4, 4], [2, 2, 2], [2] * 3, [2] * 3, [0] * 3, [1] * 3, False)
    out, arg = ops.maxpool_forward(feats.detach(), table, False)
    sparse = torch.zeros(1, 2, 2, 2, 2, dtype=torch.float64)
    o = out_idx.long()
    sparse[0, :, o[:, 1], o[:, 2], o[:, 3]] = out.t()
    torch.testing.assert_close(sparse, ref.detach(), equal_nan=True, rtol=0, atol=0)
    din = ops.maxpool_backward(torch.ones_like(out), arg, ops.invert_map(table, 64))
    dense_grad = torch.zeros(1, 2, 4, 4, 4, dtype=torch.float64)
    dense_grad[0, :, coords[:, 0], coords[:, 1], coords[:, 2]] = din.t()
    torch.testing.assert_close(dense_grad, dense.grad, rtol=0, atol=0)


def test_fake_kernel_takes_zero_floor():
    """torch.library.opcheck: schema (no input mutated) and the fake kernel, with and without the argument."""
    f = torch.randn(6, 3)
    table = _table(6, 5, 4, 5)
    op = torch.ops.spconv.maxpool_forward.default
    for args in [(f, table), (f, table, True), (f, table, False)]:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
