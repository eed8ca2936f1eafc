"""Engine-side measurements for `bench perf`: memory per client, loop overhead, GPU throughput.

Every figure is a ratio against a baseline measured by the same process:
- memory: peak RSS of a whole `run_federated` with 1, 5 and 20 simulated clients, each in a fresh
  subprocess (the kernel's own peak for that child, from os.wait4), against the 1-client run; plus the
  bytes one client's LoRA factors take (computed from the target-module shapes, checked against the
  engine's own `bytes_up`);
- overhead: tokens/s of the federated engine against a bare peft loop (get_peft_model + AdamW) on
  the same model, the same tokenised batches (recorded from the engine's own run) and the same number
  of optimizer steps, alternated and reported as medians;
- gpu: on a CUDA device only, bf16 tokens/s and MFU of the engine's `train_client` on the default
  model and on a ~1B Llama built from a config, and aggregation time per method on the GPU.

Nothing here asserts a speed; tests/test_perf_smoke.py only checks that the outputs are complete.
Child entry point (used by `memory`): python -m benchmarks.engine_perf memory-child <spec.json> <out.json>
"""
from __future__ import annotations

import dataclasses
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUICK_RANKS = [16, 8, 4, 4]          # the quick preset's heterogeneous ranks, cycled over the clients
MEMORY_CLIENTS = (1, 5, 20)
MEMORY_GOAL = 1.15                   # peak RSS of 20 clients ≤ 1.15 × that of one client
OVERHEAD_GOAL = 0.95                 # engine tokens/s ≥ 0.95 × the bare peft loop's


def _quiet(*_a, **_k) -> None:
    pass


def _cycled_ranks(n: int) -> list[int]:
    return [QUICK_RANKS[i % len(QUICK_RANKS)] for i in range(n)]


# ---- memory ---------------------------------------------------------------------------------------

def memory_overrides(n_clients: int, model: str, method: str) -> dict:
    """A run that is about memory, not time: 1 round, 1 local step of batch 1, short cutoff, no eval."""
    return dict(model=model, method=method, num_clients=n_clients, ranks=_cycled_ranks(n_clients),
                rank_distribution="explicit", partition="iid", max_examples_per_client=64, rounds=1,
                local_steps=1, batch_size=1, micro_batch_size=1, cutoff_len=64, test_limit=2, eval_tasks=[])


def factor_bytes(module_shapes: dict[str, tuple[int, int]], rank: int, bytes_per_value: int = 4) -> int:
    """Bytes of one client's LoRA factors: A (r × d_in) and B (d_out × r) per target module, float32
    as ClientModel.factors() returns them."""
    return sum(rank * (d_in + d_out) for d_out, d_in in module_shapes.values()) * bytes_per_value


def _py_bytes(obj) -> int:
    """Deep size of the engine's tokenised examples (dicts of lists of Python ints)."""
    seen, total, stack = set(), 0, [obj]
    while stack:
        o = stack.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        total += sys.getsizeof(o)
        if isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, (list, tuple)):
            stack.extend(o)
    return total


def _memory_child(spec_path: str, out_path: str) -> int:
    """Runs in a fresh interpreter: one whole run_federated, then its own view of the peak."""
    spec = json.loads(Path(spec_path).read_text())
    from bench import data as data_mod
    from bench.config import build_config
    from bench.engine import preflight, run_federated
    from bench.observers import rss_mb

    rss_imports = rss_mb()
    cfg = build_config(preset="quick", overrides=spec["overrides"])
    plan = preflight(cfg)
    t = time.time()
    record = run_federated(cfg, plan=plan, log=_quiet)
    wall = time.time() - t
    peak_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    # what the engine keeps per client between rounds: its tokenised examples (re-made here to size them)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(plan.model_path)
    shard = plan.shards[0]
    examples = [data_mod.tokenize(plan.dataset.train[i], tok, cfg.prompt_template, cfg.cutoff_len, cfg.train_on_inputs)
                for i in shard]
    n_tokens = sum(len(e["input_ids"]) for e in examples)
    rnd = record["rounds"][0]
    out = {"clients": cfg.num_clients, "ranks": plan.ranks, "rss_after_imports_mb": rss_imports,
           "peak_rss_self_mb": round(peak_self, 1), "rss_end_of_round_mb": rnd.get("rss_mb"),
           "wall_s": round(wall, 2), "timings": record["timings"],
           "bytes_up": [c["bytes_up"] for c in rnd["clients"]],
           "tokenised_client0": {"examples": len(examples), "tokens": n_tokens, "python_bytes": _py_bytes(examples),
                                 "as_int32_tensors_bytes": 2 * 4 * n_tokens}}
    Path(out_path).write_text(json.dumps(out))
    return 0


