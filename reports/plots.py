"""Heterogeneity-ablation plots (matplotlib Agg, no pyplot global state), PNG + deterministic SVG.

Each plot is drawn once per *context* (the setting fields the plot does not vary); a plot with no data is not
written and the reason goes into the summary. Scores are the leaderboard rows' estimates (same CIs), differences
the paired comparisons'. Methods are told apart by the data: colours follow the sorted method names found in the
rows, the noise plot picks its panels from method traits (averages_factors) and from what the rounds recorded
(truncation_loss), and settings are read from their structured fields (ranks a list, the partition a dict).
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

from .leaderboard import Row, fmt_bytes, fmt_value
from .trivial import KIND as BASELINE_KIND
from .metrics import AVG, Metric
from .stats import bootstrap_values

PLOT_NAMES = ("score_vs_rank_heterogeneity", "score_vs_data_heterogeneity", "noise_vs_round",
              "score_vs_communication", "paired_vs_rank_heterogeneity", "privacy_utility")
# 16 colours × 11 markers (coprime lengths): a study's 14+ methods and references never share a colour and a marker
_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
            "#17becf", "#000000", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5"]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "*"]
RC = {
    "svg.hashsalt": "fedlora-bench",   # stable ids in the SVG
    "svg.fonttype": "path",
    "font.family": "DejaVu Sans",
    "axes.grid": True,
    "grid.alpha": 0.3,
    "figure.dpi": 110,
    "savefig.dpi": 110,
}
RANK_FIELDS = ("ranks", "rank_distribution")



def _series_label(method: str, reference: bool, kind: str) -> str:
    """A legend entry, named as the tables name rows (leaderboard.method_label): trivial baselines are no model."""
    return f"{method} (baseline)" if kind == BASELINE_KIND else f"{method} (reference)" if reference else method

def method_style(method: str, methods: list[str], reference: bool = False) -> dict:
    """Colour and marker by the method's place among the sorted methods of the report; references dashed."""
    i = sorted(set(methods)).index(method)
    return {"color": _PALETTE[i % len(_PALETTE)], "marker": _MARKERS[i % len(_MARKERS)],
            "ls": "--" if reference else "-"}


def rank_cv(ranks) -> float | None:
    """Coefficient of variation (population std / mean) of the client ranks: 0 = homogeneous."""
    if not ranks:
        return None
    a = np.asarray(ranks, dtype=float)
    return float(a.std() / a.mean()) if a.mean() > 0 else None


def row_rank_cv(row: Row) -> float | None:
    """The CV of the row's ranks; under a sampled distribution, the mean CV of its seeds' draws."""
    if row.setting.get("ranks") is not None:
        return rank_cv(row.setting["ranks"])
    cvs = [c for c in (rank_cv(r.drawn_ranks) for r in row.records) if c is not None]
    return float(np.mean(cvs)) if cvs else None


def partition_alpha(partition) -> float | None:
    """The partition's label concentration: its Dirichlet α, ∞ for iid; None for partitions without one (shards,
    predefined)."""
    if not isinstance(partition, dict):
        return None
    if partition.get("kind") == "iid":
        return math.inf
    a = partition.get("alpha")
    return float(a) if isinstance(a, (int, float)) and not isinstance(a, bool) else None


def _rank_label(fields: dict) -> str:
    dist = fields.get("rank_distribution")
    if fields.get("ranks") is None and dist:  # sampled: ranks drawn per seed
        return f"{dist}\n(per seed)"
    label = fmt_value(fields.get("ranks"))
    if dist not in (None, "", "explicit"):
        label += f" ({dist})"
    cv = rank_cv(fields.get("ranks"))
    return label + (f"\nCV={cv:.2f}" if cv is not None else "")


def _alpha_label(a: float) -> str:
    return "iid\n(α=∞)" if math.isinf(a) else f"α={a:g}"


