"""hf: lm-eval's HFLM (transformers), in this process; a LoRA adapter is applied unmerged through peft."""
from __future__ import annotations

from . import register_backend
from .base import Backend


@register_backend("hf")
class HFBackend(Backend):
    def make_lm(self, plan: dict, adapter: str | None = None):
        import torch
        from lm_eval.models.huggingface import HFLM

        from ..runner import cpu_threads

        batch_size = plan.get("batch_size", "auto")
        cuda = torch.cuda.is_available()
        if not cuda:
            cpu_threads(torch)
        if batch_size in ("auto", None) and not cuda:
            # lm-eval's "auto" probes with full-context batches: minutes and many GB on a CPU
            batch_size = 8
        return HFLM(pretrained=plan["model_path"], dtype=plan["dtype"], batch_size=batch_size,
                    device="cuda" if cuda else "cpu", max_batch_size=64, peft=adapter)
