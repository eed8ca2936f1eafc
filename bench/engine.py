"""The engine drives the rounds and owns the run's files; it knows no method by name.

    preflight (everything that can be refused, refused before any file is written)
    for each round:  server.sample → server.configure (one TaskMessage per client)
                     → transport.run (clients train; bench/client.py) → server.aggregate (bench/server.py)
                     (repeated exchanges_per_round times with the same clients, for a method that asks it)
                     → observers (metrics.jsonl, progress, audit) → checkpoint (atomic)
    export the global model from the server's full-precision deltas → held-out loss → injected
    evaluation → the results record (bench/record.py)

Determinism: every random draw derives from (seed, round, client), never from a running RNG, so a
run resumed from the checkpoint of round r reproduces rounds r+1… bit for bit on the same machine.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from methods import get_method

from . import BenchError, data as data_mod, hooks, models, privacy
from .checkpoint import checkpoint_dir, load_checkpoint, save_checkpoint
from .client import ClientRuntime, ModelSpec, held_out_losses, mean_loss
from .compute import resolve_compute_dtype
from .config import RunConfig, save_config
from .export import export_dtype, export_global_adapter, export_global_model
from .guard import ReplyFilter
from .io import atomic_write_json
from .messages import Reply
from .observers import AuditTrail, MetricsLog, Progress, RoundStates, rss_mb
from .record import build_record, load_avg, provenance, run_setting
from .references import reference_run
from .server import Server, sample_clients
from .transport import InProcessTransport


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


def resolve_device(cfg: RunConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise BenchError(f"device: {cfg.device} requested but no CUDA GPU is available; use --device cpu")
    return torch.device(cfg.device)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


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
    if method.exchanges_per_round > 1 and not cfg.reference:  # tested on the in-process loop; one row per round
        what = f"{cfg.method} with method_options {cfg.method_options} runs {method.exchanges_per_round} exchanges a round"
        if cfg.engine != "inprocess":
            raise BenchError(f"engine: {what}, which only the in-process engine is tested to drive; use --engine inprocess")
        if cfg.save_client_adapters:
            raise BenchError(f"save_client_adapters: {what}, and the audit trail keeps one folder per client and round; "
                             "drop --save-client-adapters or use the one-exchange schedule (its rounds are the exchanges)")
    ranks = cfg.client_ranks()
    try:
        method.check_ranks(ranks)
    except ValueError as exc:
        raise BenchError(str(exc)) from None
    dataset = data_mod.load_dataset(cfg)
    if cfg.heldout_split == "validation" and not dataset.validation:
        raise BenchError(f"heldout_split: dataset {cfg.dataset} holds out no validation split; use heldout_split test, "
                         "or a source with one (dolly-heldout)")
    shards, client_tests = data_mod.client_test_splits(cfg, data_mod.partition(cfg, dataset))
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
    """SIGINT/SIGTERM set a flag; the engine stops at the next safe point (never mid-checkpoint)."""

    def __init__(self, run_dir: Path):
        self.hit: str | None = None
        self.run_dir = run_dir
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
        hooks.SIGNALLED.append(self.hit)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def check(self):
        if self.hit:
            ck = checkpoint_dir(self.run_dir)
            done = json.loads((ck / "meta.json").read_text()).get("round") if ck and (ck / "meta.json").is_file() else None
            where = f"round {done} is the last checkpointed round" if done else "no round was complete yet"
            raise Interrupted(f"{self.hit} received; {where}. Resume with: bench run --resume {self.run_dir}")


def _check_output_paths(cfg: RunConfig, run_dir: Path, resume: str | None) -> None:
    """Refuse output locations that would fail only at the end of the run."""
    for what, path in (("output_dir", run_dir), ("results_dir", Path(cfg.results_dir))):
        if path.exists() and not path.is_dir():
            raise BenchError(f"{what}: {path} exists and is not a folder; pass a folder path")
        probe = path
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if probe.exists() and not probe.is_dir():
            raise BenchError(f"{what}: {probe} (a parent of {path}) is a file, not a folder; pass a folder path")
        if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
            raise BenchError(f"{what}: {probe} is not writable; pass a folder you can write to")
    if not resume and ((run_dir / "checkpoint").exists() or (run_dir / "checkpoint.old").exists()):
        raise BenchError(f"output_dir: {run_dir} already holds a run; use --resume {run_dir} or another --output-dir")


def _partition_hash(plan: Plan) -> str:
    """Fingerprint of what each client trains on (the records of its shard, not just their indices),
    the ranks and the held-out set: a resume must see the same partition as the killed run."""
    h = hashlib.sha256(json.dumps({"shards": plan.shards, "ranks": plan.ranks}).encode())
    for shard in plan.shards:
        h.update(json.dumps([plan.dataset.train[i] for i in shard], sort_keys=True, default=str).encode())
    h.update(json.dumps(plan.dataset.test, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _run_id(cfg: RunConfig) -> str:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    return f"{cfg.reference or cfg.method}-{cfg.preset or 'custom'}-s{cfg.seed}-{stamp}"


def load_tokenizer(model_path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def client_examples(cfg: RunConfig, plan: Plan, tok, clients) -> dict[int, list[dict]]:
    """The tokenized training examples of the given clients (once per run, reused every round)."""
    return {k: [data_mod.tokenize(plan.dataset.train[i], tok, cfg.prompt_template, cfg.cutoff_len, cfg.train_on_inputs)
                for i in plan.shards[k]] for k in clients}


def held_out_examples(cfg: RunConfig, plan: Plan, tokenizer) -> list[dict]:
    test = plan.dataset.validation if cfg.heldout_split == "validation" else plan.dataset.test
    if cfg.test_limit and len(test) > cfg.test_limit:
        pick = np.random.default_rng([cfg.eval_seed, 31337]).permutation(len(test))[: cfg.test_limit]  # same examples for every seed
        test = [test[i] for i in sorted(pick)]
    return [data_mod.tokenize(r, tokenizer, cfg.prompt_template, cfg.cutoff_len, False) for r in test]


def run_federated(cfg: RunConfig, *, resume: str | None = None, plan: Plan | None = None, log=print,
                  evaluator=None, transport=None) -> dict:
    """Run (or resume) a federated experiment end to end; returns the results record.

    transport: how task messages reach the clients (run/state/restore/name, see bench/transport.py);
    None: this process trains every client itself (InProcessTransport over one ClientRuntime).
    Nothing is written until every input has been checked (preflight, output paths, the checkpoint
    to resume from)."""
    t_start, load_start, cpu_start = time.time(), load_avg(), _cpu_seconds()
    plan = plan or preflight(cfg, evaluator)
    name = cfg.reference or cfg.method
    # tcfg/tplan/method: what trains (a reference row trains differently); cfg/plan: what the record describes
    tcfg, tplan, method = cfg, plan, get_method(cfg.method, cfg.method_options)
    if cfg.reference:
        tcfg, tplan, method = reference_run(cfg, plan, lambda r: sample_clients(cfg.seed, r, cfg.num_clients, cfg.client_fraction))
    device = resolve_device(cfg)
    dtype = resolve_dtype(cfg.dtype, device)
    compute, compute_reason = resolve_compute_dtype(cfg.compute_dtype, dtype, device)
    out_dtype = export_dtype(cfg.export_dtype)
    run_dir = Path(resume) if resume else Path(cfg.output_dir or Path("runs") / _run_id(cfg))
    run_id = run_dir.name
    _check_output_paths(cfg, run_dir, resume)
    config_hash = cfg.config_hash()
    part_hash = _partition_hash(plan)
    ck = None
    if resume and checkpoint_dir(run_dir):
        ck = load_checkpoint(run_dir, config_hash, cfg.method)
        if ck[1].get("partition_sha256") != part_hash:
            raise BenchError(f"resume: the client partition or ranks differ from those of the checkpoint in {run_dir} "
                             "(the data files changed?); restore the data or start a new run")
    # ---- from here on, files are written
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        save_config(cfg, run_dir / "config.yaml")
    else:  # leftovers of a killed process: temporary folders never renamed into place
        for stale in list(run_dir.glob(".checkpoint.tmp*")) + list(run_dir.glob(".global_model.tmp*")):
            shutil.rmtree(stale, ignore_errors=True)

    log(f"[bench] run {run_id}: {'reference' if cfg.reference else 'method'}={name} model={plan.model_id} "
        f"dataset={cfg.dataset} ({plan.dataset.origin}) partition={cfg.partition} clients={tcfg.num_clients} "
        f"rounds={tcfg.rounds} device={device} dtype={str(dtype)[6:]}")
    log(f"[bench] compute dtype {str(compute)[6:]}: {compute_reason}")
    clients_info = []
    for k, shard in enumerate(plan.shards):
        hist = data_mod.label_histogram(plan.dataset, shard)
        clients_info.append({"id": k, "rank": plan.ranks[k], "num_examples": len(shard), "label_histogram": hist,
                             "test_examples": len(plan.client_tests[k]) if plan.client_tests else 0})
        log(f"[bench]   client {k}: rank {plan.ranks[k]:>3}  examples {len(shard):>5}  labels {hist}")

    timings = {"load_s": 0.0, "tokenize_s": 0.0, "train_s": 0.0, "aggregate_s": 0.0, "checkpoint_s": 0.0}
    t = time.time()
    tok = load_tokenizer(plan.model_path)
    runtime = None
    if transport is None:
        examples = client_examples(tcfg, tplan, tok, range(tcfg.num_clients))
        timings["tokenize_s"] = time.time() - t
        t = time.time()
        runtime = ClientRuntime(tcfg, ModelSpec(plan.model_path, device, dtype), tplan.ranks, examples)
        timings["load_s"] = time.time() - t
        transport = InProcessTransport(runtime, batched=_client_batching(tcfg, device, log))
    elif tcfg.client_batching == "on":
        log(f"[bench] client_batching: on applies to the in-process engine; {tcfg.engine} trains its clients one by one")
    transport = hooks.wrap_transport(transport)
    server = ReplyFilter(Server(method, seed=tcfg.seed, num_clients=tcfg.num_clients, client_fraction=tcfg.client_fraction,
                                ranks=tplan.ranks, scaling=tcfg.scaling), plan.module_shapes, tcfg.max_update_norm)
    rounds_log: list[dict] = []
    if ck:
        state, meta, clients_state = ck
        server.restore(state)
        transport.restore(*(clients_state or ({}, {})), server.s.merges)
        rounds_log = meta["rounds"]
        done_rounds = server.round // method.exchanges_per_round
        log(f"[bench] resumed {run_dir} after round {done_rounds}"
            + (" (all rounds done: redoing the final steps)" if done_rounds >= tcfg.rounds else ""))
    elif resume:
        log(f"[bench] {run_dir} has no checkpoint yet: starting from round 1")
    observers = [MetricsLog(run_dir, rounds_log), Progress(log, tcfg.rounds)]
    if cfg.save_client_adapters:
        observers.append(AuditTrail(run_dir, tcfg, plan.model_path))
    if cfg.keep_round_states:
        observers.append(RoundStates(run_dir, server))
    ck_meta = {"config_hash": config_hash, "method": cfg.method, "run_id": run_id, "partition_sha256": part_hash}

    with _Signals(run_dir) as signals:
        def on_step(msg, step):
            if step == 1:
                hooks.point(f"round{msg.round}:client{msg.client_id}")
            signals.check()  # a round cut short is redone on resume

        def on_reply(msg, reply):
            for o in observers:
                o.client_done(msg, reply)

        if runtime is not None:
            runtime.on_step = on_step

        def exchange(h: int, clients: list[int]):
            """One configure → train → aggregate exchange (the server counts exchanges: h is its round number)."""
            tasks = server.configure(h, clients)
            replies = transport.run(tasks, on_reply=on_reply)
            stale = [k for k, r in replies.items() if isinstance(r, Reply) and (r.error or "").startswith("base out of sync")]
            if stale:  # a client that lost its base (a restarted node): once more with every merge
                again = server.configure(h, stale, resend=True)
                replies.update(transport.run(again, on_reply=on_reply))
                tasks = [m for m in tasks if m.client_id not in stale] + again
            timings["train_s"] += sum(r.metrics.get("seconds", 0.0) for r in replies.values() if isinstance(r, Reply))
            signals.check()
            t = time.time()
            result = server.aggregate(h, tasks, replies)
            agg_s = time.time() - t
            timings["aggregate_s"] += agg_s
            for o in observers:
                o.aggregated(result)
            if not result.updates:
                last = checkpoint_dir(run_dir)
                keep = (f"the last good checkpoint (round {rnd - 1}) is intact in {last}" if last
                        else "no round had completed, so there is no checkpoint")
                first = result.excluded[0]
                raise BenchError(f"clients: every client of round {rnd} was excluded (client {first['id']}: {first['reason']}); "
                                 f"{keep}; lower lr or raise max_update_norm")
            return result, agg_s

        per_round = method.exchanges_per_round  # > 1: the round's exchanges run back to back, one row for them all
        for rnd in range(server.round // per_round + 1, tcfg.rounds + 1):
            t_round = time.time()
            clients = server.sample(rnd)
            done = [exchange(h, clients) for h in range((rnd - 1) * per_round + 1, rnd * per_round + 1)]
            result, agg_s = done[-1]
            hooks.point(f"round{rnd}:aggregate")
            row = {"round": rnd, "sampled": result.sampled, "clients": result.clients,
                   "excluded": [e["id"] for e in result.excluded], **result.metrics,
                   "aggregate_seconds": round(agg_s, 4), "seconds": round(time.time() - t_round, 3), "rss_mb": rss_mb()}
            if per_round > 1:  # every exchange's client rows (each names its exchange) and metrics; noise: the largest
                row.update(clients=[{**c, "exchange": i} for i, (r, _) in enumerate(done, 1) for c in r.clients],
                           excluded=[e["id"] for r, _ in done for e in r.excluded],
                           exchanges=[r.metrics for r, _ in done], aggregate_seconds=round(sum(a for _, a in done), 4))
                if any("noise" in r.metrics for r, _ in done):
                    row["noise"] = max(r.metrics.get("noise", 0.0) for r, _ in done)
            privacy.account_round(tcfg, rounds_log, row)  # each client's spent ε through this round
            for o in observers:
                o.round_done(result, row)
            hooks.point(f"round{rnd}:metrics")
            t = time.time()
            save_checkpoint(run_dir, server.s, {**ck_meta, "rounds": rounds_log}, transport.state())
            timings["checkpoint_s"] += time.time() - t
            signals.check()

        # After the last round: the clients' own models (personalized methods, local-only), then the global
        # model from the server's deltas. A kill from here on is resumed from the last round's checkpoint:
        # training is skipped, these steps redone.
        t = time.time()
        pooled = held_out_examples(cfg, plan, tok)
        own = [[data_mod.tokenize(plan.dataset.train[i], tok, cfg.prompt_template, cfg.cutoff_len, False) for i in split]
               for split in plan.client_tests]
        personalized = None
        # local-only and FedSA-LoRA (has_global_model False) have no global model: the exported one is the base
        no_global = cfg.reference == "local-only" or not method.has_global_model
        if method.personalized and runtime is not None:
            personalized = _own_models(runtime, server, server.round + 1, pooled, own)
        engine_name = transport.name
        del runtime, transport
        out = run_dir / "global_model"
        global_model = export_global_model(plan.model_path, server.global_delta(), out_dtype, out).to(device)
        if not server.s.merges and export_global_adapter(server.s.state.adapter, cfg.target_modules, plan.model_path,
                                                         run_dir / "global_adapter"):
            log(f"[bench] global adapter (PEFT) in {run_dir / 'global_adapter'}")
        timings["save_s"] = time.time() - t
        signals.check()
        t = time.time()
        hooks.point("test-loss")
        if no_global:  # the row's model is each client's own: the score is the mean over them (the base unscored)
            test = {"model": "mean over clients of each client's own model", **personalized["pooled"],
                    **({"per_client": personalized["per_client"]} if any(own) else {})}
        else:
            test = _losses(global_model, pooled, tok.pad_token_id, device)
            if any(own):
                test["per_client"] = [{"client": k, **_losses(global_model, ex, tok.pad_token_id, device)}
                                      for k, ex in enumerate(own)]
        del global_model
        # whether another seed would score other held-out examples (reports pair a seed-free base row across seeds)
        test["split_by_seed"] = plan.dataset.test_by_seed and cfg.heldout_split == "test"
        timings["test_loss_s"] = time.time() - t
        log(f"[bench] held-out loss on {test['examples']} pooled {cfg.dataset} test examples: {test['loss']:.4f}"
            + (f"; each client's own split, mean {_mean([c['loss'] for c in test['per_client']]):.4f}" if "per_client" in test else ""))
        signals.check()

        eval_section = None
        if plan.eval_tasks and not no_global:
            hooks.point("eval")
            t = time.time()
            eval_section = evaluator.evaluate(str(out), plan.eval_tasks, backend=cfg.eval_backend, limit=cfg.eval_limit,
                                              num_fewshot=cfg.eval_num_fewshot, data_root=cfg.data_root,
                                              out_dir=str(run_dir / "eval"), seed=cfg.eval_seed, dtype=cfg.eval_dtype,
                                              allow_code_execution=cfg.eval_allow_code_execution,
                                              humaneval_form=cfg.eval_humaneval_form)
            timings["eval_s"] = time.time() - t
            signals.check()
        timings["total_s"] = time.time() - t_start
        timings["cpu_s"] = _cpu_seconds() - cpu_start  # what the run cost, whatever else ran on the machine
        record = build_record(
            kind="run", run_id=run_id, method=name, engine=engine_name,
            method_info={"options": dict(method.opts), "averages_factors": method.averages_factors,
                         "merges_into_base": method.merges_into_base, "personalized": method.personalized,
                         "round_convention": method.round_convention, "reference": cfg.reference},
            setting=run_setting(cfg, plan.ranks, plan.model_id), seed=cfg.seed, config=cfg.to_dict(),
            config_hash=config_hash,
            provenance=provenance(model_id=plan.model_id, model_path=plan.model_path, data=plan.dataset.files,
                                  data_origin=plan.dataset.origin,
                                  device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                                  load_start=load_start),
            dtypes={"training": str(dtype)[6:], "compute": str(compute)[6:], "compute_reason": compute_reason,
                    "master": "float32", "export": str(out_dtype)[6:], "eval": (eval_section or {}).get("dtype")},
            clients=clients_info, rounds=rounds_log, test=test, eval=eval_section, timings=timings, run_dir=str(run_dir))
        if personalized is not None:
            record["personalized"] = personalized
        if privacy.enabled(tcfg):
            record["privacy"] = privacy.record_section(tcfg, rounds_log, tcfg.num_clients)
        record_path = Path(cfg.results_dir) / f"{run_id}.json"
        hooks.point("record")
        atomic_write_json(record_path, record)
        atomic_write_json(run_dir / "run.json", {"record": str(record_path.resolve())})
        if not cfg.keep_global_model:  # scored: export.global_model_dir writes it again from the checkpoint on demand
            shutil.rmtree(out)
    log(f"[bench] wrote {record_path}" + (f" and {out}" if cfg.keep_global_model else "")
        + f" in {timings['total_s']:.0f} s")
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


def _client_batching(cfg: RunConfig, device: torch.device, log) -> bool:
    """Whether a round's clients train in one batch (bench/batched.py): the mode, and whether the method allows."""
    from .batched import refusal, use_batching

    if not use_batching(cfg.client_batching, device):
        return False
    from . import privacy

    if privacy.enabled(cfg):
        why = "DP-SGD clips and noises each client's per-example gradients one client at a time"
    elif cfg.length_buckets and 1 < cfg.micro_batch_size < cfg.batch_size and cfg.lora_dropout > 0:
        why = ("length-bucketed micro-batches draw dropout masks the batched forward does not reproduce (set "
               "--length-buckets false or micro_batch_size = batch_size to batch them)")
    elif cfg.compute_dtype != "float32" and device.type == "cpu":
        why = f"compute_dtype {cfg.compute_dtype} (autocast over float32 masters) is applied by the sequential path only"
    else:
        why = refusal(get_method(cfg.method, cfg.method_options))
    if why:
        log(f"[bench] client_batching: {why}; its clients train one by one")
        return False
    log(f"[bench] client_batching: on ({cfg.client_batching}): a round's clients share one forward/backward per micro-step")
    return True


