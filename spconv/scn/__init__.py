"""SparseConvNet-compatible API on spconv's kernels: ``import spconv.scn as scn``.

Code written against ``import sparseconvnet as scn`` (facebookresearch/SparseConvNet) runs with
only the import changed. Tensors are :class:`SparseConvNetTensor` (features ``[N, C]``, shared
:class:`Metadata`, ``spatial_size`` LongTensor; coordinates with the batch index in the **last**
column); every module has ``input_spatial_size(out_size)``. Rulebooks are spconv kernel maps,
built once per spatial size (and filter) in the metadata and reused forward and backward.
Dimensions 1-4 use the compiled map builders, higher dimensions a PyTorch one.
"""
# SparseConvNet's global counters, advanced by every convolution's forward pass
forward_pass_multiplyAdd_count = 0
forward_pass_hidden_states = 0

from spconv.scn.activations import (ELU, SELU, BatchNormalization, BatchNormELU, BatchNormLeakyReLU, BatchNormReLU,
                                    BatchwiseDropout, Dropout, Identity, LeakyReLU, ReLU, Sigmoid, Tanh)
from spconv.scn.containers import AddTable, ConcatTable, JoinTable, Sequential
from spconv.scn.conv import (Convolution, Deconvolution, FullConvolution, NetworkInNetwork, SubmanifoldConvolution,
                             TransposeConvolution, ValidConvolution)
from spconv.scn.io import (BLInputLayer, BLOutputLayer, DenseToSparse, InputBatch, InputLayer, OutputLayer,
                           SparseToDense)
from spconv.scn.networks import FullyConvolutionalNet, SparseResNet, SparseVggNet, UNet
from spconv.scn.pool import AveragePooling, MaxPooling, UnPooling
from spconv.scn.tensor import (Metadata, SparseConvNetTensor, add_feature_planes, batch_location_tensors,
                               concatenate_feature_planes, prepare_BLInput, toLongTensor)


class SCN:
    """Stand-in for SparseConvNet's compiled module namespace (``scn.SCN.is_cuda_build()``)."""

    @staticmethod
    def is_cuda_build() -> bool:
        return False


__all__ = [
    "SparseConvNetTensor", "Metadata", "InputLayer", "OutputLayer", "BLInputLayer", "BLOutputLayer", "InputBatch",
    "SparseToDense", "DenseToSparse", "SubmanifoldConvolution", "ValidConvolution", "Convolution", "Deconvolution",
    "FullConvolution", "TransposeConvolution", "NetworkInNetwork", "MaxPooling", "AveragePooling", "UnPooling",
    "BatchNormalization", "BatchNormReLU", "BatchNormLeakyReLU", "BatchNormELU", "ReLU", "LeakyReLU", "ELU", "SELU",
    "Sigmoid", "Tanh", "Dropout", "BatchwiseDropout", "Identity", "Sequential", "ConcatTable", "AddTable", "JoinTable",
    "SparseVggNet", "SparseResNet", "UNet", "FullyConvolutionalNet", "prepare_BLInput", "batch_location_tensors",
    "concatenate_feature_planes", "add_feature_planes", "toLongTensor", "SCN",
]
