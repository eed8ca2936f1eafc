"""`bench report`: regenerate the leaderboard, the paired comparison against a baseline (and with --plots the
ablation plots) from results records.

Wiring (bench/app/cli.py): `from reports import cli as report_cli`; `report_cli.add_arguments(subparser)`;
dispatch `report_cli.main(args)`.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from bench import BenchError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", action="append", metavar="DIR", default=None,
                        help="folder of results records (*.json); repeat to merge several (default: results/)")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="where LEADERBOARD.md, leaderboard.csv, leaderboard.html and plots/ go "
                             "(default: the first --results folder)")
    parser.add_argument("--plots", action="store_true",
                        help="also draw the heterogeneity-ablation plots (PNG + SVG) into <out>/plots/")
    parser.add_argument("--baseline", metavar="METHOD", default=None,
                        help="the method every other is compared with, paired by seed and example (default: fedit; "
                             "a trivial baseline such as copy-prompt or majority-label works too)")
    parser.add_argument("--metric", metavar="NAME", default=None,
                        help="the main metric: test_loss, client_loss, personal_loss, avg or a task name (default: "
                             "the capability metric the records carry: dolly_heldout's ROUGE-L, else the task "
                             "average, else test_loss); it leads the tables, orders the rows and heads the paired table")
    parser.add_argument("--publish-samples", action="store_true",
                        help="first write each record's per-sample files, without the documents, prompts and "
                             "references, to <results>/samples/<run_id>/ (what a clone reports from; the data stay "
                             "in the data root)")
    parser.add_argument("--data-root", metavar="DIR", default=os.environ.get("BENCH_DATA_ROOT") or None,
                        help="offline data folder (default: $BENCH_DATA_ROOT): the documents that committed, lean "
                             "per-sample files are scored against, for the trivial-baseline rows")


def main(args: argparse.Namespace) -> int:
    from . import build_report

    results = args.results or ["results/"]
    out = args.out or results[0]
    try:
        refuse_to_empty(results, out)
        if args.publish_samples:
            from .samples import publish

            for d in results:
                for path, what in publish(Path(d)):
                    print(f"samples: {what} {path}" + (" (no per-sample file here: its run folder is on another "
                                                        "machine)" if what == "missing" else ""))
        summary = build_report(results, out, plots=args.plots, baseline=args.baseline, metric=args.metric,
                               data_root=args.data_root)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"report: {summary['rows']} rows from {summary['records']} records; "
          f"{summary['comparisons']} paired comparisons against {summary['baseline'] or 'no baseline'}")
    for s in summary["skipped"]:
        print(f"skipped {s['file']}: {s['reason']}", file=sys.stderr)
    for n in summary["notes"]:
        print(f"note: {n}", file=sys.stderr)
    for p in summary["plots_skipped"]:
        print(f"plot {p['plot']} not drawn: {p['reason']}", file=sys.stderr)
    for f in summary["files"]:
        print(f"wrote {f}")
    return 0


def refuse_to_empty(results: list[str], out: str) -> None:
    """A report of folders that hold no record directly would replace a leaderboard with rows by an empty one: the
    committed study's leaderboard is made from a subfolder (`bench report --results results/v2 --out results/`),
    and a plain `bench report` in a fresh clone would wipe it. Refused with the subfolders that do hold records."""
    if any(any(Path(d).glob("*.json")) for d in results if Path(d).is_dir()):
        return
    board = Path(out) / "LEADERBOARD.md"
    text = board.read_text(errors="replace") if board.is_file() else ""
    if not re.search(r"^[1-9][0-9,]* rows? from ", text, flags=re.M):
        return
    counts: dict[str, int] = {}
    for d in results:
        for q in sorted(Path(d).glob("*/*.json")):
            counts[str(q.parent)] = counts.get(str(q.parent), 0) + 1
    where = ", ".join(f"{s} ({n} record{'' if n == 1 else 's'})" for s, n in counts.items()) or "none"
    raise BenchError(f"results: {', '.join(results)} holds no record directly, and {board} has rows that an empty "
                     f"report would replace; subfolders with records: {where}; pass --results <one of them> "
                     f"(and --out {out} to rewrite {board}), or another --out")


def _standalone(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench report", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(_standalone())
