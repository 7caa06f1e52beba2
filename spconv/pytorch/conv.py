"""Sparse convolution modules (spconv 2.x API): SubM, regular, transposed and inverse, 1-4D.

Weights are ``[out_channels, *kernel_size, in_channels // groups]`` (spconv's KRSC layout). For a
dense reference: ``torch.nn.functional.convNd`` takes ``weight.permute(0, D+1, 1..D)`` and
``conv_transposeNd`` takes ``weight.permute(D+1, 0, 1..D)`` (groups == 1).
"""
import math
from typing import Optional

import numpy as np
import torch
from torch import nn
from torch.nn import init

from spconv import constants
from spconv.core import ConvAlgo
from spconv.pytorch import functional as Fsp
from spconv.pytorch import indice_keys, ops
from spconv.pytorch.core import SparseConvTensor, expand_nd, per_dim_doc
from spconv.pytorch.modules import SparseModule

_MAX_NUM_VOXELS_DURING_TRAINING = "max_num_voxels_during_training"
_ACTIVATIONS = ("None_", "ReLU", "Sigmoid", "LeakyReLU")


def _act_name(act_type) -> str:
    if act_type is None:
        return "None_"
    name = act_type if isinstance(act_type, str) else getattr(act_type, "name", str(act_type).split(".")[-1])
    if name not in _ACTIVATIONS:
        raise ValueError(f"act_type must be one of {_ACTIVATIONS}, got {act_type!r}")
    return name


