"""Process-wide flags with spconv 2.x names (downstream code sets some of them after import)."""
import os

ALL_WEIGHT_IS_KRSC = True
FILTER_HWIO = False
SPCONV_CPP_INDICE_PAIRS = True
SPCONV_CPP_INDICE_PAIRS_IGEMM = False
SPCONV_CPP_GEMM = True
SPCONV_USE_DIRECT_TABLE = True  # OpenPCDet sets this after `import spconv`; kernel maps ignore it
SPCONV_DIRECT_TABLE_HASH_SIZE_SCALE = 1.1
SPCONV_ALLOW_TF32 = False
SPCONV_DEBUG_WEIGHT = False
SPCONV_DO_SORT = os.getenv("SPCONV_DO_SORT", "1") == "1"
SPCONV_FX_TRACE_MODE = os.getenv("SPCONV_FX_TRACE_MODE", "0") == "1"
SPCONV_SAVED_WEIGHT_LAYOUT = os.getenv("SPCONV_SAVED_WEIGHT_LAYOUT", "")
SPCONV_DEBUG_SAVE_PATH = os.getenv("SPCONV_DEBUG_SAVE_PATH", "")
NDIM_DONT_CARE = 3

# spconv <= 2.3.8 computes a 1x1 conv (kernel volume 1, stride 1) as features @ weight.view(in, out),
# which reinterprets the [out, 1.., in] weight instead of transposing it (its issue #450). This library
# computes the true convolution. Set this to True to reproduce spconv's numbers for checkpoints trained
# with that behaviour.
SPCONV_LEGACY_1X1_WEIGHT_VIEW = False

# Indices with duplicate sites (two rows with the same batch and coordinates) are accepted, with one
# warning per process, and handled as spconv 2.3.8 does (see the README). True makes them an error.
SPCONV_STRICT_INDICES = os.getenv("SPCONV_STRICT_INDICES", "0") == "1"