def _context(fields: dict, drop: tuple[str, ...]) -> tuple:
    return tuple(sorted((k, fmt_value(v)) for k, v in fields.items() if k not in drop and k != "preset"))


def _context_text(ctx: tuple) -> str:
    """The fields a plot holds fixed, wrapped so a suptitle never runs off the figure."""
    import textwrap

    return "\n".join(textwrap.wrap(", ".join(f"{k}={v}" for k, v in ctx if v != ""), 110))


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=]+", "-", s).strip("-")


def _file_stems(name: str, contexts: list[tuple]) -> dict[tuple, str]:
    """One stem per context: the plot name, plus the context fields that differ between contexts."""
    if len(contexts) == 1:
        return {contexts[0]: name}
    keys = sorted({k for c in contexts for k, _ in c})
    varying = [k for k in keys if len({dict(c).get(k) for c in contexts}) > 1]
    return {c: name + "__" + _slug("_".join(f"{k}={dict(c).get(k)}" for k in varying)) for c in contexts}


def _save(fig: Figure, stem: Path, written: list[str]) -> None:
    FigureCanvasAgg(fig)
    for fmt, meta in (("png", {"Software": None}), ("svg", {"Date": None})):
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, metadata=meta)
        path = stem.parent / f"{stem.name}.{fmt}"
        atomic_write_bytes(path, buf.getvalue())
        written.append(str(path))


def _figure(n_panels: int) -> tuple[Figure, list]:
    """One panel per metric: side by side up to two, then two per line."""
    cols = min(n_panels, 2)
    lines = math.ceil(n_panels / cols)
    # one panel gets the width of a context line and its legend beside it, which constrained layout cannot shrink
    fig = Figure(figsize=(6.4 * cols if cols > 1 else 9.0, 4.6 * lines), layout="constrained")
    axes = list(fig.subplots(lines, cols, squeeze=False).ravel())
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def _ylabel(m: Metric) -> str:
    return f"{m.label} ({m.better} is better)"


def _panels(rows: list[Row], metrics: list[Metric]) -> list[Metric]:
    return [m for m in metrics if any(m.name in r.est for r in rows)]


def _errorband(ax, x, ests, color, alpha=0.18):
    if not any(e.lo is not None for e in ests):
        return
    lo = np.array([e.lo if e.lo is not None else e.mean for e in ests])
    hi = np.array([e.hi if e.hi is not None else e.mean for e in ests])
    y = np.array([e.mean for e in ests])
    if len(x) == 1:
        ax.errorbar(x, y, yerr=[y - lo, hi - y], color=color, capsize=4, lw=1.2)
    else:
        ax.fill_between(x, lo, hi, color=color, alpha=alpha, lw=0)