def _run_child(spec: dict, workdir: Path, log) -> dict:
    """Fresh interpreter per configuration; its peak RSS from the kernel (wait4 rusage of that child)."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path, out_path, log_path = workdir / "spec.json", workdir / "child.json", workdir / "child.log"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    with open(log_path, "w") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.engine_perf", "memory-child", str(spec_path), str(out_path)],
                                cwd=str(REPO), env=env, stdout=logf, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 or not out_path.is_file():
        tail = log_path.read_text()[-1500:]
        raise RuntimeError(f"memory child ({spec['overrides']['num_clients']} clients) failed with exit code "
                           f"{proc.returncode}:\n{tail}")
    result = json.loads(out_path.read_text())
    result["peak_rss_mb"] = round(usage.ru_maxrss / 1024, 1)  # KiB → MiB, this child only
    return result


def measure_memory(model: str = "default", method: str = "flora", clients=MEMORY_CLIENTS, log=_quiet,
                   workdir: str | None = None) -> dict:
    from bench.config import build_config
    from bench.engine import target_module_shapes
    from bench.models import resolve_model

    model_path, model_id = resolve_model(model)
    base = build_config(preset="quick", overrides=memory_overrides(1, model, method))
    shapes = target_module_shapes(model_path, base.target_modules)
    tmp = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="bench-perf-mem-"))
    try:
        runs = _memory_runs(model, method, clients, shapes, tmp, log)
    finally:
        if workdir is None:  # each run wrote a whole global model: do not leave them behind
            shutil.rmtree(tmp, ignore_errors=True)
    return _memory_summary(runs, model_id, model, method, shapes)


def _memory_runs(model, method, clients, shapes, tmp: Path, log) -> list[dict]:
    runs = []
    for n in clients:
        ovr = memory_overrides(n, model, method)
        ovr.update(output_dir=str(tmp / f"c{n}" / "run"), results_dir=str(tmp / f"c{n}" / "results"))
        log(f"[perf] memory: {n} client(s), fresh subprocess ...")
        r = _run_child({"overrides": ovr}, tmp / f"c{n}", log)
        expected = [factor_bytes(shapes, rk) for rk in r["ranks"]]
        r["factor_bytes_expected"] = expected
        r["factor_bytes_match_engine"] = expected == r["bytes_up"]
        r["updates_held_in_round_bytes"] = sum(r["bytes_up"])
        runs.append(r)
        log(f"[perf] memory: {n} client(s): peak RSS {r['peak_rss_mb']:.0f} MiB")
    return runs


def _memory_summary(runs, model_id, model, method, shapes) -> dict:
    base_peak = runs[0]["peak_rss_mb"]
    for r in runs:
        r["ratio_vs_1_client"] = round(r["peak_rss_mb"] / base_peak, 4)
    largest = runs[-1]
    per_rank = {str(rk): factor_bytes(shapes, rk) for rk in sorted(set(QUICK_RANKS))}
    tok0 = runs[0]["tokenised_client0"]
    return {
        "status": "ok", "model": model_id, "method": method, "baseline": f"{runs[0]['clients']} client(s), same parent process",
        "config": {k: v for k, v in memory_overrides(0, model, method).items() if k not in ("num_clients", "ranks", "model", "method")},
        "ranks": "quick preset's [16, 8, 4, 4] cycled over the clients",
        "target_modules": {"count": len(shapes), "shapes": sorted({f"{o}x{i}" for o, i in shapes.values()})},
        "runs": runs, "goal": f"peak RSS of {largest['clients']} clients ≤ {MEMORY_GOAL}× that of {runs[0]['clients']}",
        "ratio": largest["ratio_vs_1_client"], "meets_goal": largest["ratio_vs_1_client"] <= MEMORY_GOAL,
        "bytes_per_client": {
            "factors_by_rank": per_rank,
            "factors_formula": "rank × Σ_modules (d_in + d_out) × 4 bytes (float32 A and B)",
            "factors_match_engine_bytes_up": all(r["factor_bytes_match_engine"] for r in runs),
            "held_between_rounds_tensors": 0,
            "held_between_rounds_note": "after aggregation the engine drops every client's factors; between rounds a "
                                        "client holds only its tokenised examples (Python lists, below)",
            "tokenised_examples_python_bytes": tok0["python_bytes"], "tokenised_examples": tok0["examples"],
            "tokenised_tokens": tok0["tokens"], "tokenised_as_int32_tensors_bytes": tok0["as_int32_tensors_bytes"],
        },
    }


# ---- loop overhead --------------------------------------------------------------------------------

def overhead_overrides(model: str, method: str, quick: bool) -> dict:
    size = (dict(num_clients=2, rounds=2, local_steps=2, batch_size=2, micro_batch_size=2, cutoff_len=64) if quick
            else dict(num_clients=4, rounds=2, local_steps=3, batch_size=4, micro_batch_size=4, cutoff_len=128))
    return dict(model=model, method=method, ranks=None, rank_distribution="homo", rank=8, partition="iid",
                max_examples_per_client=32, test_limit=1, eval_tasks=[], **size)


def _engine_once(cfg, plan, workdir: Path, record_batches: list | None = None) -> dict:
    """One run_federated; its loop time is the rounds' own seconds plus metrics/checkpoint writing."""
    from bench import client, data as data_mod, engine

    run_cfg = dataclasses.replace(cfg, output_dir=str(workdir / "run"), results_dir=str(workdir / "results"))
    orig_train = client.local_train
    if record_batches is not None:  # a warm-up run records the exact batches the engine trains on
        def recording_train(*args, **kwargs):
            steps, orig_collate = [], data_mod.collate

            def collate(batch, pad):
                steps.append(list(batch))
                return orig_collate(batch, pad)
            data_mod.collate = collate
            try:
                return orig_train(*args, **kwargs)
            finally:
                data_mod.collate = orig_collate
                record_batches.append(steps)
        client.local_train = recording_train
    try:
        t = time.perf_counter()
        rec = engine.run_federated(run_cfg, plan=plan, log=_quiet)
        wall = time.perf_counter() - t
    finally:
        client.local_train = orig_train
    tokens = sum(c["tokens"] for r in rec["rounds"] for c in r["clients"])
    steps = sum(c["steps"] for r in rec["rounds"] for c in r["clients"])
    loop_s = sum(r["seconds"] for r in rec["rounds"]) + rec["timings"]["checkpoint_s"]
    return {"tokens": tokens, "steps": steps, "loop_s": loop_s, "train_s": rec["timings"]["train_s"], "wall_s": wall,
            "tokens_per_s": tokens / loop_s, "train_tokens_per_s": tokens / rec["timings"]["train_s"],
            "timings": rec["timings"]}


