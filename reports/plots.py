"""Heterogeneity-ablation plots (matplotlib Agg, no pyplot global state), PNG + deterministic SVG.

Each plot is drawn once per *context* (the setting fields the plot does not vary); a plot with no data is
not written and the reason goes into the summary. Scores are the leaderboard rows' estimates (same CIs).
"""
from __future__ import annotations

import io
import math
import re
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from bench.io import atomic_write_bytes

from .leaderboard import Row, fmt_bytes
from .stats import bootstrap_values

PLOT_NAMES = ("score_vs_rank_heterogeneity", "score_vs_data_heterogeneity", "noise_vs_round",
              "score_vs_communication")
FACTOR_AVERAGING = ("fedavg-lora", "fedit")
_KNOWN_COLORS = {"fedavg-lora": "#1f77b4", "fedit": "#ff7f0e", "flora": "#2ca02c", "flexlora": "#d62728"}
_EXTRA_COLORS = ["#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
_MARKERS = {"fedavg-lora": "o", "fedit": "s", "flora": "^", "flexlora": "D"}
RC = {
    "svg.hashsalt": "fedlora-bench",   # stable ids in the SVG
    "svg.fonttype": "path",
    "font.family": "DejaVu Sans",
    "axes.grid": True,
    "grid.alpha": 0.3,
    "figure.dpi": 110,
    "savefig.dpi": 110,
}
# (field of Row, y-axis label, panel title)
METRICS = (("avg", "Mean eval score (avg over tasks, higher is better)", "eval score"),
           ("test_loss", "Test loss (nats/token, lower is better)", "test loss"))


def method_style(method: str, methods: list[str]) -> dict:
    extras = [m for m in sorted(methods) if m not in _KNOWN_COLORS]
    color = _KNOWN_COLORS.get(method) or _EXTRA_COLORS[extras.index(method) % len(_EXTRA_COLORS)]
    return {"color": color, "marker": _MARKERS.get(method, "v")}


def rank_cv(ranks: list[float]) -> float | None:
    """Coefficient of variation (population std / mean) of the client ranks: 0 = homogeneous."""
    if not ranks:
        return None
    a = np.asarray(ranks, dtype=float)
    return float(a.std() / a.mean()) if a.mean() > 0 else None


def _ranks_from_label(label) -> list[int]:
    m = re.search(r"\[([\d,\s]+)\]", str(label or ""))
    return [int(x) for x in m.group(1).split(",") if x.strip()] if m else []


def row_rank_cv(row: Row) -> float | None:
    cvs = []
    for r in row.records:
        ranks = r.client_ranks or _ranks_from_label(row.setting.get("ranks"))
        cv = rank_cv(ranks)
        if cv is not None:
            cvs.append(cv)
    return float(np.mean(cvs)) if cvs else None


def dirichlet_alpha(partition) -> float | None:
    s = str(partition or "").strip().lower()
    if s == "iid" or s.startswith("iid("):
        return math.inf
    m = re.fullmatch(r"dirichlet\(\s*(?:alpha\s*=\s*)?([0-9.eE+-]+|inf)\s*\)", s)
    if not m:
        return None
    try:
        return float(m.group(1))
    except ValueError:
        return None


def _rank_label(setting: dict) -> str:
    label = str(setting.get("ranks"))
    dist = setting.get("rank_distribution")
    if dist not in (None, "", "explicit"):
        label += f" ({dist})"
    return label


def _alpha_label(a: float) -> str:
    return "iid\n(α=∞)" if math.isinf(a) else f"α={a:g}"


def _context(setting: dict, drop: tuple[str, ...]) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in setting.items() if k not in drop and k != "preset"))


def _context_text(ctx: tuple) -> str:
    return ", ".join(f"{k}={v}" for k, v in ctx)


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=]+", "-", s).strip("-")


def _file_stems(name: str, contexts: list[tuple]) -> dict[tuple, str]:
    """One stem per context: the plot name, plus the context fields that differ between contexts."""
    if len(contexts) == 1:
        return {contexts[0]: name}
    keys = sorted({k for c in contexts for k, _ in c})
    varying = [k for k in keys if len({dict(c).get(k) for c in contexts}) > 1]
    out = {}
    for c in contexts:
        d = dict(c)
        out[c] = name + "__" + _slug("_".join(f"{k}={d.get(k)}" for k in varying))
    return out


