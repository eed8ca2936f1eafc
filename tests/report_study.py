"""A small real study for the report tests: schema-2 records written by real tiny runs (`bench ablate`, in one
process) and real base-model evaluations (`bench eval --model`): the methods, the engine's reference rows
(centralized, local-only) and per-client held-out splits (client_test_fraction).

    python -m tests.report_study /tmp/study      # builds <dir>/results
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

METHODS = "fedit,flexlora"          # fedit: factor averaging (noise); flexlora: SVD redistribution (truncation loss)
SEEDS = "0,1"
COMMON = ["--set", "eval_tasks=piqa", "--set", "eval_limit=10", "--set", "local_steps=1", "--set", "client_test_fraction=0.25"]


def _ablate(root: Path, data_root: Path, *args: str, grid: str = "fp32") -> None:
    """One `bench ablate` grid; each grid has its own folders (the cell names do not say the eval dtype)."""
    from bench.cli import main

    argv = ["ablate", "--preset", "tiny", *args, "--set", f"data_root={data_root}", *COMMON,
            "--results-dir", str(root / "cells" / grid), "--runs-dir", str(root / "runs" / grid)]
    code = main(argv)
    assert code == 0, f"bench {' '.join(argv)} exited {code}"


def base_reference(root: Path, data_root: Path, seed: int) -> Path:
    """`bench eval --model tiny-random-llama` (real scoring, a kind "reference" record)."""
    from bench.cli import main

    out = root / "base" / f"s{seed}"
    code = main(["eval", "--model", "tiny-random-llama", "--tasks", "piqa", "--limit", "10", "--seed", str(seed),
                 "--data-root", str(data_root), "--results-dir", str(out / "results"), "--output-dir", str(out / "run")])
    assert code == 0
    (path,) = (out / "results").glob("*.json")
    return path


def build_study(root: Path, data_root: Path) -> Path:
    """<root>/results: fedit and flexlora at ranks 4,4,4 and 4,2,2 (seeds 0, 1; Dirichlet α=1 as the tiny preset),
    the centralized and local-only references at ranks 4,2,2 (seeds 0, 1), fedit at iid (ranks 4,2,2, seed 0),
    fedit at ranks 4,2,2, seed 0, scored in bfloat16, and the base model (seeds 0, 1). Every run is scored on piqa
    (10 documents) and has a quarter of each client's shard as that client's own held-out split."""
    root.mkdir(parents=True, exist_ok=True)
    _ablate(root, data_root, "--methods", METHODS, "--ranks-grid", "4,4,4;4,2,2", "--seeds", SEEDS)
    _ablate(root, data_root, "--methods", "fedit", "--references", "centralized,local-only", "--ranks-grid", "4,2,2",
            "--seeds", SEEDS)
    _ablate(root, data_root, "--methods", "fedit", "--ranks-grid", "4,2,2", "--partitions", "iid", "--seeds", "0")
    _ablate(root, data_root, "--methods", "fedit", "--ranks-grid", "4,2,2", "--seeds", "0",
            "--set", "eval_dtype=bfloat16", grid="bf16")
    results = root / "results"
    results.mkdir(exist_ok=True)
    for grid, suffix in (("fp32", ""), ("bf16", "-bf16")):
        for p in sorted((root / "cells" / grid).glob("*.json")):
            shutil.copy(p, results / f"{p.stem}{suffix}.json")
    for seed in (0, 1):
        path = base_reference(root, data_root, seed)
        shutil.copy(path, results / path.name)
    return results


if __name__ == "__main__":
    import os

    sys.exit(print(build_study(Path(sys.argv[1]), Path(os.environ.get("BENCH_DATA_ROOT", "../shared/data")))))
