"""The engine drives the rounds and owns the run's files; it knows no method by name.

    preflight (everything that can be refused, refused before any file is written)
    _prepare  the run folder, the clients (in-process, or behind the given transport), the server, the
              checkpoint resumed from, the observers
    _rounds   for each round: server.sample → server.configure (one TaskMessage per client)
              → transport.run (clients train; bench/client.py) → server.aggregate (bench/server.py)
              (repeated exchanges_per_round times with the same clients, for a method that asks it)
              → observers (metrics.jsonl, progress, audit) → checkpoint (atomic)
    _finish   personalized methods: EVALUATE (each client scores its own model, over the transport);
              export the global model from the server's full-precision deltas → held-out loss → injected
              evaluation → the results record (bench/record.py)
The loop, the checkpoint and the export announce named points as observer events (bench/observers.py);
test hooks subscribe to them (bench/hooks.py).

Determinism: every random draw derives from (seed, round, client), never from a running RNG, so a
run resumed from the checkpoint of round r reproduces rounds r+1… bit for bit on the same machine.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from methods import get_method

from . import BenchError, data as data_mod, hooks, models, privacy  # noqa: F401 (hooks: subscribes the test hooks)
from .checkpoint import checkpoint_dir, load_checkpoint, save_checkpoint
from .client import ModelSpec, held_out_losses
from .compute import resolve_compute_dtype, resolve_device, resolve_dtype
from .config import RunConfig, save_config
from .data import HeldOut, client_examples, load_tokenizer  # noqa: F401 (client_examples: the engine's API)
from .export import export_dtype, export_global_adapter, export_global_model
from .guard import ReplyFilter
from .io import atomic_write_json
from .messages import Reply, mean_loss
from .observers import AuditTrail, MetricsLog, Observers, Progress, RoundStates, rss_mb, run_observers
from .record import build_record, load_avg, provenance, run_setting
from .references import reference_run
from .rundir import check_output_paths as _check_output_paths, default_run_id as _run_id
from .server import Server, sample_clients
from .transports import Transport, get_transport


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; the last checkpoint is intact."""


@dataclass
class Plan:
    """Everything preflight learned, before any file is written."""

    cfg: RunConfig
    model_path: str
    model_id: str
    dataset: data_mod.Dataset
    shards: list[list[int]]
    ranks: list[int]
    module_shapes: dict[str, tuple[int, int]]   # target module name -> (d_out, d_in)
    eval_tasks: list[str] = field(default_factory=list)
    client_tests: list[list[int]] = field(default_factory=list)  # each client's own held-out split (indices into train)


# ---- preflight: everything that can be refused, refused before work starts ----------------------

