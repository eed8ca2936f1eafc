"""`bench run --engine flower-sim | flower`.

flower-sim  Flower's simulation engine in this process (flwr.simulation.run_simulation): the ServerApp
            runs in a thread here, one virtual SuperNode per client, ClientApps in Ray actors. By
            default an actor gets every CPU (and the GPU, if any), so clients train one at a time with
            the thread count of an in-process run, which keeps the arithmetic identical.
flower      a run submitted to a running SuperLink (`--superlink HOST:PORT`, or a connection name from
            $FLWR_HOME/config.toml) with one SuperNode per client. This writes a Flower app folder
            (pyproject.toml naming bench's ServerApp and ClientApp, the job in its run config), submits
            it with `flwr run --stream`, then asks the SuperLink how the run ended (`flwr run` exits 0
            even when the ServerApp raised). `--flower-app-dir DIR` writes the folder and stops, for
            `flwr run DIR <connection>` by hand.

Every input is checked here, before Ray starts or anything is submitted.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import BenchError
from bench.flower.options import JOB_KEY, FlowerOptions, make_job, options_from_args

def refuse_flags(cfg, args) -> None:
    """BenchError for Flower flags on a run that no Flower engine hosts."""
    given = [f"--{n.replace('_', '-')}" for n in ("superlink", "root_certificates", "flower_app_dir", "sim_client_cpus")
             if getattr(args, n, None) is not None]
    if given:
        raise BenchError(f"engine: {given[0]} is a Flower flag but the engine is {cfg.engine!r}; add --engine flower "
                         "(or flower-sim), or drop the flag")


def run_engine(cfg, args, evaluator, log=print) -> dict | None:
    """Run (or resume) cfg on its Flower engine (bench/app/launch.py dispatches here); the results record (None
    when only an app folder was written)."""
    from bench.flower import require_flwr

    opts = options_from_args(args)
    check_options(cfg, opts)
    if cfg.reference and cfg.reference != "local-only":  # local-only trains the federation's own clients
        raise BenchError(f"reference: the {cfg.reference} row trains differently from a federated run; "
                         "run it with --engine inprocess")
    require_flwr()
    _quiet_defaults()
    if cfg.engine == "flower-sim":
        return simulate(cfg, opts, resume=args.resume, evaluator=evaluator, log=log)
    return deploy(cfg, opts, resume=args.resume, evaluator=evaluator, log=log)


def _quiet_defaults() -> None:
    """Telemetry off unless the user turned it on (these machines are often offline, and tests must be)."""
    for var in ("FLWR_TELEMETRY_ENABLED", "RAY_USAGE_STATS_ENABLED"):
        os.environ.setdefault(var, "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")


def _checked(cfg, resume, evaluator):
    """Everything run_federated would refuse before writing, refused now (before Ray or a SuperLink)."""
    import dataclasses

    from bench.engine import preflight
    from bench.rundir import check_output_paths, default_run_id

    if not cfg.output_dir:
        cfg = dataclasses.replace(cfg, output_dir=str(Path("runs") / default_run_id(cfg)))
    plan = preflight(cfg, evaluator)
    check_output_paths(cfg, Path(resume or cfg.output_dir), resume)
    return cfg, plan


# ---- simulation ---------------------------------------------------------------------------------------

def simulation_backend(opts: FlowerOptions, device: str) -> dict:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    gpus = 0
    if device != "cpu":
        import torch

        gpus = torch.cuda.device_count()
    per_cpu = opts.sim_client_cpus if opts.sim_client_cpus else cpus
    per_gpu = opts.sim_client_gpus if opts.sim_client_gpus is not None else (1 if gpus else 0)
    if per_cpu > cpus:
        raise BenchError(f"sim_client_cpus: {per_cpu:g} CPUs per client, this machine has {cpus}; use at most {cpus}")
    return {"client_resources": {"num_cpus": per_cpu, "num_gpus": per_gpu},
            "init_args": {"num_cpus": cpus, "num_gpus": gpus, "logging_level": "ERROR", "log_to_driver": True}}


def simulate(cfg, opts: FlowerOptions, *, resume=None, evaluator=None, log=print):
    import logging

    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from bench.flower.client_app import app as client_app

    from .flower_server_app import run_job

    cfg, plan = _checked(cfg, resume, evaluator)
    job = make_job(cfg, "flower-sim", opts, resume)
    out: dict = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid, context) -> None:
        out["result"] = run_job(grid, job, log=log, plan=plan, evaluator=evaluator)

    backend = simulation_backend(opts, cfg.device)
    log(f"[flower] simulation: {cfg.num_clients} virtual SuperNodes, Ray backend {backend['client_resources']} per client")
    logging.getLogger("flwr").setLevel(logging.WARNING)
    run_simulation(server_app, client_app, num_supernodes=cfg.num_clients, backend_config=backend)
    if "result" not in out:
        raise BenchError("engine: the Flower simulation ended without finishing the run; see the log above")
    return out["result"]


# ---- deployment -----------------------------------------------------------------------------------------

def _absolute(cfg):
    """The paths a ServerApp in another process (the SuperLink's cwd) must resolve as we do."""
    import dataclasses

    changes = {"output_dir": str(Path(cfg.output_dir).resolve()), "results_dir": str(Path(cfg.results_dir).resolve())}
    if cfg.data_root and not os.path.isabs(cfg.data_root):
        changes["data_root"] = str(Path(cfg.data_root).resolve())
    if os.path.exists(cfg.model) and not os.path.isabs(cfg.model):
        changes["model"] = str(Path(cfg.model).resolve())
    return dataclasses.replace(cfg, **changes)


def write_app(app_dir: str | os.PathLike, job: dict, clientapp: str = "bench.flower.client_app:app",
              extra_config: dict | None = None, extra_files=()) -> Path:
    """A Flower app folder for this job: pyproject.toml (bench's ServerApp and ClientApp, the job as run
    config) and a README. fedlora-bench must be installed where the SuperLink and SuperNodes run; the
    folder carries no code of its own (extra_files: copied in, e.g. a test's own ClientApp module)."""
    import tomli_w

    app_dir = Path(app_dir)
    app_dir.mkdir(parents=True, exist_ok=True)
    doc = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": "fedlora-bench-run", "version": "1.0.0", "license": "Apache-2.0", "dependencies": [],
                    "description": "A fedlora-bench run for Flower (generated by bench run --engine flower)"},
        "tool": {"flwr": {"app": {"publisher": "fedlora-bench",
                                  "components": {"serverapp": "bench.app.flower_server_app:app", "clientapp": clientapp},
                                  "config": {JOB_KEY: json.dumps(job, sort_keys=True), **(extra_config or {})}}}},
    }
    (app_dir / "pyproject.toml").write_text(tomli_w.dumps(doc))
    for f in extra_files:
        shutil.copy(f, app_dir / Path(f).name)
    (app_dir / "README.md").write_text(
        "# fedlora-bench run (Flower app)\n\nGenerated by `bench run --engine flower`. Run it with\n"
        "`flwr run <this folder> <connection> --stream` against a SuperLink started with "
        "`--disable-runtime-dependency-installation`, one SuperNode per client (`--node-config \"partition-id=K "
        "num-partitions=N\"`), fedlora-bench installed everywhere. See docs/flower.md.\n")
    return app_dir


