"""SparseConvTensor: features [N, C] at integer sites indices [N, 1 + D] (batch first)."""
import warnings
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from spconv import constants
from spconv.core import ConvAlgo
from spconv.pytorch import ops

def expand_nd(ndim: int, val, name: str = "value") -> List[int]:
    """An int becomes ``[val] * ndim``; a sequence must have ``ndim`` entries."""
    if isinstance(val, (int, np.integer)):
        return [int(val)] * ndim
    vals = [int(v) for v in val]
    if len(vals) != ndim:
        raise ValueError(f"{name} must be an int or a sequence of {ndim} ints (one per spatial dimension), "
                         f"got {list(val)}")
    return vals


_AXES = {1: "x", 2: "y, x", 3: "z, y, x", 4: "t, z, y, x"}
_KERNEL_AXES = {1: "k", 2: "kh, kw", 3: "kd, kh, kw", 4: "kt, kd, kh, kw"}


def per_dim_doc(template: str, ndim: int) -> str:
    """Fill a layer family's docstring for ``ndim``: ``{n}`` the dimension, ``{cols}`` the indices' columns
    (1 + ndim), ``{names}`` their names, ``{ks}`` the kernel axes of the weight."""
    return template.format(n=ndim, cols=ndim + 1, names=f"(batch, {_AXES[ndim]})", ks=_KERNEL_AXES[ndim])


class KernelMap:
    """A kernel map, the one object every sparse layer (spconv.pytorch and spconv.scn) runs through.

    ``indice_pairs`` is the output-major table ``[N_out, K]`` int32: row j, tap r holds the input row
    feeding output j through kernel offset r (taps row-major, last dimension fastest), or -1.
    ``input_major_pairs`` is the input-major table ``[num_inputs, K]`` (the output row each input feeds
    through tap r), built on first use: a flip of the taps for ``mirrored`` maps (odd SubM kernels), else
    ``ops.invert_map``. The autograd Functions take a KernelMap: forward reads ``indice_pairs``,
    backward ``input_major_pairs``; :meth:`reversed` swaps the two (inverse convs, Deconvolution).
    """

    def __init__(self, indice_pairs: torch.Tensor, num_inputs: int, mirrored: bool = False):
        self.indice_pairs = indice_pairs
        self._num_inputs = int(num_inputs)
        self.mirrored = mirrored
        self._input_major = None
        self._counts = None

    @property
    def num_inputs(self) -> int:
        return self._num_inputs

    @property
    def input_major_pairs(self) -> torch.Tensor:
        if self._input_major is None:
            if self.mirrored:  # input i meets output j through the mirrored tap
                self._input_major = self.indice_pairs.flip(1).contiguous()
            else:
                self._input_major = ops.invert_map(self.indice_pairs, self.num_inputs)
        return self._input_major

    @property
    def counts(self) -> torch.Tensor:
        """``[N_out]``: active taps per output row."""
        if self._counts is None:
            self._counts = (self.indice_pairs >= 0).sum(1)
        return self._counts

    @property
    def pairs(self) -> int:
        """Number of (input, output) pairs: the active entries of the table."""
        return int(self.counts.sum())

    def reversed(self) -> "KernelMap":
        """The same map run backwards (outputs become inputs), sharing both tables."""
        back = KernelMap(self.input_major_pairs, self.indice_pairs.shape[0], self.mirrored)
        back._input_major = self.indice_pairs
        return back


class IndiceData(KernelMap):
    """A :class:`KernelMap` stored under an ``indice_key`` (spconv's name), with its geometry.

    ``indices [N_in, 1 + D]``/``spatial_shape`` describe the input sites, ``out_indices [N_out, 1 + D]``/
    ``out_spatial_shape`` the output sites. ``dups`` (a :class:`spconv.pytorch.indice_keys.DuplicateSites`) is set when the input
    sites repeat: the tables then index the unique sites.
    """

    def __init__(self, out_indices, indices, indice_pairs, indice_pair_num, spatial_shape, out_spatial_shape,
                 is_subm, algo, ksize, stride, dilation, padding, voxel_num=None, dups=None):
        super().__init__(indice_pairs, 0, mirrored=bool(is_subm))
        self.out_indices = out_indices
        self.indices = indices
        self.indice_pair_num = indice_pair_num
        self.spatial_shape = list(spatial_shape)
        self.out_spatial_shape = list(out_spatial_shape)
        self.is_subm = is_subm
        self.algo = algo
        self.ksize = list(ksize)
        self.stride = list(stride)
        self.dilation = list(dilation)
        self.padding = list(padding)
        self.voxel_num = voxel_num
        self.dups = dups

    @property
    def num_inputs(self) -> int:
        return self.indices.shape[0] if self.dups is None else self.dups.num_sites

    def __setstate__(self, state):  # pickles of older versions
        state.setdefault("dups", None)
        state.setdefault("mirrored", bool(state.get("is_subm")))
        state.setdefault("_counts", None)
        state.setdefault("_num_inputs", 0)
        state.pop("build_count", None)
        self.__dict__.update(state)

    def __repr__(self):
        kind = "subm" if self.is_subm else "conv"
        return (f"IndiceData({kind}, ksize={self.ksize}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, {self.indices.shape[0]} -> {self.out_indices.shape[0]} sites, "
                f"{list(self.spatial_shape)} -> {list(self.out_spatial_shape)})")


