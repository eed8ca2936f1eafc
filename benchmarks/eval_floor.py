"""The least time any float32 scorer needs for an evaluation on this machine: tokens the model must process
times its FLOPs per token, divided by the machine's float32 matrix-multiply rate.

    python -m benchmarks.eval_floor                              # the full suite -> benchmarks/results/eval_floor/
    python -m benchmarks.eval_floor --tasks mmlu_anatomy,piqa    # any bench eval tasks

Tokens are counted on lm-eval's own requests for the tasks (the prompts `bench eval` scores, few-shot included),
tokenized as lm-eval splits context and continuation, under the ways a scorer can share work:
- `per_request`: every (context, continuation) request is its own prompt (lm-eval's vllm and hf models);
- `per_context`: each distinct context of a document once, then each of its continuations (a scorer that keeps a
  context's state exactly, e.g. hf's past_key_values);
- `context_cached_block{B}`: each context once, then each choice from its context's last whole KV block of B tokens
  (vLLM's prefix cache, which shares whole blocks only);
- one-token answers (MMLU) as one request per context whose common few-shot prefix is cached in KV blocks of
  B tokens (`bench eval --backend vllm`; B = 128 is vLLM's CPU default, 32 ours, 1 the ideal cache);
- generation (GSM8K): prompt tokens only, so the floor leaves the generated tokens out.
The floor takes the fewest tokens of each task and 2 x the model's non-embedding parameters per token (no
attention, no output layer): a lower bound, whatever the implementation. The rate is the best float32 matmul
rate measured here on the model's own layer shapes with every core; `forward_tokens_per_s` is a real forward pass
of the model (hf, no output layer) at a 4096-token batch.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "eval_floor"
SUITE = "mmlu,gsm8k,commonsense"
KV_BLOCKS = (128, 32, 1)


def lm_eval_requests(tasks: str, data_root: str) -> tuple[dict[str, list], dict]:
    """{task: [(subtask, doc_id, request_type, args)]} built by lm-eval for the planned tasks; missing tasks."""
    from evaluators.core import expand_tasks, plan_tasks
    from evaluators.runner import load_tasks, quiet_lm_eval

    quiet_lm_eval()
    plan, missing = plan_tasks(expand_tasks(tasks), data_root=data_root, limit=None, num_fewshot=None, hub=False)
    out = {}
    for t in plan:
        reqs = []
        for sub, task in sorted(load_tasks(t)["tasks"].items()):
            task.build_all_requests(rank=0, world_size=1)
            reqs += [(sub, i.doc_id, i.request_type, i.args) for i in task.instances]
        out[t["name"]] = reqs
    return out, missing


def _common_prefix(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def token_counts(requests: list, encode) -> dict:
    """The tokens one task's requests need under each way of sharing (module docstring)."""
    if requests[0][2] == "generate_until":
        prompts = [encode(r[3][0]) for r in requests]
        return {"documents": len(prompts), "kind": "generation", "prompt_tokens": sum(map(len, prompts))}

    def pair(ctx: str, cont: str) -> tuple[list, list]:  # lm-eval's encode_pair: context's trailing spaces move
        n = len(ctx) - len(ctx.rstrip())
        if n:
            ctx, cont = ctx[:-n], ctx[-n:] + cont
        whole, head = encode(ctx + cont), encode(ctx)
        return whole[:len(head)], whole[len(head):]

    docs: dict[tuple, list] = defaultdict(list)
    for sub, doc_id, _, args in requests:
        docs[(sub, doc_id)].append(pair(args[0], args[1]))
    def contexts(v: list) -> list:  # a document's distinct contexts (WinoGrande's differ per choice)
        return list({tuple(c): c for c, _ in v}.values())

    out = {"documents": len(docs), "requests": len(requests),
           "per_request": sum(len(c) + len(k) for v in docs.values() for c, k in v),
           "per_context": sum(sum(map(len, contexts(v))) + sum(len(k) for _, k in v) for v in docs.values())}
    if all(len(k) == 1 for v in docs.values() for _, k in v):  # one-token answers: one request per context
        out["kind"] = "one-token"
        by_sub: dict[str, list] = defaultdict(list)
        for (sub, _), v in docs.items():
            by_sub[sub].append(v[0][0])
        for block in KV_BLOCKS:
            total = 0
            for ctxs in by_sub.values():
                shared = min(_common_prefix(ctxs[0], c) for c in ctxs) if len(ctxs) > 1 else 0
                cached = shared // block * block
                total += sum(len(c) - min(cached, len(c) - 1) for c in ctxs)  # the last token is always computed
            out[f"prefix_cached_block{block}"] = total
    else:
        out["kind"] = "log-likelihood"
        for block in KV_BLOCKS:  # each context once, then each choice from its context's last whole cached block
            out[f"context_cached_block{block}"] = sum(
                sum(map(len, contexts(v))) + sum(len(c) % block + len(k) for c, k in v) for v in docs.values())
    return out


def fewest(counts: dict) -> int:
    return min(v for k, v in counts.items() if k == "prompt_tokens" or k.startswith(("per_", "prefix_", "context_")))


