"""Row statistics and paired comparisons against a baseline method, computed context by context.

A context is a setting together with the dtypes its scores were computed in. Every row of a context, and every
comparison in it, draws its example resamples from one reports.stats.Resampler, so a difference is paired by seed
(same seed, same setting: the same data partition, held-out subset and evaluation subset) and by example.
Base-model reference rows (kind "reference") did no federated training: they join every context of their model
whose dtypes agree, and are compared there on what they have (the tasks).
"""
from __future__ import annotations

import html
import json
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .leaderboard import (SETTING_LABELS, Row, Table, decimals, field_columns, fmt_value, html_table,
                          method_label, setting_text, shared_fields)
from .metrics import HEADLINE, Metric, averaged_tasks
from .records import setting_key
from .stats import (ALPHA, MDD_FACTOR, N_BOOT, POWER, Estimate, Resampler, SeedTest, align, bootstrap_difference,
                    bootstrap_series, holm, seed_test)
from .trivial import KIND as TRIVIAL_KIND

STAR = "★"
# The gate (docs/study.md): the reference that trains on all the data must beat what needs no learning (the base
# model, every trivial baseline) on the main metric before the methods' differences on it mean anything.
GATE_REFERENCE = "centralized"
LOCAL_ONLY = "local-only"   # the gate's second condition places it between the base model and GATE_REFERENCE
PAIRED, GATE = "paired", "gate"   # Comparison.family: the table against the baseline method; the gate


@dataclass
class Comparison:
    row: Row                    # the method compared with the baseline
    base: Row                   # the baseline's row
    where: Row                  # the run row whose setting the comparison is made in
    diffs: dict[str, Estimate] = field(default_factory=dict)   # metric -> row − baseline
    examples: dict[str, float] = field(default_factory=dict)   # metric -> examples per seed compared (mean)
    seeds: dict[str, list] = field(default_factory=dict)       # metric -> the seeds compared
    seed: dict[str, SeedTest] = field(default_factory=dict)    # metric -> the seed-level test (Holm per metric)
    family: str = PAIRED                                       # its Holm family: PAIRED or GATE


def _context(row: Row) -> tuple:
    return (setting_key(row.setting), tuple(sorted(row.dtypes.items())))


def _joins(ref: Row, row: Row) -> bool:
    """Whether a kind-"reference" row belongs in the run row's context: the same model, and the same dtype for
    each scoring step both rows have. Its other setting fields describe federated training, which it did not do."""
    if ref.kind != "reference" or row.kind == "reference" or ref.setting.get("model") != row.setting.get("model"):
        return False
    return all(v is None or row.dtypes.get(k) in (None, v) for k, v in ref.dtypes.items())


def _tag(row: Row, metric: str) -> tuple:
    """Which cached resamples a series uses: task parts are shared by the task and the average (their part names
    say which task), a held-out metric's parts are its own."""
    return (row.id, metric if metric in HEADLINE else "eval")


def _basis(series) -> str:
    return "+".join(b for b, on in (("seeds", len(series) > 1),
                                    ("examples", any(p.size > 1 for ps in series.values() for p in ps.values()))) if on)


