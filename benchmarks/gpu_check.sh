#!/usr/bin/env bash
# Everything only a GPU can tell, in one run of at most 8 minutes (the device tool runs this from the repo root):
#   bash benchmarks/gpu_check.sh quick   # build with CUDA (asserted), ign-fast doctor, every GPU-capable test
#                                        # (all results, no -x), the trainer graph vs fused, the quick benchmarks
#   bash benchmarks/gpu_check.sh full    # build, then the full benchmarks (a second run of the same length)
# Each phase runs under its own `timeout`, capped by what is left of the run's budget, so one hang cannot eat the
# rest; a failed phase does not stop the next. Everything lands in ${OUT:-gpu_out}/: summary.md (one line a phase,
# then each phase's verdict lines: read it first), one log per phase, doctor.json and train.json. That is at most
# 8 files, what the device tool brings back. The summary is rewritten after every phase, so even a run cut short
# leaves one.
# Without a GPU (nvidia-smi absent) the GPU-only phases (build, tests, benchmarks) are skipped with the reason and
# the rest runs on the CPU: a dry run of this script. There, keep it short with e.g.
#   PYTHON=.venv/bin/python GPU_CHECK_TRAIN_STEPS=4 GPU_CHECK_TRAIN_ARGS="--batch-size 16 --width 8" \
#     bash benchmarks/gpu_check.sh quick
# Settings: PYTHON (python3), OUT (gpu_out), GPU_CHECK_BUDGET (seconds for the whole run, default 470: 8 minutes
# less the machine's start-up margin), GPU_CHECK_TRAIN_STEPS (300), GPU_CHECK_TRAIN_ARGS (extra arguments of
# benchmarks/gpu_train_check.py). Exit status 0 when no phase failed, 1 otherwise, 2 on bad usage.
# Record the numbers in benchmarks/RESULTS.md (device, date, torch version, command).
set -uo pipefail

MODE=${1:-quick}
case "$MODE" in
  quick|full) ;;
  *) echo "gpu_check.sh: error: the mode must be quick or full, got '$MODE'" >&2; exit 2 ;;
esac
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# the GPU kernels are opt-in until this check has passed (ign_fast/ops.py GPU_KERNELS_VERIFIED): use them
export IGN_FAST_BACKEND=${IGN_FAST_BACKEND:-native}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the checkout's ign_fast, also before it is installed
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-470}
TRAIN_STEPS=${GPU_CHECK_TRAIN_STEPS:-300}
TRAIN_ARGS=${GPU_CHECK_TRAIN_ARGS:-}
SUMMARY="$OUT/summary.md"
START=$(date +%s)  # the budget is the whole script's wall clock: the device tool's limit counts it all
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then HAS_GPU=1; else HAS_GPU=0; fi
export PY OUT HAS_GPU TRAIN_STEPS TRAIN_ARGS MODE

# read once: the summary is rewritten after every phase, and importing torch takes seconds
if [ "$HAS_GPU" = 1 ]; then
  DEVICE_LINE=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1)
else
  DEVICE_LINE="no GPU (nvidia-smi absent): a dry run; the GPU-only phases are skipped"
fi
PYTHON_LINE=$($PY -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__,
                                               "CUDA", torch.version.cuda)' 2>&1 | tail -1)
WORK=$(mktemp -d)  # the training runs' folders: not under $OUT, whose files all come back
export WORK
trap 'rm -rf "$WORK"' EXIT

ROWS=()      # "| phase | status | seconds | limit | log |" lines of the summary
DETAILS=()   # each phase's verdict lines, appended to the summary

elapsed() { echo $(( $(date +%s) - START )); }

write_summary() {
  {
    echo "# GPU check ($MODE), $(date -u +%Y-%m-%dT%H:%M:%SZ), $(elapsed) s of a ${BUDGET} s budget"
    echo
    echo "device: $DEVICE_LINE"
    echo "python: $PYTHON_LINE"
    echo
    echo "| phase | status | seconds | limit | log |"
    echo "|---|---|---|---|---|"
    printf '%s\n' "${ROWS[@]}"
    for d in "${DETAILS[@]}"; do printf '\n%s\n' "$d"; done
  } >"$SUMMARY"
}

# phase NAME LOG LIMIT FUNCTION: run FUNCTION under `timeout` (capped by the budget left), its output in $OUT/LOG
phase() {
  local name=$1 log=$2 limit=$3 fn=$4
  local left=$(( BUDGET - $(elapsed) - 15 ))  # room for timeout's KILL 10 s after TERM, and the summary
  if (( left < 15 )); then
    ROWS+=("| $name | NOT RUN (out of the ${BUDGET} s budget) | 0 | $limit | - |")
    FAILED=$(( ${FAILED:-0} + 1 ))  # the run did not answer everything it was asked
    write_summary
    return
  fi
  (( limit > left )) && limit=$left
  local t0=$(date +%s)
  echo "== $name (limit ${limit} s)" | tee -a "$OUT/$log"
  # timeout signals the whole process group (pytest workers, compilers too); KILL 10 s after TERM
  timeout -k 10 "$limit" bash -c "$fn" >>"$OUT/$log" 2>&1
  local rc=$? status
  if (( rc == 124 || rc == 137 )); then status="TIMEOUT"
  elif (( rc == 0 )); then status="PASS"
  else status="FAIL (exit $rc)"; fi
  echo "== $name: $status after $(( $(date +%s) - t0 )) s" | tee -a "$OUT/$log"
  ROWS+=("| $name | $status | $(( $(date +%s) - t0 )) | $limit | $log |")
  FAILED=$(( ${FAILED:-0} + (rc != 0) ))
  write_summary
}

