// Python module entry point: importing spconv._C loads the library, whose static initialisers
// register the operators as torch.ops.spconv.*. The module itself has one function, keep_freed_memory.
#include <Python.h>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

// keep_freed_memory(enable: bool) -> bool
//
// glibc serves every allocation above 32 MB with a fresh mmap and unmaps it on free, so each large
// tensor (a [146k, 64] fp32 feature map is 37 MB) is page-faulted and zeroed by the kernel again on every
// op: a 3-5 ms tax per op here. With enable=True, large blocks come from the heap and freed memory is kept
// for reuse (what PyTorch's CUDA caching allocator, jemalloc or tcmalloc do); enable=False restores
// glibc's defaults. Returns False where the C library is not glibc.
static PyObject* keep_freed_memory(PyObject*, PyObject* arg) {
  const int enable = PyObject_IsTrue(arg);
  if (enable < 0) return nullptr;
#if defined(__GLIBC__)
  const bool ok = enable ? (mallopt(M_MMAP_MAX, 0) == 1 && mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1)
                         : (mallopt(M_MMAP_MAX, 65536) == 1 && mallopt(M_TRIM_THRESHOLD, 128 * 1024) == 1);
  return PyBool_FromLong(ok);
#else
  Py_RETURN_FALSE;
#endif
}

static PyMethodDef spconv_c_methods[] = {
    {"keep_freed_memory", keep_freed_memory, METH_O,
     "keep_freed_memory(enable) -> bool: keep freed large blocks for reuse (glibc mallopt) instead of unmapping "
     "them; False where unsupported."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef spconv_c_module = {PyModuleDef_HEAD_INIT, "_C", "spconv CPU kernels (torch.ops.spconv)",
                                             -1, spconv_c_methods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&spconv_c_module); }
