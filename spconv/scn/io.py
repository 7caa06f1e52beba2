"""Getting data in and out: InputLayer / OutputLayer, BLInputLayer / BLOutputLayer, InputBatch,
SparseToDense and DenseToSparse.

Duplicate coordinates (``mode``), as the code of SparseConvNet behaves (its InputLayer docstring
swaps modes 1 and 2):

====  ===========================================  =============================================
mode  InputLayer                                   BLInputLayer
====  ===========================================  =============================================
0     sites are unique: rows pass through as given  unique and no -1 padding: all B*L rows pass
1     keep the **first** row of each site           keep the **last** row of each site
2     keep the **last** row of each site            keep the **first** row of each site
3     sum the rows of each site (default)           sum
4     average the rows of each site                 average
====  ===========================================  =============================================

For modes 1-4 the output rows are the sites in order of first appearance (BLInputLayer: sample by
sample). Duplicates under mode 0 raise a ValueError (SparseConvNet silently corrupts its state).
"""
from typing import Optional

import torch
from torch import nn

from spconv.pytorch.ops import linear_keys
from spconv.scn.tensor import (Metadata, SparseConvNetTensor, check_tensor, size_key, sparse_to_dense,  # noqa: F401
                               to_long_tensor)

MODES = (0, 1, 2, 3, 4)


def _check_mode(mode):
    if mode not in MODES:
        raise ValueError(f"mode must be 0 (unique), 1 (keep first), 2 (keep last), 3 (sum) or 4 (average), "
                         f"got {mode!r}")


def _check_coords(coords: torch.Tensor, spatial_size: torch.Tensor, who: str):
    """coords [N, D] int64 inside [0, spatial_size)."""
    if coords.shape[0] == 0:
        return
    lo = coords.amin(0)
    hi = coords.amax(0)
    for d in range(coords.shape[1]):
        if int(lo[d]) < 0:
            raise ValueError(f"{who}: negative coordinate {int(lo[d])} in dimension {d}; coordinates must lie in "
                             f"[0, spatial_size) = [0, {list(size_key(spatial_size))})")
        if int(hi[d]) >= int(spatial_size[d]):
            raise ValueError(f"{who}: coordinate {int(hi[d])} in dimension {d} is outside spatial_size "
                             f"{list(size_key(spatial_size))} (valid range [0, {int(spatial_size[d])})); enlarge "
                             "the spatial size (see model.input_spatial_size) or clip/shift the points")


def _group_rows(keys: torch.Tensor):
    """Group equal keys. Returns (row of each input [N], first input of each row, last input of each
    row, count of each row); rows are numbered by first appearance."""
    n = keys.shape[0]
    uniq, inverse, counts = torch.unique(keys, return_inverse=True, return_counts=True)
    ar = torch.arange(n)
    first = torch.full((uniq.shape[0],), n, dtype=torch.long).scatter_reduce(0, inverse, ar, "amin")
    last = torch.full((uniq.shape[0],), -1, dtype=torch.long).scatter_reduce(0, inverse, ar, "amax")
    order = torch.argsort(first)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.shape[0])
    return rank[inverse], first[order], last[order], counts[order]


def _reduce_rows(features: torch.Tensor, mode: int, row_of: torch.Tensor, first, last, counts):
    m = first.shape[0]
    if mode == 1:
        return features[first]
    if mode == 2:
        return features[last]
    out = features.new_zeros((m, features.shape[1])).index_add(0, row_of.to(features.device), features)
    if mode == 4:
        out = out / counts.to(out.device, out.dtype).unsqueeze(1)
    return out


def _scatter_back(features: torch.Tensor, rule: dict) -> torch.Tensor:
    """Rows of the sites back to the input rows (OutputLayer's rule)."""
    mode = rule["mode"]
    if mode == 0:
        return features
    if mode in (3, 4):
        return features[rule["row_of"].to(features.device)]
    out = features.new_zeros((rule["n_input"], features.shape[1]))
    return out.index_copy(0, rule["selected"].to(features.device), features)


