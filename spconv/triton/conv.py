"""Implicit-GEMM sparse convolution kernels in Triton: the same contracts as ``src/conv.cpp``.

    gather_conv:             dst[j] = sum_r W_r   @ src[table[j, r]]   (forward; W_r = weight[:, r, :])
                             dst[j] = sum_r W_r^T @ src[table[j, r]]   (transpose_weight: backward-input)
    gather_conv_weight_grad: dW_r   = sum_j dout[j]^T src[table[j, r]]

Each program of ``gather_conv`` owns a block of destination rows x a block of destination channels
of one group: it loops over the K taps and the source-channel blocks, gathers the source rows of the
tap through the neighbour table (rows without a neighbour are masked to zero, a tap no row of the
block uses is skipped), and accumulates ``tl.dot`` products in fp32 (fp64 for fp64 inputs). There are
no atomics: every output element is written once, so results are deterministic.

The weight gradient is one GEMM per tap, ``[C_out_g, rows] @ [rows, C_in_g]``, reduced over the
destination rows. Each program owns a (tap, group, C_out block, C_in block) tile and a fixed slice of
the rows; slices write fp32 partial sums that are added in a fixed order (deterministic, no atomics).

Block sizes are a pure function of the group's channel counts (:func:`pinned_config`), the same in every
process, so the summation order, hence the result, is the same on every DDP rank and in every run.
``SPCONV_TRITON_AUTOTUNE=1`` (read at each call) times the configs of :func:`autotune_configs` instead
(``triton.autotune``, cached per channel counts within the process): faster on some shapes, but the choice
may differ between processes and so may results in the last bits (fp32) or more (fp16/bf16).

Launch grids are one-dimensional (CUDA caps grid axes 1 and 2 at 65535): a program id is split into
(channel tile, row tile, group) in ``gather_conv`` and (channel tile, tap x group, row slice) in the weight
gradient inside the kernel.

Dtypes: float32 (true fp32 products by default, ``input_precision="ieee"``; TF32 when
``spconv.constants.SPCONV_ALLOW_TF32`` is True), float16 and bfloat16 (fp32 accumulation), float64.
Channel counts need not be multiples of 16: channel tails are masked.
"""
import os

import torch
import triton
import triton.language as tl

from spconv import constants
from spconv.triton._runtime import INTERPRET, check_device, on_tensor_device

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
AUTOTUNE_ENV = "SPCONV_TRITON_AUTOTUNE"
#: Triton's interpreter multiplies bf16 dot operands as their raw uint16 bits: the kernels then upcast bf16
#: tiles to fp32 before ``tl.dot`` (``UPCAST``). Tests turn this off with an interpreter shim that multiplies
#: bf16 correctly, to run the true bf16 path of the GPU.
INTERPRETER_UPCASTS_BF16 = INTERPRET
_INTERPRETER_CONFIG = {False: (128, 32, 32, 4, 1), True: (32, 32, 128, 4, 1)}


