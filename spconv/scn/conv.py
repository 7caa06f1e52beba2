"""Convolutions with SparseConvNet's signatures, run by spconv's gather-GEMM kernels.

Parameters keep SparseConvNet's layout so its checkpoints load: ``weight [filter_volume, groups,
nIn / groups, nOut / groups]`` (taps row-major, last dimension fastest), ``bias [nOut]``; the
weight is viewed as spconv's ``[nOut, filter_volume, nIn / groups]`` at call time (autograd
carries the gradient back). Init: normal with std ``sqrt(2 * groups / (nIn * filter_volume))``,
bias 0. Older SparseConvNet layouts ``[filter_volume, nIn, nOut]`` and ``[filter_volume * nIn,
nOut]`` are converted when loading a state dict.

Spatial sizes (``f`` = filter_size, ``s`` = filter_stride, per dimension, no padding):

==========================  ======================  =====================================
module                      output size             output sites
==========================  ======================  =====================================
SubmanifoldConvolution      ``in``                  the input sites
Convolution                 ``(in - f) / s + 1``    every site whose window holds an input
Deconvolution               ``(in - 1) * s + f``    the sites the matching Convolution read
FullConvolution             ``(in - 1) * s + f``    every site an input writes to (new metadata)
==========================  ======================  =====================================

Convolution requires ``(in - f)`` divisible by ``s`` (as SparseConvNet asserts); use
``model.input_spatial_size(out_size)`` to find a valid input size.
"""
import math

import torch
from torch import nn

from spconv.pytorch import functional as Fsp
from spconv.pytorch import ops
from spconv.pytorch.core import KernelMap
from spconv.scn.tensor import Metadata, SparseConvNetTensor, check_tensor, derive, size_key, to_long_tensor


def valid_output_size(in_size: torch.Tensor, f: torch.Tensor, s: torch.Tensor, who: str) -> torch.Tensor:
    """``(in - f) / s + 1``, with a clear error when it is not a whole positive size."""
    in_size = to_long_tensor(len(f), in_size, "spatial_size")
    if bool((in_size < f).any()) or bool(((in_size - f) % s != 0).any()):
        raise ValueError(f"{who}: input spatial size {in_size.tolist()} does not fit filter size {f.tolist()} and "
                         f"stride {s.tolist()}: each (size - filter) must be >= 0 and divisible by the stride. Use "
                         "model.input_spatial_size(output_size) to choose the input size.")
    return (in_size - f) // s + 1


