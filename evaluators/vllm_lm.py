"""lm-eval's vLLM model, made to use what the engine offers: its prefix cache, its LoRA slots, an explicit stop.

Runs wherever vllm imports (the .venv-vllm worker on a CPU, the main environment on a GPU machine).

- One-token answers (MMLU's " A".." D"): lm-eval's VLLM scores each choice as its own prompt with
  prompt_logprobs, and vLLM never reads its prefix cache for such requests (measured: 0 hits). Here each distinct
  context is ONE request for the log-probabilities of its answer tokens at the next position
  (max_tokens=1, logprob_token_ids), so the cache applies: MMLU's 5-shot prefix is computed once per subject, not
  once per choice of every document. The greedy-decoded token says whether the answer is the argmax (is_greedy).
- Longer continuations (the commonsense sets) keep lm-eval's prompt_logprobs path.
- Adapters: `use_adapter(name, path)` scores the next requests through vLLM's LoRA support on the same engine, so
  many adapters (every client's) cost one engine start and no merged model folder.
- `shutdown()` stops the engine core (and tears down its process groups) while the interpreter is whole; the
  worker then exits without interpreter finalization (see evaluators/worker.py).
"""
from __future__ import annotations

import os

from lm_eval.models.vllm_causallms import VLLM

from .adapters import VLLM_LORA_MODULES

# Shared prefixes are cached in whole KV blocks; a shorter common prefix is not worth a warm-up request.
MIN_SHARED_PREFIX = 32
# Warm-up requests of one wave hold at most this many context tokens, well under the KV cache's capacity (46,592
# tokens in 2 GiB for the default model in float32), so a wave's prefixes are still cached when its rest comes.
WAVE_TOKENS = 16_000


class EngineLM(VLLM):
    """lm-eval VLLM with prefix caching, the one-token fast path, per-scoring LoRA adapters and shutdown()."""

    def __init__(self, pretrained: str, *, dtype: str, seed: int, max_lora_rank: int | None = None,
                 max_loras: int = 1, **kwargs):
        if max_lora_rank:
            kwargs.update(enable_lora=True, max_loras=max_loras, max_cpu_loras=max(max_loras, 1),
                          lora_target_modules=VLLM_LORA_MODULES)
        super().__init__(pretrained=pretrained, dtype=dtype, seed=seed, enforce_eager=True,
                         enable_prefix_caching=True, max_lora_rank=max_lora_rank or 16, **kwargs)
        self._adapter_ids: dict[str, int] = {}
        import torch  # after the engine started: the thread count it computes with

        self.stats = {"one_token_contexts": 0, "one_token_requests": 0, "prompt_logprob_requests": 0,
                      "torch_threads": torch.get_num_threads(), "cpus": len(os.sched_getaffinity(0))}

    def use_adapter(self, name: str | None, path: str | None) -> None:
        """Score the following requests with this LoRA adapter (None: the base model)."""
        if path is None:
            self.lora_request = None
            return
        from vllm.lora.request import LoRARequest

        name = name or "adapter"
        lora_id = self._adapter_ids.setdefault(name, len(self._adapter_ids) + 1)
        self.lora_request = LoRARequest(name, lora_id, os.path.abspath(path))

    def shutdown(self) -> None:
        """Engine core, executor, scheduler and torch process groups (39 gloo threads here), stopped now."""
        engine = getattr(getattr(self, "model", None), "llm_engine", None)
        if engine is not None:
            engine.engine_core.shutdown()

    # ---------------------------------------------------------------------------------------- log-likelihood
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False):
        max_ctx = self.max_length - 1
        one_token, other = [], []
        for i, (_, ctx, cont) in enumerate(requests):
            (one_token if len(cont) == 1 and 1 <= len(ctx) < max_ctx else other).append(i)
        res: list = [None] * len(requests)
        if other:
            self.stats["prompt_logprob_requests"] += len(other)
            for i, r in zip(other, super()._loglikelihood_tokens([requests[i] for i in other], disable_tqdm=True)):
                res[i] = r
        if one_token:
            self.stats["one_token_requests"] += len(one_token)
            for i, r in zip(one_token, self._next_token_scores([requests[i] for i in one_token])):
                res[i] = r
        return res

    def _next_token_scores(self, requests) -> list[tuple[float, bool]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import MAX_LOGPROB_TOKEN_IDS

        answers: dict[tuple, set] = {}
        for _, ctx, cont in requests:
            answers.setdefault(tuple(ctx), set()).add(cont[0])
        contexts = sorted(answers)  # contexts sharing a prefix (an MMLU subject's few-shot block) become adjacent
        self.stats["one_token_contexts"] += len(contexts)
        scored: dict[tuple, tuple[int, dict]] = {}

        def run(batch: list[tuple]) -> None:
            params = []
            for ctx in batch:
                ids = sorted(answers[ctx])
                if len(ids) > MAX_LOGPROB_TOKEN_IDS:
                    raise ValueError(f"{len(ids)} one-token answers for one context; vLLM scores at most "
                                     f"{MAX_LOGPROB_TOKEN_IDS} per request")
                params.append(SamplingParams(max_tokens=1, temperature=0, logprob_token_ids=ids, detokenize=False))
            outs = self.model.generate([TokensPrompt(prompt_token_ids=list(c)) for c in batch], params,
                                       use_tqdm=False, lora_request=self.lora_request)
            for ctx, out in zip(batch, outs):
                step = out.outputs[0]
                scored[ctx] = (step.token_ids[0], {t: lp.logprob for t, lp in step.logprobs[0].items()})

        for leaders, rest in _waves(contexts):
            run(leaders)  # each group's shared prefix enters the cache once ...
            if rest:
                run(rest)  # ... and its other contexts read it
        out = []
        for (cache_key, ctx, cont) in requests:
            greedy_token, logprobs = scored[tuple(ctx)]
            answer = (logprobs[cont[0]], greedy_token == cont[0])
            out.append(answer)
            if cache_key is not None:
                self.cache_hook.add_partial("loglikelihood", cache_key, answer)
        return out


def _shared(a: tuple, b: tuple) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _waves(contexts: list[tuple]):
    """Split sorted contexts into groups that share a prefix of at least MIN_SHARED_PREFIX tokens with the group's
    first context; yield (first contexts, the others) per wave of groups whose first contexts fit WAVE_TOKENS."""
    groups: list[list[tuple]] = []
    for ctx in contexts:
        if groups and _shared(groups[-1][0], ctx) >= MIN_SHARED_PREFIX:
            groups[-1].append(ctx)
        else:
            groups.append([ctx])
    leaders, rest, tokens = [], [], 0
    for g in groups:
        if leaders and tokens + len(g[0]) > WAVE_TOKENS:
            yield leaders, rest
            leaders, rest, tokens = [], [], 0
        leaders.append(g[0])
        rest.extend(g[1:])
        tokens += len(g[0])
    if leaders:
        yield leaders, rest