def _categorical_plot(name: str, title: str, xlabel: str, rows: list[Row], xkey, xlabel_of, drop: tuple,
                      metrics: list[Metric], out: Path, written: list[str], skipped: list[dict],
                      why_excluded: str) -> None:
    """Scores against an ordered categorical setting, one line + CI band per method."""
    usable, excluded = [], []
    for r in rows:
        (usable if xkey(r) is not None else excluded).append(r)
    if excluded:
        labels = sorted({f"{r.method} {fmt_value(r.setting.get(drop[0]))}" for r in excluded})
        skipped.append({"plot": name, "reason": f"{len(excluded)} rows not placed ({why_excluded}): "
                                                + "; ".join(labels)})
    contexts: dict[tuple, list[Row]] = {}
    for r in usable:
        contexts.setdefault(_context(r.fields, drop), []).append(r)
    contexts = {c: rs for c, rs in contexts.items() if _panels(rs, metrics)}
    if not contexts:
        skipped.append({"plot": name, "reason": "no run with a score to plot"})
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
    methods_all = [r.method for r in rows]
    for ctx in sorted(contexts):
        rs = contexts[ctx]
        cats: dict[str, float] = {}
        for r in rs:
            cats[xlabel_of(r)] = min(cats.get(xlabel_of(r), math.inf), xkey(r))
        order = sorted(cats, key=lambda lab: (cats[lab], lab))
        pos = {lab: i for i, lab in enumerate(order)}
        panels = _panels(rs, metrics)
        fig, axes = _figure(len(panels))
        for ax, m in zip(axes, panels):
            for method, reference, kind in sorted({(r.method, r.reference, r.kind) for r in rs}):
                pts = sorted(((pos[xlabel_of(r)], r.est[m.name]) for r in rs
                              if r.method == method and m.name in r.est), key=lambda p: p[0])
                if not pts:
                    continue
                st = method_style(method, methods_all, reference)
                x = np.array([p for p, _ in pts], dtype=float)
                ns = sorted({e.n for _, e in pts})
                ax.plot(x, [e.mean for _, e in pts], marker=st["marker"], color=st["color"], ls=st["ls"], lw=1.8,
                        label=f"{_series_label(method, reference, kind)} "
                              f"(n={ns[0] if len(ns) == 1 else f'{ns[0]}–{ns[-1]}'} seeds)")
                _errorband(ax, x, [e for _, e in pts], st["color"])
            if m.chance is not None:
                ax.axhline(m.chance, color="#57606a", ls=":", lw=1, label=f"chance ({m.chance:.2f})")
            ax.set_xticks(range(len(order)), order, rotation=20 if len(order) > 4 else 0,
                          ha="right" if len(order) > 4 else "center", fontsize=8)
            ax.set_xlim(-0.5, len(order) - 0.5)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(_ylabel(m))
            ax.set_title(m.label, fontsize=10)
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="method (95% CI band)", title_fontsize=8)
        fig.suptitle(f"{title}\n{_context_text(ctx)}", fontsize=10)
        _save(fig, out / stems[ctx], written)


def plot_rank_heterogeneity(rows, metrics, out, written, skipped):
    _categorical_plot(
        "score_vs_rank_heterogeneity", "Score vs client-rank heterogeneity",
        "Client LoRA ranks (ordered by CV = std/mean of the client ranks)",
        [r for r in rows if r.kind == "run"], row_rank_cv, lambda r: _rank_label(r.setting), RANK_FIELDS, metrics,
        out, written, skipped, "no setting.ranks")


def plot_data_heterogeneity(rows, metrics, out, written, skipped):
    _categorical_plot(
        "score_vs_data_heterogeneity", "Score vs data heterogeneity",
        "Dirichlet α of the label partition (smaller = more heterogeneous; iid = α→∞)",
        [r for r in rows if r.kind == "run"], lambda r: partition_alpha(r.setting.get("partition")),
        lambda r: _alpha_label(partition_alpha(r.setting.get("partition"))), ("partition",), metrics, out,
        written, skipped, "the partition has no Dirichlet α and is not iid")


# ---------------------------------------------------------------------------------------------- noise

# What each kind of server-side loss measures; a method gets a panel for each kind its records carry.
NOISE_KINDS = (
    ("noise", "Aggregation noise of factor averaging\n‖B̄Ā − Σ p·s·BA‖_F / ‖Σ p·s·BA‖_F"),
    ("truncation_loss", "Truncation loss of the rank-r_k redistribution\n‖ΔW − trunc_r(ΔW)‖_F / ‖ΔW‖_F, Σ p_k-weighted"),
)


def round_losses(row: Row, kind: str) -> dict[int, list[float]]:
    """round -> one value per seed. noise: rounds[].noise, for methods whose trait averages_factors is true (a
    method that does not average factors records 0 or nothing); truncation_loss: the clients' rows of the round,
    weighted by their p."""
    out: dict[int, list[float]] = {}
    for rec in row.records:
        if kind == "noise" and not rec.trait("averages_factors"):
            continue
        for rd in rec.data.get("rounds") or []:
            if kind == "noise":
                v = rd.get("noise")
            else:
                cs = [c for c in rd.get("clients") or [] if isinstance(c.get(kind), (int, float))]
                w = [c.get("p") if isinstance(c.get("p"), (int, float)) else 1.0 for c in cs]
                v = float(np.dot(w, [c[kind] for c in cs]) / sum(w)) if cs and sum(w) > 0 else None
            if isinstance(v, (int, float)):
                out.setdefault(int(rd["round"]), []).append(float(v))
    return out