def _save(fig: Figure, stem: Path, written: list[str]) -> None:
    FigureCanvasAgg(fig)
    for fmt, meta in (("png", {"Software": None}), ("svg", {"Date": None})):
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, metadata=meta)
        path = stem.parent / f"{stem.name}.{fmt}"
        atomic_write_bytes(path, buf.getvalue())
        written.append(str(path))


def _estimate(row: Row, metric: str):
    return row.avg if metric == "avg" else row.test_loss


def _panels(rows: list[Row]) -> list[tuple[str, str, str]]:
    return [m for m in METRICS if any(_estimate(r, m[0]) is not None for r in rows)]


def _figure(n_panels: int) -> tuple[Figure, list]:
    fig = Figure(figsize=(6.4 * n_panels, 4.6), layout="constrained")
    axes = fig.subplots(1, n_panels, squeeze=False)[0]
    return fig, list(axes)


def _categorical_plot(name: str, title: str, xlabel: str, rows: list[Row], xkey, xlabel_of, drop: tuple,
                      out: Path, written: list[str], skipped: list[dict], why_excluded: str) -> None:
    """Score (and/or test loss) against an ordered categorical setting, one line + CI band per method."""
    usable, excluded = [], []
    for r in rows:
        (usable if xkey(r) is not None else excluded).append(r)
    if excluded:
        labels = sorted({f"{r.method} {r.setting.get(drop[0])}" for r in excluded})
        skipped.append({"plot": name, "reason": f"{len(excluded)} rows not placed ({why_excluded}): "
                                                + "; ".join(labels)})
    contexts: dict[tuple, list[Row]] = {}
    for r in usable:
        contexts.setdefault(_context(r.setting, drop), []).append(r)
    contexts = {c: rs for c, rs in contexts.items() if _panels(rs)}
    if not contexts:
        skipped.append({"plot": name, "reason": "no run with an eval score or a test loss to plot"})
        return
    single = {c for c, rs in contexts.items() if len({xlabel_of(r) for r in rs}) < 2}
    if single:
        skipped.append({"plot": name, "reason": f"{len(single)} of {len(contexts)} contexts have a single "
                                                f"{drop[0]} setting, nothing to compare: "
                                                + "; ".join(_context_text(c) for c in sorted(single))})
    contexts = {c: rs for c, rs in contexts.items() if c not in single}
    if not contexts:
        return
    stems = _file_stems(name, sorted(contexts))
    methods_all = sorted({r.method for r in usable})
    for ctx in sorted(contexts):
        rs = contexts[ctx]
        # categories: (sort value, label) per x setting
        cats: dict[str, float] = {}
        for r in rs:
            lab = xlabel_of(r)
            cats[lab] = min(cats.get(lab, math.inf), xkey(r))
        order = sorted(cats, key=lambda lab: (cats[lab], lab))
        pos = {lab: i for i, lab in enumerate(order)}
        panels = _panels(rs)
        fig, axes = _figure(len(panels))
        for ax, (metric, ylabel, ptitle) in zip(axes, panels):
            for method in sorted({r.method for r in rs}):
                pts = sorted(((pos[xlabel_of(r)], _estimate(r, metric)) for r in rs
                              if r.method == method and _estimate(r, metric) is not None), key=lambda p: p[0])
                if not pts:
                    continue
                st = method_style(method, methods_all)
                x = np.array([p for p, _ in pts], dtype=float)
                y = np.array([e.mean for _, e in pts])
                n = sorted({e.n for _, e in pts})
                ax.plot(x, y, marker=st["marker"], color=st["color"], lw=1.8,
                        label=f"{method} (n={n[0] if len(n) == 1 else f'{n[0]}–{n[-1]}'} seeds)")
                if any(e.lo is not None for _, e in pts):
                    lo = np.array([e.lo if e.lo is not None else e.mean for _, e in pts])
                    hi = np.array([e.hi if e.hi is not None else e.mean for _, e in pts])
                    if len(x) == 1:
                        ax.errorbar(x, y, yerr=[[y[0] - lo[0]], [hi[0] - y[0]]], color=st["color"], capsize=4,
                                    lw=1.2)
                    else:
                        ax.fill_between(x, lo, hi, color=st["color"], alpha=0.18, lw=0)
            ax.set_xticks(range(len(order)), order, rotation=20 if len(order) > 4 else 0,
                          ha="right" if len(order) > 4 else "center", fontsize=8)
            ax.set_xlim(-0.5, len(order) - 0.5)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.set_title(ptitle, fontsize=10)
            ax.legend(fontsize=8, title="method (95% CI band)", title_fontsize=8)
        fig.suptitle(f"{title}\n{_context_text(ctx)}", fontsize=10)
        _save(fig, out / stems[ctx], written)


