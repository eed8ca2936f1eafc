"""The one builder of results records (federated runs and base-model evaluations alike). Schema: ARCHITECTURE.md.

A setting is structured data (ranks a list, the partition its parameters): reports group and plot by
its fields and never parse strings.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
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


def build_record(*, kind: str, run_id: str, method: str, setting: dict, seed: int, config: dict, config_hash: str,
                 provenance: dict, dtypes: dict, timings: dict, run_dir: str, engine: str | None = None,
                 clients: list | None = None, rounds: list | None = None, test: dict | None = None,
                 eval: dict | None = None, method_info: dict | None = None) -> dict:
    rounds = rounds or []
    return {
        "schema_version": RECORD_SCHEMA_VERSION, "kind": kind, "status": "complete", "run_id": run_id,
        "method": method, "method_info": method_info or {}, "engine": engine, "setting": setting, "seed": seed,
        "config": config, "config_hash": config_hash, "provenance": provenance, "dtypes": dtypes,
        "clients": clients or [], "rounds": rounds,
        "communication": {"bytes_up": sum(c.get("bytes_up", 0) for r in rounds for c in r["clients"]),
                          "bytes_down": sum(c.get("bytes_down", 0) for r in rounds for c in r["clients"])},
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "test_loss": (test or {}).get("loss"), "test": test, "eval": eval, "run_dir": run_dir,
    }
