"""Autograd Functions of the sparse ops (forward and backward), on top of ``ops``."""
import torch
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from spconv.pytorch import ops


class SparseConvFunction(Function):
    """Sparse convolution through a kernel map.

    forward(features [N_in, C_in], weight [C_out, *k, C_in/groups], fwd_table [N_out, K],
            bwd_table [N_in, K] or a callable returning it, groups) -> [N_out, C_out]
    """

    @staticmethod
    def forward(ctx, features, weight, fwd_table, bwd_table, groups):
        w3 = weight.reshape(weight.shape[0], -1, weight.shape[-1])
        out = ops.gather_conv(features, fwd_table, w3, groups, False)
        ctx.save_for_backward(features, weight, fwd_table)
        ctx.bwd_table = bwd_table
        ctx.groups = groups
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, out_grad):
        features, weight, fwd_table = ctx.saved_tensors
        out_grad = out_grad.contiguous()
        w3 = weight.reshape(weight.shape[0], -1, weight.shape[-1])
        d_features = d_weight = None
        if ctx.needs_input_grad[0]:
            bwd_table = ctx.bwd_table() if callable(ctx.bwd_table) else ctx.bwd_table
            d_features = ops.gather_conv(out_grad, bwd_table, w3, ctx.groups, True)
        if ctx.needs_input_grad[1]:
            d_weight = ops.gather_conv_weight_grad(features, fwd_table, out_grad, ctx.groups).view(weight.shape)
        return d_features, d_weight, None, None, None


def _autocast_dtype(device_type: str):
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def sparse_conv(features: torch.Tensor, weight: torch.Tensor, fwd_table: torch.Tensor, bwd_table,
                groups: int = 1) -> torch.Tensor:
    """Run :class:`SparseConvFunction`; under autocast, features and weight are cast to the autocast
    dtype (bf16 on CPU by default) and the kernel accumulates in fp32."""
    dtype = _autocast_dtype(features.device.type)
    if dtype is not None and features.is_floating_point():
        with torch.autocast(features.device.type, enabled=False):
            return SparseConvFunction.apply(features.to(dtype), weight.to(dtype), fwd_table, bwd_table, groups)
    return SparseConvFunction.apply(features, weight, fwd_table, bwd_table, groups)


def subm_conv_with_duplicates(features: torch.Tensor, weight: torch.Tensor, table: torch.Tensor, dups,
                              groups: int = 1) -> torch.Tensor:
    """SubM conv of ``features [N, C_in]`` whose rows repeat sites, computed as spconv 2.3.8 does.

    ``table [U, K]`` is the SubM map of the U unique sites (``dups``: kernel_maps.DuplicateSites). spconv's CPU
    builder pairs each row with the first row of every neighbouring site at a larger key (taps after the
    centre) and adds the mirrored pair, so for an output row o of site u:

        out[o] = W_c f[o] + sum_{r > c} W_r f[first(T[u, r])] + [o == first(u)] sum_{r < c} W_r sum(f[rows of T[u, r]])

    Returns ``[N, C_out]``."""
    k = table.shape[1]
    centre = k // 2
    taps = torch.arange(k, device=table.device)
    lower = table.masked_fill(taps >= centre, -1)
    upper = table.masked_fill(taps <= centre, -1)
    w3 = weight.reshape(weight.shape[0], k, weight.shape[-1])
    n = features.shape[0]
    own = torch.arange(n, dtype=torch.int32, device=table.device).unsqueeze(1)
    out = sparse_conv(features, w3[:, centre:centre + 1], own, own, groups)
    from_first = sparse_conv(features[dups.first], w3, upper, lambda: ops.invert_map(upper, dups.num_sites), groups)
    from_all = sparse_conv(dups.sum(features), w3, lower, lambda: ops.invert_map(lower, dups.num_sites), groups)
    return (out + from_first[dups.inverse]).index_add(0, dups.first, from_all)