def full_output_size(in_size: torch.Tensor, f: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return (to_long_tensor(len(f), in_size, "spatial_size") - 1) * s + f


def valid_input_size(out_size, f: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`valid_output_size`: ``(out - 1) * s + f``."""
    return (to_long_tensor(len(f), out_size, "out_size") - 1) * s + f


def full_input_size(out_size, f: torch.Tensor, s: torch.Tensor, who: str) -> torch.Tensor:
    """Inverse of :func:`full_output_size`: ``(out - f) / s + 1`` (must be whole)."""
    out_size = to_long_tensor(len(f), out_size, "out_size")
    if bool((out_size < f).any()) or bool(((out_size - f) % s != 0).any()):
        raise ValueError(f"{who}: no input size gives output size {out_size.tolist()} with filter {f.tolist()} and "
                         f"stride {s.tolist()} ((out - filter) must be >= 0 and divisible by the stride)")
    return (out_size - f) // s + 1


def _count(pairs: int, macs_per_pair: int, out: torch.Tensor):
    """SparseConvNet's global counters ``scn.forward_pass_multiplyAdd_count`` / ``forward_pass_hidden_states``."""
    import spconv.scn as scn_pkg
    scn_pkg.forward_pass_multiplyAdd_count += pairs * macs_per_pair
    scn_pkg.forward_pass_hidden_states += out.numel()


class _ConvBase(nn.Module):
    """Shared parameters and weight conversion of the SparseConvNet convolutions."""
    NAME = "Convolution"

    def __init__(self, dimension, nIn, nOut, filter_size, filter_stride, bias, groups=1):
        super().__init__()
        self.dimension = int(dimension)
        if self.dimension < 1:
            raise ValueError(f"dimension must be a positive int, got {dimension}")
        self.nIn, self.nOut, self.groups = int(nIn), int(nOut), int(groups)
        if self.nIn <= 0 or self.nOut <= 0 or self.groups <= 0:
            raise ValueError(f"{self.NAME}: nIn, nOut and groups must be positive, got {nIn}, {nOut}, {groups}")
        if self.nIn % self.groups or self.nOut % self.groups:
            raise ValueError(f"{self.NAME}: nIn ({nIn}) and nOut ({nOut}) must be divisible by groups ({groups})")
        self.filter_size = to_long_tensor(self.dimension, filter_size, "filter_size")
        self.filter_stride = to_long_tensor(self.dimension, filter_stride, "filter_stride")
        if bool((self.filter_size < 1).any()) or bool((self.filter_stride < 1).any()):
            raise ValueError(f"{self.NAME}: filter_size and filter_stride must be >= 1, got "
                             f"{self.filter_size.tolist()} and {self.filter_stride.tolist()}")
        self.filter_volume = int(self.filter_size.prod())
        g = self.groups
        std = math.sqrt(2.0 * g / (self.nIn * self.filter_volume))
        self.weight = nn.Parameter(torch.empty(self.filter_volume, g, self.nIn // g, self.nOut // g).normal_(0, std))
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.nOut))
        else:
            self.register_parameter("bias", None)
        self._register_load_state_dict_pre_hook(self._convert_old_layout)

    def _convert_old_layout(self, state_dict, prefix, *args):
        key = prefix + "weight"
        w = state_dict.get(key)
        if w is None or w.shape == self.weight.shape:
            return
        v, g, i, o = self.weight.shape
        if w.numel() == self.weight.numel() and (tuple(w.shape) in ((v, self.nIn, self.nOut), (v * self.nIn, self.nOut))
                                                 and g == 1):
            state_dict[key] = w.reshape(v, 1, i, o)

    def spconv_weight(self) -> torch.Tensor:
        """The weight as spconv's ``[nOut, filter_volume, nIn / groups]``."""
        v, g, i, o = self.weight.shape
        return self.weight.permute(1, 3, 0, 2).reshape(g * o, v, i).contiguous()

    def _conv(self, features, kmap):
        out = Fsp.sparse_conv(features.contiguous(), self.spconv_weight(), kmap, self.groups)
        _count(kmap.pairs, self.nIn // self.groups * self.nOut, out)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out

    def _check(self, input):
        check_tensor(input, self._describe(), self.dimension, self.nIn)
        f = input.features
        if f.dtype != self.weight.dtype and not torch.is_autocast_enabled(f.device.type):
            raise ValueError(f"{self._describe()}: features are {f.dtype} but the weight is {self.weight.dtype}; "
                             f"convert the model (model.to({f.dtype})) or the features")

    def _describe(self):
        f = self.filter_size.tolist()
        fs = str(f[0]) if len(set(f)) == 1 else "(" + ",".join(map(str, f)) + ")"
        if self.NAME in ("SubmanifoldConvolution", "NetworkInNetwork"):
            return f"{self.NAME} {self.nIn}->{self.nOut} C{fs}"
        s = self.filter_stride.tolist()
        ss = str(s[0]) if len(set(s)) == 1 else "(" + ",".join(map(str, s)) + ")"
        return f"{self.NAME} {self.nIn}->{self.nOut} C{fs}/{ss}"

    def extra_repr(self):
        s = self._describe()[len(self.NAME) + 1:]
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        return s


class SubmanifoldConvolution(_ConvBase):
    """Submanifold convolution: output sites = input sites, each reads its neighbours
    ``site - filter_size // 2 + r``. ``[N, nIn] -> [N, nOut]`` at the same spatial size."""
    NAME = "SubmanifoldConvolution"

    def __init__(self, dimension, nIn, nOut, filter_size, bias, groups=1):
        super().__init__(dimension, nIn, nOut, filter_size, 1, bias, groups)

    def forward(self, input: SparseConvNetTensor) -> SparseConvNetTensor:
        self._check(input)
        book = input.metadata.submanifold_rulebook(input.spatial_size, self.filter_size)
        return derive(input, self._conv(input.features, book))

    def input_spatial_size(self, out_size):
        return out_size


ValidConvolution = SubmanifoldConvolution


class Convolution(_ConvBase):
    """Valid strided convolution (no padding): ``out = (in - f) / s + 1``; output y reads
    inputs ``y * s + r``. ``[N_in, nIn] -> [N_out, nOut]``."""
    NAME = "Convolution"

    def forward(self, input: SparseConvNetTensor) -> SparseConvNetTensor:
        self._check(input)
        out_size = valid_output_size(input.spatial_size, self.filter_size, self.filter_stride, self._describe())
        book = input.metadata.rulebook(input.spatial_size, out_size, self.filter_size, self.filter_stride,
                                       self._describe())
        return derive(input, self._conv(input.features, book), out_size)

    def input_spatial_size(self, out_size):
        return valid_input_size(out_size, self.filter_size, self.filter_stride)


class Deconvolution(_ConvBase):
    """Inverse of a :class:`Convolution` with the same filter size and stride: from the coarse sites
    back to the fine sites that convolution read (same metadata, same rulebook, reversed).
    ``out = (in - 1) * s + f``."""
    NAME = "Deconvolution"

    def forward(self, input: SparseConvNetTensor) -> SparseConvNetTensor:
        self._check(input)
        out_size = full_output_size(input.spatial_size, self.filter_size, self.filter_stride)
        m = input.metadata
        if not m.has_sites(out_size):
            raise ValueError(f"{self._describe()}: the metadata has no sites at the output size {out_size.tolist()}; "
                             "a Deconvolution undoes an earlier Convolution/pooling from that size (use "
                             "FullConvolution to create new sites)")
        book = m.rulebook(out_size, input.spatial_size, self.filter_size, self.filter_stride, self._describe())
        return derive(input, self._conv(input.features, book.reversed()), out_size)

    def input_spatial_size(self, out_size):
        return full_input_size(out_size, self.filter_size, self.filter_stride, self._describe())


class FullConvolution(_ConvBase):
    """Generative transposed convolution: every input site x writes to ``x * s + r`` for all taps;
    ``out = (in - 1) * s + f``. The output lives in a **new** Metadata."""
    NAME = "FullConvolution"

    def forward(self, input: SparseConvNetTensor) -> SparseConvNetTensor:
        self._check(input)
        out_size = full_output_size(input.spatial_size, self.filter_size, self.filter_stride)
        m = input.metadata
        sites = m.get_sites(input.spatial_size, self._describe())
        nd = self.dimension
        out_sites, table = ops.build_conv_map(sites, list(size_key(input.spatial_size)), out_size.tolist(),
                                              self.filter_size.tolist(), self.filter_stride.tolist(), [0] * nd,
                                              [1] * nd, True, max(m.batch_size, 1))
        new = Metadata(self.dimension)
        new.set_sites(out_size, out_sites, m.batch_size)
        new.input_spatial_size = size_key(out_size)
        out = self._conv(input.features, KernelMap(table, sites.shape[0]))
        return SparseConvNetTensor(out, new, out_size)

    def input_spatial_size(self, out_size):
        return full_input_size(out_size, self.filter_size, self.filter_stride, self._describe())


TransposeConvolution = FullConvolution


class NetworkInNetwork(nn.Module):
    """Per-site linear layer (1x1 convolution): ``[N, nIn] -> [N, nOut]``; weight ``[nIn, nOut]``
    (std ``sqrt(2 / nIn)``), optional bias ``[nOut]``."""

    def __init__(self, nIn: int, nOut: int, bias: bool = False):
        super().__init__()
        self.nIn, self.nOut = int(nIn), int(nOut)
        self.weight = nn.Parameter(torch.empty(self.nIn, self.nOut).normal_(0, math.sqrt(2.0 / self.nIn)))
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.nOut))
        else:
            self.register_parameter("bias", None)

    def forward(self, input: SparseConvNetTensor) -> SparseConvNetTensor:
        check_tensor(input, f"NetworkInNetwork {self.nIn}->{self.nOut}", None, self.nIn)
        out = input.features @ self.weight.to(input.features.dtype)
        _count(input.features.shape[0], self.nIn * self.nOut, out)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return derive(input, out)

    def input_spatial_size(self, out_size):
        return out_size

    def extra_repr(self):
        return f"{self.nIn}->{self.nOut}" + ("" if self.bias is not None else ", bias=False")