class SparseConvolution(SparseModule):
    """Generic sparse convolution over ``ndim`` spatial dimensions.

    Input: SparseConvTensor with features ``[N_in, in_channels]``; output: features ``[N_out, out_channels]``.

    - ``subm=True`` (submanifold): output sites = input sites; stride and padding are ignored,
      the padding is ``(k // 2) * dilation``; kernel sizes must be odd.
    - regular: output sites are all sites reached by an input,
      ``out_shape = (in + 2p - d(k-1) - 1) // s + 1``.
    - ``transposed=True``: ``out_shape = (in - 1) s - 2p + d(k-1) + output_padding + 1``.
    - ``inverse=True``: undoes the regular conv/pool that created ``indice_key``: output sites and
      shape are exactly that layer's input sites and shape.

    Layers with the same ``indice_key`` share one kernel map (SubM layers at one resolution with
    equal kernel size and dilation), built by the first of them.
    """

    __constants__ = ["stride", "padding", "dilation", "groups", "bias", "subm", "inverse", "transposed",
                     "output_padding"]

    def __init__(self, ndim: int, in_channels: int, out_channels: int, kernel_size=3, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, subm: bool = False, output_padding=0,
                 transposed: bool = False, inverse: bool = False, indice_key: Optional[str] = None,
                 algo: Optional[ConvAlgo] = None, fp32_accum: Optional[bool] = None, record_voxel_count: bool = False,
                 act_type=None, act_alpha: float = 0, act_beta: float = 0, large_kernel_fast_algo: bool = False,
                 name=None, device=None, dtype=None):
        super().__init__(name=name)
        if not 1 <= int(ndim) <= 4:
            raise ValueError(f"ndim must be 1, 2, 3 or 4, got {ndim}")
        for arg, val in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
            if int(val) <= 0:
                raise ValueError(f"{arg} must be a positive int, got {val}")
        if in_channels % groups != 0 or out_channels % groups != 0:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) must both be "
                             f"divisible by groups ({groups})")
        self.ndim = int(ndim)
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.kernel_size = expand_nd(ndim, kernel_size, "kernel_size")
        self.stride = expand_nd(ndim, stride, "stride")
        self.padding = expand_nd(ndim, padding, "padding")
        self.dilation = expand_nd(ndim, dilation, "dilation")
        self.output_padding = expand_nd(ndim, output_padding, "output_padding")
        for arg, vals, low in (("kernel_size", self.kernel_size, 1), ("stride", self.stride, 1),
                               ("dilation", self.dilation, 1), ("padding", self.padding, 0),
                               ("output_padding", self.output_padding, 0)):
            if any(v < low for v in vals):
                raise ValueError(f"{arg} entries must be >= {low}, got {vals}")
        if subm and any(k % 2 == 0 for k in self.kernel_size):
            raise ValueError(f"SubM convolution needs odd kernel sizes (the output site is the kernel centre), "
                             f"got kernel_size={self.kernel_size}; use an odd size or a regular SparseConv")
        if inverse and indice_key is None:
            raise ValueError("an inverse conv needs the indice_key of the strided conv/pool it undoes")
        self.groups = int(groups)
        self.subm = bool(subm)
        self.transposed = bool(transposed)
        self.inverse = bool(inverse)
        self.indice_key = indice_key
        kv = int(np.prod(self.kernel_size))
        self.conv1x1 = kv == 1 and (self.subm or int(np.prod(self.stride)) == 1)
        self.algo = ConvAlgo.Native if algo is None else algo
        self.fp32_accum = fp32_accum
        self.large_kernel_fast_algo = large_kernel_fast_algo
        self.record_voxel_count = record_voxel_count
        self.act_type = _act_name(act_type)
        self.act_alpha = act_alpha
        self.act_beta = act_beta
        self.scale = 1.0
        self.zero_point = 0
        self.weight_shape = [self.out_channels, *self.kernel_size, self.in_channels // self.groups]
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.zeros(*self.weight_shape, **factory))
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        if self._records_voxels():
            self.register_buffer(_MAX_NUM_VOXELS_DURING_TRAINING, torch.zeros(1, dtype=torch.int32, device=device))
        self.reset_parameters()
        self._register_load_state_dict_pre_hook(self._load_weight_different_layout)

    # ----------------------------------------------------------------------------------------------
    def _records_voxels(self) -> bool:
        return self.record_voxel_count and not self.subm and not self.inverse

    def is_inverseable(self) -> bool:
        return self.indice_key is not None and not self.subm

    def get_max_num_voxels(self) -> Optional[torch.Tensor]:
        return getattr(self, _MAX_NUM_VOXELS_DURING_TRAINING) if self._records_voxels() else None

    def reset_parameters(self):
        """spconv's init: kaiming-uniform (a = sqrt(5)) with fan_in = in_channels / groups * prod(kernel_size)."""
        fan_in = self.in_channels // self.groups * int(np.prod(self.kernel_size))
        a = math.sqrt(0.005) if constants.SPCONV_DEBUG_WEIGHT else math.sqrt(5)
        gain = math.sqrt(2.0 / (1 + a ** 2))
        bound = math.sqrt(3.0) * gain / math.sqrt(fan_in)
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
        if self.bias is not None:
            bound = 1 / math.sqrt(fan_in)
            init.uniform_(self.bias, -bound, bound)

    def _load_weight_different_layout(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs):
        if self._records_voxels() and prefix + _MAX_NUM_VOXELS_DURING_TRAINING not in state_dict:
            state_dict[prefix + _MAX_NUM_VOXELS_DURING_TRAINING] = torch.zeros(1, dtype=torch.int32)
        layout = constants.SPCONV_SAVED_WEIGHT_LAYOUT
        key = prefix + "weight"
        if layout in ("", "KRSC") or key not in state_dict:
            return
        w = state_dict[key]
        n = self.ndim
        if layout == "RSKC":  # [*k, out, in] -> [out, *k, in]
            state_dict[key] = w.permute(n, *range(n), n + 1).contiguous()
        elif layout == "RSCK":  # [*k, in, out] -> [out, *k, in]
            state_dict[key] = w.permute(n + 1, *range(n), n).contiguous()
        else:
            raise ValueError(f"SPCONV_SAVED_WEIGHT_LAYOUT must be '', KRSC, RSKC or RSCK, got {layout!r}")

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if any(self.padding):
            s += f", padding={self.padding}"
        if any(d != 1 for d in self.dilation):
            s += f", dilation={self.dilation}"
        if any(self.output_padding):
            s += f", output_padding={self.output_padding}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.indice_key is not None:
            s += f", indice_key={self.indice_key!r}"
        s += f", algo={self.algo}"
        if self.act_type != "None_":
            s += f", act={self.act_type}"
        return s

    def _describe(self) -> str:
        kind = ("SubMConv" if self.subm else "SparseInverseConv" if self.inverse
                else "SparseConvTranspose" if self.transposed else "SparseConv")
        return (f"{kind}{self.ndim}d({self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"dilation={self.dilation}, indice_key={self.indice_key!r})")

    # ----------------------------------------------------------------------------------------------
    def _check_input(self, input: SparseConvTensor):
        if not isinstance(input, SparseConvTensor):
            raise TypeError(f"{self._describe()} expects a SparseConvTensor, got {type(input).__name__}")
        input.validated()
        features = input.features
        ops._check_device(features)
        if len(input.spatial_shape) != self.ndim:
            raise ValueError(f"{self._describe()} is {self.ndim}-D but the input has spatial_shape "
                             f"{input.spatial_shape}")
        if features.shape[1] != self.in_channels:
            raise ValueError(f"{self._describe()} expects {self.in_channels} input channels, got features with "
                             f"{features.shape[1]} (channel size mismatch)")
        autocast = torch.is_autocast_enabled(features.device.type)
        if not autocast and features.dtype != self.weight.dtype:
            raise ValueError(f"{self._describe()}: features are {features.dtype} but the weight is "
                             f"{self.weight.dtype}; convert the model (model.to({features.dtype})) or the "
                             f"features (x.replace_feature(x.features.to({self.weight.dtype})))")

    def _conv1x1(self, input: SparseConvTensor) -> torch.Tensor:
        w = self.weight
        if constants.SPCONV_LEGACY_1X1_WEIGHT_VIEW:
            w2 = w.reshape(self.in_channels, self.out_channels)
        else:
            w2 = w.reshape(self.out_channels, self.in_channels).t()
        features = input.features
        dtype = Fsp._autocast_dtype(features.device.type)
        if dtype is not None:
            features, w2 = features.to(dtype), w2.to(dtype)
        return features @ w2

    def _is_pointwise(self) -> bool:
        """Kernel volume 1 with output sites = input sites: a per-row matmul, no kernel map (as spconv)."""
        if not self.conv1x1 or self.groups != 1:
            return False
        if self.subm:
            return True
        return not any(self.padding) and not (self.transposed and any(self.output_padding))

    def forward(self, input: SparseConvTensor, add_input: Optional[SparseConvTensor] = None) -> SparseConvTensor:
        self._check_input(input)
        indice_dict = input.indice_dict
        desc = self._describe()
        inverse_data = None
        if self.inverse:
            inverse_data = indice_keys.inverse_map(input, self.indice_key, self.kernel_size, desc,
                                                   pointwise_ok=self._is_pointwise())
        if self._is_pointwise() and inverse_data is None:
            out_features = self._conv1x1(input)
            out_indices, out_shape = input.indices, input.spatial_shape
            if not self.subm and not self.inverse:
                indice_dict = indice_keys.identity_map(input, self.indice_key, self.ndim, self.algo)
        elif self.inverse:
            data = inverse_data
            out_features = Fsp.sparse_conv(input.features.contiguous(), self.weight, data.reversed(), self.groups)
            if data.dups is not None:  # the key's input sites repeat: every row of a site gets its value
                out_features = data.dups.expand(out_features)
            out_indices, out_shape = data.indices, data.spatial_shape
        else:
            if self.subm:
                data = indice_keys.subm_map(input, self.indice_key, self.kernel_size, self.dilation, self.algo, desc)
            else:
                data = indice_keys.conv_map(input, self.indice_key, self.kernel_size, self.stride, self.padding,
                                            self.dilation, self.algo, desc, self.transposed, self.output_padding)
            features = input.features.contiguous()
            if data.dups is not None and self.subm:
                out_features = Fsp.subm_conv_with_duplicates(features, self.weight, data.indice_pairs, data.dups,
                                                             self.groups)
            else:
                if data.dups is not None:  # strided/transposed: the rows of a site add up (spconv 2.3.8)
                    features = data.dups.sum(features)
                out_features = Fsp.sparse_conv(features, self.weight, data, self.groups)
            out_indices, out_shape = data.out_indices, data.out_spatial_shape
            indice_dict = indice_keys.with_key(indice_dict, self.indice_key, data)
        if self._records_voxels():
            buf = getattr(self, _MAX_NUM_VOXELS_DURING_TRAINING)
            buf.fill_(max(int(buf.item()), out_indices.shape[0]))
        if self.bias is not None:
            out_features = out_features + self.bias.to(out_features.dtype)
        if add_input is not None:
            out_features = out_features + add_input.features.to(out_features.dtype)
        out_features = self._apply_act(out_features)
        out = input._derive(out_features, out_indices, out_shape, indice_dict)
        return out

    def _apply_act(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_type == "None_":
            return x
        if self.act_type == "ReLU":
            return torch.relu(x)
        if self.act_type == "Sigmoid":
            return torch.sigmoid(x)
        return torch.nn.functional.leaky_relu(x, self.act_alpha)


# --------------------------------------------------------------------------------------------------
# Public per-dimension classes, with spconv's exact constructor signatures.

def is_sparse_conv(module) -> bool:
    """True for every sparse conv module (spconv 2.x helper)."""
    return isinstance(module, SparseConvolution)


class _PerDimension:
    """Mixin: the public per-dimension classes set ``NDIM`` and get ``DOC`` filled in for it (see
    :func:`~spconv.pytorch.core.per_dim_doc`)."""
    NDIM = 0
    DOC = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.NDIM:
            cls.__doc__ = per_dim_doc(cls.DOC, cls.NDIM)


class _SparseConvNd(_PerDimension, SparseConvolution):
    TRANSPOSED = False
    DOC = """Regular (strided) sparse {n}D convolution: every output site reached by an active input.

    Input: features ``[N_in, in_channels]`` at indices ``[N_in, {cols}]`` {names}.
    Output: features ``[N_out, out_channels]`` at indices ``[N_out, {cols}]`` sorted by (batch, coords),
    ``spatial_shape`` ``(in + 2 * padding - dilation * (k - 1) - 1) // stride + 1`` per dimension.
    Weight: ``[out_channels, {ks}, in_channels // groups]`` (KRSC); bias ``[out_channels]``.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, indice_key=None, algo=None, fp32_accum=None, record_voxel_count=False,
                 large_kernel_fast_algo=False, name=None):
        super().__init__(self.NDIM, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         transposed=self.TRANSPOSED, indice_key=indice_key, algo=algo, fp32_accum=fp32_accum,
                         record_voxel_count=record_voxel_count, large_kernel_fast_algo=large_kernel_fast_algo,
                         name=name)


class _SparseConvTransposeNd(_SparseConvNd):
    TRANSPOSED = True
    DOC = """Transposed sparse {n}D convolution (upsampling to every site an input reaches).

    Input: features ``[N_in, in_channels]`` at indices ``[N_in, {cols}]`` {names}.
    Output: features ``[N_out, out_channels]`` at indices ``[N_out, {cols}]``, ``spatial_shape``
    ``(in - 1) * stride - 2 * padding + dilation * (k - 1) + output_padding + 1`` per dimension.
    Weight: ``[out_channels, {ks}, in_channels // groups]`` (KRSC); bias ``[out_channels]``.
    """


class _SubMConvNd(_PerDimension, SparseConvolution):
    DOC = """Submanifold sparse {n}D convolution: the output sites are the input sites.

    Input: features ``[N, in_channels]`` at indices ``[N, {cols}]`` {names}.
    Output: features ``[N, out_channels]`` at the same indices, same ``spatial_shape``.
    Odd kernel sizes only; stride and padding are ignored (padding is ``(k // 2) * dilation``).
    Weight: ``[out_channels, {ks}, in_channels // groups]`` (KRSC); bias ``[out_channels]``.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, indice_key=None, algo=None, fp32_accum=None, large_kernel_fast_algo=False, name=None):
        super().__init__(self.NDIM, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         subm=True, indice_key=indice_key, algo=algo, fp32_accum=fp32_accum,
                         large_kernel_fast_algo=large_kernel_fast_algo, name=name)


class _SparseInverseConvNd(_PerDimension, SparseConvolution):
    DOC = """Inverse sparse {n}D convolution: undoes the strided conv/pool that created ``indice_key``.

    Input: the output of the layer that created ``indice_key``, features ``[N_out, in_channels]``.
    Output: features ``[N_in, out_channels]`` at exactly that layer's input indices ``[N_in, {cols}]``
    (same rows, same order) and ``spatial_shape``; ``kernel_size`` must match that layer's.
    Weight: ``[out_channels, {ks}, in_channels]`` (KRSC); bias ``[out_channels]``.
    """

    def __init__(self, in_channels, out_channels, kernel_size, indice_key, bias=True, algo=None, fp32_accum=None,
                 large_kernel_fast_algo=False, name=None):
        super().__init__(self.NDIM, in_channels, out_channels, kernel_size, bias=bias, inverse=True,
                         indice_key=indice_key, algo=algo, fp32_accum=fp32_accum,
                         large_kernel_fast_algo=large_kernel_fast_algo, name=name)


# The public classes, spconv's names and constructor signatures; docstrings from the family's DOC.
class SparseConv1d(_SparseConvNd): NDIM = 1
class SparseConv2d(_SparseConvNd): NDIM = 2
class SparseConv3d(_SparseConvNd): NDIM = 3
class SparseConv4d(_SparseConvNd): NDIM = 4
class SparseConvTranspose1d(_SparseConvTransposeNd): NDIM = 1
class SparseConvTranspose2d(_SparseConvTransposeNd): NDIM = 2
class SparseConvTranspose3d(_SparseConvTransposeNd): NDIM = 3
class SparseConvTranspose4d(_SparseConvTransposeNd): NDIM = 4
class SubMConv1d(_SubMConvNd): NDIM = 1
class SubMConv2d(_SubMConvNd): NDIM = 2
class SubMConv3d(_SubMConvNd): NDIM = 3
class SubMConv4d(_SubMConvNd): NDIM = 4
class SparseInverseConv1d(_SparseInverseConvNd): NDIM = 1
class SparseInverseConv2d(_SparseInverseConvNd): NDIM = 2
class SparseInverseConv3d(_SparseInverseConvNd): NDIM = 3
class SparseInverseConv4d(_SparseInverseConvNd): NDIM = 4


DEFAULT_SPARSE_CONV_TYPES = {
    SparseConv1d, SparseConv2d, SparseConv3d, SparseConv4d,
    SparseConvTranspose1d, SparseConvTranspose2d, SparseConvTranspose3d, SparseConvTranspose4d,
    SubMConv1d, SubMConv2d, SubMConv3d, SubMConv4d,
    SparseInverseConv1d, SparseInverseConv2d, SparseInverseConv3d, SparseInverseConv4d,
}
