"""indice_key bookkeeping: get the kernel map a layer needs from the tensor's indice_dict, or build it.

SubM layers with one key share one map; a strided/transposed conv or pool creates its key; an
inverse conv reuses the map of the layer that created its key. Misuse raises ValueError naming the
key, the layers' settings and the fix.
"""
from typing import Dict, List, Optional

import torch

from spconv.pytorch import ops
from spconv.pytorch.core import IndiceData, SparseConvTensor, duplicate_sites_found


class DuplicateSites:
    """The rows of an indices tensor ``[N, 1 + D]`` grouped by site, for inputs where sites repeat.

    ``inverse [N]`` maps each row to its site, ``first [U]`` each site to its first row, and
    ``unique_indices [U, 1 + D]`` (= ``indices[first]``) lists the sites sorted by (batch, coords).
    """

    def __init__(self, indices: torch.Tensor, spatial_shape: List[int]):
        uniq, self.inverse = torch.unique(ops.linear_keys(indices, spatial_shape), return_inverse=True)
        rows = torch.arange(indices.shape[0], device=indices.device)
        self.first = rows.new_full((uniq.shape[0],), indices.shape[0]).scatter_reduce(0, self.inverse, rows, "amin")
        self.unique_indices = indices[self.first].contiguous()
        self.num_rows = indices.shape[0]

    @property
    def num_sites(self) -> int:
        return self.first.shape[0]

    def sum(self, features: torch.Tensor) -> torch.Tensor:
        """``[U, C]``: the features of each site's rows added (differentiable)."""
        return features.new_zeros((self.num_sites, features.shape[1])).index_add(0, self.inverse, features)

    def max(self, features: torch.Tensor) -> torch.Tensor:
        """``[U, C]``: the largest feature of each site's rows, per channel (NaN propagates)."""
        index = self.inverse.unsqueeze(1).expand_as(features)
        return features.new_zeros((self.num_sites, features.shape[1])).scatter_reduce(
            0, index, features, "amax", include_self=False)

    def count(self, dtype) -> torch.Tensor:
        """``[U, 1]``: how many rows each site has."""
        return torch.zeros((self.num_sites, 1), dtype=dtype, device=self.inverse.device).index_add(
            0, self.inverse, torch.ones((self.num_rows, 1), dtype=dtype, device=self.inverse.device))

    def expand(self, site_values: torch.Tensor) -> torch.Tensor:
        """``[N, C]``: each row gets its site's value."""
        return site_values[self.inverse]


torch.serialization.add_safe_globals([DuplicateSites])  # saved inside a SparseConvTensor's indice_dict


def _build(build, input: SparseConvTensor, desc: str):
    """Run ``build(indices)``; if the sites repeat, build on the unique sites instead and return the
    :class:`DuplicateSites` too (None when the sites are unique)."""
    try:
        return build(input.indices), None
    except ValueError as err:
        if "duplicate sites" not in str(err):
            raise
    dups = DuplicateSites(input.indices, input.spatial_shape)
    duplicate_sites_found(desc, dups.num_rows - dups.num_sites)
    return build(dups.unique_indices), dups


def with_key(indice_dict: Dict, key: Optional[str], data: IndiceData) -> Dict:
    """The dict for the output tensor: the input's, plus ``key -> data`` when the key is new."""
    if key is None or key in indice_dict:
        return indice_dict
    new = dict(indice_dict)
    new[key] = data
    return new


