"""Public block-sparse ops (reduce_mask, sparse_gather, sparse_scatter, sparse_scatter_) and their
autograd Functions, on top of ``spconv.sbnet.block_geometry``.

Layouts: ``layout="NCHW"`` means the dense tensor is ``[N, C, H, W]`` and blocks are ``[M, C, bh, bw]``;
``layout="NHWC"`` means ``[N, H, W, C]`` and ``[M, bh, bw, C]``. ``transpose=True`` gives (gather) or
takes (scatter) blocks in the *other* layout, so SBNet's NHWC-input / NCHW-blocks ops are
``layout="NHWC", transpose=True``.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import NamedTuple, Optional

import torch
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from spconv.sbnet import block_geometry as geometry
from spconv.sbnet.block_geometry import BlockPlan, IntPair


class ReduceMaskResult(NamedTuple):
    """indices: int32 [count, 3] rows (n, bh, bw) in row-major order; count: number of active blocks."""
    indices: torch.Tensor
    count: int


def _nhwc(t: torch.Tensor, nchw: bool) -> torch.Tensor:
    """View of a 4-D tensor as [*, H, W, C] (no copy)."""
    return t.permute(0, 2, 3, 1) if nchw else t


def _from_nhwc(t: torch.Tensor, nchw: bool) -> torch.Tensor:
    return t.permute(0, 3, 1, 2) if nchw else t


def _hw(t: torch.Tensor, layout: str):
    return (t.shape[2], t.shape[3]) if layout == "NCHW" else (t.shape[1], t.shape[2])


def _channels(t: torch.Tensor, layout: str) -> int:
    return t.shape[1] if layout == "NCHW" else t.shape[3]


# ----------------------------------------------------------------------------------------------
# validated block plans, cached per indices tensor
# ----------------------------------------------------------------------------------------------
_CACHE: "OrderedDict[int, tuple]" = OrderedDict()  # id(indices) -> (weakref, version, IndexInfo, plans)
_CACHE_SIZE = 16


def block_plan(indices: torch.Tensor, geom: geometry.BlockGeometry, N: int, H: int, W: int) -> BlockPlan:
    """Checks ``indices`` against the geometry and image size and returns their BlockPlan.

    The layers of a network usually share one indices tensor: its checks and plans are cached as long
    as the same tensor is passed unmodified (keyed by identity and version counter).
    """
    key = id(indices)
    hit = _CACHE.get(key)
    if hit is None or hit[0]() is not indices or hit[1] != indices._version:
        info = geometry.index_info(indices)
        hit = (weakref.ref(indices), indices._version, info, {})
        _CACHE[key] = hit
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    _CACHE.move_to_end(key)
    info, plans = hit[2], hit[3]
    plan = plans.get((geom, N, H, W))
    if plan is None:
        geometry.check_index_range(info, N, geom, H, W)
        plan = plans[(geom, N, H, W)] = BlockPlan(info, geom, N, H, W)
    return plan


def _plan_on(dense: torch.Tensor, name: str, indices, geom, N: int, H: int, W: int) -> BlockPlan:
    plan = block_plan(indices, geom, N, H, W)
    if plan.idx.device != dense.device:
        raise ValueError(f"indices are on {plan.idx.device} but {name} is on {dense.device}; move them with "
                         f"indices.to({name}.device)")
    return plan


# ----------------------------------------------------------------------------------------------
# reduce_mask
# ----------------------------------------------------------------------------------------------
def reduce_mask(mask: torch.Tensor, bcount: Optional[IntPair], bsize: IntPair, boffset: IntPair = 0,
                bstride: Optional[IntPair] = None, tol: float = 0.0, avgpool: bool = False) -> ReduceMaskResult:
    """Active blocks of a mask.

    Args:
        mask: [N, H, W] or [N, 1, H, W], any real dtype (bool/int are read as 0/1).
        bcount: (BCH, BCW) blocks per image, or None for every block that starts inside the image.
        bsize, boffset, bstride: block geometry (int or (h, w)); block (bh, bw) covers rows
            ``boffset[0] + bh * bstride[0] + [0, bsize[0])``, columns likewise. bstride defaults to bsize.
        tol: a block is active when max(mask over its in-image pixels) > tol, or with ``avgpool``
            when sum(mask over the block) / (bsize[0] * bsize[1]) > tol (out-of-image pixels count as 0).

    Returns:
        ReduceMaskResult(indices int32 [count, 3] of (n, bh, bw), row-major; count). An all-zero mask
        gives count 0 and indices [0, 3] (SBNet returned one dummy block (0, 0, 0) instead).
    """
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask must be a torch.Tensor [N, H, W] or [N, 1, H, W], got {type(mask).__name__}")
    if mask.dim() == 4:
        if mask.shape[1] != 1:
            raise ValueError(f"mask must be [N, H, W] or [N, 1, H, W], got shape {tuple(mask.shape)}; "
                             f"reduce a multi-channel mask first, e.g. mask.amax(1)")
        mask = mask[:, 0]
    elif mask.dim() != 3:
        raise ValueError(f"mask must be [N, H, W] or [N, 1, H, W], got shape {tuple(mask.shape)}; "
                         f"add a batch dimension with mask[None] for a single [H, W] mask")
    if mask.is_complex():
        raise ValueError(f"mask must be real, got {mask.dtype}")
    N, H, W = mask.shape
    if bstride is None:
        bstride = bsize
    geom = geometry.make_geometry(bsize, boffset, bstride)
    if H == 0 or W == 0:
        raise ValueError(f"mask must have a non-empty spatial size, got {tuple(mask.shape)}")
    geometry.check_block_fits(geom, H, W, "mask")
    if bcount is None:
        bcount = geometry.default_bcount(geom, H, W)
    bcount = geometry.to_pair(bcount, "bcount")
    for d, (cnt, extent) in enumerate(zip(bcount, (H, W))):
        off, s, size = geom.boffset[d], geom.bstride[d], geom.bsize[d]
        if off + (cnt - 1) * s >= extent or off + size <= 0:
            raise ValueError(f"bcount {bcount} with bsize {geom.bsize}, boffset {geom.boffset}, bstride "
                             f"{geom.bstride} puts blocks entirely outside the {H}x{W} mask along "
                             f"{'HW'[d]}; use bcount=None or calc_block_params to get a consistent grid")
    tol = float(tol)
    idx = geometry.reduce_mask(mask, bcount, geom, tol, bool(avgpool))
    return ReduceMaskResult(idx.to(torch.int32), int(idx.shape[0]))


# ----------------------------------------------------------------------------------------------
# autograd Functions
# ----------------------------------------------------------------------------------------------
class SparseGatherFunction(Function):
    """blocks = gather(x); grad_x = scatter-add of grad_blocks into zeros (overlaps summed).

    forward(x [N, H, W, C] view, plan) -> blocks [M, bh, bw, C]
    """

    @staticmethod
    def forward(ctx, xv, plan: BlockPlan):
        ctx.plan = plan
        ctx.x_shape = xv.shape
        return geometry.gather_nhwc(xv, plan)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_blocks):
        grad_x = grad_blocks.new_zeros(ctx.x_shape)
        geometry.scatter_nhwc_(grad_x, grad_blocks, ctx.plan, add=True)
        return grad_x, None


class SparseScatterFunction(Function):
    """y = ybase with blocks written (add=False) or added (add=True), out of place or in place.

    forward(yv [N, H, W, C] view, blocks [M, bh, bw, C], plan, add, inplace) -> y [N, H, W, C]
    (the base comes first: autograd's in-place-on-a-view machinery expects the modified tensor there)
    Gradients: grad_blocks = gather(grad_y) (zero where another block won an overlapping write);
    grad_ybase = grad_y (add) or grad_y with the covered pixels zeroed (overwrite).
    """

    @staticmethod
    def forward(ctx, yv, blocks, plan: BlockPlan, add: bool, inplace: bool):
        winners = None
        if not add and plan.overlapping and plan.M:
            winners = geometry.winner_map(plan)
        if inplace:
            y = yv
            ctx.mark_dirty(yv)
        else:
            y = yv.clone()
        geometry.scatter_nhwc_(y, blocks, plan, add, winners)
        ctx.plan, ctx.add, ctx.winners = plan, add, winners
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        plan = ctx.plan
        grad_blocks = grad_ybase = None
        if ctx.needs_input_grad[1]:
            grad_blocks = geometry.gather_nhwc(grad_y, plan)
            if ctx.winners is not None:
                grad_blocks = grad_blocks * geometry.winner_mask(plan, ctx.winners)
        if ctx.needs_input_grad[0]:
            if ctx.add:
                grad_ybase = grad_y
            else:
                grad_ybase = grad_y.clone()
                geometry.scatter_nhwc_(grad_ybase, None, plan, add=False, winners=ctx.winners)
        return grad_ybase, grad_blocks, None, None, None


# ----------------------------------------------------------------------------------------------
# public ops
# ----------------------------------------------------------------------------------------------
def sparse_gather(x: torch.Tensor, indices: torch.Tensor, bsize: IntPair, boffset: IntPair = 0,
                  bstride: Optional[IntPair] = None, transpose: bool = False, layout: str = "NCHW") -> torch.Tensor:
    """Stack of blocks of ``x``; pixels outside the image are zero. Differentiable in x.

    Args:
        x: [N, C, H, W] (layout "NCHW") or [N, H, W, C] (layout "NHWC"), floating point.
        indices: integer [M, 3] rows (n, bh, bw), e.g. ``reduce_mask(...).indices``.
        bsize, boffset, bstride: block geometry (int or (h, w)); bstride defaults to bsize.
        transpose: return blocks in the other layout (SBNet's NHWC -> NCHW is layout="NHWC", transpose=True).

    Returns:
        [M, C, bh, bw] or [M, bh, bw, C] (see ``layout``/``transpose``). The result is an NHWC-ordered
        buffer: as [M, C, bh, bw] it is channels-last, the fast memory format for CPU convs.
    """
    layout = geometry.check_layout(layout)
    geometry.check_dense(x, "x", layout)
    if bstride is None:
        bstride = bsize
    geom = geometry.make_geometry(bsize, boffset, bstride)
    nchw = layout == "NCHW"
    H, W = _hw(x, layout)
    geometry.check_block_fits(geom, H, W, "input")
    plan = _plan_on(x, "x", indices, geom, x.shape[0], H, W)
    blocks = SparseGatherFunction.apply(_nhwc(x, nchw), plan)
    return _from_nhwc(blocks, nchw != bool(transpose))


def _scatter(blocks, indices, ybase, bsize, boffset, bstride, add, transpose, layout, inplace):
    layout = geometry.check_layout(layout)
    geometry.check_dense(ybase, "ybase", layout)
    if not isinstance(blocks, torch.Tensor):
        raise ValueError(f"blocks must be a torch.Tensor, got {type(blocks).__name__}")
    if bstride is None:
        bstride = bsize
    geom = geometry.make_geometry(bsize, boffset, bstride)
    nchw = layout == "NCHW"
    H, W = _hw(ybase, layout)
    C = _channels(ybase, layout)
    geometry.check_block_fits(geom, H, W, "output ybase")
    plan = _plan_on(ybase, "ybase", indices, geom, ybase.shape[0], H, W)
    idx = plan.idx
    blocks_nchw = nchw != bool(transpose)
    want = (idx.shape[0], C, *geom.bsize) if blocks_nchw else (idx.shape[0], *geom.bsize, C)
    if tuple(blocks.shape) != want:
        raise ValueError(
            f"blocks must have shape {list(want)} ([M, {'C, bh, bw' if blocks_nchw else 'bh, bw, C'}] with M = "
            f"len(indices), C = ybase's channels, (bh, bw) = bsize), got {list(blocks.shape)}; pass the bsize "
            f"of the blocks being scattered (e.g. BlockParams.bsize_out after VALID convs)")
    if blocks.dtype != ybase.dtype or blocks.device != ybase.device:
        raise ValueError(f"blocks ({blocks.dtype}, {blocks.device}) and ybase ({ybase.dtype}, {ybase.device}) "
                         f"must have the same dtype and device; convert with blocks.to(ybase)")
    y = SparseScatterFunction.apply(_nhwc(ybase, nchw), _nhwc(blocks, blocks_nchw), plan, bool(add), inplace)
    return ybase if inplace else _from_nhwc(y, nchw)  # in place: ybase's autograd history now includes y


def sparse_scatter(blocks: torch.Tensor, indices: torch.Tensor, ybase: torch.Tensor, bsize: IntPair,
                   boffset: IntPair = 0, bstride: Optional[IntPair] = None, add: bool = False,
                   atomic: bool = False, transpose: bool = False, layout: str = "NCHW") -> torch.Tensor:
    """Copy of ``ybase`` with the blocks written (add=False) or added (add=True). Differentiable in
    blocks and ybase; ``ybase`` is not modified.

    Args:
        blocks: [M, C, bh, bw] (layout "NCHW") or [M, bh, bw, C] (layout "NHWC"; ``transpose`` swaps).
        indices: integer [M, 3] rows (n, bh, bw); the same indices as the gather, while bsize/bstride/
            boffset may differ from the gather's (e.g. bsize_out, bstride, offset 0 after VALID convs).
        ybase: [N, C, H, W] or [N, H, W, C]: the base to write into.
        add: accumulate instead of overwrite. Overlapping blocks: with add all contributions are summed
            (and the gradient is exact); without add the block that comes last in ``indices`` wins.
        atomic: accepted for SBNet compatibility; overlaps are always handled (deterministically).

    Returns:
        y with ybase's shape, layout and memory format. Block pixels outside the image are dropped.
    """
    return _scatter(blocks, indices, ybase, bsize, boffset, bstride, add, transpose, layout, inplace=False)


def sparse_scatter_(blocks: torch.Tensor, indices: torch.Tensor, ybase: torch.Tensor, bsize: IntPair,
                    boffset: IntPair = 0, bstride: Optional[IntPair] = None, add: bool = False,
                    atomic: bool = False, transpose: bool = False, layout: str = "NCHW") -> torch.Tensor:
    """In-place :func:`sparse_scatter` (SBNet's ``sparse_scatter_var``): writes into ``ybase`` and
    returns it; no copy of the dense tensor, so this is the fast variant. Autograd tracks the in-place
    write (ybase must not be a leaf that requires grad)."""
    return _scatter(blocks, indices, ybase, bsize, boffset, bstride, add, transpose, layout, inplace=True)