def analyse(rows: list[Row], metrics: dict[str, Metric], baseline: str | None, notes: list[str],
            gate_metric: str | None = None) -> list[Comparison]:
    """Fill every row's estimates (row.est, row.basis) and return the comparisons with `baseline` (family PAIRED)
    and, on `gate_metric`, those of the gate (family GATE): the GATE_REFERENCE row against the base model and
    every trivial baseline of its context. Each family is Holm-corrected on its own, metric by metric."""
    tasks = averaged_tasks(metrics)   # the avg metric's parts (the other tasks are metrics of their own)
    contexts: dict[tuple, list[Row]] = {}
    for r in rows:
        contexts.setdefault(_context(r), []).append(r)
    # a row with no task scores (local-only: no global model to score) has no eval dtype; its held-out losses
    # compare with the rows of its setting and export dtype: it joins the largest such context (ties: by key)
    for key in [k for k in contexts if dict(k[1]).get("eval") is None]:
        homes = [k for k in contexts if k != key and k[0] == key[0] and dict(k[1]).get("export") == dict(key[1]).get("export")]
        if homes:
            home = min(homes, key=lambda k: (-len(contexts[k]), json.dumps(k)))
            contexts[home] += contexts.pop(key)
    wild = [r for r in rows if r.kind == "reference"]
    comparisons: list[Comparison] = []
    for ctx in sorted(contexts, key=lambda c: json.dumps(c)):
        members = contexts[ctx]
        pairs: list[tuple[Row, Row]] = []
        anchor = next((r for r in members if r.kind == "run"), None)
        if baseline and anchor is not None:
            bases = ([r for r in members if r.method == baseline]
                     or [w for w in wild if w.method == baseline and _joins(w, anchor)])
            base_lrs = {b.lr for b in bases}

            def compared(r: Row, b: Row) -> bool:
                # a tuning grid holds the baseline at several lrs: a run row at one of them is compared with the
                # baseline at its own lr (equal step size), the other rows with each (the table names which); the
                # baseline's own lrs are compared once per pair, the larger lr against the smaller
                if r is b:
                    return False
                if len(bases) == 1:
                    return True
                if r.method == baseline:
                    return (r.lr or 0) > (b.lr or 0)
                return r.lr not in base_lrs or r.lr == b.lr

            for b in bases:
                pairs += [(r, b) for r in members if compared(r, b)]
                pairs += [(w, b) for w in wild if w is not b and _joins(w, anchor)]
        gates: list[tuple[Row, Row]] = []
        if gate_metric in metrics and anchor is not None:
            untrained = [r for r in members + [w for w in wild if w not in members and _joins(w, anchor)]
                         if r.method == "base" or r.kind == TRIVIAL_KIND]
            gates = [(g, u) for g in members if g.method == GATE_REFERENCE for u in untrained]
            # the gate's second condition: local-only lies between the base model and the reference (on the metrics
            # it has: without a global model to score, the held-out losses)
            alone = [r for r in members if r.method == LOCAL_ONLY]
            gates += [(g, a) for g in members if g.method == GATE_REFERENCE for a in alone]
            gates += [(a, u) for a in alone for u in untrained if u.method == "base"]
        involved = list({id(r): r for r in members + [x for p in pairs + gates for x in p]}.values())
        res = Resampler(ctx, max(r.n for r in involved))
        res.prepare([(_tag(r, m), seed, name, part) for r in involved for m in metrics
                     for seed, parts in r.series(m, tasks, notes).items() for name, part in parts.items()])
        for r in members:
            for m in metrics:
                s = r.series(m, tasks, notes)
                if s:
                    r.est[m] = bootstrap_series(res, _tag(r, m), ("row", r.id), s)
                    r.basis[m] = _basis(s)
        gate_on = {m: metrics[m] for m in (gate_metric, *HEADLINE) if m in metrics}
        for family, these, on in ((PAIRED, pairs, metrics), (GATE, gates, gate_on)):
            for r, b in these:
                c = _compare(res, r, b, anchor, on, tasks, notes)
                c.family = family
                if c.diffs:   # rows with no metric in common (local-only's losses, a trivial baseline's tasks) compare on nothing
                    comparisons.append(c)
    # one Holm family per metric and family: every comparison of the report on that metric (the paired table of one
    # metric), and the gate's on its metric
    for family in (PAIRED, GATE):
        for m in metrics:
            holm([c.seed[m] for c in comparisons if c.family == family and m in c.seed])
    return comparisons


def of_family(comparisons: list[Comparison], family: str) -> list[Comparison]:
    return [c for c in comparisons if c.family == family]


def _spread_seed_free(row: Row, own, other):
    """A seed-free row (the base model: no training, greedy decoding, the same held-out and evaluation subsets at
    every seed) scored once stands for every seed of the row it is compared with: its difference per seed is then
    the other row's seed spread alone, which is what it is."""
    if row.seed_free and len(own) == 1:
        part = next(iter(own.values()))
        return {s: part for s in other}
    return own


