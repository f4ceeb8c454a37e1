#!/usr/bin/env bash
# Everything a GPU visit is for, in one command that ends well inside 8 minutes:
#   environment -> build + install (ptxas -v report) -> spill check -> `python -m fastinfer env`
#   -> pytest -m cuda -> C++ microbenchmarks (bench/bench_*.cu) -> every bench/bench_*.py
#   -> report.json + report.md (the table is printed last).
#
#   OUT=/some/dir COMMIT=<sha> bash bench/gpu_check.sh
#
# OUT     where results go (build.log, env.txt, tests.json, pytest-<n>.xml, bench/*.json, report.{json,md}). Unset:
#         bench/results/tmp-<date>, and the report is also copied to bench/results/<date>-<card>.{json,md}.
# COMMIT  the commit this tree is (named in the report; git is asked only when it is unset).
# GPU_CHECK_BUDGET_S  seconds all steps may take together (default 420); GPU_CHECK_CLEAN=1: fresh build dir.
# GPU_CHECK_TESTS=0   skip pytest (a second visit that only benchmarks).
# GPU_CHECK_TEST_SHARDS  pytest processes run at once on the GPU (default 3; 1: one process).
# GPU_CHECK_REUSE_BUILD=1  keep the CUDA objects of an earlier run in build/gpu_check (a second visit on a
#                     warm machine: the install takes seconds, but there is no ptxas report this time).
# GPU_CHECK_BENCH_LIMIT_S  seconds one Python benchmark may take (default 150, e2e 240; within the budget).
#                     Past it a benchmark gets SIGINT and writes what it measured (bench_e2e; the others
#                     measure in seconds).
# GPU_CHECK_E2E_ARGS  extra arguments of bench_e2e.py, e.g. "--mode full" (HF static cache + torch.compile,
#                     1000 offline requests: a visit of its own, GPU_CHECK_BENCH=e2e GPU_CHECK_BENCH_LIMIT_S=500).
# GPU_CHECK_SANITIZE  compute-sanitizer tools run over bench/sanitize_tests.txt at the end, with the time
#                     left (default memcheck; e.g. "memcheck racecheck synccheck"; empty: none).
# GPU_CHECK_BENCH     the benchmarks to run, in order, e.g. "attention e2e" (names: bench_<name>.py and
#                     prefill_cpp / decode_cpp / stream_cpp); default all, by priority: $BENCH_ORDER then the rest;
#                     "none": no benchmark (e.g. a visit for GPU_CHECK_SANITIZE alone).
# GPU_CHECK_NCU       Nsight Compute profiles, after the benchmarks (default none): targets of
#                     bench/ncu_targets.py, e.g. "prefill decode_fp8 int4_m64"; one kernel launch each,
#                     sections SpeedOfLight, Occupancy, SchedulerStats, WarpStateStats, MemoryWorkloadAnalysis,
#                     LaunchStats, into ncu-<target>.txt (~20-40 s a target).
# FASTINFER_BENCH_FLUSH  read: every benchmark flushes L2 by reading 256 MB instead of writing it
#                     (bench/common.py); stream_cpp times dense_gemv and a plain read under both in any case.
#
# Exit status: nonzero when the build, the spill check, the env check (CUDA kernels built, a GPU
# visible, the installed package imported) or the tests failed. Benchmarks are reported, not judged.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"  # the tree has no fastinfer/ at its root, so `import fastinfer` here finds the installed package
DATE=$(date -u +%F)
RESULTS_DIR=""
if [[ -z "${OUT:-}" ]]; then
  OUT="$REPO/bench/results/tmp-$DATE"
  RESULTS_DIR="$REPO/bench/results"
