// Python module entry point: importing spconv._C loads the library, whose static initialisers
// register the operators as torch.ops.spconv.*. The module itself has one function,
// use_caching_allocator (src/cpu_allocator.cpp).
#include <Python.h>

extern "C" bool spconv_install_caching_cpu_allocator();

static PyObject* use_caching_allocator(PyObject*, PyObject*) {
  return PyBool_FromLong(spconv_install_caching_cpu_allocator());
}

static PyMethodDef spconv_c_methods[] = {
    {"use_caching_allocator", use_caching_allocator, METH_NOARGS,
     "use_caching_allocator() -> bool: install spconv's caching allocator for large CPU tensors as PyTorch's CPU "
     "allocator (once per process); True when it is the CPU allocator."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef spconv_c_module = {PyModuleDef_HEAD_INIT, "_C", "spconv CPU kernels (torch.ops.spconv)",
                                             -1, spconv_c_methods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&spconv_c_module); }
