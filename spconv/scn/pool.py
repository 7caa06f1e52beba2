"""Pooling with SparseConvNet's semantics, on spconv's pooling kernels and rulebooks.

``MaxPooling(dimension, pool_size, pool_stride, nFeaturesToDrop=0)`` and ``AveragePooling`` pool
like a valid Convolution: ``out = (in - size) / stride + 1`` and share its rulebook. SparseConvNet's
numbers are kept:

- MaxPooling returns ``max(0, max over the active sites)`` (its kernel starts from 0), which equals
  dense ``max_pool`` on the densified input.
- AveragePooling divides by the **window volume** ``prod(pool_size)`` (empty sites count as 0),
  which equals dense ``avg_pool``.
- UnPooling copies each coarse site's features to every finer site of its window (sum over the
  windows that cover a fine site), through the rulebook of the matching pooling.

``nFeaturesToDrop`` drops that many leading feature planes first.
"""
from torch import nn

from spconv.pytorch import functional as Fsp
from spconv.scn.conv import full_input_size, full_output_size, valid_input_size, valid_output_size
from spconv.scn.tensor import SparseConvNetTensor, check_tensor, derive, to_long_tensor


class _Pool(nn.Module):
    NAME = "Pooling"

    def __init__(self, dimension: int, pool_size, pool_stride, nFeaturesToDrop: int = 0):
        super().__init__()
        self.dimension = int(dimension)
        self.pool_size = to_long_tensor(self.dimension, pool_size, "pool_size")
        self.pool_stride = to_long_tensor(self.dimension, pool_stride, "pool_stride")
        if bool((self.pool_size < 1).any()) or bool((self.pool_stride < 1).any()):
            raise ValueError(f"{self.NAME}: pool_size and pool_stride must be >= 1, got {self.pool_size.tolist()} "
                             f"and {self.pool_stride.tolist()}")
        self.nFeaturesToDrop = int(nFeaturesToDrop)
        self.volume = int(self.pool_size.prod())

    def _features(self, input):
        check_tensor(input, self._describe(), self.dimension)
        f = input.features
        if self.nFeaturesToDrop:
            if f.shape[1] <= self.nFeaturesToDrop:
                raise ValueError(f"{self._describe()}: cannot drop {self.nFeaturesToDrop} of {f.shape[1]} planes")
            f = f[:, self.nFeaturesToDrop:]
        return f.contiguous()

    def _describe(self):
        p, s = self.pool_size.tolist(), self.pool_stride.tolist()
        ps = str(p[0]) if len(set(p)) == 1 else "(" + ",".join(map(str, p)) + ")"
        ss = str(s[0]) if len(set(s)) == 1 else "(" + ",".join(map(str, s)) + ")"
        drop = f" nFeaturesToDrop={self.nFeaturesToDrop}" if self.nFeaturesToDrop else ""
        return f"{self.NAME}{ps}/{ss}{drop}"

    def extra_repr(self):
        return self._describe()[len(self.NAME):]


class MaxPooling(_Pool):
    """Max pooling: ``[N_in, C] -> [N_out, C - nFeaturesToDrop]``, ``out = (in - size) / stride + 1``;
    the value is ``max(0, max of the active inputs in the window)``."""
    NAME = "MaxPooling"

    def forward(self, input: SparseConvNetTensor) -> SparseConvNetTensor:
        f = self._features(input)
        out_size = valid_output_size(input.spatial_size, self.pool_size, self.pool_stride, self._describe())
        book = input.metadata.rulebook(input.spatial_size, out_size, self.pool_size, self.pool_stride,
                                       self._describe())
        out = Fsp.indice_maxpool(f, book)
        return derive(input, out.clamp_min(0), out_size)

    def input_spatial_size(self, out_size):
        return valid_input_size(out_size, self.pool_size, self.pool_stride)


class AveragePooling(_Pool):
    """Average pooling over the window volume: ``out = sum of active inputs / prod(pool_size)``."""
    NAME = "AveragePooling"

    def forward(self, input: SparseConvNetTensor) -> SparseConvNetTensor:
        f = self._features(input)
        out_size = valid_output_size(input.spatial_size, self.pool_size, self.pool_stride, self._describe())
        book = input.metadata.rulebook(input.spatial_size, out_size, self.pool_size, self.pool_stride,
                                       self._describe())
        mean = Fsp.indice_avgpool(f, book)  # mean over the active sites
        scale = (book.counts.to(mean.dtype) / self.volume).to(mean.device).unsqueeze(1)
        return derive(input, mean * scale, out_size)

    def input_spatial_size(self, out_size):
        return valid_input_size(out_size, self.pool_size, self.pool_stride)


class UnPooling(_Pool):
    """Inverse of a pooling with the same size/stride: from the coarse sites to the finer sites of
    the same metadata, ``out = (in - 1) * stride + size``; each fine site gets the sum of the coarse
    sites whose windows contain it."""
    NAME = "UnPooling"

    def forward(self, input: SparseConvNetTensor) -> SparseConvNetTensor:
        f = self._features(input)
        out_size = full_output_size(input.spatial_size, self.pool_size, self.pool_stride)
        m = input.metadata
        if not m.has_sites(out_size):
            raise ValueError(f"{self._describe()}: the metadata has no sites at the output size {out_size.tolist()}; "
                             "UnPooling undoes an earlier pooling/Convolution from that size")
        book = m.rulebook(out_size, input.spatial_size, self.pool_size, self.pool_stride, self._describe())
        # reversed: each fine site averages the coarse sites it meets through the taps
        back = book.reversed()
        mean = Fsp.indice_avgpool(f, back)
        counts = back.counts.to(mean.dtype).to(mean.device).unsqueeze(1)
        return derive(input, mean * counts, out_size)

    def input_spatial_size(self, out_size):
        return full_input_size(out_size, self.pool_size, self.pool_stride, self._describe())
