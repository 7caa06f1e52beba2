"""Containers and feature-wise modules for sparse tensors (spconv 2.x names)."""
import time
from collections import OrderedDict

import torch
from torch import nn

from spconv.pytorch.core import SparseConvTensor


class SparseModule(nn.Module):
    """Base class of modules that take and return a SparseConvTensor (not just its features).

    ``forward`` receives the whole tensor (features ``[N, C]``, indices ``[N, 1 + D]``, spatial_shape,
    indice_dict); SparseSequential passes it to these modules unchanged and only the features to others.
    """

    def __init__(self, name=None):
        super().__init__()
        self.name = name
        self._sparse_unique_name = ""


def is_spconv_module(module) -> bool:
    return isinstance(module, (SparseModule, SparseBatchNorm, SparseReLU, SparseSyncBatchNorm))


class SparseSequential(SparseModule):
    """Sequential container: sparse modules get the SparseConvTensor, any other nn.Module gets its
    features ``[N, C]`` (skipped when there are no sites) and the result replaces them.

    Example::

        net = SparseSequential(SubMConv3d(4, 16, 3, indice_key="subm1"), nn.BatchNorm1d(16), nn.ReLU())
    """

    def __init__(self, *args, **kwargs):
        super().__init__()
        if len(args) == 1 and isinstance(args[0], OrderedDict):
            for key, module in args[0].items():
                self.add_module(key, module)
        else:
            for idx, module in enumerate(args):
                self.add_module(str(idx), module)
        for name, module in kwargs.items():
            if name in self._modules:
                raise ValueError(f"name {name!r} already exists in this SparseSequential")
            self.add_module(name, module)

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return SparseSequential(OrderedDict(list(self._modules.items())[idx]))
        n = len(self._modules)
        if not -n <= idx < n:
            raise IndexError(f"index {idx} is out of range for a SparseSequential of {n} modules")
        return list(self._modules.values())[idx % n]

    def __len__(self):
        return len(self._modules)

    def add(self, module, name=None):
        if name is None:
            name = str(len(self._modules))
        if name in self._modules:
            raise KeyError(f"name {name!r} already exists in this SparseSequential")
        self.add_module(name, module)

    def forward(self, input):
        for module in self._modules.values():
            if is_spconv_module(module) or not isinstance(input, SparseConvTensor):
                input = module(input)
            elif input.indices.shape[0] > 0:
                input = input.replace_feature(module(input.features))
        return input


class _FeatureWise:
    """Mixin: apply the torch module to a SparseConvTensor's features, or to a plain tensor."""

    def forward(self, input):
        if isinstance(input, SparseConvTensor):
            if input.indices.shape[0] == 0:
                return input
            return input.replace_feature(super().forward(input.features))
        return super().forward(input)


class SparseBatchNorm(_FeatureWise, nn.BatchNorm1d):
    """BatchNorm1d over the features ``[N, C]`` of a sparse tensor."""


class SparseSyncBatchNorm(_FeatureWise, nn.SyncBatchNorm):
    """SyncBatchNorm over the features ``[N, C]`` of a sparse tensor."""


class SparseReLU(_FeatureWise, nn.ReLU):
    """ReLU over the features ``[N, C]`` of a sparse tensor (or over a plain tensor); same shape out."""


class SparseIdentity(_FeatureWise, nn.Identity):
    """Identity (a marker for fx-based fusion): returns its input unchanged, a SparseConvTensor
    (features ``[N, C]``) or a plain tensor."""


class PrintTensorMeta(SparseModule):
    """Logs the shapes of a sparse tensor passing through (features ``[N, C]``, indices ``[N, 1 + D]``,
    spatial_shape) at INFO level on the ``spconv`` logger, and returns it unchanged (debug helper)."""

    def forward(self, x: SparseConvTensor):
        import logging
        logging.getLogger("spconv").info("%r", x)
        return x


class PrintCurrentTime(SparseModule):
    """Logs the current time on the ``spconv`` logger and returns its input unchanged (a SparseConvTensor
    with features ``[N, C]``, or anything else)."""

    def forward(self, x):
        import logging
        logging.getLogger("spconv").info("time %.6f", time.time())
        return x


def assign_name_for_sparse_modules(module: nn.Module):
    """Sets ``_sparse_unique_name`` of every SparseModule to its qualified name."""
    for name, m in module.named_modules():
        if isinstance(m, SparseModule):
            m._sparse_unique_name = name
