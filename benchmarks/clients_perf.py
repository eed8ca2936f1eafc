"""`bench perf --only clients`: a round's clients trained one after another (local_train, the sequential path)
against the same clients batched (bench/batched.py), in one process, on the same model, data and seeds.

Model: the SmolLM2-135M architecture (its weights when they are on this machine, else random weights of its
shape: throughput depends on the shapes only); data: tokenizer-free random examples of unequal lengths and
counts (so clients take different numbers of steps), labels on the last third (the answer), as the study's
examples. Per client count: tokens/s, MFU and peak GPU memory of both paths, and the ratio. First, the
exactness check: a tiny Llama in float32, heterogeneous ranks, unequal data, LoRA dropout on, batched vs
sequential factors and losses (the same comparison as tests/test_batched.py, on this device).
"""
from __future__ import annotations

import math
import time

RANKS = (16, 8, 4, 4)  # cycled over the clients
MFU_CONVENTION = ("model FLOPs = 6 × parameters × tokens (the repository's GPU convention; LoRA training does no "
                  "weight-gradient work for the frozen base, so 4 × parameters × tokens is also given), over the "
                  "dense bf16 peak")


def _model(config, device, dtype, ranks, dropout: float):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        base = AutoModelForCausalLM.from_config(config, dtype=dtype)
    base.config.use_cache = False
    model = None
    for r in sorted(set(ranks)):
        lc = LoraConfig(r=r, lora_alpha=16.0, lora_dropout=dropout, target_modules=["q_proj", "v_proj"],
                        task_type="CAUSAL_LM")
        model = get_peft_model(base, lc, adapter_name=f"r{r}") if model is None else (model.add_adapter(f"r{r}", lc) or model)
    model.to(device, dtype)
    layers = {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer") and len(m.lora_A)}
    n_params = sum(p.numel() for p in base.parameters())
    return model, layers, n_params


def _jobs(n_clients: int, vocab: int, seq: tuple[int, int], sizes: tuple[int, int], layers, dtype, seed: int = 0):
    """Clients with unequal example counts and lengths; starting factors: A random (a fresh peft init), B small
    random (a later round), so that both factors get gradients from the first step."""
    import torch

    from bench.batched import Job

    g = torch.Generator().manual_seed(seed)
    jobs = []
    for c in range(n_clients):
        r = RANKS[c % len(RANKS)]
        n = int(torch.randint(sizes[0], sizes[1] + 1, (1,), generator=g))
        examples = []
        for _ in range(n):
            length = int(torch.randint(seq[0], seq[1] + 1, (1,), generator=g))
            ids = torch.randint(3, vocab, (length,), generator=g).tolist()
            cut = length - length // 3
            examples.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:]})
        init = {}
        for name, layer in layers.items():
            d_in, d_out = layer.in_features, layer.out_features
            init[name] = ((torch.randn(r, d_in, generator=g) / d_in ** 0.5).to(dtype),
                          (torch.randn(d_out, r, generator=g) * 1e-3).to(dtype))
        jobs.append(Job(examples, 1000 + c, r, 16.0 / r, init))
    return jobs


def _sequential(model, layers, jobs, cfg, device):
    """Each client through local_train on its rank's peft slot, one after another (the in-process transport)."""
    import torch

    from bench.client import local_train

    out = []
    for j in jobs:
        adapter = f"r{j.rank}"
        model.set_adapter(adapter)
        params = []
        with torch.no_grad():
            for name, layer in layers.items():
                a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
                a.copy_(j.init[name][0])
                b.copy_(j.init[name][1])
                params += [a, b]
        stats = local_train(model, j.examples, cfg, j.seed, device, 0, params)
        out.append((stats, {n: (l.lora_A[adapter].weight.detach().float().cpu().clone(),
                                l.lora_B[adapter].weight.detach().float().cpu().clone()) for n, l in layers.items()}))
    return out


