"""SparseConvNetTensor and Metadata: SparseConvNet's tensor type on spconv's kernel maps.

A :class:`SparseConvNetTensor` is ``features [N, C]`` + a :class:`Metadata` + ``spatial_size``
(LongTensor of D ints). The Metadata is shared by every tensor that descends from one InputLayer;
it holds, per spatial size, the active sites of that scale and, per layer geometry, the rulebooks
(spconv kernel-map tables) -- each built once and reused by every later layer, forward and backward.
As in SparseConvNet, each spatial size must describe a single set of sites.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from spconv.pytorch.core import KernelMap, SparseConvTensor
from spconv.pytorch import ops


def to_long_tensor(dimension: int, x, name: str = "size") -> torch.Tensor:
    """An int, a sequence of ``dimension`` ints or a tensor -> LongTensor ``[dimension]``."""
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu().long().reshape(-1)
        if t.numel() == 1 and dimension != 1:
            t = t.expand(dimension).clone()
    elif isinstance(x, (list, tuple)):
        t = torch.tensor([int(v) for v in x], dtype=torch.long)
    else:
        t = torch.full((dimension,), int(x), dtype=torch.long)
    if t.numel() != dimension:
        raise ValueError(f"{name} must be an int or {dimension} ints (one per spatial dimension), got {x!r}")
    return t


toLongTensor = to_long_tensor  # SparseConvNet's name


def size_key(size) -> Tuple[int, ...]:
    return tuple(int(v) for v in (size.tolist() if isinstance(size, torch.Tensor) else size))


class Metadata:
    """Sites per spatial size and the rulebooks between them (SparseConvNet's ``Metadata_<d>``).

    Sites are stored as spconv indices ``[N, 1 + D]`` int32 (batch first); SparseConvNet's view with
    the batch index last is :meth:`get_spatial_locations`.
    """

    def __init__(self, dimension: int):
        if int(dimension) < 1:
            raise ValueError(f"dimension must be a positive int, got {dimension}")
        self.dimension = int(dimension)
        self.batch_size = 0
        self.sites: Dict[Tuple[int, ...], torch.Tensor] = {}
        self.submanifold_rulebooks: Dict[tuple, KernelMap] = {}
        self.rulebooks: Dict[tuple, KernelMap] = {}
        self.input_spatial_size: Optional[Tuple[int, ...]] = None
        self.input_layer_rule: Optional[dict] = None
        self.bl_layer_rule: Optional[dict] = None

    # ------------------------------------------------------------------ sites
    def set_sites(self, size, indices: torch.Tensor, batch_size: Optional[int] = None):
        self.sites[size_key(size)] = indices
        if batch_size is not None:
            self.batch_size = max(self.batch_size, int(batch_size))

    def get_sites(self, size, who: str = "this layer") -> torch.Tensor:
        key = size_key(size)
        if key not in self.sites:
            known = sorted(self.sites.keys())
            raise ValueError(f"{who}: the metadata has no active sites at spatial size {list(key)} (sizes present: "
                             f"{[list(k) for k in known]}). The input must come from an InputLayer/InputBatch and "
                             "the layers before it must produce this spatial size.")
        return self.sites[key]

    def has_sites(self, size) -> bool:
        return size_key(size) in self.sites

    def n_active(self, size) -> int:
        return int(self.get_sites(size).shape[0])

    def get_spatial_locations(self, spatial_size) -> torch.Tensor:
        """``[N, D + 1]`` LongTensor: the D coordinates, then the batch index (last column)."""
        idx = self.get_sites(spatial_size, "get_spatial_locations").long()
        return torch.cat([idx[:, 1:], idx[:, :1]], 1)

    getSpatialLocations = get_spatial_locations

    def get_batch_size(self, spatial_size=None) -> int:
        return self.batch_size

    getBatchSize = get_batch_size

    def clear(self):
        self.__init__(self.dimension)

    # ------------------------------------------------------------ rulebooks
    def submanifold_rulebook(self, size, filter_size) -> KernelMap:
        key = (size_key(size), size_key(filter_size))
        book = self.submanifold_rulebooks.get(key)
        if book is None:
            sites = self.get_sites(size, "SubmanifoldConvolution")
            nd = len(key[0])
            table = ops.build_subm_map(sites, list(key[0]), list(key[1]), [1] * nd, max(self.batch_size, 1))
            book = KernelMap(table, sites.shape[0], mirrored=all(k % 2 == 1 for k in key[1]))
            self.submanifold_rulebooks[key] = book
        return book

    def rulebook(self, in_size, out_size, filter_size, stride, who: str = "Convolution") -> KernelMap:
        """Valid strided map from the sites at ``in_size`` to those at ``out_size`` (created if absent).

        Shared by Convolution, MaxPooling and AveragePooling (forward) and Deconvolution and
        UnPooling (through the inverse), as in SparseConvNet.
        """
        key = (size_key(in_size), size_key(out_size), size_key(filter_size), size_key(stride))
        book = self.rulebooks.get(key)
        if book is not None:
            return book
        sites = self.get_sites(in_size, who)
        nd = len(key[0])
        out_indices, table = ops.build_conv_map(sites, list(key[0]), list(key[1]), list(key[2]), list(key[3]),
                                                [0] * nd, [1] * nd, False, max(self.batch_size, 1))
        existing = self.sites.get(key[1])
        if existing is None:
            self.sites[key[1]] = out_indices
        elif not (existing.shape == out_indices.shape and torch.equal(existing, out_indices)):
            table = _align_rows(existing, out_indices, table, list(key[1]), who)
        book = KernelMap(table, sites.shape[0])
        self.rulebooks[key] = book
        return book

    def __repr__(self):
        sizes = ", ".join(f"{list(k)}: {v.shape[0]}" for k, v in self.sites.items())
        return (f"Metadata(dimension={self.dimension}, batch_size={self.batch_size}, sites={{{sizes}}}, "
                f"{len(self.submanifold_rulebooks)} submanifold + {len(self.rulebooks)} strided rulebooks)")


def _align_rows(existing: torch.Tensor, new_sites: torch.Tensor, table: torch.Tensor, size: List[int],
                who: str) -> torch.Tensor:
    """Reorder ``table`` (rows = ``new_sites``) onto the rows of the sites already stored for this size."""
    ek = ops.linear_keys(existing, size)
    nk = ops.linear_keys(new_sites, size)
    sorted_ek, order = torch.sort(ek)
    pos = torch.searchsorted(sorted_ek, nk).clamp_(max=max(sorted_ek.numel() - 1, 0))
    if sorted_ek.numel() == 0 or not bool((sorted_ek[pos] == nk).all()):
        raise ValueError(f"{who}: two layers produce different active sites at spatial size {size}. SparseConvNet "
                         "metadata allows one set of sites per spatial size: use different spatial sizes for "
                         "differently downsampled branches (or a new InputLayer).")
    out = torch.full((existing.shape[0], table.shape[1]), -1, dtype=table.dtype)
    out[order[pos]] = table
    return out


class SparseConvNetTensor:
    """SparseConvNet's sparse tensor.

    Attributes:
        features: ``[N, C]`` features of the active sites (assignable).
        metadata: the :class:`Metadata` shared along the network.
        spatial_size: LongTensor ``[D]``, the grid size at this scale.
    """

    def __init__(self, features: Optional[torch.Tensor] = None, metadata: Optional[Metadata] = None,
                 spatial_size=None):
        self.features = features
        self.metadata = metadata
        self.spatial_size = spatial_size

    @property
    def dimension(self) -> int:
        return self.metadata.dimension

    def get_spatial_locations(self, spatial_size=None) -> torch.Tensor:
        """``[N, D + 1]`` LongTensor of the active sites: D coordinates then the batch index (last column)."""
        return self.metadata.get_spatial_locations(self.spatial_size if spatial_size is None else spatial_size)

    def batch_size(self) -> int:
        return self.metadata.get_batch_size(self.spatial_size)

    # spconv view ----------------------------------------------------------
    @property
    def indices(self) -> torch.Tensor:
        """spconv-style ``[N, 1 + D]`` int32 indices (batch first)."""
        return self.metadata.get_sites(self.spatial_size, "indices")

    def to_spconv(self):
        """This tensor as a :class:`spconv.pytorch.SparseConvTensor` (same rows)."""
        return SparseConvTensor(self.features, self.indices, size_key(self.spatial_size), self.batch_size())

    @classmethod
    def from_spconv(cls, x) -> "SparseConvNetTensor":
        """A SparseConvNetTensor with fresh metadata from a spconv ``SparseConvTensor``."""
        m = Metadata(len(x.spatial_shape))
        size = torch.tensor(x.spatial_shape, dtype=torch.long)
        m.set_sites(size, x.indices.cpu().int().contiguous(), x.batch_size)
        m.input_spatial_size = size_key(size)
        return cls(x.features, m, size)

    def dense(self) -> torch.Tensor:
        """Dense ``[B, C, *spatial_size]`` tensor (empty sites are 0)."""
        return sparse_to_dense(self)

    # torch-like helpers ---------------------------------------------------
    def type(self, t=None):
        if t is None:
            return self.features.type()
        self.features = self.features.type(t)
        return self

    def to(self, *args, **kwargs) -> "SparseConvNetTensor":
        self.features = self.features.to(*args, **kwargs)
        return self

    def cuda(self) -> "SparseConvNetTensor":
        self.features = self.features.cuda()
        return self

    def cpu(self) -> "SparseConvNetTensor":
        self.features = self.features.cpu()
        return self

    def detach(self) -> "SparseConvNetTensor":
        return SparseConvNetTensor(self.features.detach(), self.metadata, self.spatial_size)

    @property
    def requires_grad(self) -> bool:
        return bool(self.features is not None and self.features.requires_grad)

    @requires_grad.setter
    def requires_grad(self, value: bool):
        self.features.requires_grad_(value)

    @property
    def shape(self):
        return self.features.shape

    def __repr__(self):
        f = self.features
        fdesc = "None" if f is None else f"[{f.shape[0]}, {f.shape[1] if f.dim() > 1 else '?'}] {f.dtype}"
        size = None if self.spatial_size is None else list(size_key(self.spatial_size))
        bs = self.metadata.batch_size if self.metadata is not None else None
        return f"SparseConvNetTensor(features={fdesc}, spatial_size={size}, batch_size={bs})"


def derive(x: SparseConvNetTensor, features: torch.Tensor, spatial_size=None) -> SparseConvNetTensor:
    """A tensor on the same metadata with new features (and optionally a new spatial size)."""
    return SparseConvNetTensor(features, x.metadata, x.spatial_size if spatial_size is None else spatial_size)


def check_tensor(x, who: str, dimension: Optional[int] = None, n_planes: Optional[int] = None):
    """Clear errors for a wrong input type, dimension or channel count."""
    if not isinstance(x, SparseConvNetTensor):
        raise TypeError(f"{who} expects a SparseConvNetTensor (e.g. from scn.InputLayer), got {type(x).__name__}")
    if x.metadata is None or x.spatial_size is None or x.features is None:
        raise ValueError(f"{who}: the SparseConvNetTensor has no features/metadata/spatial_size; create it with "
                         "scn.InputLayer or scn.InputBatch")
    if dimension is not None and x.metadata.dimension != dimension:
        raise ValueError(f"{who} is {dimension}-dimensional but the input is {x.metadata.dimension}-dimensional "
                         f"(spatial_size {list(size_key(x.spatial_size))}): use the same dimension throughout")
    if n_planes is not None and x.features.dim() == 2 and x.features.shape[0] > 0 and x.features.shape[1] != n_planes:
        raise ValueError(f"{who} expects {n_planes} input feature planes, got features with {x.features.shape[1]}")


def prepare_BLInput(batch: Sequence) -> List[torch.Tensor]:
    """List of ``(locations [n_i, D], features [n_i, C])`` -> padded ``[coords [B, L, D] (-1 = empty),
    features [B, L, C]]`` for :class:`BLInputLayer`."""
    n = max([int(l.shape[0]) for l, f in batch] + [0])
    d = int(batch[0][0].shape[1])
    c = int(batch[0][1].shape[1])
    coords = torch.full((len(batch), n, d), -1, dtype=torch.long)
    feats = torch.zeros((len(batch), n, c), dtype=batch[0][1].dtype)
    for i, (l, f) in enumerate(batch):
        coords[i, :l.shape[0]] = l
        feats[i, :f.shape[0]] = f
    return [coords, feats]


def batch_location_tensors(location_tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate per-sample ``[n_i, D]`` locations into ``[sum n_i, D + 1]`` with the sample index last."""
    parts = [torch.cat([lt.long(), torch.full((lt.shape[0], 1), i, dtype=torch.long)], 1)
             for i, lt in enumerate(location_tensors) if lt.numel()]
    return torch.cat(parts, 0)


def concatenate_feature_planes(inputs: Sequence[SparseConvNetTensor]) -> SparseConvNetTensor:
    return derive(inputs[0], torch.cat([i.features for i in inputs], 1))


def add_feature_planes(inputs: Sequence[SparseConvNetTensor]) -> SparseConvNetTensor:
    return derive(inputs[0], sum(i.features for i in inputs))


def sparse_to_dense(input: SparseConvNetTensor, n_planes: Optional[int] = None) -> torch.Tensor:
    """``[B, C, *spatial_size]`` with the features at the active sites, zeros elsewhere (differentiable)."""
    size = list(size_key(input.spatial_size))
    sites = input.metadata.get_sites(size, "SparseToDense")
    f = input.features
    b = max(input.metadata.batch_size, 1)
    c = f.shape[1] if f.dim() == 2 else int(n_planes or 0)
    volume = 1
    for s in size:
        volume *= s
    out = f.new_zeros((b * volume, c))
    if sites.shape[0]:
        key = ops.linear_keys(sites, size).to(f.device)
        out = out.index_put((key,), f)
    return out.view(b, *size, c).movedim(-1, 1).contiguous()
