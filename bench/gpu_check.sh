#!/usr/bin/env bash
# One go on a GPU machine that has torch and triton but no network, in under 10 minutes: the test
# suite on CUDA (the kernel tests then run on the GPU, not the interpreter), the quick step
# benchmark, the launch-settings sweep (bench/tune.py) and, with the time left, the training check.
# Each step runs under its own timeout, so a hang costs that step only; all write into one folder
# to commit under bench/results/, and a summary ends the run (also in summary.txt).
# Usage: bash bench/gpu_check.sh [OUT_DIR]
#   GPU_CHECK_SECONDS (default 570): the whole run, start-up included; PYTHON (default python).
#
# Seconds per step: at most its cap, and never into the time promised to the steps after it, so
# the run ends by GPU_CHECK_SECONDS whatever each step takes:
#   step          cap  promised to later steps  notes
#   env, install  140  -                        usually ~10 s (nvidia-smi 20, versions 60, pip 60)
#   pytest        180  250 (bench 100, sweep 150)  SIGINT at the limit: pytest still reports
#   quick bench   150  150 (sweep)              run.py writes its files only at its end
#   sweep         300   20 (train)              tune.py --budget-s: the limit - 40; it rewrites
#                                               its files after every config
#   train          60    0                      skipped with under 20 s left
# With a quick setup and every step at its limit: ~10 + 180 + 150 + 210 + 20 (skipped) = 570.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${1:-bench/results/gpu-$(date +%Y-%m-%d)}
PYTHON=${PYTHON:-python}
TOTAL=${GPU_CHECK_SECONDS:-570}
GRACE=10  # seconds between timeout's SIGINT and its SIGKILL, inside each step's limit
export PYTHONUNBUFFERED=1  # a killed step's log keeps everything it printed
mkdir -p "$OUT"
START=$SECONDS
SUMMARY=()

# limit_for CAP PROMISED: sets LIMIT, the seconds the next step may take
limit_for() {
  local left=$((TOTAL - (SECONDS - START) - $2))
  LIMIT=$(($1 < left ? $1 : left))
}

# run_step NAME LOG ERR CMD...: CMD under timeout LIMIT (SIGINT, then SIGKILL GRACE s later);
# stdout to LOG, stderr to ERR (the same file: both to LOG); one summary line
run_step() {
  local name=$1 log=$2 err=$3 t0=$SECONDS rc
  shift 3
  if ((LIMIT < 20)); then
    echo "$name: skipped, ${LIMIT}s left of the ${TOTAL}s run" | tee -a "$log" >&2
    SUMMARY+=("$name: skipped (${LIMIT}s left)")
    return
  fi
  echo "== $name (limit ${LIMIT}s, $((SECONDS - START))s into the run)" >&2
  if [[ $log == "$err" ]]; then
    timeout --signal=INT --kill-after=$GRACE $((LIMIT - GRACE)) "$@" > "$log" 2>&1
  else
    timeout --signal=INT --kill-after=$GRACE $((LIMIT - GRACE)) "$@" > "$log" 2> "$err"
  fi
  rc=$?
  local took=$((SECONDS - t0)) what="exit $rc"
  ((rc == 124 || rc == 137)) && what="TIMED OUT (exit $rc)"
  echo "$name: $what after ${took}s of ${LIMIT}s" >> "$err"
  SUMMARY+=("$name: $what, ${took}s of ${LIMIT}s")
}

{
  date -Is
  timeout 20 nvidia-smi --format=csv,noheader \
    --query-gpu=name,driver_version,memory.total,clocks.max.sm || true
  timeout 60 "$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'cuda', \
torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.is_available() and \
torch.cuda.get_device_name())"
} > "$OUT/env.txt" 2>&1
# No network: install in place without build isolation or an index, or fall back to a path that
# maps kernels/ to fusedopt.kernels by hand.
SETUP="pip install -e ."
if ! timeout 60 "$PYTHON" -m pip install -q --no-build-isolation --no-deps --no-index \
    --disable-pip-version-check -e . > "$OUT/install.txt" 2>&1; then
  SHIM=$(mktemp -d); mkdir -p "$SHIM/fusedopt"
  cp -r fusedopt/. "$SHIM/fusedopt/"; cp -r kernels "$SHIM/fusedopt/kernels"
  export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
  echo "pip install failed; using $SHIM" >> "$OUT/install.txt"
  SETUP="pip install failed (install.txt), PYTHONPATH=$SHIM"
fi
SUMMARY+=("setup: $SETUP, $((SECONDS - START))s")

# -v names each test as it starts: after a timeout the last name is the one that hung. SIGINT is
# made an interrupt again (a background launch may have left it ignored), so pytest reports.
PYTEST='import signal, sys, pytest
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.exit(pytest.main(sys.argv[1:]))'
limit_for 180 250
run_step pytest "$OUT/pytest.txt" "$OUT/pytest.txt" \
  "$PYTHON" -c "$PYTEST" -v -ra --durations=25 tests

limit_for 150 150
run_step "quick bench" "$OUT/bench-stdout.md" "$OUT/bench.log" \
  "$PYTHON" bench/run.py --quick --out-dir "$OUT"

limit_for 300 20
run_step sweep "$OUT/sweep-stdout.md" "$OUT/sweep.log" \
  "$PYTHON" bench/tune.py --out-dir "$OUT" --budget-s $((LIMIT > 60 ? LIMIT - 40 : LIMIT / 2))

limit_for 60 0
run_step train "$OUT/train.txt" "$OUT/train.txt" \
  "$PYTHON" bench/train.py --device cuda --out-dir "$OUT"

{
  echo "# gpu_check.sh: $(date -Is), $((SECONDS - START))s of ${TOTAL}s, files in $OUT"
  printf -- '- %s\n' "${SUMMARY[@]}"
  echo; echo "## pytest"
  grep -E '^(FAILED|ERROR) ' "$OUT/pytest.txt" | head -n 30; tail -n 2 "$OUT/pytest.txt"
  echo; echo "## quick bench"
  sed -n '/^## fusedopt against the best torch recipe/,$p' "$OUT/bench-stdout.md" 2> /dev/null
  tail -n 3 "$OUT/bench.log" 2> /dev/null
  echo; echo "## sweep"
  sed -n '/^- device-to-device/p; /^- time:/p; /^## Best settings/,/^## Every config/p' \
    "$OUT"/tune-*.md 2> /dev/null | grep -v '^## Every config'
  tail -n 2 "$OUT/sweep.log" 2> /dev/null
  echo; echo "## train"; tail -n 8 "$OUT/train.txt" 2> /dev/null
} > "$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"
