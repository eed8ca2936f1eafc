"""The leaderboard: one row per method × setting × scoring dtypes, aggregated over seeds, rendered as
LEADERBOARD.md (GitHub), leaderboard.csv and a static, sortable leaderboard.html, each with the paired
comparison against the baseline (reports.paired) at the top.

Deterministic: rows and columns are sorted stably, the bootstrap is seeded, and no timestamp or absolute path goes
into any file.
"""
from __future__ import annotations

import html
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .metrics import AVG, HEADLINE, Metric, average_metric, averaged_tasks, record_parts, task_metric, task_samples
from .records import DTYPE_FIELDS, SETTING_ORDER, Record, Skipped, group_key
from .stats import Estimate, Series
from .trivial import KIND as BASELINE_KIND

SETTING_LABELS = {"model": "Model", "dataset": "Dataset", "partition": "Partition", "ranks": "Ranks",
                  "rank_distribution": "Rank dist.", "num_clients": "Clients", "rounds": "Rounds",
                  "client_fraction": "Client frac.", "preset": "Preset", "export_dtype": "Export dtype",
                  "eval_dtype": "Eval dtype"}


@dataclass
class Row:
    kind: str
    method: str
    setting: dict
    dtypes: dict
    records: list[Record]
    reference: bool
    lr: float | None = None        # the learning rate its records trained at (None: base model, scored-only)
    lr_tuning: dict | None = None  # how that lr was chosen (bench ablate --tuned-lr)
    show_lr: bool = False          # its method has rows at several lrs here (a tuning grid): the label says which
    est: dict[str, Estimate] = field(default_factory=dict)    # metric name -> estimate (reports.paired fills it)
    basis: dict[str, str] = field(default_factory=dict)       # metric name -> what its CI resamples
    bytes_up: float | None = None
    bytes_down: float | None = None
    wall_s: float | None = None
    _series: dict = field(default_factory=dict, repr=False)

    @property
    def n(self) -> int:
        return len(self.records)

    @property
    def seeds(self) -> list:
        return [r.seed for r in self.records]

    @property
    def key(self) -> tuple:
        return group_key(self.records[0])

    @property
    def seed_free(self) -> bool:
        """Its score cannot depend on the training seed (records.Record.seed_free)."""
        return all(r.seed_free for r in self.records)

    @property
    def id(self) -> str:
        return json.dumps(self.key)

    @property
    def fields(self) -> dict:
        """The setting and the scoring dtypes: what the tables show beside the method."""
        return {**self.setting, **{f"{k}_dtype": v for k, v in self.dtypes.items()}}

    def series(self, metric: str, tasks: list[str], notes: list[str]) -> Series:
        """seed -> the record's parts for `metric`; records without that data are left out."""
        if metric not in self._series:
            out = {}
            for i, r in enumerate(self.records):
                parts = record_parts(r, metric, tasks, notes)
                if parts:
                    out[r.seed if isinstance(r.seed, int) else -1 - i] = parts
            self._series[metric] = out
        return self._series[metric]


# ---------------------------------------------------------------------------------------------- building

def build_rows(records: list[Record], notes: list[str]) -> list[Row]:
    """Group records into rows (no statistics yet: reports.paired.analyse computes them, per context)."""
    groups: dict[tuple, list[Record]] = {}
    for r in records:
        groups.setdefault(group_key(r), []).append(r)
    rows = []
    for recs in groups.values():
        recs = sorted(recs, key=lambda r: (r.seed if isinstance(r.seed, int) else -1, r.run_id))
        first = recs[0]
        row = Row(first.kind, first.method, dict(first.setting), first.dtypes, recs, first.is_reference,
                  lr=first.lr, lr_tuning=first.lr_tuning)
        comms = [r.data.get("communication") for r in recs]
        if all(isinstance(c, dict) and c.get("bytes_up") is not None for c in comms):
            row.bytes_up = float(np.mean([c["bytes_up"] for c in comms]))
            row.bytes_down = float(np.mean([c["bytes_down"] for c in comms]))
        walls = [(r.data.get("timings") or {}).get("total_s") for r in recs]
        if all(isinstance(w, (int, float)) for w in walls):
            row.wall_s = float(np.mean(walls))
        hashes = {r.data.get("config_hash") for r in recs if r.data.get("config_hash")}
        if len(hashes) > 1:
            notes.append(f"{row.method} {setting_text(row.fields)}: its {len(recs)} records have "
                         f"{len(hashes)} different config_hash values (same setting, different configs)")
        rows.append(row)
    lrs: dict[tuple, set] = {}
    for row in rows:
        lrs.setdefault((row.kind, row.method), set()).add(row.lr)
    for row in rows:
        row.show_lr = len(lrs[(row.kind, row.method)]) > 1 and row.lr is not None
    budget = budget_note(rows)
    if budget:
        notes.append(budget)
    tuned = sorted({(r.method, r.lr, json.dumps(r.lr_tuning, sort_keys=True)) for r in rows if r.lr_tuning})
    for method, lr, info in tuned:
        notes.append(f"{method}: lr {lr:g}, {tuning_text(json.loads(info))}")
    return rows


