"""Block parameters for convolutions on block stacks, and the sparse ResNet bottleneck block."""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from spconv.sbnet import functional as sbf
from spconv.sbnet import block_geometry as geometry
from spconv.sbnet.block_geometry import IntPair


class BlockParams(NamedTuple):
    """Geometry of a sparse conv on blocks, all (h, w).

    Gather with (bsize, boffset, bstride) and grid bcount; a VALID conv turns each bsize block into a
    bsize_out block; scatter those with bsize=bsize_out, boffset=(0, 0), bstride=bsize_out.
    """
    bsize: Tuple[int, int]
    bsize_out: Tuple[int, int]
    boffset: Tuple[int, int]
    bcount: Tuple[int, int]
    bstride: Tuple[int, int]


KSize = Union[int, Sequence[int], Sequence[Union[int, Sequence[int]]]]


def _receptive_field(ksize: KSize) -> Tuple[int, int]:
    """int, (kh, kw), or a list of those for a stack of stride-1 convs -> total (kh, kw)."""
    if isinstance(ksize, (list, tuple)) and any(isinstance(k, (list, tuple)) for k in ksize):
        pairs = [geometry.to_pair(k, "ksize") for k in ksize]
    elif isinstance(ksize, (list, tuple)) and len(ksize) != 2:
        pairs = [geometry.to_pair(k, "ksize") for k in ksize]
    else:
        pairs = [geometry.to_pair(ksize, "ksize")]
    return (1 + sum(p[0] - 1 for p in pairs), 1 + sum(p[1] - 1 for p in pairs))


