"""`bench serve`: vLLM's OpenAI-compatible server on a run's global model, on the base model with the run's global
adapter, or with every client's adapter (multi-LoRA: one engine, each adapter under its own model name).

    bench serve --run runs/<id>                      # global_model/ as "global"
    bench serve --run runs/<id> --adapters global    # base as "base" + global_adapter/ as "global" (LoRA, unmerged)
    bench serve --run runs/<id> --adapters clients   # base + "client_<k>" for each client adapter of the last round
    bench serve --model default --lora mine=path/to/adapter
    bench eval --base-url http://127.0.0.1:8000/v1 --served-model global --tasks commonsense --limit 50

Bound to 127.0.0.1 unless --host says otherwise. Every input is checked before vLLM starts (one `error:` line, exit
code 2). The server runs in its own process group; SIGINT or SIGTERM to this process stops the whole group
(API server and engine core), so `kill <pid of bench serve>` leaves nothing behind.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from bench import BenchError
from bench.export import run_base_model

ADAPTER_MODES = ("merged", "global", "clients")
STOP_GRACE_S = 15


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", metavar="RUN_DIR", help="serve a run's global model (see --adapters)")
    src.add_argument("--model", metavar="MODEL", help="serve a model (HF folder | hub id | .gguf | default) as 'base'")
    parser.add_argument("--adapters", choices=ADAPTER_MODES, default="merged",
                        help="--run: merged = global_model/ as 'global' (default); global = the base model as 'base' "
                             "with global_adapter/ as 'global' (LoRA, not merged); clients = the base model with each "
                             "client adapter of the last round as 'client_<k>' (and 'global' when the run has one)")
    parser.add_argument("--round", type=int, default=None, help="--adapters clients: the round (default: the last)")
    parser.add_argument("--lora", action="append", default=[], metavar="NAME=PATH",
                        help="--model: also serve this PEFT LoRA adapter under NAME (repeatable)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="weights' dtype (auto: float32 on a CPU, bfloat16 on a GPU, as bench eval)")
    parser.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    parser.add_argument("--ready-timeout", type=int, default=600, help="seconds to wait for the server (default 600)")


# ------------------------------------------------------------------------------------------------ what to serve


def client_adapters(run_dir: Path, rnd: int | None) -> tuple[int, dict[str, str]]:
    """(round, {"client_<k>": folder}) of the round's saved client adapters (the last round by default)."""
    rounds = sorted(int(p.name[len("round_"):]) for p in (run_dir / "clients").glob("round_*")
                    if p.name[len("round_"):].isdigit())
    if not rounds:
        raise BenchError(f"adapters: {run_dir}/clients/ holds no client adapters; run `bench run` with "
                         "--save-client-adapters")
    rnd = rounds[-1] if rnd is None else rnd
    if rnd not in rounds:
        raise BenchError(f"round: {run_dir}/clients/ has rounds {', '.join(map(str, rounds))}, not {rnd}")
    folder = run_dir / "clients" / f"round_{rnd}"
    exchanges = sorted(int(p.name[len("exchange_"):]) for p in folder.glob("exchange_*")
                       if p.name[len("exchange_"):].isdigit())
    if exchanges:  # a round of several exchanges (RoLoRA's schedule=paper): its clients' models are the last one's
        folder = folder / f"exchange_{exchanges[-1]}"
    found = {p.name: str(p) for p in folder.glob("client_*") if p.name[len("client_"):].isdigit()}
    return rnd, dict(sorted(found.items(), key=lambda kv: int(kv[0][len("client_"):])))


def global_adapter(run_dir: Path) -> str:
    path = run_dir / "global_adapter"
    if not (path / "adapter_config.json").is_file():
        raise BenchError(f"adapters: {path} does not exist: this run's method keeps no global adapter (adapter-form "
                         "methods: fedavg-lora, fedit, flexlora); serve its merged model with --adapters merged")
    return str(path)


def plan_serve(args) -> dict:
    """{"model": folder, "name": served name of the model, "loras": {name: folder}}, every path checked."""
    from .backends import get_backend

    if args.run:
        run_dir = Path(args.run)
        if not run_dir.is_dir():
            raise BenchError(f"run: {run_dir} is not a folder; pass a run folder written by `bench run`")
        if args.lora:
            raise BenchError("lora: --lora goes with --model; with --run choose --adapters global or clients")
        if args.adapters == "merged":
            from bench.export import global_model_dir

            return {"model": str(global_model_dir(run_dir)), "name": "global", "loras": {}}
        base = run_base_model(run_dir)
        loras = {}
        if args.adapters == "clients":
            loras.update(client_adapters(run_dir, args.round)[1])
            if (run_dir / "global_adapter" / "adapter_config.json").is_file():
                loras["global"] = global_adapter(run_dir)
        else:
            loras["global"] = global_adapter(run_dir)
    else:
        from bench.models import resolve_model

        if args.adapters != "merged" or args.round is not None:
            raise BenchError("adapters: --adapters and --round read a run folder; use them with --run")
        base = resolve_model(args.model)[0]
        loras = {}
        for spec in args.lora:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                raise BenchError(f"lora: {spec!r} is not NAME=PATH")
            if name == "base" or name in loras:
                raise BenchError(f"lora: the name {name!r} is taken; give each adapter its own name (not 'base')")
            loras[name] = path
    for name, path in loras.items():
        get_backend("vllm").check_adapter(path, f"adapter {name}")
    return {"model": base, "name": "base", "loras": loras}