def plot_noise(rows, out, written, skipped):
    """FedAvg-style aggregation noise and FlexLoRA-style truncation loss side by side (shared y axis), one panel per
    method and kind, one line (+ CI band over seeds) per rank/partition variant."""
    name = "noise_vs_round"
    drop = ("ranks", "rank_distribution", "partition")
    contexts: dict[tuple, list] = {}
    for r in rows:
        if r.kind != "run":
            continue
        for kind, _ in NOISE_KINDS:
            per_round = round_losses(r, kind)
            if per_round:
                contexts.setdefault(_context(r.fields, drop), []).append((r, kind, per_round))
    if not contexts:
        skipped.append({"plot": name, "reason": "no run recorded aggregation noise (a method with averages_factors) "
                                                "or clients' truncation_loss"})
        return
    stems = _file_stems(name, sorted(contexts))
    titles = dict(NOISE_KINDS)
    for ctx in sorted(contexts):
        series = contexts[ctx]
        panels = sorted({(kind, r.method) for r, kind, _ in series},
                        key=lambda p: ([k for k, _ in NOISE_KINDS].index(p[0]), p[1]))
        settings = {_context(r.setting, ()): r.setting for r, _, _ in series}
        variants = sorted(settings, key=lambda v: (_variant_order(settings[v]), v))
        varying = [k for k in drop if len({dict(v).get(k) for v in variants}) > 1] or ["ranks", "partition"]
        colors = matplotlib.colormaps["viridis"](np.linspace(0.0, 0.85, max(len(variants), 1)))
        fig, axes = _figure(len(panels))
        for ax in axes[1:]:
            ax.sharey(axes[0])
        max_round = 1
        for ax, (kind, method) in zip(axes, panels):
            for r, k, per_round in series:
                if (k, r.method) != (kind, method):
                    continue
                vi = variants.index(_context(r.setting, ()))
                rounds = sorted(per_round)
                ests = [bootstrap_values(["noise", kind, r.id, k_], per_round[k_]) for k_ in rounds]
                x = np.array(rounds, dtype=float)
                n = max(len(v) for v in per_round.values())
                label = ", ".join(f"{f}={fmt_value(r.setting.get(f))}" for f in varying) + f" (n={n})"
                ax.plot(x, [e.mean for e in ests], marker="o", ms=4, color=colors[vi], lw=1.6, label=label)
                _errorband(ax, x, ests, colors[vi], alpha=0.15)
                max_round = max(max_round, rounds[-1])
            ax.set_title(f"{method}: {titles[kind]}", fontsize=9)
            ax.set_xlabel("Round")
            ax.set_ylabel("relative Frobenius error (unitless)", fontsize=8)
            ax.set_ylim(bottom=0)
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="setting (seeds); 95% CI band over seeds", title_fontsize=7)
        for ax in axes:
            ax.set_xticks(range(1, max_round + 1) if max_round <= 20 else
                          np.unique(np.linspace(1, max_round, 10).round().astype(int)))
        fig.suptitle(f"What the server's aggregation loses, per round\n{_context_text(ctx)}", fontsize=10)
        _save(fig, out / stems[ctx], written)


def _variant_order(setting: dict) -> tuple:
    a = partition_alpha(setting.get("partition"))
    return (rank_cv(setting.get("ranks")) or 0.0, -(a if a is not None else math.inf))


# ---------------------------------------------------------------------------------------------- communication