def flwr_exe() -> str:
    exe = Path(sys.executable).with_name("flwr")
    return str(exe) if exe.exists() else (shutil.which("flwr") or "flwr")


def check_options(cfg, opts: FlowerOptions) -> None:
    """The Flower flags, against the engine and each other, before the run's data or model is resolved."""
    if cfg.engine == "flower-sim" and (opts.superlink or opts.app_dir or opts.root_certificates):
        raise BenchError("engine: --superlink, --root-certificates and --flower-app-dir are for --engine flower "
                         "(a SuperLink); flower-sim runs Flower's simulation here")
    if cfg.engine == "flower" and not (opts.superlink or opts.app_dir):
        raise BenchError("superlink: --engine flower needs --superlink HOST:PORT (or a connection name from "
                         "$FLWR_HOME/config.toml), or --flower-app-dir DIR to write the app for `flwr run`")
    if opts.root_certificates and opts.superlink and not _is_address(opts.superlink):
        raise BenchError("root_certificates: with a connection name, set root-certificates in that connection of "
                         "$FLWR_HOME/config.toml; --root-certificates goes with --superlink HOST:PORT")
    if opts.root_certificates and not Path(opts.root_certificates).is_file():
        raise BenchError(f"root_certificates: {opts.root_certificates} is not a file; pass the CA certificate (PEM) "
                         "that signed the SuperLink's certificate")


