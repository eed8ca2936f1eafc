"""The leaderboard: one row per method × setting, aggregated over seeds (pandas), rendered as
LEADERBOARD.md (GitHub), leaderboard.csv and a static, sortable leaderboard.html.

Deterministic: rows and columns are sorted stably, the bootstrap is seeded from each row's key, and no
timestamp or absolute path goes into any file.
"""
from __future__ import annotations

import html
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .records import SETTING_ORDER, Record, Skipped, setting_key
from .stats import Estimate, SeedValue, bootstrap_tasks, bootstrap_values, load_sample_values

SETTING_LABELS = {"model": "Model", "dataset": "Dataset", "partition": "Partition", "ranks": "Ranks",
                  "rank_distribution": "Rank dist.", "num_clients": "Clients", "rounds": "Rounds",
                  "client_fraction": "Client frac.", "preset": "Preset"}
AVG = "avg"


@dataclass
class Row:
    kind: str
    method: str
    setting: dict
    records: list[Record]
    tasks: dict[str, Estimate] = field(default_factory=dict)
    avg: Estimate | None = None
    test_loss: Estimate | None = None
    bytes_up: float | None = None
    bytes_down: float | None = None
    wall_s: float | None = None
    ci_basis: str = ""

    @property
    def n(self) -> int:
        return len(self.records)

    @property
    def seeds(self) -> list:
        return [r.seed for r in self.records]

    @property
    def key(self) -> tuple:
        return (self.kind, self.method, setting_key(self.setting))


# ---------------------------------------------------------------------------------------------- building

def _resolve_samples(rec: Record, ref) -> Path | None:
    if not isinstance(ref, str) or not ref:
        return None
    p = Path(ref)
    if p.is_absolute() and p.is_file():
        return p
    if not p.is_absolute():
        for base in (Path.cwd(), rec.path.parent, rec.path.parent.parent):
            cand = base / p
            if cand.is_file():
                return cand
    # committed results carry their per-sample files beside them (the run dirs stay on the machine
    # that made them): <results>/samples/<run_id>/<file>
    cand = rec.path.parent / "samples" / str(rec.data.get("run_id", "")) / p.name
    return cand if cand.is_file() else None


def _seed_value(rec: Record, task: str, notes: list[str]) -> tuple[SeedValue, str]:
    t = rec.tasks[task]
    path = _resolve_samples(rec, t.get("samples"))
    if path is not None:
        vals = load_sample_values(path, t.get("metric"))
        if vals is not None and vals.size > 1:
            return SeedValue(float(t["value"]), t.get("stderr"), vals), "samples"
        notes.append(f"{rec.path.name}: per-sample file for task {task!r} has no usable "
                     f"{t.get('metric') or 'value'!r} values; used the stored value and stderr")
    if t.get("stderr"):
        return SeedValue(float(t["value"]), float(t["stderr"])), "stderr"
    return SeedValue(float(t["value"])), ""


def task_metrics(records: list[Record], notes: list[str]) -> dict[str, str]:
    """task name → its metric (the most common one; a conflict is noted)."""
    seen: dict[str, Counter] = {}
    for r in records:
        for t, entry in r.tasks.items():
            seen.setdefault(t, Counter())[str(entry.get("metric") or "")] += 1
    out = {}
    for t in sorted(seen):
        (metric, _), *rest = sorted(seen[t].items(), key=lambda kv: (-kv[1], kv[0]))
        if rest:
            notes.append(f"task {t!r} is scored with different metrics across records "
                         f"({', '.join(sorted(seen[t]))}); the column is labelled {metric!r}")
        out[t] = metric
    return out