def _as_batch_size(batch_size) -> int:
    """``batch_size`` as a positive int: ints, numpy/torch integer scalars and integral floats (2.0)."""
    if isinstance(batch_size, (str, bytes, bool, np.bool_)):
        raise TypeError(f"batch_size must be an integer, got {batch_size!r} ({type(batch_size).__name__})")
    try:
        value = int(batch_size)
        exact = float(batch_size) == value if not isinstance(batch_size, (int, np.integer)) else True
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"batch_size must be an integer, got {batch_size!r} ({type(batch_size).__name__})") from None
    if not exact:
        raise ValueError(f"batch_size must be a whole number, got {batch_size!r}; pass int(batch_size) of the "
                         "real number of samples (max batch index + 1)")
    if value <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size!r}")
    return value


def _as_spatial_shape(spatial_shape) -> List[int]:
    """``spatial_shape`` as a list of positive ints (lists, tuples, numpy arrays, tensors)."""
    try:
        vals = list(spatial_shape.tolist() if hasattr(spatial_shape, "tolist") else spatial_shape)
    except TypeError:
        raise TypeError(f"spatial_shape must be a sequence of ints, got {spatial_shape!r}") from None
    out = []
    for v in vals:
        if isinstance(v, (bool, np.bool_)) or float(v) != int(v):
            raise ValueError(f"spatial_shape entries must be whole numbers, got {vals}")
        out.append(int(v))
    if any(s <= 0 for s in out):
        raise ValueError(f"spatial_shape entries must be positive, got {out}")
    return out


def _check_indices(features: torch.Tensor, indices: torch.Tensor, spatial_shape: List[int], batch_size: int):
    """Validate a sparse tensor's parts; raise ValueError/TypeError naming the argument and the fix."""
    if not isinstance(features, torch.Tensor) or features.dim() != 2:
        raise ValueError(f"features must be a 2-D tensor [N, C], got "
                         f"{tuple(features.shape) if isinstance(features, torch.Tensor) else type(features)}")
    if not isinstance(indices, torch.Tensor) or indices.dim() != 2:
        raise ValueError("indices must be a 2-D int32 tensor [N, 1 + ndim] with the batch index in column 0")
    if indices.dtype != torch.int32:
        raise ValueError(f"indices must be int32, got {indices.dtype}; convert with indices.int()")
    ndim = indices.shape[1] - 1
    if ndim < 1:
        raise ValueError("indices must have 1 + ndim columns (batch, then one per spatial dimension)")
    if len(spatial_shape) != ndim:
        raise ValueError(f"spatial_shape has {len(spatial_shape)} entries but indices have {ndim} spatial "
                         f"columns; spatial shape must equal ndim")
    if features.shape[0] != indices.shape[0]:
        raise ValueError(f"features has {features.shape[0]} rows but indices has {indices.shape[0]}: "
                         "they must describe the same sites (after x = x.replace_feature(f) with a different "
                         "row count, also assign the matching x.indices)")
    batch_size = _as_batch_size(batch_size)
    spatial_shape = _as_spatial_shape(spatial_shape)
    volume = batch_size
    for s in spatial_shape:
        volume *= s
    if volume >= 2 ** 62:
        raise ValueError(f"batch_size x prod(spatial_shape) = {volume} does not fit int64 keys (limit 2^62); "
                         "use a coarser voxel size or a smaller grid")
    if any(s > 2 ** 31 - 1 for s in spatial_shape):
        raise ValueError(f"spatial_shape {spatial_shape} has an entry above 2^31-1: coordinates are int32")
    if indices.device != features.device:
        raise ValueError(f"features are on {features.device} but indices on {indices.device}; put both on one device")
    if indices.shape[0] == 0 or indices.device.type == "meta":
        return
    lo = indices.amin(0).tolist()
    hi = indices.amax(0).tolist()
    if lo[0] < 0 or hi[0] >= batch_size:
        raise ValueError(f"batch indices (column 0) must be in [0, batch_size={batch_size}), found range "
                         f"[{lo[0]}, {hi[0]}]; pass a larger batch_size or fix the batch column")
    for d in range(ndim):
        if lo[d + 1] < 0:
            raise ValueError(f"negative coordinate {lo[d + 1]} in spatial dimension {d} (indices column {d + 1}); "
                             "shift the coordinates to start at 0")
        if hi[d + 1] >= spatial_shape[d]:
            raise ValueError(f"coordinate {hi[d + 1]} in spatial dimension {d} (indices column {d + 1}) is outside "
                             f"spatial_shape[{d}]={spatial_shape[d]}; enlarge spatial_shape or clip the points")