def _np2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _pinned_shape(weight_grad: bool, a: int, b: int):
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) for channel counts ``a``, ``b`` of a group: gather_conv
    (a = source channels, b = destination channels) or the weight gradient (a = C_out, b = C_in)."""
    if weight_grad:
        bm, bn = min(64, max(16, _np2(a))), min(64, max(16, _np2(b)))
        return bm, bn, 64 if bm * bn <= 32 * 32 else 32, 2 if bm * bn <= 16 * 16 else 4, 3
    bn, bk = min(128, max(16, _np2(b))), 16 if a <= 16 else 32
    return (64, bn, bk, 4, 4) if bn == 128 else (128, bn, bk, 4, 3)


def _shapes(weight_grad: bool):
    if weight_grad:
        shapes = [(16, 16, 64, 2, 3), (32, 32, 64, 4, 3), (64, 32, 32, 4, 3), (32, 64, 32, 4, 3),
                  (64, 64, 32, 4, 3), (64, 64, 64, 8, 3), (128, 64, 32, 8, 3), (64, 128, 32, 8, 3)]
    else:
        shapes = [(32, 16, 16, 2, 3), (64, 32, 16, 4, 3), (64, 32, 32, 4, 3), (64, 64, 32, 4, 3),
                  (128, 32, 32, 4, 3), (128, 64, 32, 4, 3), (128, 64, 64, 8, 3), (128, 128, 32, 8, 3),
                  (64, 128, 32, 4, 4)]
    for a in (16, 32, 64, 128):  # every pinned choice is also an autotune config (and compile-checked)
        for b in (16, 32, 64, 128):
            shape = _pinned_shape(weight_grad, a, b)
            if shape not in shapes:
                shapes.append(shape)
    return shapes


def _config(shape):
    m, n, k, w, s = shape
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)


def _configs(interpret: bool, weight_grad: bool = False):
    """Autotune configs: BLOCK_M x BLOCK_N is the output tile, BLOCK_K the reduction step (source channels
    in gather_conv, rows in the weight gradient). The interpreter gets one config with large blocks: it cannot
    time configs meaningfully, and its cost is per interpreted block operation, not per element."""
    if interpret:
        return [_config(_INTERPRETER_CONFIG[weight_grad])]
    return [_config(shape) for shape in _shapes(weight_grad)]


def pinned_config(weight_grad: bool, a: int, b: int) -> dict:
    """The block sizes used for channel counts ``a``, ``b`` (see :func:`_pinned_shape`) unless
    ``SPCONV_TRITON_AUTOTUNE=1``: a pure function of the shape, as dict with ``num_warps`` and ``num_stages``."""
    m, n, k, w, s = _INTERPRETER_CONFIG[weight_grad] if INTERPRET else _pinned_shape(weight_grad, a, b)
    return {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "num_warps": w, "num_stages": s}


def _autotune() -> bool:
    return not INTERPRET and os.environ.get(AUTOTUNE_ENV, "0") not in ("", "0")


def _prune(**channel_blocks):
    """Drop configs whose channel blocks are wider than the channels need (they only add masked lanes).
    ``channel_blocks`` maps a block name to the kernel argument holding that block's channel count."""
    def prune(configs, named_args, **kwargs):
        caps = {block: max(16, triton.next_power_of_2(int(named_args[arg]))) for block, arg in channel_blocks.items()}
        kept = [c for c in configs if all(c.kwargs[block] <= cap for block, cap in caps.items())]
        return kept or configs[:1]
    return prune


def _dot_flags(dtype: torch.dtype):
    """(input precision, upcast operands to fp32 before tl.dot, accumulator dtype) for a dtype."""
    precision = "tf32" if (dtype == torch.float32 and constants.SPCONV_ALLOW_TF32) else "ieee"
    # Triton's interpreter multiplies bf16 operands as raw uint16 bits (and truncates fp32 -> bf16 casts);
    # upcasting first gives the exact products a bf16 tensor-core dot computes (bf16 x bf16 fits fp32).
    upcast = INTERPRETER_UPCASTS_BF16 and dtype == torch.bfloat16
    return precision, upcast, (tl.float64 if dtype == torch.float64 else tl.float32)