fi
mkdir -p "$OUT/bench"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-$(command -v python || command -v python3)}
BUILD_DIR=build/gpu_check
BUDGET=${GPU_CHECK_BUDGET_S:-420}
# Kernel benchmarks that settle issue targets in seconds first (stream_cpp among them: its GEMV chain
# rows decide FASTINFER_GEMV_PREFETCH_MB, issue 9); e2e (minutes: it builds an 8B model four ways) takes
# what is left after them, then the diagnostic ones.
BENCH_ORDER="prefill_cpp decode_cpp stream_cpp attention fp8_kv spec_verify int4 fp8 e2e gemv layers"
TEST_ORDER="tests/test_ops.py tests/test_e2e_cuda.py tests/test_forward_kernels_cuda.py tests/test_sampling.py
  tests/test_generate.py tests/test_decode_graphs.py tests/test_spec_verify.py tests/test_gemv.py tests/test_gemv_fused_norm.py tests/test_gemv_fp8.py tests/test_int4.py tests/test_fp8.py
  tests/test_fp8_model.py tests/test_fp8_kv.py
  tests/test_attention_prefill_cuda.py tests/test_attention_decode_cuda.py tests/test_attention_fp8_cuda.py"
if [[ -n "${GPU_CHECK_BENCH:-}" ]]; then
  SELECTED=" $GPU_CHECK_BENCH "
else
  SELECTED=" $BENCH_ORDER "
  for script in bench/bench_*.py; do
    n=$(basename "$script" .py); n=${n#bench_}
    [[ "$SELECTED" == *" $n "* ]] || SELECTED="$SELECTED$n "
  done
fi
selected() { [[ "$SELECTED" == *" $1 "* ]]; }
START=$SECONDS
: > "$OUT/steps.tsv"

section() { printf '\n==== %s (%ds elapsed)\n' "$1" $((SECONDS - START)); }
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4:-}" >> "$OUT/steps.tsv"; }
# A step's time limit: what it wants, cut to the budget left (keeping 20 s for the report), at least 10 s.
limit() {
  local left=$((BUDGET - (SECONDS - START) - 20))
  if ((left > $1)); then left=$1; fi
  if ((left < 10)); then left=10; fi
  echo "$left"
}

commit_id() {  # $COMMIT when given, else git when this tree is a checkout of its own, else "unknown"
  # ($COMMIT first: the device tool's copy of the tree carried a .git from earlier in the session, so
  # git named an older commit, "-dirty", on 2026-11-28)
  if [[ -n "${COMMIT:-}" ]]; then echo "$COMMIT"; return; fi
  local top
  if top=$(git -C "$REPO" rev-parse --show-toplevel 2>/dev/null) && [[ "$top" -ef "$REPO" ]]; then
    local sha
    sha=$(git -C "$REPO" rev-parse HEAD)
    if [[ -n "$(git -C "$REPO" status --porcelain 2>/dev/null)" ]]; then sha="$sha-dirty"; fi
    echo "$sha"
  else
    echo unknown
  fi
}
COMMIT_ID=$(commit_id)

