"""Atomic file writes: a reader (or a crash) never sees half a file.

Write to a temporary name in the same folder, flush + fsync, then os.replace (atomic on POSIX), then
fsync the folder so the rename itself survives a power loss.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

RECORD_SCHEMA_VERSION = 2


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def atomic_replace_dir(tmp_dir: str | os.PathLike, final_dir: str | os.PathLike, between=None) -> None:
    """Swap a fully written folder into place: the old one is removed only after the new one is there.

    A crash between the two renames leaves `<final>.old` as the only complete copy; it is kept (not
    deleted by the next swap) until a new folder is in place. `between` is a test hook called there."""
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    old = final_dir.with_name(final_dir.name + ".old")
    if final_dir.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
    if between is not None:
        between()
    os.replace(tmp_dir, final_dir)
    _fsync_dir(final_dir.parent)
    shutil.rmtree(old, ignore_errors=True)


def read_record(path: str | os.PathLike) -> dict:
    """Load a results record; refuse one written by a newer schema."""
    from . import BenchError

    path = Path(path)
    try:
        rec = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BenchError(f"record: {path} is not valid JSON (line {exc.lineno}); delete it or re-run its job") from None
    version = rec.get("schema_version") if isinstance(rec, dict) else None
    if not isinstance(version, int):
        raise BenchError(f"record: {path} has no integer schema_version; it is not a fedlora-bench results record")
    if version > RECORD_SCHEMA_VERSION:
        raise BenchError(f"record: {path} has schema_version {version}, newer than this fedlora-bench reads "
                         f"({RECORD_SCHEMA_VERSION}); upgrade fedlora-bench")
    return rec
