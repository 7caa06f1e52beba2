"""spconv.sbnet against a plain reference written with slicing loops (values and gradients)."""
import math

import pytest
import torch
import torch.nn.functional as F

import spconv.sbnet as sb

# (bsize, boffset, bstride) on a 13 x 11 image: exact tiling cut by the border, overlapping blocks
# crossing the border, gaps with a positive offset, heavy overlap (3 x 2 groups), one whole-image block.
GEOMS = {
    "tile": ((3, 3), (0, 0), (3, 3)),
    "overlap_border": ((5, 4), (-1, -2), (3, 3)),
    "gaps": ((3, 2), (1, 0), (4, 5)),
    "heavy_overlap": ((6, 7), (-2, -3), (2, 5)),
    "whole": ((13, 11), (0, 0), (13, 11)),
    "stride1": ((5, 4), (-2, -1), (1, 1)),  # 20 overlap groups: the pixel-wise index_add_ path
}
N, C, H, W = 2, 3, 13, 11


# ----------------------------------------------------------------------------------------------
# reference (loops over blocks, slicing)
# ----------------------------------------------------------------------------------------------
def _span(off, b, s, size, extent):
    start = off + b * s
    lo, hi = max(0, start), min(extent, start + size)
    return start, lo, hi


def ref_reduce_mask(mask, bcount, bsize, boffset, bstride, tol, avgpool):
    rows = []
    for n in range(mask.shape[0]):
        for bh in range(bcount[0]):
            for bw in range(bcount[1]):
                _, r0, r1 = _span(boffset[0], bh, bstride[0], bsize[0], mask.shape[1])
                _, c0, c1 = _span(boffset[1], bw, bstride[1], bsize[1], mask.shape[2])
                region = mask[n, r0:r1, c0:c1].double()
                if region.numel() == 0:
                    continue
                if avgpool:
                    active = region.sum().item() / (bsize[0] * bsize[1]) > tol
                else:
                    active = region.max().item() > tol
                if active:
                    rows.append((n, bh, bw))
    return torch.tensor(rows, dtype=torch.long).reshape(-1, 3)


def ref_gather(x, indices, bsize, boffset, bstride):
    """x [N, C, H, W] -> [M, C, bh, bw]."""
    out = []
    for n, bh, bw in indices.tolist():
        blk = x.new_zeros(x.shape[1], *bsize)
        h0, r0, r1 = _span(boffset[0], bh, bstride[0], bsize[0], x.shape[2])
        w0, c0, c1 = _span(boffset[1], bw, bstride[1], bsize[1], x.shape[3])
        if r1 > r0 and c1 > c0:
            blk[:, r0 - h0:r1 - h0, c0 - w0:c1 - w0] = x[n, :, r0:r1, c0:c1]
        out.append(blk)
    return torch.stack(out) if out else x.new_zeros(0, x.shape[1], *bsize)


def ref_scatter(blocks, indices, ybase, bsize, boffset, bstride, add):
    """blocks [M, C, bh, bw] onto ybase [N, C, H, W], in index order (later blocks win without add)."""
    y = ybase.clone()
    for m, (n, bh, bw) in enumerate(indices.tolist()):
        h0, r0, r1 = _span(boffset[0], bh, bstride[0], bsize[0], y.shape[2])
        w0, c0, c1 = _span(boffset[1], bw, bstride[1], bsize[1], y.shape[3])
        if r1 <= r0 or c1 <= c0:
            continue
        piece = blocks[m, :, r0 - h0:r1 - h0, c0 - w0:c1 - w0]
        if add:
            y[n, :, r0:r1, c0:c1] = y[n, :, r0:r1, c0:c1] + piece
        else:
            y[n, :, r0:r1, c0:c1] = piece
    return y


