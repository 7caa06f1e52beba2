"""Fake (meta) implementations of the ``torch.ops.spconv`` operators whose output shapes follow from
the input shapes, so that torch.compile (FakeTensor tracing, AOTAutograd) can keep them inside a
graph instead of breaking the graph at every sparse conv.

Registered (shapes as the C++ kernels produce them):

- ``gather_conv(features [N_in, C_in], table [N_out, K], weight [C_out, K, C_in/g], groups, transpose)``
  -> ``[N_out, C_out]`` (``[N_out, g * weight.size(2)]`` when ``transpose``), features' dtype
- ``gather_conv_weight_grad(features [N_in, C_in], table [N_out, K], out_grad [N_out, C_out], groups)``
  -> ``[C_out, K, C_in/g]`` (contiguous)
- ``maxpool_forward(features [N_in, C], table [N_out, K], zero_floor=False)`` -> ``([N_out, C], argmax [N_out, C] int32)``
- ``maxpool_backward(out_grad [N_out, C], argmax, table_in [N_in, K])`` -> ``[N_in, C]``
- ``avgpool_forward(features [N_in, C], table [N_out, K])`` -> ``[N_out, C]``
- ``avgpool_backward(out_grad [N_out, C], counts, table_in [N_in, K])`` -> ``[N_in, C]``
- ``active_counts(table [N_out, K])`` -> ``[N_out]`` int32
- ``build_subm_map(indices [N, 1+D], ...)`` -> ``[N, prod(ksize)]`` int32 (a SubM map has one row per site)
- ``invert_map(table [N_out, K], num_inputs)`` -> ``[num_inputs, K]`` int32

Not registered: ``build_conv_map`` (regular and transposed convs, pools). Its number of output sites
depends on the coordinates, so torch.compile breaks the graph there and runs it eagerly.
"""
import logging

import torch

import spconv._C  # noqa: F401  (defines the op schemas)

_log = logging.getLogger(__name__)


def _register(name):
    def deco(fn):
        try:
            torch.library.register_fake(f"spconv::{name}")(fn)
        except RuntimeError as e:  # e.g. another module already registered a fake kernel for this op
            _log.debug("spconv: fake kernel for %s not registered: %s", name, e)
        return fn
    return deco


@_register("gather_conv")
def _gather_conv(features, table, weight, groups, transpose_weight):
    c_out = weight.size(2) * groups if transpose_weight else weight.size(0)
    return features.new_empty((table.size(0), c_out))


@_register("gather_conv_weight_grad")
def _gather_conv_weight_grad(features, table, out_grad, groups):
    c_out, kv, c_in_g = out_grad.size(1), table.size(1), features.size(1) // groups
    return features.new_empty((c_out, kv, c_in_g))


@_register("maxpool_forward")
def _maxpool_forward(features, table, zero_floor=False):
    shape = (table.size(0), features.size(1))
    return features.new_empty(shape), table.new_empty(shape)


@_register("maxpool_backward")
def _maxpool_backward(out_grad, argmax, table_in):
    return out_grad.new_empty((table_in.size(0), out_grad.size(1)))


@_register("avgpool_forward")
def _avgpool_forward(features, table):
    return features.new_empty((table.size(0), features.size(1)))


@_register("avgpool_backward")
def _avgpool_backward(out_grad, counts, table_in):
    return out_grad.new_empty((table_in.size(0), out_grad.size(1)))


@_register("active_counts")
def _active_counts(table):
    return table.new_empty((table.size(0),))


@_register("build_subm_map")
def _build_subm_map(indices, batch_size, spatial_shape, ksize, dilation):
    volume = 1
    for k in ksize:
        volume *= k
    return indices.new_empty((indices.size(0), volume))


@_register("invert_map")
def _invert_map(nbr, num_inputs):
    return nbr.new_empty((num_inputs, nbr.size(1)))
