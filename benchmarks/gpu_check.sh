#!/usr/bin/env bash
# Everything only a GPU can tell, for a session that is lent one (the device tool runs this from the repo root):
#   bash benchmarks/gpu_check.sh test    # build ign_fast._C with CUDA in place, run every test that needs CUDA
#   bash benchmarks/gpu_check.sh bench   # the GPU benchmarks (after "test" on the same warm machine)
# Each stage fits one 10-minute call. Logs go to $OUT (the device tool's folder that comes back) or gpu_out/.
# Record the numbers in benchmarks/RESULTS.md (device, date, torch version, command).
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
case "${1:-test}" in
  test)
    IGN_FAST_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} $PY setup.py build_ext --inplace >"$OUT/build.log" 2>&1 \
      || { tail -40 "$OUT/build.log"; exit 1; }
    $PY -c "import ign_fast, torch; print(torch.__version__, ign_fast.build_info())" | tee -a "$OUT/device.txt"
    # the files whose CUDA cases skip on the CPU machine, and the graph-mode tests
    $PY -m pytest -q -p no:cacheprovider -x tests/test_ign_loss.py tests/test_per_sample_distance.py \
      tests/test_nearest_neighbors.py tests/test_fused_step.py tests/test_graph_capture.py \
      tests/test_triton_kernels.py 2>&1 | tee "$OUT/tests.log" | tail -25
    ;;
  bench)
    for b in bench_ign_loss bench_nearest_neighbors bench_step bench_naign_step; do
      echo "== $b"; $PY benchmarks/$b.py 2>&1 | tee "$OUT/$b.log" | tail -40
    done
    ;;
  *) echo "usage: bash benchmarks/gpu_check.sh test|bench" >&2; exit 2 ;;
esac
