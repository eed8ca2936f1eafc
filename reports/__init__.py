"""reports: the leaderboard, the paired comparison against a baseline, and the ablation plots, regenerated from
results records.

Reads `results/*.json` (schema_version 2, see ARCHITECTURE.md) and never runs a model. Every output file is
written atomically (bench.io) and deterministically: the same records give byte-identical files.

    from reports import build_report
    summary = build_report(["results/"], "results/", plots=True, baseline="fedit")
"""
from __future__ import annotations

from pathlib import Path

from bench import BenchError
from bench.io import atomic_write_text

from .leaderboard import (build_rows, dumps_summary_row, leaderboard_frames, render_csv, render_html,
                          render_markdown, report_metrics, sort_rows, task_metrics)
from .paired import GATE, PAIRED, analyse, gate_html, gate_markdown, of_family, paired_frame, paired_html, paired_markdown
from .records import load_records
from .stats import N_BOOT
from .trivial import GENERATION_BASELINES, baseline_records

OUTPUT_FILES = ("LEADERBOARD.md", "leaderboard.csv", "leaderboard.html", "paired.csv")
DEFAULT_BASELINE = "fedit"
DEFAULT_METRIC = "test_loss"


def build_report(results_dirs: list[str], out_dir: str, plots: bool = False, baseline: str | None = None,
                 metric: str | None = None, data_root: str | None = None) -> dict:
    """Build LEADERBOARD.md, leaderboard.csv, leaderboard.html, paired.csv (and with `plots`, <out>/plots/*.png|svg).

    baseline: the method every other is compared with (default fedit; a default with no rows gives no paired
    table, a named one with no rows is refused). metric: the main metric (default: the capability metric the records
    carry, see _main_metric; test_loss where they carry none): it leads the tables, orders the rows and heads the
    paired table. Trivial-baseline rows (reports.trivial) join the records' rows under each setting; data_root
    is where they read the documents of lean (committed) per-sample files (reports.samples). Where a setting
    has a centralized row, the gate (reports.paired.GATE) leads: centralized against the base model and every trivial
    baseline on the main metric, its own Holm family; paired.csv holds both families (column "family").
    Returns a summary: {"rows", "records", "table": [row digests], "comparisons": int, "gate": int, "baseline", "metric",
    "skipped": [{"file", "reason"}], "notes": [str], "files": [paths written], "plots_skipped": [{"plot", "reason"}],
    "plots_removed": [paths]}. Invalid, partial or old-schema records are skipped and listed, never raised. A missing
    results folder, or a --baseline / --metric that names nothing in the records, raises bench.BenchError.
    """
    if isinstance(results_dirs, (str, Path)):
        results_dirs = [str(results_dirs)]
    records, skipped = load_records([str(d) for d in results_dirs])
    notes: list[str] = []
    tasks = task_metrics(records, notes)
    rows = build_rows(records + baseline_records(records, tasks, notes, data_root), notes)
    metrics = report_metrics(rows, tasks, notes)
    main = _main_metric(metric, metrics, tasks)
    methods = sorted({r.method for r in rows})
    why_none = None
    if baseline is not None and baseline not in methods:
        raise BenchError(f"baseline: no rows for method {baseline!r} in {', '.join(map(str, results_dirs))}; "
                         f"methods with rows: {', '.join(methods) or 'none'}; pass one of them to --baseline")
    if baseline is None:
        baseline = DEFAULT_BASELINE
        if baseline not in methods:
            why_none = (f"No paired comparison: no rows for the default baseline {baseline!r}; pass --baseline "
                        f"with one of: {', '.join(methods) or 'none'}.")
            baseline = None
    every = analyse(rows, metrics, baseline, notes, gate_metric=main.name if main else None)
    comparisons, gates = of_family(every, PAIRED), of_family(every, GATE)
    if baseline and not comparisons:
        why_none = f"No paired comparison: no other row shares a setting with a {baseline!r} row."
    rows = sort_rows(rows, main)
    frame, board = leaderboard_frames(rows, metrics, main)
    notes = list(dict.fromkeys(notes))   # one line per distinct note, in the order they arose
    out = Path(out_dir)
    files = []
    for name, text in (
            ("LEADERBOARD.md", render_markdown(board, gate_markdown(gates, metrics, main)
                                               + paired_markdown(comparisons, metrics, main, baseline, why_none)
                                               if main else [], len(records), skipped, notes, N_BOOT)),
            ("leaderboard.csv", render_csv(frame)),
            ("leaderboard.html", render_html(board, gate_html(gates, metrics, main)
                                             + paired_html(comparisons, metrics, main, baseline, why_none)
                                             if main else "", len(records), skipped, notes, N_BOOT)),
            ("paired.csv", render_csv(paired_frame(every, metrics)))):
        atomic_write_text(out / name, text)
        files.append(str(out / name))
    summary = {"rows": len(rows), "records": len(records), "table": [dumps_summary_row(r) for r in rows],
               "comparisons": len(comparisons), "gate": len(gates), "baseline": baseline, "metric": main.name if main else None,
               "skipped": [s.as_dict() for s in skipped], "notes": notes, "files": files,
               "plots_skipped": [], "plots_removed": []}
    if plots:
        from .plots import make_plots  # matplotlib only when asked

        p = make_plots(rows, comparisons, metrics, main, out)
        summary["files"] += p["files"]
        summary["plots_skipped"] = p["skipped"]
        summary["plots_removed"] = p["removed"]
    return summary


def _main_metric(name: str | None, metrics: dict, tasks: dict):
    """--metric, else the capability metric the records carry: a generation task with trivial baselines (ROUGE-L of
    the held-out instructions; the first by name), else the task average over several tasks, else the one task;
    only records without task scores lead with the held-out loss."""
    if name is not None:
        if name not in metrics:
            raise BenchError(f"metric: no record has {name!r}; metrics in these records: "
                             f"{', '.join(metrics) or 'none'}; pass one of them to --metric")
        return metrics[name]
    generation = sorted(t for t in tasks if t in GENERATION_BASELINES)
    for candidate in (*generation[:1], "avg" if len(tasks) > 1 else next(iter(tasks), None), DEFAULT_METRIC):
        if candidate in metrics:
            return metrics[candidate]
    return next(iter(metrics.values()), None)


__all__ = ["build_report", "OUTPUT_FILES", "DEFAULT_BASELINE", "DEFAULT_METRIC"]
