"""Triton backend of spconv: kernel maps, implicit-GEMM sparse convolution and pooling kernels.

The functions mirror the CPU ops of :mod:`spconv.pytorch.ops` one for one (same signatures, same
results): ``build_subm_map``, ``build_conv_map``, ``invert_map``, ``gather_conv``,
``gather_conv_weight_grad``, and the pooling ops ``maxpool_forward``, ``maxpool_backward``,
``active_counts``, ``avgpool_forward``, ``avgpool_backward``. They run on CUDA/ROCm tensors, and on CPU tensors in Triton's
interpreter when ``TRITON_INTERPRET=1`` was set before triton was imported. They are the CUDA kernels
of the ``torch.ops.spconv.*`` operators (:mod:`spconv.triton.dispatch` registers them), so models reach
them through PyTorch's dispatcher.

Importing this package does not import triton: the kernels load on first use of one of the
functions, so :mod:`spconv.triton.dispatch` is cheap and works without triton installed.
"""
import importlib

_FUNCTIONS = {
    "build_subm_map": "map_kernels",
    "build_conv_map": "map_kernels",
    "invert_map": "map_kernels",
    "gather_conv": "conv",
    "gather_conv_weight_grad": "conv",
    "maxpool_forward": "pool",
    "maxpool_backward": "pool",
    "active_counts": "pool",
    "avgpool_forward": "pool",
    "avgpool_backward": "pool",
}

__all__ = list(_FUNCTIONS)


def __getattr__(name):
    module = _FUNCTIONS.get(name)
    if module is None:
        raise AttributeError(f"module 'spconv.triton' has no attribute {name!r}")
    try:
        mod = importlib.import_module(f"spconv.triton.{module}")
    except ImportError as e:
        if e.name != "triton":
            raise
        raise ImportError("spconv's GPU backend needs Triton: pip install triton (or pip install 'spconv[gpu]')") from e
    value = getattr(mod, name)
    globals()[name] = value
    return value
