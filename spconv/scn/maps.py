"""Kernel-map (rulebook) building for spconv.scn, in spconv's output-major table format.

A table is ``[N_out, K]`` int32: row j, tap r holds the input row that feeds output j through
kernel offset r (taps in row-major order, last dimension fastest), or -1. These are exactly the
tables spconv's autograd Functions (``sparse_conv``, ``indice_maxpool``, ``indice_avgpool``) take.

SparseConvNet's geometry, for filter size f and stride s (no padding, no dilation):

- submanifold: output sites = input sites, input = output - f // 2 + r;
- convolution (valid): output y reads input x = y * s + r, ``out = (in - f) / s + 1``;
- full convolution (generative transposed): every input x writes y = x * s + r,
  ``out = (in - 1) * s + f``.

Sites are ``[N, 1 + D]`` int32 with the batch index in column 0. 1-4D use the compiled builders of
``spconv.pytorch.ops``; any other dimension (5D, 6D, ...) uses the vectorised, sort-based PyTorch
builder below (int64 keys, ``torch.searchsorted`` per tap), which produces identical tables.
"""
from typing import List, Sequence, Tuple

import torch

from spconv.pytorch import ops

MAX_COMPILED_DIM = 4  # kMaxDim of include/spconv/geometry.h
_TAP_CHUNK_ELEMS = 1 << 24  # candidates handled per chunk by the PyTorch builder


def use_compiled(ndim: int) -> bool:
    return 1 <= ndim <= MAX_COMPILED_DIM