def exactness(device, log=print) -> dict:
    """Batched vs sequential on a tiny Llama in float32 on `device`: max relative differences of the trained
    factors and of the per-client losses (heterogeneous ranks, unequal data, dropout 0.1)."""
    import torch
    from transformers import LlamaConfig

    from bench.batched import train_batched
    from bench.config import build_config

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    dev = torch.device(device)
    model, layers, _ = _model(config, dev, torch.float32, RANKS[:3], 0.1)
    cfg = build_config(overrides=dict(local_steps=None, local_epochs=1.0, batch_size=4, micro_batch_size=2, lr=1e-3,
                                      length_buckets=False,  # the engine trains that case sequentially (transports.inprocess._client_batching)
                                      lora_dropout=0.1))
    jobs = _jobs(3, 256, (12, 40), (5, 14), layers, torch.float32, seed=1)
    seq = _sequential(model, layers, jobs, cfg, dev)
    train_batched(model, layers, jobs, cfg, dev, 0, dtype=torch.float32)
    f_err = max(float((jb.trained[n][i] - sq[1][n][i]).abs().max() / sq[1][n][i].abs().max().clamp_min(1e-12))
                for jb, sq in zip(jobs, seq) for n in layers for i in (0, 1))
    l_err = max(abs(jb.stats[k] - sq[0][k]) / max(abs(sq[0][k]), 1e-12)
                for jb, sq in zip(jobs, seq) for k in ("first_loss", "last_loss", "loss"))
    steps = [jb.stats["steps"] for jb in jobs]
    same = all(jb.stats["steps"] == sq[0]["steps"] and jb.stats["tokens"] == sq[0]["tokens"] for jb, sq in zip(jobs, seq))
    out = {"device": str(dev), "dtype": "float32", "steps": steps, "same_steps_and_tokens": same,
           "factors_max_rel_err": f_err, "loss_max_rel_err": l_err, "passed": bool(same and f_err <= 1e-4 and l_err <= 1e-5)}
    log(f"[perf] clients: exactness on {dev}: factors {f_err:.1e}, losses {l_err:.1e}, steps {steps}")
    return out


def measure_clients(quick: bool = False, log=print, *, device=None, dtype=None, config=None, client_counts=None,
                    seq=None, sizes=None, batch_size: int = 8, dropout: float = 0.0, max_tokens: int = 65536) -> dict:
    """The clients section (CUDA by default; device/dtype/config/sizes exist so that the path runs on a CPU)."""
    import torch

    from bench.batched import train_batched
    from bench.config import build_config

    from .engine_perf import peak_bf16_tflops, smollm2_135m_config

    if device is None:
        if not torch.cuda.is_available():
            return {"status": "skipped", "reason": "no CUDA device: skipped (the exactness test runs on the CPU in CI)"}
        device = "cuda"
    dev = torch.device(device)
    dtype = dtype or torch.bfloat16
    cuda = dev.type == "cuda"
    name = torch.cuda.get_device_name(dev) if cuda else "cpu"
    peak = peak_bf16_tflops(name) if cuda and dtype == torch.bfloat16 else None
    result = {"status": "ok", "device": name, "peak_bf16_tflops": peak, "mfu_convention": MFU_CONVENTION,
              "exactness": exactness(device, log)}
    config = config or smollm2_135m_config()
    client_counts = client_counts or ((4, 8) if quick else (20, 100))
    seq = seq or ((32, 96) if quick else (96, 256))
    sizes = sizes or ((8, 24) if quick else (16, 48))
    model, layers, n_params = _model(config, dev, dtype, RANKS, dropout)
    cfg = build_config(overrides=dict(local_steps=None, local_epochs=1.0, batch_size=batch_size,
                                      micro_batch_size=batch_size, lr=3e-4, lora_dropout=dropout))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    warm = _jobs(2, config.vocab_size, seq, (batch_size, batch_size), layers, dtype, seed=99)
    _sequential(model, layers, warm, cfg, dev)
    train_batched(model, layers, warm, cfg, dev, 0, max_tokens=max_tokens)
    rows = {}
    for k in client_counts:
        row = {"clients": k, "ranks": list(RANKS), "batch_size": batch_size, "seq_len_range": list(seq),
               "examples_range": list(sizes), "lora_dropout": dropout, "max_tokens_per_forward": max_tokens}
        for mode in ("sequential", "batched"):
            jobs = _jobs(k, config.vocab_size, seq, sizes, layers, dtype, seed=k)
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(dev)
            sync()
            t = time.perf_counter()
            if mode == "sequential":
                stats = [s for s, _ in _sequential(model, layers, jobs, cfg, dev)]
            else:
                train_batched(model, layers, jobs, cfg, dev, 0, max_tokens=max_tokens)
                stats = [j.stats for j in jobs]
            sync()
            secs = time.perf_counter() - t
            tokens = sum(s["tokens"] for s in stats)
            tps = tokens / secs
            r = {"seconds": round(secs, 3), "tokens": tokens, "tokens_per_s": round(tps, 1),
                 "steps": sum(s["steps"] for s in stats), "model_tflops_6n": round(6 * n_params * tps / 1e12, 3),
                 "mfu_6n": round(6 * n_params * tps / 1e12 / peak, 4) if peak else None,
                 "mfu_4n": round(4 * n_params * tps / 1e12 / peak, 4) if peak else None}
            if cuda:
                r["max_memory_allocated_gb"] = round(torch.cuda.max_memory_allocated(dev) / 1e9, 2)
            row[mode] = r
            log(f"[perf] clients: {k} clients {mode}: {tps:,.0f} tokens/s, {secs:.1f} s, MFU(6N) {r['mfu_6n']}")
        row["speedup"] = round(row["batched"]["tokens_per_s"] / row["sequential"]["tokens_per_s"], 2)
        rows[str(k)] = row
    result.update(model_params=n_params, dtype=str(dtype).replace("torch.", ""), rounds=rows,
                  config={"ranks_cycle": list(RANKS), "target_modules": ["q_proj", "v_proj"], "lr": 3e-4})
    del model
    return result