print_env() {
  echo "date     $(date -u '+%F %T UTC')"
  echo "host     $(hostname), $(nproc) CPUs"
  echo "commit   $COMMIT_ID"
  echo "repo     $REPO"
  echo "out      $OUT"
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi -L
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit --format=csv
  else
    echo "nvidia-smi: not found"
  fi
  "$PY" -c 'import sys, torch
print("python  ", sys.version.split()[0], sys.executable)
print("torch   ", torch.__version__, "CUDA", torch.version.cuda, "cuDNN", torch.backends.cudnn.version())
print("gpu     ", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none visible to torch")'
  local nvcc=${CUDACXX:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
  echo "nvcc     $nvcc: $("$nvcc" --version 2>&1 | grep -i release || echo 'not found')"
  echo "cmake    $(cmake --version 2>&1 | head -n 1)"
  echo "ninja    $(ninja --version 2>&1)"
}

section environment
print_env 2>&1 | tee "$OUT/env.txt" || true

# ---- build and install ---------------------------------------------------------------------------
section "build and install (log: $OUT/build.log)"
CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
export CMAKE_BUILD_PARALLEL_LEVEL
if [[ "${GPU_CHECK_CLEAN:-0}" == 1 ]]; then rm -rf "$BUILD_DIR"; fi
# ptxas reports only what it compiles: drop the CUDA objects of an earlier run (the build dir stays
# on a warm machine) so that every kernel is compiled, and reported, again.
if [[ -d "$BUILD_DIR" && "${GPU_CHECK_REUSE_BUILD:-0}" != 1 ]]; then find "$BUILD_DIR" -name '*.cu.o' -delete; fi
pip_install() {
  FASTINFER_CUDA=ON PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 timeout -k 10 "$(limit 300)" \
    "$PY" -m pip install --no-build-isolation --no-deps -v . \
    -Ccmake.define.FASTINFER_PTXAS_VERBOSE=ON -Ccmake.define.FASTINFER_BUILD_BENCH=OFF \
    -Cbuild-dir="$BUILD_DIR" "$@"
}
t0=$SECONDS
build_rc=0
pip_install > "$OUT/build.log" 2>&1 || build_rc=$?
if ((build_rc != 0)) && grep -q externally-managed-environment "$OUT/build.log"; then
  echo "pip refused to install into an externally managed Python; retrying with --break-system-packages"
  build_rc=0
  pip_install --break-system-packages >> "$OUT/build.log" 2>&1 || build_rc=$?
fi
record build "$build_rc" $((SECONDS - t0))
if ((build_rc == 0)); then
  grep -E "^ *\[[0-9]+/[0-9]+\]|Successfully installed" "$OUT/build.log" || true
  grep -iE "ptxas (warning|error)|spill" "$OUT/build.log" | grep -v " 0 bytes spill stores, 0 bytes spill loads" || true
else
  echo "BUILD FAILED (exit $build_rc); end of the log:"
  tail -n 60 "$OUT/build.log"
fi

# ---- env check: kernels built, GPU visible, installed package imported (not python/fastinfer) ---
section "python -m fastinfer env"
if ((build_rc == 0)); then
  t0=$SECONDS
  env_rc=0
  "$PY" -m fastinfer env 2>&1 | tee "$OUT/fastinfer_env.txt" || env_rc=$?
  "$PY" - "$REPO" "$OUT/fastinfer_env.json" <<'EOF' || env_rc=$?
import json, os, sys

repo, out = (os.path.realpath(p) for p in sys.argv[1:3])
import fastinfer
from fastinfer.env import env_info

info = env_info()
info["package_dir"] = os.path.dirname(os.path.realpath(fastinfer.__file__))
info["extension"] = os.path.realpath(fastinfer.ops._C.__file__)
with open(out, "w") as f:
    json.dump(info, f, indent=1)
print(f"imported fastinfer from {info['package_dir']}\n  extension {info['extension']}")
problems = []
for key, tree in (("package_dir", "python"), ("extension", "build")):
    if (info[key] + os.sep).startswith(os.path.join(repo, tree) + os.sep):
        problems.append(f"{key} {info[key]} lies in the source tree (an editable install or PYTHONPATH), "
                        "not in the package just installed")
if not info["cuda_kernels_built"]:
    problems.append("the extension was built without CUDA kernels")
if info["gpu"] is None:
    problems.append("torch sees no GPU")
for problem in problems:
    print("ERROR:", problem)
sys.exit(1 if problems else 0)
EOF
  record env "$env_rc" $((SECONDS - t0))
else
  record env skip 0 "build failed"
fi

# ---- tests ---------------------------------------------------------------------------------------
section "pytest -m cuda"
if [[ "${GPU_CHECK_TESTS:-1}" == 0 ]]; then
  record pytest skip 0 "GPU_CHECK_TESTS=0"
elif ((build_rc == 0)); then
  t0=$SECONDS
  test_rc=0
  # run_tests.py: a test that breaks the CUDA context or kills pytest costs that test only (pytest
  # runs again on the tests not yet started); outcomes in $OUT/tests.json, each run's junit xml.
  # Files in priority order, should the budget run out: the basic ops and the model checks first, the
  # big attention sweeps last (pytest keeps the order of files named one by one, not of a directory).
  test_files=()
  for f in $TEST_ORDER tests/test_*.py; do
    [[ -e "$f" && " ${test_files[*]} " != *" $f "* ]] && test_files+=("$f")
  done
  # --test-timeout: a hung kernel costs its test and 120 s, not the rest of the run (the ledger plugin's
  # watchdog ends the process; run_tests.py goes on after the test).
  # --shards: pytest processes at once on the one GPU (each every n-th test, in this priority order):
  # a small test's time is mostly the host's, and the machine has 16 cores.
  "$PY" bench/run_tests.py --out "$OUT" --budget-s "$(limit 200)" --test-timeout 120 \
    --shards "${GPU_CHECK_TEST_SHARDS:-3}" -- \
    -m cuda -q -rs --durations=25 -p no:cacheprovider "${test_files[@]}" 2>&1 | tee "$OUT/pytest.log" || test_rc=$?
  record pytest "$test_rc" $((SECONDS - t0)) "$(grep '^==== run_tests: .* run(s)' "$OUT/pytest.log" | tail -n 1 | cut -c 17-)"
else
  record pytest skip 0 "build failed"
fi

# ---- isolation: model-level failures again with the decode-step fusions off -----------------------
# The default decode path fuses RMSNorm / rotary into the GEMVs and the split merge into attention
# (models/llama.py, decode_work.cuh). Should a model-level test fail, the same tests rerun with all
# three off: if they pass, the fusions are to blame, and this one GPU run already says so.
if [[ -f "$OUT/tests.json" ]] && ((build_rc == 0)) && ((BUDGET - (SECONDS - START) >= 60)); then
  mapfile -t isolate < <("$PY" - "$OUT/tests.json" <<'EOF'
import json, sys
model_files = ("tests/test_e2e_cuda.py", "tests/test_generate.py", "tests/test_decode_graphs.py",
               "tests/test_forward_kernels_cuda.py", "tests/test_engine.py", "tests/test_llm.py",
               "tests/test_spec_engine.py", "tests/test_smollm2.py")
failed = [n for n, t in json.load(open(sys.argv[1]))["tests"].items()
          if t["outcome"] in ("failed", "error") and n.startswith(model_files)]  # not cut by the budget
print("\n".join(failed[:20]))
EOF
)
  if ((${#isolate[@]} > 0)) && [[ -n "${isolate[0]}" ]]; then
    section "isolation: ${#isolate[@]} failed model test(s) with FASTINFER_FUSED_NORM=0 FASTINFER_DECODE_MERGE=kernel"
    t0=$SECONDS
    iso_rc=0
    FASTINFER_FUSED_NORM=0 FASTINFER_DECODE_MERGE=kernel timeout -k 10 "$(limit 90)" \
      "$PY" -m pytest -q -p no:cacheprovider "${isolate[@]}" > "$OUT/isolate.log" 2>&1 || iso_rc=$?
    tail -n 15 "$OUT/isolate.log"
    record isolate "$iso_rc" $((SECONDS - t0)) "${#isolate[@]} failed model test(s) rerun with the fusions off (isolate.log): ok = they pass without the fusions, which are then to blame"
  fi
fi

# ---- C++ microbenchmarks: bench_*.cu, kernel objects + cudart, no torch ---------------------------
# The package above is built without them (a bench compile error must not cost the tests); here the
# same build dir is reconfigured with FASTINFER_BUILD_BENCH=ON, so only bench/*.cu are compiled.
section "C++ microbenchmarks (log: $OUT/bench_build.log)"
cpp_build_rc=skip
if ! selected prefill_cpp && ! selected decode_cpp && ! selected stream_cpp; then
  record build:bench skip 0 "not selected"
elif ((build_rc != 0)); then
  record build:bench skip 0 "build failed"
elif ((BUDGET - (SECONDS - START) < 60)); then
  echo "skipped: the time budget (${BUDGET}s) is spent"
  record build:bench skip 0 "no time left"
else
  t0=$SECONDS
  cpp_build_rc=0
  { timeout -k 10 "$(limit 60)" cmake -S . -B "$BUILD_DIR" -DFASTINFER_BUILD_BENCH=ON &&
    timeout -k 10 "$(limit 150)" cmake --build "$BUILD_DIR" --target bench_prefill bench_decode bench_stream; } \
    > "$OUT/bench_build.log" 2>&1 || cpp_build_rc=$?
  record build:bench "$cpp_build_rc" $((SECONDS - t0))
  if ((cpp_build_rc != 0)); then
    echo "C++ benchmark build failed (exit $cpp_build_rc); end of the log:"
    tail -n 30 "$OUT/bench_build.log"
  fi
fi
for name in prefill decode stream; do
  step="bench:${name}_cpp"
  selected "${name}_cpp" || continue
  if [[ "$cpp_build_rc" != 0 ]]; then
    record "$step" skip 0 "C++ benchmarks not built"
    continue
  fi
  if ((BUDGET - (SECONDS - START) < 45)); then
    record "$step" skip 0 "no time left"
    continue
  fi
  section "benchmark ${name}_cpp"
  t0=$SECONDS
  bench_rc=0
  timeout -s INT -k 10 "$(limit 60)" "$BUILD_DIR/bench_$name" --json "$OUT/bench/${name}_cpp.json" 2>&1 \
    | tee "$OUT/bench/${name}_cpp.log" || bench_rc=$?
  record "$step" "$bench_rc" $((SECONDS - t0))
done

# ---- benchmarks ----------------------------------------------------------------------------------
for name in $SELECTED; do
  script=bench/bench_$name.py
  [[ -e "$script" ]] || continue
  section "benchmark $name"
  if ((build_rc != 0)); then
    record "bench:$name" skip 0 "build failed"
    continue
  fi
  if ((BUDGET - (SECONDS - START) < 45)); then
    echo "skipped: the time budget (${BUDGET}s) is spent"
    record "bench:$name" skip 0 "no time left"
    continue
  fi
  t0=$SECONDS
  bench_rc=0
  extra=()  # e.g. GPU_CHECK_E2E_ARGS="--mode full" for the HF static-cache + torch.compile peer
  if [[ "$name" == e2e && -n "${GPU_CHECK_E2E_ARGS:-}" ]]; then read -ra extra <<< "$GPU_CHECK_E2E_ARGS"; fi
  bench_limit=${GPU_CHECK_BENCH_LIMIT_S:-150}
  if [[ "$name" == e2e && -z "${GPU_CHECK_BENCH_LIMIT_S:-}" ]]; then bench_limit=240; fi  # builds an 8B model 4 ways
  timeout -s INT -k 15 "$(limit "$bench_limit")" "$PY" "$script" --out "$OUT/bench/$name.json" "${extra[@]}" 2>&1 \
    | tee "$OUT/bench/$name.log" || bench_rc=$?
  record "bench:$name" "$bench_rc" $((SECONDS - t0))
done

# ---- Nsight Compute: one launch of each named kernel (bench/ncu_targets.py), for the stall reasons ----
NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
for target in ${GPU_CHECK_NCU:-}; do
  step="ncu:$target"
  if ((build_rc != 0)); then record "$step" skip 0 "build failed"; continue; fi
  if [[ ! -x "$NCU" ]]; then record "$step" skip 0 "ncu not found"; continue; fi
  if ((BUDGET - (SECONDS - START) < 60)); then record "$step" skip 0 "no time left"; continue; fi
  section "ncu $target"
  kernel=$("$PY" -c "import sys; sys.path.insert(0, 'bench'); import ncu_targets as t; print(t.KERNELS['$target'])" \
    2>/dev/null) || { record "$step" 1 0 "unknown target"; continue; }
  t0=$SECONDS
  ncu_rc=0
  timeout -s INT -k 15 "$(limit 90)" "$NCU" --target-processes all -k "regex:$kernel" -s 3 -c 1 \
    --section SpeedOfLight --section Occupancy --section SchedulerStats --section WarpStateStats \
    --section MemoryWorkloadAnalysis --section LaunchStats \
    "$PY" bench/ncu_targets.py "$target" > "$OUT/ncu-$target.txt" 2>&1 || ncu_rc=$?
  tail -n 5 "$OUT/ncu-$target.txt" || true
  record "$step" "$ncu_rc" $((SECONDS - t0)) "kernel ~ $kernel"
done

# ---- compute-sanitizer over a small selection of the cuda tests (bench/sanitize_tests.txt) --------
# memcheck (out-of-bounds and misaligned accesses), and on request racecheck (shared-memory hazards),
# synccheck (barrier misuse), initcheck. Each tool's findings go to sanitize-<tool>.log, pytest's
# output to sanitize-<tool>.pytest.log; exit 86 = the tool reported errors. Last, with what is left.
SANITIZE_TOOLS=${GPU_CHECK_SANITIZE-memcheck}
SANITIZER=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
for tool in $SANITIZE_TOOLS; do
  step="sanitize:$tool"
  if ((build_rc != 0)); then record "$step" skip 0 "build failed"; continue; fi
  if [[ ! -x "$SANITIZER" ]]; then record "$step" skip 0 "compute-sanitizer not found"; continue; fi
  if ((BUDGET - (SECONDS - START) < 60)); then record "$step" skip 0 "no time left"; continue; fi
  section "compute-sanitizer --tool $tool"
  mapfile -t sanitize_ids < <(grep -v '^#' bench/sanitize_tests.txt | grep .)
  t0=$SECONDS
  san_rc=0
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -s INT -k 15 "$(limit 150)" "$SANITIZER" --tool "$tool" \
    --target-processes all --report-api-errors no --error-exitcode 86 --print-limit 100 \
    --log-file "$OUT/sanitize-$tool.log" \
    "$PY" -m pytest -q -p no:cacheprovider -m cuda "${sanitize_ids[@]}" > "$OUT/sanitize-$tool.pytest.log" 2>&1 \
    || san_rc=$?
  tail -n 3 "$OUT/sanitize-$tool.pytest.log" || true
  # (|| true: no summary line, e.g. a run cut short, must not end this script under set -e / pipefail)
  summary=$({ grep -h "ERROR SUMMARY" "$OUT/sanitize-$tool.log" 2>/dev/null || true; } | sort | uniq -c | tr -s ' ' \
    | paste -sd ';' -) || true
  record "$step" "$san_rc" $((SECONDS - t0)) \
    "${#sanitize_ids[@]} tests; $(tail -n 1 "$OUT/sanitize-$tool.pytest.log" 2>/dev/null | tr -d '=' | sed 's/^ *//; s/ *$//'); ${summary:-no summary}"
done

# ---- report --------------------------------------------------------------------------------------
section report
report_rc=0
"$PY" bench/report.py --out "$OUT" --commit "$COMMIT_ID" --date "$DATE" \
  ${RESULTS_DIR:+--results-dir "$RESULTS_DIR"} || report_rc=$?
# report.py judges the steps (and alone the spills); this is the fallback should it break.
status=$report_rc
if ((build_rc != 0)) || [[ "${env_rc:-0}" != 0 ]] || [[ ! "${test_rc:-0}" =~ ^(0|5)$ ]]; then status=1; fi
if [[ ! -f "$OUT/report.md" ]]; then
  echo "bench/report.py failed (exit $report_rc) before writing $OUT/report.md"
  exit 1
fi
echo "gpu_check: $((SECONDS - START)) s, results in $OUT, exit status $status"
echo
cat "$OUT/report.md"
exit "$status"
