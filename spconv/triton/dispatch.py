"""Which tensors the Triton backend handles.

This module does not import triton (``spconv.pytorch.ops`` imports it on every CPU run): the kernels
are imported by the caller only when :func:`use_triton` says so.

- CUDA tensors (NVIDIA, and AMD under ROCm, which PyTorch also calls ``cuda``) always use Triton.
- CPU tensors use the compiled C++ kernels, unless the environment has ``SPCONV_BACKEND=triton``:
  then they run the Triton kernels in Triton's interpreter, which needs ``TRITON_INTERPRET=1`` set
  before triton is first imported. This is how the GPU kernels are checked on a machine without a GPU.
"""
import os

import torch

BACKEND_ENV = "SPCONV_BACKEND"
_BACKENDS = ("", "cpu", "native", "triton")


def _interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def use_triton(tensor: torch.Tensor) -> bool:
    """True when ``tensor``'s ops run on the Triton backend (CUDA/ROCm tensors, or CPU tensors with
    ``SPCONV_BACKEND=triton``). Raises ``RuntimeError`` for ``SPCONV_BACKEND=triton`` without
    ``TRITON_INTERPRET=1`` and ``ValueError`` for an unknown ``SPCONV_BACKEND``."""
    device = tensor.device.type
    if device == "cuda":
        return True
    if device != "cpu":
        return False
    backend = os.environ.get(BACKEND_ENV, "").strip().lower()
    if backend not in _BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={backend!r} is not a backend: use 'triton' (Triton kernels, on the CPU in "
                         "Triton's interpreter) or leave it unset (compiled CPU kernels)")
    if backend != "triton":
        return False
    if not _interpreter_requested():
        raise RuntimeError(f"{BACKEND_ENV}=triton runs the Triton kernels on CPU tensors in Triton's interpreter, "
                           "which needs TRITON_INTERPRET=1 in the environment before triton is imported, e.g. "
                           "`TRITON_INTERPRET=1 SPCONV_BACKEND=triton python ...`; or unset SPCONV_BACKEND to use "
                           "the compiled CPU kernels")
    return True
