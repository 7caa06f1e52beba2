"""Containers: Sequential (with ``.add`` chaining), ConcatTable, AddTable, JoinTable (Torch7 style).

Every container implements ``input_spatial_size(out_size)``: Sequential walks its children
backwards, ConcatTable asks its first branch.
"""
from typing import List

import torch
from torch import nn

from spconv.scn.tensor import SparseConvNetTensor, derive, to_long_tensor


def _input_size(module, out_size):
    if not hasattr(module, "input_spatial_size"):
        raise TypeError(f"{type(module).__name__} has no input_spatial_size(); only scn modules (or modules "
                        "defining it) can be used to compute input sizes")
    return module.input_spatial_size(out_size)


class Sequential(nn.Sequential):
    """``nn.Sequential`` plus ``add(module)`` (returns self) and ``input_spatial_size``."""

    def add(self, module: nn.Module) -> "Sequential":
        self.add_module(str(len(self._modules)), module)
        return self

    def input_spatial_size(self, out_size):
        if isinstance(out_size, (list, tuple)):
            out_size = torch.tensor([int(v) for v in out_size], dtype=torch.long)
        for module in reversed(list(self._modules.values())):
            out_size = _input_size(module, out_size)
        return out_size


class ConcatTable(nn.Sequential):
    """Applies every branch to the same input; returns the list of outputs."""

    def add(self, module: nn.Module) -> "ConcatTable":
        self.add_module(str(len(self._modules)), module)
        return self

    def forward(self, input) -> List:
        return [module(input) for module in self._modules.values()]

    def input_spatial_size(self, out_size):
        return _input_size(next(iter(self._modules.values())), out_size)


def _check_same_sites(inputs, who: str):
    if not inputs:
        raise ValueError(f"{who} needs a non-empty list of SparseConvNetTensors")
    first = inputs[0]
    for t in inputs[1:]:
        if not isinstance(t, SparseConvNetTensor):
            raise TypeError(f"{who} takes SparseConvNetTensors, got {type(t).__name__}")
        if t.metadata is not first.metadata or to_long_tensor(len(t.spatial_size), t.spatial_size).tolist() != \
                to_long_tensor(len(first.spatial_size), first.spatial_size).tolist():
            raise ValueError(f"{who}: all inputs must be on the same sites (same metadata and spatial size), got "
                             f"spatial sizes {[list(map(int, i.spatial_size)) for i in inputs]}")
        if t.features.shape[0] != first.features.shape[0]:
            raise ValueError(f"{who}: inputs have {[i.features.shape[0] for i in inputs]} rows; they must match")


class AddTable(nn.Sequential):
    """Sum of a list of tensors on the same sites."""

    def forward(self, input: List[SparseConvNetTensor]) -> SparseConvNetTensor:
        _check_same_sites(input, "AddTable")
        return derive(input[0], sum(i.features for i in input))

    def input_spatial_size(self, out_size):
        return out_size


class JoinTable(nn.Sequential):
    """Concatenation of the feature planes of a list of tensors on the same sites."""

    def forward(self, input: List[SparseConvNetTensor]) -> SparseConvNetTensor:
        _check_same_sites(input, "JoinTable")
        return derive(input[0], torch.cat([i.features for i in input], 1))

    def input_spatial_size(self, out_size):
        return out_size
