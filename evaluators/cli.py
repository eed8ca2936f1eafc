"""`bench eval`: score a run's global model (--run) or a base model (--model) and write the results record.

bench/app/cli.py wires the subcommand: `add_arguments(subparser)` then `main(args)` (returns the exit code).
Everything is checked (tasks, data root, backend, model, run folder, code-execution consent) before any model
is loaded; a refusal is one line `error: ...` and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from bench import BenchError
from bench.config import DTYPES

DEFAULT_TASKS = "mmlu,gsm8k,commonsense"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", metavar="RUN_DIR", help="score <run dir>/global_model (or its adapters, --adapter) and "
                     "write the eval section into the run's results record (<run dir>/run.json names it)")
    src.add_argument("--model", metavar="MODEL", help="score a base model (HF folder | hub id | .gguf | default) "
                     "and write a kind=reference record to --results-dir")
    src.add_argument("--base-url", metavar="URL", help="score the model an OpenAI-compatible server serves (bench "
                     "serve prints the URL, e.g. http://127.0.0.1:8000/v1); writes a kind=reference record")
    parser.add_argument("--served-model", metavar="NAME", default=None,
                        help="--base-url: the served model to score (default: the only one served)")
    parser.add_argument("--tokenizer", metavar="MODEL", default=None,
                        help="--base-url: a local tokenizer (HF folder | default) for a server without /tokenize")
    parser.add_argument("--adapter", metavar="global|clients|PATH", default=None,
                        help="score LoRA adapters without merging: with --run, global (<run>/global_adapter on the "
                             "base model, into the record's eval section) or clients (each client adapter of the "
                             "last round, into the record's eval_clients section); with --model, a PEFT folder")
    from .backends import BACKENDS
    from .tasknames import KNOWN_TASKS, MMLU_PARTS_HELP, TASK_GROUPS

    groups = "; ".join(f"{g} = {', '.join(m)}" for g, m in TASK_GROUPS.items())
    parser.add_argument("--tasks", default=DEFAULT_TASKS,
                        help=f"comma-separated tasks or groups: {', '.join(KNOWN_TASKS)}; {groups}; MMLU in parts as "
                             f"lm-eval names them: {MMLU_PARTS_HELP}; mmlu_flora = FLoRA's 1444-question MMLU subset, "
                             "0-shot; humaneval_instruct = HumanEval through the model's chat template (lm-eval's "
                             "humaneval_instruct), and humaneval_sampled / humaneval_instruct_sampled = pass@1 and "
                             f"pass@10 from 10 samples at temperature 0.8 (default {DEFAULT_TASKS})")
    parser.add_argument("--backend", choices=list(BACKENDS), default=None,
                        help="vllm when a CUDA GPU and vllm are present, else hf; openai with --base-url")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="score a seeded random subset of N documents per task (recorded)")
    parser.add_argument("--num-fewshot", type=int, default=None, metavar="K",
                        help="few-shot examples (default: mmlu 5 as FLoRA, gsm8k 5, others 0)")
    parser.add_argument("--batch-size", default="auto", help="'auto' or an integer (hf on CPU: auto = 8)")
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="weights' dtype for scoring (auto: float32 on CPU, bfloat16 on GPU; bfloat16 on a CPU "
                             "with AVX512-BF16/AMX is ~2.5x faster with hf, see docs/evaluation.md)")
    parser.add_argument("--data-root", default=None,
                        help="offline benchmark data (default: env BENCH_DATA_ROOT)")
    parser.add_argument("--allow-code-execution", action="store_true",
                        help="allow humaneval to run model-written code (in evaluators.sandbox)")
    parser.add_argument("--humaneval-form", choices=["auto", "completion", "instruct"], default="auto",
                        help="humaneval / humaneval_10 as lm-eval's completion task or its instruct form (chat template, "
                             "\"```python\" prefix); auto: instruct when the model has a chat template (default auto)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --limit subsets (default 0)")
    parser.add_argument("--results-dir", default="results", help="where --model writes its record (default results/)")
    parser.add_argument("--output-dir", default=None,
                        help="--model: folder for per-sample outputs (default runs/<run_id>; they go to its eval/)")


def _batch_size(value):
    if value in (None, "auto"):
        return "auto"
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise BenchError(f"batch-size: {value!r} is neither 'auto' nor an integer") from None
    if n < 1:
        raise BenchError(f"batch-size: {n} must be >= 1")
    return n


def _record_path(run_dir: Path) -> Path:
    run_json = run_dir / "run.json"
    if not run_json.is_file():
        raise BenchError(f"run: {run_json} does not exist; pass a run folder written by `bench run`")
    try:
        rec = json.loads(run_json.read_text())["record"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise BenchError(f"run: {run_json} has no \"record\" entry; pass a run folder written by `bench run`") from None
    p = Path(rec)
    for cand in (p, run_dir / p, run_dir.parent.parent / p):
        if cand.is_file():
            return cand
    raise BenchError(f"run: the results record {rec} named by {run_json} does not exist")


def _device() -> str:
    try:
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text.rstrip("/").split("/")[-1]).strip("-")[:60] or "model"


def summary_table(section: dict, title: str = "") -> str:
    """One table of an eval section: task, metric, value ± stderr, n (a missing task says why); the last thing
    `bench eval` and `bench run` print, after lm-eval's progress output."""
    rows = [(name + (f" ({t['variant']})" if t.get("variant") and t["variant"] != name else ""), t["metric"],
             f"{t['value']:.4f}" + (f" ± {t['stderr']:.4f}" if isinstance(t.get("stderr"), (int, float)) else ""),
             str(t["n"])) for name, t in section["tasks"].items()]
    head = ("task", "metric", "value ± stderr", "n")
    w = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    line = lambda r: f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:<{w[2]}}  {r[3]:>{w[3]}}"  # noqa: E731
    tp = section["throughput"]
    out = [f"{title}backend {section['backend']} ({section['dtype']}), lm-eval {section['lm_eval_version']}, "
           f"{tp['samples_per_s']} documents/s, {tp['tokens_per_s']} tokens/s", line(head),
           "  ".join("-" * x for x in w), *map(line, rows)]
    out += [f"{name:<{w[0]}}  MISSING: {why}" for name, why in section["missing"].items()]
    return "\n".join(out)


