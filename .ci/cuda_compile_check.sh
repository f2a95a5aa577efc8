#!/usr/bin/env bash
# Compiles every CUDA source of ign_fast._C with nvcc, without a GPU, so a .cu file that does not compile
# cannot land. CUDA sources need a CUDA build of torch (the CPU build has no CUDA headers): it lives in its
# own virtual environment, VENV_CUDA (default .venv-cuda). See shared TOOLCHAIN.md.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV_CUDA=${VENV_CUDA:-.venv-cuda}
if ! command -v nvcc >/dev/null 2>&1 && [ ! -x /usr/local/cuda/bin/nvcc ]; then
  echo "cuda-compile-check: no nvcc on this machine; skipped"; exit 0
fi
if [ ! -x "$VENV_CUDA/bin/python" ] || ! "$VENV_CUDA/bin/python" -c "import torch, sys; sys.exit(torch.version.cuda is None)" 2>/dev/null; then
  python3 -m venv "$VENV_CUDA"
  "$VENV_CUDA/bin/pip" install -q torch==2.14.1 'numpy<2.4' pybind11 ninja setuptools wheel
fi
# importing ign_fast (to load the built module) needs its runtime dependencies too
"$VENV_CUDA/bin/pip" install -q safetensors pillow tqdm 2>&1 | grep -v "^WARNING: Location" || true
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-2}
IGN_FAST_CUDA=1 "$VENV_CUDA/bin/python" setup.py -q build_ext --build-temp "$out/tmp" --build-lib "$out/lib" >"$out/log" 2>&1 \
  || { tail -n 60 "$out/log"; echo "cuda-compile-check: FAILED"; exit 1; }
# The built module must load without a GPU, report its CUDA kernels and run its CPU kernels.
cp ign_fast/*.py "$out/lib/ign_fast/"
cp -r kernels "$out/lib/ign_fast/kernels"
python_cuda=$(cd "$VENV_CUDA" && pwd)/bin/python
(cd "$out/lib" && "$python_cuda" -c "
import ign_fast, torch
info = ign_fast.build_info()
assert info['cuda_built'], info
a = torch.randn(4, 3, 5); b = torch.randn(4, 3, 5)
torch.testing.assert_close(torch.ops.ign_fast.per_sample_distance(a, b, 'l1'), (a - b).abs().flatten(1).mean(1))
print('cuda-compile-check: ok, CUDA', info['cuda_built_against'], 'torch', info['torch_running'])
")