class InputLayer(nn.Module):
    """Builds a SparseConvNetTensor from ``(coords, features[, batch_size])``.

    - ``coords``: ``[N, D]`` (one sample) or ``[N, D + 1]`` with the batch index in the **last**
      column; integer, inside ``[0, spatial_size)``.
    - ``features``: ``[N, C]``.
    - ``batch_size`` (optional): lower bound on the number of samples.

    Output: features ``[N_sites, C]`` at ``spatial_size`` with fresh metadata. ``mode`` handles
    duplicate coordinates, see the module docstring (default 3: sum).
    """

    def __init__(self, dimension: int, spatial_size, mode: int = 3):
        super().__init__()
        _check_mode(mode)
        self.dimension = int(dimension)
        self.spatial_size = to_long_tensor(self.dimension, spatial_size, "spatial_size")
        self.mode = mode

    def forward(self, input) -> SparseConvNetTensor:
        if not isinstance(input, (list, tuple)) or len(input) not in (2, 3):
            raise TypeError("InputLayer expects (coords, features) or (coords, features, batch_size)")
        coords, features = input[0], input[1]
        batch_size = int(input[2]) if len(input) == 3 else 0
        who = f"InputLayer({self.dimension}, {list(size_key(self.spatial_size))}, mode={self.mode})"
        coords = torch.as_tensor(coords).detach().cpu()
        if coords.dtype.is_floating_point:
            raise ValueError(f"{who}: coords must be an integer tensor, got {coords.dtype}")
        coords = coords.long()
        d = self.dimension
        if coords.dim() != 2 or coords.shape[1] not in (d, d + 1):
            raise ValueError(f"{who}: coords must be [N, {d}] or [N, {d + 1}] (batch index last), got shape "
                             f"{tuple(coords.shape)}")
        if not isinstance(features, torch.Tensor) or features.dim() != 2 or features.shape[0] != coords.shape[0]:
            raise ValueError(f"{who}: features must be [N, C] with N = {coords.shape[0]} (one row per coordinate), "
                             f"got {tuple(features.shape) if isinstance(features, torch.Tensor) else type(features)}")
        spatial, batch = _split_coords(coords, d, who)
        _check_coords(spatial, self.spatial_size, who)
        nb = max(batch_size, int(batch.max()) + 1 if batch.numel() else 1, 1)
        _check_volume(nb, self.spatial_size, who)
        metadata = Metadata(d)
        size = self.spatial_size.clone()
        keys = linear_keys(torch.cat([batch.view(-1, 1).long(), spatial.long()], 1), size.tolist())
        if self.mode == 0:
            if torch.unique(keys).numel() != keys.numel():
                raise ValueError(f"{who}: coords contain duplicate sites but mode 0 promises unique coordinates; use "
                                 "mode 1 (first), 2 (last), 3 (sum) or 4 (average)")
            sites = torch.cat([batch[:, None], spatial], 1).int()
            out = features
            rule = {"mode": 0, "n_input": coords.shape[0]}
        else:
            row_of, first, last, counts = _group_rows(keys)
            sites = torch.cat([batch[first, None], spatial[first]], 1).int()
            out = _reduce_rows(features, self.mode, row_of, first, last, counts)
            rule = {"mode": self.mode, "n_input": coords.shape[0], "row_of": row_of,
                    "selected": first if self.mode == 1 else last}
        metadata.set_sites(size, sites.contiguous(), nb)
        metadata.input_spatial_size = size_key(size)
        metadata.input_layer_rule = rule
        return SparseConvNetTensor(out, metadata, size)

    def input_spatial_size(self, out_size):
        return out_size

    def extra_repr(self):
        return f"dimension={self.dimension}, spatial_size={self.spatial_size.tolist()}, mode={self.mode}"


def _check_volume(batch_size: int, spatial_size: torch.Tensor, who: str):
    volume = batch_size
    for s in spatial_size.tolist():
        volume *= int(s)
    if volume >= 2 ** 62:
        raise ValueError(f"{who}: batch_size x prod(spatial_size) = {volume} does not fit the int64 site keys; "
                         "use a smaller spatial size")


def _split_coords(coords: torch.Tensor, d: int, who: str):
    if coords.shape[1] == d:
        return coords, torch.zeros(coords.shape[0], dtype=torch.long)
    batch = coords[:, d]
    if batch.numel() and int(batch.min()) < 0:
        raise ValueError(f"{who}: negative batch index {int(batch.min())} in the last column of coords")
    return coords[:, :d], batch


