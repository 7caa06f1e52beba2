// Python module entry point: importing spconv._C loads the library, whose static initialisers
// register the operators as torch.ops.spconv.*. The module itself has the caching allocator's two
// functions (src/cpu_allocator.cpp), use_caching_allocator, caching_allocator_stats and empty_cache, and conv_kernels.
#include <Python.h>

#include <cstdint>
#include <string>

#include "spconv/conv_avx512.h"
#include "spconv/conv_brgemm.h"
#include "spconv/cpu_features.h"
#include "spconv/implicit_gemm.h"

extern "C" bool spconv_install_caching_cpu_allocator();
extern "C" bool spconv_caching_cpu_allocator_stats(uint64_t out[8]);
extern "C" uint64_t spconv_caching_cpu_allocator_empty_cache();

static PyObject* use_caching_allocator(PyObject*, PyObject*) {
  return PyBool_FromLong(spconv_install_caching_cpu_allocator());
}

static PyObject* caching_allocator_stats(PyObject*, PyObject*) {
  uint64_t v[8];
  if (!spconv_caching_cpu_allocator_stats(v)) Py_RETURN_NONE;
  return Py_BuildValue("{s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K}", "hits", (unsigned long long)v[0], "misses",
                       (unsigned long long)v[1], "evictions", (unsigned long long)v[2], "live_bytes",
                       (unsigned long long)v[3], "cached_bytes", (unsigned long long)v[4], "peak_live_bytes",
                       (unsigned long long)v[5], "recent_peak_live_bytes", (unsigned long long)v[6], "idle_frees",
                       (unsigned long long)v[7]);
}

static PyObject* empty_cache(PyObject*, PyObject*) {
  uint64_t freed;
  Py_BEGIN_ALLOW_THREADS freed = spconv_caching_cpu_allocator_empty_cache();
  Py_END_ALLOW_THREADS return PyLong_FromUnsignedLongLong(freed);
}

// Which conv kernels this CPU runs: the AVX-512 implicit-GEMM ones or the portable gather + GEMM path.
static PyObject* conv_kernels(PyObject*, PyObject*) {
#ifdef SPCONV_HAS_AVX512_KERNELS
  if (spconv::cpu_has_avx512())
    return PyUnicode_FromString(spconv::cpu_has_avx512_bf16_dot()
                                    ? "AVX-512 implicit GEMM (fp32 FMA, bf16 vdpbf16ps)"
                                    : "AVX-512 implicit GEMM (fp32 FMA; bf16 through fp32)");
#endif
  return PyUnicode_FromString("portable gather + GEMM");
}

// The bf16 conv kernel in use: "brgemm", "avx512" or "portable" (SPCONV_BF16_KERNEL, or this CPU's best).
static PyObject* bf16_kernel(PyObject*, PyObject*) {
  return PyUnicode_FromString(spconv::bf16_kernel_name(spconv::bf16_kernel()));
}

static PyObject* set_bf16_kernel(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_Check(arg) ? PyUnicode_AsUTF8(arg) : nullptr;
  spconv::Bf16Kernel k;
  if (name == nullptr || !spconv::parse_bf16_kernel(name, &k)) {
    PyErr_SetString(PyExc_ValueError, "set_bf16_kernel: expected 'brgemm', 'avx512', 'fp32', 'portable' or 'auto'");
    return nullptr;
  }
  spconv::set_bf16_kernel(k, std::string(name) != "auto");
  return PyUnicode_FromString(spconv::bf16_kernel_name(spconv::bf16_kernel()));
}

// What the kernels derived from this CPU: cache sizes, AMX, tile rows of the implicit-GEMM kernels.
static PyObject* cpu_blocking(PyObject*, PyObject*) {
  const spconv::CacheSizes& c = spconv::cpu_cache_sizes();
  return Py_BuildValue("{s:L,s:L,s:s,s:O,s:O,s:s,s:L,s:L,s:L,s:L,s:L,s:d,s:s,s:L}", "l1d_bytes", (long long)c.l1d, "l2_bytes",
                       (long long)c.l2, "cache_source", c.source, "amx_bf16",
                       spconv::cpu_has_amx_bf16() ? Py_True : Py_False, "brgemm_compiled",
                       spconv::brgemm_conv_compiled() ? Py_True : Py_False, "bf16_kernel_auto",
                       spconv::bf16_kernel_name(spconv::bf16_kernel_auto()), "tile_rows_64",
                       (long long)spconv::implicit_gemm_tile_rows(64), "tile_rows_128",
                       (long long)spconv::implicit_gemm_tile_rows(128), "brgemm_tile_rows_64",
                       (long long)spconv::brgemm_tile_rows(64), "brgemm_tile_rows_128",
                       (long long)spconv::brgemm_tile_rows(128), "brgemm_block_rows",
                       (long long)spconv::kBrgemmBlockRows, "bf16_dot_speedup", spconv::bf16_dot_speedup(),
                       "bf16_small_layers", spconv::bf16_kernel_name(spconv::bf16_dot_or_fma()),
                       "brgemm_min_channels", (long long)spconv::kBrgemmMinChannels);
}

static PyMethodDef spconv_c_methods[] = {
    {"use_caching_allocator", use_caching_allocator, METH_NOARGS,
     "use_caching_allocator() -> bool: install spconv's caching allocator for large CPU tensors as PyTorch's CPU "
     "allocator (once per process); True when it is the CPU allocator."},
    {"caching_allocator_stats", caching_allocator_stats, METH_NOARGS,
     "caching_allocator_stats() -> dict or None: hits, misses, evictions, live_bytes, cached_bytes, "
     "peak_live_bytes, recent_peak_live_bytes, idle_frees of the caching allocator (blocks >= 1 MB); None when "
     "it is not installed."},
    {"empty_cache", empty_cache, METH_NOARGS,
     "empty_cache() -> int: return every block cached by spconv's caching allocator to the system (and trim "
     "glibc's heaps); the number of cached bytes released."},
    {"conv_kernels", conv_kernels, METH_NOARGS,
     "conv_kernels() -> str: the conv kernels this CPU runs (groups == 1, fp32/bf16)."},
    {"bf16_kernel", bf16_kernel, METH_NOARGS,
     "bf16_kernel() -> str: the bf16 conv kernel in use: 'brgemm' (oneDNN batch-reduce GEMM via torch, AMX tiles "
     "where the CPU has them), 'avx512' (AVX512-BF16 implicit GEMM), 'fp32' (bf16 features on the fp32 FMA "
     "kernels) or 'portable' (gather + GEMM)."},
    {"set_bf16_kernel", set_bf16_kernel, METH_O,
     "set_bf16_kernel(name) -> str: switch the bf16 conv kernel ('brgemm', 'avx512', 'fp32', 'portable', 'auto') for this "
     "process, e.g. for benchmarks; returns the kernel now in use (one the CPU cannot run degrades to the next)."},
    {"cpu_blocking", cpu_blocking, METH_NOARGS,
     "cpu_blocking() -> dict: cache sizes (and where they were read), AMX, and the tile rows the conv kernels "
     "derive from them."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef spconv_c_module = {PyModuleDef_HEAD_INIT, "_C", "spconv CPU kernels (torch.ops.spconv)",
                                             -1, spconv_c_methods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&spconv_c_module); }
