"""The git state a record is stamped with: the checkout's commit, or "unknown" and None where git cannot say
(never a clean-looking False for a tree nobody inspected)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from bench import provenance


def test_git_state_of_this_checkout_matches_git():
    repo = Path(provenance.__file__).resolve().parents[1]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True)
    if head.returncode != 0:  # an sdist or a copy without .git
        assert provenance._git_state() == {"git_commit": "unknown", "git_dirty": None}
        return
    state = provenance._git_state()
    assert state["git_commit"] == head.stdout.strip()
    porcelain = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True).stdout
    assert state["git_dirty"] is bool(porcelain.strip())


def test_git_state_outside_a_repository_is_unknown_not_clean(tmp_path, monkeypatch):
    copy = tmp_path / "bench"
    copy.mkdir()
    shutil.copy(provenance.__file__, copy / "provenance.py")
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    monkeypatch.setattr(provenance, "__file__", str(copy / "provenance.py"))
    assert provenance._git_state() == {"git_commit": "unknown", "git_dirty": None}
