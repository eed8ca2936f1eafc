"""`bench ablate`: a resumable grid of methods × rank setting × data heterogeneity × seeds.

Each cell is an ordinary `bench run` with a deterministic run directory. A cell whose results record
exists (same config hash and seed) is never run twice; a cell killed mid-run resumes from its last
checkpoint. Every cell's config is built and validated before the first one starts. Several `bench ablate`
processes may share one grid (one per seed, as benchmarks/study.sh runs them): a cell is run by whichever
process holds its lock (`<runs dir>/.<cell>.lock`, released by the OS when that process ends, however it ends),
so no two processes ever train, resume or delete the same run directory.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import BenchError
from .config import RANK_DISTRIBUTIONS, build_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=None, help="base preset (default quick unless --config)")
    p.add_argument("--config", help="base YAML config")
    p.add_argument("--methods", default=None, help="comma-separated methods (default: every registered method)")
    p.add_argument("--ranks-grid", default="homo",
                   help="';'-separated rank settings: homo | uniform | heavy-tail-light | heavy-tail-strong | normal | "
                        "an explicit list like 16,8,4,4")
    p.add_argument("--partitions", default=None,
                   help="';'-separated data settings: iid | dirichlet:<alpha> | shards:<k> | predefined (default: the preset's)")
    p.add_argument("--references", default="",
                   help="comma-separated reference rows run in every setting beside the methods: base, centralized, local-only")
    p.add_argument("--seeds", default="0")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config key for every cell")
    p.add_argument("--results-dir", default="results")
    p.add_argument("--runs-dir", default="runs/ablate")
    p.add_argument("--dry-run", action="store_true", help="list the cells and which are done, run nothing")


def _rank_overrides(spec: str) -> tuple[str, dict]:
    spec = spec.strip()
    if spec in RANK_DISTRIBUTIONS and spec != "explicit":
        return spec, {"rank_distribution": spec, "ranks": None}
    try:
        ranks = [int(x) for x in spec.split(",") if x]
    except ValueError:
        raise BenchError(f"ranks-grid: {spec!r} is neither a distribution ({', '.join(RANK_DISTRIBUTIONS[:-1])}) "
                         "nor a comma-separated rank list; fix the entry") from None
    return "r" + "-".join(map(str, ranks)), {"rank_distribution": "explicit", "ranks": ranks, "num_clients": len(ranks)}


def _partition_overrides(spec: str) -> tuple[str, dict]:
    kind, _, arg = spec.strip().partition(":")
    try:
        if kind == "dirichlet":
            return f"dir{float(arg):g}", {"partition": "dirichlet", "dirichlet_alpha": float(arg)}
        if kind == "shards":
            return f"shards{int(arg)}", {"partition": "shards", "shards_per_client": int(arg)}
    except ValueError:
        raise BenchError(f"partitions: {spec!r} needs a number after ':', e.g. dirichlet:0.5 or shards:2") from None
    if kind in ("iid", "predefined") and not arg:
        return kind, {"partition": kind}
    raise BenchError(f"partitions: unknown entry {spec!r}; use iid, dirichlet:<alpha>, shards:<k> or predefined")


def plan_cells(args) -> list[tuple[str, object]]:
    extra = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise BenchError(f"set: {item!r} must be KEY=VALUE, e.g. --set rounds=3")
        extra[key.replace("-", "_")] = value
    preset = args.preset or (None if args.config else "quick")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.methods is None:
        from methods import METHODS

        args.methods = ",".join(sorted(METHODS))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    references = [r.strip() for r in args.references.split(",") if r.strip()]
    rank_specs = [_rank_overrides(s) for s in args.ranks_grid.split(";") if s.strip()]
    part_specs = [_partition_overrides(s) for s in args.partitions.split(";") if s.strip()] if args.partitions else [("", {})]
    cells = []
    # breadth first: every method and setting gets seed 0 before any gets seed 1, so a grid that is
    # stopped early still compares all methods
    for seed in seeds:
        for rank_tag, rank_over in rank_specs:
            for part_tag, part_over in part_specs:
                for method in methods + references:
                    which = {"reference": method} if method in references else {"method": method}
                    cell = "-".join(x for x in (method, rank_tag, part_tag, f"s{seed}") if x)
                    over = {**extra, **rank_over, **part_over, **which, "seed": seed,
                            "output_dir": str(Path(args.runs_dir) / cell), "results_dir": args.results_dir}
                    cells.append((cell, build_config(preset=preset, config_file=args.config, overrides=over)))
    return cells


def _done(cfg, results_dir: Path) -> Path | None:
    want = (cfg.reference or cfg.method, cfg.config_hash(), cfg.seed)
    for path in sorted(results_dir.glob("*.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(rec, dict) and rec.get("status") == "complete" and \
                (rec.get("method"), rec.get("config_hash"), rec.get("seed")) == want:
            return path
    return None


def claim(run_dir: Path):
    """The cell's lock (an open file holding an exclusive flock), or None when another process holds it."""
    import fcntl

    run_dir.parent.mkdir(parents=True, exist_ok=True)
    f = open(run_dir.parent / f".{run_dir.name}.lock", "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


def main(args) -> int:
    from .checkpoint import checkpoint_dir
    from .evaluator import evaluator_for
    from .engine import Interrupted, run_federated

    cells = plan_cells(args)  # every cell validated before any runs
    results = Path(args.results_dir)
    todo = [(name, cfg) for name, cfg in cells if _done(cfg, results) is None]
    print(f"[ablate] {len(cells)} cells, {len(cells) - len(todo)} already done, {len(todo)} to run")
    if args.dry_run:
        for name, cfg in cells:
            print(f"  {'done' if _done(cfg, results) else 'todo'}  {name}")
        return 0
    elsewhere = []
    for i, (name, cfg) in enumerate(todo, 1):
        run_dir = Path(cfg.output_dir)
        lock = claim(run_dir)
        if lock is None:
            print(f"[ablate] cell {i}/{len(todo)}: {name} is being run by another process; left to it")
            elsewhere.append(name)
            continue
        with lock:
            if _done(cfg, results) is not None:  # finished by another process since the plan was made
                continue
            resume = str(run_dir) if checkpoint_dir(run_dir) is not None else None
            if not resume and run_dir.exists():
                import shutil

                shutil.rmtree(run_dir)  # a cell killed before its first checkpoint: start it clean
            print(f"[ablate] cell {i}/{len(todo)}: {name}" + (" (resuming)" if resume else ""))
            try:
                run_federated(cfg, resume=resume, evaluator=evaluator_for(cfg))
            except Interrupted as exc:
                print(f"interrupted: {exc}. Re-run the same `bench ablate` command to continue the grid.")
                return 130
    if elsewhere:
        print(f"[ablate] {len(elsewhere)} cells were being run by other processes ({', '.join(elsewhere)}); "
              "re-run the same command once they end to check the grid is complete")
        return 0
    print(f"[ablate] grid complete: {len(cells)} cells in {results}")
    return 0
