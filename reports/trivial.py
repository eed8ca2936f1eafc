"""Trivial-baseline rows: what a capability metric gives without any learning, computed from the documents (never
from a model), one row per baseline under each setting, paired with the model rows by document. A run folder's
per-sample lines carry their documents; a committed lean file (reports.samples) is read against the data root.

Generation tasks are registered here: task -> a loader returning {baseline name: function(doc) -> {metric: value}}
and a reader of the task's documents from the data root (both loaded lazily: the functions live with the task's
code in evaluators/). Multiple-choice tasks need no registration; wherever every document has two or more choices
and an integer gold index and the task is scored by accuracy (acc, acc_norm):
  majority-label  the most frequent gold index among the documents scored at that seed (ties: the smallest): an
                  oracle label prior, the best that one constant answer scores on exactly these documents;
  chance          1/(number of choices) per document: the expected accuracy of a uniform guess.
A baseline row is one in-memory record per seed (kind "baseline", a reference row): the documents are those a
record of that setting and seed was scored on, so the rows pair with the model rows by document.
"""
from __future__ import annotations

import json
from collections import Counter
from typing import Callable

import numpy as np

from .metrics import Metric, resolve_samples
from .records import Record, setting_key
from .samples import document
from .stats import Samples, n_choices, sample_lines

KIND = "baseline"
DocScore = Callable[[dict], dict]
# task -> loader of {baseline name: function(doc) -> {metric: value}}
GENERATION_BASELINES: dict[str, Callable[[], dict[str, DocScore]]] = {}
# task -> function(data_root) -> the task's documents in lm-eval's order (doc_id = index): what a lean per-sample
# line (reports.samples) is scored against, read from the data root
DOCUMENTS: dict[str, Callable[[str], list[dict]]] = {}
ACCURACY_METRICS = ("acc", "acc_norm")


def register_generation(task: str, loader: Callable[[], dict[str, DocScore]],
                        documents: Callable[[str], list[dict]]) -> None:
    GENERATION_BASELINES[task] = loader
    DOCUMENTS[task] = documents


def task_documents(task: str, data_root: str | None, cache: dict) -> list[dict] | None:
    """The documents of a registered generation task from the data root (None without one); read once per report."""
    if data_root is None or task not in DOCUMENTS:
        return None
    if ("documents", task) not in cache:
        cache["documents", task] = DOCUMENTS[task](data_root)
    return cache["documents", task]


def _dolly_heldout() -> dict[str, DocScore]:
    """ROUGE-L of each trivial generation against the reference response, scored as the task scores a model."""
    from evaluators.tasks.loaders import TRIVIAL_GENERATIONS, rouge_l

    return {name: (lambda doc, generate=generate: {"rougeL": rouge_l(generate(doc), doc["response"])})
            for name, generate in TRIVIAL_GENERATIONS.items()}


def _dolly_documents(split: str) -> Callable[[str], list[dict]]:
    def read(data_root: str) -> list[dict]:
        from evaluators.tasks.loaders import dolly_heldout_docs

        return dolly_heldout_docs(data_root, split)
    return read


register_generation("dolly_heldout", _dolly_heldout, _dolly_documents("test"))
register_generation("dolly_heldout_val", _dolly_heldout, _dolly_documents("validation"))


def _metric_name(task: str, rec: Record) -> str:
    """The per-document metric a task is scored by, without its lm-eval filter ("acc,none" -> "acc")."""
    return str(rec.tasks[task].get("metric") or "").partition(",")[0]


def _generation(task: str, name_of_metric: str, lines, cache: dict, notes: list[str],
                data_root: str | None) -> dict[str, np.ndarray]:
    try:
        baselines = GENERATION_BASELINES[task]()
    except ImportError as exc:
        notes.append(f"no trivial-baseline rows for {task!r}: its trivial generations (TRIVIAL_GENERATIONS, "
                     f"rouge_l in evaluators.tasks.loaders) cannot be loaded here ({exc})")
        return {}
    documents = None
    if any(not isinstance(obj.get("doc"), dict) for _, obj in lines):
        documents = task_documents(task, data_root, cache)
    out = {}
    for name, score in sorted(baselines.items()):
        vals = []
        for _, obj in lines:
            doc = document(obj, documents)
            if doc is None:
                notes.append(f"no trivial-baseline rows for {task!r}: its per-sample lines are lean (no documents: "
                             "reports.samples); pass --data-root or set BENCH_DATA_ROOT to read them from the data root")
                return {}
            key = (task, name, json.dumps(doc, sort_keys=True, default=str))
            if key not in cache:
                try:
                    cache[key] = score(doc)
                except ImportError as exc:
                    notes.append(f"no trivial-baseline rows for {task!r}: scoring needs a missing package ({exc})")
                    return {}
            if name_of_metric not in cache[key]:
                notes.append(f"no trivial-baseline rows for {task!r}: its baselines give "
                             f"{', '.join(sorted(cache[key]))}, not the task's metric {name_of_metric!r}")
                return {}
            vals.append(float(cache[key][name_of_metric]))
        out[name] = np.asarray(vals)
    return out


