"""Checkpoints: the server's state (and, in-process, the clients' own state) after a complete round,
written to a temporary folder, fsynced, and swapped into place atomically. A crash at any point leaves
either the previous checkpoint or the new one, never a mix."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from methods import GlobalState

from . import BenchError
from .io import atomic_replace_dir, atomic_write_json
from .messages import factor_groups, factors_to_tensors, tensors_to_factors
from .models import file_sha256
from .server import ServerState

CHECKPOINT_VERSION = 2


def server_tensors(s: ServerState) -> dict[str, torch.Tensor]:
    tensors = {k: t.contiguous() for k, t in factors_to_tensors(s.state.adapter, "adapter").items()}
    for key, t in s.state.extra.items():
        tensors[f"extra/{key}"] = t.contiguous()
    for rnd, merge in s.merges.items():
        tensors.update({k: t.contiguous() for k, t in factors_to_tensors(merge, f"merge/{rnd}").items()})
    return tensors


def server_state_of(tensors: dict[str, torch.Tensor], meta: dict) -> ServerState:
    unknown = [k for k in tensors if k.split("/", 1)[0] not in ("adapter", "extra", "merge")]
    if unknown:
        raise ValueError(unknown[0])
    extra = {k[len("extra/"):]: t for k, t in tensors.items() if k.startswith("extra/")}
    state = GlobalState(tensors_to_factors(tensors, "adapter"), meta["round"], extra)
    merges = {int(r): f for r, f in factor_groups(tensors, "merge").items()}
    return ServerState(state, dict(sorted(merges.items())),
                       {int(k): v for k, v in meta["ranks"].items()}, {int(k): v for k, v in meta["synced"].items()})


def write_state(folder: Path, s: ServerState, meta: dict, clients=None, events=None) -> None:
    """Write the server state (and the clients' state: (tensors, meta)) into `folder` (which must be new).
    events: told point "round<r>:checkpoint-write" once the tensors are written, before meta.json."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    files = {"server.safetensors": server_tensors(s)}
    if clients is not None:
        files["clients.safetensors"] = clients[0]
    for fname, tensors in files.items():
        save_file(tensors, str(folder / fname))
        with open(folder / fname, "rb") as f:
            os.fsync(f.fileno())
    if events is not None:
        events.point(f"round{s.state.round}:checkpoint-write")
    atomic_write_json(folder / "meta.json", {
        **meta, "round": s.state.round, "checkpoint_version": CHECKPOINT_VERSION,
        "ranks": {str(k): v for k, v in s.ranks.items()}, "synced": {str(k): v for k, v in s.synced.items()},
        "clients_meta": clients[1] if clients is not None else None,
        "sha256": {f: file_sha256(folder / f) for f in files}})


def save_checkpoint(run_dir: Path, s: ServerState, meta: dict, clients=None, events=None) -> None:
    """events (bench/observers.py): told the points "round<r>:checkpoint-write" and "round<r>:checkpoint-swap"."""
    tmp = run_dir / f".checkpoint.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    write_state(tmp, s, meta, clients, events)
    swap = None if events is None else (lambda: events.point(f"round{s.state.round}:checkpoint-swap"))
    atomic_replace_dir(tmp, run_dir / "checkpoint", between=swap)


def checkpoint_dir(run_dir: Path) -> Path | None:
    """The folder holding the last complete checkpoint, or None (no round finished yet).

    `checkpoint/` only ever appears by renaming a complete folder. A crash between moving the old one
    aside and renaming the new one in leaves `checkpoint.old/` as the last complete round."""
    for name in ("checkpoint", "checkpoint.old"):
        if (run_dir / name).is_dir():
            return run_dir / name
    return None


def read_state(folder: Path) -> tuple[ServerState, dict, tuple | None]:
    """(server state, meta, clients' (tensors, meta) or None) from a folder write_state wrote; BenchError if not."""
    from safetensors.torch import load_file

    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise BenchError(f"resume: {folder} has no complete checkpoint ({meta_path} missing); start the run again without --resume")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BenchError(f"resume: {meta_path} is corrupt (not JSON); delete {folder} and start again without --resume") from None
    if not isinstance(meta, dict) or meta.get("checkpoint_version") != CHECKPOINT_VERSION or not isinstance(meta.get("round"), int):
        raise BenchError(f"resume: {meta_path} is not a fedlora-bench v{CHECKPOINT_VERSION} checkpoint; start again without --resume")
    loaded = {}
    for fname, digest in (meta.get("sha256") or {}).items():
        path = folder / fname
        if not path.is_file() or file_sha256(path) != digest:
            raise BenchError(f"resume: {path} is missing or corrupt (checksum mismatch); delete {folder} and start again")
        try:
            loaded[fname] = load_file(str(path))
        except Exception:
            raise BenchError(f"resume: {path} does not hold fedlora-bench checkpoint tensors; delete {folder} and start again") from None
    if "server.safetensors" not in loaded:
        raise BenchError(f"resume: {folder} has no server state; delete it and start again")
    try:
        s = server_state_of(loaded["server.safetensors"], meta)
    except Exception:
        raise BenchError(f"resume: {folder}/server.safetensors does not hold fedlora-bench checkpoint tensors; delete {folder} and start again") from None
    clients = (loaded["clients.safetensors"], meta["clients_meta"]) if "clients.safetensors" in loaded else None
    return s, meta, clients


def load_checkpoint(run_dir: Path, config_hash: str, method: str) -> tuple[ServerState, dict, tuple | None]:
    ck = checkpoint_dir(run_dir) or run_dir / "checkpoint"
    s, meta, clients = read_state(ck)
    if meta.get("config_hash") != config_hash or meta.get("method") != method:
        raise BenchError(f"resume: the checkpoint in {ck} belongs to another run (method or config differs); "
                         "resume it with its own config.yaml, or start a new run")
    return s, meta, clients