def matmul_rate(hidden: int, inter: int, tokens: int = 4096, repeats: int = 5, dtype=None, clock=time.perf_counter) -> float:
    """Best GFLOP/s (float32 unless dtype) over the model's projection shapes at a `tokens`-row batch, per second of
    `clock` (time.process_time: per CPU-second, what a shared machine leaves comparable)."""
    import torch

    best = 0.0
    for k, n in ((hidden, hidden), (hidden, inter), (inter, hidden)):
        a, b = torch.randn(tokens, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        a @ b
        t0 = clock()
        for _ in range(repeats):
            a @ b
        best = max(best, 2 * tokens * k * n * repeats / (clock() - t0) / 1e9)
    return best


def forward_rate(model, tokens: int = 4096, seq: int = 512) -> float:
    """Tokens per second of the model's decoder stack (no output layer) at batch tokens/seq x seq."""
    import torch

    ids = torch.randint(100, 10_000, (tokens // seq, seq))
    with torch.inference_mode():
        model.model(input_ids=ids[:1, :32])
        t0 = time.perf_counter()
        model.model(input_ids=ids)
        return tokens / (time.perf_counter() - t0)


def run(tasks: str, model_spec: str, data_root: str, out: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.models import resolve_model
    from bench.provenance import CODE
    from evaluators.core import expand_tasks

    expand_tasks(tasks)  # unknown names: one error line before the model loads
    path = resolve_model(model_spec)[0]
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    embed = model.get_input_embeddings().weight.numel()
    flops_per_token = 2 * (sum(p.numel() for p in model.parameters()) - embed)
    cfg = model.config
    gflops = matmul_rate(cfg.hidden_size, cfg.intermediate_size)
    fwd = forward_rate(model)
    reqs, missing = lm_eval_requests(tasks, data_root)
    encode = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    per_task = {}
    for name, r in reqs.items():
        c = token_counts(r, encode)
        c["fewest"] = fewest(c)
        c["floor_s"] = round(c["fewest"] * flops_per_token / (gflops * 1e9), 1)
        per_task[name] = c
        print(f"[eval_floor] {name}: {c}", file=sys.stderr, flush=True)
    total = sum(c["fewest"] for c in per_task.values())
    record = {"kind": "eval_floor", "tasks": tasks, "missing": missing, "model": path,
              "flops_per_token": flops_per_token, "matmul_gflops_fp32": round(gflops, 1),
              "forward_tokens_per_s": round(fwd, 1), "torch_threads": torch.get_num_threads(),
              "cpu_count": os.cpu_count(), "load_avg_at_start": list(os.getloadavg()),
              "per_task": per_task, "fewest_tokens": total,
              "floor_s": round(total * flops_per_token / (gflops * 1e9), 1),
              "floor_s_at_forward_rate": round(total / fwd, 1),
              **CODE,
              "when": _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S")}
    out.mkdir(parents=True, exist_ok=True)
    stem = "suite" if tasks == SUITE else tasks.replace(",", "+")
    (out / f"{stem}.json").write_text(json.dumps(record, indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown(record))
    print(markdown(record))
    return record


def markdown(r: dict) -> str:
    lines = [f"# The float32 floor of `{r['tasks']}` on this machine (`python -m benchmarks.eval_floor`)", "",
             f"{r['flops_per_token'] / 1e6:.0f} MFLOP per token (2 x non-embedding parameters); float32 matmul "
             f"{r['matmul_gflops_fp32']} GFLOP/s on {r['torch_threads']} threads (load {r['load_avg_at_start'][0]:.1f} "
             f"at start); a forward pass of the model {r['forward_tokens_per_s']:.0f} tokens/s.", "",
             "| task | documents | kind | tokens per request | per context | cached in KV blocks of 128 / 32 / 1 "
             "| fewest | floor s |", "|---|---:|---|---:|---:|---|---:|---:|"]
    for name, c in r["per_task"].items():
        blocks = " / ".join(f"{c[k]:,}" for b in KV_BLOCKS for k in (f"prefix_cached_block{b}", f"context_cached_block{b}")
                            if k in c)
        lines.append(f"| {name} | {c['documents']:,} | {c['kind']} | {c.get('per_request', c.get('prompt_tokens')):,} "
                     f"| {format(c['per_context'], ',') if 'per_context' in c else ''} | {blocks} | {c['fewest']:,} | {c['floor_s']:,} |")
    lines += ["", f"**Floor: {r['fewest_tokens']:,} tokens = {r['floor_s']:,.0f} s ({r['floor_s'] / 3600:.2f} h) at the "
              f"matmul rate; {r['floor_s_at_forward_rate']:,.0f} s at the forward-pass rate.** Generated tokens "
              "(GSM8K's answers), attention and the output layer come on top.",
              f"Missing tasks (not counted): {r['missing'] or 'none'}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.eval_full import benchmark_parser, run_benchmark

    p = benchmark_parser("benchmarks.eval_floor", __doc__, RESULTS)
    p.add_argument("--tasks", default=SUITE, help=f"bench eval task names (default: {SUITE})")
    args = p.parse_args(argv)
    return run_benchmark(args.data_root, lambda data_root: run(args.tasks, args.model, data_root, Path(args.out)))


if __name__ == "__main__":
    sys.exit(main())
