"""Algorithm enums of the spconv 2.x API.

Every algorithm is accepted everywhere; this implementation picks its kernels by device and dtype,
so the choice only affects the bookkeeping that spconv code may read back (``layer.algo``).
"""
from enum import Enum


class ConvAlgo(Enum):
    Native = 0
    MaskImplicitGemm = 1
    MaskSplitImplicitGemm = 2


class AlgoHint(Enum):
    NoHint = 0b000
    Fowrard = 0b001  # sic: spelled as in spconv
    BackwardInput = 0b010
    BackwardWeight = 0b100
