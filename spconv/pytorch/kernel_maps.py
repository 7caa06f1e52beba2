"""indice_key bookkeeping: get the kernel map a layer needs from the tensor's indice_dict, or build it.

SubM layers with one key share one map; a strided/transposed conv or pool creates its key; an
inverse conv reuses the map of the layer that created its key. Misuse raises ValueError naming the
key, the layers' settings and the fix.
"""
from typing import Dict, List, Optional

from spconv.pytorch import ops
from spconv.pytorch.core import IndiceData, SparseConvTensor


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
    table = ops.build_subm_map(input.indices, input.spatial_shape, ksize, dilation, input.batch_size)
    return IndiceData(input.indices, input.indices, table, None, input.spatial_shape, input.spatial_shape, True,
                      algo, ksize, [1] * len(ksize), dilation, pad)


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
    out_indices, table = ops.build_conv_map(input.indices, input.spatial_shape, out_shape, ksize, stride, padding,
                                            dilation, transposed, input.batch_size)
    return IndiceData(out_indices, input.indices, table, None, input.spatial_shape, out_shape, False, algo, ksize,
                      stride, dilation, padding)


def inverse_map(input: SparseConvTensor, key: str, ksize: List[int], desc: str) -> IndiceData:
    data = input.find_indice_pair(key)
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