def build_rows(records: list[Record], notes: list[str]) -> list[Row]:
    groups: dict[tuple, list[Record]] = {}
    for r in records:
        groups.setdefault((r.kind, r.method, setting_key(r.setting)), []).append(r)
    rows = []
    for (kind, method, _), recs in groups.items():
        recs = sorted(recs, key=lambda r: (r.seed if isinstance(r.seed, int) else -1, r.run_id))
        row = Row(kind, method, dict(recs[0].setting), recs)
        per_task: dict[str, list[SeedValue]] = {}
        seed_index: dict[str, list[int]] = {}
        bases: set[str] = set()
        for i, r in enumerate(recs):
            for t in sorted(r.tasks):
                sv, basis = _seed_value(r, t, notes)
                per_task.setdefault(t, []).append(sv)
                seed_index.setdefault(t, []).append(i)
                if basis:
                    bases.add(basis)
        if len(recs) > 1:
            bases.add("seeds")
        row.ci_basis = "+".join(b for b in ("seeds", "samples", "stderr") if b in bases)
        row.tasks, row.avg = bootstrap_tasks(list(row.key), per_task, len(recs), seed_index)
        losses = [r.data["test_loss"] for r in recs if r.data.get("test_loss") is not None]
        if losses:
            row.test_loss = bootstrap_values(["test_loss", *row.key], losses)
        comms = [r.data.get("communication") for r in recs]
        if all(isinstance(c, dict) and c.get("bytes_up") is not None for c in comms):
            row.bytes_up = float(np.mean([c["bytes_up"] for c in comms]))
            row.bytes_down = float(np.mean([c["bytes_down"] for c in comms]))
        walls = [(r.data.get("timings") or {}).get("total_s") for r in recs]
        if all(isinstance(w, (int, float)) for w in walls):
            row.wall_s = float(np.mean(walls))
        hashes = {r.data.get("config_hash") for r in recs if r.data.get("config_hash")}
        if len(hashes) > 1:
            notes.append(f"{method} {_setting_str(row.setting)}: its {len(recs)} records have "
                         f"{len(hashes)} different config_hash values (same setting, different configs)")
        rows.append(row)
    # the average is comparable only over the same task set: blank it where a row lacks a leaderboard task
    all_tasks = sorted({t for row in rows for t in row.tasks})
    for row in rows:
        if row.avg is not None and set(row.tasks) != set(all_tasks):
            row.avg = None
    rows.sort(key=_row_sort_key)
    return rows


def _setting_str(setting: dict) -> str:
    return ", ".join(f"{k}={setting[k]}" for k in setting_columns([setting]))


def _val_key(v):
    if v is None:
        return (0, 0.0, "")
    if isinstance(v, bool):
        return (1, float(v), "")
    if isinstance(v, (int, float)):
        return (1, float(v), "")
    # natural order: numbers inside strings compare as numbers (alpha=0.5 < alpha=10, [4,2] < [16,8])
    parts = re.split(r"(\d+(?:\.\d+)?)", str(v))
    return (2, 0.0, tuple(float(p) if i % 2 else p for i, p in enumerate(parts)))


def setting_columns(settings: list[dict]) -> list[str]:
    keys = set().union(*settings) if settings else set()
    return [k for k in SETTING_ORDER if k in keys] + sorted(keys - set(SETTING_ORDER))


def _row_sort_key(row: Row):
    cols = setting_columns([row.setting])
    base = tuple(_val_key(row.setting.get(k)) for k in SETTING_ORDER)
    extra = tuple((k, _val_key(row.setting.get(k))) for k in cols if k not in SETTING_ORDER)
    avg = -row.avg.mean if row.avg is not None else math.inf
    return (base, extra, 0 if row.kind == "reference" else 1, avg, row.method)


# ---------------------------------------------------------------------------------------------- formatting

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


def fmt_est(e: Estimate | None, n_row: int | None = None) -> str:
    if e is None:
        return ""
    s = f"{e.mean:.3f}"
    if e.half_width is not None:
        s += f" ± {e.half_width:.3f}"
    if n_row is not None and e.n != n_row:
        s += f" (n={e.n})"
    return s