def target_module_shapes(model_path: str, targets: list[str]) -> dict[str, tuple[int, int]]:
    """Build the architecture on the meta device (no weights) and find the target Linear modules."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_path)
    except Exception as exc:
        raise BenchError(f"model: cannot read the config of {model_path} ({str(exc).splitlines()[0][:200]}); "
                         "pass an HF causal-LM folder, a .gguf file or a hub id") from None
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except ValueError as exc:
        raise BenchError(f"model: {model_path} is not a causal LM ({str(exc).splitlines()[0][:160]}); pass a *ForCausalLM model") from None
    shapes, seen = {}, set()
    linear_names = set()
    for name, mod in skeleton.named_modules():
        if isinstance(mod, torch.nn.Linear):
            leaf = name.rsplit(".", 1)[-1]
            linear_names.add(leaf)
            if leaf in targets:
                shapes[name] = (mod.out_features, mod.in_features)
                seen.add(leaf)
    missing = [t for t in targets if t not in seen]
    if missing:
        import difflib
        hint = difflib.get_close_matches(missing[0], sorted(linear_names), n=1)
        raise BenchError(f"target_modules: {missing[0]!r} is not a Linear module of this model"
                         f"{f'; did you mean {hint[0]!r}?' if hint else ''}; available: {', '.join(sorted(linear_names))}")
    return shapes


def preflight(cfg: RunConfig, evaluator=None) -> Plan:
    """evaluator: what scores the global model (the evaluators package, injected by the CLI), needed
    only when cfg.eval_tasks is set."""
    method = get_method(cfg.method, cfg.method_options)
    ranks = cfg.client_ranks()
    try:
        method.check_ranks(ranks)
    except ValueError as exc:
        raise BenchError(str(exc)) from None
    dataset, shards, client_tests = data_mod.federated_split(cfg)
    if cfg.heldout_split == "validation" and not dataset.validation:
        raise BenchError(f"heldout_split: dataset {cfg.dataset} holds out no validation split; use heldout_split test, "
                         "or a source with one (dolly-heldout)")
    eval_tasks: list[str] = []
    if cfg.eval_tasks:
        if evaluator is None:
            raise BenchError("eval_tasks: this run was started without an evaluator; use `bench run`, or pass "
                             "evaluator=evaluators to run_federated, or set eval_tasks to []")
        eval_tasks = evaluator.expand_tasks(",".join(cfg.eval_tasks))
        evaluator.validate_tasks(eval_tasks, cfg.data_root)
        evaluator.check_code_consent(eval_tasks, cfg.eval_allow_code_execution)
    model_path, model_id = models.resolve_model(cfg.model)
    shapes = target_module_shapes(model_path, cfg.target_modules)
    smallest = min(min(s) for s in shapes.values())
    if max(ranks) > smallest:
        name = min(shapes, key=lambda n: min(shapes[n]))
        raise BenchError(f"ranks: rank {max(ranks)} exceeds the smaller dimension ({smallest}) of target module {name}; "
                         f"use ranks ≤ {smallest}")
    privacy.preflight(cfg, [len(s) for s in shards])
    return Plan(cfg, model_path, model_id, dataset, shards, ranks, shapes, eval_tasks, client_tests)


class _Signals:
    """SIGINT/SIGTERM set a flag; the engine stops at the next safe point (never mid-checkpoint). Observers hear
    of the signal as it arrives (events.signal)."""

    def __init__(self, run_dir: Path, events):
        self.hit: str | None = None
        self.run_dir, self.events = run_dir, events
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.hit = signal.Signals(signum).name
        self.events.signal(self.hit)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def check(self):
        if self.hit:
            ck = checkpoint_dir(self.run_dir)
            done = json.loads((ck / "meta.json").read_text()).get("round") if ck and (ck / "meta.json").is_file() else None
            where = f"round {done} is the last checkpointed round" if done else "no round was complete yet"
            raise Interrupted(f"{self.hit} received; {where}. Resume with: bench run --resume {self.run_dir}")


def _partition_hash(plan: Plan) -> str:
    """Fingerprint of what each client trains on (the records of its shard, not just their indices),
    the ranks and the held-out set: a resume must see the same partition as the killed run."""
    h = hashlib.sha256(json.dumps({"shards": plan.shards, "ranks": plan.ranks}).encode())
    for shard in plan.shards:
        h.update(json.dumps([plan.dataset.train[i] for i in shard], sort_keys=True, default=str).encode())
    h.update(json.dumps(plan.dataset.test, sort_keys=True, default=str).encode())
    return h.hexdigest()


def run_federated(cfg: RunConfig, *, resume: str | None = None, plan: Plan | None = None, log=print,
                  evaluator=None, transport=None) -> dict:
    """Run (or resume) a federated experiment end to end; returns the results record.

    transport: how task messages reach the clients, built by the framework that hosts this run (the contract:
    bench/transports/base.py); None: the engine starts the transport registered under cfg.engine. Nothing is
    written until every input has been checked (preflight, output paths, the checkpoint to resume from)."""
    if transport is not None and not isinstance(transport, Transport):
        raise BenchError(f"transport: {type(transport).__name__} is not a bench.transports.Transport; subclass it")
    started = (time.time(), load_avg(), _cpu_seconds())
    run = _prepare(cfg, plan or preflight(cfg, evaluator), resume, log, transport)
    with _Signals(run.run_dir, run.events) as signals:
        _rounds(run, signals)
        record = _finish(run, signals, evaluator, started)
    log(f"[bench] wrote {run.record_path}" + (f" and {run.run_dir / 'global_model'}" if cfg.keep_global_model else "")
        + f" in {run.timings['total_s']:.0f} s")
    return record


@dataclass
class _Run:
    """A run under way: what _prepare resolved and opened, read by the rounds and the final steps.
    cfg/plan: what the record describes; tcfg/tplan/method: what trains (a reference row trains differently)."""

    cfg: RunConfig
    plan: Plan
    tcfg: RunConfig
    tplan: Plan
    method: object
    device: torch.device
    dtype: torch.dtype
    compute: tuple       # (local training's matmul dtype, why)
    run_dir: Path
    config_hash: str
    log: object
    timings: dict
    server: ReplyFilter = None
    transport: Transport = None
    heldout: HeldOut = None
    events: Observers = None
    rounds_log: list = field(default_factory=list)
    clients_info: list = field(default_factory=list)
    ck_meta: dict = field(default_factory=dict)
    record_path: Path = None


def _prepare(cfg: RunConfig, plan: Plan, resume: str | None, log, transport) -> _Run:
    """Resolve what trains, check the output paths and the checkpoint to resume from, then open the run folder,
    start the clients (in-process unless a transport is given) and the server, restored from the checkpoint."""
    tcfg, tplan, method = cfg, plan, get_method(cfg.method, cfg.method_options)
    if cfg.reference:
        tcfg, tplan, method = reference_run(cfg, plan, lambda r: sample_clients(cfg.seed, r, cfg.num_clients, cfg.client_fraction))
    host = get_transport(tcfg.engine).host
    if transport is None and host:
        raise BenchError(f"engine: {tcfg.engine} runs under {host}, which builds its transport; run it with "
                         f"`bench run --engine {tcfg.engine}`")
    device = resolve_device(cfg)
    run_dir = Path(resume) if resume else Path(cfg.output_dir or Path("runs") / _run_id(cfg))
    _check_output_paths(cfg, run_dir, resume)
    dtype = resolve_dtype(cfg.dtype, device)
    run = _Run(cfg, plan, tcfg, tplan, method, device, dtype, resolve_compute_dtype(cfg.compute_dtype, dtype, device),
               run_dir, cfg.config_hash(), log, {"load_s": 0.0, "tokenize_s": 0.0, "train_s": 0.0, "aggregate_s": 0.0, "checkpoint_s": 0.0})
    run.ck_meta = {"config_hash": run.config_hash, "method": cfg.method, "run_id": run_dir.name,
                   "partition_sha256": _partition_hash(plan)}
    ck = load_checkpoint(run_dir, run.config_hash, cfg.method) if resume and checkpoint_dir(run_dir) else None
    if ck and ck[1].get("partition_sha256") != run.ck_meta["partition_sha256"]:
        raise BenchError(f"resume: the client partition or ranks differ from those of the checkpoint in {run_dir} "
                         "(the data files changed?); restore the data or start a new run")
    # ---- from here on, files are written
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        save_config(cfg, run_dir / "config.yaml")
    else:  # leftovers of a killed process: temporary folders never renamed into place
        for stale in list(run_dir.glob(".checkpoint.tmp*")) + list(run_dir.glob(".global_model.tmp*")):
            shutil.rmtree(stale, ignore_errors=True)
    _describe(run)
    t = time.time()
    tok = load_tokenizer(plan.model_path)
    run.heldout = HeldOut(cfg, plan.dataset, plan.client_tests, tok)
    if transport is None:
        transport = get_transport(tcfg.engine).start(tcfg, tplan, ModelSpec(plan.model_path, device, run.dtype), tok,
                                                     run.heldout, log)
        run.timings.update(transport.setup_s)
        run.timings["tokenize_s"] += time.time() - t - sum(transport.setup_s.values())  # the tokenizer's load
    elif tcfg.client_batching == "on":
        log(f"[bench] client_batching: on applies to the in-process engine; {tcfg.engine} trains its clients one by one")
    run.transport = transport
    run.server = ReplyFilter(Server(method, seed=tcfg.seed, num_clients=tcfg.num_clients, client_fraction=tcfg.client_fraction,
                                    ranks=tplan.ranks, scaling=tcfg.scaling), plan.module_shapes, tcfg.max_update_norm)
    if ck:
        state, meta, clients_state = ck
        run.server.restore(state)
        transport.restore(*(clients_state or ({}, {})), run.server.s.merges)
        run.rounds_log = meta["rounds"]
        done_rounds = run.server.round // method.exchanges_per_round
        log(f"[bench] resumed {run_dir} after round {done_rounds}"
            + (" (all rounds done: redoing the final steps)" if done_rounds >= tcfg.rounds else ""))
    elif resume:
        log(f"[bench] {run_dir} has no checkpoint yet: starting from round 1")
    run.events = Observers([*run_observers(), MetricsLog(run_dir, run.rounds_log), Progress(log, tcfg.rounds)]
                           + ([AuditTrail(run_dir, tcfg, plan.model_path, method.exchanges_per_round)]
                              if cfg.save_client_adapters else [])
                           + ([RoundStates(run_dir, run.server)] if cfg.keep_round_states else []))
    return run


def _describe(run: _Run) -> None:
    """Log what runs, and each client's share of the data (the record's clients section)."""
    cfg, plan, log = run.cfg, run.plan, run.log
    compute, reason = run.compute
    log(f"[bench] run {run.run_dir.name}: {'reference' if cfg.reference else 'method'}={cfg.reference or cfg.method} "
        f"model={plan.model_id} dataset={cfg.dataset} ({plan.dataset.origin}) partition={cfg.partition} "
        f"clients={run.tcfg.num_clients} rounds={run.tcfg.rounds} device={run.device} dtype={str(run.dtype)[6:]}")
    log(f"[bench] compute dtype {str(compute)[6:]}: {reason}")
    for k, shard in enumerate(plan.shards):
        hist = data_mod.label_histogram(plan.dataset, shard)
        run.clients_info.append({"id": k, "rank": plan.ranks[k], "num_examples": len(shard), "label_histogram": hist,
                                 "test_examples": len(plan.client_tests[k]) if plan.client_tests else 0})
        log(f"[bench]   client {k}: rank {plan.ranks[k]:>3}  examples {len(shard):>5}  labels {hist}")


def _rounds(run: _Run, signals) -> None:
    """The rounds not yet checkpointed: configure, carry, aggregate, observe, checkpoint. A signal stops the run at
    the next safe point; a round cut short is redone on resume."""
    server, transport, events, timings = run.server, run.transport, run.events, run.timings

    def on_step(msg, step):
        if step == 1:
            events.point(f"round{msg.round}:client{msg.client_id}")
        signals.check()

    def exchange(h: int, clients: list[int], rnd: int):
        """One configure → train → aggregate exchange (the server counts exchanges: h is its round number)."""
        tasks = server.configure(h, clients)
        replies = transport.run(tasks, on_reply=events.client_done, on_step=on_step)
        stale = [k for k, r in replies.items() if isinstance(r, Reply) and (r.error or "").startswith("base out of sync")]
        if stale:  # a client that lost its base (a restarted node): once more with every merge
            again = server.configure(h, stale, resend=True)
            replies.update(transport.run(again, on_reply=events.client_done, on_step=on_step))
            tasks = [m for m in tasks if m.client_id not in stale] + again
        timings["train_s"] += sum(r.metrics.get("seconds", 0.0) for r in replies.values() if isinstance(r, Reply))
        signals.check()
        t = time.time()
        result = server.aggregate(h, tasks, replies)
        agg_s = time.time() - t
        timings["aggregate_s"] += agg_s
        events.aggregated(result)
        if not result.updates:
            last = checkpoint_dir(run.run_dir)
            keep = (f"the last good checkpoint (round {rnd - 1}) is intact in {last}" if last
                    else "no round had completed, so there is no checkpoint")
            first = result.excluded[0]
            raise BenchError(f"clients: every client of round {rnd} was excluded (client {first['id']}: {first['reason']}); "
                             f"{keep}; lower lr or raise max_update_norm")
        return result, agg_s

    per_round = run.method.exchanges_per_round  # > 1: the round's exchanges run back to back, one row for them all
    for rnd in range(server.round // per_round + 1, run.tcfg.rounds + 1):
        t_round = time.time()
        clients = server.sample(rnd)
        done = [exchange(h, clients, rnd) for h in range((rnd - 1) * per_round + 1, rnd * per_round + 1)]
        result, agg_s = done[-1]
        events.point(f"round{rnd}:aggregate")
        row = {"round": rnd, "sampled": result.sampled, "clients": result.clients,
               "excluded": [e["id"] for e in result.excluded], **result.metrics,
               "aggregate_seconds": round(agg_s, 4), "seconds": round(time.time() - t_round, 3), "rss_mb": rss_mb()}
        if per_round > 1:  # every exchange's client rows (each names its exchange) and metrics; noise: the largest
            row.update(clients=[{**c, "exchange": i} for i, (r, _) in enumerate(done, 1) for c in r.clients],
                       excluded=[e["id"] for r, _ in done for e in r.excluded],
                       exchanges=[r.metrics for r, _ in done], aggregate_seconds=round(sum(a for _, a in done), 4))
            if any("noise" in r.metrics for r, _ in done):
                row["noise"] = max(r.metrics.get("noise", 0.0) for r, _ in done)
        privacy.account_round(run.tcfg, run.rounds_log, row)  # each client's spent ε through this round
        events.round_done(result, row)
        events.point(f"round{rnd}:metrics")
        t = time.time()
        save_checkpoint(run.run_dir, server.s, {**run.ck_meta, "rounds": run.rounds_log}, transport.state(), events)
        timings["checkpoint_s"] += time.time() - t
        signals.check()


def _finish(run: _Run, signals, evaluator, started: tuple) -> dict:
    """After the last round: the clients' own models (personalized methods, local-only: EVALUATE), then the global
    model from the server's deltas, its held-out losses and evaluation, the record. A kill from here on is resumed
    from the last round's checkpoint: training is skipped, these steps redone."""
    cfg, plan, method, events, timings = run.cfg, run.plan, run.method, run.events, run.timings
    t = time.time()
    pooled, own = run.heldout.pooled(), [run.heldout.own(k) for k in range(len(plan.client_tests))]
    personalized = None
    if method.personalized:  # each client scores its own model, wherever it runs
        asks = run.server.configure_evaluate(run.server.round + 1)
        personalized = run.server.aggregate_evaluate(asks, run.transport.evaluate(asks), len(pooled), [len(x) for x in own])
    engine_name = run.transport.name
    run.transport = None  # the clients' models are no longer needed: free them before the global model loads
    out = run.run_dir / "global_model"
    global_model = export_global_model(plan.model_path, run.server.global_delta(), export_dtype(cfg.export_dtype), out,
                                       events).to(run.device)
    if not run.server.s.merges and export_global_adapter(run.server.s.state.adapter, cfg.target_modules, plan.model_path,
                                                         run.run_dir / "global_adapter"):
        run.log(f"[bench] global adapter (PEFT) in {run.run_dir / 'global_adapter'}")
    timings["save_s"] = time.time() - t
    signals.check()
    t = time.time()
    events.point("test-loss")
    test = _test_section(run, global_model, pooled, own, personalized)
    del global_model
    timings["test_loss_s"] = time.time() - t
    run.log(f"[bench] held-out loss on {test['examples']} pooled {cfg.dataset} test examples: {test['loss']:.4f}"
            + (f"; each client's own split, mean {_mean([c['loss'] for c in test['per_client']]):.4f}" if "per_client" in test else ""))
    signals.check()
    eval_section = None
    if plan.eval_tasks and _has_global_model(run):
        events.point("eval")
        t = time.time()
        eval_section = evaluator.evaluate(str(out), plan.eval_tasks, backend=cfg.eval_backend, limit=cfg.eval_limit,
                                          num_fewshot=cfg.eval_num_fewshot, data_root=cfg.data_root,
                                          out_dir=str(run.run_dir / "eval"), seed=cfg.eval_seed, dtype=cfg.eval_dtype,
                                          allow_code_execution=cfg.eval_allow_code_execution,
                                          humaneval_form=cfg.eval_humaneval_form)
        timings["eval_s"] = time.time() - t
        signals.check()
    timings["total_s"] = time.time() - started[0]
    timings["cpu_s"] = _cpu_seconds() - started[2]  # what the run cost, whatever else ran on the machine
    record = _record(run, engine_name, test, eval_section, personalized, started[1])
    run.record_path = Path(cfg.results_dir) / f"{run.run_dir.name}.json"
    events.point("record")
    atomic_write_json(run.record_path, record)
    atomic_write_json(run.run_dir / "run.json", {"record": str(run.record_path.resolve())})
    if not cfg.keep_global_model:  # scored: export.global_model_dir writes it again from the checkpoint on demand
        shutil.rmtree(out)
    return record


