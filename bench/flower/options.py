"""The Flower side of `bench run`: where to run and how long to wait, and the job a ServerApp runs. None of it changes the numbers a
run computes, so it is not part of RunConfig (nor of its hash); it travels to the ServerApp with the job.
No flwr import here: the CLI must work without flwr installed."""
from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass


@dataclass
class FlowerOptions:
    superlink: str | None = None          # HOST:PORT of a SuperLink, or the name of a connection in $FLWR_HOME/config.toml
    root_certificates: str | None = None  # CA bundle (PEM) that signed the SuperLink's certificate: TLS; None: --insecure
    app_dir: str | None = None            # write the Flower app folder here (`flwr run <dir> <connection>`) and stop
    nodes_timeout: float = 600.0          # seconds to wait for a node per client (including its model load)
    round_timeout: float = 3600.0         # seconds a round waits for replies; then missing clients are recorded as lost
    poll_interval: float = 0.5            # seconds between pulls of replies
    sim_client_cpus: float | None = None  # simulation: CPUs per client (default: all, so clients train one at a time)
    sim_client_gpus: float | None = None  # simulation: GPUs per client (default: 1 with CUDA, else 0)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "FlowerOptions":
        return cls(**{k: v for k, v in (d or {}).items() if k in cls.__dataclass_fields__})


JOB_KEY = "bench-job"  # the Flower run config key that carries the job to a deployed ServerApp


def make_job(cfg, engine: str, opts: FlowerOptions, resume: str | None = None) -> dict:
    """What a ServerApp runs (bench/app/flower_server_app.py): the config, the engine's name, the run to resume,
    the options."""
    import json

    return {"config": json.dumps(cfg.to_dict(), sort_keys=True), "engine": engine, "resume": resume,
            "options": opts.to_dict()}


def add_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Flower engines (--engine flower-sim | flower; docs/flower.md)")
    g.add_argument("--superlink", help="--engine flower: the SuperLink, HOST:PORT (e.g. 127.0.0.1:9093) or a connection "
                                       "name from $FLWR_HOME/config.toml")
    g.add_argument("--root-certificates", metavar="CA_PEM",
                   help="--engine flower: CA certificate of the SuperLink (TLS); without it the connection is --insecure")
    g.add_argument("--flower-app-dir", metavar="DIR", help="--engine flower: write the Flower app folder (run it with "
                                                          "`flwr run DIR <connection>`) instead of submitting the run")
    g.add_argument("--round-timeout", type=float, metavar="S", help="seconds a round waits for its replies (default 3600)")
    g.add_argument("--nodes-timeout", type=float, metavar="S",
                   help="seconds to wait for every client's node to connect and load the model (default 600)")
    g.add_argument("--sim-client-cpus", type=float, metavar="N",
                   help="--engine flower-sim: CPUs per simulated client (default: all, so clients train one at a time)")


def options_from_args(args) -> FlowerOptions:
    opts = FlowerOptions(superlink=getattr(args, "superlink", None),
                         root_certificates=getattr(args, "root_certificates", None),
                         app_dir=getattr(args, "flower_app_dir", None),
                         sim_client_cpus=getattr(args, "sim_client_cpus", None))
    for name in ("round_timeout", "nodes_timeout"):
        if getattr(args, name, None) is not None:
            setattr(opts, name, float(getattr(args, name)))
    if opts.root_certificates:
        opts.root_certificates = os.path.abspath(os.path.expanduser(opts.root_certificates))
    return opts
