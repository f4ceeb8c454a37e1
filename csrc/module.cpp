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

#ifdef FASTINFER_WITH_CUDA
namespace fastinfer {
long long pdl_launch_count();  // csrc/include/fastinfer/common.cuh
}
#endif

// pdl_launches(): kernel launches so far that carried the programmatic-dependent-launch attribute
// (FASTINFER_PDL=1); 0 in a CPU-only build.
static PyObject* pdl_launches(PyObject*, PyObject*) {
#ifdef FASTINFER_WITH_CUDA
  return PyLong_FromLongLong(fastinfer::pdl_launch_count());
#else
  return PyLong_FromLongLong(0);
#endif
}

static PyMethodDef fastinfer_methods[] = {
    {"pdl_launches", pdl_launches, METH_NOARGS, "kernel launches with the PDL attribute so far (FASTINFER_PDL=1)"},
    {nullptr, nullptr, 0, nullptr},
};

static PyModuleDef fastinfer_module = {
    PyModuleDef_HEAD_INIT, "_C", "fastinfer native ops, registered as torch.ops.fastinfer.*", -1, fastinfer_methods,
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
