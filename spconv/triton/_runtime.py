"""Shared helpers of the Triton backend: interpreter detection, argument checks, launch sizes, device guard."""
import contextlib
import functools

import torch
import triton

#: True when Triton's interpreter runs the kernels (``TRITON_INTERPRET=1`` was set before triton was
#: imported). Triton decides this when ``@triton.jit`` runs, so it is fixed for the process.
INTERPRET: bool = bool(triton.knobs.runtime.interpret)


def check_device(t: torch.Tensor, what: str):
    """Raise if ``t`` cannot run on this process' Triton setup."""
    if t.device.type == "cpu" and not INTERPRET:
        raise RuntimeError(
            f"spconv.triton: {what} are on the CPU but Triton's interpreter is off: Triton was imported without "
            "TRITON_INTERPRET=1 in the environment. Set TRITON_INTERPRET=1 before the first import of triton/spconv "
            "to check the Triton kernels on the CPU, or unset SPCONV_BACKEND to use the compiled CPU kernels.")
    if t.device.type not in ("cpu", "cuda"):
        raise NotImplementedError(f"spconv.triton: {what} on device '{t.device}' are not supported (CUDA/ROCm only)")


def device_guard(t: torch.Tensor):
    """``torch.cuda.device(t.device)`` for a CUDA tensor (Triton launches on the current device: a model on
    ``cuda:1`` while ``cuda:0`` is current must launch on ``cuda:1``), a no-op context for CPU tensors."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def on_tensor_device(fn):
    """Run ``fn(t, ...)`` under :func:`device_guard` of its first argument (every entry point of the backend
    takes the tensor whose device it launches on first)."""
    @functools.wraps(fn)
    def wrapper(t, *args, **kwargs):
        with device_guard(t):
            return fn(t, *args, **kwargs)
    wrapper.device_guarded = True
    return wrapper


def check_indices(indices: torch.Tensor, ndim: int) -> torch.Tensor:
    if indices.dim() != 2 or indices.shape[1] != ndim + 1 or indices.dtype != torch.int32:
        raise ValueError(f"spconv: indices must be an int32 tensor [N, {ndim + 1}] (batch, then {ndim} coordinates), "
                         f"got {indices.dtype} {tuple(indices.shape)}")
    if indices.shape[0] >= 2 ** 31:
        raise ValueError("spconv: at most 2^31-1 sites are supported")
    check_device(indices, "indices")
    return indices.contiguous()


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def geometry(device, ndim: int, in_shape, out_shape, ksize, stride, padding, dilation) -> torch.Tensor:
    """int64 [7, 4] table read by the kernel-map kernels: in_shape, out_shape, ksize, stride, padding,
    dilation and the tap divisor (``prod(ksize[d+1:])``, to split a tap index into per-dim offsets)."""
    if not 1 <= ndim <= 4:
        raise ValueError(f"spconv: ndim must be in [1, 4], got {ndim}")
    rows = [list(in_shape), list(out_shape), list(ksize), list(stride), list(padding), list(dilation)]
    for name, row in zip(("in_shape", "out_shape", "ksize", "stride", "padding", "dilation"), rows):
        if len(row) != ndim:
            raise ValueError(f"spconv: {name} must have {ndim} entries, got {row}")
    div = [1] * ndim
    for d in range(ndim - 2, -1, -1):
        div[d] = div[d + 1] * int(ksize[d + 1])
    rows.append(div)
    table = [[int(v) for v in row] + [1] * (4 - ndim) for row in rows]
    return torch.tensor(table, dtype=torch.int64, device=device)
