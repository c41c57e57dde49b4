#!/usr/bin/env bash
# llama.cpp's CPU decode on the dense model of benchmarks/bench_cpu_decode.py (the same random phi-2-architecture
# model: transformers.PhiForCausalLM, n_embd 1024, 8 layers, 16 heads, n_inner 4096, vocab 4096, partial rotary 0.5,
# seed 0), in f32 / f16 / q8_0 / q4_0: llama-bench -p 64 -n 32 -r 5 at -t 2 and -t 1, each run started on an idle
# machine and marked CONTENDED (and retried) when other processes used more than 0.1 core during it.
#
#   bash benchmarks/llamacpp/run.sh            # LLAMACPP_DIR (default /tmp/llamacpp) holds the source, builds, models
#
# Not part of CI or the default install: it downloads llama.cpp's source (from PyPI, see below), builds it (minutes on
# 2 cores) and writes a few hundred MB. Steps are idempotent (skipped when their output exists); FORCE=1 redoes all,
# STAGES="bench" reruns only the benchmark. Results: $LLAMACPP_DIR/results.txt (raw llama-bench output).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
W="${LLAMACPP_DIR:-/tmp/llamacpp}"
mkdir -p "$W"
cd "$W"
STAGES=${STAGES:-"source build venv model convert quantize sysinfo bench"}
has() { [[ " $STAGES " == *" $1 "* ]]; }
FORCE=${FORCE:-0}

# ---------------------------------------------------------------- 1. source
# The source comes from the llama-cpp-python 0.3.36 sdist on PyPI, which vendors the full llama.cpp tree at
# ggml-org/llama.cpp@0c1e57098 (per its CHANGELOG.md).
LCP_VER=0.3.36
if has source && { [ "$FORCE" = 1 ] || [ ! -d "$W/src" ]; }; then
  rm -rf "$W/dl" "$W/src"; mkdir -p "$W/dl"
  pip download "llama-cpp-python==$LCP_VER" --no-deps --no-binary :all: -d "$W/dl"
  tar -xzf "$W/dl/llama_cpp_python-$LCP_VER.tar.gz" -C "$W/dl"
  grep -m1 "update llama.cpp to" "$W/dl/llama_cpp_python-$LCP_VER/CHANGELOG.md"
  cp -a "$W/dl/llama_cpp_python-$LCP_VER/vendor/llama.cpp" "$W/src"
fi

# ---------------------------------------------------------------- 2. build (CPU only)
# NOTE: with plain -march=native this Sapphire-Rapids-class VM enables AMX (AMX_INT8=1) and llama-bench
# segfaults in ggml_backend_amx_mul_mat for Q8_0/Q4_0 prompt processing (cf. ggml-org/llama.cpp#20824).
# So AMX is switched off on top of -march=native (GCC: explicit -mno-* wins over -march); everything
# else native (AVX512F/BW/VL/VNNI/VBMI/BF16, AVX_VNNI, FMA, F16C) stays on.
NOAMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
CMAKE_FLAGS=(-G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DGGML_OPENMP=ON
             -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF
             "-DCMAKE_C_FLAGS=$NOAMX" "-DCMAKE_CXX_FLAGS=$NOAMX")
B="$W/build-noamx"
if has build && { [ "$FORCE" = 1 ] || [ ! -x "$B/bin/llama-bench" ]; }; then
  # cmake 3.25 / ninja 1.11 from Debian were already installed (else: pip install cmake ninja)
  nice -n 19 cmake -S "$W/src" -B "$B" "${CMAKE_FLAGS[@]}" > "$W/cmake_configure_noamx.log" 2>&1
  nice -n 19 cmake --build "$B" -j 2 --target llama-bench llama-quantize > "$W/build_noamx.log" 2>&1
fi

# ---------------------------------------------------------------- 3. python venv
if has venv && { [ "$FORCE" = 1 ] || [ ! -x "$W/venv/bin/python" ]; }; then
  python3 -m venv --system-site-packages "$W/venv"   # reuses system torch/transformers/safetensors/tokenizers
  "$W/venv/bin/pip" install -q "$W/src/gguf-py"      # gguf from the same llama.cpp tree
fi
PY="$W/venv/bin/python"

# ---------------------------------------------------------------- 4. random phi-2 model + toy BPE tokenizer
if has model && { [ "$FORCE" = 1 ] || [ ! -f "$W/phi-random/model.safetensors" ]; }; then
  nice -n 19 "$PY" "$HERE/make_model.py" "$W/phi-random"
fi

