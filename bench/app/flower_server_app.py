"""The ServerApp: the engine's own loop (bench/engine.py run_federated) with a GridTransport, so a Flower
run writes the same run folder (config, metrics.jsonl, checkpoints, global model) and the same results
record as an in-process one; the record's `engine` says which engine ran ("flower-sim" or "flower").

The job (what to run) is JSON: {"config": RunConfig JSON, "engine": "flower-sim" | "flower",
"resume": run dir or null, "options": FlowerOptions}. In the simulation the launcher hands it over
directly; in deployment it is the run config key `bench-job` of the Flower app folder that
`bench run --engine flower` writes (bench/app/flower_launch.py) and `flwr run` submits.

Paths in the job are absolute: a deployed ServerApp runs in a `flwr-serverapp` process started by the
SuperLink, in the SuperLink's working directory and on its machine.
"""
from __future__ import annotations

import json
from pathlib import Path

from bench.flower.options import JOB_KEY, FlowerOptions


def run_job(grid, job: dict, *, log=print, plan=None, evaluator=None):
    """Run a job on this grid; returns the results record."""
    from bench.engine import preflight, run_federated
    from bench.flower import wire
    from bench.transports import get_transport

    cfg = wire.config_from_json(job["config"])
    opts = FlowerOptions.from_dict(job.get("options"))
    if evaluator is None and cfg.eval_tasks:
        from .evaluator import evaluator_for

        evaluator = evaluator_for(cfg)
    plan = plan or preflight(cfg, evaluator)
    session = Path(job.get("resume") or cfg.output_dir or "run").name
    transport = get_transport(job["engine"])(grid, cfg, plan, session=session, opts=opts, log=log)
    return run_federated(cfg, resume=job.get("resume"), plan=plan, log=log, evaluator=evaluator, transport=transport)


def _make_app():
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        from bench import BenchError

        raw = context.run_config.get(JOB_KEY)
        if not isinstance(raw, str):
            raise BenchError(f"{JOB_KEY}: the Flower run config has no job; write the app folder with "
                             "`bench run --engine flower --flower-app-dir DIR ...`")
        try:
            run_job(grid, json.loads(raw))
        except BenchError as exc:
            print(f"error: {exc}", flush=True)
            raise

    return app


app = _make_app()
