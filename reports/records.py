"""Load results records for reporting: only complete, valid records of the current schema count (bench/record.py).

Every file that cannot be used is returned as a `Skipped(file, reason)` — never an exception — so one bad
record never takes the report down. A setting is structured data (ranks a list, the partition a dict):
nothing here or downstream parses a setting out of a string.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from bench import BenchError
from bench.io import read_record
from bench.record import REFERENCE_RUNS, is_int, problem

# Setting keys in the order the leaderboard shows them; any other key follows, sorted by name.
SETTING_ORDER = ("model", "dataset", "partition", "ranks", "rank_distribution", "num_clients", "rounds",
                 "client_fraction", "preset")
# The dtypes a score depends on: rows never pool records scored in different precisions (docs/evaluation.md:
# bf16 changes 21 of 100 MMLU answers). export: the global model's weights, which the held-out losses score.
DTYPE_FIELDS = ("export", "eval")


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
    cache: dict = field(default_factory=dict, repr=False)   # per-example data read once (reports.metrics)
    eval_dtype_join: str | None = field(default=None, repr=False)  # set by _join_unscored

    @property
    def kind(self) -> str:
        return self.data["kind"]

    @property
    def method(self) -> str:
        return self.data["method"]

    @property
    def setting(self) -> dict:
        """The record's setting as rows group it. Under a sampled rank distribution (uniform, heavy-tail-...) each
        seed draws its own ranks (the same for every method at that seed), so the row is the distribution and its
        seeds pool: the draw is left out here (`drawn_ranks` has it) and pairing by seed stays exact."""
        s = self.data["setting"]
        return {**s, "ranks": None} if sampled_ranks(s) else s

    @property
    def drawn_ranks(self) -> list | None:
        return self.data["setting"].get("ranks")

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
    def dtypes(self) -> dict:
        """The export and eval dtypes (None where the record has no such step)."""
        d = self.data.get("dtypes") or {}
        out = {k: d.get(k) for k in DTYPE_FIELDS}
        if out["eval"] is None and self.tasks:
            out["eval"] = (self.data.get("eval") or {}).get("dtype")
        if out["eval"] is None and self.eval_dtype_join is not None:
            out["eval"] = self.eval_dtype_join
        return out

    @property
    def lr(self) -> float | None:
        """The learning rate of a row that trains (None for the base model and for scored-only records)."""
        cfg = self.data.get("config") or {}
        if self.kind != "run" or self.method == "base" or not isinstance(cfg.get("lr"), (int, float)):
            return None
        return float(cfg["lr"])

    @property
    def seed_free(self) -> bool:
        """The base model as a run row: it trains nothing, decodes greedily and scores the held-out and evaluation
        subsets that every seed shares (test_limit and eval_limit draw them with fixed streams), so one record
        serves every seed. Only where its record says the held-out split is not drawn with the seed."""
        return self.kind == "run" and self.method == "base" and (self.data.get("test") or {}).get("split_by_seed") is False

    @property
    def lr_tuning(self) -> dict | None:
        """How the lr was chosen (bench ablate --tuned-lr), or None when it was given."""
        t = (self.data.get("config") or {}).get("lr_tuning")
        return t if isinstance(t, dict) else None

    @property
    def is_reference(self) -> bool:
        return (self.kind == "reference" or self.method in REFERENCE_RUNS
                or bool((self.data.get("method_info") or {}).get("reference")))

    def trait(self, name: str) -> bool | None:
        """A method trait (averages_factors, merges_into_base, personalized): the record's method_info, else the
        registry's class attribute for a registered method, else None."""
        info = self.data.get("method_info") or {}
        if isinstance(info.get(name), bool):
            return info[name]
        from methods import METHODS

        cls = METHODS.get(self.method)
        return getattr(cls, name, None) if cls is not None else None


def load_records(results_dirs: list[str]) -> tuple[list[Record], list[Skipped]]:
    """Read every `*.json` directly inside each results folder (sorted; dotfiles ignored).

    Duplicates (the same file through two folders; or the same method, setting, dtypes and seed twice) keep one
    record, deterministically, and report the other as skipped.
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
            why = problem(data)
            if why:
                skipped.append(Skipped(str(path), why))
                continue
            records.append(Record(path, data))
    _join_unscored(records)
    return _dedupe(records, skipped)


def _strip_prefix(msg: str, path: Path) -> str:
    """bench.io messages read `record: <path> <reason>`; keep the reason (the summary names the file)."""
    prefix = f"record: {path} "
    return msg[len(prefix):] if msg.startswith(prefix) else msg


def sampled_ranks(setting: dict) -> bool:
    """Ranks drawn per seed from a distribution (not a fixed list, not homogeneous)."""
    return setting.get("rank_distribution") not in (None, "explicit", "homo")


def setting_key(setting: dict) -> tuple:
    return tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in setting.items()))


def group_key(rec: Record) -> tuple:
    """What makes records rows of their own: kind, method, setting, the learning rate (a tuning grid's cells of one
    method are rows of their own; rows of one setting at different lrs still compare) and the scoring dtypes."""
    return (rec.kind, rec.method, setting_key(rec.setting), rec.lr, tuple(sorted(rec.dtypes.items())))


def _join_unscored(records: list[Record]) -> None:
    """A record never scored on a task (no eval step, so no eval dtype) joins the row of the records of its kind,
    method, setting and export dtype that were scored, when they share one eval dtype: its losses are seeds of the
    same row (a study scores a few seeds on tasks and all of them on held-out loss), and the task columns average
    the scored seeds only (their n says so). Where nothing of its setting was scored it takes the one eval dtype of
    the whole report, if there is one, so that its rows share tables and plots with the scored settings; with
    several eval dtypes around it stays apart."""
    def key(r: Record) -> tuple:
        return r.kind, r.method, setting_key(r.setting), r.dtypes["export"]

    scored: dict[tuple, set] = {}
    anywhere: dict = {}
    for r in records:
        if r.dtypes["eval"] is not None:
            scored.setdefault(key(r), set()).add(r.dtypes["eval"])
            anywhere.setdefault(r.dtypes["export"], set()).add(r.dtypes["eval"])
    for r in records:
        if r.dtypes["eval"] is not None:
            continue
        here = scored.get(key(r)) or anywhere.get(r.dtypes["export"], set())
        if len(here) == 1:
            r.eval_dtype_join = next(iter(here))


def _preference(r: Record) -> tuple:
    """Of two records of one seed: the one scored on tasks, then the later run_id (run ids end in a timestamp), then
    the later path — deterministic."""
    return bool(r.tasks), r.run_id, str(r.path)


def _dedupe(records: list[Record], skipped: list[Skipped]) -> tuple[list[Record], list[Skipped]]:
    by_id: dict[tuple, Record] = {}
    for r in records:
        key = (*group_key(r), r.seed if is_int(r.seed) else r.run_id)
        prev = by_id.get(key)
        if prev is None:
            by_id[key] = r
            continue
        keep, drop = (r, prev) if _preference(r) > _preference(prev) else (prev, r)
        by_id[key] = keep
        what = f"seed {r.seed}" if is_int(r.seed) else f"run_id {r.run_id}"
        skipped.append(Skipped(str(drop.path), f"duplicate of {keep.path.name} (same method, setting, lr, dtypes and "
                                               f"{what}); kept run_id {keep.run_id}"))
    kept = sorted(by_id.values(), key=lambda r: (str(r.path)))
    skipped.sort(key=lambda s: (s.file, s.reason))
    return kept, skipped