def all_blocks(bsize, boffset, bstride, n=N, h=H, w=W):
    bcount = [math.ceil((e - o) / s) for e, o, s in zip((h, w), boffset, bstride)]
    grid = torch.stack(torch.meshgrid(torch.arange(n), torch.arange(bcount[0]), torch.arange(bcount[1]),
                                      indexing="ij"), -1).reshape(-1, 3)
    return grid


def some_blocks(geom, seed=0, shuffle=True, n=N, h=H, w=W):
    """A random half of all blocks, in random order (so overwrite order matters)."""
    grid = all_blocks(*geom, n=n, h=h, w=w)
    g = torch.Generator().manual_seed(seed)
    keep = grid[torch.randperm(len(grid), generator=g)[: max(1, len(grid) // 2)]]
    if not shuffle:
        keep = keep[torch.argsort((keep[:, 0] * 1000 + keep[:, 1]) * 1000 + keep[:, 2])]
    return keep.int()


def to_layout(t, layout):
    return t if layout == "NCHW" else t.permute(0, 2, 3, 1).contiguous()


def from_layout(t, layout):
    return t if layout == "NCHW" else t.permute(0, 3, 1, 2)


def blocks_in(t, layout, transpose):
    """Blocks [M, C, bh, bw] -> the layout the op expects."""
    nchw_blocks = (layout == "NCHW") != transpose
    return t if nchw_blocks else t.permute(0, 2, 3, 1).contiguous()


def blocks_out(t, layout, transpose):
    nchw_blocks = (layout == "NCHW") != transpose
    return t if nchw_blocks else t.permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------------------------
# reduce_mask
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("geom", list(GEOMS))
@pytest.mark.parametrize("avgpool", [False, True])
def test_reduce_mask_matches_reference(geom, avgpool):
    bsize, boffset, bstride = GEOMS[geom]
    g = torch.Generator().manual_seed(1)
    mask = (torch.rand(N, H, W, generator=g) > 0.9).float() * torch.rand(N, H, W, generator=g)
    tol = 0.01 if avgpool else 0.3
    bcount = [math.ceil((e - o) / s) for e, o, s in zip((H, W), boffset, bstride)]
    got = sb.reduce_mask(mask, bcount, bsize, boffset, bstride, tol=tol, avgpool=avgpool)
    want = ref_reduce_mask(mask, bcount, bsize, boffset, bstride, tol, avgpool)
    assert got.indices.dtype == torch.int32 and got.count == len(want)
    assert torch.equal(got.indices.long(), want)
    # bcount=None is "every block starting inside the image"; [N, 1, H, W] masks and bool masks work too
    assert torch.equal(sb.reduce_mask(mask[:, None], None, bsize, boffset, bstride, tol, avgpool).indices,
                       got.indices)


def test_reduce_mask_small_bcount_bool_mask():
    mask = torch.zeros(1, 9, 9, dtype=torch.bool)
    mask[0, 8, 8] = True
    mask[0, 0, 4] = True
    got = sb.reduce_mask(mask, (2, 2), 3, 0, 3)  # only the top-left 2x2 blocks are considered
    assert got.indices.tolist() == [[0, 0, 1]] and got.count == 1
    assert sb.reduce_mask(mask, None, 3, 0, 3).indices.tolist() == [[0, 0, 1], [0, 2, 2]]


def test_reduce_mask_empty_mask_returns_zero_blocks():
    res = sb.reduce_mask(torch.zeros(2, 8, 8), None, 4, 0, 4)
    assert res.count == 0 and res.indices.shape == (0, 3)


# ----------------------------------------------------------------------------------------------
# sparse_gather
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("geom", list(GEOMS))
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("transpose", [False, True])
def test_gather_matches_reference(geom, layout, transpose):
    bsize, boffset, bstride = GEOMS[geom]
    idx = some_blocks(GEOMS[geom])
    x = torch.randn(N, C, H, W, dtype=torch.float64, requires_grad=True)
    want = ref_gather(x, idx, bsize, boffset, bstride)
    xl = to_layout(x.detach(), layout).requires_grad_()
    got = sb.sparse_gather(xl, idx, bsize, boffset, bstride, transpose=transpose, layout=layout)
    got_nchw = blocks_out(got, layout, transpose)
    assert torch.equal(got_nchw, want)
    g = torch.randn_like(want)
    (want * g).sum().backward()
    (got_nchw * g).sum().backward()
    torch.testing.assert_close(from_layout(xl.grad, layout), x.grad)


def test_gather_channels_last_input_and_views():
    bsize, boffset, bstride = GEOMS["overlap_border"]
    idx = some_blocks(GEOMS["overlap_border"])
    x = torch.randn(N, C, H, W).contiguous(memory_format=torch.channels_last)
    got = sb.sparse_gather(x, idx, bsize, boffset, bstride)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, ref_gather(x, idx, bsize, boffset, bstride))
    xt = torch.randn(N, W, C, H).permute(0, 2, 3, 1)  # arbitrary strides
    assert torch.equal(sb.sparse_gather(xt, idx, bsize, boffset, bstride), ref_gather(xt, idx, bsize, boffset, bstride))


# ----------------------------------------------------------------------------------------------
# sparse_scatter
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("geom", list(GEOMS))
@pytest.mark.parametrize("add", [False, True])
@pytest.mark.parametrize("layout,transpose", [("NCHW", False), ("NHWC", False), ("NHWC", True), ("NCHW", True)])
@pytest.mark.parametrize("inplace", [False, True])
def test_scatter_matches_reference(geom, add, layout, transpose, inplace):
    bsize, boffset, bstride = GEOMS[geom]
    idx = some_blocks(GEOMS[geom], seed=3)
    blocks = torch.randn(len(idx), C, *bsize, dtype=torch.float64, requires_grad=True)
    ybase = torch.randn(N, C, H, W, dtype=torch.float64, requires_grad=True)
    want = ref_scatter(blocks, idx, ybase, bsize, boffset, bstride, add)

    b_op = blocks_in(blocks.detach(), layout, transpose).requires_grad_()
    y_leaf = to_layout(ybase.detach(), layout).requires_grad_()
    y_in = y_leaf * 1.0 if inplace else y_leaf  # in-place needs a non-leaf base
    op = sb.sparse_scatter_ if inplace else sb.sparse_scatter
    got = op(b_op, idx, y_in, bsize, boffset, bstride, add=add, transpose=transpose, layout=layout)
    if inplace:
        assert got is y_in
    else:
        assert torch.equal(y_leaf, to_layout(ybase.detach(), layout))  # base untouched
    torch.testing.assert_close(from_layout(got, layout), want, rtol=1e-12, atol=1e-12)

    g = torch.randn_like(want)
    (want * g).sum().backward()
    (from_layout(got, layout) * g).sum().backward()
    torch.testing.assert_close(blocks_out(b_op.grad, layout, transpose), blocks.grad)
    torch.testing.assert_close(from_layout(y_leaf.grad, layout), ybase.grad)


def test_scatter_channels_last_base_keeps_memory_format():
    bsize, boffset, bstride = GEOMS["tile"]
    idx = some_blocks(GEOMS["tile"])
    ybase = torch.randn(N, C, H, W).contiguous(memory_format=torch.channels_last)
    blocks = torch.randn(len(idx), C, *bsize)
    y = sb.sparse_scatter(blocks, idx, ybase, bsize, boffset, bstride, add=True)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, ref_scatter(blocks, idx, ybase, bsize, boffset, bstride, True))


# small geometries on a 1 x 2 x 7 x 6 image for gradcheck (numerical Jacobians are O(numel^2))
GC_GEOMS = {
    "overlap_border": ((4, 3), (-1, -1), (3, 2)),
    "heavy_overlap": ((5, 4), (-2, -1), (2, 3)),
    "gaps": ((2, 2), (1, 0), (3, 3)),
}


@pytest.mark.parametrize("geom", list(GC_GEOMS))
@pytest.mark.parametrize("add", [False, True])
def test_gradcheck_gather_scatter(geom, add):
    bsize, boffset, bstride = GC_GEOMS[geom]
    idx = some_blocks(GC_GEOMS[geom], seed=5, n=1, h=7, w=6)
    x = torch.randn(1, 2, 7, 6, dtype=torch.float64, requires_grad=True)
    if not add:
        torch.autograd.gradcheck(lambda t: sb.sparse_gather(t, idx, bsize, boffset, bstride), (x,))
    blocks = torch.randn(len(idx), 2, *bsize, dtype=torch.float64, requires_grad=True)
    ybase = torch.randn(1, 2, 7, 6, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(
        lambda b, y: sb.sparse_scatter(b, idx, y, bsize, boffset, bstride, add=add), (blocks, ybase))
    blocks_t = blocks.detach().permute(0, 2, 3, 1).contiguous().requires_grad_()
    ybase_t = ybase.detach().permute(0, 2, 3, 1).contiguous().requires_grad_()
    torch.autograd.gradcheck(
        lambda b, y: sb.sparse_scatter_(b, idx, y * 1.0, bsize, boffset, bstride, add=add, layout="NHWC"),
        (blocks_t, ybase_t))


def test_overlapping_add_is_deterministic_and_exact():
    bsize, boffset, bstride = GEOMS["heavy_overlap"]
    idx = all_blocks(bsize, boffset, bstride).int()
    ones = torch.ones(len(idx), 1, *bsize)
    cover = sb.sparse_scatter(ones, idx, torch.zeros(N, 1, H, W), bsize, boffset, bstride, add=True)
    # coverage count = number of blocks over each pixel, computed by the reference
    assert torch.equal(cover, ref_scatter(ones, idx, torch.zeros(N, 1, H, W), bsize, boffset, bstride, True))
    blocks = torch.randn(len(idx), C, *bsize)
    base = torch.randn(N, C, H, W)
    a = sb.sparse_scatter(blocks, idx, base, bsize, boffset, bstride, add=True)
    b = sb.sparse_scatter(blocks, idx, base, bsize, boffset, bstride, add=True)
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# sparse conv through gather -> VALID conv -> scatter with a different block size (calc_block_params)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bsize,k,stride,padding", [(7, 3, 1, "SAME"), ((6, 9), 3, 1, "SAME"), (7, 3, 2, "SAME"),
                                                    (9, 5, 1, "VALID"), (8, 2, 2, "VALID"), (5, 1, 1, "SAME")])
