// Python module entry point: importing spconv._C loads the library, whose static initialisers
// register the operators as torch.ops.spconv.*. The module itself has the caching allocator's two
// functions (src/cpu_allocator.cpp), use_caching_allocator, caching_allocator_stats and empty_cache, and conv_kernels.
#include <Python.h>

#include <cstdint>

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
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef spconv_c_module = {PyModuleDef_HEAD_INIT, "_C", "spconv CPU kernels (torch.ops.spconv)",
                                             -1, spconv_c_methods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&spconv_c_module); }