def linear_keys(coords: torch.Tensor, batch: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """int64 key of each site: batch slowest, last spatial dimension fastest. coords [..., D]."""
    key = batch.long()
    for d, s in enumerate(shape):
        key = key * int(s) + coords[..., d].long()
    return key


def decode_keys(keys: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`linear_keys`: ``[M, 1 + D]`` int32, batch first."""
    cols = []
    rest = keys
    for s in reversed(list(shape)):
        cols.append(rest % int(s))
        rest = rest // int(s)
    cols.append(rest)
    return torch.stack(cols[::-1], 1).int() if keys.numel() else keys.new_zeros((0, len(shape) + 1)).int()


def tap_offsets(ksize: Sequence[int]) -> torch.Tensor:
    """``[K, D]`` int64 kernel offsets, row-major (last dimension fastest), as SparseConvNet orders them."""
    grids = torch.meshgrid(*[torch.arange(int(k)) for k in ksize], indexing="ij")
    return torch.stack([g.reshape(-1) for g in grids], 1)


class _SortedSites:
    """The sites' keys sorted, for lookups by ``torch.searchsorted``."""

    def __init__(self, indices: torch.Tensor, shape: Sequence[int]):
        keys = linear_keys(indices[:, 1:], indices[:, 0], shape)
        self.keys, self.rows = torch.sort(keys)

    def lookup(self, query: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Row of each query key (int32), -1 where absent or not ``valid``."""
        if self.keys.numel() == 0:
            return torch.full(query.shape, -1, dtype=torch.int32)
        pos = torch.searchsorted(self.keys, query).clamp_(max=self.keys.numel() - 1)
        found = valid & (self.keys[pos] == query)
        return torch.where(found, self.rows[pos], torch.full_like(pos, -1)).int()


def _tap_chunks(n: int, k: int, ndim: int):
    step = max(1, _TAP_CHUNK_ELEMS // max(1, n * max(ndim, 1)))
    for start in range(0, k, step):
        yield start, min(k, start + step)


def _torch_subm(indices, shape, ksize) -> torch.Tensor:
    offsets = tap_offsets(ksize) - torch.tensor([int(k) // 2 for k in ksize])
    sites = _SortedSites(indices, shape)
    coords = indices[:, 1:].long()
    hi = torch.tensor([int(s) for s in shape])
    n, k = indices.shape[0], offsets.shape[0]
    table = torch.empty((n, k), dtype=torch.int32)
    for a, b in _tap_chunks(n, k, len(shape)):
        q = coords.unsqueeze(0) + offsets[a:b].unsqueeze(1)  # [k', N, D]
        valid = ((q >= 0) & (q < hi)).all(-1)
        keys = linear_keys(q.clamp(min=0), indices[:, 0].unsqueeze(0), shape)
        table[:, a:b] = sites.lookup(keys, valid).t()
    return table


def _torch_conv(indices, in_shape, out_shape, ksize, stride, transposed) -> Tuple[torch.Tensor, torch.Tensor]:
    offsets = tap_offsets(ksize)
    st = torch.tensor([int(s) for s in stride])
    out_hi = torch.tensor([int(s) for s in out_shape])
    in_hi = torch.tensor([int(s) for s in in_shape])
    coords = indices[:, 1:].long()
    batch = indices[:, 0]
    n, k = indices.shape[0], offsets.shape[0]
    # every output site reached by an input site
    cand = []
    for a, b in _tap_chunks(n, k, len(in_shape)):
        off = offsets[a:b].unsqueeze(1)
        if transposed:
            y = coords.unsqueeze(0) * st + off
            valid = (y < out_hi).all(-1)
        else:
            t = coords.unsqueeze(0) - off
            y = torch.div(t, st, rounding_mode="floor")
            valid = ((t >= 0) & (t % st == 0) & (y < out_hi)).all(-1)
        keys = linear_keys(y, batch.unsqueeze(0).expand(b - a, n), out_shape)
        cand.append(keys[valid])
    out_keys = torch.unique(torch.cat(cand)) if cand else torch.zeros(0, dtype=torch.long)
    out_indices = decode_keys(out_keys, out_shape)
    sites = _SortedSites(indices, in_shape)
    m = out_indices.shape[0]
    table = torch.empty((m, k), dtype=torch.int32)
    ocoords = out_indices[:, 1:].long()
    for a, b in _tap_chunks(m, k, len(in_shape)):
        off = offsets[a:b].unsqueeze(1)
        if transposed:
            t = ocoords.unsqueeze(0) - off
            x = torch.div(t, st, rounding_mode="floor")
            valid = ((t >= 0) & (t % st == 0) & (x < in_hi)).all(-1)
        else:
            x = ocoords.unsqueeze(0) * st + off
            valid = (x < in_hi).all(-1)
        keys = linear_keys(x.clamp(min=0), out_indices[:, 0].unsqueeze(0), in_shape)
        table[:, a:b] = sites.lookup(keys, valid).t()
    return out_indices, table


def subm_table(indices: torch.Tensor, shape: List[int], ksize: List[int], batch_size: int) -> torch.Tensor:
    """Submanifold table ``[N, K]`` (output sites = input sites)."""
    ndim = len(shape)
    if use_compiled(ndim) and all(k % 2 == 1 for k in ksize):
        return ops.build_subm_map(indices, shape, ksize, [1] * ndim, batch_size)
    return _torch_subm(indices, shape, ksize)


def conv_table(indices: torch.Tensor, in_shape: List[int], out_shape: List[int], ksize: List[int],
               stride: List[int], batch_size: int, transposed: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Valid strided (``transposed=False``) or full (``True``) convolution: ``(out_indices [M, 1+D]
    sorted by (batch, coords), table [M, K])``."""
    ndim = len(in_shape)
    if use_compiled(ndim):
        return ops.build_conv_map(indices, in_shape, out_shape, ksize, stride, [0] * ndim, [1] * ndim, transposed,
                                  batch_size)
    return _torch_conv(indices, in_shape, out_shape, ksize, stride, transposed)


def invert_table(table: torch.Tensor, num_inputs: int) -> torch.Tensor:
    """Input-major ``[num_inputs, K]`` table of an output-major one (for backward passes and inverses)."""
    if table.shape[0] == 0 or num_inputs == 0:
        return torch.full((num_inputs, table.shape[1]), -1, dtype=torch.int32)
    return ops.invert_map(table.contiguous(), num_inputs)
