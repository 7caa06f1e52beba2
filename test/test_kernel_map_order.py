"""Kernel maps of sites in any row order (the first layer's raw voxel order) equal the PyTorch reference
builder's, row for row, on 1 and 2 threads: sparse sites (runs of one output, many plane and batch changes
between consecutive grid rows) and dense ones, 1D to 4D, SubM, strided and transposed."""
import pytest
import torch

from helpers import random_sparse
from spconv.pytorch import ops
from spconv.pytorch import reference_maps

SHAPES = {1: [37], 2: [13, 17], 3: [9, 11, 7], 4: [5, 7, 3, 6]}


@pytest.mark.parametrize("nd", [1, 2, 3, 4])
@pytest.mark.parametrize("density", [0.04, 0.5])
@pytest.mark.parametrize("threads", [1, 2])
def test_unsorted_maps_equal_reference(nd, density, threads):
    shape = SHAPES[nd]
    _, idx = random_sparse(shape, 3, density, 1, seed=10 * nd + int(density * 10))
    perm = torch.randperm(idx.shape[0], generator=torch.Generator().manual_seed(nd))
    idx = idx[perm].contiguous()
    ones, twos = [1] * nd, [2] * nd
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for k, d in (([3] * nd, ones), ([3] * nd, twos)):
            assert torch.equal(ops.build_subm_map(idx, shape, k, d, 3), reference_maps.build_subm_map(idx, shape, k, d))
        for k, s, p, transposed in (([3] * nd, twos, ones, False), ([3] * nd, twos, ones, True),
                                    ([2] * nd, twos, [0] * nd, False)):
            if transposed:
                out = ops.get_deconv_output_size(shape, k, s, p, ones, [0] * nd)
            else:
                out = ops.get_conv_output_size(shape, k, s, p, ones)
            a = ops.build_conv_map(idx, shape, out, k, s, p, ones, transposed, 3)
            b = reference_maps.build_conv_map(idx, shape, out, k, s, p, ones, transposed)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), (k, s, p, transposed)
    finally:
        torch.set_num_threads(before)