def subm_map(input: SparseConvTensor, key: Optional[str], ksize: List[int], dilation: List[int], algo,
             desc: str) -> IndiceData:
    data = input.find_indice_pair(key)
    if data is not None:
        if not data.is_subm:
            raise ValueError(f"{desc}: indice_key {key!r} was created by a regular/transposed conv or pool "
                             f"(kernel_size={data.ksize}, stride={data.stride}); a SubM layer cannot reuse it. "
                             "Give the SubM layers their own key.")
        if data.ksize != list(ksize) or data.dilation != list(dilation):
            raise ValueError(f"{desc}: indice_key {key!r} holds a SubM map with kernel_size={data.ksize}, "
                             f"dilation={data.dilation}; layers sharing a key need the same kernel size and dilation. "
                             "Use a different indice_key for this layer.")
        if data.spatial_shape != list(input.spatial_shape) or data.indices.shape[0] != input.indices.shape[0]:
            raise ValueError(f"{desc}: indice_key {key!r} was built on {data.indices.shape[0]} sites with spatial_shape "
                             f"{data.spatial_shape}, but this input has {input.indices.shape[0]} sites with "
                             f"spatial_shape {input.spatial_shape}. SubM layers at different resolutions need "
                             "different indice_keys.")
        return data
    pad = [(k // 2) * d for k, d in zip(ksize, dilation)]
    table, dups = _build(lambda idx: ops.build_subm_map(idx, input.spatial_shape, ksize, dilation, input.batch_size),
                         input, desc)
    return IndiceData(input.indices, input.indices, table, None, input.spatial_shape, input.spatial_shape, True,
                      algo, ksize, [1] * len(ksize), dilation, pad, dups=dups)


def conv_map(input: SparseConvTensor, key: Optional[str], ksize: List[int], stride: List[int], padding: List[int],
             dilation: List[int], algo, desc: str, transposed: bool = False,
             output_padding: Optional[List[int]] = None) -> IndiceData:
    if key is not None and key in input.indice_dict:
        raise ValueError(f"{desc}: indice_key {key!r} already exists in this tensor; only SubM layers share keys. "
                         "Give each strided/transposed conv and each pool a new key.")
    if transposed:
        out_shape = ops.get_deconv_output_size(input.spatial_shape, ksize, stride, padding, dilation,
                                               output_padding or [0] * len(ksize))
    else:
        out_shape = ops.get_conv_output_size(input.spatial_shape, ksize, stride, padding, dilation)
    ops._check_grid(out_shape, f"{desc} with stride={list(stride)}, padding={list(padding)}: output", input.batch_size)
    (out_indices, table), dups = _build(
        lambda idx: ops.build_conv_map(idx, input.spatial_shape, out_shape, ksize, stride, padding, dilation,
                                       transposed, input.batch_size), input, desc)
    return IndiceData(out_indices, input.indices, table, None, input.spatial_shape, out_shape, False, algo, ksize,
                      stride, dilation, padding, dups=dups)


def identity_map(input: SparseConvTensor, key: Optional[str], ndim: int, algo) -> Dict:
    """The indice_dict after a kernel-1, stride-1 conv with ``key``: the key maps each site to itself, so
    a matching kernel-1 SparseInverseConv finds it."""
    if key is None or key in input.indice_dict:
        return input.indice_dict
    n = input.indices.shape[0]
    table = torch.arange(n, dtype=torch.int32, device=input.indices.device).unsqueeze(1)
    ones, zeros = [1] * ndim, [0] * ndim
    data = IndiceData(input.indices, input.indices, table, None, input.spatial_shape, input.spatial_shape, False,
                      algo, ones, ones, ones, zeros)
    data._input_major = table
    return with_key(input.indice_dict, key, data)


def inverse_map(input: SparseConvTensor, key: str, ksize: List[int], desc: str,
                pointwise_ok: bool = False) -> Optional[IndiceData]:
    """The map an inverse conv runs in reverse. With ``pointwise_ok`` (a kernel-1 inverse conv) a missing or
    SubM key gives None: the layer is then a per-row matmul on the input sites, as in spconv 2.3.8."""
    data = input.find_indice_pair(key)
    if pointwise_ok and (data is None or data.is_subm):
        return None
    if data is None:
        raise ValueError(f"{desc}: the input has no kernel map under indice_key {key!r} (keys present: "
                         f"{list(input.indice_dict.keys())}). An inverse conv must follow, in the same network, the "
                         f"SparseConv/SparseMaxPool created with indice_key={key!r}.")
    if data.is_subm:
        raise ValueError(f"{desc}: indice_key {key!r} belongs to a SubM conv; inverse convs can only undo regular "
                         "(strided) convs and pools: use the key of the downsampling layer.")
    if data.ksize != list(ksize):
        raise ValueError(f"{desc}: indice_key {key!r} was created with kernel_size={data.ksize}; the inverse conv "
                         "must use the same kernel_size.")
    if list(input.spatial_shape) != data.out_spatial_shape or input.indices.shape[0] != data.out_indices.shape[0]:
        raise ValueError(f"{desc}: the input ({input.indices.shape[0]} sites, spatial_shape {input.spatial_shape}) is "
                         f"not the output of the layer that created indice_key {key!r} ({data.out_indices.shape[0]} "
                         f"sites, spatial_shape {data.out_spatial_shape}). A layer in between changed the sites: give "
                         "it its own indice_key and invert it too.")
    return data
