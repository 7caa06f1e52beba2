// Python module entry point: importing spconv._C loads the library, whose static initialisers
// register the operators as torch.ops.spconv.*.
#include <Python.h>

static struct PyModuleDef spconv_c_module = {PyModuleDef_HEAD_INIT, "_C", "spconv CPU kernels (torch.ops.spconv)",
                                             -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&spconv_c_module); }