def training_budget(record: Record) -> int | None:
    """Examples × steps the record trained on: Σ over its rounds and clients of steps × batch size (None where the
    round log has no step counts; 0 for an untrained row)."""
    batch = (record.data.get("config") or {}).get("batch_size")
    clients = [c for rd in record.data.get("rounds") or [] for c in rd.get("clients") or []]
    if not isinstance(batch, int) or any(not isinstance(c.get("steps"), int) for c in clients):
        return None
    return sum(c["steps"] for c in clients) * batch


def budget_note(rows: list[Row]) -> str | None:
    """One line stating each trained method's budgets from its records, and whether they are matched (docs/study.md:
    centralized trains on the pooled data for the federation's total client steps)."""
    per_row = {}
    for row in rows:
        budgets = {training_budget(r) for r in row.records}
        if budgets == {0} or None in budgets:
            continue
        per_row.setdefault(row.method, set()).update(budgets)
    if len(per_row) < 2:
        return None
    all_budgets = set().union(*per_row.values())
    text = ", ".join(f"{name} {'/'.join(f'{b:,}' for b in sorted(bs))}" for name, bs in per_row.items())
    verdict = "matched: every trained row saw the same examples × steps" if len(all_budgets) == 1 else \
        "NOT matched: the rows trained on different examples × steps"
    return f"training budget (examples × steps: Σ of the round logs' client steps × batch size, per record): {text}; {verdict}"


def tuning_text(t: dict) -> str:
    """How a tuned lr was chosen, in one clause."""
    scores = ", ".join(f"{lr}: {v:.4g}" for lr, v in t.get("scores", {}).items())
    borrowed = f"{t['borrowed_from']}'s tuned lr, " if t.get("borrowed_from") else ""
    return (f"{borrowed}chosen on {t.get('task')} ({t.get('metric')}, highest of {scores}; "
            f"{len(t.get('records', []))} tuning records in {t.get('source')})")


def task_metrics(records: list[Record], notes: list[str]) -> dict[str, Metric]:
    """task name → its Metric: the most common metric name (a conflict is noted) and the chance level from the
    per-sample files (mean over records that list choices)."""
    seen: dict[str, Counter] = {}
    chances: dict[str, list[float]] = {}
    for r in records:
        for t, entry in r.tasks.items():
            seen.setdefault(t, Counter())[str(entry.get("metric") or "")] += 1
            c = entry.get("chance")
            if c is None:
                s = task_samples(r, t, notes)
                c = s.chance if s is not None else None
            if isinstance(c, (int, float)):
                chances.setdefault(t, []).append(float(c))
    out = {}
    for t in sorted(seen):
        (metric, _), *rest = sorted(seen[t].items(), key=lambda kv: (-kv[1], kv[0]))
        if rest:
            notes.append(f"task {t!r} is scored with different metrics across records "
                         f"({', '.join(sorted(seen[t]))}); the column is labelled {metric!r}")
        out[t] = task_metric(t, metric, float(np.mean(chances[t])) if t in chances else None)
    return out


def report_metrics(rows: list[Row], tasks: dict[str, Metric], notes: list[str]) -> dict[str, Metric]:
    """Every metric some row has, in display order: the held-out losses, the task average (over two tasks or more:
    over one it would repeat that task's column), each task."""
    task_list = sorted(tasks)
    out = {}
    for name, m in HEADLINE.items():
        if any(r.series(name, task_list, notes) for r in rows):
            out[name] = m
    pooled = averaged_tasks(tasks)
    if len(pooled) > 1:
        out[AVG.name] = average_metric(pooled, tasks[pooled[0]].measure)
    out.update({t: tasks[t] for t in task_list})
    return out


