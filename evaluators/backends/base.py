"""What a scoring backend is: how it makes lm-eval's LM, applies LoRA adapters, and where it runs.

Every method has a default that fits an in-process backend of local weights (hf); a backend overrides what differs.
"""
from __future__ import annotations

from pathlib import Path

from bench import BenchError


class Backend:
    name = ""
    # how LoRA adapters are scored: "per-target" = one LM per adapter (base + adapter loaded each time);
    # "switch" = one LM for all, lm.use_adapter(name, folder) between them; "none" = refused
    adapters = "per-target"
    applied = "unmerged LoRA (peft)"  # the record's eval.adapter.applied
    request_cache = True   # answers cached under the weights' hash (a model behind a URL cannot be hashed)
    needs_base_url = False
    local_tokenizer = True   # the LM's own tokenizer counts tokens here (a remote server's would cost a request each)

    def available(self) -> None:
        """BenchError with the install hint when the backend cannot run here (checked before any work)."""

    def resolve_dtype(self, dtype: str | None) -> str:
        """The weights' dtype for scoring (bench.config.resolve_dtype says what auto means). bfloat16 on a CPU with
        AVX512-BF16 or AMX is ~2.5x faster for hf (docs/evaluation.md) at slightly different log-likelihoods."""
        from bench.config import resolve_dtype

        from ..core import cuda_here

        return resolve_dtype(dtype, "eval", cuda=cuda_here())

    def check_adapter(self, path: str, field: str) -> None:
        from ..adapters import check_adapter

        check_adapter(path, field)

    def prepare(self, model_path: str, adapters: dict, *, base_url: str | None, generate_only: bool) -> dict:
        """Checks before any work; returns what the plan needs: {"model_path"} plus backend extras (a server's
        "base_url", "max_length", "server")."""
        if any(adapters.values()) and self.adapters == "none":
            raise BenchError(f"adapter: the {self.name} backend scores no adapters")
        if not Path(model_path).is_dir() and not (model_path.count("/") == 1 and not model_path.startswith((".", "/"))):
            raise BenchError(f"model: {model_path} is not a model folder or hub id")
        return {"model_path": model_path}

    def make_lm(self, plan: dict, adapter: str | None = None):
        """lm-eval's LM for the plan (`adapter`: a PEFT folder, for adapters == "per-target")."""
        raise NotImplementedError

    def run(self, plan: dict) -> dict:
        """Score the plan (evaluators.runner.run_plan) and return its verified result."""
        from ..core import run_here

        return run_here(plan)