def _has_global_model(run: _Run) -> bool:
    """local-only and FedSA-LoRA (has_global_model False) have none: the exported model is the base."""
    return run.cfg.reference != "local-only" and run.method.has_global_model


def _test_section(run: _Run, global_model, pooled: list[dict], own: list[list[dict]], personalized: dict | None) -> dict:
    """The record's test section: the global model's held-out losses, or without one the mean over clients of
    each client's own model (the base unscored)."""
    if not _has_global_model(run):
        test = {"model": "mean over clients of each client's own model", **personalized["pooled"],
                **({"per_client": personalized["per_client"]} if any(own) else {})}
    else:
        pad = run.heldout.tokenizer.pad_token_id
        test = _losses(global_model, pooled, pad, run.device)
        if any(own):
            test["per_client"] = [{"client": k, **_losses(global_model, ex, pad, run.device)} for k, ex in enumerate(own)]
    # whether another seed would score other held-out examples (reports pair a seed-free base row across seeds)
    test["split_by_seed"] = run.plan.dataset.test_by_seed and run.cfg.heldout_split == "test"
    return test


def _record(run: _Run, engine_name: str, test: dict, eval_section: dict | None, personalized: dict | None,
            load_start) -> dict:
    cfg, plan, method, device = run.cfg, run.plan, run.method, run.device
    compute, compute_reason = run.compute
    record = build_record(
        kind="run", run_id=run.run_dir.name, method=cfg.reference or cfg.method, engine=engine_name,
        method_info={"options": dict(method.opts), "averages_factors": method.averages_factors,
                     "merges_into_base": method.merges_into_base, "personalized": method.personalized,
                     "round_convention": method.round_convention, "reference": cfg.reference},
        setting=run_setting(cfg, plan.ranks, plan.model_id), seed=cfg.seed, config=cfg.to_dict(),
        config_hash=run.config_hash,
        provenance=provenance(model_id=plan.model_id, model_path=plan.model_path, data=plan.dataset.files,
                              data_origin=plan.dataset.origin,
                              device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                              load_start=load_start),
        dtypes={"training": str(run.dtype)[6:], "compute": str(compute)[6:], "compute_reason": compute_reason,
                "master": "float32", "export": str(export_dtype(cfg.export_dtype))[6:],
                "eval": (eval_section or {}).get("dtype")},
        clients=run.clients_info, rounds=run.rounds_log, test=test, eval=eval_section, timings=run.timings,
        run_dir=str(run.run_dir), personalized=personalized,
        privacy=privacy.record_section(run.tcfg, run.rounds_log, run.tcfg.num_clients) if privacy.enabled(run.tcfg) else None)
    return record


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (an evaluation worker)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def _losses(model, examples, pad, device) -> dict:
    """Held-out loss (mean per labelled token) with its per-example sums and token counts, for pairing."""
    sums, counts = held_out_losses(model, examples, pad, device)
    return {"loss": mean_loss(sums, counts), "examples": len(sums), "loss_sums": sums, "tokens": counts}
