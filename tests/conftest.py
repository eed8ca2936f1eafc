import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    env = os.environ.get("BENCH_DATA_ROOT")
    return Path(env) if env else REPO.parent / "shared" / "data"


def require_data_root() -> Path:
    """The real data root, or a failure (never a skip: CI has ../shared, a missing one is a broken setup)."""
    root = data_root()
    if not (root / "dolly_fedit_10clients").is_dir() or not (root / "commonsense").is_dir():
        pytest.fail(f"the real data root is missing at {root}; set BENCH_DATA_ROOT (CI sets it to ../shared/data)")
    return root


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return require_data_root()


@pytest.fixture
def offline_data_env(monkeypatch, shared_data):
    """The real data root through BENCH_DATA_ROOT, and the hub off (as on every machine here)."""
    monkeypatch.setenv("BENCH_DATA_ROOT", str(shared_data))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return shared_data