skip() {  # skip NAME REASON
  ROWS+=("| $1 | SKIP ($2) | 0 | - | - |")
  write_summary
}

# ------------------------------------------------------------------------------------------------- phases

run_build() {
  # pip's editable install builds ign_fast._C in place and maps ign_fast.kernels (kernels/ in the tree) for
  # the Triton ops; a warm machine keeps the build unless a source is newer
  local so
  so=$(ls ign_fast/_C*.so 2>/dev/null | head -1)
  if [ -n "$so" ] && [ -z "$(find csrc setup.py -newer "$so" 2>/dev/null)" ] \
      && $PY -c "import ign_fast, sys; sys.exit(0 if ign_fast.build_info()['cuda_built'] else 1)" 2>/dev/null; then
    echo "ign_fast._C is built with CUDA and newer than its sources: not rebuilt"
  else
    if ! IGN_FAST_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} $PY -m pip install --no-build-isolation --no-deps --no-index -v -e .
    then
      # still build the extension, so the native CUDA kernels get checked; ign_fast.kernels is then not
      # importable from the tree (it lives in kernels/) and every Triton check fails: the phase reports FAIL
      echo "pip's editable install failed: building in place instead"
      IGN_FAST_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} $PY setup.py build_ext --inplace || return 1
      BUILD_FALLBACK=1
    fi
  fi
  $PY -c "import ign_fast; i = ign_fast.build_info(); print(i); assert i['cuda_built'], 'CUDA kernels not built'" \
    && [ -z "${BUILD_FALLBACK:-}" ]
}
export -f run_build

run_doctor() {
  $PY -m ign_fast doctor --json "$OUT/doctor.json"
}
export -f run_doctor

run_tests() {
  # every test file with CUDA cases (found by what they use, so new files join), all of their tests, no -x;
  # test_doctor.py is left out: the doctor phase has just run the doctor itself
  local files xdist="" per_test=""
  files=$(grep -l -E "requires_cuda|devices\(\)|cuda\.is_available|\"cuda\"" tests/test_*.py | grep -v test_doctor.py)
  echo "files: $files"
  $PY -c "import xdist" 2>/dev/null && xdist="-n 8"                       # 16 cores, one GPU shared
  $PY -c "import pytest_timeout" 2>/dev/null && per_test="--timeout 120"  # a hung test fails alone
  $PY -m pytest -q -p no:cacheprovider -rfEs $xdist $per_test $files
}
export -f run_tests

run_train() {
  $PY benchmarks/gpu_train_check.py --steps "$TRAIN_STEPS" --out "$WORK/train" --summary "$WORK/train_table.md" \
    --json "$OUT/train.json" $TRAIN_ARGS
}
export -f run_train

run_benchmarks() {
  # one timeout each, so a slow benchmark costs only its own lines
  local quick="" rc=0 b limit
  [ "$MODE" = quick ] && quick="--quick"
  local names="bench_ign_loss bench_nearest_neighbors bench_step bench_naign_step"
  [ "$MODE" = full ] && names="$names bench_export"
  for b in $names; do
    limit=$([ "$MODE" = quick ] && echo 45 || echo 150)
    echo "== $b $quick (limit $limit s)"
    timeout -k 5 "$limit" $PY "benchmarks/$b.py" $quick || { echo "== $b: exit $?"; rc=1; }
  done
  return $rc
}
export -f run_benchmarks

# ------------------------------------------------------------------------------------------------- the run

: >"$SUMMARY"
write_summary
if [ "$HAS_GPU" = 1 ]; then
  phase build build.log 200 run_build
else
  skip build "no GPU: CUDA is not built here; the CPU extension is what is installed"
fi

if [ "$MODE" = quick ]; then
  phase doctor doctor.log 120 run_doctor
  DETAILS+=("## doctor
$(grep -E 'FAIL|passed,' "$OUT/doctor.log" 2>/dev/null | tail -40)")
  if [ "$HAS_GPU" = 1 ]; then
    phase tests tests.log 150 run_tests
    DETAILS+=("## tests (failures, errors and the count; skips with their reasons are in tests.log)
$(grep -E '^(FAILED|ERROR)|[0-9]+ (passed|failed)' "$OUT/tests.log" 2>/dev/null | tail -40)")
  else
    skip tests "no GPU: these files' CPU cases run in make test"
  fi
  phase train train.log 120 run_train
  DETAILS+=("## trainer, graph vs fused
$(cat "$WORK/train_table.md" 2>/dev/null || tail -5 "$OUT/train.log" 2>/dev/null)")
fi

if [ "$HAS_GPU" = 1 ]; then
  phase "benchmarks ($MODE)" bench.log $([ "$MODE" = quick ] && echo 120 || echo 460) run_benchmarks
else
  skip "benchmarks ($MODE)" "no GPU: timings on this machine are not the GPU's"
fi
write_summary
cat "$SUMMARY"
exit $(( ${FAILED:-0} > 0 ))