class BarePeftLoop:
    """The baseline: get_peft_model + AdamW + the same batches, nothing else."""

    def __init__(self, cfg, model_path: str):
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_path)
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        base.config.use_cache = False
        lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=list(cfg.target_modules), task_type="CAUSAL_LM")
        self.model = get_peft_model(base, lora)
        self.lr = cfg.lr

    def run(self, clients_steps: list[list[list[dict]]]) -> dict:
        import torch

        from bench.data import collate

        model = self.model
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=self.lr, weight_decay=0.0)
        tokens = steps = 0
        t = time.perf_counter()
        for client in clients_steps:
            for batch in client:
                ids, labels, mask = collate(batch, self.pad)
                model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                tokens += int(mask.sum())
                steps += 1
        secs = time.perf_counter() - t
        return {"tokens": tokens, "steps": steps, "loop_s": secs, "tokens_per_s": tokens / secs}


def measure_overhead(model: str = "default", method: str = "flora", quick: bool = False, repeats: int | None = None,
                     log=_quiet, workdir: str | None = None) -> dict:
    import gc

    from bench.config import build_config
    from bench.engine import preflight

    repeats = repeats or (2 if quick else 3)
    cfg = build_config(preset="quick", overrides=overhead_overrides(model, method, quick))
    plan = preflight(cfg)
    tmp = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="bench-perf-loop-"))
    try:
        return _overhead(cfg, plan, method, quick, repeats, tmp, log)
    finally:
        if workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)


