#!/usr/bin/env bash
# Build the libtorch example against the venv's torch wheel and run it once:
#   examples/cpp/build_and_run.sh [MODEL.pt]
# Without MODEL.pt a tiny run is trained (a few seconds) and exported with `ign-fast export --steps 2`.
# The program projects a noisy held-out digit (PGM) and generates a 16-sample grid (PGM and raw .f32); the
# script then checks that the C++ results equal Python's for the same inputs and seed.
# Outputs go to build/cpp-example/out/. Set PYTHON to use another interpreter than .venv/bin/python.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
BUILD=${BUILD_DIR:-build/cpp-example}
OUT="$BUILD/out"
prefix=$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')
cmake -S examples/cpp -B "$BUILD" -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_TYPE=Release > /dev/null
cmake --build "$BUILD" -j2 > /dev/null
mkdir -p "$OUT"
model=${1:-}
if [ -z "$model" ]; then
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    "$PY" -m ign_fast train --latent-dim 8 --width 8 --batch-size 16 --steps 2 --no-progress --out "$work/run" > /dev/null
    "$PY" -m ign_fast export "$work/run" --steps 2 --out "$OUT/model.pt" > /dev/null
    model="$OUT/model.pt"
fi
# A held-out digit with gaussian noise, as an 8-bit PGM (the program's dependency-free image format).
"$PY" - "$OUT/noisy.pgm" <<'PYEOF'
import sys
import torch
from ign_fast.data import load_mnist5k
digit = load_mnist5k("test")[0][:1]
noisy = (digit + 0.4 * torch.randn(digit.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
pixels = ((noisy[0, 0] + 1) * 127.5).round().to(torch.uint8)
with open(sys.argv[1], "wb") as f:
    f.write(b"P5\n28 28\n255\n" + pixels.numpy().tobytes())
PYEOF
"$BUILD/ign_project" "$model" project "$OUT/noisy.pgm" "$OUT/projected.pgm"
"$BUILD/ign_project" "$model" generate 16 0 "$OUT/grid.pgm"
"$BUILD/ign_project" "$model" generate 16 0 "$OUT/generated.f32"
"$PY" - "$model" "$OUT" <<'PYEOF'
import os
import sys
import numpy as np
import torch
from ign_fast import Projector
from ign_fast.export import load_torchscript
model, out = sys.argv[1], sys.argv[2]
projector = Projector.load(model)

def read_pgm(path):
    with open(path, "rb") as f:
        magic, size, maxval = f.readline(), f.readline().split(), f.readline()
        assert magic.strip() == b"P5" and maxval.strip() == b"255", path
        width, height = int(size[0]), int(size[1])
        return torch.from_numpy(np.frombuffer(f.read(), dtype=np.uint8).copy()).view(height, width)

with open(os.path.join(out, "generated.f32"), "rb") as f:
    shape = [int(d) for d in f.readline().split()[2:]]
    generated = torch.from_numpy(np.frombuffer(f.read(), dtype="<f4").copy()).view(shape)
steps = load_torchscript(model)[1]["steps"]  # the N the file was exported with, which the C++ run used
python_generated = projector.generate(16, steps=steps, seed=0)
gap = (generated - python_generated).abs().max().item()
assert gap <= 1e-5, f"C++ and Python generations differ by {gap}"
noisy = read_pgm(os.path.join(out, "noisy.pgm")).float().div(127.5).sub(1).view(1, 1, 28, 28)
expected = ((projector.project(noisy, steps=steps)[0, 0].clamp(-1, 1) + 1) * 127.5).round()
levels = (read_pgm(os.path.join(out, "projected.pgm")).float() - expected).abs().max().item()
assert levels <= 1, f"C++ and Python projections differ by {levels} gray levels"
print(f"C++ example matches Python (generation max |diff| {gap:.2e}, projection within {levels:.0f} gray level); "
      f"outputs in {out}")
PYEOF