def _is_address(target: str) -> bool:
    """HOST:PORT (an address), as opposed to a connection name of $FLWR_HOME/config.toml."""
    return re.fullmatch(r"\[?[\w.:-]+\]?:\d+", target) is not None


def connection(opts: FlowerOptions, home: Path) -> tuple[str, dict]:
    """(connection name, environment) for the flwr CLI. HOST:PORT gets a private FLWR_HOME (in `home`) with
    one connection; a name uses the user's own $FLWR_HOME/config.toml."""
    import tomli_w

    env = dict(os.environ)
    target = opts.superlink
    if target and _is_address(target):
        conn = {"address": target}
        if opts.root_certificates:
            conn["root-certificates"] = opts.root_certificates
        else:
            conn["insecure"] = True
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": "bench", "bench": conn}}))
        env["FLWR_HOME"] = str(home)
        return "bench", env
    return target, env


def run_status(conn: str, run_id: str, env: dict) -> str:
    out = subprocess.run([flwr_exe(), "ls", conn, "--run-id", run_id, "--format", "json"], env=env,
                         capture_output=True, text=True, timeout=120)
    try:
        runs = json.loads(out.stdout[out.stdout.index("{"):])["runs"]
        return str(runs[0]["status"])
    except (ValueError, KeyError, IndexError):
        return f"unknown ({(out.stdout + out.stderr).strip()[-300:]})"


def deploy(cfg, opts: FlowerOptions, *, resume=None, evaluator=None, log=print, clientapp: str | None = None,
           extra_config: dict | None = None, extra_files=()):
    check_options(cfg, opts)
    cfg, _ = _checked(cfg, resume, evaluator)
    cfg = _absolute(cfg)
    resume = str(Path(resume).resolve()) if resume else None
    job = make_job(cfg, "flower", opts, resume)
    with tempfile.TemporaryDirectory(prefix="bench-flower-") as tmp:
        app_dir = Path(opts.app_dir) if opts.app_dir else Path(tmp) / "app"
        write_app(app_dir, job, **({"clientapp": clientapp} if clientapp else {}), extra_config=extra_config,
                  extra_files=extra_files)
        if not opts.superlink:
            log(f"[flower] wrote the Flower app to {app_dir}; run it with: flwr run {app_dir} <connection> --stream\n"
                f"[flower] the run folder will be {cfg.output_dir}, the record in {cfg.results_dir}")
            return None
        conn, env = connection(opts, Path(tmp) / "flwr_home")
        cmd = [flwr_exe(), "run", str(app_dir), conn, "--stream"]
        log(f"[flower] submitting to {opts.superlink}: {' '.join(cmd)}")
        run_id = None
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            for line in proc.stdout:
                sys.stdout.write(line)
                m = re.search(r"Successfully started run (\d+)", line)
                if m:
                    run_id = m.group(1)
            rc = proc.wait()
        except KeyboardInterrupt:
            proc.kill()
            if run_id:
                subprocess.run([flwr_exe(), "stop", run_id, conn], env=env, timeout=60, capture_output=True)
                log(f"[flower] stopped Flower run {run_id}; resume with: bench run --resume {cfg.output_dir}")
            raise
        if run_id is None:
            raise BenchError(f"superlink: `flwr run` could not start the run at {opts.superlink} (exit code {rc}); check "
                             "that the SuperLink is up, the address, and --root-certificates (TLS) or its --insecure")
        status = run_status(conn, run_id, env)
    if status != "finished:completed":
        raise BenchError(f"engine: the Flower run {run_id} ended with status {status}; its log is above "
                         f"(`flwr log {run_id} <connection>`); the last complete round is in {cfg.output_dir}/checkpoint, "
                         f"resume with: bench run --resume {cfg.output_dir} --superlink {opts.superlink}")
    pointer = Path(cfg.output_dir) / "run.json"
    if not pointer.is_file():  # the SuperLink runs on another machine: the record is there
        log(f"[flower] run {run_id} completed; its run folder and record are on the SuperLink's machine ({cfg.output_dir})")
        return {}
    return json.loads(Path(json.loads(pointer.read_text())["record"]).read_text())
