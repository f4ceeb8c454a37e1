// The Python module fastinfer._C. Importing it runs the TORCH_LIBRARY registrations (static
// initialisers of this shared library); the module itself only carries build facts.
#include <Python.h>

#include "fastinfer/gemm/gemv_prefetch.h"
#include "fastinfer/gemm/split_plan.h"
#ifdef FASTINFER_WITH_CUDA
#include "fastinfer/gemm/gemv.h"
#endif
#ifdef FASTINFER_HAS_SM90
#include "fastinfer/attention/prefill.h"
#include "fastinfer/gemm/fp8.h"
#include "fastinfer/gemm/w4a16.h"
#endif

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

// plan_int4_splits(units, items, items_per_round, overhead_rounds, resident, by_clusters[, max_splits]) ->
// (splits, waves, rounds, cost): gemm/split_plan.h's rule, which the W4A16 launchers apply to the occupancy API's
// counts; resident[s - 1] = clusters of s CTAs resident at once (resident[0] = CTA slots), up to 8.
static PyObject* plan_int4_splits(PyObject*, PyObject* args) {
  long long units = 0;
  int items = 0, per_round = 0, overhead = 0, by_clusters = 1, max_splits = fastinfer::split_plan::kMaxSplits;
  PyObject* resident = nullptr;
  if (!PyArg_ParseTuple(args, "LiiiOp|i", &units, &items, &per_round, &overhead, &resident, &by_clusters,
                        &max_splits)) {
    return nullptr;
  }
  PyObject* seq = PySequence_Fast(resident, "plan_int4_splits: resident must be a sequence of ints");
  if (seq == nullptr) return nullptr;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  if (n < 1 || n > fastinfer::split_plan::kMaxSplits) {
    Py_DECREF(seq);
    PyErr_SetString(PyExc_ValueError, "plan_int4_splits: resident must hold 1 to 8 counts");
    return nullptr;
  }
  fastinfer::split_plan::Residency r{};
  for (Py_ssize_t i = 0; i < n; ++i) {
    r.clusters[i + 1] = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(seq, i));
    if (r.clusters[i + 1] == -1 && PyErr_Occurred()) {  // the first bad count: stop calling the C API
      Py_DECREF(seq);
      return nullptr;
    }
  }
  Py_DECREF(seq);
  constexpr long long kMaxCount = 1LL << 40;  // keeps units * splits and the ceil divisions far from overflow
  bool counts_ok = true;
  for (int i = 1; i <= fastinfer::split_plan::kMaxSplits; ++i) counts_ok = counts_ok && r.clusters[i] <= kMaxCount;
  if (units < 0 || units > kMaxCount || items < 1 || per_round < 1 || overhead < 0 || r.clusters[1] < 1 ||
      !counts_ok || max_splits < 1) {
    PyErr_SetString(PyExc_ValueError,
                    "plan_int4_splits: 0 <= units <= 2**40, items >= 1, items_per_round >= 1, overhead_rounds >= 0, "
                    "1 <= resident[0] (CTA slots), resident counts <= 2**40 and max_splits >= 1");
    return nullptr;
  }
  const auto plan =
      fastinfer::split_plan::choose_splits(units, items, per_round, overhead, r, by_clusters != 0, max_splits);
  return Py_BuildValue("(iLLL)", plan.splits, static_cast<long long>(plan.waves), static_cast<long long>(plan.rounds),
                       static_cast<long long>(plan.cost));
}

// int4_last_launch() -> dict of the last int4_linear launch's plan (kernel, splits, ctas, waves, units,
// items, items_per_round, resident: clusters of 1..8 CTAs resident at once), or None in a build without
// the Hopper kernels.
static PyObject* int4_last_launch(PyObject*, PyObject*) {
#ifdef FASTINFER_HAS_SM90
  const fastinfer::Int4LaunchInfo info = fastinfer::w4a16_last_launch();
  static const char* kNames[] = {"none", "tiles", "small", "streamk", "wgmma"};
  const char* name = info.kernel >= 0 && info.kernel <= 4 ? kNames[info.kernel] : "none";
  PyObject* resident = PyList_New(fastinfer::split_plan::kMaxSplits);
  if (resident == nullptr) return nullptr;
  for (int s = 1; s <= fastinfer::split_plan::kMaxSplits; ++s) {
    PyObject* count = PyLong_FromLongLong(info.resident[s]);
    if (count == nullptr) {
      Py_DECREF(resident);
      return nullptr;
    }
    PyList_SET_ITEM(resident, s - 1, count);
  }
  return Py_BuildValue("{s:s,s:i,s:L,s:L,s:L,s:i,s:i,s:N}", "kernel", name, "splits", info.splits, "ctas",
                       static_cast<long long>(info.ctas), "waves", static_cast<long long>(info.waves), "units",
                       static_cast<long long>(info.units), "items", info.items, "items_per_round",
                       info.items_per_round, "resident", resident);
#else
  Py_RETURN_NONE;
#endif
}