def main(args: argparse.Namespace) -> int:
    try:
        return _main(args)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    from . import core

    data_root = args.data_root if args.data_root is not None else core.default_data_root()
    tasks = core.validate_tasks(args.tasks, data_root)
    core.check_code_consent(tasks, args.allow_code_execution)
    if args.limit is not None and args.limit < 1:
        raise BenchError(f"limit: {args.limit} must be >= 1")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise BenchError(f"num-fewshot: {args.num_fewshot} must be >= 0")
    batch_size = _batch_size(args.batch_size)
    from .backends import get_backend

    backend = args.backend or ("openai" if args.base_url else core.default_backend())
    impl = get_backend(backend)
    if impl.needs_base_url != bool(args.base_url):
        raise BenchError(f"backend: --backend {backend} and --base-url go together (it scores a server)"
                         if impl.needs_base_url else
                         f"backend: --base-url goes with --backend openai, not {backend} (that scores a server)")
    if not args.base_url and (args.served_model or args.tokenizer):
        raise BenchError("served-model: --served-model and --tokenizer go with --base-url")
    impl.available()  # BenchError with the install hint when the backend cannot run here
    common = dict(backend=backend, limit=args.limit, num_fewshot=args.num_fewshot, batch_size=batch_size,
                  data_root=data_root, seed=args.seed, allow_code_execution=args.allow_code_execution,
                  dtype=args.dtype, humaneval_form=args.humaneval_form)

    if args.run:
        return _eval_run(args, tasks, common)

    from bench.models import resolve_model, weights_hash

    if args.base_url:
        if args.adapter:
            raise BenchError("adapter: a server scores what it serves; serve the adapter (bench serve --lora "
                             "NAME=PATH) and pass --served-model NAME")
        from .openai_lm import check_server

        tokenizer = resolve_model(args.tokenizer)[0] if args.tokenizer else None
        server = check_server(args.base_url, args.served_model,
                              need_logprobs=not all(core.task_spec(t).generate for t in tasks))
        model_path, model_id, model_hash = server["model"], server["model"], None
        common.update(base_url=server["base_url"], tokenizer=tokenizer)
    else:
        model_path, model_id = resolve_model(args.model)
        model_hash = weights_hash(model_path)
        if args.adapter:
            impl.check_adapter(args.adapter, "adapter")
            model_hash += "+lora:" + weights_hash(args.adapter)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    run_id = f"base-{_slug(model_id)}-s{args.seed}-{stamp}"
    out_root = Path(args.output_dir) if args.output_dir else Path("runs") / run_id
    results_dir = Path(args.results_dir)
    from bench.record import load_avg

    load_start = load_avg()
    t0 = time.monotonic()
    section = core.evaluate(model_path, tasks, adapter=args.adapter, out_dir=str(out_root / "eval"), **common)
    eval_s = round(time.monotonic() - t0, 2)
    config = {"model": args.model or args.base_url, "tasks": tasks, "backend": section["backend"], "limit": args.limit,
              "num_fewshot": args.num_fewshot, "batch_size": batch_size, "dtype": section["dtype"],
              "data_root": data_root,
              "seed": args.seed, "allow_code_execution": bool(args.allow_code_execution)}
    if any(core.task_spec(t).instruct_variant for t in tasks):
        config["humaneval_form"] = args.humaneval_form
    if args.adapter:
        config["adapter"] = args.adapter
    if args.base_url:
        config["served_model"] = model_id
    from bench.record import build_record, config_hash, provenance, reference_setting

    record = build_record(
        kind="reference", run_id=run_id, method="base", setting=reference_setting(model_id), seed=args.seed,
        config=config, config_hash=config_hash(config, leave_out=("seed", "data_root")),
        provenance=provenance(model_id=model_id, model_path=model_path, model_hash=model_hash, device=_device(),
                              load_start=load_start,
                              data={t["source"]["path"]: t["source"]["md5"] for t in section["tasks"].values()
                                    if "path" in t["source"]}, data_origin=None),
        dtypes={"training": None, "master": None, "export": None, "eval": section["dtype"]},
        timings={"total_s": eval_s, "eval_s": eval_s}, run_dir=str(out_root), eval=section)
    from bench.io import atomic_write_json

    path = results_dir / f"{run_id}.json"
    atomic_write_json(path, record)
    print(f"wrote {path}")
    print(summary_table(section))
    return 0


