#!/usr/bin/env bash
# One command for a machine with one CUDA GPU (sized for an H200): the GPU test tier, then both benchmarks.
#
#   bash benchmarks/gpu_check.sh
#
# Runs from the repository root with PYTHONPATH=. and installs nothing (python3 must have torch with CUDA, triton,
# pytest, pytest-benchmark, matplotlib). Each stage runs under its own time limit and the benchmarks stop starting new
# points once their --budget-s is spent, so the whole run ends in about 6.5 minutes at worst (stage limits 30 + 180 +
# 100 + 100 s), usually well before. Files, under $OUT when it is set, else ./out (eight, so they fit a lease's limit):
#   tests.log  bench_moe.log  bench_moe.json  bench_moe.png  bench_generate.log  bench_generate.json  bench_generate.png
#   summary.txt (environment, stage times, the targets table)
# The summary table is printed last. Exit status: 0 when every stage passed, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT_DIR="${OUT:-./out}"
mkdir -p "$OUT_DIR"
# A stage that stops early must not leave an older run's files to be summarized as this one's.
rm -f "$OUT_DIR"/{tests,bench_moe,bench_generate}.log "$OUT_DIR"/bench_{moe,generate}.{json,png} "$OUT_DIR/summary.txt"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# The GPU tier compiles the kernels; under the interpreter every timing would be meaningless.
unset TRITON_INTERPRET
PY="${PYTHON:-python3}"
STAGES="$(mktemp)"
trap 'rm -f "$STAGES"' EXIT
status=0

# stage NAME SECONDS CMD...: run CMD under a time limit, its output to the screen and to $OUT_DIR/NAME.log.
stage() {
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  echo "=== $name (limit ${limit} s): $*"
  timeout --kill-after=15 "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.log"
  local rc=$?
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "=== $name: stopped at its ${limit} s limit" | tee -a "$OUT_DIR/$name.log"
  fi
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" >>"$STAGES"
  [ "$rc" -eq 0 ] || status=1
}

ENV_TEXT="$(
  echo "gpu_check: $(date -Is), git $(git rev-parse --short HEAD 2>/dev/null || echo '?'), host $(hostname)"
  timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.mem,temperature.gpu,power.draw \
    --format=csv 2>&1
  timeout 60 "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'| cuda', torch.version.cuda, '| triton', triton.__version__, '| gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" 2>&1
)"
echo "$ENV_TEXT"
if ! timeout 60 "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA GPU visible to $PY; nothing to check here (the CPU runs are: python benchmarks/bench_moe.py, bench_generate.py)"
  exit 1
fi

# pytest-xdist, where the image has it, compiles the kernels of several tests at once (the Triton cache is shared).
XDIST=()
if "$PY" -c "import xdist" 2>/dev/null; then XDIST=(-n 4); fi
stage tests 180 "$PY" -m pytest -q "${XDIST[@]}" --durations=10 tests/test_kernels.py tests/test_kernels_gpu.py
stage bench_moe 100 "$PY" benchmarks/bench_moe.py --out "$OUT_DIR" --budget-s 70
stage bench_generate 100 "$PY" benchmarks/bench_generate.py --out "$OUT_DIR" --budget-s 65

{
  echo "$ENV_TEXT"
  echo
  timeout 60 "$PY" benchmarks/summarize.py "$OUT_DIR" --stages "$STAGES" 2>&1
} >"$OUT_DIR/summary.txt"
echo
cat "$OUT_DIR/summary.txt"
exit "$status"