def sort_rows(rows: list[Row], main: Metric | None) -> list[Row]:
    """By setting (natural order), reference rows first within a setting, then the main metric (best first)."""
    cols = field_columns([r.fields for r in rows])

    def key(row: Row):
        base = tuple(val_key(row.fields.get(k)) for k in cols)
        e = row.est.get(main.name) if main else None
        score = math.inf if e is None else (e.mean if main.lower_is_better else -e.mean)
        return (base, 0 if row.reference else 1, score, row.method)
    return sorted(rows, key=key)


# ---------------------------------------------------------------------------------------------- formatting

def fmt_value(v) -> str:
    """A setting value as the tables show it: ranks "16,8,4,4", a partition "dirichlet(alpha=0.5)" or "iid"."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list):
        return ",".join(fmt_value(x) for x in v)
    if isinstance(v, dict):
        rest = {k: x for k, x in v.items() if k != "kind"}
        inner = ", ".join(f"{k}={fmt_value(x)}" for k, x in sorted(rest.items()))
        return f"{v.get('kind')}({inner})" if inner else str(v.get("kind"))
    return str(v)


def val_key(v):
    """Natural order of setting values: None first, numbers by value, lists element-wise, partitions by kind
    then parameters."""
    if v is None:
        return (0,)
    if isinstance(v, (bool, int, float)):
        return (1, float(v))
    if isinstance(v, list):
        return (2, tuple(val_key(x) for x in v))
    if isinstance(v, dict):
        return (3, str(v.get("kind")), tuple((k, val_key(x)) for k, x in sorted(v.items()) if k != "kind"))
    return (4, str(v))


def field_columns(fields: list[dict]) -> list[str]:
    keys = set().union(*fields) if fields else set()
    dtypes = [f"{k}_dtype" for k in DTYPE_FIELDS]
    return ([k for k in SETTING_ORDER if k in keys] + sorted(keys - set(SETTING_ORDER) - set(dtypes))
            + [k for k in dtypes if k in keys])


def setting_text(fields: dict, keys=None) -> str:
    keys = field_columns([fields]) if keys is None else keys
    return ", ".join(f"{SETTING_LABELS.get(k, k).lower().rstrip('.')}: {fmt_value(fields.get(k))}"
                     for k in keys if fields.get(k) is not None)


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return ""
    v = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(v) < 1024 or unit == "TiB":
            break
        v /= 1024
    if unit == "B":
        return f"{int(round(v))} B"
    digits = 0 if abs(v) >= 100 else 1 if abs(v) >= 10 else 2
    return f"{v:.{digits}f} {unit}"


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return ""
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def decimals(ests: list[Estimate | None]) -> int:
    """Decimals for a column: enough to show two significant digits of its narrowest CI half-width (3 to 6)."""
    hws = [e.half_width for e in ests if e is not None and e.half_width]
    if not hws:
        return 3
    return int(min(6, max(3, 1 - math.floor(math.log10(min(hws))))))


def fmt_est(e: Estimate | None, digits: int = 3, n_row: int | None = None) -> str:
    if e is None:
        return ""
    s = f"{e.mean:.{digits}f}"
    if e.half_width is not None:
        s += f" ± {e.half_width:.{digits}f}"
    if n_row is not None and e.n != n_row:
        s += f" (n={e.n})"
    return s


def method_label(row: Row) -> str:
    if row.kind == BASELINE_KIND:
        return f"{row.method} (baseline)"
    name = f"{row.method} @ lr {row.lr:g}" if row.show_lr else row.method
    return f"{name} (reference)" if row.reference else name


def _num(x) -> float | None:
    return None if x is None else float(x)


def shared_fields(rows: list[Row], cols: list[str]) -> dict:
    """Fields with one value across the federated rows (reference rows: that value or unset); the MD/HTML tables
    state them once above the table instead of repeating a constant column."""
    runs = [r for r in rows if r.kind == "run"] or rows
    if len(rows) < 2:
        return {}
    out = {}
    for k in cols:
        vals = {json.dumps(r.fields.get(k), sort_keys=True) for r in runs}
        if len(vals) != 1 or runs[0].fields.get(k) is None:
            continue
        v = runs[0].fields.get(k)
        if all(r.fields.get(k) in (None, v) for r in rows):
            out[k] = v
    return out


# ---------------------------------------------------------------------------------------------- tables

@dataclass
class Table:
    """One rendered table: display cells, their sort values (HTML), which rows are references, column kinds."""

    columns: list[str]
    cells: list[list[str]]
    sort_values: list[list]
    reference: list[bool]
    numeric: list[bool]
    shared: dict


def leaderboard_frames(rows: list[Row], metrics: dict[str, Metric], main: Metric | None = None
                       ) -> tuple[pd.DataFrame, Table]:
    """(numeric frame for leaderboard.csv, the display table for MD/HTML). Columns: the main metric first, then the
    held-out losses, then the tasks and their average."""
    cols = field_columns([r.fields for r in rows])
    shared = shared_fields(rows, cols)
    shown = [k for k in cols if k not in shared and any(r.fields.get(k) is not None for r in rows)]
    tasks = [m for m in metrics.values() if m.name not in HEADLINE and m.name != AVG.name]
    display_metrics = [metrics[k] for k in HEADLINE if k in metrics] + tasks + ([metrics[AVG.name]] if AVG.name in metrics else [])
    if main is not None and main in display_metrics:
        display_metrics = [main] + [m for m in display_metrics if m is not main]
    digits = {m.name: decimals([r.est.get(m.name) for r in rows]) for m in display_metrics}
    show_lr = any(r.lr is not None for r in rows)   # the rows that train: their lr beside their scores
    num_rows, cells, sort_values = [], [], []
    for r in rows:
        num = {"kind": r.kind, "reference": r.reference, "method": r.method}
        num.update({k: fmt_value(r.fields.get(k)) if r.fields.get(k) is not None else None for k in cols})
        num["lr"] = r.lr
        num["lr_tuned"] = bool(r.lr_tuning)
        num["n_seeds"] = r.n
        num["seeds"] = ";".join(str(s) for s in r.seeds if s is not None)
        lr_cell = [] if not show_lr else [""] if r.lr is None else [f"{r.lr:g}" + (" (tuned)" if r.lr_tuning else "")]
        line = [method_label(r)] + [fmt_value(r.fields.get(k)) for k in shown] + lr_cell + [str(r.n)]
        sv = [method_label(r)] + [fmt_value(r.fields.get(k)) for k in shown] + ([r.lr] if show_lr else []) + [r.n]
        for m in display_metrics:
            e = r.est.get(m.name)
            num[m.name] = _num(e.mean) if e else None
            num[f"{m.name}_ci_low"] = _num(e.lo) if e else None
            num[f"{m.name}_ci_high"] = _num(e.hi) if e else None
            num[f"{m.name}_n"] = e.n if e else None
            num[f"{m.name}_ci_basis"] = r.basis.get(m.name, "") if e else ""
            line.append(fmt_est(e, digits[m.name], r.n))
            sv.append(e.mean if e else None)
        total = None if r.bytes_up is None else r.bytes_up + r.bytes_down
        num.update({"bytes_up": r.bytes_up, "bytes_down": r.bytes_down, "bytes_total": total, "wall_s": r.wall_s})
        line += [fmt_bytes(total), fmt_seconds(r.wall_s)]
        sv += [total, r.wall_s]
        num_rows.append(num)
        cells.append(line)
        sort_values.append(sv)
    for m in tasks:
        if m.chance is not None:
            for num in num_rows:
                num[f"{m.name}_chance"] = m.chance
    columns = (["Method"] + [SETTING_LABELS.get(k, k) for k in shown] + (["LR"] if show_lr else []) + ["n"]
               + [m.label for m in display_metrics] + ["Comm. (up+down)", "Wall time"])
    numeric = [False] * (1 + len(shown)) + [True] * (int(show_lr) + 1 + len(display_metrics) + 2)
    num_cols = (["kind", "reference", "method", *cols, "lr", "lr_tuned", "n_seeds", "seeds"]
                + [c for m in display_metrics for c in [m.name, f"{m.name}_ci_low", f"{m.name}_ci_high", f"{m.name}_n",
                                                        f"{m.name}_ci_basis"]
                   + ([f"{m.name}_chance"] if m in tasks and m.chance is not None else [])]
                + ["bytes_up", "bytes_down", "bytes_total", "wall_s"])
    frame = pd.DataFrame(num_rows, columns=num_cols)
    return frame, Table(columns, cells, sort_values, [r.reference for r in rows], numeric, shared)


def render_csv(frame: pd.DataFrame) -> str:
    return frame.to_csv(index=False, lineterminator="\n", float_format="%.6g")


# ---------------------------------------------------------------------------------------------- documents

NOTE = ("Each cell: mean over seeds ± half-width of the 95% bootstrap CI (2.5th–97.5th percentile, {boot} "
        "seeded replicates, resampling seeds and, within each seed, examples: held-out examples for the losses, "
        "documents for the tasks; ci_basis in the CSV). n = seeds; a cell with fewer seeds says so. Test loss: the "
        "global model's mean token loss on the pooled held-out split; Client loss (global): the global model on "
        "each client's own held-out split, mean over clients; Client loss (own model): each client's own model on "
        "its own split (a method without personal state serves the global model, so it equals the global one). "
        "Avg = mean over the task columns scored with the measure most tasks share, named in its header (a ROUGE-L column is not averaged with accuracies; blank where a row lacks one of them; shown with two tasks or more); a task's chance level is the mean "
        "of 1/(number of choices) over its documents. Comm. = bytes uploaded + downloaded over the run, mean over "
        "seeds. Wall time = timings.total_s, mean over seeds. Reference rows: the base model without federated "
        "training, centralized training, local-only training. Baseline rows are computed from the scored documents, "
        "not from a model: copying the instruction or the prompt, an empty answer (generation tasks), the most "
        "frequent gold label among the documents and a uniform guess (multiple choice); they pair with the model "
        "rows by document. Rows scored in different dtypes are never pooled. See docs/reports.md.")


EMPTY = ("No records yet: no complete results record (*.json) directly in this folder. Rows appear as runs "
         "complete (bench run, bench ablate, bench eval --model write them here); records in subfolders are reports "
         "of their own (bench report --results <subfolder>).")


def _md_cell(s: str) -> str:
    return s.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def counts_line(rows: int, records: int, skipped: int) -> str:
    return f"{_plural(rows, 'row')} from {_plural(records, 'record')}; {skipped} skipped."


def shared_line(table: Table) -> str:
    note = " (reference rows set only some of these)" if any(table.reference) else ""
    return f"Same for every row{note}: {setting_text(table.shared, list(table.shared))}."


def md_table(table: Table) -> list[str]:
    lines = []
    if table.shared:
        lines += [_md_cell(shared_line(table)), ""]
    lines.append("| " + " | ".join(_md_cell(c) for c in table.columns) + " |")
    lines.append("|" + "|".join("---:" if n else ":---" for n in table.numeric) + "|")
    for cells in table.cells:
        lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    return lines


def render_markdown(board: Table, paired: list[str], n_records: int, skipped: list[Skipped], notes: list[str],
                    n_boot: int) -> str:
    lines = ["# fedlora-bench leaderboard", "", counts_line(len(board.cells), n_records, len(skipped)), ""]
    lines += paired
    lines += ["## Leaderboard", ""]
    lines += md_table(board) if board.cells else [f"_{EMPTY}_"]
    lines += ["", NOTE.format(boot=n_boot)]
    if skipped:
        lines += ["", "## Skipped records", ""]
        lines += [f"- `{Path(s.file).name}`: {_md_cell(s.reason)}" for s in skipped]
    if notes:
        lines += ["", "## Notes", ""]
        lines += [f"- {_md_cell(n)}" for n in notes]
    return "\n".join(lines) + "\n"


_HTML_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>fedlora-bench leaderboard</title>
<style>
body {{ font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5rem; color: #1b1f23; }}
h1 {{ font-size: 1.5rem; }}
h2 {{ font-size: 1.2rem; margin-top: 2rem; }}
table {{ border-collapse: collapse; font-size: 0.9rem; }}
th, td {{ border: 1px solid #d0d7de; padding: 0.35rem 0.6rem; white-space: nowrap; }}
th {{ background: #f6f8fa; cursor: pointer; user-select: none; position: sticky; top: 0; }}
th:hover {{ background: #eaeef2; }}
th.asc::after {{ content: " \\25B2"; }}
th.desc::after {{ content: " \\25BC"; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
tr.reference td {{ background: #fff8c5; font-style: italic; }}
tbody tr:nth-child(even):not(.reference) td {{ background: #fafbfc; }}
td.sig {{ font-weight: 600; }}
p.note, li {{ max-width: 70rem; font-size: 0.85rem; color: #57606a; }}
</style>
</head>
<body>
<h1>fedlora-bench leaderboard</h1>
<p>{summary} Click a column header to sort.</p>
{paired}
<h2>Leaderboard</h2>
{shared}
{table}
<p class="note">{note}</p>
{extra}
<script>
(function () {{
  function key(cell) {{
    var v = cell.getAttribute("data-sort");
    if (v === null || v === "") return null;
    var f = parseFloat(v);
    return (cell.classList.contains("num") && !isNaN(f)) ? f : v.toLowerCase();
  }}
  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), function (table) {{
    var heads = table.tHead.rows[0].cells;
    Array.prototype.forEach.call(heads, function (th, col) {{
      th.addEventListener("click", function () {{
        var dir = th.classList.contains("asc") ? -1 : 1;
        Array.prototype.forEach.call(heads, function (h) {{ h.classList.remove("asc", "desc"); }});
        th.classList.add(dir === 1 ? "asc" : "desc");
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.forEach(function (r, i) {{ r._i = i; }});
        rows.sort(function (a, b) {{
          var x = key(a.cells[col]), y = key(b.cells[col]);
          if (x === null && y === null) return a._i - b._i;
          if (x === null) return 1;
          if (y === null) return -1;
          if (x < y) return -dir;
          if (x > y) return dir;
          return a._i - b._i;
        }});
        rows.forEach(function (r) {{ body.appendChild(r); }});
      }});
    }});
  }});
}})();
</script>
</body>
</html>
"""


