"""Site-level helpers."""
import torch

from spconv.pytorch.core import SparseConvTensor
from spconv.pytorch.functional import _linear_keys
from spconv.pytorch.modules import SparseModule


class RemoveDuplicate(SparseModule):
    """Keeps one row per site: the first occurrence (features of later duplicates are dropped).

    Input: features ``[N, C]`` at indices ``[N, 1 + D]`` that may repeat a site; output: features
    ``[N_unique, C]`` at unique indices ``[N_unique, 1 + D]``, in first-occurrence order, empty indice_dict.
    """

    def forward(self, x: SparseConvTensor) -> SparseConvTensor:
        keys = _linear_keys(x.indices, [x.batch_size, *x.spatial_shape])
        uniq, inverse = torch.unique(keys, return_inverse=True)
        n = keys.shape[0]
        first = torch.full((uniq.shape[0],), n, dtype=torch.long).scatter_reduce(
            0, inverse, torch.arange(n), "amin")
        first = first.sort().values  # keep the original row order
        return x._derive(x.features[first], x.indices[first].contiguous(), x.spatial_shape, {})
