"""Kernel-map building and the sparse conv / pool kernels, through ``torch.ops.spconv.*``.

PyTorch's dispatcher picks the kernel by device: CPU tensors run the compiled extension, CUDA/ROCm tensors the
Triton kernels of spconv.triton (registered as the operators' CUDA kernels by spconv.triton.dispatch). CPU
tensors run the Triton kernels in Triton's interpreter inside ``spconv.triton.dispatch.triton_on_cpu()`` (or
with ``SPCONV_BACKEND=triton``), with ``TRITON_INTERPRET=1``.
"""
import os
from typing import List, Tuple

import torch

import spconv._C  # registers torch.ops.spconv.* (schemas and CPU kernels)
from spconv.triton import dispatch as _dispatch  # does not import triton
from spconv.pytorch import _meta  # noqa: F401  (fake kernels for torch.compile)
from spconv.pytorch import reference_maps
from spconv.pytorch.reference_maps import linear_keys  # noqa: F401  (the one definition of site keys)

_ops = torch.ops.spconv
_dispatch.register_cuda_kernels()  # the Triton kernels are the CUDA kernels of torch.ops.spconv.*
_dispatch.enable_from_environment()  # SPCONV_BACKEND=triton: Triton kernels on CPU tensors too (interpreter)

# Large CPU tensors (>= 1 MB) come from spconv's caching allocator (src/cpu_allocator.cpp): freed blocks are
# reused for requests of the same size instead of being unmapped by glibc and page-faulted again on the next
# op, with live + cached memory kept within 1.25x the most ever live. Process-wide, for every CPU tensor;
# SPCONV_CPU_CACHING_ALLOCATOR=0 (set before importing spconv) keeps PyTorch's default allocator.
CACHING_ALLOCATOR = (os.environ.get("SPCONV_CPU_CACHING_ALLOCATOR", "1") != "0"
                     and spconv._C.use_caching_allocator())


def _check_device(t: torch.Tensor, what: str = "features"):
    if t.device.type not in ("cpu", "cuda"):
        raise NotImplementedError(
            f"spconv: {what} on device '{t.device}' are not supported: spconv runs on the CPU and on CUDA/ROCm "
            "GPUs (through Triton). Move the tensors and the model to one of those with .cpu() or .cuda().")


def get_conv_output_size(input_size, kernel_size, stride, padding, dilation) -> List[int]:
    """``out = (in + 2p - d(k-1) - 1) // s + 1`` per dimension (k == -1 gives 1); raises if any is <= 0."""
    out = []
    for d, (i, k, s, p, dl) in enumerate(zip(input_size, kernel_size, stride, padding, dilation)):
        size = 1 if k == -1 else (i + 2 * p - dl * (k - 1) - 1) // s + 1
        if size <= 0:
            raise ValueError(f"output spatial size of dimension {d} is {size} (input {i}, kernel {k}, stride {s}, "
                             f"padding {p}, dilation {dl}): reduce the kernel/stride or add padding")
        out.append(size)
    _check_grid(out, f"output (input {list(input_size)}, kernel_size={list(kernel_size)}, stride={list(stride)}, "
                     f"padding={list(padding)}, dilation={list(dilation)})")
    return out


_INT32_MAX = 2 ** 31 - 1
_KEY_LIMIT = 2 ** 62


def _check_grid(shape, what: str, batch_size: int = 1):
    """Coordinates are int32 and site keys int64: each extent must be < 2^31 and batch * volume < 2^62."""
    for d, size in enumerate(shape):
        if size > _INT32_MAX:
            raise ValueError(f"{what}: spatial size of dimension {d} is {size}, above 2^31-1 (coordinates are "
                             f"int32); reduce the padding, dilation or stride, or use a coarser grid")
    volume = int(batch_size)
    for size in shape:
        volume *= int(size)
    if volume >= _KEY_LIMIT:
        raise ValueError(f"{what}: batch_size x prod({list(shape)}) = {volume} does not fit int64 site keys "
                         "(limit 2^62); reduce the stride, padding or dilation, or use a coarser grid")


def get_deconv_output_size(input_size, kernel_size, stride, padding, dilation, output_padding) -> List[int]:
    """``out = (in - 1) s - 2p + d(k-1) + output_padding + 1`` per dimension (torch's ConvTranspose rule)."""
    out = []
    for d, (i, k, s, p, dl, op) in enumerate(zip(input_size, kernel_size, stride, padding, dilation, output_padding)):
        if k == -1:
            raise ValueError("kernel size -1 is not supported for transposed convs")
        size = (i - 1) * s - 2 * p + dl * (k - 1) + op + 1
        if size <= 0:
            raise ValueError(f"output spatial size of dimension {d} is {size} (input {i}, kernel {k}, stride {s}, "
                             f"padding {p}): reduce the padding")
        out.append(size)
    _check_grid(out, f"transposed output (input {list(input_size)}, kernel_size={list(kernel_size)}, "
                     f"stride={list(stride)}, padding={list(padding)}, dilation={list(dilation)}, "
                     f"output_padding={list(output_padding)})")
    return out