# ------------------------------------------------------------------------------------------------ the server
def _check_address(host: str, port: int) -> None:
    if not 1 <= port <= 65535:
        raise BenchError(f"port: {port} is not a TCP port (1-65535)")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise BenchError(f"host: {host!r} does not resolve ({exc.strerror}); pass an address such as 127.0.0.1") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as exc:
            raise BenchError(f"port: {host}:{port} is not free ({exc.strerror}); pass --port with a free one") from None


def serve_command(spec: dict, *, host: str, port: int, dtype: str, max_model_len: int | None) -> tuple[list[str], dict]:
    """The vLLM server's command line and environment."""
    from . import core
    from .adapters import VLLM_LORA_MODULES, adapter_rank, lora_rank_slot
    from .backends import get_backend

    py = sys.executable if core.vllm_mode() == "inprocess" else str(core.vllm_venv_python())
    cmd = [py, "-m", "vllm.entrypoints.cli.main", "serve", spec["model"], "--host", host, "--port", str(port),
           "--dtype", get_backend("vllm").resolve_dtype(dtype), "--enforce-eager", "--served-model-name", spec["name"],
           "--seed", "0", "--enable-prefix-caching",
           # the remote tokenizer lets a client score without a local copy of the model (lm-eval's "remote" backend)
           "--enable-tokenizer-info-endpoint"]
    if max_model_len:
        cmd += ["--max-model-len", str(max_model_len)]
    if spec["loras"]:
        rank = lora_rank_slot(max(adapter_rank(p) for p in spec["loras"].values()))
        cmd += ["--enable-lora", "--max-lora-rank", str(rank), "--max-loras", str(min(len(spec["loras"]), 4)),
                "--max-cpu-loras", str(len(spec["loras"])), "--lora-target-modules", *VLLM_LORA_MODULES,
                "--lora-modules", *[f"{n}={os.path.abspath(p)}" for n, p in spec["loras"].items()]]
    env = core.vllm_env()
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the API server's engine core is always its own process
    env[core.WORKER_TAG_ENV] = server_tag(os.getpid())  # inherited by every server process: stop() finds them all
    return cmd, env


def server_tag(pid: int) -> str:
    return f"serve-{pid}"


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> list[str]:
    """The served model names once GET url/models answers; BenchError if the server dies or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"serve: the vLLM server exited with code {proc.returncode} before it answered; see its "
                             "output above")
        try:
            with urllib.request.urlopen(f"{url}/models", timeout=5) as resp:
                return [m["id"] for m in json.loads(resp.read().decode())["data"]]
        except OSError:
            time.sleep(1)
    raise BenchError(f"serve: no answer at {url} within {timeout:.0f} s (--ready-timeout)")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, SIGKILL after STOP_GRACE_S: nothing of it survives."""
    for sig, wait in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        try:  # the API server is gone; its engine core may still be exiting
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.5)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    from .core import tagged_processes

    for pid in tagged_processes(server_tag(os.getpid())):  # a process that left the group
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def main(args: argparse.Namespace) -> int:
    try:
        spec = plan_serve(args)
        _check_address(args.host, args.port)
        from . import core

        core.vllm_mode()  # the install hint when vLLM is nowhere
        cmd, env = serve_command(spec, host=args.host, port=args.port, dtype=args.dtype,
                                 max_model_len=args.max_model_len)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    host = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{host}:{args.port}/v1"
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"[serve] listening on {args.host}: anyone who can reach this machine can use the server",
              file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
    stopping = {"signal": None}

    def on_signal(signum, _frame):
        stopping["signal"] = signum
        raise KeyboardInterrupt

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        names = wait_ready(url, proc, args.ready_timeout)
        print(f"serving {url} (pid {os.getpid()}, vLLM pid {proc.pid}): models {', '.join(names)}", flush=True)
        print(f"score with: bench eval --base-url {url} --served-model {names[-1]} --tasks ...; stop with Ctrl-C or "
              f"kill {os.getpid()}", flush=True)
        rc = proc.wait()
        print(f"error: serve: the vLLM server exited with code {rc}", file=sys.stderr)
        return 1
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("[serve] stopping the vLLM server", file=sys.stderr, flush=True)
        return 0
    finally:
        stop(proc)
        for s, h in old.items():
            signal.signal(s, h)


if __name__ == "__main__":  # python -m evaluators.serve ...: the same as `bench serve ...`
    p = argparse.ArgumentParser(prog="bench serve")
    add_arguments(p)
    sys.exit(main(p.parse_args()))
