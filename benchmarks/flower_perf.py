"""`bench perf --only flower`: the wall time of a Flower-simulation round against the in-process round,
same config, same process, measured one after the other.

A round's time is the engine's own `seconds` for the round (configure → every client's reply →
aggregate → metrics), identical in both engines' code; the simulation adds serialisation to Flower
records, the Ray hop to the actor that trains, and the reply pull loop. Ray's start and the nodes'
warm-up (model load, tokenisation: the QUERY before round 1) are outside the rounds, as the model load
is for the in-process engine, and are reported separately. The global models are compared bit for bit.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from pathlib import Path

FLOWER_GOAL = 1.3  # a flower-sim round within 1.3× the in-process round's wall time


def _quiet(*_a, **_k) -> None:
    pass


def flower_overrides(model: str, method: str, quick: bool) -> dict:
    size = dict(num_clients=2, rounds=2, local_steps=1, batch_size=2, micro_batch_size=2, cutoff_len=64) if quick else {}
    return dict(model=model, method=method, eval_tasks=[], **size)


def measure(model: str = "default", method: str = "flora", quick: bool = False, log=_quiet, workdir: str | None = None) -> dict:
    try:
        import flwr  # noqa: F401
        import ray  # noqa: F401
    except ImportError as exc:
        return {"status": "missing", "reason": f"flwr[simulation] is not installed ({exc}); pip install 'fedlora-bench[flower]'"}
    from bench.config import build_config
    from bench.engine import preflight, run_federated

    from bench.app.flower_launch import simulate
    from bench.flower.options import FlowerOptions

    cfg = build_config(preset="quick", overrides=flower_overrides(model, method, quick))
    plan = preflight(cfg)
    tmp = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="bench-perf-flower-"))
    load = [os.getloadavg()] if hasattr(os, "getloadavg") else []
    try:
        runs = {}
        for engine in ("inprocess", "flower-sim"):
            run_cfg = dataclasses.replace(cfg, output_dir=str(tmp / engine), results_dir=str(tmp / "results"), engine=engine)
            log(f"[perf] flower: {engine} run of the quick preset ...")
            t = time.perf_counter()
            rec = (run_federated(run_cfg, plan=plan, log=_quiet) if engine == "inprocess"
                   else simulate(run_cfg, FlowerOptions(), log=_quiet))
            runs[engine] = {"wall_s": round(time.perf_counter() - t, 2),
                            "round_s": [r["seconds"] for r in rec["rounds"]],
                            # each round's time outside the clients' local training (the engine's own work,
                            # and for flower-sim also the records, Ray and the reply polling)
                            "outside_train_s": [round(r["seconds"] - sum(c.get("seconds") or 0 for c in r["clients"]), 3)
                                                for r in rec["rounds"]],
                            "train_s": round(rec["timings"]["train_s"], 3)}
            if hasattr(os, "getloadavg"):
                load.append(os.getloadavg())
        ip, sim = runs["inprocess"], runs["flower-sim"]
        ratio = sum(sim["round_s"]) / sum(ip["round_s"])
        # load-robust estimate: the in-process training time with each engine's time outside training (on a
        # shared machine, training time swings between the two runs far more than the engines differ)
        adjusted = (ip["train_s"] + sum(sim["outside_train_s"])) / (ip["train_s"] + sum(ip["outside_train_s"]))
        same = _same_files(tmp / "inprocess" / "global_model", tmp / "flower-sim" / "global_model")
        rec_sim = _record(tmp / "flower-sim")
        wire = [(c.get("wire_bytes_up", 0), c.get("wire_bytes_down", 0), c["bytes_up"], c["bytes_down"])
                for r in rec_sim["rounds"] for c in r["clients"]]
        return {
            "status": "ok", "model": plan.model_id, "method": method, "quick": quick,
            "config": flower_overrides(model, method, quick), "clients": cfg.num_clients, "rounds": cfg.rounds,
            "inprocess": ip, "flower_sim": sim,
            "round_ratios": [round(s / i, 4) for s, i in zip(sim["round_s"], ip["round_s"])],
            "ratio": round(ratio, 4), "ratio_same_training": round(adjusted, 4),
            "goal": f"flower-sim round ≤ {FLOWER_GOAL}× the in-process round",
            "meets_goal": ratio <= FLOWER_GOAL,
            "outside_rounds_s": round(sim["wall_s"] - sum(sim["round_s"]) - (ip["wall_s"] - sum(ip["round_s"])), 2),
            "global_model_bit_identical": same,
            "wire_bytes": {"up": sum(w[0] for w in wire), "down": sum(w[1] for w in wire),
                           "tensor_up": sum(w[2] for w in wire), "tensor_down": sum(w[3] for w in wire)},
            "load_avg": [[round(x, 2) for x in la] for la in load],
            "definition": "round = the engine's round seconds (configure → replies → aggregate → metrics); ratio = "
                          "Σ flower-sim rounds / Σ in-process rounds; ratio_same_training = (in-process training s + "
                          "flower-sim time outside training) / (in-process training s + in-process time outside "
                          "training), the same comparison with the training time of one run, robust to load swings "
                          "between the two runs; outside_rounds_s = the simulation's extra wall time outside the "
                          "rounds (Ray start, virtual nodes, warm-up QUERY)",
        }
    finally:
        if workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)


def _record(run: Path) -> dict:
    import json

    return json.loads(Path(json.loads((run / "run.json").read_text())["record"]).read_text())


def _same_files(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return sorted(x) == sorted(y) and all((x[k] == y[k]).all() for k in x)


def markdown_rows(a: dict) -> list[str]:
    """The rows of perf.md's summary table for this section."""
    if a.get("status") != "ok":
        return [f"| flower | {a.get('status')}: {a.get('reason')} | – | – | – | – |"]
    ip, sim = a["inprocess"], a["flower_sim"]
    return [f"| flower-sim round ({a['model']}, {a['clients']} clients, {a['rounds']} rounds), Σ round s | "
            f"{sum(sim['round_s']):.1f} s | in-process {sum(ip['round_s']):.1f} s | {a['ratio']:.3f} | ≤ {FLOWER_GOAL} | "
            f"{'yes' if a['meets_goal'] else 'no'} |",
            f"| flower-sim round, same training time (time outside training: flower-sim "
            f"{sum(sim['outside_train_s']):.1f} s, in-process {sum(ip['outside_train_s']):.1f} s) | – | – | "
            f"{a['ratio_same_training']:.3f} | – | – |",
            f"| flower-sim: global model vs in-process | {'bit-identical' if a['global_model_bit_identical'] else 'DIFFERS'} "
            f"| – | – | bit-identical | {'yes' if a['global_model_bit_identical'] else 'no'} |"]
