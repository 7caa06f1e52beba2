"""Block-sparse ops without autograd: argument checks, block geometry and the gather/scatter kernels.

Everything here is vectorised PyTorch (``index_select``, ``index_add_``, ``index_copy_``, advanced
indexing, ``scatter_reduce_``) and deterministic. The kernels work on a channels-last view
``[N, H, W, C]`` of the dense tensor: a block
pixel is then one contiguous run of C values, and blocks gathered from a channels-last (or NHWC)
tensor come out as ``[M, bh, bw, C]`` rows that a conv reads as channels-last ``[M, C, bh, bw]``
without a copy.

Block ``m = (n, bh, bw)`` of a geometry ``(bsize, boffset, bstride)`` covers rows
``boffset[0] + bh * bstride[0] + [0, bsize[0])`` and columns likewise, of image ``n``. Pixels outside
the image read as zero (gather) and are dropped (scatter).
"""
from __future__ import annotations

import math
import operator
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

IntPair = Union[int, Sequence[int], torch.Tensor]
LAYOUTS = ("NCHW", "NHWC")


class BlockGeometry(NamedTuple):
    """Block size, offset of block (0, 0) and stride between blocks, each (h, w)."""
    bsize: Tuple[int, int]
    boffset: Tuple[int, int]
    bstride: Tuple[int, int]


# ----------------------------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------------------------
def to_pair(value: IntPair, name: str, minimum: Optional[int] = 1) -> Tuple[int, int]:
    """An int or a pair of ints (list, tuple, 1- or 2-element integer tensor) -> (h, w); ValueError
    otherwise."""
    bad = f"{name} must be an int or a pair of ints (h, w), got {value!r}"
    if isinstance(value, torch.Tensor):
        if value.numel() not in (1, 2) or value.is_floating_point() or value.is_complex():
            raise ValueError(bad)
        value = value.reshape(-1).tolist()
        value = value * 2 if len(value) == 1 else value
    if isinstance(value, bool):
        raise ValueError(bad)
    try:
        pair = (operator.index(value),) * 2
    except TypeError:
        try:
            items = tuple(value)
        except TypeError:
            raise ValueError(bad) from None
        if len(items) != 2 or any(isinstance(v, bool) for v in items):
            raise ValueError(bad)
        try:
            pair = tuple(operator.index(v) for v in items)
        except TypeError:
            raise ValueError(bad) from None
    if minimum is not None and min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum} in both dims, got {pair}")
    return pair


def make_geometry(bsize: IntPair, boffset: IntPair, bstride: IntPair) -> BlockGeometry:
    return BlockGeometry(to_pair(bsize, "bsize"), to_pair(boffset, "boffset", minimum=None),
                         to_pair(bstride, "bstride"))


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'NCHW' or 'NHWC', got {layout!r}")
    return layout


def check_dense(x, name: str, layout: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D ({layout}: "
                         f"{'[N, C, H, W]' if layout == 'NCHW' else '[N, H, W, C]'}), got shape {tuple(x.shape)}")
    if not (x.is_floating_point() or x.is_complex()):
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}; convert it with .float()")


def check_block_fits(geom: BlockGeometry, H: int, W: int, what: str) -> None:
    """A block may not be larger than the image plus -boffset of zero padding on each side."""
    for d, (size, off, extent) in enumerate(zip(geom.bsize, geom.boffset, (H, W))):
        limit = extent + 2 * max(0, -off)
        if size > limit:
            raise ValueError(
                f"bsize {geom.bsize} is larger than the {what} ({H}, {W}) plus the padding implied by "
                f"boffset {geom.boffset} (at most {limit} along {'HW'[d]}); use a smaller block size, e.g. "
                f"from calc_block_params")


class IndexInfo(NamedTuple):
    """Checked block indices: int64 [M, 3] and their per-column min/max (None when M == 0)."""
    idx: torch.Tensor
    lo: Optional[list]
    hi: Optional[list]