def test_sparse_conv_equals_dense_conv_on_active_tiles(bsize, k, stride, padding):
    x = torch.randn(N, C, H, W, dtype=torch.float64)
    w = torch.randn(4, C, k, k, dtype=torch.float64)
    p = sb.calc_block_params((H, W), bsize, k, stride, padding)
    mask = torch.rand(N, H, W, generator=torch.Generator().manual_seed(2)) > 0.85
    ind = sb.reduce_mask(mask, p.bcount, p.bsize, p.boffset, p.bstride).indices
    blocks = sb.sparse_gather(x, ind, p.bsize, p.boffset, p.bstride)
    out_blocks = F.conv2d(blocks, w, stride=stride)
    assert tuple(out_blocks.shape[-2:]) == p.bsize_out
    if padding == "SAME":
        oh, ow = -(-H // stride), -(-W // stride)
        pad_h = max((oh - 1) * stride + k - H, 0)
        pad_w = max((ow - 1) * stride + k - W, 0)
        dense = F.conv2d(F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2]), w, stride=stride)
    else:
        dense = F.conv2d(x, w, stride=stride)
    base = torch.full_like(dense, float("nan"))
    y = sb.sparse_scatter(out_blocks, ind, base, p.bsize_out, 0, p.bsize_out)
    covered = ~torch.isnan(y)
    # every active output tile is filled with the dense conv's values, and only those
    want_cover = ref_scatter(torch.ones(len(ind), 4, *p.bsize_out, dtype=torch.float64), ind,
                             torch.zeros_like(dense), p.bsize_out, (0, 0), p.bsize_out, False).bool()
    assert torch.equal(covered, want_cover) and covered.any()
    torch.testing.assert_close(y[covered], dense[covered])


