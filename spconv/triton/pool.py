"""Sparse max / average pooling in Triton: the same contracts and results as ``src/pool.cpp``.

    maxpool_forward(features, table, zero_floor) -> (out, argmax):  out[j, c] = max over the active taps r of
        features[table[j, r], c]; argmax the input row it came from (-1 for an output without inputs). Taps are
        visited in order and a later tap wins only when strictly greater, so ties go to the first tap; NaN
        propagates (the first NaN wins). ``zero_floor``: spconv 2.x's ``max(0, ...)``, where the floor wins the
        output is 0 and argmax -1 (no gradient).
    maxpool_backward(out_grad, argmax, table_in) -> din:  din[i, c] = sum over outputs j = table_in[i, r] with
        argmax[j, c] == i of out_grad[j, c].
    avgpool_forward(features, table) -> out:  mean over the active taps (0 where there is none).
    avgpool_backward(out_grad, counts, table_in) -> din:  din[i] = sum_r out_grad[j] / counts[j], j = table_in[i, r].

Every program owns a block of rows x a block of channels (one grid axis) and loops over the taps in order:
each output element is written once, without atomics, so results are deterministic. Values are compared and
summed in fp32 (fp64 for fp64 tensors), as the C++ kernels do. Unlike the C++ kernels, the device kernels do
not validate table entries (that would cost a host sync): pass tables built for these features.
"""
import torch
import triton
import triton.language as tl