def method_label(row: Row) -> str:
    return f"{row.method} (reference)" if row.kind == "reference" else row.method


def _num(x) -> float | None:
    return None if x is None else float(x)


def frames(rows: list[Row], metrics: dict[str, str]) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """(numeric frame for the CSV, display frame for MD/HTML, display column kinds)."""
    scols = setting_columns([r.setting for r in rows])
    shared = shared_setting(rows, scols)
    dcols = [k for k in scols if k not in shared]   # shown in the MD/HTML table; the CSV keeps every column
    tasks = sorted(metrics)
    num_records, disp_records = [], []
    for r in rows:
        num = {"kind": r.kind, "method": r.method}
        disp = {"Method": method_label(r)}
        for k in scols:
            v = r.setting.get(k)
            num[k] = v
            if k in dcols:
                disp[SETTING_LABELS.get(k, k)] = "" if v is None else str(v)
        num["n_seeds"] = r.n
        num["seeds"] = ";".join(str(s) for s in r.seeds if s is not None)
        disp["n"] = str(r.n)
        for t in tasks:
            e = r.tasks.get(t)
            num[t] = _num(e.mean) if e else None
            num[f"{t}_ci_low"] = _num(e.lo) if e else None
            num[f"{t}_ci_high"] = _num(e.hi) if e else None
            num[f"{t}_n"] = e.n if e else None
            disp[_task_header(t, metrics[t])] = fmt_est(e, r.n)
        for name, e, label in ((AVG, r.avg, "Avg"), ("test_loss", r.test_loss, "Test loss")):
            num[name] = _num(e.mean) if e else None
            num[f"{name}_ci_low"] = _num(e.lo) if e else None
            num[f"{name}_ci_high"] = _num(e.hi) if e else None
            disp[label] = fmt_est(e, r.n)
        total = None if r.bytes_up is None else r.bytes_up + r.bytes_down
        num["bytes_up"], num["bytes_down"], num["bytes_total"] = r.bytes_up, r.bytes_down, total
        disp["Comm. (up+down)"] = fmt_bytes(total)
        num["wall_s"] = r.wall_s
        disp["Wall time"] = fmt_seconds(r.wall_s)
        num["ci_basis"] = r.ci_basis
        num_records.append(num)
        disp_records.append(disp)
    num_cols = (["kind", "method", *scols, "n_seeds", "seeds"]
                + [c for t in tasks for c in (t, f"{t}_ci_low", f"{t}_ci_high", f"{t}_n")]
                + [c for m in (AVG, "test_loss") for c in (m, f"{m}_ci_low", f"{m}_ci_high")]
                + ["bytes_up", "bytes_down", "bytes_total", "wall_s", "ci_basis"])
    disp_cols = (["Method", *[SETTING_LABELS.get(k, k) for k in dcols], "n"]
                 + [_task_header(t, metrics[t]) for t in tasks]
                 + ["Avg", "Test loss", "Comm. (up+down)", "Wall time"])
    kinds = (["text"] * (1 + len(dcols)) + ["num"] + ["num"] * (len(tasks) + 4))
    num_df = pd.DataFrame(num_records, columns=num_cols)
    if not tasks:   # no eval at all (e.g. --no-eval runs): no Avg column in the MD/HTML tables
        i = disp_cols.index("Avg")
        del disp_cols[i], kinds[i]
        for d in disp_records:
            d.pop("Avg", None)
    disp_df = pd.DataFrame(disp_records, columns=disp_cols).fillna("")
    # sort keys for the HTML page (numbers where the display is a formatted number)
    sort_vals = []
    for r in rows:
        vals = [method_label(r)] + ["" if r.setting.get(k) is None else r.setting.get(k) for k in dcols] + [r.n]
        vals += [r.tasks[t].mean if t in r.tasks else None for t in tasks]
        vals += [r.avg.mean if r.avg else None] if tasks else []
        vals += [r.test_loss.mean if r.test_loss else None,
                 None if r.bytes_up is None else r.bytes_up + r.bytes_down, r.wall_s]
        sort_vals.append(vals)
    disp_df.attrs["sort_values"] = sort_vals
    disp_df.attrs["reference"] = [r.kind == "reference" for r in rows]
    disp_df.attrs["shared"] = shared
    return num_df, disp_df, kinds