def markdown(r: dict) -> list[str]:
    if r.get("status") != "ok":
        return ["## Clients of a round: batched vs sequential", "", r.get("reason", r.get("status", "")), ""]
    ex = r["exactness"]
    lines = [f"## Clients of a round: batched vs sequential ({r['device']}, {r['dtype']})", "",
             f"MFU convention: {r['mfu_convention']}.", "",
             f"Exactness on {ex['device']} ({ex['dtype']}, dropout 0.1, steps {ex['steps']}): factors max rel. err "
             f"{ex['factors_max_rel_err']:.1e}, losses {ex['loss_max_rel_err']:.1e}: **{'pass' if ex['passed'] else 'FAIL'}**.", "",
             "| clients | path | tokens/s | seconds | MFU (6N) | MFU (4N) | peak GPU memory (GB) | speed-up |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for k, row in r["rounds"].items():
        for mode in ("sequential", "batched"):
            x = row[mode]
            lines.append(f"| {k} | {mode} | {x['tokens_per_s']:,.0f} | {x['seconds']} | {x['mfu_6n']} | {x['mfu_4n']} "
                         f"| {x.get('max_memory_allocated_gb', '–')} | {row['speedup'] if mode == 'batched' else ''} |")
    lines.append("")
    return lines


def summary_rows(r: dict) -> list[str]:
    if r.get("status") != "ok":
        return [f"| clients | {r.get('reason', r.get('status'))} | – | – | – | – |"]
    rows = [f"| clients: batched = sequential on {r['exactness']['device']} | "
            f"{'pass' if r['exactness']['passed'] else 'FAIL'} | – | – | exact | {'yes' if r['exactness']['passed'] else 'no'} |"]
    for k, row in r["rounds"].items():
        b, s = row["batched"], row["sequential"]
        rows.append(f"| clients: {k}-client round, batched tokens/s (MFU 6N {b['mfu_6n']}) | {b['tokens_per_s']:,.0f} "
                    f"| sequential {s['tokens_per_s']:,.0f} | {row['speedup']}× | ≥ 5× | {'yes' if row['speedup'] >= 5 else 'no'} |")
    return rows