_warned_duplicates = False


def _version_of(t) -> Optional[int]:
    return t._version if isinstance(t, torch.Tensor) and not torch.compiler.is_compiling() else None


def duplicate_sites_found(where: str, count: int):
    """Called when ``count`` rows repeat another row's (batch, coordinate): raises in strict mode
    (``spconv.constants.SPCONV_STRICT_INDICES = True``), else warns once per process."""
    global _warned_duplicates
    if constants.SPCONV_STRICT_INDICES:
        raise ValueError(f"{where}: indices contain {count} duplicate sites (rows with the same batch and "
                         "coordinates) and spconv.constants.SPCONV_STRICT_INDICES is True; merge duplicates "
                         "first, e.g. with torch.unique(indices, dim=0, return_inverse=True) and a scatter-add")
    if not _warned_duplicates:
        _warned_duplicates = True
        warnings.warn(f"spconv: {where} got indices with duplicate sites ({count} rows repeat a site). They are "
                      "handled as spconv 2.3.8 does (strided/transposed convs sum them, max pools take their max, "
                      "SubM convs follow spconv's pair rule, dense() keeps the last row); see the README. Set "
                      "spconv.constants.SPCONV_STRICT_INDICES = True to raise instead. (Warned once.)",
                      stacklevel=3)


