"""Modules that combine several sparse tensors."""
from typing import List

import torch

from spconv.pytorch import functional as Fsp
from spconv.pytorch.core import SparseConvTensor
from spconv.pytorch.modules import SparseModule


def _check_aligned(inputs: List[SparseConvTensor], what: str, same_channels: bool):
    if len(inputs) < 1:
        raise ValueError(f"{what} needs at least one SparseConvTensor")
    ref = inputs[0]
    for t in inputs[1:]:
        if t.spatial_shape != ref.spatial_shape or t.batch_size != ref.batch_size:
            raise ValueError(f"{what}: inputs differ in spatial_shape/batch_size ({t.spatial_shape}/{t.batch_size} vs "
                             f"{ref.spatial_shape}/{ref.batch_size})")
        if t.indices.shape[0] != ref.indices.shape[0] or (t.indices is not ref.indices
                                                          and not torch.equal(t.indices, ref.indices)):
            raise ValueError(f"{what}: inputs must share the same sites in the same order; use AddTableMisaligned "
                             "(or functional.sparse_add) for tensors on different sites")
        if same_channels and t.features.shape[1] != ref.features.shape[1]:
            raise ValueError(f"{what}: channel counts differ ({t.features.shape[1]} vs {ref.features.shape[1]})")


class JoinTable(SparseModule):
    """Concatenates the features of aligned sparse tensors along channels.

    Input: a list of SparseConvTensors on the same sites, features ``[N, C_i]``; output: features
    ``[N, sum(C_i)]`` on those sites.
    """

    def forward(self, input: List[SparseConvTensor]) -> SparseConvTensor:
        _check_aligned(input, "JoinTable", False)
        return input[0].replace_feature(torch.cat([t.features for t in input], 1))


class AddTable(SparseModule):
    """Sums the features of aligned sparse tensors (same sites, same order).

    Input: a list of SparseConvTensors with features ``[N, C]`` each; output: features ``[N, C]``.
    """

    def forward(self, input: List[SparseConvTensor]) -> SparseConvTensor:
        _check_aligned(input, "AddTable", True)
        return input[0].replace_feature(sum(t.features for t in input))


class AddTableMisaligned(SparseModule):
    """Sums sparse tensors on different sites (union of the sites).

    Input: SparseConvTensors with features ``[N_i, C]``; output: features ``[N_union, C]``, coinciding sites summed.
    """

    def forward(self, input: List[SparseConvTensor]) -> SparseConvTensor:
        return Fsp.sparse_add_hash_based(*input)


class ConcatTable(SparseModule):
    """Applies each sub-module to the same input and returns the list of results.

    Input: one SparseConvTensor (features ``[N, C]``); output: a list with one result per sub-module.
    """

    def __init__(self, *args):
        super().__init__()
        for idx, module in enumerate(args):
            self.add_module(str(idx), module)

    def add(self, module):
        self.add_module(str(len(self._modules)), module)
        return self

    def __getitem__(self, idx):
        return list(self._modules.values())[idx]

    def __len__(self):
        return len(self._modules)

    def forward(self, input):
        return [module(input) for module in self._modules.values()]
