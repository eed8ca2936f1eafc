"""The report's metrics, and where each comes from in a record, as per-example parts (reports.stats.Part).

| metric          | record field                         | parts (each resampled on its own)               |
|-----------------|--------------------------------------|-------------------------------------------------|
| test_loss       | test.loss_sums / test.tokens         | one: the pooled held-out split, token-weighted  |
| client_loss     | test.per_client[k]                   | one per client: the global model on k's split   |
| personal_loss   | personalized.per_client[k]           | one per client: k's own model on k's split      |
| <task>          | eval.tasks[task].samples (per doc)   | one: the task's documents                       |
| avg             | every leaderboard task (≥ 2 tasks)   | one per task                                    |

A method that keeps no personal state (trait `personalized` false) serves every client the global model, so its
personal_loss is its client_loss: the two compare across personalized and global methods alike.

Part names say what the examples are: two records' parts pair only under the same name, and held-out parts
carry a digest of their token counts, so held-out sets that differ never pair by position.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .records import Record
from .stats import Part, Samples, load_samples, make_part, scalar_part


@dataclass(frozen=True)
class Metric:
    name: str
    label: str
    lower_is_better: bool
    chance: float | None = None
    measure: str | None = None   # a task's metric name (acc, rougeL, …): the task average pools one measure only

    @property
    def better(self) -> str:
        return "lower" if self.lower_is_better else "higher"


HEADLINE = {
    "test_loss": Metric("test_loss", "Test loss", True),
    "client_loss": Metric("client_loss", "Client loss (global)", True),
    "personal_loss": Metric("personal_loss", "Client loss (own model)", True),
}
AVG = Metric("avg", "Avg", False)


def averaged_tasks(metrics: dict[str, Metric]) -> list[str]:
    """The tasks the Avg column pools: those scored with the measure most tasks share (accuracy, for a suite of
    multiple-choice tasks); a ROUGE-L or exact-match task beside them is not averaged with accuracies. Ties go to
    acc, then by name."""
    tasks = [m for m in metrics.values() if m.name not in HEADLINE and m.name != AVG.name]
    counts: dict[str, int] = {}
    for m in tasks:
        counts[m.measure or ""] = counts.get(m.measure or "", 0) + 1
    if not counts:
        return []
    measure = max(sorted(counts), key=lambda k: (counts[k], k == "acc"))
    return sorted(m.name for m in tasks if (m.measure or "") == measure)


def average_metric(tasks: list[str], measure: str | None) -> Metric:
    return Metric(AVG.name, f"Avg ({measure}, {len(tasks)} tasks)" if measure else f"Avg ({len(tasks)} tasks)", False)


def task_metric(task: str, metric: str, chance: float | None) -> Metric:
    label = f"{task} ({metric}" + (f"; chance {chance:.2f}" if chance is not None else "") + ")" if metric else task
    return Metric(task, label, False, chance, metric or None)


def _digest(tokens) -> str:
    return hashlib.sha256(json.dumps(list(tokens)).encode()).hexdigest()[:8]


def _loss_part(entry: dict) -> Part | None:
    """Per-example losses (summed token loss / labelled tokens) or, without them, the stored mean as one value."""
    sums, tokens = entry.get("loss_sums"), entry.get("tokens")
    if isinstance(sums, list) and sums:
        return make_part(range(len(sums)), sums, tokens)
    return scalar_part(entry["loss"]) if entry.get("loss") is not None else None


def _loss_name(prefix: str, entry: dict) -> str:
    return f"{prefix}:{_digest(entry.get('tokens') or [])}"


def _per_client(entries) -> dict[str, Part] | None:
    parts = {}
    for c in sorted(entries or [], key=lambda c: c["client"]):
        p = _loss_part(c)
        if p is None:
            return None
        parts[_loss_name(f"client{c['client']}", c)] = p
    return parts or None


def resolve_samples(rec: Record, ref) -> Path | None:
    """The per-sample file a task entry names: as given, relative to the working folder, the record's folder or
    its parent; committed results carry theirs beside them (the run dirs stay on the machine that made them):
    <results>/samples/<run_id>/<file>."""
    if not isinstance(ref, str) or not ref:
        return None
    p = Path(ref)
    if p.is_absolute() and p.is_file():
        return p
    if not p.is_absolute():
        for base in (Path.cwd(), rec.path.parent, rec.path.parent.parent):
            if (base / p).is_file():
                return base / p
    cand = rec.path.parent / "samples" / rec.run_id / p.name
    return cand if cand.is_file() else None


def task_samples(rec: Record, task: str, notes: list[str]) -> Samples | None:
    key = ("samples", task)
    if key not in rec.cache:
        t = rec.tasks[task]
        path = resolve_samples(rec, t.get("samples"))
        s = load_samples(path, t.get("metric")) if path is not None else None
        if path is None:
            notes.append(f"{rec.path.name}: no per-sample file for task {task!r}; its stored value counts as one "
                         "example (seeds resampled only, not paired by document)")
        elif s is None:
            notes.append(f"{rec.path.name}: per-sample file for task {task!r} has no usable "
                         f"{t.get('metric') or 'value'!r} values; its stored value counts as one example")
        elif abs(float(s.values.mean()) - float(t["value"])) > 1e-6:
            notes.append(f"{rec.path.name}: task {task!r}: the mean of the per-sample values, {s.values.mean():.6g}, "
                         f"differs from the stored value {t['value']:.6g}; the report uses the per-sample values")
        rec.cache[key] = s
    return rec.cache[key]


def record_parts(rec: Record, metric: str, tasks: list[str], notes: list[str]) -> dict[str, Part] | None:
    """The record's parts for `metric` (None: the record has no such data). tasks: the leaderboard's tasks (avg)."""
    test = rec.data.get("test") or {}
    if metric == "test_loss":
        p = _loss_part(test) if test else (scalar_part(rec.data["test_loss"]) if rec.data.get("test_loss") is not None
                                          else None)
        return {_loss_name("test", test): p} if p is not None else None
    if metric == "client_loss":
        return _per_client(test.get("per_client"))
    if metric == "personal_loss":
        pers = rec.data.get("personalized") or {}
        if pers.get("per_client"):
            return _per_client(pers["per_client"])
        # the registry is asked only when it matters (it imports torch)
        return _per_client(test["per_client"]) if test.get("per_client") and rec.trait("personalized") is False \
            else None
    if metric == "avg":
        if not tasks or any(t not in rec.tasks for t in tasks):
            return None
        parts = {}
        for t in tasks:
            parts.update(record_parts(rec, t, tasks, notes))
        return parts
    if metric in rec.tasks:
        s = task_samples(rec, metric, notes)
        part = make_part(s.keys, s.values) if s is not None else None
        return {f"task:{metric}": part if part is not None else scalar_part(rec.tasks[metric]["value"])}
    return None