def shared_setting(rows: list[Row], scols: list[str]) -> dict:
    """Setting fields with one value across the federated rows (reference rows: that value or unset); the
    MD/HTML tables state them once above the table instead of repeating a constant column."""
    runs = [r for r in rows if r.kind == "run"] or rows
    if len(rows) < 2:
        return {}
    out = {}
    for k in scols:
        vals = {json.dumps(r.setting.get(k), sort_keys=True) for r in runs}
        if len(vals) != 1 or runs[0].setting.get(k) is None:
            continue
        v = runs[0].setting.get(k)
        if all(r.setting.get(k) in (None, v) for r in rows):
            out[k] = v
    return out


def shared_text(shared: dict) -> str:
    return ", ".join(f"{SETTING_LABELS.get(k, k).lower().rstrip('.')}: {v}" for k, v in shared.items())


def _task_header(task: str, metric: str) -> str:
    return f"{task} ({metric})" if metric else task


# ---------------------------------------------------------------------------------------------- rendering

NOTE = ("Scores: mean ± half-width of the 95% bootstrap CI (2.5th–97.5th percentile; {boot} replicates, "
        "seeded) over seeds and, where per-sample outputs exist, over samples; with no per-sample file the "
        "stored value ± stderr is resampled. n = seeds; a cell with fewer seeds says so. Avg = mean over "
        "all task columns (blank where a row lacks a task). Comm. = bytes uploaded + downloaded over the "
        "run, mean over seeds. Wall time = timings.total_s, mean over seeds. Reference rows are the base "
        "model without federated training. See docs/reports.md.")


def _shared_line(disp: pd.DataFrame) -> str:
    note = " (reference rows set only some of these)" if any(disp.attrs.get("reference", [])) else ""
    return f"Same for every row{note}: {shared_text(disp.attrs['shared'])}."


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _counts(rows: int, records: int, skipped: int) -> str:
    return f"{_plural(rows, 'row')} from {_plural(records, 'record')}; {skipped} skipped."


def _md_cell(s: str) -> str:
    return s.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def render_markdown(disp: pd.DataFrame, kinds: list[str], n_records: int, skipped: list[Skipped],
                    notes: list[str], n_boot: int) -> str:
    lines = ["# fedlora-bench leaderboard", ""]
    lines.append(_counts(len(disp), n_records, len(skipped)))
    lines.append("")
    if disp.attrs.get("shared"):
        lines += [_md_cell(_shared_line(disp)), ""]
    if len(disp):
        cols = list(disp.columns)
        lines.append("| " + " | ".join(_md_cell(c) for c in cols) + " |")
        lines.append("|" + "|".join("---:" if k == "num" else ":---" for k in kinds) + "|")
        for _, row in disp.iterrows():
            cells = [_md_cell(str(row[c])) for c in cols]
            lines.append("| " + " | ".join(cells) + " |")
    else:
        lines.append("_No complete records._")
    lines += ["", NOTE.format(boot=n_boot)]
    if skipped:
        lines += ["", "## Skipped records", ""]
        lines += [f"- `{Path(s.file).name}`: {_md_cell(s.reason)}" for s in skipped]
    if notes:
        lines += ["", "## Notes", ""]
        lines += [f"- {_md_cell(n)}" for n in notes]
    return "\n".join(lines) + "\n"


def render_csv(num: pd.DataFrame) -> str:
    return num.to_csv(index=False, lineterminator="\n", float_format="%.6g")