def test_calc_block_params_values():
    p = sb.calc_block_params((400, 352), 18, 3)
    assert p == sb.BlockParams((18, 18), (16, 16), (-1, -1), (25, 22), (16, 16))
    p = sb.calc_block_params((13, 11), (7, 9), [1, 3, 1])  # bottleneck: receptive field 3
    assert p == sb.BlockParams((7, 9), (5, 7), (-1, -1), (3, 2), (5, 7))
    p = sb.calc_block_params((13, 11), 7, 3, 2, "SAME")  # out 7 x 6, pad 2 in both dims: 1 top/left
    assert p == sb.BlockParams((7, 7), (3, 3), (-1, -1), (3, 2), (6, 6))
    p = sb.calc_block_params((13, 11), 9, 5, 1, "VALID")
    assert p == sb.BlockParams((9, 9), (5, 5), (0, 0), (2, 2), (5, 5))
    assert sb.calc_block_params((13, 11), 7, [(1, 1), (3, 3), (3, 3)]).bsize_out == (3, 3)


# ----------------------------------------------------------------------------------------------
# SparseBlockResNet
# ----------------------------------------------------------------------------------------------
def _randomise_bn(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    for bn in (module.bn1, module.bn2, module.bn3):
        c = bn.num_features
        bn.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
        bn.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
        bn.bias.data.copy_(torch.randn(c, generator=g) * 0.5)  # BN(0) != 0: checks the zero-padding fix


def _tile_mask(ind, p, shape, channels):
    return ref_scatter(torch.ones(len(ind), channels, *p.bsize_out, dtype=torch.float64), ind,
                       torch.zeros(shape, dtype=torch.float64), p.bsize_out, (0, 0), p.bsize_out, False).bool()


@pytest.mark.parametrize("block_size,kernel,channels_last", [(7, 3, False), ((6, 9), 3, True), (9, 5, False),
                                                             (4, 1, False)])
def test_sparse_resnet_block_equals_dense_on_active_tiles(block_size, kernel, channels_last):
    torch.manual_seed(0)
    c, k_mid = 8, 4
    blk = sb.SparseBlockResNet(c, k_mid, kernel, block_size, bias=True).double().eval()
    _randomise_bn(blk)
    x = torch.randn(N, c, H, W, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    mask = torch.zeros(N, H, W)
    mask[0, 0, 0] = 1        # top-left corner: halo outside the image
    mask[0, 12, 10] = 1      # bottom-right corner
    mask[1, 6, 5] = 1
    ind = blk.reduce_mask(mask).indices
    p = blk.block_params((H, W))
    tiles = _tile_mask(ind, p, x.shape, c)

    xs = x.detach().clone().requires_grad_()
    xd = x.detach().clone().requires_grad_()
    x_before = xs.detach().clone()
    ys = blk(xs, ind)
    yd = blk.dense_forward(xd)
    assert torch.equal(xs.detach(), x_before)
    torch.testing.assert_close(ys[tiles], yd[tiles])
    assert torch.equal(ys[~tiles], x[~tiles])

    # gradients of a loss that only looks at active tiles are those of the dense block
    g = torch.randn_like(yd) * tiles
    grads_s = torch.autograd.grad((ys * g).sum(), [xs] + list(blk.parameters()))
    grads_d = torch.autograd.grad((yd * g).sum(), [xd] + list(blk.parameters()))
    for a, b in zip(grads_s, grads_d):
        torch.testing.assert_close(a, b)


def test_sparse_resnet_block_inplace_and_empty_mask():
    torch.manual_seed(0)
    blk = sb.SparseBlockResNet(8, 4, 3, 6, inplace=True).eval()
    x = torch.randn(1, 8, 13, 11)
    mask = torch.zeros(1, 13, 11)
    mask[0, 5, 5] = 1
    ind = blk.reduce_mask(mask).indices
    y_ref = blk.dense_forward(x)
    x_work = x.clone()
    with torch.no_grad():
        y = blk(x_work, ind)
    assert y is x_work
    tiles = _tile_mask(ind, blk.block_params((13, 11)), x.shape, 8)
    torch.testing.assert_close(y[tiles], y_ref[tiles])
    # training mode, blocks across the border: in-place ReLUs, the border mask and the in-place
    # scatter keep autograd intact, and both variants give the same gradients
    blk.train()
    mask[0, 0, 0] = 1
    ind = blk.reduce_mask(mask).indices
    grads = []
    for inplace in (False, True):
        blk.inplace = inplace
        blk.zero_grad()
        xt = torch.randn(1, 8, 13, 11, generator=torch.Generator().manual_seed(1), requires_grad=True)
        blk(xt * 1.0, ind).square().sum().backward()
        grads.append([xt.grad] + [p.grad.clone() for p in blk.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    blk.eval()
    empty = blk.reduce_mask(torch.zeros(1, 13, 11))
    assert empty.count == 0
    blk.inplace = False
    blk.train()
    out = blk(x, empty.indices)
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()


def test_empty_indices_through_ops():
    x = torch.randn(1, C, H, W, requires_grad=True)
    ind = sb.reduce_mask(torch.zeros(1, H, W), None, 3, 0, 3).indices
    blocks = sb.sparse_gather(x, ind, 3, 0, 3)
    assert blocks.shape == (0, C, 3, 3)
    y = sb.sparse_scatter(blocks * 2, ind, x, 3, 0, 3, add=True)
    assert torch.equal(y, x)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------
def test_errors_are_clear():
    x = torch.randn(1, C, 8, 8)
    ind = torch.tensor([[0, 0, 0]], dtype=torch.int32)
    with pytest.raises(ValueError, match="bsize .* larger than the input"):
        sb.sparse_gather(x, ind, 9, 0, 9)
    with pytest.raises(ValueError, match="bsize .* larger than the mask"):
        sb.reduce_mask(torch.ones(1, 8, 8), None, 10, 0, 10)
    with pytest.raises(ValueError, match="larger than the padded input"):
        sb.calc_block_params((8, 8), 12, 3)
    with pytest.raises(ValueError, match=r"mask must be \[N, H, W\]"):
        sb.reduce_mask(torch.ones(8, 8), None, 4)
    with pytest.raises(ValueError, match=r"mask must be \[N, H, W\] or \[N, 1, H, W\]"):
        sb.reduce_mask(torch.ones(1, 3, 8, 8), None, 4)
    with pytest.raises(ValueError, match="batch index out of range"):
        sb.sparse_gather(x, torch.tensor([[1, 0, 0]]), 4, 0, 4)
    with pytest.raises(ValueError, match="outside the image"):
        sb.sparse_gather(x, torch.tensor([[0, 2, 0]]), 4, 0, 4)
    with pytest.raises(ValueError, match=">= 0"):
        sb.sparse_gather(x, torch.tensor([[0, -1, 0]]), 4, 0, 4)
    with pytest.raises(ValueError, match="duplicate"):
        sb.sparse_gather(x, torch.tensor([[0, 1, 0], [0, 0, 0], [0, 1, 0]]), 4, 0, 4)
    with pytest.raises(ValueError, match=r"indices must have shape \[M, 3\]"):
        sb.sparse_gather(x, torch.tensor([[0, 1]]), 4, 0, 4)
    with pytest.raises(ValueError, match="integer dtype"):
        sb.sparse_gather(x, torch.tensor([[0.0, 1.0, 0.0]]), 4, 0, 4)
    with pytest.raises(ValueError, match="bsize must be an int or a pair"):
        sb.sparse_gather(x, ind, (4, 4, 4), 0, 4)
    with pytest.raises(ValueError, match="bstride must be >= 1"):
        sb.sparse_gather(x, ind, 4, 0, 0)
    with pytest.raises(ValueError, match="layout must be"):
        sb.sparse_gather(x, ind, 4, 0, 4, layout="CHW")
    with pytest.raises(ValueError, match="x must be 4-D"):
        sb.sparse_gather(x[0], ind, 4, 0, 4)
    with pytest.raises(ValueError, match="floating-point"):
        sb.sparse_gather(x.long(), ind, 4, 0, 4)
    with pytest.raises(ValueError, match=r"blocks must have shape \[1, 3, 4, 4\]"):
        sb.sparse_scatter(torch.randn(1, 3, 2, 2), ind, x, 4, 0, 4)
    with pytest.raises(ValueError, match="same dtype"):
        sb.sparse_scatter(torch.randn(1, 3, 4, 4, dtype=torch.float64), ind, x, 4, 0, 4)
    with pytest.raises(ValueError, match="divisible by strides"):
        sb.calc_block_params((8, 8), 6, 3, 2)
    with pytest.raises(ValueError, match="in_size must be"):
        sb.calc_block_params((1, 8, 8), 6, 3)
    with pytest.raises(ValueError, match="bcount"):
        sb.reduce_mask(torch.ones(1, 8, 8), (5, 1), 4, 0, 4)
    blk = sb.SparseBlockResNet(4, 2, 3, 6)
    with pytest.raises(ValueError, match="channels"):
        blk(x, ind)
    with pytest.raises(ValueError, match="kernel_size"):
        sb.SparseBlockResNet(4, 2, 2, 6)


def test_inputs_are_not_modified():
    bsize, boffset, bstride = GEOMS["heavy_overlap"]
    idx = some_blocks(GEOMS["heavy_overlap"])
    idx_copy = idx.clone()
    mask = torch.rand(N, H, W)
    mask_copy = mask.clone()
    x = torch.randn(N, C, H, W, requires_grad=True)
    x_copy = x.detach().clone()
    sb.reduce_mask(mask, None, bsize, boffset, bstride, 0.5, True)
    b = sb.sparse_gather(x, idx, bsize, boffset, bstride)
    y = sb.sparse_scatter(b * 2, idx, x, bsize, boffset, bstride, add=False)
    y.sum().backward()
    assert torch.equal(mask, mask_copy) and torch.equal(idx, idx_copy) and torch.equal(x.detach(), x_copy)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reduced_precision_dtypes(dtype):
    bsize, boffset, bstride = GEOMS["overlap_border"]
    idx = some_blocks(GEOMS["overlap_border"])
    x = torch.randn(N, C, H, W).to(dtype)
    blocks = sb.sparse_gather(x, idx, bsize, boffset, bstride)
    assert blocks.dtype == dtype and torch.equal(blocks, ref_gather(x, idx, bsize, boffset, bstride))
    y = sb.sparse_scatter(blocks, idx, torch.zeros_like(x), bsize, boffset, bstride, add=False)
    assert torch.equal(y, ref_scatter(blocks, idx, torch.zeros_like(x), bsize, boffset, bstride, False))


def test_plan_cache_rechecks_modified_indices():
    x = torch.randn(1, C, 8, 8)
    ind = torch.tensor([[0, 0, 0], [0, 1, 1]], dtype=torch.int32)
    a = sb.sparse_gather(x, ind, 4, 0, 4)
    b = sb.sparse_gather(x, ind, 4, 0, 4)  # cached plan
    assert torch.equal(a, b)
    ind[1, 1] = 0
    assert torch.equal(sb.sparse_gather(x, ind, 4, 0, 4)[1], x[0, :, 0:4, 4:8])
    ind[1, 1] = 5
    with pytest.raises(ValueError, match="outside the image"):
        sb.sparse_gather(x, ind, 4, 0, 4)
