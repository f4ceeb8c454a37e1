#!/usr/bin/env bash
# What the GPU machine's software makes of this tree, checked on a machine without a GPU: a virtual
# environment with the GPU machine's versions (../shared/GPU.md: Python 3.12, torch 2.11.0+cu130,
# transformers 5.17, scikit-build-core 1.1.0, pytest; and none of scipy, pytest-timeout, gguf,
# matplotlib), the package built into it as gpu_check.sh builds it, then
#   1. `python -m fastinfer env` (the CUDA kernels built for sm_90a),
#   2. collection of gpu_check's cuda tests and of bench/sanitize_tests.txt's ids (a module that
#      imports a missing package would stop the whole GPU run: it happened with scipy, then gguf;
#      a stale sanitizer id stopped memcheck),
#   3. bench/run_tests.py --shards 3 over them (every test skips here: the machinery runs end to end),
#   4. with MIRROR_FULL=1, the whole CPU suite (tests needing gguf / matplotlib fail: not on the GPU).
#
#   bash bench/mirror_check.sh            # first run: minutes (torch download, CUDA build on 2 cores)
#
# MIRROR_VENV  the environment (default build/mirror-venv; kept between runs)
# PYTHON312    a Python 3.12 interpreter (default: python3.12 on PATH, else pyenv's)
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
VENV=${MIRROR_VENV:-build/mirror-venv}
OUT=${OUT:-build/mirror-out}
# absolute: later steps run from $OUT (a relative venv path broke `python -m fastinfer env` there)
case $VENV in /*) ;; *) VENV="$REPO/$VENV" ;; esac
case $OUT in /*) ;; *) OUT="$REPO/$OUT" ;; esac
mkdir -p "$OUT"

if [[ ! -x "$VENV/bin/python" ]]; then
  py=${PYTHON312:-$(command -v python3.12 || ls /root/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | head -n 1 || true)}
  [[ -n "$py" ]] || { echo "mirror_check: no Python 3.12 found (set PYTHON312)"; exit 2; }
  "$py" -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.11.0 transformers==5.17.0 scikit-build-core==1.1.0 numpy safetensors tqdm \
    pytest cmake ninja
fi
PY="$VENV/bin/python"
for missing in scipy pytest_timeout gguf matplotlib; do  # as on the GPU machine
  if "$PY" -c "import $missing" 2> /dev/null; then
    echo "mirror_check: $missing is installed in $VENV, the GPU machine has none; uninstall it"; exit 2
  fi
done

echo "==== build (log: $OUT/build.log)"
PATH="$VENV/bin:$PATH" FASTINFER_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) "$PY" -m pip install \
  --no-build-isolation --no-deps -v . -Cbuild-dir=build/mirror > "$OUT/build.log" 2>&1 \
  || { tail -n 40 "$OUT/build.log"; exit 1; }

echo "==== python -m fastinfer env"
(cd "$OUT" && "$PY" -m fastinfer env) | tee "$OUT/env.txt"
grep -q "CUDA kernels built yes, for sm_90a" "$OUT/env.txt" || { echo "mirror_check: no sm_90a kernels"; exit 1; }

# gpu_check's test files, in its order
read -ra order <<< "$(sed -n '/^TEST_ORDER="/,/"$/p' bench/gpu_check.sh | tr -d '"' | sed 's/TEST_ORDER=//' | tr '\n' ' ')"
files=()
for f in "${order[@]}" tests/test_*.py; do
  [[ -e "$f" && " ${files[*]} " != *" $f "* ]] && files+=("$f")
done

echo "==== collect the cuda tests"
"$PY" -m pytest --collect-only -q -p no:cacheprovider -m cuda "${files[@]}" > "$OUT/collect.log" 2>&1 \
  || { tail -n 30 "$OUT/collect.log"; echo "mirror_check: collection failed"; exit 1; }
tail -n 1 "$OUT/collect.log"

echo "==== collect the sanitizer's tests (bench/sanitize_tests.txt: ids go stale when a test gains a parameter)"
mapfile -t sanitize_ids < <(grep -v '^#' bench/sanitize_tests.txt | grep -v '^[[:space:]]*$')
"$PY" -m pytest --collect-only -q -p no:cacheprovider "${sanitize_ids[@]}" > "$OUT/collect-sanitize.log" 2>&1 \
  || { grep -i "not found\|error" "$OUT/collect-sanitize.log" | head -n 20; echo "mirror_check: stale sanitizer ids"; exit 1; }
tail -n 1 "$OUT/collect-sanitize.log"

echo "==== run_tests.py --shards 3 (every test skips without a GPU)"
rc=0
"$PY" bench/run_tests.py --out "$OUT/tests" --budget-s 600 --test-timeout 120 --shards 3 -- \
  -m cuda -q -p no:cacheprovider "${files[@]}" > "$OUT/run_tests.log" 2>&1 || rc=$?
grep '^==== run_tests: .* run(s)' "$OUT/run_tests.log" || true
((rc == 0)) || { tail -n 30 "$OUT/run_tests.log"; echo "mirror_check: run_tests exit $rc"; exit 1; }

if [[ "${MIRROR_FULL:-0}" == 1 ]]; then
  echo "==== the CPU suite (tests that need gguf or matplotlib fail here, as they would there)"
  "$PY" -m pytest -q -p no:cacheprovider tests 2>&1 | tail -n 25 || true
fi
echo "mirror_check: ok ($OUT)"
