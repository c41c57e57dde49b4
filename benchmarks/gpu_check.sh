#!/usr/bin/env bash
# One command for a machine with one CUDA GPU (sized for an H200): warm Triton's cache, tune the GEMM configs when this GPU
# has no table yet, the GPU test tier, both benchmarks (bench_moe times the tuned configs against the heuristic's).
#
#   bash benchmarks/gpu_check.sh
#   GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh     # any machine, no GPU: each stage's collection or a quick CPU run
#
# Runs from the repository root with PYTHONPATH=. and installs nothing: python3 needs torch with CUDA, triton and pytest.
# hypothesis, pytest-benchmark and matplotlib are optional: without them the random-shape test and the plots are skipped.
# Stages, each under its own time limit (seconds; then 5 s of grace before a kill):
#   env             nvidia-smi and the versions; stops here when torch sees no GPU                      15 + 30
#   warm            python -m phixtral_kernels.aot --warm: every launch the GPU tests and the benchmarks make at
#                   phixtral shapes (~65 variants: the decode chain's and, at T <= 16, the legacy chain's that
#                   bench_moe times against it), compiled into Triton's cache by one process per CPU      40
#   tune            benchmarks/tune_moe.py --if-missing: when phixtral_kernels/configs has no table for this
#                   GPU, tunes the GEMM configs (compiles its candidates in one process per CPU, then checks
#                   and times them; stops starting new buckets after --budget-s 60) and writes the table
#                   there and to $OUT; a few seconds when the table exists                                   80
#   tests           the GPU tier in GPU_CHECK_SHARDS pytest processes at once (pytest --shard I/N): its ~200
#                   small-shape variants compile one per process at a time, not one after another;
#                   plus whatever the tune stage left of its limit                                        105 (+)
#   bench_moe       stops starting new points after --budget-s 60                                            85
#   bench_generate  stops starting new points after --budget-s 50; eager vs CUDA-graph decode, both attention
#                   modes (--attention-upcast fp32 scores)                                                   80
#   summary                                                                                                  15
# so the whole run ends within 8 minutes at worst (475 s with the graces; about 4 minutes when nothing hits a limit). A
# stage stopped at its limit says so in its log and the later stages still run. Logs are written as the output comes,
# so a run cut short still leaves them. Files, under $OUT when it is set, else ./out (eight at most, the limit of what
# a lease brings back):
#   tests.log (the warm stage, then the tests)  bench.log (tune, bench_moe, bench_generate)  bench_moe.json
#   bench_moe.png  bench_generate.json  bench_generate.png  summary.txt (environment, stage times, the targets table)
#   <GPU>.json (the tuned table, when the tune stage wrote one; dry-run.json in a dry run)
# The summary table is printed last. Exit status: 0 when every stage passed, 1 otherwise.
#
# Environment: GPU_CHECK_DRY_RUN=1 (see above); GPU_CHECK_SHARDS (test processes, default half the CPUs, 1 to 8);
# GPU_CHECK_LIMIT_<STAGE> (a stage's limit in seconds, e.g. GPU_CHECK_LIMIT_TESTS=300); PYTHON (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT_DIR="${OUT:-./out}"
mkdir -p "$OUT_DIR"
# A stage that stops early must not leave an older run's files to be summarized as this one's.
rm -f "$OUT_DIR"/{tests,bench}.log "$OUT_DIR"/bench_{moe,generate}.{json,png} "$OUT_DIR"/{summary.txt,dry-run.json}
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# The GPU tier compiles the kernels; under the interpreter every timing would be meaningless.
unset TRITON_INTERPRET
PY="${PYTHON:-python3}"
DRY="${GPU_CHECK_DRY_RUN:-0}"
CPUS="$(nproc 2>/dev/null || echo 2)"
SHARDS="${GPU_CHECK_SHARDS:-$((CPUS / 2))}"
((SHARDS < 1)) && SHARDS=1
((SHARDS > 8)) && SHARDS=8
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
STAGES="$WORK/stages.tsv"
: >"$STAGES"
status=0

# limit_for NAME SECONDS: GPU_CHECK_LIMIT_<NAME> when set, else SECONDS.
limit_for() {
  local var="GPU_CHECK_LIMIT_${1^^}"
  echo "${!var:-$2}"
}

# finish NAME LOG RC START LIMIT: say in LOG when the stage was stopped at its limit; add its row to the stage table.
finish() {
  local name=$1 log=$2 rc=$3 start=$4 limit=$5
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "=== $name: stopped at its ${limit} s limit" | tee -a "$log"
  fi
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" >>"$STAGES"
  [ "$rc" -eq 0 ] || status=1
}

# stage NAME LOG SECONDS CMD...: CMD under a time limit, its output to the screen and, line by line, to LOG.
stage() {
  local name=$1 log=$2 limit start=$SECONDS
  limit="$(limit_for "$1" "$3")"
  shift 3
  echo "=== $name (limit ${limit} s): $*" | tee -a "$log"
  timeout --kill-after=5 "$limit" "$@" 2>&1 | tee -a "$log"
  finish "$name" "$log" "${PIPESTATUS[0]}" "$start" "$limit"
}

