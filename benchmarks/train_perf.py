"""`bench perf --only training`: local training's tokens/s on the study preset, today's float32 padded path against
bfloat16 mixed precision, length-bucketed micro-batches, and both, in one process on the same examples.

Every variant trains every client of one study round (the preset's clients, local steps, batch and cutoff) with the
engine's own `local_train` on the engine's own ClientRuntime, from the same starting factors and the same seeds, so
each sees the same examples in the same steps. The variants take turns client by client (each client trained by
every variant in a row, the order rotated from client to client and repeat), so that a shared machine's drift over
minutes falls on all of them alike, and the ratios are taken against the float32 padded path of the same
process. A shared machine's other jobs take cores away at random, so besides wall-clock tokens/s every figure is
also given per CPU-second of this process (time.process_time), which those jobs disturb far less; the matmul
peaks are measured the same way, here, on the model's projection shapes (benchmarks/eval_floor.matmul_rate), and
the percentage of peak uses model FLOPs = 4 × non-embedding parameters per token (LoRA: forward 2N, input
gradients 2N, no weight gradients for the frozen base; the output layer runs on the labelled positions only and is
left out).
"""
from __future__ import annotations

import dataclasses
import statistics
import time

VARIANTS = {  # name -> (compute dtype, length buckets, mixed precision's fused kernels)
    "float32 padded (today)": ("float32", False, False),
    "bfloat16 autocast": ("bfloat16", False, False),
    "length buckets": ("float32", True, False),
    "bfloat16 + buckets": ("bfloat16", True, False),
    "bfloat16 + buckets + fused kernels": ("bfloat16", True, True),
}
BASELINE = "float32 padded (today)"
GOAL = "bfloat16 + buckets + fused kernels"   # what --compute-dtype bfloat16 runs (length buckets are the default)


def _quiet(*_a, **_k) -> None:
    pass


def _goal_note(precision) -> str | None:
    if precision is None:
        return None
    precision.fused_kernels = VARIANTS[GOAL][2]
    return precision.note()


