"""The results record: its schema (SCHEMA), its one builder (build_record, and `updated` for a section added
later) and its validator (`problem`, which reports use). ARCHITECTURE.md's example is tested against SCHEMA.

A setting is structured data (ranks a list, the partition its parameters): reports group and plot by
its fields and never parse strings.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
from dataclasses import dataclass
from typing import Any

from .io import RECORD_SCHEMA_VERSION
from .provenance import CODE, packages


def load_avg() -> float | None:
    """The 1-minute load average: wall times taken on a busy machine are not comparable, so records say."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def provenance(*, model_id: str, model_path: str, data: dict[str, str], data_origin: str | None, device: str,
               load_start: float | None, model_hash: str | None = ...) -> dict:
    """model_hash: computed from model_path unless given (None for a model behind a server, whose weights this
    process cannot read; base + adapter hashes for an unmerged adapter)."""
    import torch

    from .models import weights_hash

    return {"packages": packages(), **CODE, "python": platform.python_version(), "platform": platform.platform(),
            "device": device, "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "load_avg_1m_start": load_start, "load_avg_1m_end": load_avg(),
            "model_id": model_id, "model_path": model_path, "model_hash": weights_hash(model_path) if model_hash is ... else model_hash,
            "data": data, "data_origin": data_origin}


def partition_of(cfg) -> dict:
    part: dict[str, Any] = {"kind": cfg.partition}
    if cfg.partition == "dirichlet":
        part["alpha"] = cfg.dirichlet_alpha
    elif cfg.partition == "shards":
        part["per_client"] = cfg.shards_per_client
    return part


def run_setting(cfg, ranks: list[int], model_id: str) -> dict:
    from .privacy import setting as privacy_setting

    setting = {"model": model_id, "dataset": cfg.dataset, "partition": partition_of(cfg), "ranks": list(ranks),
               "rank_distribution": "explicit" if cfg.ranks else cfg.rank_distribution, "num_clients": cfg.num_clients,
               "client_fraction": cfg.client_fraction, "rounds": cfg.rounds, "preset": cfg.preset}
    dp = privacy_setting(cfg)  # only under DP: a DP run is a row of its own, and earlier records keep their keys
    return {**setting, "dp": dp} if dp else setting


def reference_setting(model_id: str) -> dict:
    return {"model": model_id, "dataset": None, "partition": None, "ranks": None, "rank_distribution": None,
            "num_clients": None, "client_fraction": None, "rounds": 0, "preset": None}


def config_hash(config: dict, leave_out=()) -> str:
    return hashlib.sha256(json.dumps({k: v for k, v in config.items() if k not in leave_out}, sort_keys=True,
                                     default=str).encode()).hexdigest()


# ---- the schema ---------------------------------------------------------------------------------------------
RUN, REFERENCE = "run", "reference"   # bench run (reference rows included) | bench eval --model
KINDS = (RUN, REFERENCE)


@dataclass(frozen=True)
class Section:
    """One top-level field of a record, in the order records hold them."""
    name: str
    type: str                        # its JSON type: object | list | string | integer | number
    required: tuple[str, ...] = ()   # the kinds whose records must have it (not null; a string or object not empty)
    optional: bool = False           # written only when the run has it (else always, null when absent)
    what: str = ""                   # said after "missing required field '<name>'"


SCHEMA: tuple[Section, ...] = (
    Section("schema_version", "integer", KINDS),
    Section("kind", "string", KINDS),
    Section("status", "string"),
    Section("run_id", "string", (RUN,)),
    Section("method", "string", KINDS),
    Section("method_info", "object"),
    Section("engine", "string"),
    Section("setting", "object", KINDS, what=" (a non-empty object)"),
    Section("seed", "integer", (RUN,), what=" (an integer)"),
    Section("config", "object"),
    Section("config_hash", "string"),
    Section("provenance", "object"),
    Section("dtypes", "object"),
    Section("clients", "list"),
    Section("rounds", "list", (RUN,), what=" (a list)"),
    Section("communication", "object", (RUN,)),
    Section("timings", "object", (RUN,)),
    Section("test_loss", "number"),
    Section("test", "object"),
    Section("eval", "object"),
    Section("run_dir", "string"),
    Section("personalized", "object", optional=True),   # personalized methods and local-only: each client's own model
    Section("privacy", "object", optional=True),        # DP runs: the spent ε
    Section("eval_clients", "object", optional=True),   # bench eval --run --adapter clients
)
SECTIONS = {s.name: s for s in SCHEMA}
# Runs that are references rather than aggregation methods (kind "run", the federated setting's fields). A record
# may also say so itself with method_info.reference.
REFERENCE_RUNS = ("base", "centralized", "local-only")
PARTIAL_STATUSES = {"partial", "running", "failed", "interrupted", "incomplete"}   # besides "complete"