# test_shards NAME LOG SECONDS PYTEST_ARGS...: SHARDS pytest processes at once, process I on every SHARDS-th test from
# the I-th (--shard, tests/conftest.py), each under the time limit. Lines reach LOG as they come, tagged [I/SHARDS];
# once all have ended, LOG holds them again process after process.
test_shards() {
  local name=$1 log=$2 limit start=$SECONDS i rc=0 shard_rc before
  limit="$(limit_for "$1" "$3")"
  shift 3
  local threads=$((CPUS / SHARDS > 0 ? CPUS / SHARDS : 1))
  echo "=== $name (limit ${limit} s, $SHARDS processes of $threads threads): pytest $*" | tee -a "$log"
  before="$(wc -l <"$log")"
  for ((i = 0; i < SHARDS; i++)); do
    (
      OMP_NUM_THREADS=$threads timeout --kill-after=5 "$limit" "$PY" -m pytest --shard "$i/$SHARDS" "$@" 2>&1 |
        sed -u "s|^|[$i/$SHARDS] |" | tee "$WORK/shard$i.log" | tee -a "$log"
      shard_rc=${PIPESTATUS[0]}
      if [ "$shard_rc" -eq 124 ] || [ "$shard_rc" -eq 137 ]; then
        echo "[$i/$SHARDS] === stopped at the ${limit} s limit" | tee -a "$WORK/shard$i.log" | tee -a "$log"
      fi
      echo "$shard_rc" >"$WORK/shard$i.rc"
    ) &
  done
  wait
  {
    head -n "$before" "$log"
    for ((i = 0; i < SHARDS; i++)); do cat "$WORK/shard$i.log"; done
  } >"$WORK/ordered.log"
  cat "$WORK/ordered.log" >"$log"
  for ((i = 0; i < SHARDS; i++)); do
    shard_rc="$(cat "$WORK/shard$i.rc" 2>/dev/null || echo 1)"
    if [ "$shard_rc" -eq 124 ] || [ "$shard_rc" -eq 137 ]; then
      rc=$shard_rc
    elif [ "$shard_rc" -ne 0 ] && [ "$rc" -eq 0 ]; then
      rc=$shard_rc
    fi
  done
  finish "$name" "$log" "$rc" "$start" "$limit"
}

ENV_TEXT="$(
  echo "gpu_check: $(date -Is), git $(git rev-parse --short HEAD 2>/dev/null || echo '?'), host $(hostname), $CPUS CPUs"
  timeout 15 nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.mem,temperature.gpu,power.draw \
    --format=csv 2>&1
  timeout 30 "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'| cuda', torch.version.cuda, '| triton', triton.__version__, '| gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None); \
sys.exit(0 if torch.cuda.is_available() else 3)" 2>&1
  echo $? >"$WORK/cuda.rc"
)"
echo "$ENV_TEXT"
if [ "$DRY" = 1 ]; then
  echo "gpu_check: dry run (GPU_CHECK_DRY_RUN=1): tests collected only, warm stage listed only, benchmarks --quick on the CPU"
elif [ "$(cat "$WORK/cuda.rc")" != 0 ]; then
  echo "gpu_check: no CUDA GPU visible to $PY; nothing to check here (the CPU runs are: python benchmarks/bench_moe.py, bench_generate.py)"
  echo "$ENV_TEXT" >"$OUT_DIR/summary.txt"
  exit 1
fi

# The token counts of tests/test_kernels_gpu.py (1 2 5 16 64 200 1024 4096), bench_moe (1 ... 16384) and bench_generate
# (decode B = 1 8 32, prefill B x 256, its checks 2 x 32), in fp16 and bf16.
WARM=(-m phixtral_kernels.aot --warm --jobs "$CPUS" --tokens 1 2 4 5 8 16 32 64 128 200 256 512 1024 2048 4096 8192 16384)
TESTS=(tests/test_kernels.py tests/test_kernels_random.py tests/test_moe_backward.py tests/test_decode_chain.py
  tests/test_kernels_gpu.py tests/test_decode_graph_gpu.py)
# The tuner: bf16 first (what phixtral runs), then fp16; each bucket's table lands as soon as it is tuned.
TUNE=(benchmarks/tune_moe.py --if-missing --budget-s 60 --jobs "$CPUS" --out "$OUT_DIR")
BENCH=()
if [ "$DRY" = 1 ]; then
  WARM+=(--dry-run)
  # A decode and a prefill bucket's candidates (sm_90's 128x256 and TMA ones among them), checked in the interpreter.
  TUNE=(benchmarks/tune_moe.py --dry-run --dtypes float16 --tokens 1 1024 --out "$OUT_DIR")
  TESTS=(--collect-only "${TESTS[@]}")
  BENCH=(--quick --device cpu)
fi
stage warm "$OUT_DIR/tests.log" 40 "$PY" "${WARM[@]}"
TUNE_LIMIT="$(limit_for tune 80)"
tune_start=$SECONDS
stage tune "$OUT_DIR/bench.log" "$TUNE_LIMIT" "$PY" "${TUNE[@]}"
# The seconds the tune stage left (all but a few when the table exists) go to the tests: the worst case stays the same.
TUNE_SPARE=$((TUNE_LIMIT - (SECONDS - tune_start)))
((TUNE_SPARE < 0)) && TUNE_SPARE=0
test_shards tests "$OUT_DIR/tests.log" "$((105 + TUNE_SPARE))" -q --durations=5 "${TESTS[@]}"
stage bench_moe "$OUT_DIR/bench.log" 85 "$PY" benchmarks/bench_moe.py --out "$OUT_DIR" --budget-s 60 ${BENCH[@]+"${BENCH[@]}"}
stage bench_generate "$OUT_DIR/bench.log" 80 "$PY" benchmarks/bench_generate.py --out "$OUT_DIR" --budget-s 50 \
  --attention-upcast fp32 scores ${BENCH[@]+"${BENCH[@]}"}

{
  echo "$ENV_TEXT"
  echo
  timeout 15 "$PY" benchmarks/summarize.py "$OUT_DIR" --stages "$STAGES" 2>&1
} >"$OUT_DIR/summary.txt"
echo
cat "$OUT_DIR/summary.txt"
exit "$status"