# ---------------------------------------------------------------- 5. convert to GGUF f32 / f16
# convert_wrap.py runs the unmodified convert_hf_to_gguf.py but maps the unknown
# BPE pre-tokenizer hash of the toy tokenizer to "gpt-2" (its pre-tokenizer is GPT-2 ByteLevel).
mkdir -p "$W/gguf"
if has convert; then
  for t in f32 f16; do
    if [ "$FORCE" = 1 ] || [ ! -f "$W/gguf/phi-random-$t.gguf" ]; then
      nice -n 19 "$PY" "$HERE/convert_wrap.py" "$W/src" "$W/phi-random" --outtype $t \
        --outfile "$W/gguf/phi-random-$t.gguf" > "$W/convert_$t.log" 2>&1
    fi
  done
fi

# ---------------------------------------------------------------- 6. quantize q8_0 / q4_0 (from f32)
if has quantize; then
  for q in q8_0 q4_0; do
    if [ "$FORCE" = 1 ] || [ ! -f "$W/gguf/phi-random-$q.gguf" ]; then
      nice -n 19 "$B/bin/llama-quantize" "$W/gguf/phi-random-f32.gguf" "$W/gguf/phi-random-$q.gguf" \
        "${q^^}" 2 > "$W/quantize_$q.log" 2>&1
    fi
  done
fi

# ---------------------------------------------------------------- 7. system info (CPU features)
if has sysinfo; then
  g++ -O1 "$HERE/sysinfo.cpp" -I"$W/src/include" -I"$W/src/ggml/include" -L"$B/bin" \
    -lllama -lggml -lggml-base -Wl,-rpath,"$B/bin" -o "$B/bin/sysinfo"
fi

# ---------------------------------------------------------------- 8. benchmark
if has bench; then
  R="$W/results.txt"
  {
    echo "# llama.cpp CPU benchmark  $(date -u +%FT%TZ)"
    echo "# source: llama-cpp-python $LCP_VER sdist vendor/llama.cpp = ggml-org/llama.cpp@0c1e57098 (build_commit shows 'unknown': no .git)"
    echo "# compiler: $(gcc --version | head -1)"
    echo "# cmake flags: ${CMAKE_FLAGS[*]}"
    echo "# ggml-cpu compile flags: $(grep -m1 -o -- 'FLAGS = .*-march=native.*' "$B/build.ninja" )"
    echo "# CPU: $(lscpu | sed -n 's/^Model name: *//p'), nproc=$(nproc)"
    echo "# system_info: $("$B/bin/sysinfo")"
    echo "# model: random PhiForCausalLM (hidden 1024, 8 layers, 16 heads, ffn 4096, vocab 4096, 109.1M params)"
    ls -l "$W"/gguf/*.gguf | sed 's/^/# /'
  } > "$R"
  busy() { awk '/^cpu /{print $2+$3+$4+$7+$8+$9}' /proc/stat; }   # busy jiffies (all cores)
  idle_now() {  # true if the whole machine was >90% idle over a 3 s sample
    local a b; a=$(busy); sleep 3; b=$(busy); [ $(( b - a )) -lt $(( 2 * 300 / 10 )) ]; }
  SWEEPS=${SWEEPS:-2}
  for s in $(seq "$SWEEPS"); do
  for t in 2 1; do
    for m in f32 f16 q8_0 q4_0; do
      # Run when the machine is idle; if other processes used > 0.10 cores on average during the
      # run, the run is marked CONTENDED and retried (max TRIES attempts, default 5).
      for attempt in $(seq "${TRIES:-5}"); do
        for _ in $(seq $(( ${WAIT_MAX:-600} / 3 ))); do idle_now && break; done
        {
          echo; echo "## sweep=$s model=$m threads=$t attempt=$attempt   uptime before: $(uptime)"
          echo "## top CPU before: $(ps -eo pcpu,args --sort=-pcpu | sed -n 2p | cut -c1-100)"
          b0=$(busy); t0=$(date +%s.%N)
          /usr/bin/time -f "%U %S" -o "$W/.time" \
            "$B/bin/llama-bench" -m "$W/gguf/phi-random-$m.gguf" -t $t -p 64 -n 32 -r 5 2>&1 || echo "## llama-bench FAILED"
          b1=$(busy); t1=$(date +%s.%N)
          read -r u sy < <(tail -1 "$W/.time")
          awk -v b="$(( b1 - b0 ))" -v u="$u" -v s="$sy" -v w="$(echo "$t1 - $t0" | bc)" 'BEGIN{
            o=(b/100-(u+s))/w
            printf "## wall %.1fs, llama-bench cpu %.1fs, other processes cpu %.1fs (= %.2f cores avg) %s\n",
                   w, u+s, b/100-(u+s), o, (o > 0.10 ? "CONTENDED" : "CLEAN") }'
          echo "## uptime after: $(uptime)"
        } | tee -a "$R" | tee "$W/.last"
        grep -q "CLEAN" "$W/.last" && break
      done
    done
  done
  done
fi

# ---------------------------------------------------------------- 9. summary (CLEAN runs only)
"$PY" "$HERE/summarize.py" "$W/results.txt" | tee "$W/summary.txt"
