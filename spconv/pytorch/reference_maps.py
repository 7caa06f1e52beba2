"""Sort-based kernel-map builder in plain PyTorch, for any number of dimensions.

It builds the same tables as the compiled builder (src/kernel_map.cpp) and the Triton one
(spconv/triton/map_kernels.py): ``ops`` uses it for grids of 5 or more dimensions and for SubM maps
with even kernels (SparseConvNet's rule), and the tests use it as the reference of the others.
Sites are int64 keys (:func:`linear_keys`), sorted once; every tap is a vectorised
``torch.searchsorted`` over the sorted keys.

Geometry, per dimension, for tap r (row-major, last dimension fastest) of a kernel k, stride s,
padding p, dilation d:

- SubM: output sites = input sites, input = output + (r - k // 2) * d;
- regular: output y reads input x = y * s - p + r * d;
- transposed: input x writes output y = x * s - p + r * d.
"""
from typing import Sequence, Tuple

import torch

_TAP_CHUNK_ELEMS = 1 << 24  # (tap, site) candidates handled per chunk


def linear_keys(indices: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
    """int64 key of each row of ``indices [..., 1 + D]`` (batch first): batch slowest, last dimension fastest."""
    key = indices[..., 0].long()
    for d, size in enumerate(spatial_shape):
        key = key * int(size) + indices[..., d + 1].long()
    return key


def decode_keys(keys: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`linear_keys`: ``[M, 1 + D]`` int32, batch first."""
    if keys.numel() == 0:
        return torch.zeros((0, len(spatial_shape) + 1), dtype=torch.int32, device=keys.device)
    cols = []
    rest = keys
    for size in reversed(list(spatial_shape)):
        cols.append(rest % int(size))
        rest = rest // int(size)
    cols.append(rest)
    return torch.stack(cols[::-1], 1).int()


def tap_offsets(ksize: Sequence[int], device=None) -> torch.Tensor:
    """``[K, D]`` int64 tap positions, row-major (last dimension fastest)."""
    grids = torch.meshgrid(*[torch.arange(int(k), device=device) for k in ksize], indexing="ij")
    return torch.stack([g.reshape(-1) for g in grids], 1)


class _SortedSites:
    """The sites' keys sorted, for lookups by ``torch.searchsorted``."""

    def __init__(self, indices: torch.Tensor, spatial_shape: Sequence[int]):
        self.keys, self.rows = torch.sort(linear_keys(indices, spatial_shape))

    def lookup(self, query: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Row of each query key (int32), -1 where absent or not ``valid``."""
        if self.keys.numel() == 0:
            return torch.full(query.shape, -1, dtype=torch.int32, device=query.device)
        pos = torch.searchsorted(self.keys, query).clamp_(max=self.keys.numel() - 1)
        found = valid & (self.keys[pos] == query)
        return torch.where(found, self.rows[pos], torch.full_like(pos, -1)).int()


def _tap_chunks(n: int, k: int, ndim: int):
    step = max(1, _TAP_CHUNK_ELEMS // max(1, n * max(ndim, 1)))
    for start in range(0, k, step):
        yield start, min(k, start + step)


def _with_batch(batch: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """``[..., 1 + D]`` from a batch column broadcast against ``coords [..., D]``."""
    return torch.cat([batch.expand(coords.shape[:-1]).unsqueeze(-1), coords], -1)


def build_subm_map(indices: torch.Tensor, spatial_shape, ksize, dilation) -> torch.Tensor:
    """SubM table ``[N, K]`` int32 (output sites = input sites; even kernels allowed)."""
    dev = indices.device
    vec = lambda vals: torch.tensor([int(v) for v in vals], device=dev)  # noqa: E731
    offsets = (tap_offsets(ksize, dev) - vec(k // 2 for k in ksize)) * vec(dilation)
    sites = _SortedSites(indices, spatial_shape)
    coords = indices[:, 1:].long()
    hi = vec(spatial_shape)
    n, k = indices.shape[0], offsets.shape[0]
    table = torch.empty((n, k), dtype=torch.int32, device=dev)
    for a, b in _tap_chunks(n, k, len(spatial_shape)):
        q = coords.unsqueeze(0) + offsets[a:b].unsqueeze(1)  # [k', N, D]
        valid = ((q >= 0) & (q < hi)).all(-1)
        keys = linear_keys(_with_batch(indices[:, 0].long(), q.clamp(min=0)), spatial_shape)
        table[:, a:b] = sites.lookup(keys, valid).t()
    return table


def build_conv_map(indices: torch.Tensor, in_shape, out_shape, ksize, stride, padding, dilation,
                   transposed: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Regular or transposed conv: ``(out_indices [M, 1 + D] sorted by (batch, coords), table [M, K])``."""
    dev = indices.device
    vec = lambda vals: torch.tensor([int(v) for v in vals], device=dev)  # noqa: E731
    taps = tap_offsets(ksize, dev) * vec(dilation) - vec(padding)
    st, out_hi, in_hi = vec(stride), vec(out_shape), vec(in_shape)
    batch = indices[:, 0].long()
    coords = indices[:, 1:].long()
    n, k = indices.shape[0], taps.shape[0]

    def reached(x, off, lo_hi):  # positions y = (x - off) / s that are whole and inside lo_hi
        t = x - off
        y = torch.div(t, st, rounding_mode="floor")
        return y, ((t >= 0) & (t % st == 0) & (y < lo_hi)).all(-1)

    candidates = []
    for a, b in _tap_chunks(n, k, len(in_shape)):
        off = taps[a:b].unsqueeze(1)
        if transposed:  # y = x * s + off
            y = coords.unsqueeze(0) * st + off
            valid = ((y >= 0) & (y < out_hi)).all(-1)
        else:  # x = y * s + off
            y, valid = reached(coords.unsqueeze(0), off, out_hi)
        candidates.append(linear_keys(_with_batch(batch, y.clamp(min=0)), out_shape)[valid])
    out_keys = torch.unique(torch.cat(candidates)) if candidates else torch.zeros(0, dtype=torch.long, device=dev)
    out_indices = decode_keys(out_keys, out_shape)
    sites = _SortedSites(indices, in_shape)
    m = out_indices.shape[0]
    table = torch.empty((m, k), dtype=torch.int32, device=dev)
    out_batch = out_indices[:, 0].long()
    out_coords = out_indices[:, 1:].long()
    for a, b in _tap_chunks(m, k, len(in_shape)):
        off = taps[a:b].unsqueeze(1)
        if transposed:
            x, valid = reached(out_coords.unsqueeze(0), off, in_hi)
        else:
            x = out_coords.unsqueeze(0) * st + off
            valid = ((x >= 0) & (x < in_hi)).all(-1)
        keys = linear_keys(_with_batch(out_batch, x.clamp(min=0)), in_shape)
        table[:, a:b] = sites.lookup(keys, valid).t()
    return out_indices, table