def _own_models(runtime: ClientRuntime, server, next_round: int, pooled: list[dict], own: list[list[dict]]) -> dict:
    """Each client's own model — what it would start round `next_round` from (the method's task for it, its
    kept factors in place) — on the pooled test set and on its own split; the pooled figure per example is the
    mean over clients, so it pairs with a global model's."""
    per_pooled, per_own = [], []
    for msg in server.configure(next_round, list(range(server.num_clients))):
        k = msg.client_id
        sets = runtime.own_losses(msg, [pooled, own[k]] if own and own[k] else [pooled])
        per_pooled.append({"client": k, "loss": mean_loss(*sets[0]), "loss_sums": sets[0][0], "tokens": sets[0][1]})
        if len(sets) > 1:
            per_own.append({"client": k, "loss": mean_loss(*sets[1]), "examples": len(sets[1][0]),
                            "loss_sums": sets[1][0], "tokens": sets[1][1]})
    n = len(per_pooled)
    sums = [sum(c["loss_sums"][i] for c in per_pooled) / n for i in range(len(pooled))]
    tokens = per_pooled[0]["tokens"] if per_pooled else []
    out = {"clients": n, "pooled": {"loss": mean_loss(sums, tokens), "examples": len(pooled), "loss_sums": sums,
                                    "tokens": tokens},
           "per_client_pooled": [{"client": c["client"], "loss": c["loss"]} for c in per_pooled]}
    if per_own:  # each client's own model on its own split, and their mean
        out["per_client"] = per_own
        out["loss"] = _mean([c["loss"] for c in per_own])
    return out
