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
