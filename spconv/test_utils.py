"""Test helpers with spconv's names (its tests import them): TestCase, params_grid, generate_sparse_data."""
import itertools
import unittest

import numpy as np


class TestCase(unittest.TestCase):
    def assertAllEqual(self, a, b):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    def assertAllClose(self, a, b, rtol=1e-6, atol=1e-6):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


def params_grid(*params):
    """Cartesian product of the parameter lists, as a list of lists."""
    return [list(p) for p in itertools.product(*params)]


def generate_sparse_data(shape, num_points, num_channels, integer=False, data_range=(-1, 1), with_dense=True,
                         dtype=np.float32, shape_scale=1):
    """Random unique sites per batch entry. Returns ``features [sum N, C]``, ``indices`` int32
    ``[sum N, ndim + 1]`` with the batch index in the LAST column (as spconv's helper), and
    ``features_dense [B, C, *shape]`` when ``with_dense``."""
    dense_shape = [int(s) * shape_scale for s in shape]
    ndim = len(dense_shape)
    volume = int(np.prod(dense_shape))
    features, indices = [], []
    for b, n in enumerate(num_points):
        flat = np.random.permutation(volume)[:n]
        coords = np.stack(np.unravel_index(flat, dense_shape), 1)
        indices.append(np.concatenate([coords, np.full((len(coords), 1), b)], 1))
        if integer:
            feats = np.random.randint(data_range[0], data_range[1], size=(len(coords), num_channels))
        else:
            feats = np.random.uniform(data_range[0], data_range[1], size=(len(coords), num_channels))
        features.append(feats.astype(dtype))
    res = {"features": np.concatenate(features), "indices": np.concatenate(indices).astype(np.int32)}
    if with_dense:
        dense = np.zeros([len(num_points), num_channels, *dense_shape], dtype=dtype)
        idx = res["indices"]
        dense[(idx[:, -1], slice(None), *[idx[:, d] for d in range(ndim)])] = res["features"]
        res["features_dense"] = dense
    return res