def plot_communication(rows, metrics, out, written, skipped):
    name = "score_vs_communication"
    usable = [r for r in rows if r.kind == "run" and r.bytes_up is not None and r.bytes_up + r.bytes_down > 0]
    contexts: dict[tuple, list[Row]] = {}
    for r in usable:
        contexts.setdefault(tuple((k, fmt_value(r.fields.get(k))) for k in ("model", "dataset", "export_dtype",
                                                                           "eval_dtype")), []).append(r)
    contexts = {c: rs for c, rs in contexts.items() if _panels(rs, metrics)}
    if not contexts:
        skipped.append({"plot": name, "reason": "no run with communication bytes and a score"})
        return
    stems = _file_stems(name, sorted(contexts))
    methods_all = [r.method for r in rows]
    for ctx in sorted(contexts):
        rs = contexts[ctx]
        panels = _panels(rs, metrics)
        fig, axes = _figure(len(panels))
        for ax, m in zip(axes, panels):
            for method, reference in sorted({(r.method, r.reference) for r in rs}):
                pts = [(r.bytes_up + r.bytes_down, r.est[m.name]) for r in rs if r.method == method and m.name in r.est]
                if not pts:
                    continue
                pts.sort(key=lambda p: (p[0], p[1].mean))
                st = method_style(method, methods_all, reference)
                yerr = np.array([[e.mean - (e.lo if e.lo is not None else e.mean) for _, e in pts],
                                 [(e.hi if e.hi is not None else e.mean) - e.mean for _, e in pts]])
                ax.errorbar([p for p, _ in pts], [e.mean for _, e in pts], yerr=yerr, fmt=st["marker"],
                            color=st["color"], capsize=3, ms=6, label=f"{method} ({len(pts)} setting{'' if len(pts) == 1 else 's'})")
            ax.set_xscale("log", base=2)
            lo_x, hi_x = min(r.bytes_up + r.bytes_down for r in rs), max(r.bytes_up + r.bytes_down for r in rs)
            ax.set_xlim(lo_x / 1.6, hi_x * 1.6)
            ax.xaxis.set_major_locator(LogLocator(base=2, numticks=6))   # more overlap on a one-panel-wide axis
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _tick_bytes(v)))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("Communication per run, bytes up + down (log scale, IEC units)")
            ax.set_ylabel(_ylabel(m))
            ax.set_title(m.label, fontsize=10)
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="method (95% CI bars; one point per setting)", title_fontsize=8)
        fig.suptitle(f"Score vs communication cost\n{_context_text(ctx)}", fontsize=10)
        _save(fig, out / stems[ctx], written)


def _tick_bytes(v: float) -> str:
    num, unit = fmt_bytes(v).split(" ")
    return f"{float(num):g} {unit}"


# ---------------------------------------------------------------------------------------------- paired

