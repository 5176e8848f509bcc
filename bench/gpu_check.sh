#!/usr/bin/env bash
# One go on a GPU machine that has torch and triton but no network: the test suite on CUDA (the
# kernel tests then run on the GPU, not the interpreter), the quick step benchmark (< 3 min) and
# the training check, all written into one folder to commit under bench/results/.
# Usage: bash bench/gpu_check.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/results/gpu-$(date +%Y-%m-%d)}
mkdir -p "$OUT"
{
  date -Is
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$OUT/env.txt" 2>&1
# No network: install in place without build isolation, or fall back to a path that maps
# kernels/ to fusedopt.kernels by hand.
if ! python -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/install.txt" 2>&1; then
  SHIM=$(mktemp -d); mkdir -p "$SHIM/fusedopt"
  cp -r fusedopt/. "$SHIM/fusedopt/"; cp -r kernels "$SHIM/fusedopt/kernels"
  export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
  echo "pip install failed; using $SHIM" >> "$OUT/install.txt"
fi
python -m pytest -q -ra tests > "$OUT/pytest.txt" 2>&1; echo "pytest exit $?" >> "$OUT/pytest.txt"
python bench/run.py --quick --out-dir "$OUT" > "$OUT/bench-stdout.md" 2> "$OUT/bench.log"
echo "bench exit $?" >> "$OUT/bench.log"
python bench/train.py --device cuda --out-dir "$OUT" > "$OUT/train.txt" 2>&1
echo "train exit $?" >> "$OUT/train.txt"
tail -n 3 "$OUT/pytest.txt"; cat "$OUT/bench-stdout.md" "$OUT/train.txt"
