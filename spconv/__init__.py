"""spconv: sparse convolution for PyTorch, compatible with the spconv 2.x API.

``import spconv.pytorch as spconv`` gives SparseConvTensor, the sparse conv/pool modules and
their helpers; CPU kernels live in the compiled extension ``spconv._C`` (``torch.ops.spconv``).
"""
from spconv import constants
from spconv.__version__ import __version__
from spconv.core import AlgoHint, ConvAlgo
from spconv.memory import caching_allocator_stats, empty_cache

SPCONV_VERSION_NUMBERS = [int(v) for v in __version__.split(".")]

__all__ = ["__version__", "ConvAlgo", "AlgoHint", "constants", "SPCONV_VERSION_NUMBERS", "empty_cache",
           "caching_allocator_stats"]