def _compare(res: Resampler, r: Row, b: Row, where: Row, metrics, tasks, notes) -> Comparison:
    c = Comparison(r, b, where)
    for m in metrics:
        sa, sb = r.series(m, tasks, notes), b.series(m, tasks, notes)
        if not sa or not sb:
            continue
        sa, sb = _spread_seed_free(r, sa, sb), _spread_seed_free(b, sb, sa)
        a, bb = align(sa, sb)
        lost = sorted(set(sa) & set(sb) - set(a))
        label = f"{r.method} vs {b.method} ({setting_text(where.fields)}), {metrics[m].label}"
        if lost:
            notes.append(f"{label}: not paired at seed(s) {', '.join(map(str, lost))}: the two records have no "
                         "examples in common (different held-out or evaluation subsets)")
        if not a:
            continue
        sizes = [sum(p.size for p in a[s].values()) for s in a]
        full = [max(sum(p.size for p in sa[s].values()), sum(p.size for p in sb[s].values())) for s in a]
        if sizes != full:
            notes.append(f"{label}: compared on the {sum(sizes)} of {sum(full)} examples both records have")
        c.diffs[m] = bootstrap_difference(res, (_tag(r, m), _tag(b, m)), ("pair", r.id, b.id), a, bb)
        c.seed[m] = seed_test(a, bb)
        c.examples[m] = float(np.mean(sizes))
        c.seeds[m] = sorted(a)
    return c


# ---------------------------------------------------------------------------------------------- rendering

def _sort_key(c: Comparison, main: Metric, cols: list[str]):
    from .leaderboard import val_key

    e = c.diffs.get(main.name)
    score = np.inf if e is None else (e.mean if main.lower_is_better else -e.mean)
    return (tuple(val_key(c.where.fields.get(k)) for k in cols), 1 if c.row.reference else 0, score, c.row.method)


def fmt_diff(e: Estimate | None, digits: int) -> str:
    """Δ with its hierarchical-bootstrap 95% CI (no ★: the verdict is the seed-level test's)."""
    if e is None:
        return ""
    s = f"{e.mean:+.{digits}f}"
    if e.lo is not None:
        s += f" [{e.lo:+.{digits}f}, {e.hi:+.{digits}f}]"
    return s


def fmt_seed(t: SeedTest | None, digits: int, verdict: Metric | None = None, with_mean: bool = False) -> str:
    """The seed-level interval at Holm's level, ★ where it excludes 0 ("n/a" with fewer than 2 seeds)."""
    if t is None:
        return ""
    head = f"{t.mean:+.{digits}f} " if with_mean else ""
    ci = t.ci
    if ci is None:
        return head + "n/a"
    s = head + f"[{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]"
    if t.significant:
        s += f" {STAR}"
        if verdict is not None:
            s += " better" if (t.mean < 0) == verdict.lower_is_better else " worse"
    return s


def seed_mdd(t: SeedTest | None) -> float | None:
    """The seed-level MDD at Holm's strictest level for the family, α/k."""
    return None if t is None or not t.family else t.mdd(ALPHA / t.family)


def family_size(comparisons: list[Comparison], metric: str) -> int:
    return sum(1 for c in comparisons if metric in c.seed and c.seed[metric].p is not None)


def shown_metrics(comparisons: list[Comparison], metrics: dict[str, Metric], main: Metric) -> list[Metric]:
    """The MD/HTML table: the main metric, then the held-out losses and the task average (each task is in
    paired.csv)."""
    have = {m for c in comparisons for m in c.diffs}
    rest = [metrics[m] for m in (*HEADLINE, "avg") if m in have and m in metrics and m != main.name]
    return ([main] if main.name in have else []) + rest