class SparseConvTensor:
    """A batch of sparse feature maps.

    Args:
        features: ``[N, C]`` features of the active sites.
        indices: ``[N, 1 + D]`` int32, batch index in column 0 then the D coordinates, ordered as
            ``spatial_shape``. Sites should be unique; duplicates are accepted with a warning and
            handled as spconv 2.3.8 does.
        spatial_shape: D ints, the grid size.
        batch_size: number of samples.
    Features are read-only: use :meth:`replace_feature` to get a tensor with new features.
    ``indices``, ``spatial_shape`` and ``batch_size`` may be reassigned (as downstream code does after
    ``replace_feature`` with a different row count): cached kernel maps of the old sites are dropped and
    the tensor is validated again at its next use (a conv, a pool, ``dense()``).
    """

    def __init__(self, features: torch.Tensor, indices: torch.Tensor, spatial_shape: Union[Sequence[int], Any],
                 batch_size: int, grid: Optional[torch.Tensor] = None, voxel_num: Optional[torch.Tensor] = None,
                 indice_dict: Optional[Dict[str, Any]] = None, benchmark: bool = False,
                 permanent_thrust_allocator: bool = False, enable_timer: bool = False, force_algo=None,
                 _validate: bool = True):
        if _validate and not constants.SPCONV_FX_TRACE_MODE:
            spatial_shape = _as_spatial_shape(spatial_shape)
            batch_size = _as_batch_size(batch_size)
            _check_indices(features, indices, spatial_shape, batch_size)
        else:
            spatial_shape = [int(v) for v in spatial_shape]
            batch_size = int(batch_size)
        self._features = features
        self._indices = indices
        self._spatial_shape = spatial_shape
        self._batch_size = batch_size
        self._stale = False  # parts reassigned since the last validation
        self._indices_version = _version_of(indices)  # in-place edits of indices bump it
        self.indice_dict = {} if indice_dict is None else indice_dict
        self.grid = torch.Tensor() if grid is None else grid
        self.voxel_num = voxel_num
        self.benchmark = benchmark
        self.benchmark_record = {}
        self.thrust_allocator = None
        self._timer = None
        self.force_algo = force_algo
        self.int8_scale = None

    @property
    def features(self) -> torch.Tensor:
        return self._features

    @features.setter
    def features(self, value):
        raise ValueError("you can't set feature directly, use 'x = x.replace_feature(your_new_feature)' "
                         "to generate new SparseConvTensor instead.")

    @property
    def indices(self) -> torch.Tensor:
        return self._indices

    @indices.setter
    def indices(self, value):
        old = self._indices
        same = (isinstance(value, torch.Tensor) and value is old) or (
            isinstance(value, torch.Tensor) and value.shape == old.shape and value.dtype == old.dtype
            and value.device == old.device and torch.equal(value, old))
        if not same:
            self._drop_maps_of(old)
        self._indices = value
        self._stale = True
        self._indices_version = _version_of(value)

    @property
    def spatial_shape(self) -> List[int]:
        return self._spatial_shape

    @spatial_shape.setter
    def spatial_shape(self, value):
        value = [int(v) for v in (value.tolist() if hasattr(value, "tolist") else value)]
        if value != self._spatial_shape:
            self._drop_maps_of(self._indices)
        self._spatial_shape = value
        self._stale = True

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @batch_size.setter
    def batch_size(self, value):
        value = _as_batch_size(value)
        if value != self._batch_size:
            self._drop_maps_of(self._indices)
        self._batch_size = value
        self._stale = True

    def _drop_maps_of(self, sites: torch.Tensor):
        """Forget the kernel maps built on (or producing) ``sites`` (a new dict: the old one may be shared)."""
        self.indice_dict = {k: v for k, v in self.indice_dict.items()
                            if not (isinstance(v, IndiceData) and (v.indices is sites or v.out_indices is sites))}

    def validated(self) -> "SparseConvTensor":
        """Check features/indices/spatial_shape/batch_size agree if a part was reassigned (or the indices edited
        in place) since the last check; called by convs, pools and ``dense()``. Returns self."""
        if constants.SPCONV_FX_TRACE_MODE or torch.compiler.is_compiling():
            return self
        version = _version_of(self._indices)
        if version != self._indices_version:  # e.g. x.indices[:, 1:] *= 2: maps built on these rows are stale
            self._drop_maps_of(self._indices)
            self._stale = True
        if self._stale:
            _check_indices(self._features, self._indices, self._spatial_shape, self._batch_size)
            self._stale = False
            self._indices_version = version
        return self

    @property
    def ndim(self) -> int:
        return len(self.spatial_shape)

    @property
    def spatial_size(self) -> int:
        return int(np.prod(self.spatial_shape))

    @property
    def is_quantized(self) -> bool:
        return self._features.dtype == torch.qint8

    def _derive(self, features: torch.Tensor, indices: torch.Tensor, spatial_shape, indice_dict) -> "SparseConvTensor":
        new = SparseConvTensor(features, indices, spatial_shape, self.batch_size, self.grid, self.voxel_num,
                               indice_dict, self.benchmark, force_algo=self.force_algo, _validate=False)
        new.benchmark_record = self.benchmark_record
        new.thrust_allocator = self.thrust_allocator
        new._timer = self._timer
        new.int8_scale = self.int8_scale
        new._stale = self._stale
        new._indices_version = self._indices_version if indices is self._indices else _version_of(indices)
        return new

    def replace_feature(self, feature: torch.Tensor) -> "SparseConvTensor":
        """Same sites (and the same indice_dict), new ``[N, C']`` features.

        As in spconv 2.3.8 the row count may differ from the sites' (code such as VoxelNeXt then assigns
        ``x.indices``); the tensor is checked at its next use."""
        new = self._derive(feature, self.indices, self.spatial_shape, self.indice_dict)
        if not isinstance(feature, torch.Tensor) or feature.dim() != 2 or feature.shape[0] != self.indices.shape[0]:
            new._stale = True
        return new

    def shadow_copy(self) -> "SparseConvTensor":
        """A new tensor object sharing features, indices and indice_dict."""
        return self._derive(self._features, self.indices, self.spatial_shape, self.indice_dict)

    def select_by_index(self, valid_indices: torch.Tensor) -> "SparseConvTensor":
        """Keep the rows ``valid_indices`` (int index or bool mask); the kernel-map cache starts empty."""
        return self._derive(self._features[valid_indices], self.indices[valid_indices].contiguous(),
                            self.spatial_shape, {})

    def minus(self) -> "SparseConvTensor":
        return self.replace_feature(-self._features)

    def find_indice_pair(self, key) -> Optional[IndiceData]:
        if key is None:
            return None
        return self.indice_dict.get(key)

    def dense(self, channels_first: bool = True) -> torch.Tensor:
        """Scatter into ``[B, C, *spatial]`` (``[B, *spatial, C]`` if not channels_first); empty sites are 0.

        A site given by several rows takes the last of them (spconv 2.3.8's ``scatter_nd`` on the CPU)."""
        self.validated()
        feats = self._features
        out = feats.new_zeros([self.batch_size * self.spatial_size, feats.shape[1]])
        lin = ops.linear_keys(self.indices, self.spatial_shape)
        if lin.shape[0] > 1 and not constants.SPCONV_FX_TRACE_MODE and lin.device.type != "meta":
            uniq, inverse = torch.unique(lin, return_inverse=True)
            if uniq.shape[0] < lin.shape[0]:  # keep the last row of each site: a deterministic scatter
                duplicate_sites_found("SparseConvTensor.dense()", lin.shape[0] - uniq.shape[0])
                rows = torch.arange(lin.shape[0], device=lin.device)
                last = rows.new_full((uniq.shape[0],), -1).scatter_reduce(0, inverse, rows, "amax")
                lin, feats = uniq, feats[last]
        out = out.index_put((lin,), feats)  # also for 0 rows: the result stays connected to autograd
        out = out.view(self.batch_size, *self.spatial_shape, feats.shape[1])
        if channels_first:
            out = out.permute(0, self.ndim + 1, *range(1, self.ndim + 1)).contiguous()
        return out

    @classmethod
    def from_dense(cls, x: torch.Tensor) -> "SparseConvTensor":
        """From a channels-last dense tensor ``[B, *spatial, C]``; a site is active if any channel is non-zero."""
        if x.dim() < 3:
            raise ValueError(f"from_dense expects a channels-last tensor [B, *spatial, C], got shape {tuple(x.shape)}")
        mask = (x != 0).any(-1)
        indices = mask.nonzero().int().contiguous()
        return cls(x[mask], indices, list(x.shape[1:-1]), x.shape[0])

    def _other_features(self, other) -> torch.Tensor:
        if isinstance(other, SparseConvTensor):
            if other.indices is not self.indices and (other.indices.shape != self.indices.shape
                                                      or not torch.equal(other.indices, self.indices)):
                raise ValueError("'+' needs both sparse tensors on the same sites in the same row order; "
                                 "use spconv.pytorch.functional.sparse_add for different sites")
            return other.features
        return other

    def __add__(self, other) -> "SparseConvTensor":
        return self.replace_feature(self._features + self._other_features(other))

    def __radd__(self, other) -> "SparseConvTensor":
        return self.replace_feature(self._other_features(other) + self._features)

    def __iadd__(self, other) -> "SparseConvTensor":
        return self.__add__(other)

    def dequantize(self) -> "SparseConvTensor":
        return self.replace_feature(self._features.dequantize())

    def q_scale(self):
        if self.is_quantized:
            return self._features.q_scale()
        raise ValueError("sparse tensor is not quantized")

    def __setstate__(self, state):
        for name in ("indices", "spatial_shape", "batch_size"):  # pickles of older versions
            if name in state:
                state["_" + name] = state.pop(name)
        state.setdefault("_stale", False)
        self.__dict__.update(state)
        self._indices_version = _version_of(self._indices)  # versions restart in a new tensor

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_indices_version", None)
        return state

    def __repr__(self) -> str:
        f = self._features
        return (f"SparseConvTensor(features=[{f.shape[0]}, {f.shape[1] if f.dim() > 1 else '?'}] {f.dtype} on "
                f"{f.device}, indices=[{self.indices.shape[0]}, {self.indices.shape[1]}], "
                f"spatial_shape={self.spatial_shape}, batch_size={self.batch_size}, "
                f"indice_keys={list(self.indice_dict.keys())})")


def scatter_nd(indices: torch.Tensor, updates: torch.Tensor, shape: List[int]) -> torch.Tensor:
    """Dense tensor of ``shape`` with ``ret[tuple(indices.T)] = updates`` (spconv helper)."""
    ret = torch.zeros(*shape, dtype=updates.dtype, device=updates.device)
    ndim = indices.shape[-1]
    flatted = indices.view(-1, ndim).long()
    ret[tuple(flatted[:, i] for i in range(ndim))] = updates.view(-1, *shape[ndim:])
    return ret


# torch.load defaults to weights_only=True since torch 2.6, which refuses unknown classes. A saved
# SparseConvTensor holds only tensors, lists, dicts and these data-only classes (no __reduce__ of
# their own), so they are allowlisted: torch.load(path) restores it without weights_only=False.
torch.serialization.add_safe_globals([SparseConvTensor, KernelMap, IndiceData, ConvAlgo])