// plan_gemv_prefetch(next_rows, row_bytes, budget, swiglu, slots, tiles) -> (rows, second, bytes, first_cta):
// gemm/gemv_prefetch.h's rule (the decode GEMV's L2 prefetch of the next GEMV's weight); rows 0: none.
static PyObject* plan_gemv_prefetch(PyObject*, PyObject* args) {
  long long next_rows = 0, row_bytes = 0, budget = 0, slots = 0, tiles = 0;
  int swiglu = 0;
  if (!PyArg_ParseTuple(args, "LLLpLL", &next_rows, &row_bytes, &budget, &swiglu, &slots, &tiles)) return nullptr;
  constexpr long long kMax = 1LL << 40;
  if (next_rows < 0 || next_rows > (1LL << 30) || row_bytes < 0 || row_bytes > kMax || budget < 0 || budget > kMax ||
      slots < 0 || slots > (1LL << 30) || tiles < 0 || tiles > (1LL << 30)) {
    PyErr_SetString(PyExc_ValueError, "plan_gemv_prefetch: counts must be >= 0 (rows, slots, tiles <= 2**30)");
    return nullptr;
  }
  static const char kAny = 0;  // any non-null address: the rule only needs to know there is a weight
  const fastinfer::GemvPrefetchPlan pf =
      fastinfer::plan_gemv_prefetch(&kAny, next_rows, row_bytes, budget, swiglu != 0, slots, tiles);
  return Py_BuildValue("(iiii)", pf.base ? pf.rows : 0, pf.second, pf.bytes, pf.first_cta);
}

// gemv_last_prefetch() -> dict of the last decode-GEMV launch given a prefetch (rows, second, bytes,
// first_cta, tiles, slots; rows 0: its plan was empty), or None in a CPU-only build.
static PyObject* gemv_last_prefetch(PyObject*, PyObject*) {
#ifdef FASTINFER_WITH_CUDA
  const fastinfer::GemvPrefetchInfo info = fastinfer::gemv_last_prefetch();
  return Py_BuildValue("{s:i,s:i,s:i,s:i,s:i,s:i}", "rows", info.rows, "second", info.second, "bytes", info.bytes,
                       "first_cta", info.first_cta, "tiles", info.tiles, "slots", info.slots);
#else
  Py_RETURN_NONE;
#endif
}

// fp8_last_launch() -> dict of the last fp8_scaled_mm launch (kernel "wgmma" / "gemv", tile, swapped,
// splits, grid, cluster, multicast, units), or None in a build without the Hopper kernels.
static PyObject* fp8_last_launch(PyObject*, PyObject*) {
#ifdef FASTINFER_HAS_SM90
  const fastinfer::Fp8LaunchInfo info = fastinfer::fp8_last_launch();
  static const char* kNames[] = {"none", "wgmma", "gemv"};
  const char* name = info.kernel >= 0 && info.kernel <= 2 ? kNames[info.kernel] : "none";
  return Py_BuildValue("{s:s,s:(ii),s:O,s:i,s:i,s:i,s:O,s:i,s:O}", "kernel", name, "tile", info.block_p, info.block_q,
                       "swapped", info.swapped ? Py_True : Py_False, "splits", info.splits, "grid", info.grid,
                       "cluster", info.cluster, "multicast", info.multicast ? Py_True : Py_False, "units", info.units,
                       "pingpong", info.pingpong ? Py_True : Py_False);
#else
  Py_RETURN_NONE;
#endif
}

// prefill_tma_launches() -> launches of the sm_90a prefill that loaded K / V by TMA (0 without sm_90a).
static PyObject* prefill_tma_launches(PyObject*, PyObject*) {
#ifdef FASTINFER_HAS_SM90
  return PyLong_FromLongLong(fastinfer::prefill_tma_launch_count());
#else
  return PyLong_FromLongLong(0);
#endif
}

static PyMethodDef fastinfer_methods[] = {
    {"pdl_launches", pdl_launches, METH_NOARGS, "kernel launches with the PDL attribute so far (FASTINFER_PDL=1)"},
    {"plan_int4_splits", plan_int4_splits, METH_VARARGS,
     "the W4A16 split-K rule (gemm/split_plan.h): (units, items, items_per_round, overhead_rounds, resident, "
     "by_clusters[, max_splits]) -> (splits, waves, rounds, cost)"},
    {"int4_last_launch", int4_last_launch, METH_NOARGS, "the last int4_linear launch's plan, or None without sm_90a"},
    {"fp8_last_launch", fp8_last_launch, METH_NOARGS, "the last fp8_scaled_mm launch, or None without sm_90a"},
    {"plan_gemv_prefetch", plan_gemv_prefetch, METH_VARARGS,
     "the decode GEMV's L2 prefetch rule (gemm/gemv_prefetch.h): (next_rows, row_bytes, budget, swiglu, slots, "
     "tiles) -> (rows, second, bytes, first_cta)"},
    {"gemv_last_prefetch", gemv_last_prefetch, METH_NOARGS,
     "the last decode-GEMV launch given a prefetch: its plan, or None in a CPU-only build"},
    {"prefill_tma_launches", prefill_tma_launches, METH_NOARGS,
     "launches of the sm_90a prefill that loaded K / V by TMA (FASTINFER_ATTN_KV_LOAD=tma)"},
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
