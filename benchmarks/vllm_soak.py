"""Consecutive real vLLM evaluations through the .venv-vllm worker, each judged the way `bench eval` judges it:
the worker's exit (code or signal), whether its result verified, whether any process it started outlived it.

The abort this guards against (SIGABRT at interpreter teardown, about 1 run in 46 before the worker stopped the
engine explicitly and left with os._exit) only shows over many runs, hence a soak:

    python -m benchmarks.vllm_soak --runs 50      # -> benchmarks/results/vllm_soak/<UTC stamp>.json and .md

Each run scores arc_easy (prompt log-probabilities) and mmlu_anatomy (the cached next-token path) on a few documents
of the default model with a fresh engine, as the start and end of every real evaluation do.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from bench.provenance import CODE

RESULTS = Path(__file__).parent / "results" / "vllm_soak"
TASKS = ["arc_easy", "mmlu_anatomy"]


def soak(runs: int, limit: int, data_root: str) -> dict:
    from bench import BenchError
    from bench.models import resolve_model
    from evaluators import evaluate

    model = resolve_model("default")[0]
    rows = []
    for i in range(1, runs + 1):
        load0, t0 = os.getloadavg()[0], time.monotonic()
        with tempfile.TemporaryDirectory(prefix="fedlora-soak-") as out:
            try:
                section = evaluate(model, TASKS, backend="vllm", limit=limit, data_root=data_root, out_dir=out)
                row = {"run": i, "verified": True, "worker_exit": section.get("worker_exit", 0),
                       "orphans": section.get("worker_orphans", 0),
                       "scores": {t: section["tasks"][t]["value"] for t in TASKS}}
            except BenchError as exc:
                row = {"run": i, "verified": False, "error": str(exc)}
        row.update(seconds=round(time.monotonic() - t0, 1), load_start=round(load0, 2),
                   load_end=round(os.getloadavg()[0], 2))
        rows.append(row)
        print(json.dumps(row), flush=True)
    clean = [r for r in rows if r["verified"] and r["worker_exit"] == 0 and r["orphans"] == 0]
    return {"runs": rows, "clean": len(clean), "total": len(rows), "tasks": TASKS, "limit": limit,
            "git_commit": CODE.get("git_commit"), "git_dirty": CODE.get("git_dirty"),
            "when": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def write(record: dict, folder: Path = RESULTS) -> Path:
    from bench.io import atomic_write_json, atomic_write_text

    stamp = record["when"].replace("-", "").replace(":", "")
    path = folder / f"{stamp}.json"
    atomic_write_json(path, record)
    rows = record["runs"]
    secs = sorted(r["seconds"] for r in rows)
    loads = [x for r in rows for x in (r["load_start"], r["load_end"])]
    lines = [f"# vLLM worker soak, {record['when']} (commit {record['git_commit']}, dirty: {record['git_dirty']})", "",
             f"`python -m benchmarks.vllm_soak --runs {record['total']}`: {record['total']} consecutive evaluations "
             f"({', '.join(record['tasks'])}, {record['limit']} documents each, a fresh engine per run).", "",
             f"- clean (result verified, exit code 0, no process left): **{record['clean']} / {record['total']}**",
             f"- worker exits other than 0: {sum(1 for r in rows if r.get('worker_exit'))}; runs with processes "
             f"left behind: {sum(1 for r in rows if r.get('orphans'))}; unverified results: "
             f"{sum(1 for r in rows if not r['verified'])}",
             f"- seconds per run: median {secs[len(secs) // 2]}, min {secs[0]}, max {secs[-1]}; load average (1 min) "
             f"{min(loads):.1f}-{max(loads):.1f}", ""]
    atomic_write_text(path.with_suffix(".md"), "\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.vllm_soak")
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--limit", type=int, default=3, help="documents per task per run (default 3)")
    p.add_argument("--data-root", default=os.environ.get("BENCH_DATA_ROOT"))
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if not args.data_root or not Path(args.data_root).is_dir():
        print("error: data-root: pass --data-root <shared/data> or set BENCH_DATA_ROOT", file=sys.stderr)
        return 2
    if args.runs < 1:
        print("error: runs: pass --runs N with N >= 1", file=sys.stderr)
        return 2
    record = soak(args.runs, args.limit, str(Path(args.data_root).resolve()))
    print(f"{record['clean']}/{record['total']} clean; wrote {write(record, args.results)}")
    return 0 if record["clean"] == record["total"] else 1


if __name__ == "__main__":
    sys.exit(main())