def paired_table(comparisons: list[Comparison], metrics: dict[str, Metric], main: Metric) -> tuple[Table, list]:
    cols = field_columns([c.where.fields for c in comparisons])
    shared = shared_fields([c.where for c in comparisons], cols) if len(comparisons) > 1 else \
        {k: comparisons[0].where.fields[k] for k in cols if comparisons[0].where.fields.get(k) is not None}
    shown = [k for k in cols if k not in shared and any(c.where.fields.get(k) is not None for c in comparisons)]
    ms = shown_metrics(comparisons, metrics, main)
    digits = {m.name: decimals([c.diffs.get(m.name) for c in comparisons]) for m in ms}
    comparisons = sorted(comparisons, key=lambda c: _sort_key(c, main, cols))
    several_bases = len({id(c.base) for c in comparisons}) > 1   # each row then names the baseline row it is paired with
    cells, sort_values, strong = [], [], []
    for c in comparisons:
        n_seeds = len({s for seeds in c.seeds.values() for s in seeds})
        label = method_label(c.row) + (f" vs {method_label(c.base)}" if several_bases else "")
        line = [fmt_value(c.where.fields.get(k)) for k in shown] + [label, str(n_seeds)]
        sv = [fmt_value(c.where.fields.get(k)) for k in shown] + [label, n_seeds]
        sig = [False] * len(line)
        for m in ms:
            e, t, d = c.diffs.get(m.name), c.seed.get(m.name), digits[m.name]
            star = bool(t and t.significant)
            if m is main:
                mdd = seed_mdd(t)
                line += [fmt_diff(e, d), fmt_seed(t, d, m), "" if mdd is None else f"{mdd:.{d}f}"]
                sv += [e.mean if e else None, t.ci[0] if t and t.ci else None, mdd]
                sig += [False, star, False]
            else:
                line.append(fmt_seed(t, d, with_mean=True))
                sv.append(e.mean if e else None)
                sig.append(star)
        cells.append(line)
        sort_values.append(sv)
        strong.append(sig)
    columns = [SETTING_LABELS.get(k, k) for k in shown] + ["Method", "Seeds"]
    for m in ms:
        k = family_size(comparisons, m.name)
        holm = f"Holm, k={k}" if k else "n/a: no comparison has 2 seeds"   # a family of 0 tests corrects nothing
        if m is main:
            columns += [f"Δ {m.label} [95% CI]", f"Seed-level CI ({holm})", "MDD (seeds)"]
        else:
            columns.append(f"Δ {m.label} [seed-level CI, {holm}]")
    numeric = [False] * (len(shown) + 1) + [True] * (len(columns) - len(shown) - 1)
    table = Table(columns, cells, sort_values, [c.row.reference for c in comparisons], numeric, shared)
    return table, strong


def mdd_line(comparisons: list[Comparison], main: Metric) -> str:
    tests = [c.seed[main.name] for c in comparisons if main.name in c.seed]
    mdds = sorted(x for x in map(seed_mdd, tests) if x is not None)
    if not mdds:
        return (f"Minimum detectable difference on {main.label} at the seed level: n/a (fewer than 2 seeds in every "
                "comparison).")
    k = family_size(comparisons, main.name)
    d = decimals([c.diffs.get(main.name) for c in comparisons])
    spread = f"; {mdds[0]:.{d}f}–{mdds[-1]:.{d}f} across them" if len(mdds) > 1 else ""
    boot = sorted(c.diffs[main.name].mdd for c in comparisons
                  if main.name in c.diffs and c.diffs[main.name].mdd is not None)
    also = f" The hierarchical bootstrap's MDD (z, α = 0.05): median {float(np.median(boot)):.{d}f}." if boot else ""
    return (f"Minimum detectable difference on {main.label} at the seed level ({POWER:.0%} power, two-sided t-test "
            f"at α = {ALPHA:g}/{k} = {ALPHA / k:.3g}, Holm's strictest step over the {k} comparisons of this metric): "
            f"{float(np.median(mdds)):.{d}f} (median over {len(mdds)} comparisons{spread}). A |Δ| below it is not a "
            f"finding here: more seeds shrink it.{also}")


def intro(baseline: str, main: Metric) -> str:
    return (f"Δ = method − {baseline} in the same setting and dtypes, on the seeds both have and the examples both "
            f"scored. [95% CI]: paired hierarchical bootstrap ({N_BOOT} seeded replicates: seeds, then held-out "
            f"examples or task documents within each seed, the same resamples for both sides). Seed-level CI: a "
            f"t-interval over the per-seed differences (each the difference on that seed's paired examples, n − 1 "
            f"degrees of freedom), Holm-corrected over the k comparisons of its metric (each drawn at the level "
            f"Holm tests it at); n/a with fewer than 2 seeds. {STAR} only where the Holm-corrected seed-level CI "
            f"excludes 0 (better/worse on the main metric, {main.label}; {main.better} is better). Every task's "
            f"difference is in paired.csv.")


def paired_markdown(comparisons: list[Comparison], metrics: dict[str, Metric], main: Metric,
                    baseline: str | None, why_none: str | None) -> list[str]:
    title = f"## Which method, and by how much: paired differences against {baseline}" if baseline else \
        "## Paired differences"
    lines = [title, ""]
    if not comparisons:
        return lines + [f"_{why_none}_", ""]
    table, _ = paired_table(comparisons, metrics, main)
    from .leaderboard import md_table

    lines += [intro(baseline, main), "", mdd_line(comparisons, main), ""]
    lines += md_table(table) + [""]
    return lines