class OutputLayer(nn.Module):
    """Maps the sites of an InputLayer back to its input rows: ``[N_sites, C] -> [N_input, C]``.

    Modes 3/4: every input row gets its site's features; modes 1/2: the row that was kept gets them,
    the others 0; mode 0: identity. The input must be at the InputLayer's spatial size.
    """

    def __init__(self, dimension: int):
        super().__init__()
        self.dimension = int(dimension)

    def forward(self, input: SparseConvNetTensor) -> torch.Tensor:
        check_tensor(input, "OutputLayer", self.dimension)
        rule = input.metadata.input_layer_rule
        if rule is None:
            raise ValueError("OutputLayer: the metadata has no InputLayer rule; the network must start with "
                             "scn.InputLayer")
        _check_output_size(input, "OutputLayer")
        return _scatter_back(input.features, rule)

    def input_spatial_size(self, out_size):
        return out_size


def _check_output_size(input: SparseConvNetTensor, who: str):
    m = input.metadata
    if size_key(input.spatial_size) != m.input_spatial_size or input.features.shape[0] != m.n_active(
            m.input_spatial_size):
        raise ValueError(f"{who}: the input is at spatial size {list(size_key(input.spatial_size))} with "
                         f"{input.features.shape[0]} sites, but the input layer made {list(m.input_spatial_size)} "
                         "sites; upsample back to the input scale (Deconvolution/UnPooling) first")


class BLInputLayer(nn.Module):
    """Batch x length input: ``(coords [B, L, D] with -1 = empty, features [B, L, C])``.

    Rows whose first coordinate is negative are empty. Output rows: sample by sample, each in
    order of first appearance. ``mode``: see the module docstring (mode 1 keeps the last row,
    mode 2 the first, as SparseConvNet's BLInputLayer does).
    """

    def __init__(self, dimension: int, spatial_size, mode: int = 3):
        super().__init__()
        _check_mode(mode)
        self.dimension = int(dimension)
        self.spatial_size = to_long_tensor(self.dimension, spatial_size, "spatial_size")
        self.mode = mode

    def forward(self, input) -> SparseConvNetTensor:
        coords, features = input[0], input[1]
        who = f"BLInputLayer({self.dimension}, {list(size_key(self.spatial_size))}, mode={self.mode})"
        coords = torch.as_tensor(coords).detach().cpu().long()
        d = self.dimension
        if coords.dim() != 3 or coords.shape[2] != d:
            raise ValueError(f"{who}: coords must be [B, L, {d}], got shape {tuple(coords.shape)}")
        b, l = coords.shape[0], coords.shape[1]
        if features.dim() != 3 or features.shape[:2] != coords.shape[:2]:
            raise ValueError(f"{who}: features must be [B, L, C] = [{b}, {l}, C], got {tuple(features.shape)}")
        flat = coords.reshape(b * l, d)
        batch = torch.arange(b).repeat_interleave(l)
        fflat = features.reshape(b * l, features.shape[2])
        if self.mode == 0:
            present = torch.arange(b * l)
        else:
            present = torch.nonzero(flat[:, 0] >= 0).squeeze(1)
        spatial, pb = flat[present], batch[present]
        _check_coords(spatial, self.spatial_size, who)
        size = self.spatial_size.clone()
        keys = linear_keys(torch.cat([pb.view(-1, 1).long(), spatial.long()], 1), size.tolist())
        metadata = Metadata(d)
        if self.mode == 0:
            if torch.unique(keys).numel() != keys.numel():
                raise ValueError(f"{who}: duplicate sites within a sample but mode 0 promises unique coordinates")
            sites, out = torch.cat([pb[:, None], spatial], 1).int(), fflat
            rule = {"mode": 0, "n_input": b * l}
        else:
            row_of, first, last, counts = _group_rows(keys)
            keep = {1: last, 2: first}.get(self.mode)  # BLInputLayer: mode 1 keeps the last row, 2 the first
            sites = torch.cat([pb[first, None], spatial[first]], 1).int()
            if keep is not None:
                out = fflat[present[keep]]
                rule = {"mode": self.mode, "n_input": b * l, "selected": present[keep]}
            else:
                out = _reduce_rows(fflat[present], self.mode, row_of, first, last, counts)
                rule = {"mode": self.mode, "n_input": b * l, "present": present, "row_of": row_of}
        rule["bl_shape"] = (b, l)
        metadata.set_sites(size, sites.contiguous(), b)
        metadata.input_spatial_size = size_key(size)
        metadata.bl_layer_rule = rule
        return SparseConvNetTensor(out, metadata, size)

    def input_spatial_size(self, out_size):
        return out_size


