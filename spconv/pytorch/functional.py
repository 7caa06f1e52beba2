"""Autograd Functions of the sparse ops (forward and backward), on top of ``ops``."""
import torch
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from spconv.pytorch import ops
from spconv.pytorch.core import KernelMap, SparseConvTensor


class SparseConvFunction(Function):
    """Sparse convolution through a :class:`~spconv.pytorch.core.KernelMap`.

    forward(features [N_in, C_in], weight [C_out, *k, C_in/groups], kmap, groups) -> [N_out, C_out]:
    ``out[j] = sum_r W_r @ features[kmap.indice_pairs[j, r]]``; backward runs the input-major table with
    the transposed weight for ``d_features`` and the output-major one for ``d_weight``.
    """

    @staticmethod
    def forward(ctx, features, weight, kmap, groups):
        w3 = weight.reshape(weight.shape[0], -1, weight.shape[-1])
        out = ops.gather_conv(features, kmap.indice_pairs, w3, groups, False)
        ctx.save_for_backward(features, weight)
        ctx.kmap = kmap
        ctx.groups = groups
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, out_grad):
        features, weight = ctx.saved_tensors
        out_grad = out_grad.contiguous()
        w3 = weight.reshape(weight.shape[0], -1, weight.shape[-1])
        d_features = d_weight = None
        if ctx.needs_input_grad[0]:
            d_features = ops.gather_conv(out_grad, ctx.kmap.input_major_pairs, w3, ctx.groups, True)
        if ctx.needs_input_grad[1]:
            d_weight = ops.gather_conv_weight_grad(features, ctx.kmap.indice_pairs, out_grad,
                                                   ctx.groups).view(weight.shape)
        return d_features, d_weight, None, None


def _autocast_dtype(device_type: str):
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def sparse_conv(features: torch.Tensor, weight: torch.Tensor, kmap: KernelMap, groups: int = 1) -> torch.Tensor:
    """Run :class:`SparseConvFunction`; under autocast, features and weight are cast to the autocast
    dtype (bf16 on CPU by default) and the kernel accumulates in fp32."""
    dtype = _autocast_dtype(features.device.type)
    if dtype is not None and features.is_floating_point():
        with torch.autocast(features.device.type, enabled=False):
            return SparseConvFunction.apply(features.to(dtype), weight.to(dtype), kmap, groups)
    return SparseConvFunction.apply(features, weight, kmap, groups)


def subm_conv_with_duplicates(features: torch.Tensor, weight: torch.Tensor, table: torch.Tensor, dups,
                              groups: int = 1) -> torch.Tensor:
    """SubM conv of ``features [N, C_in]`` whose rows repeat sites, computed as spconv 2.3.8 does.

    ``table [U, K]`` is the SubM map of the U unique sites (``dups``: indice_keys.DuplicateSites). spconv's CPU
    builder pairs each row with the first row of every neighbouring site at a larger key (taps after the
    centre) and adds the mirrored pair, so for an output row o of site u:

        out[o] = W_c f[o] + sum_{r > c} W_r f[first(T[u, r])] + [o == first(u)] sum_{r < c} W_r sum(f[rows of T[u, r]])

    Returns ``[N, C_out]``."""
    k = table.shape[1]
    centre = k // 2
    taps = torch.arange(k, device=table.device)
    lower = KernelMap(table.masked_fill(taps >= centre, -1), dups.num_sites)
    upper = KernelMap(table.masked_fill(taps <= centre, -1), dups.num_sites)
    w3 = weight.reshape(weight.shape[0], k, weight.shape[-1])
    own = KernelMap(torch.arange(features.shape[0], dtype=torch.int32, device=table.device).unsqueeze(1),
                    features.shape[0], mirrored=True)
    out = sparse_conv(features, w3[:, centre:centre + 1], own, groups)
    from_first = sparse_conv(features[dups.first], w3, upper, groups)
    from_all = sparse_conv(dups.sum(features), w3, lower, groups)
    return (out + from_first[dups.inverse]).index_add(0, dups.first, from_all)


class SparseMaxPoolFunction(Function):
    """forward(features [N_in, C], kmap, zero_floor) -> [N_out, C]: max over the active taps; NaN propagates.

    ``zero_floor``: the result is ``max(0, that)`` (spconv 2.3.8's SparseMaxPool), and an output where 0
    wins sends no gradient."""

    @staticmethod
    def forward(ctx, features, kmap, zero_floor=False):
        if zero_floor:
            out, argmax = ops.maxpool_forward(features.contiguous(), kmap.indice_pairs, zero_floor=True)
        else:
            out, argmax = ops.maxpool_forward(features.contiguous(), kmap.indice_pairs)
        ctx.save_for_backward(argmax)
        ctx.kmap = kmap
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, out_grad):
        (argmax,) = ctx.saved_tensors
        return ops.maxpool_backward(out_grad.contiguous(), argmax, ctx.kmap.input_major_pairs), None, None


class SparseAvgPoolFunction(Function):
    """forward(features [N_in, C], kmap) -> [N_out, C]: mean over the active taps."""

    @staticmethod
    def forward(ctx, features, kmap):
        out, counts = ops.avgpool_forward(features.contiguous(), kmap.indice_pairs)
        ctx.save_for_backward(counts)
        ctx.kmap = kmap
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, out_grad):
        (counts,) = ctx.saved_tensors
        return ops.avgpool_backward(out_grad.contiguous(), counts, ctx.kmap.input_major_pairs), None


indice_maxpool = SparseMaxPoolFunction.apply
indice_avgpool = SparseAvgPoolFunction.apply


def sparse_add(*tens):
    """Sum of sparse tensors with possibly different sites: the union of the sites, coinciding sites
    summed. Output rows are sorted by (batch, coords). The result keeps the ``indice_dict`` of the
    operand with the most sites when it has exactly that many (so an inverse conv can follow)."""
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
    keys = ops.linear_keys(indices, shape[1:])
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
        pos = torch.searchsorted(uniq, ops.linear_keys(largest.indices, shape[1:]))
        out = first._derive(out_feats[pos], largest.indices, first.spatial_shape, indice_dict)
    return out


def sparse_add_hash_based(*tens):
    """Same result as :func:`sparse_add` (spconv computes it with a hash table; row order may differ there)."""
    return sparse_add(*tens)