def gate_verdicts(gates: list[Comparison], main: Metric) -> list[str]:
    """One sentence per reference row of the gate: passed where every Holm-corrected seed-level interval against the
    base model and the trivial baselines excludes 0 on the better side."""
    out = []
    refs = list({id(c.row): c.row for c in gates if c.row.method == GATE_REFERENCE}.values())
    # a reference row is named by its preset and ranks, and by any other field in which the references differ
    named = {"preset", "ranks"} | {k for r in refs for k in r.fields if len({repr(q.fields.get(k)) for q in refs}) > 1}
    for ref in refs:
        mine = [c for c in gates if c.row is ref and c.base.method != LOCAL_ONLY and main.name in c.seed]
        where = setting_text({k: v for k, v in ref.fields.items() if k in named})
        who = f"{method_label(ref)} ({where})" if where else method_label(ref)
        if not mine:
            out.append(f"**Gate: not decided** for {who}: no comparison with the base model or a trivial baseline "
                       f"on {main.label}.")
            continue
        if any(c.seed[main.name].ci is None for c in mine):
            out.append(f"**Gate: not decided** for {who}: fewer than 2 seeds in a comparison, so no seed-level "
                       "interval.")
            continue
        failed = [c for c in mine if not c.seed[main.name].significant
                  or (c.seed[main.name].mean < 0) != main.lower_is_better]
        n = min(c.seed[main.name].n for c in mine)
        if failed:
            out.append(f"**Gate: not passed** by {who} at {n} seeds: its seed-level interval against "
                       f"{', '.join(method_label(c.base) for c in failed)} does not exclude 0 on the better side. "
                       "The methods' differences on this metric are then not differences in what they learn.")
        else:
            out.append(f"**Gate: passed** by {who} at {n} seeds: above {', '.join(method_label(c.base) for c in mine)}"
                       f" on {main.label}, every Holm-corrected seed-level interval excluding 0.")
    return out + _between_verdicts(gates, main)


def _between_verdicts(gates: list[Comparison], main: Metric) -> list[str]:
    """The gate's second condition, one sentence per local-only row: above the base model and below the reference,
    each on the Holm-corrected seed-level interval, on the first metric all three share (the main one, else a
    held-out loss: local-only has no global model to score)."""
    out = []
    for alone in list({id(c.base): c.base for c in gates if c.base.method == LOCAL_ONLY}.values()):
        above = [c for c in gates if c.base is alone]                  # reference − local-only
        below = [c for c in gates if c.row is alone]                   # local-only − base
        if not above or not below:
            continue
        shared = [m for m in (main.name, *HEADLINE) if all(m in c.seed for c in above + below)]
        if not shared:
            continue
        m = shared[0]
        metric = main if m == main.name else HEADLINE[m]
        tests = [(c, c.seed[m]) for c in above + below]
        if any(t.ci is None for _, t in tests):
            out.append(f"**Local-only between base and {GATE_REFERENCE}: not decided** on {metric.label}: fewer than "
                       "2 seeds, so no seed-level interval.")
            continue
        better = [t.significant and (t.mean < 0) == metric.lower_is_better for _, t in tests]
        n = min(t.n for _, t in tests)
        said = "; ".join(f"{method_label(c.row)} − {method_label(c.base)} {t.mean:+.4f} [{t.ci[0]:+.4f}, {t.ci[1]:+.4f}]"
                         for c, t in tests)
        verdict = "yes" if all(better) else "no"
        out.append(f"**Local-only between base and {GATE_REFERENCE}: {verdict}** at {n} seeds on {metric.label} "
                   f"({metric.better} is better; Holm-corrected seed-level intervals): {said}."
                   + ("" if all(better) else " The gate's second condition is not met: local-only is not a model "
                      "that learns less than the reference and more than the base model."))
    return out


def gate_intro(main: Metric) -> str:
    return (f"Before the methods' differences on {main.label} mean anything, the reference that trains on all the "
            f"clients' data ({GATE_REFERENCE}) must score above what needs no learning: the base model and every "
            f"trivial baseline. Δ = {GATE_REFERENCE} − each, per seed on the same examples; seed-level t-interval "
            f"over the seeds, Holm-corrected over the gate's comparisons (its own family). Its second condition: "
            f"local-only lies between the base model and {GATE_REFERENCE} (on the held-out loss where local-only, "
            f"having no global model, has no task score).")


