"""`bench eval`: score a run's global model (--run) or a base model (--model) and write the results record.

bench/cli.py wires the subcommand: `add_arguments(subparser)` then `main(args)` (returns the exit code).
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
    src.add_argument("--run", metavar="RUN_DIR", help="score <run dir>/global_model and write the eval section "
                     "into the run's results record (<run dir>/run.json names it)")
    src.add_argument("--model", metavar="MODEL", help="score a base model (HF folder | hub id | .gguf | default) "
                     "and write a kind=reference record to --results-dir")
    parser.add_argument("--tasks", default=DEFAULT_TASKS,
                        help="comma-separated: mmlu, gsm8k, humaneval, commonsense (= boolq, piqa, siqa, hellaswag, "
                             f"winogrande, arc_easy, arc_challenge, openbookqa) or any of those; MMLU in parts as lm-eval names "
                             f"them: mmlu_stem, mmlu_humanities, mmlu_social_sciences, mmlu_other, mmlu_<subject> "
                             f"(default {DEFAULT_TASKS})")
    parser.add_argument("--backend", choices=["vllm", "hf"], default=None,
                        help="vllm when a CUDA GPU and vllm are present, else hf")
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


def _summary(section: dict) -> str:
    lines = [f"backend {section['backend']}, lm-eval {section['lm_eval_version']}, "
             f"{section['throughput']['samples_per_s']} samples/s, {section['throughput']['tokens_per_s']} tokens/s"]
    for name, t in section["tasks"].items():
        se = f" ± {t['stderr']:.4f}" if isinstance(t.get("stderr"), (int, float)) else ""
        lines.append(f"  {name:<14} {t['metric']:<26} {t['value']:.4f}{se}  n={t['n']}  {t['num_fewshot']}-shot")
    for name, why in section["missing"].items():
        lines.append(f"  {name:<14} MISSING: {why}")
    return "\n".join(lines)


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
    if "humaneval" in tasks and not args.allow_code_execution:
        raise BenchError("tasks: humaneval runs model-written code; pass --allow-code-execution to run it in "
                         "evaluators.sandbox, or drop humaneval from --tasks")
    if args.limit is not None and args.limit < 1:
        raise BenchError(f"limit: {args.limit} must be >= 1")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise BenchError(f"num-fewshot: {args.num_fewshot} must be >= 0")
    batch_size = _batch_size(args.batch_size)
    backend = args.backend or core.default_backend()
    if backend == "vllm":
        core.vllm_mode()  # BenchError with the install hint when vLLM is nowhere

    if args.run:
        run_dir = Path(args.run)
        if not run_dir.is_dir():
            raise BenchError(f"run: {run_dir} is not a folder; pass a run folder written by `bench run`")
        model_dir = run_dir / "global_model"
        if not (model_dir / "config.json").is_file():
            raise BenchError(f"run: {model_dir} is not an HF model folder (no config.json); did the run finish?")
        record_path = _record_path(run_dir)
        from bench.io import read_record

        record = read_record(record_path)  # refuses a newer schema before any work
        t0 = time.monotonic()
        section = core.evaluate(str(model_dir), tasks, backend=backend, limit=args.limit,
                                num_fewshot=args.num_fewshot, batch_size=batch_size, data_root=data_root,
                                out_dir=str(run_dir / "eval"), seed=args.seed,
                                allow_code_execution=args.allow_code_execution, dtype=args.dtype)
        eval_s = round(time.monotonic() - t0, 2)
        record = read_record(record_path)  # re-read: keep anything written meanwhile
        record["eval"] = section
        record.setdefault("timings", {})["eval_s"] = eval_s
        from bench.io import atomic_write_json

        atomic_write_json(record_path, record)
        print(_summary(section))
        print(f"wrote the eval section into {record_path}")
        return 0

    from bench.models import resolve_model

    model_path, model_id = resolve_model(args.model)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    run_id = f"base-{_slug(model_id)}-s{args.seed}-{stamp}"
    out_root = Path(args.output_dir) if args.output_dir else Path("runs") / run_id
    results_dir = Path(args.results_dir)
    from bench.record import load_avg

    load_start = load_avg()
    t0 = time.monotonic()
    section = core.evaluate(model_path, tasks, backend=backend, limit=args.limit, num_fewshot=args.num_fewshot,
                            batch_size=batch_size, data_root=data_root, out_dir=str(out_root / "eval"),
                            seed=args.seed, allow_code_execution=args.allow_code_execution, dtype=args.dtype)
    eval_s = round(time.monotonic() - t0, 2)
    config = {"model": args.model, "tasks": tasks, "backend": section["backend"], "limit": args.limit,
              "num_fewshot": args.num_fewshot, "batch_size": batch_size, "dtype": section["dtype"],
              "data_root": data_root,
              "seed": args.seed, "allow_code_execution": bool(args.allow_code_execution)}
    from bench.record import build_record, config_hash, provenance, reference_setting

    record = build_record(
        kind="reference", run_id=run_id, method="base", setting=reference_setting(model_id), seed=args.seed,
        config=config, config_hash=config_hash(config, leave_out=("seed", "data_root")),
        provenance=provenance(model_id=model_id, model_path=model_path, device=_device(), load_start=load_start,
                              data={t["source"]["path"]: t["source"]["md5"] for t in section["tasks"].values()
                                    if "path" in t["source"]}, data_origin=None),
        dtypes={"training": None, "master": None, "export": None, "eval": section["dtype"]},
        timings={"total_s": eval_s, "eval_s": eval_s}, run_dir=str(out_root), eval=section)
    from bench.io import atomic_write_json

    path = results_dir / f"{run_id}.json"
    atomic_write_json(path, record)
    print(_summary(section))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":  # python -m evaluators.cli ...: the same as `bench eval ...`
    p = argparse.ArgumentParser(prog="bench eval")
    add_arguments(p)
    sys.exit(main(p.parse_args()))
