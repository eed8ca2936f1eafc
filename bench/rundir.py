"""Where a run's folder goes: its default name, and the checks made before anything is written there."""
from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path

from . import BenchError
from .config import RunConfig


def default_run_id(cfg: RunConfig) -> str:
    """runs/<this> when no --output-dir is given: row, preset, seed and the UTC start time."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    return f"{cfg.reference or cfg.method}-{cfg.preset or 'custom'}-s{cfg.seed}-{stamp}"


def check_output_paths(cfg: RunConfig, run_dir: Path, resume: str | None) -> None:
    """Refuse output locations that would fail only at the end of the run."""
    for what, path in (("output_dir", run_dir), ("results_dir", Path(cfg.results_dir))):
        if path.exists() and not path.is_dir():
            raise BenchError(f"{what}: {path} exists and is not a folder; pass a folder path")
        probe = path
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if probe.exists() and not probe.is_dir():
            raise BenchError(f"{what}: {probe} (a parent of {path}) is a file, not a folder; pass a folder path")
        if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
            raise BenchError(f"{what}: {probe} is not writable; pass a folder you can write to")
    if not resume and ((run_dir / "checkpoint").exists() or (run_dir / "checkpoint.old").exists()):
        raise BenchError(f"output_dir: {run_dir} already holds a run; use --resume {run_dir} or another --output-dir")