def _in_schema_order(sections: dict) -> dict:
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise ValueError(f"record: {', '.join(unknown)} not in the schema (bench/record.py SCHEMA)")
    return {s.name: sections[s.name] for s in SCHEMA
            if s.name in sections and not (s.optional and sections[s.name] is None)}


def build_record(*, kind: str, run_id: str, method: str, setting: dict, seed: int, config: dict, config_hash: str,
                 provenance: dict, dtypes: dict, timings: dict, run_dir: str, engine: str | None = None,
                 clients: list | None = None, rounds: list | None = None, test: dict | None = None,
                 eval: dict | None = None, method_info: dict | None = None, personalized: dict | None = None,
                 privacy: dict | None = None) -> dict:
    rounds = rounds or []
    return _in_schema_order({
        "schema_version": RECORD_SCHEMA_VERSION, "kind": kind, "status": "complete", "run_id": run_id,
        "method": method, "method_info": method_info or {}, "engine": engine, "setting": setting, "seed": seed,
        "config": config, "config_hash": config_hash, "provenance": provenance, "dtypes": dtypes,
        "clients": clients or [], "rounds": rounds,
        "communication": {"bytes_up": sum(c.get("bytes_up", 0) for r in rounds for c in r["clients"]),
                          "bytes_down": sum(c.get("bytes_down", 0) for r in rounds for c in r["clients"])},
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "test_loss": (test or {}).get("loss"), "test": test, "eval": eval, "run_dir": run_dir,
        "personalized": personalized, "privacy": privacy,
    })


def updated(record: dict, **sections) -> dict:
    """A new record: `record` with these top-level sections replaced (in place in the order) or added (each one
    of the schema's); the record passed in is left as it was."""
    _in_schema_order(sections)
    return {**record, **sections}


# ---- the validator --------------------------------------------------------------------------------------------
def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


_TYPES = {"object": (lambda v: isinstance(v, dict), "an object"), "list": (lambda v: isinstance(v, list), "a list"),
          "string": (lambda v: isinstance(v, str), "a string"), "integer": (is_int, "an integer"),
          "number": (is_number, "a number or null")}


def _section_problem(rec: dict, kind: str) -> str | None:
    """The schema's own checks: each section of its type, the required ones present (and not empty)."""
    for s in SCHEMA:
        value = rec.get(s.name)
        has_type, article = _TYPES[s.type]
        if kind in s.required and (value is None or not has_type(value) or (s.type in ("string", "object") and not value)):
            return f"missing required field '{s.name}'{s.what}"
        if value is not None and not has_type(value):
            return f"field '{s.name}' must be {article}"
    return None


def _losses_problem(obj, where: str) -> str | None:
    """Per-example held-out losses: {"loss", "loss_sums": [...], "tokens": [...]} (loss_sums/tokens optional)."""
    if not isinstance(obj, dict):
        return f"field '{where}' must be an object"
    if obj.get("loss") is not None and not is_number(obj["loss"]):
        return f"field '{where}.loss' must be a number or null"
    sums, tokens = obj.get("loss_sums"), obj.get("tokens")
    if sums is None and tokens is None:
        return None
    if not isinstance(sums, list) or not isinstance(tokens, list) or len(sums) != len(tokens):
        return f"fields '{where}.loss_sums' and '{where}.tokens' must be lists of the same length"
    if not all(is_number(s) for s in sums) or not all(is_int(t) and t >= 0 for t in tokens):
        return f"field '{where}.loss_sums' must hold finite numbers and '{where}.tokens' counts ≥ 0"
    return None


def _per_client_problem(obj, where: str) -> str | None:
    if obj is None:
        return None
    if not isinstance(obj, list):
        return f"field '{where}' must be a list"
    seen = set()
    for i, c in enumerate(obj):
        if not isinstance(c, dict) or not is_int(c.get("client")):
            return f"field '{where}[{i}].client' missing or not an integer"
        if c["client"] in seen:
            return f"field '{where}' lists client {c['client']} twice"
        seen.add(c["client"])
        why = _losses_problem(c, f"{where}[{i}]")
        if why:
            return why
    return None