def plot_paired(comparisons, metrics: list[Metric], out, written, skipped):
    """Each method minus the baseline (95% paired bootstrap CI bars; filled where ★: the Holm-corrected seed-level CI
    excludes 0) against the rank setting, one panel per metric; one figure per context of the other setting fields."""
    name = "paired_vs_rank_heterogeneity"
    if not comparisons:
        skipped.append({"plot": name, "reason": "no paired comparison (no baseline rows, or none shares a setting)"})
        return
    contexts: dict[tuple, list] = {}
    for c in comparisons:
        contexts.setdefault(_context(c.where.fields, RANK_FIELDS), []).append(c)
    stems = _file_stems(name, sorted(contexts))
    methods_all = [c.row.method for c in comparisons]
    baseline = comparisons[0].base.method
    for ctx in sorted(contexts):
        cs = contexts[ctx]
        panels = [m for m in metrics if any(m.name in c.diffs for c in cs)]
        if not panels:
            continue
        cats = {}
        for c in cs:
            cats[_rank_label(c.where.setting)] = row_rank_cv(c.where) or 0.0
        order = sorted(cats, key=lambda lab: (cats[lab], lab))
        series = sorted({(c.row.method, c.row.reference, c.row.kind) for c in cs})
        width = 0.7 / max(len(series), 1)
        fig, axes = _figure(len(panels))
        for ax, m in zip(axes, panels):
            ax.axhline(0, color="#1b1f23", lw=1)
            for i, (method, reference, kind) in enumerate(series):
                pts = [(order.index(_rank_label(c.where.setting)), c.diffs[m.name], c.seed[m.name]) for c in cs
                       if (c.row.method, c.row.reference, c.row.kind) == (method, reference, kind) and m.name in c.diffs]
                if not pts:
                    continue
                st = method_style(method, methods_all, reference)
                x = np.array([p for p, _, _ in pts], dtype=float) + (i - (len(series) - 1) / 2) * width
                y = np.array([e.mean for _, e, _ in pts])
                lo = np.array([e.lo if e.lo is not None else e.mean for _, e, _ in pts])
                hi = np.array([e.hi if e.hi is not None else e.mean for _, e, _ in pts])
                ax.errorbar(x, y, yerr=[y - lo, hi - y], fmt="none", ecolor=st["color"], capsize=3, lw=1.4)
                sig = np.array([t.significant for _, _, t in pts], dtype=bool)
                label = _series_label(method, reference, kind)
                # filled where ★ (the Holm-corrected seed-level CI excludes 0); one legend entry per method
                ax.scatter(x[sig], y[sig], marker=st["marker"], color=st["color"], s=36, zorder=3,
                           label=label if sig.any() else None)
                ax.scatter(x[~sig], y[~sig], marker=st["marker"], facecolors="white", edgecolors=st["color"], s=36,
                           zorder=3, label=None if sig.any() else label)
            ax.set_xticks(range(len(order)), order, fontsize=8, rotation=20 if len(order) > 3 else 0,
                          ha="right" if len(order) > 3 else "center")
            ax.set_xlim(-0.5, len(order) - 0.5)
            ax.set_xlabel("Client LoRA ranks (ordered by CV)")
            ax.set_ylabel(f"Δ {m.label} vs {baseline} ({m.better} is better)", fontsize=8)
            ax.set_title(f"Δ {m.label}", fontsize=10)
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="method − baseline; 95% paired CI\n(filled: ★, Holm seed-level CI excludes 0)", title_fontsize=7)
        fig.suptitle(f"Paired differences against {baseline} per rank setting\n{_context_text(ctx)}", fontsize=10)
        _save(fig, out / stems[ctx], written)


# ---------------------------------------------------------------------------------------------- privacy

def privacy_metric(metrics: dict[str, Metric], main: Metric | None) -> Metric | None:
    """The score a privacy–utility plot shows: the main metric when it is a score (a task), else the task average
    (accuracy / ROUGE over the tasks), else the main metric (the held-out test loss)."""
    if main is not None and not main.lower_is_better:
        return main
    return metrics.get(AVG.name) or main


def privacy_points(rows: list[Row], m: Metric) -> dict[tuple, dict[tuple, dict]]:
    """context (the fields but DP) -> (method, reference) -> {"dp": {(δ, C, accountant): [(ε, Estimate)]}, "no_dp":
    Estimate | None}. ε is the spent ε of each record (its largest over clients), mean over the row's seeds.
    Contexts without a DP row are left out."""
    out: dict[tuple, dict[tuple, dict]] = {}
    for r in rows:
        if r.kind != "run" or m.name not in r.est:
            continue
        entry = out.setdefault(_context(r.fields, ("dp",)), {}).setdefault((r.method, r.reference),
                                                                           {"dp": {}, "no_dp": None})
        dp = r.setting.get("dp")
        if not dp:
            entry["no_dp"] = r.est[m.name]
            continue
        spent = [(rec.data.get("privacy") or {}).get("epsilon_max") for rec in r.records]
        spent = [float(e) for e in spent if isinstance(e, (int, float)) and math.isfinite(e)]
        if spent:
            variant = (dp.get("delta"), dp.get("clip_norm"), dp.get("accountant"))
            entry["dp"].setdefault(variant, []).append((float(np.mean(spent)), r.est[m.name]))
    return {c: {k: e for k, e in ms.items() if e["dp"]} for c, ms in out.items()
            if any(e["dp"] for e in ms.values())}