# ------------------------------------------------------------------------------------------------
@triton.jit
def _gather_conv_body(src_ptr, tab_ptr, w_ptr, dst_ptr, n_dst, kv, cs, cd, CS_G, CD_G,
                      w_stride_r, w_stride_s, w_stride_d, w_stride_g,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0)  # (channel tile fastest, then row tile, then group): one grid axis
    n_tiles_n = tl.cdiv(CD_G, BLOCK_N)
    n_tiles_m = tl.cdiv(n_dst, BLOCK_M)
    pid_n = pid % n_tiles_n
    pid_m = (pid // n_tiles_n) % n_tiles_m
    g = pid // (n_tiles_n * n_tiles_m)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_dst
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < CD_G
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    tab_row = tab_ptr + rows.to(tl.int64) * kv
    w_tile = w_ptr + g * w_stride_g + cols[None, :] * w_stride_d
    src_group = src_ptr + g * CS_G
    for r in range(0, kv):
        src_rows = tl.load(tab_row + r, mask=row_ok, other=-1)
        has = src_rows >= 0
        if tl.max(has.to(tl.int32), axis=0) > 0:  # some row of this block has a neighbour through tap r
            a_rows = src_group + src_rows.to(tl.int64)[:, None] * cs
            w_tap = w_tile + r * w_stride_r
            for c0 in range(0, CS_G, BLOCK_K):
                kk = c0 + rk
                k_ok = kk < CS_G
                a = tl.load(a_rows + kk[None, :], mask=has[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(w_tap + kk[:, None] * w_stride_s, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                if UPCAST:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC)
    out = dst_ptr + rows.to(tl.int64)[:, None] * cd + g * CD_G + cols[None, :]
    tl.store(out, acc.to(dst_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


_gather_conv_kernel = triton.autotune(
    configs=_configs(INTERPRET), key=["CS_G", "CD_G"],
    prune_configs_by={"early_config_prune": _prune(BLOCK_N="CD_G", BLOCK_K="CS_G")})(_gather_conv_body)


@triton.jit
def _weight_grad_body(src_ptr, tab_ptr, dout_ptr, part_ptr, n_dst, kv, groups, ci, co, CI_G, CO_G, rows_per_split,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr):
    """Program (C_out block x C_in block, tap x group, row slice), folded into one grid axis in that order
    (fastest first): part[slice, g*CO_G + o, r, c]."""
    pid = tl.program_id(0)
    n_tiles_n = tl.cdiv(CI_G, BLOCK_N)
    n_tiles = tl.cdiv(CO_G, BLOCK_M) * n_tiles_n
    tile = pid % n_tiles
    pid_m = tile // n_tiles_n
    pid_n = tile % n_tiles_n
    rg = (pid // n_tiles) % (kv * groups)
    r = rg // groups
    g = rg % groups
    split = pid // (n_tiles * kv * groups)
    o = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_ok = o < CO_G
    c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = c < CI_G
    rj = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    j_begin = split * rows_per_split
    j_end = tl.minimum(j_begin + rows_per_split, n_dst)
    for j0 in range(j_begin, j_end, BLOCK_K):
        j = j0 + rj
        src_rows = tl.load(tab_ptr + j.to(tl.int64) * kv + r, mask=j < j_end, other=-1)
        has = src_rows >= 0
        if tl.max(has.to(tl.int32), axis=0) > 0:
            # A = dout^T [BLOCK_M (out channel), BLOCK_K (row)], B = src [BLOCK_K (row), BLOCK_N (in channel)]
            a = tl.load(dout_ptr + j.to(tl.int64)[None, :] * co + g * CO_G + o[:, None],
                        mask=has[None, :] & o_ok[:, None], other=0.0)
            b = tl.load(src_ptr + src_rows.to(tl.int64)[:, None] * ci + g * CI_G + c[None, :],
                        mask=has[:, None] & c_ok[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC)
    out = part_ptr + split.to(tl.int64) * co * kv * CI_G + ((g * CO_G + o)[:, None] * kv + r) * CI_G + c[None, :]
    tl.store(out, acc, mask=o_ok[:, None] & c_ok[None, :])


_weight_grad_kernel = triton.autotune(
    configs=_configs(INTERPRET, weight_grad=True), key=["CO_G", "CI_G"],
    prune_configs_by={"early_config_prune": _prune(BLOCK_M="CO_G", BLOCK_N="CI_G")})(_weight_grad_body)


# ------------------------------------------------------------------------------------------------
def _check_dtype(t: torch.Tensor, what: str):
    if t.dtype not in _SUPPORTED:
        raise TypeError(f"spconv.triton: {what} must be float32, float16, bfloat16 or float64, got {t.dtype}")


def _check_table(table: torch.Tensor, n_rows_name: str, features: torch.Tensor):
    if table.dim() != 2 or table.dtype != torch.int32:
        raise ValueError(f"spconv: neighbour table must be an int32 [N, K] tensor, got {table.dtype} "
                         f"{tuple(table.shape)}")
    if table.device != features.device:
        raise ValueError(f"spconv: features are on {features.device} but the neighbour table on {table.device}: "
                         "build the kernel map from indices on the features' device (move the indices with "
                         f".to('{features.device}'))")
    check_device(table, n_rows_name)
    return table.contiguous()


def _grid_size(n: int) -> int:
    if n >= 2 ** 31:
        raise ValueError(f"spconv.triton: {n} programs in one launch (more than 2^31-1); split the input")
    return n


def gather_grid(n_dst: int, cd_g: int, groups: int, meta: dict):
    """One-dimensional launch grid of gather_conv: row tiles x channel tiles x groups."""
    return (_grid_size(triton.cdiv(n_dst, meta["BLOCK_M"]) * triton.cdiv(cd_g, meta["BLOCK_N"]) * groups),)


def weight_grad_grid(co_g: int, ci_g: int, kv: int, groups: int, splits: int, meta: dict):
    """One-dimensional launch grid of the weight gradient: channel tiles x taps x groups x row slices."""
    tiles = triton.cdiv(co_g, meta["BLOCK_M"]) * triton.cdiv(ci_g, meta["BLOCK_N"])
    return (_grid_size(tiles * kv * groups * splits),)


@on_tensor_device
def gather_conv(features: torch.Tensor, table: torch.Tensor, weight: torch.Tensor, groups: int,
                transpose_weight: bool, config: dict = None) -> torch.Tensor:
    """``out[j] = sum_r W_r @ f[table[j, r]]`` with ``weight [C_out, K, C_in/groups]`` (``W_r^T`` if transposed).

    ``config`` (``{"BLOCK_M", "BLOCK_N", "BLOCK_K"}``, optionally ``num_warps``, ``num_stages``) overrides the
    block sizes (tests use it to run every config).
    """
    check_device(features, "features")
    table = _check_table(table, "neighbour tables", features)
    _check_dtype(features, "features")
    groups = int(groups)
    if weight.dim() != 3 or weight.shape[1] != table.shape[1]:
        raise ValueError("spconv: weight must be [C_out, K, C_in/groups] with K = table.size(1)")
    if groups < 1 or weight.shape[0] % groups != 0:
        raise ValueError("spconv: C_out must be divisible by groups")
    if weight.dtype != features.dtype:
        raise ValueError(f"spconv: features are {features.dtype} but weight is {weight.dtype}; cast one to the "
                         "other's dtype")
    features = features.contiguous()
    weight = weight.contiguous()
    c_out, kv, c_in_g = weight.shape
    c_out_g = c_out // groups
    if transpose_weight:  # src channels index C_out (rows of W), dst channels index C_in
        cs_g, cd_g = c_out_g, c_in_g
        stride_s, stride_d = kv * c_in_g, 1
    else:
        cs_g, cd_g = c_in_g, c_out_g
        stride_s, stride_d = 1, kv * c_in_g
    cs, cd = cs_g * groups, cd_g * groups
    if features.dim() != 2 or features.shape[1] != cs:
        raise ValueError(f"spconv: features have {features.shape[-1]} channels, expected {cs}")
    n_dst = table.shape[0]
    if n_dst == 0 or cd == 0 or features.shape[0] == 0 or kv == 0 or cs_g == 0:
        return torch.zeros((n_dst, cd), dtype=features.dtype, device=features.device)
    precision, upcast, acc = _dot_flags(features.dtype)
    # The interpreter's fp32 -> bf16 cast truncates; it then writes fp32 and torch rounds to nearest even.
    dst = torch.empty((n_dst, cd), dtype=torch.float32 if upcast else features.dtype, device=features.device)
    args = (features, table, weight, dst, n_dst, kv, cs, cd, cs_g, cd_g, c_in_g, stride_s, stride_d, c_out_g * kv * c_in_g)
    flags = dict(PRECISION=precision, UPCAST=upcast, ACC=acc)
    if config is None and _autotune():
        _gather_conv_kernel[lambda meta: gather_grid(n_dst, cd_g, groups, meta)](*args, **flags)
    else:
        config = config or pinned_config(False, cs_g, cd_g)
        _gather_conv_body[gather_grid(n_dst, cd_g, groups, config)](*args, **flags, **config)
    return dst.to(features.dtype)


def _num_splits(n_dst: int, tiles: int) -> int:
    """Row slices of the weight gradient: about 256 programs in all (``tiles`` = taps x groups x 64x64
    channel tiles), each slice at least 4096 rows."""
    rows_min = 4096
    return max(1, min(triton.cdiv(n_dst, rows_min), max(1, 256 // max(tiles, 1))))


@on_tensor_device
def gather_conv_weight_grad(features: torch.Tensor, table: torch.Tensor, out_grad: torch.Tensor, groups: int,
                            config: dict = None, splits: int = None) -> torch.Tensor:
    """``dW[:, r, :] = sum_j out_grad[j]^T f[table[j, r]]``, shape ``[C_out, K, C_in/groups]``.

    ``config`` overrides the block sizes and ``splits`` forces the number of row slices (for tests).
    """
    check_device(features, "features")
    table = _check_table(table, "neighbour tables", features)
    _check_dtype(features, "features")
    groups = int(groups)
    if out_grad.dim() != 2 or out_grad.shape[0] != table.shape[0]:
        raise ValueError("spconv: output gradient must have one row per table row")
    if out_grad.dtype != features.dtype:
        raise ValueError("spconv: features and gradient dtypes differ")
    if groups < 1 or features.shape[1] % groups != 0 or out_grad.shape[1] % groups != 0:
        raise ValueError("spconv: channels must be divisible by groups")
    features = features.contiguous()
    out_grad = out_grad.contiguous()
    n_dst, kv = table.shape
    ci, co = features.shape[1], out_grad.shape[1]
    ci_g, co_g = ci // groups, co // groups
    if n_dst == 0 or features.shape[0] == 0 or kv == 0 or ci_g == 0 or co_g == 0:
        return torch.zeros((co, kv, ci_g), dtype=features.dtype, device=features.device)
    if splits is None:
        splits = _num_splits(n_dst, kv * groups * triton.cdiv(co_g, 64) * triton.cdiv(ci_g, 64))
    splits = max(1, min(int(splits), n_dst))
    rows_per_split = triton.cdiv(triton.cdiv(n_dst, splits), 128) * 128  # a multiple of every BLOCK_K
    splits = triton.cdiv(n_dst, rows_per_split)
    part_dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    part = torch.empty((splits, co, kv, ci_g), dtype=part_dtype, device=features.device)
    precision, upcast, acc = _dot_flags(features.dtype)
    args = (features, table, out_grad, part, n_dst, kv, groups, ci, co, ci_g, co_g, rows_per_split)
    flags = dict(PRECISION=precision, UPCAST=upcast, ACC=acc)
    if config is None and _autotune():
        _weight_grad_kernel[lambda meta: weight_grad_grid(co_g, ci_g, kv, groups, splits, meta)](*args, **flags)
    else:
        config = config or pinned_config(True, co_g, ci_g)
        _weight_grad_body[weight_grad_grid(co_g, ci_g, kv, groups, splits, config)](*args, **flags, **config)
    grad = part[0] if splits == 1 else part.sum(0)
    return grad.to(features.dtype)


def autotune_configs(weight_grad: bool = False):
    """The block-size configs the autotuner chooses from on a GPU (as dicts), for tests and benchmarks."""
    return [dict(c.kwargs) for c in _configs(False, weight_grad)]