def _overhead(cfg, plan, method, quick, repeats, tmp: Path, log) -> dict:
    import gc

    model = cfg.model
    batches: list = []
    log("[perf] overhead: engine warm-up run (records the batches) ...")
    warm = _engine_once(cfg, plan, tmp / "warmup", record_batches=batches)
    bare = BarePeftLoop(cfg, plan.model_path)
    bare.run([batches[0][:1]])  # warm-up of the baseline: one step
    engine_runs, bare_runs = [], []
    for i in range(repeats):  # alternate, and swap the order every other pair, to cancel drift
        order = ("engine", "bare") if i % 2 == 0 else ("bare", "engine")
        for which in order:
            gc.collect()
            if which == "engine":
                engine_runs.append(_engine_once(cfg, plan, tmp / f"engine{i}"))
            else:
                bare_runs.append(bare.run(batches))
        log(f"[perf] overhead: pair {i + 1}/{repeats}: engine {engine_runs[-1]['tokens_per_s']:.1f} tok/s, "
            f"bare {bare_runs[-1]['tokens_per_s']:.1f} tok/s")
    med = lambda rows, key: statistics.median(r[key] for r in rows)  # noqa: E731
    e_tps, b_tps = med(engine_runs, "tokens_per_s"), med(bare_runs, "tokens_per_s")
    pair_ratios = [e["tokens_per_s"] / b["tokens_per_s"] for e, b in zip(engine_runs, bare_runs)]
    train_ratio = med(engine_runs, "train_tokens_per_s") / b_tps
    same = all(r["tokens"] == bare_runs[0]["tokens"] and r["steps"] == bare_runs[0]["steps"] for r in engine_runs)
    ratio = e_tps / b_tps
    return {
        "status": "ok", "model": plan.model_id, "method": method, "repeats": repeats,
        "baseline": "bare peft loop (get_peft_model + AdamW), same process, same batches",
        "config": {k: v for k, v in overhead_overrides(model, method, quick).items() if k != "model"},
        "steps_per_run": engine_runs[0]["steps"], "tokens_per_run": engine_runs[0]["tokens"],
        "same_tokens_and_steps": same,
        "engine_tokens_per_s_median": round(e_tps, 2), "bare_tokens_per_s_median": round(b_tps, 2),
        "engine_train_only_tokens_per_s_median": round(med(engine_runs, "train_tokens_per_s"), 2),
        "ratio": round(ratio, 4), "ratio_train_only": round(train_ratio, 4),
        "pair_ratios": [round(x, 4) for x in pair_ratios], "pair_ratio_median": round(statistics.median(pair_ratios), 4),
        "goal": f"engine tokens/s ≥ {OVERHEAD_GOAL}× the bare loop's", "meets_goal": ratio >= OVERHEAD_GOAL,
        "engine_runs": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for r in engine_runs],
        "bare_runs": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for r in bare_runs],
        "warmup_engine_timings": warm["timings"],
        "definition": "engine loop time = Σ round seconds (configure; the client step: merges, adapter load, local_train, "
                      "factors; reply filter, aggregate) + metrics/checkpoint writing; train-only = the engine's train_s",
    }


# ---- GPU ------------------------------------------------------------------------------------------

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0,  # H100 SXM / HBM3
                    "A100": 312.0, "L40S": 362.0, "L4": 121.0}


def peak_bf16_tflops(name: str) -> float | None:
    """Dense bf16 tensor-core peak by GPU name (None: unknown GPU, MFU not reported)."""
    for key, val in PEAK_BF16_TFLOPS.items():  # most specific first
        if key.lower() in name.lower():
            return val
    return None


