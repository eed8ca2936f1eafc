"""How much of a generation task's ROUGE-L lift is answer length? A check on the study's headline metric.

ROUGE-L (F1) rewards a generation whose length is near the reference's: the base model answers Dolly's held-out
instructions at a median of ~85 words against the references' 30, and fine-tuning shortens its answers. This
check adds the strongest length-only baseline we can name, the base model's own generations cut to the
references' median length in words (chosen on the test documents: a baseline favoured by knowing them), and
compares every row with it per seed, on the same documents. It also splits ROUGE-L by Dolly category.

    python -m benchmarks.length_check --results results/v2 --out benchmarks/results/length_check/v2.md

Reads the records in --results and their per-sample files (committed beside them, lean: <results>/samples/<run_id>/),
and the references and categories from the data root (--data-root, default $BENCH_DATA_ROOT).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np


def _text(r) -> str:
    while not isinstance(r, str):   # lm-eval nests a response as [[text]] or {"filter": [text]}
        r = next(iter(r.values())) if isinstance(r, dict) else r[0]
    return r


def _samples(results: Path, task: str) -> dict[tuple[str, int], dict]:
    """(method, seed) -> {doc key: line} for every record of `results` with per-sample files of `task`."""
    from reports.records import Record
    from reports.metrics import resolve_samples
    from reports.stats import sample_lines

    out = {}
    for path in sorted(results.glob("*.json")):
        data = json.loads(path.read_text())
        entry = ((data.get("eval") or {}).get("tasks") or {}).get(task)
        if not entry:
            continue
        f = resolve_samples(Record(path, data), entry.get("samples"))
        lines = sample_lines(f) if f else None
        if lines:
            out[data["method"], int(data.get("seed") or 0)] = dict(lines)
    return out


def _interval(d: list[float]) -> str:
    """The mean of the per-seed differences and its 95% t-interval (the report's own seed-level test)."""
    from reports.stats import SeedTest

    test = SeedTest(tuple(float(x) for x in d))
    ci = test.interval(0.05)
    return f"{test.mean:+.4f} (1 seed)" if ci is None else f"{test.mean:+.4f} [{ci[0]:+.4f}, {ci[1]:+.4f}]"


def main(argv=None) -> int:
    from evaluators.tasks.loaders import rouge_l

    ap = argparse.ArgumentParser(prog="python -m benchmarks.length_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default="results/v2", help="a folder of records with their per-sample files")
    ap.add_argument("--task", default="dolly_heldout", help="a generation task scored by ROUGE-L")
    ap.add_argument("--out", help="also write the markdown here")
    ap.add_argument("--data-root", default=os.environ.get("BENCH_DATA_ROOT") or None,
                    help="offline data folder (default: $BENCH_DATA_ROOT): the documents' references and categories")
    args = ap.parse_args(argv)
    runs = _samples(Path(args.results), args.task)
    base = next((v for (m, _), v in runs.items() if m == "base"), None)
    if base is None:
        print(f"results: no base record with {args.task} samples in {args.results}; score the base model first",
              file=sys.stderr)
        return 2
    from bench import BenchError
    from reports.samples import document
    from reports.trivial import task_documents

    keys = sorted(base)
    try:
        documents = task_documents(args.task, args.data_root, {})
        docs = {k: document(base[k], documents) for k in keys}
    except (BenchError, OSError) as exc:
        print(f"data-root: {exc}", file=sys.stderr)
        return 2
    if any(d is None for d in docs.values()):
        print(f"data-root: the per-sample files of {args.task} are lean (no documents); pass --data-root or set "
              "BENCH_DATA_ROOT", file=sys.stderr)
        return 2
    refs = {k: docs[k]["response"] for k in keys}
    cut = int(statistics.median(len(r.split()) for r in refs.values()))
    base_cut = {k: rouge_l(" ".join(_text(base[k]["resps"]).split()[:cut]), refs[k]) for k in keys}
    score = lambda line: float(line["metrics"]["none"]["rougeL"])  # noqa: E731
    category = {k: docs[k].get("category", "?") for k in keys}
    cats = sorted(set(category.values()))
    by_method = defaultdict(dict)
    for (m, s), lines in runs.items():
        by_method[m][s] = lines
    lines = [f"# Length check: {args.task} in {args.results}", "",
             f"{len(keys)} documents; references' median length {cut} words (mean "
             f"{np.mean([len(r.split()) for r in refs.values()]):.1f}). Baseline `base cut to {cut} words`: the base "
             f"model's generation truncated to the references' median length, ROUGE-L **{np.mean(list(base_cut.values())):.4f}** "
             f"(the base model uncut: {np.mean([score(base[k]) for k in keys]):.4f}). Δ = row − that baseline per seed on "
             "the same documents, 95% t-interval over the seeds (one comparison per row, not corrected).", "",
             "| row | seeds | generated words, median (mean) | ROUGE-L | Δ vs base cut [95% CI over seeds] |",
             "|---|---:|---:|---:|---:|"]
    for m in sorted(by_method, key=lambda m: (m != "base", m)):
        seeds = sorted(by_method[m])
        words = [len(_text(by_method[m][s][k]["resps"]).split()) for s in seeds for k in keys if k in by_method[m][s]]
        per_seed = [np.mean([score(by_method[m][s][k]) for k in keys if k in by_method[m][s]]) for s in seeds]
        diffs = [np.mean([score(by_method[m][s][k]) - base_cut[k] for k in keys if k in by_method[m][s]]) for s in seeds]
        lines.append(f"| {m} | {len(seeds)} | {statistics.median(words):.0f} ({np.mean(words):.1f}) | "
                     f"{np.mean(per_seed):.4f} | {_interval(diffs)} |")
    lines += ["", "ROUGE-L by Dolly category (documents in brackets), mean over seeds:", "",
              "| row | " + " | ".join(f"{c} ({sum(1 for k in keys if category[k] == c)})" for c in cats) + " |",
              "|---|" + "---:|" * len(cats)]
    rows = [("base cut", {0: {k: {"metrics": {"none": {"rougeL": base_cut[k]}}} for k in keys}})]
    rows += [(m, by_method[m]) for m in sorted(by_method, key=lambda m: (m != "base", m))]
    for m, seeds in rows:
        cells = []
        for c in cats:
            mine = [k for k in keys if category[k] == c]
            cells.append(f"{np.mean([np.mean([score(v[k]) for k in mine if k in v]) for v in seeds.values()]):.3f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
