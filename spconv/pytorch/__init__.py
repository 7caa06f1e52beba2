"""The spconv 2.x PyTorch API: ``import spconv.pytorch as spconv``."""
import torch

from spconv.core import ConvAlgo
from spconv.pytorch import functional, ops
from spconv.pytorch.conv import (SparseConv1d, SparseConv2d, SparseConv3d, SparseConv4d, SparseConvolution,
                                 SparseConvTranspose1d, SparseConvTranspose2d, SparseConvTranspose3d,
                                 SparseConvTranspose4d, SparseInverseConv1d, SparseInverseConv2d,
                                 SparseInverseConv3d, SparseInverseConv4d, SubMConv1d, SubMConv2d, SubMConv3d,
                                 SubMConv4d)
from spconv.pytorch.core import SparseConvTensor
from spconv.pytorch.identity import Identity
from spconv.pytorch.modules import (SparseBatchNorm, SparseIdentity, SparseModule, SparseReLU, SparseSequential,
                                    assign_name_for_sparse_modules)
from spconv.pytorch.pool import (SparseAvgPool1d, SparseAvgPool2d, SparseAvgPool3d, SparseAvgPool4d,
                                 SparseGlobalAvgPool, SparseGlobalMaxPool, SparseMaxPool1d, SparseMaxPool2d,
                                 SparseMaxPool3d, SparseMaxPool4d)
from spconv.pytorch.tables import AddTable, ConcatTable, JoinTable


class ToDense(SparseModule):
    """SparseConvTensor -> dense ``[B, C, *spatial]``."""

    def forward(self, x: SparseConvTensor) -> torch.Tensor:
        return x.dense()


class RemoveGrid(SparseModule):
    """Drops the legacy ``grid`` attribute (kept for spconv 1.x code).

    Input and output: the same SparseConvTensor (features ``[N, C]``, indices ``[N, 1 + D]`` unchanged).
    """

    def forward(self, x: SparseConvTensor) -> SparseConvTensor:
        x.grid = None
        return x