def _batch_size(indices: torch.Tensor, batch_size) -> int:
    if batch_size is not None:
        return int(batch_size)
    if indices.device.type != "cpu":
        return -1  # the Triton builders key sites by batch without needing the count: no host sync for it
    return int(indices[:, 0].max()) + 1 if indices.shape[0] > 0 else 1


MAX_COMPILED_DIM = 4  # kMaxDim of include/spconv/geometry.h: more dimensions use reference_maps


def build_subm_map(indices: torch.Tensor, spatial_shape, ksize, dilation, batch_size=None) -> torch.Tensor:
    """Output-major SubM neighbour table ``[N, K]`` int32 (output sites == input sites). Even kernels
    (SparseConvNet's rule, input = output - k // 2 + r) and grids of 5+ dimensions use reference_maps."""
    if len(spatial_shape) > MAX_COMPILED_DIM or any(int(k) % 2 == 0 for k in ksize):
        return reference_maps.build_subm_map(indices, spatial_shape, ksize, dilation)
    _check_device(indices, "indices")
    return _ops.build_subm_map(indices.contiguous(), _batch_size(indices, batch_size), list(spatial_shape),
                               list(ksize), list(dilation))


def build_conv_map(indices: torch.Tensor, in_shape, out_shape, ksize, stride, padding, dilation,
                   transposed: bool, batch_size=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Regular or transposed conv: ``(out_indices [M, 1+D] sorted by (batch, coords), table [M, K])``."""
    if len(in_shape) > MAX_COMPILED_DIM:
        return reference_maps.build_conv_map(indices, in_shape, out_shape, ksize, stride, padding, dilation,
                                             transposed)
    _check_device(indices, "indices")
    return _ops.build_conv_map(indices.contiguous(), _batch_size(indices, batch_size), list(in_shape),
                               list(out_shape), list(ksize), list(stride), list(padding), list(dilation),
                               bool(transposed))


def invert_map(table: torch.Tensor, num_inputs: int) -> torch.Tensor:
    """Input-major table ``[num_inputs, K]`` of an output-major one."""
    if table.shape[0] == 0 or num_inputs == 0:
        return torch.full((int(num_inputs), table.shape[1]), -1, dtype=torch.int32, device=table.device)
    _check_device(table, "neighbour tables")
    return _ops.invert_map(table, int(num_inputs))


def gather_conv(features: torch.Tensor, table: torch.Tensor, weight: torch.Tensor, groups: int,
                transpose_weight: bool) -> torch.Tensor:
    """``out[j] = sum_r W_r @ f[table[j, r]]`` with ``weight [C_out, K, C_in/groups]`` (``W_r^T`` if transposed)."""
    _check_device(features)
    return _ops.gather_conv(features, table, weight, int(groups), bool(transpose_weight))


def gather_conv_weight_grad(features: torch.Tensor, table: torch.Tensor, out_grad: torch.Tensor,
                            groups: int) -> torch.Tensor:
    """``dW[:, r, :] = sum_j out_grad[j]^T f[table[j, r]]``, shape ``[C_out, K, C_in/groups]``."""
    _check_device(features)
    return _ops.gather_conv_weight_grad(features, table, out_grad.contiguous(), int(groups))


def maxpool_forward(features: torch.Tensor, table: torch.Tensor,
                    zero_floor: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Max over the active taps of each output row: ``(out [N_out, C], argmax input row [N_out, C])``.

    NaN propagates (as in ``torch.nn.functional.max_pool3d``). ``zero_floor=True`` gives spconv 2.x's
    ``max(0, max over inputs)``: where the floor wins the output is 0 and argmax -1 (no gradient).
    """
    _check_device(features)
    return _ops.maxpool_forward(features, table, bool(zero_floor))


def maxpool_backward(out_grad: torch.Tensor, argmax: torch.Tensor, table_in: torch.Tensor) -> torch.Tensor:
    """Routes each output gradient to its argmax input row, through the input-major table."""
    _check_device(out_grad, "gradients")
    return _ops.maxpool_backward(out_grad, argmax, table_in)


def avgpool_forward(features: torch.Tensor, table: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean over the active taps: ``(out [N_out, C], active tap counts [N_out] int32)``."""
    _check_device(features)
    return _ops.avgpool_forward(features, table), _ops.active_counts(table)


def avgpool_backward(out_grad: torch.Tensor, counts: torch.Tensor, table_in: torch.Tensor) -> torch.Tensor:
    _check_device(out_grad, "gradients")
    return _ops.avgpool_backward(out_grad, counts, table_in)