def _sort_attr(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ""
    return str(v)


def html_table(table: Table, table_id: str, strong: list[list[bool]] | None = None) -> str:
    """A sortable table (the inline script sorts every table.sortable by the clicked column's data-sort)."""
    e = html.escape
    head = "".join(f'<th scope="col">{e(c)}</th>' for c in table.columns)
    body = []
    for i, cells in enumerate(table.cells):
        tds = []
        for j, c in enumerate(cells):
            cls = " ".join(x for x in ("num" if table.numeric[j] else "", "sig" if strong and strong[i][j] else "") if x)
            cls = f' class="{cls}"' if cls else ""
            tds.append(f'<td{cls} data-sort="{e(_sort_attr(table.sort_values[i][j]))}">{e(c)}</td>')
        body.append(f'<tr class="{"reference" if table.reference[i] else "run"}">' + "".join(tds) + "</tr>")
    return (f'<table id="{table_id}" class="sortable">\n<thead><tr>{head}</tr></thead>\n<tbody>\n'
            + "\n".join(body) + "\n</tbody>\n</table>")


def render_html(board: Table, paired_html: str, n_records: int, skipped: list[Skipped], notes: list[str],
                n_boot: int) -> str:
    e = html.escape
    extra = ""
    if skipped:
        extra += "<h2>Skipped records</h2>\n<ul>\n" + "".join(
            f"<li><code>{e(Path(s.file).name)}</code>: {e(s.reason)}</li>\n" for s in skipped) + "</ul>\n"
    if notes:
        extra += "<h2>Notes</h2>\n<ul>\n" + "".join(f"<li>{e(n)}</li>\n" for n in notes) + "</ul>\n"
    return _HTML_TEMPLATE.format(
        summary=e(counts_line(len(board.cells), n_records, len(skipped))), paired=paired_html,
        shared=f"<p>{e(shared_line(board))}</p>" if board.shared else "",
        table=html_table(board, "leaderboard") if board.cells else f"<p><em>{e(EMPTY)}</em></p>",
        note=e(NOTE.format(boot=n_boot)), extra=extra)


def dumps_summary_row(row: Row) -> dict:
    """A JSON-friendly digest of a row for build_report's summary."""
    return {"kind": row.kind, "reference": row.reference, "method": row.method, "setting": row.setting,
            "dtypes": row.dtypes, "n_seeds": row.n, **{m: e.mean for m, e in sorted(row.est.items())}}


__all__ = ["Row", "Table", "build_rows", "task_metrics", "report_metrics", "sort_rows", "leaderboard_frames",
           "render_markdown", "render_csv", "render_html", "fmt_bytes", "fmt_seconds", "fmt_value"]
