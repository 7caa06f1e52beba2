"""Site-level helpers."""
from spconv.pytorch.core import SparseConvTensor
from spconv.pytorch.indice_keys import DuplicateSites
from spconv.pytorch.modules import SparseModule


class RemoveDuplicate(SparseModule):
    """Keeps one row per site: the first occurrence (features of later duplicates are dropped).

    Input: features ``[N, C]`` at indices ``[N, 1 + D]`` that may repeat a site; output: features
    ``[N_unique, C]`` at unique indices ``[N_unique, 1 + D]``, in first-occurrence order, empty indice_dict.
    """

    def forward(self, x: SparseConvTensor) -> SparseConvTensor:
        x.validated()
        first = DuplicateSites(x.indices, x.spatial_shape).first.sort().values  # keep the original row order
        return x._derive(x.features[first], x.indices[first].contiguous(), x.spatial_shape, {})
