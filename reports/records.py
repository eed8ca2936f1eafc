"""Load results records for reporting: only complete, valid records count.

Every file that cannot be used is returned as a `Skipped(file, reason)` — never an exception — so one bad
record never takes the report down. Validation follows ARCHITECTURE.md (schema_version 1).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from bench import BenchError
from bench.io import read_record

# Setting keys in the order the leaderboard shows them; any other key follows, sorted by name.
SETTING_ORDER = ("model", "dataset", "partition", "ranks", "rank_distribution", "num_clients", "rounds",
                 "client_fraction", "preset")
# The labels a partial run may carry (the schema has no completion flag yet; see docs/reports.md).
_PARTIAL_STATUSES = {"partial", "running", "failed", "interrupted", "incomplete"}


@dataclass(frozen=True)
class Skipped:
    file: str
    reason: str

    def as_dict(self) -> dict:
        return {"file": self.file, "reason": self.reason}


@dataclass
class Record:
    path: Path
    data: dict = field(repr=False)

    @property
    def kind(self) -> str:
        return self.data["kind"]

    @property
    def method(self) -> str:
        return self.data["method"]

    @property
    def setting(self) -> dict:
        return self.data["setting"]

    @property
    def seed(self):
        return self.data.get("seed")

    @property
    def run_id(self) -> str:
        return str(self.data.get("run_id") or self.path.stem)

    @property
    def tasks(self) -> dict:
        ev = self.data.get("eval") or {}
        return ev.get("tasks") or {}

    @property
    def client_ranks(self) -> list[int]:
        return [c["rank"] for c in self.data.get("clients") or [] if _is_num(c.get("rank"))]


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def validate(rec: dict) -> str | None:
    """Return why `rec` cannot be reported, or None when it is a complete, valid record."""
    if not isinstance(rec, dict):
        return "not a JSON object"
    kind = rec.get("kind")
    if kind not in ("run", "reference"):
        return f"field 'kind' is {kind!r}; expected 'run' or 'reference'"
    if not isinstance(rec.get("method"), str) or not rec["method"]:
        return "missing required field 'method'"
    setting = rec.get("setting")
    if not isinstance(setting, dict) or not setting:
        return "missing required field 'setting' (a non-empty object)"
    if not isinstance(setting.get("model"), str):
        return "missing required field 'setting.model'"
    for k, v in setting.items():
        if isinstance(v, (dict, list)):
            return f"field 'setting.{k}' must be a scalar, not {type(v).__name__}"
    status = rec.get("status")
    if isinstance(status, str) and status.lower() in _PARTIAL_STATUSES:
        return f"partial record (status {status!r})"
    if rec.get("complete") is False:
        return "partial record (complete: false)"

    ev = rec.get("eval")
    if ev is not None and not isinstance(ev, dict):
        return "field 'eval' must be an object"
    tasks = (ev or {}).get("tasks") or {}
    if not isinstance(tasks, dict):
        return "field 'eval.tasks' must be an object"
    for name, t in tasks.items():
        if not isinstance(t, dict) or not _is_num(t.get("value")):
            return f"missing required field 'eval.tasks.{name}.value' (a finite number)"
        if t.get("stderr") is not None and not _is_num(t.get("stderr")):
            return f"field 'eval.tasks.{name}.stderr' must be a number or null"
    if rec.get("test_loss") is not None and not _is_num(rec.get("test_loss")):
        return "field 'test_loss' must be a number or null"

    if kind == "reference":
        if not tasks and rec.get("test_loss") is None:
            return "partial record: a reference record with no eval.tasks and no test_loss"
        return None

    # kind == "run"
    if not _is_int(rec.get("seed")):
        return "missing required field 'seed' (an integer)"
    if not isinstance(rec.get("run_id"), str) or not rec["run_id"]:
        return "missing required field 'run_id'"
    comm = rec.get("communication")
    if not isinstance(comm, dict) or not _is_num(comm.get("bytes_up")) or not _is_num(comm.get("bytes_down")):
        return "missing required field 'communication.bytes_up'/'communication.bytes_down'"
    timings = rec.get("timings")
    if not isinstance(timings, dict) or not _is_num(timings.get("total_s")):
        return "missing required field 'timings.total_s'"
    rounds = rec.get("rounds")
    if not isinstance(rounds, list):
        return "missing required field 'rounds' (a list)"
    for i, r in enumerate(rounds):
        if not isinstance(r, dict) or not _is_int(r.get("round")):
            return f"field 'rounds[{i}].round' missing or not an integer"
        if r.get("noise") is not None and not _is_num(r.get("noise")):
            return f"field 'rounds[{i}].noise' must be a number or null"
    expected = setting.get("rounds")
    if _is_int(expected) and len(rounds) < expected:
        return f"partial record: {len(rounds)} of {expected} rounds"
    clients = rec.get("clients")
    if clients is not None:
        if not isinstance(clients, list) or any(not isinstance(c, dict) for c in clients):
            return "field 'clients' must be a list of objects"
    return None


def load_records(results_dirs: list[str]) -> tuple[list[Record], list[Skipped]]:
    """Read every `*.json` directly inside each results folder (sorted; dotfiles ignored).

    Duplicates (the same run_id in two folders; or the same method, setting and seed twice) keep one record,
    deterministically, and report the other as skipped.
    """
    records: list[Record] = []
    skipped: list[Skipped] = []
    seen_paths: set[Path] = set()
    for d in results_dirs:
        folder = Path(d)
        if not folder.is_dir():
            raise BenchError(f"report: results folder {d} does not exist; pass --results DIR")
        for path in sorted(folder.glob("*.json")):
            if path.name.startswith(".") or not path.is_file():
                continue
            real = path.resolve()
            if real in seen_paths:
                continue
            seen_paths.add(real)
            try:
                data = read_record(path)
            except BenchError as exc:
                skipped.append(Skipped(str(path), _strip_prefix(str(exc), path)))
                continue
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                skipped.append(Skipped(str(path), f"unreadable: {exc}"))
                continue
            why = validate(data)
            if why:
                skipped.append(Skipped(str(path), why))
                continue
            records.append(Record(path, data))
    return _dedupe(records, skipped)


def _strip_prefix(msg: str, path: Path) -> str:
    """bench.io messages read `record: <path> <reason>`; keep the reason (the summary names the file)."""
    prefix = f"record: {path} "
    return msg[len(prefix):] if msg.startswith(prefix) else msg


def setting_key(setting: dict) -> tuple:
    return tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in setting.items()))


def _dedupe(records: list[Record], skipped: list[Skipped]) -> tuple[list[Record], list[Skipped]]:
    by_id: dict[tuple, Record] = {}
    for r in records:
        if r.kind == "run":
            key = ("run", r.method, setting_key(r.setting), r.seed)
        else:
            key = ("reference", r.method, setting_key(r.setting), r.run_id)
        prev = by_id.get(key)
        if prev is None:
            by_id[key] = r
            continue
        # keep the later run_id (run ids end in a timestamp), then the later path: deterministic
        keep, drop = (r, prev) if (r.run_id, str(r.path)) > (prev.run_id, str(prev.path)) else (prev, r)
        by_id[key] = keep
        what = f"seed {r.seed}" if r.kind == "run" else f"run_id {r.run_id}"
        skipped.append(Skipped(str(drop.path), f"duplicate of {keep.path.name} (same method, setting and {what}); "
                                               f"kept run_id {keep.run_id}"))
    kept = sorted(by_id.values(), key=lambda r: (str(r.path)))
    skipped.sort(key=lambda s: (s.file, s.reason))
    return kept, skipped