def smollm2_135m_config():
    """SmolLM2-135M-Instruct's architecture (its config.json), for machines that lack its weights: tokens/s and
    MFU depend on the shapes, not on the weight values."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                       rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
                       bos_token_id=1, eos_token_id=2, pad_token_id=2)


def default_model_source() -> tuple[str, object]:
    """(label, source) of the default model for the GPU section: its real weights when they are on this machine,
    else its architecture with random weights (same FLOPs), labelled as such."""
    from bench import BenchError
    from bench.models import resolve_model

    try:
        return "SmolLM2-135M-Instruct (default)", resolve_model("default")[0]
    except BenchError:
        return "SmolLM2-135M-Instruct architecture (random weights: the weights are not on this machine)", smollm2_135m_config()


def llama_1b_config():
    from transformers import LlamaConfig

    # TinyLlama-1.1B's shape
    return LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                       num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)


def train_throughput(source, device, dtype, *, steps: int = 10, batch_size: int = 8, seq_len: int = 512,
                     rank: int = 16, warmup_steps: int = 2) -> dict:
    """tokens/s of the engine's own local_train (one peft adapter, AdamW) on random full-length batches."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from bench.client import local_train
    from bench.config import build_config

    if isinstance(source, str):
        base = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(device)
    else:
        with torch.device(device):
            base = AutoModelForCausalLM.from_config(source, dtype=dtype)
    base.config.use_cache = False
    n_params = sum(p.numel() for p in base.parameters())
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                            target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    vocab = base.config.vocab_size
    g = torch.Generator().manual_seed(0)
    examples = [{"input_ids": ids, "labels": ids} for ids in
                torch.randint(3, vocab, (batch_size * 4, seq_len), generator=g).tolist()]
    params = [p for p in model.parameters() if p.requires_grad]

    def train(n, seed):
        cfg = build_config(overrides=dict(local_steps=n, batch_size=batch_size, micro_batch_size=batch_size, lr=1e-4))
        return local_train(model, examples, cfg, seed, torch.device(device), 0, params)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    train(warmup_steps, 0)
    sync()
    t = time.perf_counter()
    stats = train(steps, 1)
    sync()
    secs = time.perf_counter() - t
    tps = stats["tokens"] / secs
    out = {"params": n_params, "dtype": str(dtype).replace("torch.", ""), "batch_size": batch_size, "seq_len": seq_len,
           "steps": steps, "tokens": stats["tokens"], "seconds": round(secs, 3), "tokens_per_s": round(tps, 1),
           "model_tflops": round(6 * n_params * tps / 1e12, 3)}
    if torch.device(device).type == "cuda":
        out["max_memory_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    del model, base
    return out


def aggregation_ms(device, dtype, *, shapes=((4096, 4096),), ranks=(64, 32, 16, 16, 8, 8, 4, 4, 4, 4),
                   repeats: int = 5) -> dict:
    """Each method's aggregate() on one module of each shape, tensors on `device`; median ms."""
    import torch

    from methods import METHODS, ClientUpdate, GlobalState, get_method

    from .aggregation import dense_flexlora

    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    out = {}
    for d_out, d_in in shapes:
        g = torch.Generator().manual_seed(0)
        ups = [ClientUpdate(k, r, 16.0 / r, 10 + k,
                            {"m": ((torch.randn(r, d_in, generator=g) / d_in ** 0.5).to(device, dtype),
                                   (torch.randn(d_out, r, generator=g) / r ** 0.5).to(device, dtype))})
               for k, r in enumerate(ranks)]
        fns = {name: (lambda m=get_method(name): m.aggregate(ups, GlobalState())) for name in sorted(METHODS)}
        fns["dense-svd flexlora (baseline)"] = lambda: dense_flexlora(ups)  # the public code's path, on this device
        row = {}
        for name, fn in fns.items():
            try:
                fn()
                sync()
                times = []
                for _ in range(repeats):
                    t = time.perf_counter()
                    fn()
                    sync()
                    times.append((time.perf_counter() - t) * 1e3)
                row[name] = round(statistics.median(times), 3)
            except Exception as exc:  # a method that cannot run on this device/dtype: say so, go on
                row[name] = f"error: {type(exc).__name__}: {str(exc)[:120]}"
        out[f"{d_out}x{d_in}"] = row
    return out


def measure_gpu(quick: bool = False, log=_quiet, *, device=None, dtype=None, models=None, agg_shapes=None,
                train_sizes=None) -> dict:
    """CUDA only. device/dtype/models/agg_shapes/train_sizes (steps, batch, seq) exist so that the code path
    can be smoke-tested on CPU."""
    import torch

    if device is None:
        if not torch.cuda.is_available():
            return {"status": "skipped", "reason": "no CUDA device: skipped"}
        device = "cuda"
    dtype = dtype or torch.bfloat16
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    peak = peak_bf16_tflops(name) if dev.type == "cuda" and dtype == torch.bfloat16 else None
    if models is None:
        label, source = default_model_source()
        models = {label: source, "llama-1.1b (from config)": llama_1b_config()}
    steps, batch, seq = train_sizes or ((5, 4, 512) if quick else (20, 8, 1024))
    train = {}
    for label, source in models.items():
        log(f"[perf] gpu: training throughput of {label} ...")
        try:
            r = train_throughput(source, dev, dtype, steps=steps, batch_size=batch, seq_len=seq)
            r["mfu"] = round(r["model_tflops"] / peak, 4) if peak else None
        except Exception as exc:  # e.g. out of memory on a small GPU
            r = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        train[label] = r
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    log("[perf] gpu: aggregation ...")
    shapes = agg_shapes or (((1024, 1024),) if quick else ((4096, 4096), (11008, 4096)))
    agg_dtype = torch.float32
    return {"status": "ok", "device": name, "peak_bf16_tflops": peak,
            "mfu_convention": "model FLOPs = 6 × parameters × tokens (attention ignored), over the dense bf16 peak",
            "train": train, "aggregation_dtype": str(agg_dtype).replace("torch.", ""),
            "aggregation_ms": aggregation_ms(dev, agg_dtype, shapes=shapes, repeats=3 if quick else 5)}


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "memory-child":
        sys.exit(_memory_child(sys.argv[2], sys.argv[3]))
    print(__doc__)
    sys.exit(2)