class BLOutputLayer(nn.Module):
    """Inverse of :class:`BLInputLayer`: ``[N_sites, C] -> [B, L, C]`` (empty or dropped rows are 0)."""

    def __init__(self, dimension: int):
        super().__init__()
        self.dimension = int(dimension)

    def forward(self, input: SparseConvNetTensor) -> torch.Tensor:
        check_tensor(input, "BLOutputLayer", self.dimension)
        rule = input.metadata.bl_layer_rule
        if rule is None:
            raise ValueError("BLOutputLayer: the metadata has no BLInputLayer rule; the network must start with "
                             "scn.BLInputLayer")
        _check_output_size(input, "BLOutputLayer")
        b, l = rule["bl_shape"]
        f = input.features
        if rule["mode"] == 0:
            return f.reshape(b, l, f.shape[1])
        out = f.new_zeros((b * l, f.shape[1]))
        if rule["mode"] in (3, 4):
            out = out.index_copy(0, rule["present"].to(f.device), f[rule["row_of"].to(f.device)])
        else:
            out = out.index_copy(0, rule["selected"].to(f.device), f)
        return out.reshape(b, l, f.shape[1])

    def input_spatial_size(self, out_size):
        return out_size


class SparseToDense(nn.Module):
    """SparseConvNetTensor -> dense ``[B, nPlanes, *spatial_size]``."""

    def __init__(self, dimension: int, nPlanes: int):
        super().__init__()
        self.dimension = int(dimension)
        self.nPlanes = int(nPlanes)

    def forward(self, input: SparseConvNetTensor) -> torch.Tensor:
        check_tensor(input, "SparseToDense", self.dimension, self.nPlanes)
        return sparse_to_dense(input, self.nPlanes)

    def input_spatial_size(self, out_size):
        return out_size

    def extra_repr(self):
        return f"dimension={self.dimension}, nPlanes={self.nPlanes}"


class DenseToSparse(nn.Module):
    """Dense ``[B, C, *spatial]`` -> SparseConvNetTensor with fresh metadata; a site is active when
    any of its C values is non-zero. Rows are ordered by (batch, coordinates)."""

    def __init__(self, dimension: int):
        super().__init__()
        self.dimension = int(dimension)

    def forward(self, input: torch.Tensor) -> SparseConvNetTensor:
        if not isinstance(input, torch.Tensor) or input.dim() != self.dimension + 2:
            raise ValueError(f"DenseToSparse({self.dimension}) expects a dense [B, C, *spatial] tensor with "
                             f"{self.dimension} spatial dimensions, got "
                             f"{tuple(input.shape) if isinstance(input, torch.Tensor) else type(input)}")
        x = input.movedim(1, -1)
        mask = (x != 0).any(-1)
        nz = mask.nonzero()
        features = x[mask]
        size = torch.tensor(list(input.shape[2:]), dtype=torch.long)
        m = Metadata(self.dimension)
        m.set_sites(size, nz.cpu().int().contiguous(), input.shape[0])
        m.input_spatial_size = size_key(size)
        return SparseConvNetTensor(features, m, size)

    def input_spatial_size(self, out_size):
        return out_size


