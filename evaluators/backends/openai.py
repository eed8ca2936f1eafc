"""openai: lm-eval's local-completions against an OpenAI-compatible server (bench serve, or vLLM elsewhere);
model_path is the served model's name. See evaluators/openai_lm.py."""
from __future__ import annotations

from bench import BenchError

from . import register_backend
from .base import Backend


@register_backend("openai")
class OpenAIBackend(Backend):
    adapters = "none"
    request_cache = False
    needs_base_url = True
    local_tokenizer = False

    def resolve_dtype(self, dtype: str | None) -> str:
        return "server"

    def prepare(self, model_path: str, adapters: dict, *, base_url: str | None, generate_only: bool) -> dict:
        if any(adapters.values()):
            raise BenchError("adapter: the openai backend scores what the server serves; serve the adapter "
                             "(bench serve --lora NAME=PATH) and pass its name as the model")
        from ..openai_lm import check_server

        server = check_server(base_url, model_path, need_logprobs=not generate_only)
        return {"model_path": server["model"], "base_url": server["base_url"],
                "max_length": server["max_model_len"], "server": {"base_url": server["base_url"],
                                                                  "model": server["model"]}}

    def make_lm(self, plan: dict, adapter: str | None = None):
        from ..openai_lm import make_openai_lm

        return make_openai_lm(plan)