def measure_training(model: str = "default", quick: bool = False, repeats: int | None = None, log=_quiet,
                     preset: str = "study", method: str = "fedit") -> dict:
    import torch

    from bench.client import ClientRuntime, ModelSpec, local_train
    from bench.compute import cpu_bf16_flags
    from bench.config import build_config
    from bench.engine import client_examples, load_tokenizer, preflight
    from bench.provenance import CODE, cpu_model

    from .eval_floor import matmul_rate

    repeats = repeats or (1 if quick else 3)
    cfg = build_config(preset=preset, overrides=dict(model=model, method=method, ranks=None, rank_distribution="homo",
                                                     compute_dtype="bfloat16", eval_tasks=[]))
    plan = preflight(cfg)
    tok = load_tokenizer(plan.model_path)
    clients = list(range(1 if quick else cfg.num_clients))
    examples = client_examples(cfg, plan, tok, clients)
    device = torch.device("cpu")
    runtime = ClientRuntime(cfg, ModelSpec(plan.model_path, device, torch.float32), plan.ranks, examples)
    adapter = f"r{cfg.rank}"
    base = runtime.model.get_base_model()
    n_params = sum(p.numel() for p in base.parameters())
    flops_per_token = 4 * (n_params - base.get_input_embeddings().weight.numel())
    steps = 1 if quick else None

    def one(name: str, k: int, warm_up: bool = False) -> tuple[int, float, float, float]:
        """Client k's local training in variant `name`: (tokens, wall s, CPU s, first-step loss)."""
        compute, buckets, fused = VARIANTS[name]
        if runtime.precision is not None:
            runtime.precision.fused_kernels = fused
        vcfg = dataclasses.replace(cfg, compute_dtype=compute, length_buckets=buckets,
                                   local_steps=1 if warm_up else steps or cfg.local_steps)
        runtime._load(adapter, cfg.rank, None, init_seed=1000 + k)
        params = [p for layer in runtime.layers.values()
                  for p in (layer.lora_A[adapter].weight, layer.lora_B[adapter].weight)]
        t, c = time.perf_counter(), time.process_time()
        stats = local_train(runtime.model, examples[k], vcfg, 2000 + k, device, tok.pad_token_id, params,
                            precision=runtime.precision if compute == "bfloat16" else None)
        return stats["tokens"], time.perf_counter() - t, time.process_time() - c, stats["first_loss"]

    log("[perf] training: warm-up ...")
    for name in VARIANTS:  # one step of each: allocator, oneDNN kernels, the bfloat16 views
        one(name, clients[0], warm_up=True)
    names = list(VARIANTS)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for i in range(repeats):
        sums = {n: {"tokens": 0, "wall": 0.0, "cpu": 0.0, "losses": []} for n in names}
        for j, k in enumerate(clients):
            turn = (i + j) % len(names)
            for name in names[turn:] + names[:turn]:
                tokens, wall, cpu, loss = one(name, k)
                acc = sums[name]
                acc["tokens"] += tokens
                acc["wall"] += wall
                acc["cpu"] += cpu
                acc["losses"].append(loss)
        for name in names:
            acc = sums[name]
            runs[name].append({"tokens": acc["tokens"], "wall_s": round(acc["wall"], 3), "cpu_s": round(acc["cpu"], 3),
                               "tokens_per_s": round(acc["tokens"] / acc["wall"], 2),
                               "tokens_per_cpu_s": round(acc["tokens"] / acc["cpu"], 2),
                               "first_losses": [round(x, 6) for x in acc["losses"]]})
            log(f"[perf] training: repeat {i + 1}/{repeats} {name}: {runs[name][-1]['tokens_per_s']:.1f} tok/s, "
                f"{runs[name][-1]['tokens_per_cpu_s']:.1f} tok/CPU-s")
    hidden, inter = base.config.hidden_size, base.config.intermediate_size
    rows = max(len(e["input_ids"]) for k in clients for e in examples[k]) * cfg.micro_batch_size
    peak, big = {}, 1024 if quick else 4096
    for label, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        peak[label] = {f"gflops_per_cpu_s_{n}_rows": round(matmul_rate(hidden, inter, n, repeats=r, dtype=dt,
                                                                       clock=time.process_time), 1)
                       for n, r in ((big, 2 if quick else 5), (rows, 5 if quick else 20))}
        peak[label]["peak"] = max(peak[label].values())
    med = lambda rs, key: statistics.median(r[key] for r in rs)  # noqa: E731
    base_wall, base_cpu = med(runs[BASELINE], "tokens_per_s"), med(runs[BASELINE], "tokens_per_cpu_s")
    summary = {}
    for name in names:
        compute = VARIANTS[name][0]
        tps, tpc = med(runs[name], "tokens_per_s"), med(runs[name], "tokens_per_cpu_s")
        gflops = tpc * flops_per_token / 1e9
        summary[name] = {
            "compute_dtype": compute, "length_buckets": VARIANTS[name][1], "fused_kernels": VARIANTS[name][2],
            "tokens_per_s_median": round(tps, 2), "tokens_per_cpu_s_median": round(tpc, 2),
            "ratio_wall": round(tps / base_wall, 3), "ratio_cpu": round(tpc / base_cpu, 3),
            "ratio_cpu_per_repeat": [round(r["tokens_per_cpu_s"] / b["tokens_per_cpu_s"], 3)
                                     for r, b in zip(runs[name], runs[BASELINE])],
            "model_gflops_per_cpu_s": round(gflops, 1),
            "pct_of_own_dtype_peak": round(100 * gflops / peak[compute]["peak"], 1),
            "pct_of_float32_peak": round(100 * gflops / peak["float32"]["peak"], 1),
            "first_losses": runs[name][0]["first_losses"]}
    best = summary[GOAL]
    return {
        "status": "ok", "model": plan.model_id, "preset": preset, "method": method, **CODE,
        "config": {k: getattr(cfg, k) for k in ("num_clients", "local_steps", "batch_size", "micro_batch_size",
                                                  "cutoff_len", "rank", "target_modules", "lora_dropout")},
        "clients": clients, "steps_per_client": steps or cfg.local_steps, "tokens_per_variant": runs[BASELINE][0]["tokens"],
        "repeats": repeats, "torch_threads": torch.get_num_threads(), "cpu_bf16_flags": cpu_bf16_flags(),
        "mixed_precision": _goal_note(runtime.precision),
        "cpu_model": cpu_model(),
        "flops_per_token": flops_per_token, "flops_convention": "4 × non-embedding parameters per token (LoRA training)",
        "matmul_peak": peak, "baseline": BASELINE + ", same process, same examples", "variants": summary, "runs": runs,
        "goal": "≥ 2× the float32 padded path's tokens/s (issue: study preset, same bench perf run)",
        "ratio": best["ratio_cpu"], "meets_goal": best["ratio_cpu"] >= 2.0}


