"""vllm: evaluators/vllm_lm.EngineLM, in this process where vllm imports, else in .venv-vllm (evaluators.worker).
One engine scores the base model and every adapter (LoRARequest per target)."""
from __future__ import annotations

import os

from . import register_backend
from .base import Backend

# vLLM's prefix cache shares whole KV blocks, and its CPU default is 128 tokens: a document re-computes the part of
# the shared few-shot prefix past the last whole block, 64 tokens on average. At 32 tokens (the CPU backend wants a
# multiple of 32) MMLU's documents need 1.66 M prompt tokens instead of 2.26 M (benchmarks/eval_floor.py).
CPU_KV_BLOCK = 32


@register_backend("vllm")
class VLLMBackend(Backend):
    adapters = "switch"
    applied = "unmerged LoRA (vLLM LoRARequest)"

    def available(self) -> None:
        from ..core import vllm_mode

        vllm_mode()

    def resolve_dtype(self, dtype: str | None) -> str:
        """FEDLORA_VLLM_DTYPE, when set, stands for auto (vLLM-CPU's bfloat16 is chosen that way)."""
        resolved = super().resolve_dtype(dtype)
        if (dtype or "auto") == "auto" and os.environ.get("FEDLORA_VLLM_DTYPE"):
            return os.environ["FEDLORA_VLLM_DTYPE"]
        return resolved

    def check_adapter(self, path: str, field: str) -> None:
        from ..adapters import check_adapter, check_vllm_modules

        check_adapter(path, field)
        check_vllm_modules(path, field)

    def make_lm(self, plan: dict, adapter: str | None = None):
        from ..adapters import adapter_rank, lora_rank_slot
        from ..runner import targets_of
        from ..vllm_lm import EngineLM

        batch_size = plan.get("batch_size", "auto")
        cpu = os.environ.get("VLLM_TARGET_DEVICE") == "cpu" or _vllm_is_cpu()
        kwargs = dict(dtype=plan["dtype"], seed=plan.get("seed", 0),
                      batch_size="auto" if batch_size in ("auto", None) else batch_size)
        ranks = [adapter_rank(t["adapter"]) for t in targets_of(plan) if t["adapter"]]
        if ranks:
            kwargs.update(max_lora_rank=lora_rank_slot(max(ranks)))
        if cpu:
            kwargs["block_size"] = CPU_KV_BLOCK
        else:
            kwargs["gpu_memory_utilization"] = float(os.environ.get("FEDLORA_VLLM_GPU_MEM", "0.85"))
        return EngineLM(plan["model_path"], **kwargs)

    def run(self, plan: dict) -> dict:
        from ..core import run_here, run_in_venv, vllm_env, vllm_mode

        if vllm_mode() == "venv":
            return run_in_venv(plan)
        backup = dict(os.environ)
        os.environ.update(vllm_env())
        try:
            return run_here(plan)
        finally:
            os.environ.clear()
            os.environ.update(backup)


def _vllm_is_cpu() -> bool:
    try:
        import importlib.metadata as md
        return md.version("vllm").endswith("+cpu")
    except Exception:
        return False