def plot_privacy_utility(rows, metrics: dict[str, Metric], main: Metric | None, out, written, skipped):
    """Score against the spent ε (log scale), one line per method (and δ, C), its non-DP score a dotted level."""
    name = "privacy_utility"
    m = privacy_metric(metrics, main)
    contexts = privacy_points(rows, m) if m is not None else {}
    if not contexts:
        skipped.append({"plot": name, "reason": "no run with differential privacy (bench run --dp-epsilon) and a score"})
        return
    stems = _file_stems(name, sorted(contexts))
    methods_all = [r.method for r in rows]
    for ctx in sorted(contexts):
        fig, (ax,) = _figure(1)
        xs = []
        for (method, reference), entry in sorted(contexts[ctx].items()):
            st = method_style(method, methods_all, reference)
            variants = sorted(entry["dp"], key=lambda v: tuple(str(x) for x in v))
            for vi, variant in enumerate(variants):
                pts = sorted(entry["dp"][variant], key=lambda p: p[0])
                x = np.array([p for p, _ in pts])
                xs += list(x)
                est = [e for _, e in pts]
                y = np.array([e.mean for e in est])
                lo = np.array([e.lo if e.lo is not None else e.mean for e in est])
                hi = np.array([e.hi if e.hi is not None else e.mean for e in est])
                delta, clip, acc = variant
                label = f"{method} (δ={fmt_value(delta)}, C={fmt_value(clip)}, {acc})"
                ax.errorbar(x, y, yerr=[y - lo, hi - y], marker=st["marker"], color=st["color"],
                            ls=[st["ls"], ":", "-."][vi % 3] if len(variants) > 1 else st["ls"], lw=1.8, capsize=3,
                            label=label)
            if entry["no_dp"] is not None:
                ax.axhline(entry["no_dp"].mean, color=st["color"], ls=":", lw=1.2, label=f"{method} without DP (ε = ∞)")
        ax.set_xscale("log", base=2)
        ax.set_xlim(min(xs) / 1.5, max(xs) * 1.5)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("ε spent over the run (largest over clients; log scale). Record-level DP inside each client")
        ax.set_ylabel(_ylabel(m))
        ax.set_title(m.label, fontsize=10)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="method (95% CI bars)", title_fontsize=8)
        fig.suptitle(f"Privacy–utility: score vs spent ε\n{_context_text(ctx)}", fontsize=10)
        _save(fig, out / stems[ctx], written)


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


def make_plots(rows: list[Row], comparisons: list, metrics: dict[str, Metric], main: Metric | None,
               out_dir: Path) -> dict:
    """Scores are plotted on the main metric and the task average (where they differ); differences on the main
    metric and the other held-out losses and the average."""
    out = Path(out_dir) / "plots"
    written: list[str] = []
    skipped: list[dict] = []
    score_metrics = list({m.name: m for m in ([main] if main else []) + ([metrics[AVG.name]] if AVG.name in metrics else [])}
                         .values())
    from .paired import shown_metrics

    diff_metrics = shown_metrics(comparisons, metrics, main) if main and comparisons else []
    with matplotlib.rc_context(RC):
        plot_rank_heterogeneity(rows, score_metrics, out, written, skipped)
        plot_data_heterogeneity(rows, score_metrics, out, written, skipped)
        plot_noise(rows, out, written, skipped)
        plot_communication(rows, score_metrics, out, written, skipped)
        plot_paired(comparisons, diff_metrics, out, written, skipped)
        plot_privacy_utility(rows, metrics, main, out, written, skipped)
    removed = _remove_stale(out, written)
    return {"files": written, "skipped": skipped, "removed": removed}