def _multiple_choice(lines) -> dict[str, np.ndarray]:
    """{} unless every document lists at least two choices and an integer gold index among them."""
    targets, choices = [], []
    for _, obj in lines:
        t, c = obj.get("target"), n_choices(obj)
        if not (c is not None and c > 1 and isinstance(t, int) and not isinstance(t, bool) and 0 <= t < c):
            return {}
        targets.append(t)
        choices.append(c)
    counts = Counter(targets)
    majority = min(counts, key=lambda t: (-counts[t], t))
    return {"majority-label": np.array([float(t == majority) for t in targets]),
            "chance": np.array([1.0 / c for c in choices])}


def _values(task: str, rec: Record, cache: dict, notes: list[str], data_root: str | None) -> tuple[tuple, dict]:
    """(document keys, {baseline name: per-document values}) on the documents of rec's per-sample file for task."""
    path = resolve_samples(rec, rec.tasks[task].get("samples"))
    lines = sorted(sample_lines(path) or [], key=lambda kv: kv[0]) if path is not None else []
    if not lines:
        return (), {}
    name = _metric_name(task, rec)
    if task in GENERATION_BASELINES:
        return tuple(k for k, _ in lines), _generation(task, name, lines, cache, notes, data_root)
    if name in ACCURACY_METRICS and (out := _multiple_choice(lines)):
        return tuple(k for k, _ in lines), out
    notes.append(f"task {task!r} has no trivial-baseline rows: it is neither a registered generation task "
                 "(reports.trivial.GENERATION_BASELINES) nor multiple choice scored by accuracy with integer gold indices")
    return (), {}


def baseline_records(records: list[Record], tasks: dict[str, Metric], notes: list[str],
                     data_root: str | None = None) -> list[Record]:
    """One in-memory record per trivial baseline, setting (with its scoring dtypes) and seed, for every run setting
    whose records have per-sample files (a base-model evaluation's own setting when its model has no run).
    data_root: where a lean per-sample file's documents are read from (reports.samples)."""
    runs = [r for r in records if r.tasks and r.kind == "run"]
    models = {r.setting.get("model") for r in runs}
    sources = runs + [r for r in records if r.tasks and r.kind == "reference" and r.setting.get("model") not in models]
    by_place: dict[tuple, list[Record]] = {}
    for r in sorted(sources, key=lambda r: str(r.path)):
        key = (setting_key(r.setting), tuple(sorted(r.dtypes.items())), r.seed if isinstance(r.seed, int) else None)
        by_place.setdefault(key, []).append(r)
    cache: dict = {}
    out = []
    for key in sorted(by_place, key=repr):
        members = by_place[key]
        found: dict[str, dict[str, tuple[Samples, str]]] = {}   # baseline -> task -> (values, the task's metric)
        for task in sorted({t for r in members for t in r.tasks} & set(tasks)):
            for rec in (r for r in members if task in r.tasks):
                keys, vals = _values(task, rec, cache, notes, data_root)
                for name, v in vals.items():
                    found.setdefault(name, {})[task] = (Samples(keys, v, None), rec.tasks[task].get("metric"))
                if vals:
                    break
        src = members[0]
        for name, by_task in sorted(found.items()):
            rec = Record(src.path.with_name(f"{src.path.stem}+{name}.json"), {
                "schema_version": src.data["schema_version"], "kind": KIND, "status": "complete",
                "run_id": f"{name}+{src.run_id}", "method": name, "method_info": {"reference": True},
                "setting": src.data["setting"], "seed": src.seed, "dtypes": dict(src.dtypes), "rounds": [],
                "eval": {"tasks": {t: {"metric": m, "value": float(s.values.mean())}
                                   for t, (s, m) in sorted(by_task.items())}}})
            rec.cache.update({("samples", t): s for t, (s, _) in by_task.items()})
            out.append(rec)
    return out
