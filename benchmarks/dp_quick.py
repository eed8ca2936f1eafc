"""The DP sweep: `bench run --method <m> --preset quick --dp-epsilon 8 --dp-delta 1e-5` for every registered method.

Each method runs as its own `python -m bench run` process (the command a user types), so a refusal is the CLI's
own one-line error and the CPU seconds are the process's own (user + system, from getrusage of the child). The
records go to the output folder; `sweep.json` keeps one entry per method (supported or its refusal, the record,
CPU and wall seconds) and `README.md` is the table, both rewritten after every method so that a partial sweep is
readable. A method already in sweep.json is not run again (delete its entry to repeat it).

    OMP_NUM_THREADS=1 nice -n 10 python -m benchmarks.dp_quick --out benchmarks/results/dp_quick
    python -m benchmarks.dp_quick --out benchmarks/results/dp_quick --methods flora,fed-sb --table-only
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EPSILON, DELTA = 8.0, 1e-5


def command(method: str, results: Path, run_dir: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "bench", "run", "--method", method, "--preset", "quick",
            "--dp-epsilon", str(EPSILON), "--dp-delta", str(DELTA),
            "--results-dir", str(results), "--output-dir", str(run_dir), *extra]


def run_one(method: str, out: Path, work: Path, extra: list[str]) -> dict:
    run_dir = work / method
    cmd = command(method, out, run_dir, extra)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    entry = {"method": method, "command": " ".join(["bench", *cmd[3:]]), "returncode": proc.returncode,
             "cpu_s": round(cpu, 1), "wall_s": round(wall, 1)}
    if proc.returncode == 0:
        record = json.loads((run_dir / "run.json").read_text())["record"]
        entry.update(status="supported", record=Path(record).name)
    else:  # the CLI's refusal is its last stderr line
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        entry.update(status="refused", refusal=lines[-1] if lines else f"exit {proc.returncode}, no message")
    shutil.rmtree(run_dir, ignore_errors=True)  # the global model alone is ~0.5 GB; the record keeps the figures
    return entry


def table(out: Path, entries: list[dict]) -> str:
    rows = ["| method | DP | spent ε per client (δ = 1e-5) | σ per client | test loss | CPU s | wall s |",
            "|---|---|---|---|---|---|---|"]
    for e in entries:
        if e["status"] != "supported":
            rows.append(f"| {e['method']} | refused: {e['refusal']} | | | | {e['cpu_s']:.0f} | {e['wall_s']:.0f} |")
            continue
        rec = json.loads((out / e["record"]).read_text())
        clients = rec["privacy"]["clients"]
        eps = ", ".join(f"{c['epsilon']:.2f}" for c in clients)
        sigma = ", ".join(f"{c['noise_multiplier']:.3f}" for c in clients if c["noise_multiplier"] is not None)
        own = "own model" in rec["test"].get("model", "")  # no global model: the mean of the clients' own models
        loss_txt = f"{rec['test_loss']:.5f}" + (" (clients' own models)" if own else "")
        rows.append(f"| {e['method']} | yes | {eps} | {sigma} | {loss_txt} | {e['cpu_s']:.0f} | {e['wall_s']:.0f} |")
    return "\n".join(rows)


def write(out: Path, entries: list[dict]) -> None:
    (out / "sweep.json").write_text(json.dumps({"epsilon": EPSILON, "delta": DELTA, "preset": "quick",
                                                "methods": entries}, indent=1) + "\n")
    commits = ", ".join(sorted({e.get("git_commit", "unknown")[:12] for e in entries}))
    listed = ", ".join(e["method"] for e in entries)
    ran = [e for e in entries if e["status"] == "supported"]
    from methods import METHODS

    left = sorted(set(METHODS) - {e["method"] for e in entries})
    missing = f" Not run yet: {', '.join(left)} (`python -m benchmarks.dp_quick` runs only what sweep.json lacks)." if left else ""
    refused = [e["method"] for e in entries if e["status"] != "supported"]
    refusals = (f"{', '.join(refused)} refused in one line before any work" if refused
                else "none of the methods run is refused")
    scored = ", ".join(e["method"] for e in ran if "--no-eval" not in e["command"].split()) or "none"
    unscored = ", ".join(e["method"] for e in ran if "--no-eval" in e["command"].split()) or "none"
    text = f"""# DP sweep on the quick preset

Every registered method, `bench run --method <m> --preset quick --dp-epsilon {EPSILON:g} --dp-delta {DELTA:g}`
(SmolLM2-135M-Instruct, dolly, 4 clients at ranks 16, 8, 4, 4, 2 rounds × 2 local steps, q/v projections;
σ calibrated per client for ε = 8 over the run, bench/privacy.py), one process per method under
`OMP_NUM_THREADS=1` at a lowered priority (`nice -n 10`, or 3), on this 2-core CPU while the study grid held both cores at normal priority (wall
seconds are mostly waiting for a core; CPU seconds are what a run costs). Made by
`python -m benchmarks.dp_quick --out benchmarks/results/dp_quick` from a clean checkout at commit {commits}; the records are
the `*.json` files beside this one, `sweep.json` holds each method's command, exit status and seconds.

Spent ε is each client's, from its recorded (σ, q, steps) with Opacus's RDP accountant (the record's
`privacy.clients`); test loss is the record's held-out loss of the global model (FedSA-LoRA has none: its
clients' own models). CPU s is the run's process (user + system): everything the command did, lm-eval's scoring
of the preset's commonsense tasks included where it ran ({scored}), not where the command has `--no-eval`
({unscored}; no column here needs a lm-eval score).

Methods run: {listed}.{missing}

What this shows: every method that supports DP runs the issue's command on the real default model and spends at
most the target ε per client; {refusals}. It is not a utility
comparison: each client takes 4 noisy steps (σ ≈ 0.54, q = 4/64) at lr 5e-4, so the held-out losses below sit
within a few 1e-4 of each other (compare benchmarks/results/dp_noise.md for what the noise does to ΔW per method).

{table(out, entries)}
"""
    (out / "README.md").write_text(text)


def main(argv=None) -> int:
    from methods import METHODS

    p = argparse.ArgumentParser(prog="python -m benchmarks.dp_quick", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results/dp_quick")
    p.add_argument("--methods", default=",".join(sorted(METHODS)), help="comma-separated subset (default: all)")
    p.add_argument("--table-only", action="store_true", help="rewrite README.md from sweep.json, run nothing")
    p.add_argument("--extra", default="", help="more `bench run` flags, space-separated (recorded in each command)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(wanted) - set(METHODS))
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown[0]!r}; registered: {', '.join(sorted(METHODS))}")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown"
    sweep = out / "sweep.json"
    earlier = json.loads(sweep.read_text()) if sweep.exists() else {"methods": []}
    entries = [{"git_commit": earlier.get("git_commit", "unknown"), **e} for e in earlier["methods"]]
    done = {e["method"] for e in entries}
    if not args.table_only:
        with tempfile.TemporaryDirectory(prefix="dp_quick_") as work:
            for m in wanted:
                if m in done:
                    continue
                print(f"[dp_quick] {m} …", flush=True)
                entries.append({**run_one(m, out, Path(work), args.extra.split()), "git_commit": commit})
                e = entries[-1]
                print(f"[dp_quick] {m}: {e['status']} in {e['wall_s']:.0f} s wall, {e['cpu_s']:.0f} CPU s", flush=True)
                write(out, entries)
    write(out, entries)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