def gate_markdown(gates: list[Comparison], metrics: dict[str, Metric], main: Metric) -> list[str]:
    if not gates:
        return []
    from .leaderboard import md_table

    table, _ = paired_table(gates, metrics, main)
    return (["## Gate: does the reference learn what the metric measures?", "", gate_intro(main), ""]
            + [line for v in gate_verdicts(gates, main) for line in (v, "")] + md_table(table) + [""])


def gate_html(gates: list[Comparison], metrics: dict[str, Metric], main: Metric) -> str:
    if not gates:
        return ""
    e = html.escape
    table, strong = paired_table(gates, metrics, main)
    verdicts = "".join(f"<p><strong>{e(v.replace('**', ''))}</strong></p>\n" for v in gate_verdicts(gates, main))
    return (f"<h2>{e('Gate: does the reference learn what the metric measures?')}</h2>\n"
            f'<p class="note">{e(gate_intro(main))}</p>\n{verdicts}' + html_table(table, "gate", strong) + "\n")


def paired_html(comparisons: list[Comparison], metrics: dict[str, Metric], main: Metric, baseline: str | None,
                why_none: str | None) -> str:
    from .leaderboard import shared_line

    e = html.escape
    title = f"Which method, and by how much: paired differences against {baseline}" if baseline else "Paired differences"
    out = f"<h2>{e(title)}</h2>\n"
    if not comparisons:
        return out + f"<p><em>{e(why_none or '')}</em></p>\n"
    table, strong = paired_table(comparisons, metrics, main)
    out += f'<p class="note">{e(intro(baseline, main))}</p>\n<p><strong>{e(mdd_line(comparisons, main))}</strong></p>\n'
    if table.shared:
        out += f"<p>{e(shared_line(table))}</p>\n"
    return out + html_table(table, "paired", strong) + "\n"


PAIRED_COLUMNS = ("family", "method", "lr", "kind", "reference", "baseline", "baseline_lr", "metric", "label", "lower_is_better", "diff", "ci_low",
                  "ci_high", "se", "mdd", "ci_excludes_0", "seed_diffs", "seed_se", "seed_p", "holm_alpha",
                  "holm_p", "family_size", "seed_ci_low", "seed_ci_high", "seed_mdd", "significant", "n_seeds",
                  "seeds", "examples_per_seed")


def paired_frame(comparisons: list[Comparison], metrics: dict[str, Metric]) -> pd.DataFrame:
    """paired.csv: one line per comparison and metric, every task included."""
    cols = field_columns([c.where.fields for c in comparisons])
    out = []
    for c in sorted(comparisons, key=lambda c: (tuple(fmt_value(c.where.fields.get(k)) for k in cols),
                                                c.family, c.row.method, c.base.method)):
        for name, m in metrics.items():
            e = c.diffs.get(name)
            if e is None:
                continue
            t = c.seed[name]
            ci = t.ci or (None, None)
            out.append({**{k: fmt_value(c.where.fields.get(k)) if c.where.fields.get(k) is not None else None
                           for k in cols},
                        "family": c.family, "method": c.row.method, "kind": c.row.kind, "reference": c.row.reference,
                        "lr": c.row.lr, "baseline": c.base.method, "baseline_lr": c.base.lr, "metric": name, "label": m.label,
                        "lower_is_better": m.lower_is_better, "diff": e.mean, "ci_low": e.lo, "ci_high": e.hi,
                        "se": e.se, "mdd": e.mdd, "ci_excludes_0": e.excludes_zero,
                        "seed_diffs": ";".join(f"{x:.6g}" for x in t.diffs), "seed_se": t.se, "seed_p": t.p,
                        "holm_alpha": t.alpha, "holm_p": t.p_holm, "family_size": t.family, "seed_ci_low": ci[0],
                        "seed_ci_high": ci[1], "seed_mdd": seed_mdd(t), "significant": t.significant,
                        "n_seeds": e.n, "seeds": ";".join(map(str, c.seeds[name])),
                        "examples_per_seed": c.examples[name]})
    return pd.DataFrame(out, columns=[*cols, *PAIRED_COLUMNS])