def plot_rank_heterogeneity(rows, out, written, skipped):
    def label(r):
        cv = row_rank_cv(r)
        return f"{_rank_label(r.setting)}\nCV={cv:.2f}"
    _categorical_plot(
        "score_vs_rank_heterogeneity", "Score vs client-rank heterogeneity",
        "Client LoRA ranks (ordered by CV = std/mean of the client ranks)",
        [r for r in rows if r.kind == "run"], row_rank_cv, label, ("ranks", "rank_distribution"), out,
        written, skipped, "no client ranks in record.clients[].rank or the ranks label")


def plot_data_heterogeneity(rows, out, written, skipped):
    _categorical_plot(
        "score_vs_data_heterogeneity", "Score vs data heterogeneity",
        "Dirichlet α of the label partition (smaller = more heterogeneous; iid = α→∞)",
        [r for r in rows if r.kind == "run"], lambda r: dirichlet_alpha(r.setting.get("partition")),
        lambda r: _alpha_label(dirichlet_alpha(r.setting.get("partition"))), ("partition",), out, written,
        skipped, "partition is neither iid nor dirichlet(alpha=…)")


def plot_noise(rows, out, written, skipped):
    """One panel per factor-averaging method, one line (+ CI band over seeds) per setting variant."""
    name = "noise_vs_round"
    drop = ("ranks", "rank_distribution", "partition")
    cand = [r for r in rows if r.kind == "run" and r.method in FACTOR_AVERAGING]
    contexts: dict[tuple, list] = {}
    for r in cand:
        per_round: dict[int, list[float]] = {}
        for rec in r.records:
            for rd in rec.data.get("rounds") or []:
                if rd.get("noise") is not None:
                    per_round.setdefault(int(rd["round"]), []).append(float(rd["noise"]))
        if per_round:
            contexts.setdefault(_context(r.setting, drop), []).append((r, per_round))
    if not contexts:
        skipped.append({"plot": name, "reason": "no fedavg-lora/fedit run with rounds[].noise"})
        return
    stems = _file_stems(name, sorted(contexts))
    for ctx in sorted(contexts):
        series = contexts[ctx]
        methods = [m for m in FACTOR_AVERAGING if any(r.method == m for r, _ in series)]
        # setting variants, ordered by (rank CV, α descending = heterogeneity ascending), labelled by what varies
        variants = sorted({_context(r.setting, ()) for r, _ in series},
                          key=lambda v: (_variant_order(dict(v)), v))
        varying = [k for k in drop if len({dict(v).get(k) for v in variants}) > 1] or ["ranks", "partition"]
        colors = matplotlib.colormaps["viridis"](np.linspace(0.0, 0.85, max(len(variants), 1)))
        fig, axes = _figure(len(methods))
        max_round = 1
        for ax, method in zip(axes, methods):
            for r, per_round in sorted(((r, pr) for r, pr in series if r.method == method),
                                       key=lambda t: variants.index(_context(t[0].setting, ()))):
                vi = variants.index(_context(r.setting, ()))
                rounds = sorted(per_round)
                ests = [bootstrap_values(["noise", *r.key, k], per_round[k]) for k in rounds]
                x = np.array(rounds, dtype=float)
                y = np.array([e.mean for e in ests])
                n = max(len(v) for v in per_round.values())
                label = ", ".join(f"{k}={r.setting.get(k)}" for k in varying) + f" (n={n})"
                ax.plot(x, y, marker="o", ms=4, color=colors[vi], lw=1.6, label=label)
                if any(e.lo is not None for e in ests):
                    lo = np.array([e.lo if e.lo is not None else e.mean for e in ests])
                    hi = np.array([e.hi if e.hi is not None else e.mean for e in ests])
                    ax.fill_between(x, lo, hi, color=colors[vi], alpha=0.15, lw=0)
                max_round = max(max_round, rounds[-1])
            ax.set_title(method, fontsize=10)
            ax.set_xlabel("Round")
            ax.set_ylabel("Aggregation noise ‖B̄Ā − Σ p·BA‖_F / ‖Σ p·BA‖_F (relative, unitless)", fontsize=8)
            ax.set_ylim(bottom=0)
            ax.legend(fontsize=7, title="setting (seeds); 95% CI band over seeds", title_fontsize=7)
        for ax in axes:
            ax.set_xticks(range(1, max_round + 1) if max_round <= 20 else
                          np.unique(np.linspace(1, max_round, 10).round().astype(int)))
        fig.suptitle(f"Aggregation noise of factor averaging vs round\n{_context_text(ctx)}", fontsize=10)
        _save(fig, out / stems[ctx], written)