def markdown_rows(a: dict) -> list[str]:
    if a.get("status") != "ok":
        return [f"| training | {a.get('status')}: {a.get('reason')} | – | – | – | – |"]
    rows = []
    for name, v in a["variants"].items():
        goal = name == GOAL
        rows.append(f"| training ({a['preset']}): {name} | {v['tokens_per_s_median']:.1f} tok/s, "
                    f"{v['tokens_per_cpu_s_median']:.1f} tok/CPU-s, {v['pct_of_own_dtype_peak']}% of the "
                    f"{v['compute_dtype']} matmul peak | {BASELINE} | {v['ratio_wall']:.2f} wall, {v['ratio_cpu']:.2f} CPU "
                    f"| {'≥ 2×' if goal else '–'} | {('yes' if a['meets_goal'] else 'no') if goal else '–'} |")
    return rows


def markdown_section(a: dict) -> list[str]:
    if a.get("status") != "ok":
        return []
    pk = a["matmul_peak"]
    lines = [f"## Local training ({a['model']}, preset {a['preset']}, method {a['method']})", "",
             f"Config: {a['config']}; clients {a['clients']}, {a['steps_per_client']} steps each, "
             f"{a['tokens_per_variant']:,} tokens per variant and repeat; {a['repeats']} repeats, variants taking turns "
             f"client by client (order rotated); "
             f"{a['torch_threads']} torch thread(s); CPU {a.get('cpu_model')}, bf16 flags: {', '.join(a['cpu_bf16_flags']) or 'none'}. "
             f"Mixed precision: {a['mixed_precision']}.", "",
             f"Matmul peak on the model's projection shapes, GFLOP per CPU-second: float32 {pk['float32']['peak']}, "
             f"bfloat16 {pk['bfloat16']['peak']} ({pk}). Model FLOPs: {a['flops_convention']} "
             f"= {a['flops_per_token'] / 1e6:.0f} MFLOP.", "",
             "| variant | tokens/s (wall, median) | tokens per CPU-s (median) | ratio wall | ratio CPU | per-repeat CPU ratios "
             "| model GFLOP/CPU-s | % own-dtype peak | % float32 peak | first-step losses |",
             "|---|---:|---:|---:|---:|---|---:|---:|---:|---|"]
    for name, v in a["variants"].items():
        lines.append(f"| {name} | {v['tokens_per_s_median']:.1f} | {v['tokens_per_cpu_s_median']:.1f} | {v['ratio_wall']:.2f} "
                     f"| {v['ratio_cpu']:.2f} | {v['ratio_cpu_per_repeat']} | {v['model_gflops_per_cpu_s']} "
                     f"| {v['pct_of_own_dtype_peak']} | {v['pct_of_float32_peak']} | {v['first_losses']} |")
    return lines + [""]