_HTML_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>fedlora-bench leaderboard</title>
<style>
body {{ font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5rem; color: #1b1f23; }}
h1 {{ font-size: 1.5rem; }}
table {{ border-collapse: collapse; font-size: 0.9rem; }}
th, td {{ border: 1px solid #d0d7de; padding: 0.35rem 0.6rem; white-space: nowrap; }}
th {{ background: #f6f8fa; cursor: pointer; user-select: none; position: sticky; top: 0; }}
th:hover {{ background: #eaeef2; }}
th.asc::after {{ content: " \\25B2"; }}
th.desc::after {{ content: " \\25BC"; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
tr.reference td {{ background: #fff8c5; font-style: italic; }}
tbody tr:nth-child(even):not(.reference) td {{ background: #fafbfc; }}
p.note, li {{ max-width: 70rem; font-size: 0.85rem; color: #57606a; }}
</style>
</head>
<body>
<h1>fedlora-bench leaderboard</h1>
<p>{summary} Click a column header to sort.</p>
{table}
<p class="note">{note}</p>
{extra}
<script>
(function () {{
  var table = document.getElementById("leaderboard");
  if (!table) return;
  var heads = table.tHead.rows[0].cells;
  function key(cell) {{
    var v = cell.getAttribute("data-sort");
    if (v === null || v === "") return null;
    var f = parseFloat(v);
    return (cell.className === "num" && !isNaN(f)) ? f : v.toLowerCase();
  }}
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


def render_html(disp: pd.DataFrame, kinds: list[str], n_records: int, skipped: list[Skipped],
                notes: list[str], n_boot: int) -> str:
    e = html.escape
    summary = _counts(len(disp), n_records, len(skipped))
    if disp.attrs.get("shared"):
        summary += " " + _shared_line(disp)
    if len(disp):
        head = "".join(f'<th scope="col">{e(c)}</th>' for c in disp.columns)
        body = []
        sort_vals = disp.attrs["sort_values"]
        refs = disp.attrs["reference"]
        for i, (_, row) in enumerate(disp.iterrows()):
            cells = []
            for j, c in enumerate(disp.columns):
                cls = ' class="num"' if kinds[j] == "num" else ""
                cells.append(f'<td{cls} data-sort="{e(_sort_attr(sort_vals[i][j]))}">{e(str(row[c]))}</td>')
            body.append(f'<tr class="{"reference" if refs[i] else "run"}">' + "".join(cells) + "</tr>")
        table = (f'<table id="leaderboard">\n<thead><tr>{head}</tr></thead>\n<tbody>\n'
                 + "\n".join(body) + "\n</tbody>\n</table>")
    else:
        table = "<p><em>No complete records.</em></p>"
    extra = ""
    if skipped:
        extra += "<h2>Skipped records</h2>\n<ul>\n" + "".join(
            f"<li><code>{e(Path(s.file).name)}</code>: {e(s.reason)}</li>\n" for s in skipped) + "</ul>\n"
    if notes:
        extra += "<h2>Notes</h2>\n<ul>\n" + "".join(f"<li>{e(n)}</li>\n" for n in notes) + "</ul>\n"
    return _HTML_TEMPLATE.format(summary=e(summary), table=table, note=e(NOTE.format(boot=n_boot)),
                                 extra=extra)


def dumps_summary_row(row: Row) -> dict:
    """A JSON-friendly digest of a row for build_report's summary."""
    return {"kind": row.kind, "method": row.method, "setting": row.setting, "n_seeds": row.n,
            "avg": None if row.avg is None else row.avg.mean,
            "tasks": {t: e.mean for t, e in sorted(row.tasks.items())},
            "test_loss": None if row.test_loss is None else row.test_loss.mean}


__all__ = ["Row", "build_rows", "frames", "render_markdown", "render_csv", "render_html", "task_metrics",
           "fmt_bytes", "fmt_seconds"]