def _variant_order(setting: dict) -> tuple:
    cv = rank_cv(_ranks_from_label(setting.get("ranks"))) or 0.0
    a = dirichlet_alpha(setting.get("partition"))
    return (cv, -(a if a is not None else math.inf))


def plot_communication(rows, out, written, skipped):
    name = "score_vs_communication"
    usable = [r for r in rows if r.kind == "run" and r.bytes_up is not None and r.bytes_up + r.bytes_down > 0]
    contexts: dict[tuple, list[Row]] = {}
    for r in usable:
        contexts.setdefault(tuple((k, str(r.setting.get(k))) for k in ("model", "dataset")), []).append(r)
    contexts = {c: rs for c, rs in contexts.items() if _panels(rs)}
    if not contexts:
        skipped.append({"plot": name, "reason": "no run with communication bytes and a score or test loss"})
        return
    stems = _file_stems(name, sorted(contexts))
    methods_all = sorted({r.method for r in usable})
    for ctx in sorted(contexts):
        rs = contexts[ctx]
        panels = _panels(rs)
        fig, axes = _figure(len(panels))
        for ax, (metric, ylabel, ptitle) in zip(axes, panels):
            for method in sorted({r.method for r in rs}):
                pts = [(r.bytes_up + r.bytes_down, _estimate(r, metric)) for r in rs
                       if r.method == method and _estimate(r, metric) is not None]
                if not pts:
                    continue
                pts.sort(key=lambda p: (p[0], p[1].mean))
                st = method_style(method, methods_all)
                x = np.array([p for p, _ in pts])
                y = np.array([e.mean for _, e in pts])
                yerr = np.array([[e.mean - (e.lo if e.lo is not None else e.mean) for _, e in pts],
                                 [(e.hi if e.hi is not None else e.mean) - e.mean for _, e in pts]])
                ax.errorbar(x, y, yerr=yerr, fmt=st["marker"], color=st["color"], capsize=3, ms=6,
                            label=f"{method} ({len(pts)} settings)")
            ax.set_xscale("log", base=2)
            lo_x, hi_x = min(r.bytes_up + r.bytes_down for r in rs), max(r.bytes_up + r.bytes_down for r in rs)
            ax.set_xlim(lo_x / 1.6, hi_x * 1.6)
            ax.xaxis.set_major_locator(LogLocator(base=2, numticks=12))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _tick_bytes(v)))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("Communication per run, bytes up + down (log scale, IEC units)")
            ax.set_ylabel(ylabel)
            ax.set_title(ptitle, fontsize=10)
            ax.legend(fontsize=8, title="method (95% CI bars; one point per setting)", title_fontsize=8)
        fig.suptitle(f"Score vs communication cost\n{_context_text(ctx)}", fontsize=10)
        _save(fig, out / stems[ctx], written)


def _tick_bytes(v: float) -> str:
    num, unit = fmt_bytes(v).split(" ")
    return f"{float(num):g} {unit}"


def _remove_stale(out: Path, written: list[str]) -> list[str]:
    """Delete earlier outputs of these plots that this build did not write (no stale figures)."""
    keep = {Path(p).name for p in written}
    removed = []
    if out.is_dir():
        for p in sorted(out.iterdir()):
            if (p.is_file() and p.suffix in (".png", ".svg") and p.name not in keep
                    and any(p.stem == n or p.stem.startswith(n + "__") for n in PLOT_NAMES)):
                p.unlink()
                removed.append(str(p))
    return removed


def make_plots(rows: list[Row], out_dir: Path) -> dict:
    out = Path(out_dir) / "plots"
    written: list[str] = []
    skipped: list[dict] = []
    with matplotlib.rc_context(RC):
        plot_rank_heterogeneity(rows, out, written, skipped)
        plot_data_heterogeneity(rows, out, written, skipped)
        plot_noise(rows, out, written, skipped)
        plot_communication(rows, out, written, skipped)
    removed = _remove_stale(out, written)
    return {"files": written, "skipped": skipped, "removed": removed}