class InputBatch(SparseConvNetTensor):
    """Incremental input builder: a SparseConvNetTensor filled sample by sample.

    ``add_sample()`` starts a sample; ``set_location(location [D], vector [C], overwrite=False)`` and
    ``set_locations(locations [n, D] or [n, D + 1] (sample index last), vectors [n, C], overwrite)``
    add sites (an existing site keeps its first vector unless ``overwrite``). Coordinates must lie
    in ``[0, spatial_size)``.
    """

    def __init__(self, dimension: int, spatial_size):
        size = to_long_tensor(int(dimension), spatial_size, "spatial_size")
        super().__init__(None, Metadata(int(dimension)), size)
        self._feat_buf = torch.zeros((0, 0))
        self._site_buf = torch.zeros((0, int(dimension) + 1), dtype=torch.int32)
        self._n = 0
        self._rows = {}  # site key -> row
        self._sample = -1
        self.metadata.input_spatial_size = size_key(size)
        self._publish()

    # features is a view of a growing buffer --------------------------------
    @property
    def features(self):
        return self._feat_buf[:self._n]

    @features.setter
    def features(self, value):
        if value is None:
            return
        self._feat_buf = value
        self._n = value.shape[0]

    def _publish(self):
        """Expose the current sites to the metadata; rulebooks built on older sites are dropped."""
        m = self.metadata
        if m.rulebooks or m.submanifold_rulebooks or len(m.sites) > 1:
            m.rulebooks.clear()
            m.submanifold_rulebooks.clear()
            m.sites.clear()
        m.set_sites(self.spatial_size, self._site_buf[:self._n])
        m.batch_size = max(self._sample + 1, 0)

    def _reserve(self, extra: int, channels: int, dtype):
        """Room for ``extra`` more rows (the buffers double when full)."""
        if self._n == 0:
            self._feat_buf = self._feat_buf.new_zeros((self._feat_buf.shape[0], channels), dtype=dtype)
        elif self._feat_buf.shape[1] != channels:
            raise ValueError(f"InputBatch: feature vectors have {channels} planes, earlier ones had "
                             f"{self._feat_buf.shape[1]}")
        need = self._n + extra
        if need > self._feat_buf.shape[0] or need > self._site_buf.shape[0]:
            cap = max(need, 2 * self._feat_buf.shape[0], 64)
            fb = self._feat_buf.new_zeros((cap, channels))
            fb[:self._n] = self._feat_buf[:self._n]
            sb = torch.zeros((cap, self.metadata.dimension + 1), dtype=torch.int32)
            sb[:self._n] = self._site_buf[:self._n]
            self._feat_buf, self._site_buf = fb, sb

    def add_sample(self):
        """Start a new sample; later ``set_location(s)`` calls with D coordinates go into it."""
        self._sample += 1
        self._publish()

    def _add(self, coords: torch.Tensor, batch: torch.Tensor, vectors: torch.Tensor, overwrite: bool):
        _check_coords(coords, self.spatial_size, "InputBatch.set_location(s)")
        if vectors.dim() != 2 or vectors.shape[0] != coords.shape[0]:
            raise ValueError(f"InputBatch: need one feature vector per location, got {tuple(vectors.shape)} for "
                             f"{coords.shape[0]} locations")
        self._reserve(coords.shape[0], vectors.shape[1], vectors.dtype)
        keys = linear_keys(torch.cat([batch.view(-1, 1).long(), coords.long()], 1),
                           self.spatial_size.tolist()).tolist()
        vecs = vectors.detach()
        new_rows, new_src, upd_rows, upd_src = [], [], [], []
        n = self._n
        for i, k in enumerate(keys):
            row = self._rows.get(k)
            if row is None:
                self._rows[k] = n
                new_rows.append(n)
                new_src.append(i)
                n += 1
            elif overwrite:
                upd_rows.append(row)
                upd_src.append(i)
        if new_src:
            src = torch.tensor(new_src)
            rows = torch.tensor(new_rows)
            self._feat_buf[rows] = vecs[src].to(self._feat_buf.dtype)
            self._site_buf[rows, 0] = batch[src].int()
            self._site_buf[rows, 1:] = coords[src].int()
        if upd_src:
            self._feat_buf[torch.tensor(upd_rows)] = vecs[torch.tensor(upd_src)].to(self._feat_buf.dtype)
        self._n = n
        self._sample = max(self._sample, int(batch.max()) if batch.numel() else -1)
        self._publish()

    def set_location(self, location, vector, overwrite: bool = False):
        """Add one site ``location [D]`` with feature ``vector [C]`` to the current sample."""
        if self._sample < 0:
            raise ValueError("InputBatch: call add_sample() before set_location()")
        loc = torch.as_tensor(location).long().reshape(1, -1)
        if loc.shape[1] != self.metadata.dimension:
            raise ValueError(f"InputBatch.set_location: location must have {self.metadata.dimension} coordinates, "
                             f"got {loc.shape[1]}")
        vec = torch.as_tensor(vector).reshape(1, -1)
        self._add(loc, torch.tensor([self._sample]), vec, bool(overwrite))

    def set_location_(self, location, vector, overwrite: bool = False):
        self.set_location(location, vector, overwrite)

    def set_locations(self, locations, vectors, overwrite: bool = False):
        """Add sites: ``locations [n, D]`` (current sample) or ``[n, D + 1]`` (sample index last)."""
        locs = torch.as_tensor(locations).long()
        d = self.metadata.dimension
        if locs.dim() != 2 or locs.shape[1] not in (d, d + 1):
            raise ValueError(f"InputBatch.set_locations: locations must be [n, {d}] or [n, {d + 1}], got "
                             f"{tuple(locs.shape)}")
        if locs.shape[1] == d:
            if self._sample < 0:
                raise ValueError("InputBatch: call add_sample() before set_locations() with [n, D] locations")
            batch = torch.full((locs.shape[0],), self._sample, dtype=torch.long)
        else:
            batch = locs[:, d]
            if batch.numel() and int(batch.min()) < 0:
                raise ValueError("InputBatch.set_locations: negative sample index in the last column")
        self._add(locs[:, :d], batch, torch.as_tensor(vectors), bool(overwrite))

    def set_locations_(self, locations, vectors, overwrite: bool = False):
        self.set_locations(locations, vectors, overwrite)

    def add_sample_from_tensor(self, tensor: torch.Tensor, offset, threshold: float = 0):
        """New sample from a dense ``[*size, C]`` tensor placed at ``offset``: sites where some
        ``|value| > threshold`` (and inside the spatial size)."""
        d = self.metadata.dimension
        tensor = torch.as_tensor(tensor)
        if tensor.dim() != d + 1:
            raise ValueError(f"InputBatch.add_sample_from_tensor: tensor must be [*size ({d} dims), C], got "
                             f"{tuple(tensor.shape)}")
        off = to_long_tensor(d, offset, "offset")
        self.add_sample()
        active = (tensor.abs() > threshold).any(-1)
        pos = active.nonzero()
        coords = pos + off
        inside = ((coords >= 0) & (coords < self.spatial_size)).all(1)
        pos, coords = pos[inside], coords[inside]
        vecs = tensor[tuple(pos.t())] if pos.shape[0] else tensor.new_zeros((0, tensor.shape[-1]))
        self._add(coords, torch.full((coords.shape[0],), self._sample, dtype=torch.long), vecs, False)

    def precompute_metadata(self, size: int):
        """Build rulebooks ahead of the network (e.g. in DataLoader workers): ``size=3`` for 3x3
        submanifold convs with 3/2 pooling or convolutions, ``size=2`` for 3x3 submanifold with 2/2."""
        if size not in (2, 3):
            raise ValueError(f"precompute_metadata: size must be 2 or 3, got {size}")
        m = self.metadata
        cur = self.spatial_size.clone()
        three = torch.full_like(cur, 3)
        two = torch.full_like(cur, 2)
        while True:
            m.submanifold_rulebook(cur, three)
            if size == 3:
                if bool((cur < 3).any()) or bool((cur % 2 != 1).any()):
                    return
                nxt = (cur - 1) // 2
                m.rulebook(cur, nxt, three, two, "precompute_metadata")
            else:
                if bool((cur < 2).any()) or bool((cur % 2 != 0).any()):
                    return
                nxt = cur // 2
                m.rulebook(cur, nxt, two, two, "precompute_metadata")
            cur = nxt

    # SparseConvNet's deprecated camelCase names
    addSample = add_sample
    setLocation = set_location
    setLocation_ = set_location_
    setLocations = set_locations
    setLocations_ = set_locations_
    addSampleFromTensor = add_sample_from_tensor
    precomputeMetadata = precompute_metadata
