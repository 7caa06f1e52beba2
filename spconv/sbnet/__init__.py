"""Block-sparse ops for dense 2-D CNNs (SBNet, "Sparse Blocks Network for Fast Inference", for PyTorch).

A mask marks the interesting regions; :func:`reduce_mask` turns it into active block indices,
:func:`sparse_gather` stacks those blocks (with their halo) into a batch for ordinary dense convs, and
:func:`sparse_scatter` / :func:`sparse_scatter_` write or add the results back. All ops are
vectorised PyTorch, deterministic and differentiable; :class:`SparseBlockResNet` is SBNet's sparse
ResNet bottleneck block.
"""
from spconv.sbnet.blocks import BlockParams, SparseBlockResNet, calc_block_params
from spconv.sbnet.functional import (ReduceMaskResult, SparseGatherFunction, SparseScatterFunction, reduce_mask,
                                     sparse_gather, sparse_scatter, sparse_scatter_)

__all__ = ["reduce_mask", "sparse_gather", "sparse_scatter", "sparse_scatter_", "calc_block_params",
           "BlockParams", "ReduceMaskResult", "SparseBlockResNet", "SparseGatherFunction",
           "SparseScatterFunction"]
