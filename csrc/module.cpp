// The Python module fastinfer._C. Importing it runs the TORCH_LIBRARY registrations (static
// initialisers of this shared library); the module itself only carries build facts.
#include <Python.h>

#ifndef FASTINFER_CUDA_ARCHS
#define FASTINFER_CUDA_ARCHS ""
#endif
#ifdef FASTINFER_WITH_CUDA
constexpr int kWithCuda = 1;
#else
constexpr int kWithCuda = 0;
#endif

static PyModuleDef fastinfer_module = {
    PyModuleDef_HEAD_INIT, "_C", "fastinfer native ops, registered as torch.ops.fastinfer.*", -1, nullptr,
};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&fastinfer_module);
  if (m == nullptr) return nullptr;
  if (PyModule_AddIntConstant(m, "with_cuda", kWithCuda) < 0 ||
      PyModule_AddStringConstant(m, "cuda_archs", FASTINFER_CUDA_ARCHS) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
