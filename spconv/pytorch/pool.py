"""Sparse pooling modules (spconv 2.x API), 1-4D.

- Max pooling returns ``max(0, max over the active input sites in the window)`` as spconv 2.3.8 does
  (its loop starts from zero), so it equals dense max pooling of the densified tensor; NaN propagates.
- Average pooling divides by the number of **active** sites in the window, not the kernel volume.
- Output sites and shape follow the regular conv rule ``(in + 2p - d(k-1) - 1) // s + 1``
  (``subm=True``: the input sites). With ``indice_key`` the map is stored so a
  ``SparseInverseConv`` can upsample back to the pool's input sites.
- Global pools return a dense ``[B, C]`` tensor (zeros for a batch entry without sites).
"""
from typing import Optional

import numpy as np
import torch

from spconv.core import ConvAlgo
from spconv.pytorch import functional as Fsp
from spconv.pytorch import indice_keys, ops
from spconv.pytorch.core import SparseConvTensor, expand_nd, per_dim_doc
from spconv.pytorch.modules import SparseModule


class _SparsePool(SparseModule):
    KIND = ""

    def __init__(self, ndim, kernel_size=3, stride=1, padding=0, dilation=1, indice_key=None, subm=False, algo=None,
                 record_voxel_count=False, name=None):
        super().__init__(name=name)
        self.ndim = ndim
        self.kernel_size = expand_nd(ndim, kernel_size, "kernel_size")
        self.stride = self.kernel_size if stride is None else expand_nd(ndim, stride, "stride")
        self.padding = expand_nd(ndim, padding, "padding")
        self.dilation = expand_nd(ndim, dilation, "dilation")
        for arg, vals, low in (("kernel_size", self.kernel_size, 1), ("stride", self.stride, 1),
                               ("dilation", self.dilation, 1), ("padding", self.padding, 0)):
            if any(v < low for v in vals):
                raise ValueError(f"{arg} entries must be >= {low}, got {vals}")
        if subm and any(k % 2 == 0 for k in self.kernel_size):
            raise ValueError(f"a SubM pool needs odd kernel sizes, got kernel_size={self.kernel_size}")
        self.subm = subm
        self.indice_key = indice_key
        self.algo = ConvAlgo.Native if algo is None else algo
        self.record_voxel_count = record_voxel_count
        if record_voxel_count:
            self.register_buffer("max_num_voxels_during_training", torch.zeros(1, dtype=torch.int32))

    def extra_repr(self):
        s = f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, dilation={self.dilation}"
        if self.indice_key is not None:
            s += f", indice_key={self.indice_key!r}"
        return s

    def _describe(self):
        return f"{type(self).__name__}(kernel_size={self.kernel_size}, stride={self.stride}, indice_key={self.indice_key!r})"

    def forward(self, input: SparseConvTensor) -> SparseConvTensor:
        if not isinstance(input, SparseConvTensor):
            raise TypeError(f"{self._describe()} expects a SparseConvTensor, got {type(input).__name__}")
        input.validated()
        ops._check_device(input.features)
        if len(input.spatial_shape) != self.ndim:
            raise ValueError(f"{self._describe()} is {self.ndim}-D but the input has spatial_shape "
                             f"{input.spatial_shape}")
        desc = self._describe()
        if self.subm:
            data = indice_keys.subm_map(input, self.indice_key, self.kernel_size, self.dilation, self.algo, desc)
        else:
            data = indice_keys.conv_map(input, self.indice_key, self.kernel_size, self.stride, self.padding,
                                        self.dilation, self.algo, desc)
        out_features = self._pool(input.features, data)
        if self.record_voxel_count:
            self.max_num_voxels_during_training.fill_(max(int(self.max_num_voxels_during_training.item()),
                                                          data.out_indices.shape[0]))
        return input._derive(out_features, data.out_indices, data.out_spatial_shape,
                             indice_keys.with_key(input.indice_dict, self.indice_key, data))

    def _pool(self, features: torch.Tensor, data) -> torch.Tensor:
        """Pool through ``data``'s map. Rows repeating a site count as one input holding their max (max pool)
        or as several inputs (average pool: the mean over rows)."""
        dups = data.dups
        if self.KIND == "max":
            if dups is not None:
                features = dups.max(features)
            out = Fsp.indice_maxpool(features, data, True)
        elif dups is None:
            out = Fsp.indice_avgpool(features, data)
        else:  # sum of rows / number of rows in each window
            out = Fsp.indice_avgpool(dups.sum(features), data) / Fsp.indice_avgpool(dups.count(features.dtype), data)
        if dups is not None and self.subm:  # output sites are the input rows
            out = dups.expand(out)
        return out


