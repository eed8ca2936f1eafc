"""Per-sample files fit to commit beside results records: the model's answers and scores, never the data.

lm-eval's per-sample lines (as evaluators.runner writes them into a run folder) carry each document, its prompt and
its reference: copies of the benchmark data, which stay in the data root (../shared/data, SOURCES.md), never in
the repository. `publish` writes, for every record of a results folder, a lean copy of each task's per-sample file
to <results>/samples/<run_id>/<file> (where reports.metrics.resolve_samples finds it in a fresh clone):

  kept     task, subtask, doc_id (the pairing key), gen_kwargs, resps, metrics, sandbox (the model's answers as
           generated, their scores and how they were made); target when it is an integer (a gold choice index:
           the majority-label baseline needs it, and an index is no copy of the data)
  replaced continuations by n_choices (the chance baseline needs only the count); doc by doc_sha256
  dropped  doc, prompt, the text of a target, filtered_resps (the answers after the task's filters: derived from
           resps, and for HumanEval the problem's prompt joined to the completion)

A report that needs a document (a trivial generation baseline, the length check) reads it from the data root by
doc_id and checks it against doc_sha256 (`document`).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from bench import BenchError

KEPT = ("task", "subtask", "doc_id", "gen_kwargs", "resps", "metrics", "sandbox")
LEAN_ONLY = ("doc_sha256", "target", "n_choices")


def doc_sha256(doc) -> str:
    """The hash a lean line keeps of its document (canonical JSON: sorted keys, UTF-8)."""
    return hashlib.sha256(json.dumps(doc, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()


def is_lean(line: dict) -> bool:
    return "doc_sha256" in line and "doc" not in line


def lean_line(line: dict) -> dict:
    """One per-sample line without data: see the module's docstring. A lean line comes back unchanged."""
    if is_lean(line):
        return {k: v for k, v in line.items() if k in KEPT or k in LEAN_ONLY}
    out = {k: line[k] for k in KEPT if k in line}
    out["doc_sha256"] = doc_sha256(line.get("doc"))
    target = line.get("target")
    if isinstance(target, int) and not isinstance(target, bool):
        out["target"] = target
    choices = line.get("continuations")
    if isinstance(choices, list):
        out["n_choices"] = len(choices)
    return out


def lean_text(text: str) -> str:
    lines = [json.dumps(lean_line(json.loads(x)), ensure_ascii=False, default=str)
             for x in text.split("\n") if x.strip()]   # not splitlines(): U+2028 may sit inside a JSON string
    return "\n".join(lines) + ("\n" if lines else "")


def publish(results: Path) -> list[tuple[Path, str]]:
    """Write the lean per-sample file of every task of every record in `results` to
    <results>/samples/<run_id>/<file>; (path, "written" | "unchanged" | "missing") for each, "missing" where no
    per-sample file is found (its run folder is on another machine and no copy is here: the report then pairs that
    record by its stored value only, and says so)."""
    from bench.io import atomic_write_text

    from .metrics import resolve_samples
    from .records import Record

    out = []
    for path in sorted(Path(results).glob("*.json")):
        data = json.loads(path.read_text())
        rec = Record(path, data)
        for task, entry in sorted(((data.get("eval") or {}).get("tasks") or {}).items()):
            ref = entry.get("samples")
            if not ref:
                continue
            dst = Path(results) / "samples" / rec.run_id / Path(ref).name
            src = resolve_samples(rec, ref)
            if src is None:
                out.append((dst, "missing"))
                continue
            text = lean_text(src.read_text())
            if dst.is_file() and dst.read_text() == text:
                out.append((dst, "unchanged"))
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(dst, text)
            out.append((dst, "written"))
    return out


def document(line: dict, documents: list[dict] | None) -> dict | None:
    """The document a per-sample line was scored on: its own `doc` (a run folder's full line) or, for a lean line,
    documents[doc_id] read from the data root, checked against doc_sha256. None when a lean line has no documents
    to read from; BenchError when the data root's document is not the one scored (another version of the data)."""
    if isinstance(line.get("doc"), dict):
        return line["doc"]
    if documents is None:
        return None
    i = line.get("doc_id")
    doc = documents[i] if isinstance(i, int) and 0 <= i < len(documents) else None
    if doc is None or doc_sha256(doc) != line.get("doc_sha256"):
        raise BenchError(f"data root: document {i} of task {line.get('task')!r} is not the one these results were "
                         "scored on (doc_sha256 differs, or it is missing); use the data version the records name")
    return doc
