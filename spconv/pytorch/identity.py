from torch import nn


class Identity(nn.Module):
    """Returns its input unchanged (any type; a SparseConvTensor keeps features ``[N, C]`` and indices)."""

    def forward(self, input):
        return input

    def input_spatial_size(self, out_size):
        return out_size
