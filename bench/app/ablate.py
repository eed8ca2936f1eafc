"""`bench ablate`: a resumable grid of methods × rank setting × data heterogeneity × learning rate × seeds.

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

from bench import BenchError
from bench.config import RANK_DISTRIBUTIONS, build_config


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
    p.add_argument("--lrs", default=None,
                   help="comma-separated learning rates, an axis of the grid (a tuning grid: score it on a validation "
                        "task, e.g. --preset instruct-tune); each cell's name gains lr<value>")
    p.add_argument("--tuned-lr", metavar="DIR", default=None,
                   help="each row's learning rate from the tuning records in DIR: the lr whose records score highest on "
                        "their first eval task (mean over seeds; ties: lower held-out loss). The choice, every "
                        "candidate's score and the records read are kept in each cell's config as lr_tuning")
    p.add_argument("--tuned-lr-as", action="append", default=[], metavar="ROW=TUNED_ROW",
                   help="a row without tuning records of its own takes another row's tuned lr, e.g. local-only=fedit "
                        "(its clients train as FedIT's do); recorded in lr_tuning.borrowed_from")
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


def _lr_tag(lr: float) -> str:
    return f"lr{lr:g}"


def _task_score(rec: dict) -> tuple[str, str, float] | None:
    """(task, metric, value) of the record's first scored eval task, or None."""
    tasks = (rec.get("eval") or {}).get("tasks") or {}
    for task in (rec.get("config") or {}).get("eval_tasks") or []:
        entry = tasks.get(task)
        if isinstance(entry, dict) and isinstance(entry.get("value"), (int, float)):
            return task, str(entry.get("metric")), float(entry["value"])
    return None


def tuned_lrs(folder: str, rows: list[str], borrow: dict[str, str], test_tasks: list[str]) -> dict[str, dict]:
    """row -> its lr_tuning: the candidate lrs' mean scores over the tuning records of that row in `folder` and the
    chosen lr (highest score on the first eval task: ROUGE-L, accuracy and pass@k all grow with quality; ties: lower
    held-out loss). Refused before any cell runs when a row has no tuning records or when they were scored on a task
    this grid reports (tuning on the test split)."""
    path = Path(folder)
    if not path.is_dir():
        raise BenchError(f"tuned-lr: folder {folder} does not exist; pass the results folder of the tuning grid")
    seen: dict[str, dict[float, list]] = {}
    for f in sorted(path.glob("*.json")):
        try:
            rec = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(rec, dict) or rec.get("status") != "complete" or not isinstance(rec.get("config"), dict):
            continue
        score = _task_score(rec)
        if score is None:
            continue
        seen.setdefault(rec.get("method"), {}).setdefault(float(rec["config"]["lr"]), []).append(
            (score, rec.get("test_loss"), f.name))
    out = {}
    for row in rows:
        source = borrow.get(row, row)
        cands = seen.get(source)
        if not cands:
            hint = f" (or name one with --tuned-lr-as {row}=<tuned row>)" if row not in borrow else ""
            raise BenchError(f"tuned-lr: no scored tuning record of {source!r} in {folder}; run its tuning cells "
                             f"first (bench ablate --lrs ...){hint}")
        tasks = {s[0] for runs in cands.values() for s, _, _ in runs}
        if len(tasks) != 1:
            raise BenchError(f"tuned-lr: the tuning records of {source!r} in {folder} were scored on different tasks "
                             f"({', '.join(sorted(tasks))}); keep one tuning grid per folder")
        (task, metric), = {(s[0], s[1]) for runs in cands.values() for s, _, _ in runs}
        if task in test_tasks:
            raise BenchError(f"tuned-lr: the tuning records of {source!r} were scored on {task}, a task this grid "
                             "reports; tune on a validation task (e.g. --preset instruct-tune) so the test split "
                             "never picks a hyperparameter")
        def mean(xs):
            xs = [x for x in xs if isinstance(x, (int, float))]
            return sum(xs) / len(xs) if xs else float("inf")
        table = {lr: (mean([s[2] for s, _, _ in runs]), mean([loss for _, loss, _ in runs])) for lr, runs in cands.items()}
        chosen = max(table, key=lambda lr: (table[lr][0], -table[lr][1]))
        out[row] = {"lr": chosen, "source": folder, "task": task, "metric": metric,
                    "scores": {f"{lr:g}": round(v[0], 6) for lr, v in sorted(table.items())},
                    "records": sorted(name for runs in cands.values() for _, _, name in runs),
                    **({"borrowed_from": source} if source != row else {})}
    return out


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
    lrs = None
    if args.lrs:
        try:
            lrs = [float(x) for x in args.lrs.split(",") if x.strip()]
        except ValueError:
            raise BenchError(f"lrs: {args.lrs!r} must be comma-separated numbers, e.g. --lrs 2e-4,5e-4,1e-3") from None
        if not lrs or any(lr <= 0 for lr in lrs):
            raise BenchError(f"lrs: {args.lrs!r} must list learning rates > 0, e.g. --lrs 2e-4,5e-4,1e-3")
    if lrs and args.tuned_lr:
        raise BenchError("lrs: --lrs (a tuning grid) and --tuned-lr (rows at their tuned lr) exclude each other; pick one")
    borrow = {}
    for item in args.tuned_lr_as:
        row, sep, source = item.partition("=")
        if not sep or not row.strip() or not source.strip():
            raise BenchError(f"tuned-lr-as: {item!r} must be ROW=TUNED_ROW, e.g. --tuned-lr-as local-only=fedit")
        borrow[row.strip()] = source.strip()
    if borrow and not args.tuned_lr:
        raise BenchError("tuned-lr-as: it names whose tuned lr a row takes; pass --tuned-lr DIR with it")
    tuned = {}
    if args.tuned_lr:
        base = build_config(preset=preset, config_file=args.config, overrides=extra)
        trained = [m for m in methods + references if m != "base"]   # base trains nothing: no lr to choose
        tuned = tuned_lrs(args.tuned_lr, trained, borrow, base.eval_tasks)
    lr_specs = [(_lr_tag(lr), {"lr": lr}) for lr in lrs] if lrs else [("", {})]
    cells = []
    # breadth first: every method and setting gets seed 0 before any gets seed 1, so a grid that is
    # stopped early still compares all methods
    for seed in seeds:
        for rank_tag, rank_over in rank_specs:
            for part_tag, part_over in part_specs:
                for lr_tag, lr_over in lr_specs:
                    for method in methods + references:
                        which = {"reference": method} if method in references else {"method": method}
                        cell_lr = {"lr": tuned[method]["lr"], "lr_tuning": tuned[method]} if method in tuned else lr_over
                        cell = "-".join(x for x in (method, rank_tag, part_tag, lr_tag, f"s{seed}") if x)
                        over = {**extra, **rank_over, **part_over, **cell_lr, **which, "seed": seed,
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
    from bench.checkpoint import checkpoint_dir
    from bench.engine import Interrupted, run_federated

    from .evaluator import evaluator_for

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