def _eval_run(args: argparse.Namespace, tasks: list[str], common: dict) -> int:
    """--run: the global model (merged, or --adapter global: base + global adapter) into the record's eval section;
    --adapter clients: every client adapter of the last round into its eval_clients section."""
    from bench.io import atomic_write_json, read_record
    from bench.provenance import CODE
    from bench.record import updated

    from . import core
    from bench.export import run_base_model

    from .serve import client_adapters, global_adapter

    run_dir = Path(args.run)
    if not run_dir.is_dir():
        raise BenchError(f"run: {run_dir} is not a folder; pass a run folder written by `bench run`")
    if args.adapter not in (None, "global", "clients"):
        raise BenchError(f"adapter: with --run pass global or clients, not {args.adapter!r} (a folder goes with --model)")
    if args.adapter is None:
        from bench.export import global_model_dir

        model_dir = global_model_dir(run_dir)
    record_path = _record_path(run_dir)
    record = read_record(record_path)  # refuses a newer schema before any work
    if args.adapter == "clients":
        rnd, loras = client_adapters(run_dir, None)
        t0 = time.monotonic()
        sections = core.evaluate_adapters(run_base_model(run_dir), tasks, loras,
                                          out_dir=str(run_dir / "eval" / f"clients_round_{rnd}"), **common)
        record = updated(read_record(record_path),  # re-read: keep anything written meanwhile
                         eval_clients={"round": rnd, "eval_s": round(time.monotonic() - t0, 2), "clients": sections})
        atomic_write_json(record_path, record)
        print(f"wrote the eval_clients section (round {rnd}, {len(sections)} clients) into {record_path}")
        for name, section in sections.items():
            print(summary_table(section, title=f"{name}: "))
        return 0
    t0 = time.monotonic()
    if args.adapter == "global":
        section = core.evaluate(run_base_model(run_dir), tasks, adapter=global_adapter(run_dir),
                                out_dir=str(run_dir / "eval"), **common)
    else:
        section = core.evaluate(str(model_dir), tasks, out_dir=str(run_dir / "eval"), **common)
    eval_s = round(time.monotonic() - t0, 2)
    # the scoring code's commit, which may be later than the training's (the record's provenance); each task keeps
    # the commit it was scored at, since a later --run adds tasks to the section
    section["code"] = {k: CODE[k] for k in ("git_commit", "git_dirty")}
    for entry in section["tasks"].values():
        entry["code"] = section["code"]
    record = read_record(record_path)  # re-read: keep anything written meanwhile
    section, kept, note = merged_eval(record.get("eval"), section)
    if note:
        print(note)
    timings = record.get("timings") or {}
    record = updated(record, eval=section, timings={**timings, "eval_s": round(eval_s + (timings.get("eval_s") or 0)
                                                                                if kept else eval_s, 2)})
    atomic_write_json(record_path, record)
    print(f"wrote the eval section into {record_path}")
    print(summary_table(section))
    return 0


def merged_eval(old: dict | None, new: dict) -> tuple[dict, list[str], str | None]:
    """A run's eval section after scoring more tasks: the tasks already scored by the same model (merged model or
    global adapter), backend and dtype are kept beside the new ones (a task scored again is replaced); a section
    scored another way is replaced whole, since one section holds one backend and dtype (the report pools rows by
    them). Returns (section, kept task names, a one-line note or None)."""
    if not old or not old.get("tasks"):
        return new, [], None
    way = lambda s: (s.get("backend"), s.get("dtype"), (s.get("adapter") or {}).get("path"))
    if way(old) != way(new):
        b, d, a = way(old)
        return new, [], (f"note: replaced the record's eval section ({', '.join(old['tasks'])}: backend {b}, dtype {d}"
                         f"{', adapter ' + a if a else ''}); score with the same backend and dtype to add tasks to it")
    kept = [k for k in old["tasks"] if k not in new["tasks"]]
    tasks = {**{k: old["tasks"][k] for k in kept}, **new["tasks"]}
    missing = {k: v for k, v in {**(old.get("missing") or {}), **(new.get("missing") or {})}.items() if k not in tasks}
    note = f"kept the tasks already scored the same way: {', '.join(kept)}" if kept else None
    return {**new, "tasks": tasks, "missing": missing}, kept, note


if __name__ == "__main__":  # python -m evaluators.cli ...: the same as `bench eval ...`
    p = argparse.ArgumentParser(prog="bench eval")
    add_arguments(p)
    sys.exit(main(p.parse_args()))
