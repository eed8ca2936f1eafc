"""reports: leaderboard tables and heterogeneity-ablation plots regenerated from results records.

Reads `results/*.json` (schema_version 1, see ARCHITECTURE.md) and never runs a model. Every output file is
written atomically (bench.io) and deterministically: the same records give byte-identical files.

    from reports import build_report
    summary = build_report(["results/"], "results/", plots=True)
"""
from __future__ import annotations

from pathlib import Path

from bench.io import atomic_write_text

from .leaderboard import build_rows, dumps_summary_row, frames, render_csv, render_html, render_markdown, task_metrics
from .records import load_records
from .stats import N_BOOT

OUTPUT_FILES = ("LEADERBOARD.md", "leaderboard.csv", "leaderboard.html")


def build_report(results_dirs: list[str], out_dir: str, plots: bool = False) -> dict:
    """Build LEADERBOARD.md, leaderboard.csv, leaderboard.html (and with `plots`, <out>/plots/*.png|svg).

    Returns a summary: {"rows": int, "records": int, "table": [row digests], "skipped": [{"file", "reason"}],
    "notes": [str], "files": [paths written], "plots_skipped": [{"plot", "reason"}], "plots_removed": [paths]}.
    Invalid, partial or newer-schema records are skipped and listed, never raised. A missing results folder
    raises bench.BenchError.
    """
    if isinstance(results_dirs, (str, Path)):
        results_dirs = [str(results_dirs)]
    records, skipped = load_records([str(d) for d in results_dirs])
    notes: list[str] = []
    metrics = task_metrics(records, notes)
    rows = build_rows(records, notes)
    num, disp, kinds = frames(rows, metrics)
    out = Path(out_dir)
    files = []
    for name, text in (("LEADERBOARD.md", render_markdown(disp, kinds, len(records), skipped, notes, N_BOOT)),
                       ("leaderboard.csv", render_csv(num)),
                       ("leaderboard.html", render_html(disp, kinds, len(records), skipped, notes, N_BOOT))):
        atomic_write_text(out / name, text)
        files.append(str(out / name))
    summary = {"rows": len(rows), "records": len(records), "table": [dumps_summary_row(r) for r in rows],
               "skipped": [s.as_dict() for s in skipped], "notes": notes, "files": files,
               "plots_skipped": [], "plots_removed": []}
    if plots:
        from .plots import make_plots  # matplotlib only when asked

        p = make_plots(rows, out)
        summary["files"] += p["files"]
        summary["plots_skipped"] = p["skipped"]
        summary["plots_removed"] = p["removed"]
    return summary


__all__ = ["build_report", "OUTPUT_FILES"]