def calc_block_params(in_size: Sequence[int], bsize: IntPair, ksize: KSize, strides: IntPair = 1,
                      padding: str = "SAME") -> BlockParams:
    """Block parameters so that VALID convs on gathered blocks equal a SAME/VALID conv on the image.

    Args:
        in_size: (H, W) of the input (e.g. ``x.shape[-2:]`` for NCHW).
        bsize: input block size including the halo (int or (h, w)), as in SBNet.
        ksize: kernel size (int or (kh, kw)), or the kernel sizes of a stack of stride-1 convs as a
            list of (kh, kw) pairs or of 3+ ints, e.g. [1, 3, 1] for a bottleneck (the stack's receptive
            field ``1 + sum(k - 1)`` is used, as SBNet's calc_block_params_res_block does).
        strides: stride of the (first) conv; requires (bsize - k) % stride == 0.
        padding: "SAME" (output ceil(H / stride), TF-style padding, extra pixel at the bottom/right)
            or "VALID".

    Returns:
        BlockParams: bstride = bsize - k + stride (blocks overlap by the halo), bsize_out =
        (bsize - k) // stride + 1, boffset = -top/left padding, bcount = blocks needed to cover the output.
    """
    if isinstance(in_size, torch.Size) or isinstance(in_size, (list, tuple)):
        in_size = tuple(in_size)
    else:
        raise ValueError(f"in_size must be (H, W), got {in_size!r}")
    if len(in_size) != 2 or not all(isinstance(v, int) and v > 0 for v in in_size):
        raise ValueError(f"in_size must be (H, W) with positive ints, got {in_size!r}; pass x.shape[-2:] for "
                         f"an NCHW tensor or x.shape[1:3] for NHWC")
    if padding not in ("SAME", "VALID"):
        raise ValueError(f"padding must be 'SAME' or 'VALID', got {padding!r}")
    bsize = geometry.to_pair(bsize, "bsize")
    k = _receptive_field(ksize)
    s = geometry.to_pair(strides, "strides")
    bsize_out, bstride, boffset, bcount = [], [], [], []
    for d in range(2):
        H, b, kk, ss = in_size[d], bsize[d], k[d], s[d]
        if b < kk:
            raise ValueError(f"bsize {bsize} is smaller than the receptive field {k}; use bsize >= {k}")
        if (b - kk) % ss:
            raise ValueError(f"(bsize - ksize) must be divisible by strides: bsize {bsize}, receptive field {k}, "
                             f"strides {s}; use bsize = {kk} + {ss} * m")
        if padding == "SAME":
            out = -(-H // ss)
            pad_total = max((out - 1) * ss + kk - H, 0)
        else:
            if H < kk:
                raise ValueError(f"in_size {in_size} is smaller than the receptive field {k} (VALID padding)")
            out = (H - kk) // ss + 1
            pad_total = 0
        pad_top = pad_total // 2
        if b > H + 2 * pad_top:  # the ops' limit: the image plus -boffset of zero padding on each side
            raise ValueError(f"bsize {bsize} is larger than the padded input ({H} + 2 * {pad_top} along "
                             f"{'HW'[d]}); use a block size of at most {H + 2 * pad_top}")
        bo = (b - kk) // ss + 1
        bsize_out.append(bo)
        bstride.append(bo * ss)
        boffset.append(-pad_top)
        bcount.append(-(-out // bo))
    return BlockParams(bsize, tuple(bsize_out), tuple(boffset), tuple(bcount), tuple(bstride))


class SparseBlockResNet(nn.Module):
    r"""Pre-activation ResNet bottleneck block computed only on active blocks (SBNet's sparse res block).

    Dense equivalent (:meth:`dense_forward`):
    :math:`y = x + W_3 * \mathrm{relu}(BN_3(W_2 * \mathrm{relu}(BN_2(W_1 * \mathrm{relu}(BN_1(x))))))`
    with 1x1 conv ``W_1`` (C -> K), k x k conv ``W_2`` (K -> K, SAME zero padding), 1x1 conv ``W_3``
    (K -> C), stride 1.

    Sparse forward: gather input blocks of ``block_size`` (output tile + k - 1 halo), run the residual
    on the block stack with VALID convs, add the result onto ``x`` at the output tiles. On active tiles
    the output equals the dense block exactly in eval mode; elsewhere it is ``x``. In training mode the
    BatchNorm statistics come from the gathered blocks (halos included), as in SBNet.

    Args:
        channels: C (input = output channels). mid_channels: K.
        kernel_size: k of the middle conv (odd). block_size: input block size incl. halo (int or (h, w)).
        inplace: add the residual into ``x`` in place (no copy of the dense tensor: the fast path);
            otherwise ``x`` is left untouched and a new tensor is returned.

    Shapes: x [N, C, H, W] (channels-last memory is fastest), indices int [M, 3] from
    :meth:`reduce_mask` -> [N, C, H, W].
    """

    def __init__(self, channels: int, mid_channels: int, kernel_size: int = 3, block_size: IntPair = 18,
                 bias: bool = False, inplace: bool = False):
        super().__init__()
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd positive int, got {kernel_size!r}")
        self.channels, self.mid_channels, self.kernel_size = channels, mid_channels, kernel_size
        self.block_size = geometry.to_pair(block_size, "block_size")
        if min(self.block_size) < kernel_size:
            raise ValueError(f"block_size {self.block_size} must be >= kernel_size {kernel_size}")
        self.inplace = inplace
        self._params = {}  # (H, W) -> BlockParams
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, mid_channels, 1, bias=bias)
        self.bn2 = nn.BatchNorm2d(mid_channels)
        self.conv2 = nn.Conv2d(mid_channels, mid_channels, kernel_size, bias=bias)
        self.bn3 = nn.BatchNorm2d(mid_channels)
        self.conv3 = nn.Conv2d(mid_channels, channels, 1, bias=bias)

    def extra_repr(self) -> str:
        return (f"{self.channels}, {self.mid_channels}, kernel_size={self.kernel_size}, "
                f"block_size={self.block_size}, inplace={self.inplace}")

    def block_params(self, in_size: Sequence[int]) -> BlockParams:
        """calc_block_params for an (H, W) input and this block's receptive field."""
        key = tuple(in_size)
        params = self._params.get(key)
        if params is None:
            params = self._params[key] = calc_block_params(key, self.block_size, self.kernel_size, 1, "SAME")
        return params

    def reduce_mask(self, mask: torch.Tensor, tol: float = 0.0, avgpool: bool = False) -> sbf.ReduceMaskResult:
        """Active output tiles of a mask [N, H, W] or [N, 1, H, W] (a tile is active when the mask is
        active anywhere in its input block, halo included)."""
        p = self.block_params(mask.shape[-2:])
        return sbf.reduce_mask(mask, p.bcount, p.bsize, p.boffset, p.bstride, tol, avgpool)

    def residual(self, blocks: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """F on a stack [M, C, b, b] with VALID convs -> [M, C, b - k + 1, b - k + 1]. ``valid``
        [M, 1, b, b] zeroes the out-of-image pixels before the k x k conv (the dense conv's zero padding)."""
        h = self.conv1(F.relu(self.bn1(blocks), inplace=True))
        h = F.relu(self.bn2(h), inplace=True)
        if valid is not None:
            h = h * valid if h.requires_grad else h.mul_(valid)  # relu's backward needs its output
        h = self.conv2(h)
        return self.conv3(F.relu(self.bn3(h), inplace=True))

    def dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same block on the whole image: x + F(x) with SAME padding. [N, C, H, W] -> [N, C, H, W]."""
        h = self.conv1(F.relu(self.bn1(x), inplace=True))
        h = F.relu(self.bn2(h), inplace=True)
        h = F.conv2d(h, self.conv2.weight, self.conv2.bias, padding=self.kernel_size // 2)
        return x + self.conv3(F.relu(self.bn3(h), inplace=True))

    def forward(self, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """x [N, C, H, W], indices int [M, 3] from :meth:`reduce_mask` on a mask of x's size ->
        [N, C, H, W] (``x`` itself when ``inplace``)."""
        geometry.check_dense(x, "x", "NCHW")
        if x.shape[1] != self.channels:
            raise ValueError(f"x has {x.shape[1]} channels, the block expects {self.channels}")
        p = self.block_params(x.shape[-2:])
        if isinstance(indices, torch.Tensor) and indices.dim() == 2 and indices.shape[0] == 0:
            return x if self.inplace else x.clone()  # empty mask: no active block, y = x
        blocks = sbf.sparse_gather(x, indices, p.bsize, p.boffset, p.bstride)
        valid = None
        if self.kernel_size > 1:
            plan = sbf.block_plan(indices, geometry.make_geometry(p.bsize, p.boffset, p.bstride), x.shape[0],
                                  x.shape[2], x.shape[3])  # cached by sparse_gather
            valid = _valid_mask(plan, blocks)
        out = self.residual(blocks, valid)
        scatter = sbf.sparse_scatter_ if self.inplace else sbf.sparse_scatter
        return scatter(out, indices, x, p.bsize_out, 0, p.bsize_out, add=True)


def _valid_mask(plan: geometry.BlockPlan, like: torch.Tensor) -> Optional[torch.Tensor]:
    """[M, 1, bh, bw] 0/1 mask of in-image block pixels, or None when no block crosses the border."""
    return plan.valid().unsqueeze(1).to(like.dtype) if plan.has_border else None