class SparseMaxPool(_SparsePool):
    """Max pooling over active sites, generic ``ndim`` (spconv's base-class defaults: k=3, stride=1).

    Input: features ``[N_in, C]`` at indices ``[N_in, 1 + ndim]``; output: features ``[N_out, C]`` at every
    site a window reaches (``subm=True``: the input sites), see the module docstring for the shape rule.
    """
    KIND = "max"


class SparseAvgPool(_SparsePool):
    """Average pooling over active sites (divides by the active count), generic ``ndim``.

    Input: features ``[N_in, C]`` at indices ``[N_in, 1 + ndim]``; output: features ``[N_out, C]`` at every
    site a window reaches (``subm=True``: the input sites), see the module docstring for the shape rule.
    """
    KIND = "avg"


class _PoolNd:
    NDIM = 0
    DOC = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.NDIM:
            cls.__doc__ = per_dim_doc(cls.DOC, cls.NDIM)

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, indice_key=None, algo=None,
                 record_voxel_count=False, name=None):
        super().__init__(self.NDIM, kernel_size, stride, padding, dilation, indice_key, False, algo,
                         record_voxel_count, name)


_POOL_SHAPES = """
    Input: features ``[N_in, C]`` at indices ``[N_in, {cols}]`` {names}. Output: features
    ``[N_out, C]`` at every site a window reaches, ``spatial_shape``
    ``(in + 2 * padding - dilation * (k - 1) - 1) // stride + 1`` (``stride`` defaults to ``kernel_size``).
    With ``indice_key`` a SparseInverseConv{n}d can restore the input sites.
    """


class _MaxPoolNd(_PoolNd, SparseMaxPool):
    DOC = """Max pooling over {n}D sparse sites.

    Each output is max(0, the maximum over the active input sites in its window), as in spconv 2.3.8.
    """ + _POOL_SHAPES


class _AvgPoolNd(_PoolNd, SparseAvgPool):
    DOC = """Average pooling over {n}D sparse sites.

    Each output is the mean over the active input sites in its window (divided by their count, not
    the kernel volume).
    """ + _POOL_SHAPES


# The public classes, spconv's names and signatures; docstrings from the family's DOC.
class SparseMaxPool1d(_MaxPoolNd): NDIM = 1
class SparseMaxPool2d(_MaxPoolNd): NDIM = 2
class SparseMaxPool3d(_MaxPoolNd): NDIM = 3
class SparseMaxPool4d(_MaxPoolNd): NDIM = 4
class SparseAvgPool1d(_AvgPoolNd): NDIM = 1
class SparseAvgPool2d(_AvgPoolNd): NDIM = 2
class SparseAvgPool3d(_AvgPoolNd): NDIM = 3
class SparseAvgPool4d(_AvgPoolNd): NDIM = 4


class SparseGlobalMaxOrAvgPool(SparseModule):
    """Pools all sites of each batch entry: SparseConvTensor -> dense ``[B, C]``."""

    def __init__(self, is_mean: bool, name=None):
        super().__init__(name=name)
        self.is_mean = is_mean

    def forward(self, input: SparseConvTensor) -> torch.Tensor:
        features = input.validated().features
        b = input.batch_size
        index = input.indices[:, 0].long().unsqueeze(1).expand_as(features)
        if self.is_mean:
            out = features.new_zeros((b, features.shape[1]))
            return out.scatter_reduce(0, index, features, "mean", include_self=False)
        out = features.new_full((b, features.shape[1]), float("-inf"))
        out = out.scatter_reduce(0, index, features, "amax", include_self=False)
        present = torch.zeros(b, dtype=torch.bool, device=features.device)
        present[input.indices[:, 0].long()] = True
        return torch.where(present.unsqueeze(1), out, torch.zeros_like(out))


class SparseGlobalMaxPool(SparseGlobalMaxOrAvgPool):
    """Maximum over the sites of each batch entry: features ``[N, C]`` -> dense ``[B, C]`` (0 for an empty entry)."""

    def __init__(self, name=None):
        super().__init__(False, name)


class SparseGlobalAvgPool(SparseGlobalMaxOrAvgPool):
    """Mean over the sites of each batch entry, ``[B, C]`` (spconv 2.3.8 returned ``[B]``: fixed)."""

    def __init__(self, name=None):
        super().__init__(True, name)


ALL_POOL_LAYERS = {SparseMaxPool, SparseAvgPool, SparseMaxPool1d, SparseMaxPool2d, SparseMaxPool3d, SparseMaxPool4d,
                   SparseAvgPool1d, SparseAvgPool2d, SparseAvgPool3d, SparseAvgPool4d, SparseGlobalMaxPool,
                   SparseGlobalAvgPool}