def _setting_problem(rec: dict, setting: dict, kind: str) -> str | None:
    if not isinstance(setting.get("model"), str):
        return "missing required field 'setting.model'"
    for k, v in setting.items():
        if k == "ranks" and v is not None:
            if not isinstance(v, list) or not v or not all(is_int(r) and r > 0 for r in v):
                return "field 'setting.ranks' must be a list of positive integers"
        elif k == "partition" and v is not None:
            if not isinstance(v, dict) or not isinstance(v.get("kind"), str):
                return "field 'setting.partition' must be an object with a string 'kind'"
        elif k == "dp" and v is not None:  # a DP run (bench/privacy.py): its spent ε is in the privacy section
            if not isinstance(v, dict) or v.get("kind") != "dp-sgd" or not is_number(v.get("delta")):
                return "field 'setting.dp' must be an object with kind 'dp-sgd' and a number 'delta'"
            if not is_number((rec.get("privacy") or {}).get("epsilon_max")):
                return "missing required field 'privacy.epsilon_max' (a DP run records its spent ε)"
        elif isinstance(v, (dict, list)):
            return f"field 'setting.{k}' must be a scalar, not {type(v).__name__}"
    if kind == RUN and (setting.get("ranks") is None or setting.get("partition") is None):
        return "missing required field 'setting.ranks' / 'setting.partition' (a run record has both)"
    return None


def problem(rec) -> str | None:
    """Why `rec` is not a complete, valid record of this schema version (one line), or None when it is."""
    if not isinstance(rec, dict):
        return "not a JSON object"
    version = rec.get("schema_version")
    if version != RECORD_SCHEMA_VERSION:
        return (f"schema_version {version} (settings as strings, no per-example losses) is no longer read; "
                f"re-run it with the current code (bench run / bench ablate / bench eval --model) to write "
                f"schema_version {RECORD_SCHEMA_VERSION}")
    kind = rec.get("kind")
    if kind not in KINDS:
        return f"field 'kind' is {kind!r}; expected 'run' or 'reference'"
    status = rec.get("status")
    if isinstance(status, str) and status.lower() in PARTIAL_STATUSES:
        return f"partial record (status {status!r})"
    if rec.get("complete") is False:
        return "partial record (complete: false)"
    why = _section_problem(rec, kind) or _setting_problem(rec, rec["setting"], kind)
    if why:
        return why
    tasks = (rec.get("eval") or {}).get("tasks") or {}
    if not isinstance(tasks, dict):
        return "field 'eval.tasks' must be an object"
    for name, t in tasks.items():
        if not isinstance(t, dict) or not is_number(t.get("value")):
            return f"missing required field 'eval.tasks.{name}.value' (a finite number)"
        if t.get("stderr") is not None and not is_number(t.get("stderr")):
            return f"field 'eval.tasks.{name}.stderr' must be a number or null"
    test = rec.get("test")
    if test is not None:
        why = _losses_problem(test, "test") or _per_client_problem(test.get("per_client"), "test.per_client")
        if why:
            return why
    pers = rec.get("personalized")
    if pers is not None:
        why = _per_client_problem(pers.get("per_client"), "personalized.per_client")
        if why:
            return why
        if pers.get("loss") is not None and not is_number(pers["loss"]):
            return "field 'personalized.loss' must be a number or null"
    has_loss = (test or {}).get("loss") is not None or (pers or {}).get("per_client")
    if kind == REFERENCE:
        if not tasks and not has_loss:
            return "partial record: a reference record with no eval.tasks and no held-out loss"
        return None
    comm, timings, rounds = rec["communication"], rec["timings"], rec["rounds"]
    if not is_number(comm.get("bytes_up")) or not is_number(comm.get("bytes_down")):
        return "missing required field 'communication.bytes_up'/'communication.bytes_down'"
    if not is_number(timings.get("total_s")):
        return "missing required field 'timings.total_s'"
    for i, r in enumerate(rounds):
        if not isinstance(r, dict) or not is_int(r.get("round")):
            return f"field 'rounds[{i}].round' missing or not an integer"
        if r.get("noise") is not None and not is_number(r.get("noise")):
            return f"field 'rounds[{i}].noise' must be a number or null"
        if not isinstance(r.get("clients", []), list) or any(not isinstance(c, dict) for c in r.get("clients", [])):
            return f"field 'rounds[{i}].clients' must be a list of objects"
    expected = rec["setting"].get("rounds")
    # a reference row trains differently from the setting it serves (base: 0 rounds, centralized: 1)
    reference = bool((rec.get("method_info") or {}).get("reference")) or rec.get("method") in REFERENCE_RUNS
    if is_int(expected) and len(rounds) < expected and not reference:
        return f"partial record: {len(rounds)} of {expected} rounds"
    if any(not isinstance(c, dict) for c in rec.get("clients") or []):
        return "field 'clients' must be a list of objects"
    return None