from spconv.triton._runtime import check_device, on_tensor_device

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_BLOCK_ROWS, _BLOCK_CHANNELS = 64, 32


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def _tiles(n_rows, c, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    n_tiles_c = tl.cdiv(c, BLOCK_C)
    rows = (pid // n_tiles_c) * BLOCK_R + tl.arange(0, BLOCK_R)
    ch = (pid % n_tiles_c) * BLOCK_C + tl.arange(0, BLOCK_C)
    return rows, rows < n_rows, ch, ch < c


@triton.jit
def _maxpool_forward_kernel(src_ptr, tab_ptr, out_ptr, arg_ptr, m, kv, c, ZERO_FLOOR: tl.constexpr,
                            ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows, row_ok, ch, ch_ok = _tiles(m, c, BLOCK_R, BLOCK_C)
    best = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC)
    arg = tl.full((BLOCK_R, BLOCK_C), -1, tl.int32)
    for r in range(0, kv):
        i = tl.load(tab_ptr + rows.to(tl.int64) * kv + r, mask=row_ok, other=-1)
        has = (i >= 0)[:, None] & ch_ok[None, :]
        v = tl.load(src_ptr + i.to(tl.int64)[:, None] * c + ch[None, :], mask=has, other=0.0).to(ACC)
        take = has & ((arg < 0) | (v > best) | ((v != v) & (best == best)))
        best = tl.where(take, v, best)
        arg = tl.where(take, i[:, None] + tl.zeros_like(arg), arg)
    if ZERO_FLOOR:
        floor = best < 0  # false for NaN
        best = tl.where(floor, 0.0, best)
        arg = tl.where(floor, -1, arg)
    offs = rows.to(tl.int64)[:, None] * c + ch[None, :]
    ok = row_ok[:, None] & ch_ok[None, :]
    tl.store(out_ptr + offs, best.to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(arg_ptr + offs, arg, mask=ok)


@triton.jit
def _maxpool_backward_kernel(grad_ptr, arg_ptr, tab_ptr, din_ptr, n, kv, c, ACC: tl.constexpr,
                             BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows, row_ok, ch, ch_ok = _tiles(n, c, BLOCK_R, BLOCK_C)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC)
    for r in range(0, kv):
        j = tl.load(tab_ptr + rows.to(tl.int64) * kv + r, mask=row_ok, other=-1)
        has = (j >= 0)[:, None] & ch_ok[None, :]
        offs = j.to(tl.int64)[:, None] * c + ch[None, :]
        a = tl.load(arg_ptr + offs, mask=has, other=-1)
        mine = has & (a == rows[:, None])
        g = tl.load(grad_ptr + offs, mask=mine, other=0.0).to(ACC)
        acc += g
    offs = rows.to(tl.int64)[:, None] * c + ch[None, :]
    tl.store(din_ptr + offs, acc.to(din_ptr.dtype.element_ty), mask=row_ok[:, None] & ch_ok[None, :])


@triton.jit
def _avgpool_forward_kernel(src_ptr, tab_ptr, out_ptr, m, kv, c, ACC: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows, row_ok, ch, ch_ok = _tiles(m, c, BLOCK_R, BLOCK_C)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC)
    count = tl.zeros((BLOCK_R,), dtype=tl.int32)
    for r in range(0, kv):
        i = tl.load(tab_ptr + rows.to(tl.int64) * kv + r, mask=row_ok, other=-1)
        count += (i >= 0).to(tl.int32)
        has = (i >= 0)[:, None] & ch_ok[None, :]
        acc += tl.load(src_ptr + i.to(tl.int64)[:, None] * c + ch[None, :], mask=has, other=0.0).to(ACC)
    scale = tl.where(count > 0, 1.0 / tl.maximum(count, 1).to(ACC), 0.0).to(ACC)
    offs = rows.to(tl.int64)[:, None] * c + ch[None, :]
    tl.store(out_ptr + offs, (acc * scale[:, None]).to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & ch_ok[None, :])


@triton.jit
def _avgpool_backward_kernel(grad_ptr, cnt_ptr, tab_ptr, din_ptr, n, kv, c, ACC: tl.constexpr,
                             BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows, row_ok, ch, ch_ok = _tiles(n, c, BLOCK_R, BLOCK_C)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC)
    for r in range(0, kv):
        j = tl.load(tab_ptr + rows.to(tl.int64) * kv + r, mask=row_ok, other=-1)
        cnt = tl.load(cnt_ptr + j, mask=j >= 0, other=0)
        use = (cnt > 0)[:, None] & ch_ok[None, :]  # cnt > 0 implies j >= 0
        scale = 1.0 / tl.maximum(cnt, 1).to(ACC)
        g = tl.load(grad_ptr + j.to(tl.int64)[:, None] * c + ch[None, :], mask=use, other=0.0).to(ACC)
        acc += g * scale[:, None]
    offs = rows.to(tl.int64)[:, None] * c + ch[None, :]
    tl.store(din_ptr + offs, acc.to(din_ptr.dtype.element_ty), mask=row_ok[:, None] & ch_ok[None, :])


# ------------------------------------------------------------------------------------------------
def _check(features: torch.Tensor, table: torch.Tensor, what: str, table_what: str):
    check_device(features, what)
    check_device(table, table_what)
    if features.dim() != 2 or features.dtype not in _SUPPORTED:
        raise TypeError(f"spconv.triton: {what} must be a float32/float16/bfloat16/float64 [N, C] tensor, got "
                        f"{features.dtype} {tuple(features.shape)}")
    if table.dim() != 2 or table.dtype != torch.int32:
        raise ValueError(f"spconv: {table_what} must be an int32 [N, K] tensor, got {table.dtype} {tuple(table.shape)}")
    if features.device != table.device:
        raise ValueError(f"spconv: {what} are on {features.device} but {table_what} on {table.device}")
    return features.contiguous(), table.contiguous()


def _grid(rows: int, c: int):
    return (triton.cdiv(rows, _BLOCK_ROWS) * triton.cdiv(c, _BLOCK_CHANNELS),)


@on_tensor_device
def maxpool_forward(features: torch.Tensor, table: torch.Tensor, zero_floor: bool = False):
    """``(out [N_out, C], argmax [N_out, C] int32)``: max over the active taps (see the module docstring)."""
    features, table = _check(features, table, "features", "table")
    m, kv = table.shape
    c = features.shape[1]
    out = torch.zeros((m, c), dtype=features.dtype, device=features.device)
    argmax = torch.full((m, c), -1, dtype=torch.int32, device=features.device)
    if m and c and kv and features.shape[0]:
        _maxpool_forward_kernel[_grid(m, c)](features, table, out, argmax, m, kv, c, ZERO_FLOOR=bool(zero_floor),
                                             ACC=_acc(features.dtype), BLOCK_R=_BLOCK_ROWS, BLOCK_C=_BLOCK_CHANNELS)
    return out, argmax


@on_tensor_device
def maxpool_backward(out_grad: torch.Tensor, argmax: torch.Tensor, table_in: torch.Tensor) -> torch.Tensor:
    """``din [N_in, C]``: each output gradient goes to its argmax input row, through the input-major table."""
    out_grad, table_in = _check(out_grad, table_in, "out_grad", "table_in")
    if argmax.dtype != torch.int32 or argmax.shape != out_grad.shape:
        raise ValueError(f"spconv: argmax must be int32 with out_grad's shape {tuple(out_grad.shape)}, got "
                         f"{argmax.dtype} {tuple(argmax.shape)}")
    argmax = argmax.contiguous()
    n, kv = table_in.shape
    c = out_grad.shape[1]
    din = torch.zeros((n, c), dtype=out_grad.dtype, device=out_grad.device)
    if n and c and kv and out_grad.shape[0]:
        _maxpool_backward_kernel[_grid(n, c)](out_grad, argmax, table_in, din, n, kv, c, ACC=_acc(out_grad.dtype),
                                              BLOCK_R=_BLOCK_ROWS, BLOCK_C=_BLOCK_CHANNELS)
    return din


@on_tensor_device
def active_counts(table: torch.Tensor) -> torch.Tensor:
    """Active taps per output row, ``[N_out]`` int32."""
    return (table >= 0).sum(1, dtype=torch.int32)


@on_tensor_device
def avgpool_forward(features: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``out [N_out, C]``: mean over the active taps, 0 for an output without inputs."""
    features, table = _check(features, table, "features", "table")
    m, kv = table.shape
    c = features.shape[1]
    out = torch.zeros((m, c), dtype=features.dtype, device=features.device)
    if m and c and kv and features.shape[0]:
        _avgpool_forward_kernel[_grid(m, c)](features, table, out, m, kv, c, ACC=_acc(features.dtype),
                                             BLOCK_R=_BLOCK_ROWS, BLOCK_C=_BLOCK_CHANNELS)
    return out


@on_tensor_device
def avgpool_backward(out_grad: torch.Tensor, counts: torch.Tensor, table_in: torch.Tensor) -> torch.Tensor:
    """``din [N_in, C]``: ``sum_r out_grad[j] / counts[j]`` over the outputs ``j = table_in[i, r]``."""
    out_grad, table_in = _check(out_grad, table_in, "out_grad", "table_in")
    if counts.dtype != torch.int32 or counts.shape != (out_grad.shape[0],):
        raise ValueError(f"spconv: counts must be int32 [{out_grad.shape[0]}] (active_counts of the forward table), "
                         f"got {counts.dtype} {tuple(counts.shape)}")
    counts = counts.contiguous()
    n, kv = table_in.shape
    c = out_grad.shape[1]
    din = torch.zeros((n, c), dtype=out_grad.dtype, device=out_grad.device)
    if n and c and kv and out_grad.shape[0]:
        _avgpool_backward_kernel[_grid(n, c)](out_grad, counts, table_in, din, n, kv, c, ACC=_acc(out_grad.dtype),
                                              BLOCK_R=_BLOCK_ROWS, BLOCK_C=_BLOCK_CHANNELS)
    return din