class SparseMaxPoolFunction(Function):
    """forward(features [N_in, C], fwd_table [N_out, K], bwd_table [N_in, K] or callable, zero_floor) -> [N_out, C]

    Max over the active taps; NaN propagates. ``zero_floor``: the result is ``max(0, that)`` (spconv 2.3.8's
    SparseMaxPool), and an output where 0 wins sends no gradient."""

    @staticmethod
    def forward(ctx, features, fwd_table, bwd_table, zero_floor=False):
        if zero_floor:
            out, argmax = ops.maxpool_forward(features.contiguous(), fwd_table, zero_floor=True)
        else:
            out, argmax = ops.maxpool_forward(features.contiguous(), fwd_table)
        ctx.save_for_backward(argmax)
        ctx.bwd_table = bwd_table
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, out_grad):
        (argmax,) = ctx.saved_tensors
        bwd_table = ctx.bwd_table() if callable(ctx.bwd_table) else ctx.bwd_table
        return ops.maxpool_backward(out_grad.contiguous(), argmax, bwd_table), None, None, None


class SparseAvgPoolFunction(Function):
    """forward(features [N_in, C], fwd_table [N_out, K], bwd_table [N_in, K] or callable) -> [N_out, C]"""

    @staticmethod
    def forward(ctx, features, fwd_table, bwd_table):
        out, counts = ops.avgpool_forward(features.contiguous(), fwd_table)
        ctx.save_for_backward(counts)
        ctx.bwd_table = bwd_table
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, out_grad):
        (counts,) = ctx.saved_tensors
        bwd_table = ctx.bwd_table() if callable(ctx.bwd_table) else ctx.bwd_table
        return ops.avgpool_backward(out_grad.contiguous(), counts, bwd_table), None, None


indice_maxpool = SparseMaxPoolFunction.apply
indice_avgpool = SparseAvgPoolFunction.apply


def _linear_keys(indices: torch.Tensor, shape) -> torch.Tensor:
    """int64 key of each row of indices [N, 1+D] in a grid of ``shape`` = [B, *spatial] (row-major)."""
    key = indices[:, 0].long()
    for d, s in enumerate(shape[1:]):
        key = key * int(s) + indices[:, d + 1].long()
    return key


def sparse_add(*tens):
    """Sum of sparse tensors with possibly different sites: the union of the sites, coinciding sites
    summed. Output rows are sorted by (batch, coords). The result keeps the ``indice_dict`` of the
    operand with the most sites when it has exactly that many (so an inverse conv can follow)."""
    from spconv.pytorch.core import SparseConvTensor
    if len(tens) < 1:
        raise ValueError("sparse_add needs at least one SparseConvTensor")
    first = tens[0]
    for t in tens:
        if not isinstance(t, SparseConvTensor):
            raise TypeError(f"sparse_add takes SparseConvTensors, got {type(t).__name__}")
        t.validated()
        if t.spatial_shape != first.spatial_shape or t.batch_size != first.batch_size:
            raise ValueError(f"sparse_add needs equal spatial_shape and batch_size, got {t.spatial_shape}/"
                             f"{t.batch_size} and {first.spatial_shape}/{first.batch_size}")
        if t.features.shape[1] != first.features.shape[1]:
            raise ValueError(f"sparse_add needs equal channel counts, got {t.features.shape[1]} and "
                             f"{first.features.shape[1]}")
    shape = [first.batch_size, *first.spatial_shape]
    indices = torch.cat([t.indices for t in tens])
    keys = _linear_keys(indices, shape)
    uniq, inverse = torch.unique(keys, sorted=True, return_inverse=True)
    dtype = first.features.dtype
    for t in tens[1:]:
        dtype = torch.promote_types(dtype, t.features.dtype)
    feats = torch.cat([t.features.to(dtype) for t in tens])
    out_feats = feats.new_zeros((uniq.shape[0], feats.shape[1])).index_add(0, inverse, feats)
    first_row = torch.full((uniq.shape[0],), indices.shape[0], dtype=torch.long, device=indices.device)
    first_row = first_row.scatter_reduce(0, inverse, torch.arange(indices.shape[0], device=indices.device), "amin")
    out_indices = indices[first_row].contiguous()
    largest = max(tens, key=lambda t: t.indices.shape[0])
    indice_dict = largest.indice_dict if largest.indices.shape[0] == uniq.shape[0] else {}
    out = first._derive(out_feats, out_indices, first.spatial_shape, indice_dict)
    if indice_dict:  # keep the largest operand's row order so its kernel maps stay valid
        pos = torch.searchsorted(uniq, _linear_keys(largest.indices, shape))
        out = first._derive(out_feats[pos], largest.indices, first.spatial_shape, indice_dict)
    return out


def sparse_add_hash_based(*tens):
    """Same result as :func:`sparse_add` (spconv computes it with a hash table; row order may differ there)."""
    return sparse_add(*tens)