def index_info(indices, name: str = "indices") -> IndexInfo:
    """Checks what does not depend on the geometry (type, dtype, shape [M, 3], >= 0, no duplicates)."""
    if not isinstance(indices, torch.Tensor):
        raise ValueError(f"{name} must be an integer tensor [M, 3] of (n, bh, bw) rows as returned by "
                         f"reduce_mask, got {type(indices).__name__}")
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise ValueError(f"{name} must have an integer dtype (int16/int32/int64), got {indices.dtype}")
    if indices.dim() != 2 or indices.shape[1] != 3:
        raise ValueError(f"{name} must have shape [M, 3] (rows (n, bh, bw)), got {tuple(indices.shape)}")
    idx = indices.long()
    if idx.shape[0] == 0:
        return IndexInfo(idx, None, None)
    lo, hi = idx.amin(0).tolist(), idx.amax(0).tolist()
    if min(lo) < 0:
        raise ValueError(f"{name} must be >= 0, got min (n, bh, bw) = {tuple(lo)}")
    # reduce_mask returns row-major sorted indices; only unsorted input pays for torch.unique
    key = (idx[:, 0] * (hi[1] + 1) + idx[:, 1]) * (hi[2] + 1) + idx[:, 2]
    if idx.shape[0] > 1 and not bool((key[1:] > key[:-1]).all()):
        if torch.unique(key).numel() != key.numel():
            raise ValueError(f"{name} contains duplicate blocks; each (n, bh, bw) may appear once")
    return IndexInfo(idx, lo, hi)


def check_index_range(info: IndexInfo, N: int, geom: BlockGeometry, H: int, W: int,
                      name: str = "indices") -> None:
    """Every block must belong to one of the N images and overlap its H x W area."""
    if info.lo is None:
        return
    lo, hi = info.lo, info.hi
    if hi[0] >= N:
        raise ValueError(f"{name}: batch index out of range [0, {N}) (max {hi[0]}); indices must come "
                         f"from a mask with the same batch size as the input")
    for d, (bmin, bmax, extent) in enumerate(((lo[1], hi[1], H), (lo[2], hi[2], W))):
        start_max = geom.boffset[d] + bmax * geom.bstride[d]
        end_min = geom.boffset[d] + bmin * geom.bstride[d] + geom.bsize[d]
        if start_max >= extent or end_min <= 0:
            axis = "bh" if d == 0 else "bw"
            raise ValueError(
                f"{name}: block {axis} range [{bmin}, {bmax}] lies (partly) outside the image: with "
                f"bsize {geom.bsize}, boffset {geom.boffset}, bstride {geom.bstride} a block must overlap "
                f"the {H}x{W} image; compute indices with reduce_mask on a mask of the same size and the "
                f"same block parameters")


def check_indices(indices, N: int, geom: BlockGeometry, H: int, W: int, name: str = "indices") -> IndexInfo:
    """index_info + check_index_range; the input is never modified."""
    info = index_info(indices, name)
    check_index_range(info, N, geom, H, W, name)
    return info


# ----------------------------------------------------------------------------------------------
# reduce_mask
# ----------------------------------------------------------------------------------------------
def default_bcount(geom: BlockGeometry, H: int, W: int) -> Tuple[int, int]:
    """Number of blocks whose start lies inside the image (covers it when bstride <= bsize)."""
    return tuple(max(1, math.ceil((extent - off) / s)) if extent > off else 1
                 for extent, off, s in zip((H, W), geom.boffset, geom.bstride))


def reduce_mask(mask: torch.Tensor, bcount: Tuple[int, int], geom: BlockGeometry, tol: float,
                avgpool: bool) -> torch.Tensor:
    """mask [N, H, W] -> int64 [M, 3] active (n, bh, bw), row-major order.

    Active: max over the block's in-image pixels > tol, or (avgpool) sum / (bsize_h * bsize_w) > tol.
    """
    N, H, W = mask.shape
    m = mask if mask.is_floating_point() else mask.float()
    # Crop / pad so that the grid of bcount blocks tiles the tensor exactly; padding never wins a max
    # and adds zero to a sum.
    need = [off + (cnt - 1) * s + size for off, cnt, s, size in zip(geom.boffset, bcount, geom.bstride, geom.bsize)]
    pads = [max(0, -geom.boffset[1]), max(0, need[1] - W), max(0, -geom.boffset[0]), max(0, need[0] - H)]
    fill = 0.0 if avgpool else float("-inf")
    m = m[:, max(0, geom.boffset[0]):, max(0, geom.boffset[1]):]
    if any(pads):
        m = F.pad(m, pads, value=fill)
    # separable pooling over strided windows (unfold views, no copies): rows, then columns
    (sh, sw), (th, tw) = geom.bsize, geom.bstride
    if avgpool:
        pooled = m.unfold(1, sh, th).sum(-1).unfold(2, sw, tw).sum(-1) / (sh * sw)
    else:
        pooled = m.unfold(1, sh, th).amax(-1).unfold(2, sw, tw).amax(-1)
    return torch.nonzero(pooled[:, :bcount[0], :bcount[1]] > tol)


