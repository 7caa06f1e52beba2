"""How ``torch.ops.spconv.*`` reach the Triton kernels: PyTorch's dispatcher chooses, by device.

This module does not import triton (``spconv.pytorch.ops`` imports it on every CPU run): the adapters
below import the kernels on their first call.

- CUDA tensors (NVIDIA, and AMD under ROCm, which PyTorch also calls ``cuda``): the Triton
  implementations are registered as the ``CUDA`` kernels of the same ``spconv::`` operators whose CPU
  kernels are the compiled C++ ones (:func:`register_cuda_kernels`, called when ``spconv.pytorch``
  is imported). ``spconv.pytorch.ops`` calls ``torch.ops.spconv.*`` for every device.
- CPU tensors run the compiled C++ kernels. The one way to run the Triton kernels on CPU tensors
  (Triton's interpreter, how the GPU kernels are checked on a machine without a GPU) is
  :func:`triton_on_cpu`: inside ``with triton_on_cpu():`` the Triton implementations are the CPU
  kernels of those operators too. It needs ``TRITON_INTERPRET=1`` in the environment before triton is
  first imported. ``SPCONV_BACKEND=triton`` in the environment enters it for the whole process when
  ``spconv.pytorch`` is imported (with the same requirement).
"""
import contextlib
import os
import warnings

import torch

BACKEND_ENV = "SPCONV_BACKEND"
_BACKENDS = ("", "cpu", "native", "triton")


# ------------------------------------------------------------------------------------------------
# adapters: the operator schemas (src/*.cpp) onto the functions of spconv.triton

def _triton():
    import spconv.triton as T  # the package is lazy: triton is imported by the attribute access below
    return T


def _build_subm_map(indices, batch_size, spatial_shape, ksize, dilation):
    return _triton().build_subm_map(indices, spatial_shape, ksize, dilation)


def _build_conv_map(indices, batch_size, in_shape, out_shape, ksize, stride, padding, dilation, transposed):
    return _triton().build_conv_map(indices, in_shape, out_shape, ksize, stride, padding, dilation, transposed)


def _invert_map(nbr, num_inputs):
    return _triton().invert_map(nbr, num_inputs)


def _gather_conv(features, table, weight, groups, transpose_weight):
    return _triton().gather_conv(features, table, weight, groups, transpose_weight)


def _gather_conv_weight_grad(features, table, out_grad, groups):
    return _triton().gather_conv_weight_grad(features, table, out_grad, groups)


def _maxpool_forward(features, table, zero_floor=False):
    return _triton().maxpool_forward(features, table, zero_floor)


def _maxpool_backward(out_grad, argmax, table_in):
    return _triton().maxpool_backward(out_grad, argmax, table_in)


def _active_counts(table):
    return _triton().active_counts(table)


def _avgpool_forward(features, table):
    return _triton().avgpool_forward(features, table)


def _avgpool_backward(out_grad, counts, table_in):
    return _triton().avgpool_backward(out_grad, counts, table_in)


#: ``spconv::`` operator -> its Triton implementation (the schema's arguments, in order).
TRITON_KERNELS = {
    "build_subm_map": _build_subm_map,
    "build_conv_map": _build_conv_map,
    "invert_map": _invert_map,
    "gather_conv": _gather_conv,
    "gather_conv_weight_grad": _gather_conv_weight_grad,
    "maxpool_forward": _maxpool_forward,
    "maxpool_backward": _maxpool_backward,
    "active_counts": _active_counts,
    "avgpool_forward": _avgpool_forward,
    "avgpool_backward": _avgpool_backward,
}

_cuda_library = None


def register_cuda_kernels():
    """Register every Triton implementation as the ``CUDA`` kernel of its ``spconv::`` operator (once per
    process; the operators must be defined, i.e. ``spconv._C`` loaded). Works on CPU-only PyTorch builds too:
    the registration does not need a GPU, only a call on CUDA tensors does."""
    global _cuda_library
    if _cuda_library is not None:
        return
    lib = torch.library.Library("spconv", "IMPL")
    for name, fn in TRITON_KERNELS.items():
        lib.impl(name, fn, "CUDA")
    _cuda_library = lib


# ------------------------------------------------------------------------------------------------
# Triton kernels on CPU tensors, in Triton's interpreter

_cpu_depth = 0


def _interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@contextlib.contextmanager
def triton_on_cpu():
    """Run ``torch.ops.spconv.*`` on CPU tensors with the Triton kernels, in Triton's interpreter, inside the
    ``with`` block: their Triton implementations replace the C++ CPU kernels until the block ends (nested
    blocks are fine). Raises ``RuntimeError`` unless ``TRITON_INTERPRET=1`` is in the environment."""
    global _cpu_depth
    if not _interpreter_requested():
        raise RuntimeError(f"{BACKEND_ENV}=triton / spconv.triton.dispatch.triton_on_cpu() run the Triton kernels on "
                           "CPU tensors in Triton's interpreter, which needs TRITON_INTERPRET=1 in the environment "
                           "before triton is imported, e.g. `TRITON_INTERPRET=1 SPCONV_BACKEND=triton python ...`; "
                           f"or unset {BACKEND_ENV} to use the compiled CPU kernels")
    lib = torch.library.Library("spconv", "IMPL")
    try:
        with warnings.catch_warnings():  # replacing the C++ CPU kernels is the point here
            warnings.filterwarnings("ignore", message="(?s).*Overriding a previously registered kernel")
            for name, fn in TRITON_KERNELS.items():
                lib.impl(name, fn, "CPU")
        _cpu_depth += 1
        try:
            yield
        finally:
            _cpu_depth -= 1
    finally:
        lib._destroy()  # the previous CPU kernels (the C++ ones) are back


_process_wide = None


def enable_from_environment():
    """``SPCONV_BACKEND=triton``: enter :func:`triton_on_cpu` for the rest of the process. Raises ``ValueError``
    for an unknown ``SPCONV_BACKEND`` and ``RuntimeError`` without ``TRITON_INTERPRET=1``."""
    global _process_wide
    backend = os.environ.get(BACKEND_ENV, "").strip().lower()
    if backend not in _BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={backend!r} is not a backend: use 'triton' (Triton kernels, on the CPU in "
                         "Triton's interpreter) or leave it unset (compiled CPU kernels)")
    if backend == "triton" and _process_wide is None:
        ctx = triton_on_cpu()
        ctx.__enter__()
        _process_wide = ctx


def use_triton(tensor: torch.Tensor) -> bool:
    """True when ``torch.ops.spconv.*`` on ``tensor``'s device run the Triton kernels: CUDA/ROCm tensors, and CPU
    tensors inside :func:`triton_on_cpu` (or with ``SPCONV_BACKEND=triton``)."""
    device = tensor.device.type
    return device == "cuda" or (device == "cpu" and _cpu_depth > 0)