# ----------------------------------------------------------------------------------------------
# block plans: per-block coordinates, which blocks cross the border, which ones overlap
# ----------------------------------------------------------------------------------------------
class BlockPlan:
    """Coordinates of M blocks of one geometry on an N x H x W grid (all int64).

    n3 [M, 1, 1], rows3 [M, bh, 1], cols3 [M, 1, bw]: broadcasting index tensors for an [N, H, W, C]
    view. ``border`` holds the ids of blocks that cross the image border (empty when none does).
    """

    def __init__(self, info: IndexInfo, geom: BlockGeometry, N: int, H: int, W: int, exact_bounds: bool = True):
        idx = info.idx
        self.idx, self.geom, self.N, self.H, self.W = idx, geom, N, H, W
        self.lo, self.hi = info.lo, info.hi
        (sh, sw), (oh, ow), (th, tw) = geom.bsize, geom.boffset, geom.bstride
        self.overlapping = sh > th or sw > tw
        self._cache = {}
        # Does a block cross the border? The bounds (min/max bh, bw) are attained by actual blocks, so
        # they decide it exactly without touching the tensors (subsets only get an upper bound).
        lo, hi = info.lo, info.hi
        crosses = lo is not None and (oh + lo[1] * th < 0 or oh + hi[1] * th + sh > H or
                                      ow + lo[2] * tw < 0 or ow + hi[2] * tw + sw > W)
        self.has_border = crosses
        if crosses and not exact_bounds:
            self.has_border = self.border.numel() > 0

    @property
    def M(self) -> int:
        return self.idx.shape[0]

    def _cached(self, key, fn):
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    @property
    def rows(self) -> torch.Tensor:
        """int64 [M, bh]: image rows of the blocks' pixel rows (may lie outside the image)."""
        g = self.geom
        return self._cached("rows", lambda: (g.boffset[0] + self.idx[:, 1:2] * g.bstride[0])
                            + torch.arange(g.bsize[0], device=self.idx.device))

    @property
    def cols(self) -> torch.Tensor:
        g = self.geom
        return self._cached("cols", lambda: (g.boffset[1] + self.idx[:, 2:3] * g.bstride[1])
                            + torch.arange(g.bsize[1], device=self.idx.device))

    @property
    def n3(self) -> torch.Tensor:
        return self.idx[:, 0].view(-1, 1, 1)

    @property
    def rows3(self) -> torch.Tensor:
        return self.rows[:, :, None]

    @property
    def cols3(self) -> torch.Tensor:
        return self.cols[:, None, :]

    @property
    def border(self) -> torch.Tensor:
        """int64 ids of the blocks that cross the image border."""
        def make():
            if not self.has_border:
                return self.idx.new_zeros(0)
            (sh, sw), (oh, ow), (th, tw) = self.geom.bsize, self.geom.boffset, self.geom.bstride
            r0 = oh + self.idx[:, 1] * th
            c0 = ow + self.idx[:, 2] * tw
            inside = (r0 >= 0) & (r0 + sh <= self.H) & (c0 >= 0) & (c0 + sw <= self.W)
            return torch.nonzero(~inside).view(-1)
        return self._cached("border", make)

    def clamped(self):
        """(n3, rows3, cols3) with coordinates clamped into the image."""
        if not self.has_border:
            return self.n3, self.rows3, self.cols3
        return self.n3, self.rows3.clamp(0, self.H - 1), self.cols3.clamp(0, self.W - 1)

    def valid(self) -> torch.Tensor:
        """bool [M, bh, bw]: block pixels inside the image."""
        def make():
            vr = (self.rows >= 0) & (self.rows < self.H)
            vc = (self.cols >= 0) & (self.cols < self.W)
            return vr[:, :, None] & vc[:, None, :]
        return self._cached("valid", make)

    def pixel_index(self) -> torch.Tensor:
        """int64 [M * bh * bw]: row of each block pixel in the [N * H * W, C] pixel matrix (pixels
        outside the image get the clamped pixel's row: gather zero-fills them, scatter skips them)."""
        def make():
            n, r, c = self.clamped()
            pix = r * self.W + c if self.N == 1 else (n * self.H + r) * self.W + c
            return pix.reshape(-1)
        return self._cached("pixel_index", make)

    def invalid_positions(self) -> torch.Tensor:
        """int64 [P'']: flat positions (m * bh * bw + i * bw + j) of block pixels outside the image."""
        return self._cached("invalid", lambda: torch.nonzero(~self.valid().view(-1)).view(-1))

    def valid_positions(self) -> torch.Tensor:
        """int64 [P']: flat positions of the block pixels inside the image."""
        return self._cached("valid_pos", lambda: torch.nonzero(self.valid().view(-1)).view(-1))

    def subset(self, ids: torch.Tensor) -> "BlockPlan":
        """Plan of blocks ``ids`` (the parent's index bounds still bound them)."""
        return BlockPlan(IndexInfo(self.idx[ids], self.lo, self.hi), self.geom, self.N, self.H, self.W,
                         exact_bounds=False)

    def num_groups(self) -> int:
        (sh, sw), (th, tw) = self.geom.bsize, self.geom.bstride
        return -(-sh // th) * -(-sw // tw)

    def groups(self):
        """Splits the blocks into groups whose members never overlap: block (bh, bw) goes to group
        (bh mod gh, bw mod gw) with g = ceil(bsize / bstride). Yields (ids or None for all, plan)."""
        (sh, sw), (th, tw) = self.geom.bsize, self.geom.bstride
        gh, gw = -(-sh // th), -(-sw // tw)
        if gh * gw == 1:
            yield None, self
            return
        key = (self.idx[:, 1] % gh) * gw + self.idx[:, 2] % gw
        for g in range(gh * gw):
            ids = torch.nonzero(key == g).view(-1)
            if ids.numel():
                yield ids, self.subset(ids)

    def flat_valid(self, ids: Optional[torch.Tensor] = None):
        """For blocks ``ids`` (all if None): in-image pixels as 1-D (m, i, j, n, r, c)."""
        if ids is None:
            m, i, j = torch.nonzero(self.valid(), as_tuple=True)
        else:
            k, i, j = torch.nonzero(self.valid()[ids], as_tuple=True)
            m = ids[k]
        return m, i, j, self.idx[m, 0], self.rows[m, i], self.cols[m, j]


def winner_map(plan: BlockPlan) -> torch.Tensor:
    """int64 [N, H, W]: id of the last block (in index order) covering each pixel, -1 if none."""
    stamp = torch.full((plan.N * plan.H * plan.W,), -1, dtype=torch.long, device=plan.idx.device)
    if plan.M:
        m, _, _, n, r, c = plan.flat_valid()
        stamp.scatter_reduce_(0, (n * plan.H + r) * plan.W + c, m, "amax")
    return stamp.view(plan.N, plan.H, plan.W)


def winner_mask(plan: BlockPlan, winners: torch.Tensor) -> torch.Tensor:
    """bool [M, bh, bw, 1]: block pixels that won the write (inside the image and last writer)."""
    n, r, c = plan.clamped()
    ids = torch.arange(plan.M, device=n.device).view(-1, 1, 1)
    vr = (plan.rows3 >= 0) & (plan.rows3 < plan.H)
    vc = (plan.cols3 >= 0) & (plan.cols3 < plan.W)
    return ((winners[n, r, c] == ids) & vr & vc).unsqueeze(-1)


# ----------------------------------------------------------------------------------------------
# gather / scatter kernels on [N, H, W, C] views
#
# Fast path (the dense tensor is NHWC-contiguous, e.g. a channels-last NCHW tensor): the dense tensor
# is a [N*H*W, C] pixel matrix and blocks are [M*bh*bw, C]; gather is index_select, scatter-add is
# index_add_ (sequential over pixels on the CPU: deterministic, overlaps summed in index order),
# overwrite is index_copy_ on distinct pixels. Otherwise: advanced indexing on the 4-D view.
# ----------------------------------------------------------------------------------------------
def _pixel_matrix(t: torch.Tensor) -> Optional[torch.Tensor]:
    """[N*H*W, C] view of an NHWC-contiguous [N, H, W, C] tensor, else None."""
    return t.view(-1, t.shape[-1]) if t.is_contiguous() else None


def gather_nhwc(xv: torch.Tensor, plan: BlockPlan) -> torch.Tensor:
    """xv [N, H, W, C] -> blocks [M, bh, bw, C] (contiguous); out-of-image pixels are zero."""
    pix = _pixel_matrix(xv)
    if pix is not None:
        out = pix.index_select(0, plan.pixel_index()).view(plan.M, *plan.geom.bsize, xv.shape[-1])
    else:
        out = xv[plan.clamped()]
    if plan.has_border:
        out.view(-1, out.shape[-1]).index_fill_(0, plan.invalid_positions(), 0)
    return out


def _write(yv: torch.Tensor, index, values, add: bool) -> None:
    """yv[index] (+)= values, for an index whose targets are all distinct."""
    if add:
        values = yv[index] + values
    yv.index_put_(index, values)


def _scatter_disjoint_(yv: torch.Tensor, blocks: Optional[torch.Tensor], plan: BlockPlan, add: bool) -> None:
    """Advanced-indexing scatter of blocks that cover distinct pixels; blocks=None writes zeros."""
    zero = yv.new_zeros(())
    if not plan.has_border:
        _write(yv, (plan.n3, plan.rows3, plan.cols3), blocks if blocks is not None else zero, add)
        return
    inner = torch.ones(plan.M, dtype=torch.bool, device=plan.idx.device)
    inner[plan.border] = False
    inner = torch.nonzero(inner).view(-1)
    if inner.numel():
        index = (plan.n3[inner], plan.rows3[inner], plan.cols3[inner])
        _write(yv, index, blocks[inner] if blocks is not None else zero, add)
    m, i, j, n, r, c = plan.flat_valid(plan.border)
    _write(yv, (n, r, c), blocks[m, i, j] if blocks is not None else zero, add)


def _scatter_rows_(pix: torch.Tensor, blocks: Optional[torch.Tensor], plan: BlockPlan, add: bool,
                   keep: Optional[torch.Tensor]) -> None:
    """Fast-path scatter into the pixel matrix pix [N*H*W, C]; ``keep``: block-pixel positions to
    write (in-image, and winners for overlapping overwrites), None for all."""
    target = plan.pixel_index()
    src = blocks.reshape(-1, pix.shape[1]) if blocks is not None else None
    if keep is not None:
        target = target[keep]
        src = src.index_select(0, keep) if src is not None else None
    if src is None:
        pix.index_fill_(0, target, 0)
    elif add:
        pix.index_add_(0, target, src)
    else:
        pix.index_copy_(0, target, src)


def scatter_nhwc_(yv: torch.Tensor, blocks: Optional[torch.Tensor], plan: BlockPlan, add: bool,
                  winners: Optional[torch.Tensor] = None) -> None:
    """In place: yv [N, H, W, C] gets blocks [M, bh, bw, C] written (add=False) or added (add=True).

    Out-of-image block pixels are dropped. Overlapping blocks: with add, all contributions are summed
    (deterministically); without add, the block that comes last in ``indices`` wins (``winners`` =
    winner_map(plan), computed here if not given). blocks=None writes zeros.
    """
    if plan.M == 0 or (add and blocks is None):
        return
    overwrite_overlap = not add and plan.overlapping
    if overwrite_overlap and winners is None:
        winners = winner_map(plan)
    pix = _pixel_matrix(yv)
    if pix is not None:
        keep = plan.valid_positions() if plan.has_border else None
        if overwrite_overlap:
            won = winner_mask(plan, winners).view(-1)
            keep = torch.nonzero(won).view(-1)  # winners are in-image by construction
        _scatter_rows_(pix, blocks, plan, add, keep)
    elif not plan.overlapping:
        _scatter_disjoint_(yv, blocks, plan, add)
    elif add and plan.num_groups() <= MAX_GROUPS:
        for ids, sub in plan.groups():  # members of a group never overlap
            _scatter_disjoint_(yv, blocks if ids is None else blocks[ids], sub, add)
    elif add:
        acc = yv.new_zeros(plan.N * plan.H * plan.W, yv.shape[-1])
        _scatter_rows_(acc, blocks, plan, True, plan.valid_positions() if plan.has_border else None)
        yv.add_(acc.view(yv.shape))
    else:
        m, i, j, n, r, c = plan.flat_valid()
        keep = winners[n, r, c] == m
        m, i, j, n, r, c = (t[keep] for t in (m, i, j, n, r, c))
        _write(yv, (n, r, c), blocks[m, i, j] if blocks is not None else yv.new_zeros(()), False)


MAX_GROUPS = 16  # strided fallback: above this many overlap groups, accumulate in a dense buffer
