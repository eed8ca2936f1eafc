"""The federated simulation engine: one base model, adapters swapped per client, methods from the
registry (the engine knows none by name).

Determinism: every random draw derives from (seed, round, client), never from a running RNG, so a
run resumed from the checkpoint of round r reproduces rounds r+1… bit for bit on the same machine.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from methods import Aggregate, ClientUpdate, GlobalState, get_method
from methods.factors import product_fro_norm

from . import BenchError, data as data_mod, models
from .config import RunConfig, save_config
from .provenance import CODE, packages
from .io import RECORD_SCHEMA_VERSION, atomic_replace_dir, atomic_write_json, atomic_write_text

CHECKPOINT_VERSION = 1

# ---- test hooks (documented in docs/reliability.md; inert unless the env var is set) -------------
# BENCH_TEST_KILL_AT=<point>: the process SIGKILLs itself at that exact point, so tests can crash a
#   real run deterministically. Points: round<r>:client<k> (after the first optimizer step of client k
#   in round r), round<r>:aggregate (after aggregation and the merge into the base, nothing saved),
#   round<r>:metrics (metrics.jsonl written, checkpoint not), round<r>:checkpoint-write (new state
#   file half-way: written to the temporary folder, not renamed), round<r>:checkpoint-swap (old
#   checkpoint moved aside, new one not yet in place), test-loss, final-save (global model written to
#   its temporary folder), eval, record (global model in place, results record not yet written);
#   eval-request:<n> (evaluators.runner: right after lm-eval's n-th answered request is in the request cache).
# BENCH_TEST_PAUSE_AT=<point>: at that point the process prints "test hook: paused at <point>" to stderr
#   and waits (≤ 300 s) for SIGINT/SIGTERM, so a test can deliver a real signal at an exact point.
# BENCH_TEST_POISON=<r>:<k>[:nan|inf|big]: after local training, client k of round r (k may be *)
#   sends NaN / Inf factors, or factors scaled by 1e6 (for max_update_norm).


_SIGNALLED: list[str] = []  # filled by _Signals._handle; read by the pause hook


def _test_kill(point: str) -> None:
    if os.environ.get("BENCH_TEST_KILL_AT") == point:
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("BENCH_TEST_PAUSE_AT") == point:
        print(f"[bench] test hook: paused at {point}", file=sys.stderr, flush=True)
        deadline = time.time() + 300
        while not _SIGNALLED and time.time() < deadline:
            time.sleep(0.02)


def _test_poison(rnd: int, k: int, factors: dict) -> None:
    spec = os.environ.get("BENCH_TEST_POISON")
    if not spec:
        return
    r, c, *kind = spec.split(":")
    if int(r) != rnd or (c != "*" and int(c) != k):
        return
    kind = kind[0] if kind else "nan"
    for name, (a, b) in factors.items():
        if kind == "big":
            b.mul_(1e6)
        else:
            a.fill_(float("nan") if kind == "nan" else float("inf"))
            break


def _rss_mb() -> float | None:
    """Resident set size of this process now (not the peak), in MiB."""
    try:
        with open("/proc/self/statm") as f:
            return round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20, 1)
    except (OSError, ValueError, AttributeError):
        try:
            import psutil
            return round(psutil.Process().memory_info().rss / 2 ** 20, 1)
        except Exception:
            return None


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


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def _device(cfg: RunConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise BenchError(f"device: {cfg.device} requested but no CUDA GPU is available; use --device cpu")
    return torch.device(cfg.device)


def _dtype(cfg: RunConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, cfg.dtype)


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


def preflight(cfg: RunConfig) -> Plan:
    get_method(cfg.method)  # already validated by build_config; keeps preflight safe for direct callers
    ranks = cfg.client_ranks()
    dataset = data_mod.load_dataset(cfg)
    shards = data_mod.partition(cfg, dataset)
    eval_tasks: list[str] = []
    if cfg.eval_tasks:
        from evaluators import expand_tasks, validate_tasks

        eval_tasks = expand_tasks(",".join(cfg.eval_tasks))
        validate_tasks(eval_tasks, cfg.data_root)
    model_path, model_id = models.resolve_model(cfg.model)
    shapes = target_module_shapes(model_path, cfg.target_modules)
    smallest = min(min(s) for s in shapes.values())
    if max(ranks) > smallest:
        name = min(shapes, key=lambda n: min(shapes[n]))
        raise BenchError(f"ranks: rank {max(ranks)} exceeds the smaller dimension ({smallest}) of target module {name}; "
                         f"use ranks ≤ {smallest}")
    return Plan(cfg, model_path, model_id, dataset, shards, ranks, shapes, eval_tasks)


# ---- the shared model and its adapters ----------------------------------------------------------

class ClientModel:
    """One base model with one peft adapter slot per distinct rank; clients borrow a slot in turn."""

    def __init__(self, plan: Plan, device: torch.device, dtype: torch.dtype):
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        cfg = plan.cfg
        self.cfg, self.device = cfg, device
        self.tokenizer = AutoTokenizer.from_pretrained(plan.model_path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        base = AutoModelForCausalLM.from_pretrained(plan.model_path, dtype=dtype).to(device)
        base.config.use_cache = False
        self.model = None
        for r in sorted(set(plan.ranks)):
            lora = LoraConfig(r=r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                              target_modules=list(cfg.target_modules), use_rslora=cfg.use_rslora, task_type="CAUSAL_LM")
            if self.model is None:
                self.model = get_peft_model(base, lora, adapter_name=f"r{r}")
            else:
                self.model.add_adapter(f"r{r}", lora)
        self.max_rank = max(plan.ranks)
        self.layers = {}
        prefix = "base_model.model."
        for name, mod in self.model.named_modules():
            if hasattr(mod, "lora_A") and hasattr(mod, "base_layer") and len(mod.lora_A):
                self.layers[name[len(prefix):] if name.startswith(prefix) else name] = mod
        for name, layer in self.layers.items():  # the scaling we aggregate with must be peft's own
            for adapter, s in layer.scaling.items():
                r = int(adapter[1:])
                if not math.isclose(s, cfg.scaling(r), rel_tol=1e-9):
                    raise RuntimeError(f"scaling mismatch at {name}: peft {s}, config {cfg.scaling(r)}")

    def load_client(self, rank: int, init: dict | None, init_seed: int) -> str:
        """Activate the rank's slot: peft-style fresh init (A kaiming-uniform, B zero), then the
        method's factors in the first rows/columns.

        The fresh A is the first `rank` rows of one max-rank draw seeded by (seed, round) alone: every
        client of a round starts from the same global initialisation, as the server would send it
        (FedIT, Flower). Independent per-client draws would make averaged A's shrink like 1/√K and
        inflate FedAvg's aggregation noise with randomness that no real deployment has.
        """
        adapter = f"r{rank}"
        self.model.set_adapter(adapter)
        gen = torch.Generator().manual_seed(init_seed)
        with torch.no_grad():
            for name, layer in self.layers.items():
                a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
                fresh = torch.empty(self.max_rank, a.shape[1], dtype=torch.float32)
                torch.nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=gen)  # bound depends on d_in only
                a.copy_(fresh[:rank])
                b.zero_()
                if init is not None:
                    a0, b0 = init[name]
                    r0 = a0.shape[0]
                    a[:r0].copy_(a0)
                    b[:, :r0].copy_(b0)
        return adapter

    def factors(self, adapter: str) -> dict:
        return {name: (layer.lora_A[adapter].weight.detach().float().cpu().clone(),
                       layer.lora_B[adapter].weight.detach().float().cpu().clone())
                for name, layer in self.layers.items()}

    def add_to_base(self, delta: dict) -> None:
        """W ← W + B @ A for each module (float32 product, cast to the weight dtype)."""
        with torch.no_grad():
            for name, (a, b) in delta.items():
                w = self.layers[name].base_layer.weight
                w.add_((b.double() @ a.double()).float().to(w.device, w.dtype) if w.dtype == torch.float32
                       else (b @ a).to(w.device, w.dtype))

    def base_weights(self) -> dict[str, torch.Tensor]:
        return {name: layer.base_layer.weight.detach().cpu().clone() for name, layer in self.layers.items()}

    def set_base_weights(self, weights: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, w in weights.items():
                self.layers[name].base_layer.weight.copy_(w)


# Architectures whose logits are exactly lm_head(final hidden state): no softcapping, no logit scale.
PLAIN_LM_HEAD = {"llama", "mistral", "qwen2", "qwen3", "phi3"}


def token_loss(model, batch, device) -> tuple[torch.Tensor, int]:
    """Sum of next-token losses over the labelled tokens, and their count.

    Only about a third of the positions carry a label (the response), and the 49k-way output layer
    is ~20% of SmolLM2's compute per token: for plain-lm_head architectures we run the decoder, keep
    the labelled positions, and apply the output layer to those alone (same loss and gradients;
    1.15× faster training measured in benchmarks/engine_perf.py's prototype).
    """
    ids, labels, mask = (t.to(device) for t in batch)
    target = labels[:, 1:]
    keep = target != -100
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "model_type", None) in PLAIN_LM_HEAD:
        hidden = base.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1][keep]
        logits = base.get_output_embeddings()(hidden).float()
        loss = torch.nn.functional.cross_entropy(logits, target[keep], reduction="sum")
    else:
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                 ignore_index=-100, reduction="sum")
    return loss, int(keep.sum())


def train_client(cm: ClientModel, examples: list[dict], cfg: RunConfig, seed: int, progress=None, on_step=None) -> dict:
    """Local training of the active adapter: AdamW, gradient accumulation, loss on labelled tokens."""
    model = cm.model
    model.train()
    torch.manual_seed(seed)  # dropout
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    n = len(examples)
    steps = cfg.local_steps or max(1, math.ceil(cfg.local_epochs * n / cfg.batch_size))
    rng = np.random.default_rng(seed)
    stream: list[int] = []
    losses, tokens = [], 0
    pad = cm.tokenizer.pad_token_id
    for _ in range(steps):
        while len(stream) < cfg.batch_size:
            stream.extend(rng.permutation(n).tolist())
        batch, stream = stream[: cfg.batch_size], stream[cfg.batch_size:]
        micro = [batch[i:i + cfg.micro_batch_size] for i in range(0, len(batch), cfg.micro_batch_size)]
        encoded = [data_mod.collate([examples[j] for j in m], pad) for m in micro]
        n_tok = sum(int((e[1][:, 1:] != -100).sum()) for e in encoded)
        step_loss = 0.0
        for enc in encoded:  # sum / tokens-in-the-whole-batch: accumulation equals one big batch
            loss, _ = token_loss(model, enc, cm.device)
            (loss / max(n_tok, 1)).backward()
            step_loss += loss.item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(step_loss / max(n_tok, 1))
        tokens += sum(int(e[2].sum()) for e in encoded)
        if progress is not None:
            progress.update(1)
        if on_step is not None:  # the engine's signal check and test hook; may raise Interrupted
            on_step(len(losses))
    del opt
    return {"loss": float(np.mean(losses)), "first_loss": losses[0], "last_loss": losses[-1], "steps": steps, "tokens": tokens}


@torch.no_grad()
def held_out_loss(model, examples: list[dict], pad: int, device, batch_size: int = 8) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        loss, n = token_loss(model, data_mod.collate(examples[i:i + batch_size], pad), device)
        total, count = total + float(loss), count + n
    return total / max(count, 1)


def tensor_bytes(factors: dict | None) -> int:
    if not factors:
        return 0
    return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in factors.values())


# ---- checkpoints ---------------------------------------------------------------------------------

def save_checkpoint(run_dir: Path, rnd: int, state: GlobalState, base: dict | None, meta: dict) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for name, (a, b) in state.adapter.items():
        tensors[f"adapter::{name}::A"], tensors[f"adapter::{name}::B"] = a.contiguous(), b.contiguous()
    for name, w in (base or {}).items():
        tensors[f"base::{name}"] = w.contiguous()
    tmp = run_dir / f".checkpoint.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "state.safetensors"))
    with open(tmp / "state.safetensors", "rb") as f:
        os.fsync(f.fileno())
    _test_kill(f"round{rnd}:checkpoint-write")
    atomic_write_json(tmp / "meta.json", {**meta, "round": rnd, "checkpoint_version": CHECKPOINT_VERSION,
                                         "state_sha256": models.file_sha256(tmp / "state.safetensors")})
    atomic_replace_dir(tmp, run_dir / "checkpoint", between=lambda: _test_kill(f"round{rnd}:checkpoint-swap"))


def checkpoint_dir(run_dir: Path) -> Path | None:
    """The folder holding the last complete checkpoint, or None (no round finished yet).

    `checkpoint/` only ever appears by renaming a complete folder. A crash between moving the old one
    aside and renaming the new one in leaves `checkpoint.old/` as the last complete round."""
    for name in ("checkpoint", "checkpoint.old"):
        if (run_dir / name).is_dir():
            return run_dir / name
    return None


def load_checkpoint(run_dir: Path, config_hash: str, method: str) -> tuple[int, GlobalState, dict, dict]:
    from safetensors.torch import load_file

    ck = checkpoint_dir(run_dir) or run_dir / "checkpoint"
    meta_path = ck / "meta.json"
    if not meta_path.is_file():
        raise BenchError(f"resume: {run_dir} has no complete checkpoint ({meta_path} missing); start the run again without --resume")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BenchError(f"resume: {meta_path} is corrupt (not JSON); delete {ck} and start again without --resume") from None
    if not isinstance(meta, dict) or meta.get("checkpoint_version") != CHECKPOINT_VERSION or not isinstance(meta.get("round"), int):
        raise BenchError(f"resume: {meta_path} is not a fedlora-bench v{CHECKPOINT_VERSION} checkpoint; start again without --resume")
    if meta.get("config_hash") != config_hash or meta.get("method") != method:
        raise BenchError(f"resume: the checkpoint in {ck} belongs to another run (method or config differs); "
                         "resume it with its own config.yaml, or start a new run")
    state_path = ck / "state.safetensors"
    if not state_path.is_file() or models.file_sha256(state_path) != meta.get("state_sha256"):
        raise BenchError(f"resume: {state_path} is missing or corrupt (checksum mismatch); delete {ck} and start again")
    try:
        tensors = load_file(str(state_path))
        adapter, base = {}, {}
        for key, t in tensors.items():
            kind, name, *part = key.split("::")
            if kind == "adapter":
                adapter.setdefault(name, {})[part[0]] = t
            elif kind == "base":
                base[name] = t
            else:
                raise ValueError(key)
        state = GlobalState({n: (ab["A"], ab["B"]) for n, ab in adapter.items()}, meta["round"])
    except Exception:
        raise BenchError(f"resume: {state_path} does not hold fedlora-bench checkpoint tensors; delete {ck} and start again") from None
    return meta["round"], state, base, meta


# ---- provenance ----------------------------------------------------------------------------------

def provenance(plan: Plan, device: torch.device) -> dict:
    return {"packages": packages(), **CODE, "python": platform.python_version(),
            "platform": platform.platform(), "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "model_id": plan.model_id, "model_path": plan.model_path, "model_hash": models.weights_hash(plan.model_path),
            "data": plan.dataset.files, "data_origin": plan.dataset.origin}


def setting_of(cfg: RunConfig, ranks: list[int]) -> dict:
    part = {"dirichlet": f"dirichlet(alpha={cfg.dirichlet_alpha:g})", "shards": f"shards(k={cfg.shards_per_client})"}.get(cfg.partition, cfg.partition)
    homo = len(set(ranks)) == 1
    return {"model": None, "dataset": cfg.dataset, "partition": part,
            "ranks": f"homo[{ranks[0]}]" if homo else "hetero[" + ",".join(map(str, ranks)) + "]",
            "rank_distribution": "explicit" if cfg.ranks else cfg.rank_distribution,
            "num_clients": cfg.num_clients, "client_fraction": cfg.client_fraction, "rounds": cfg.rounds,
            "preset": cfg.preset}


# ---- the run --------------------------------------------------------------------------------------

class _Signals:
    """SIGINT/SIGTERM set a flag; the engine stops at the next safe point (never mid-checkpoint)."""

    def __init__(self):
        self.hit: str | None = None
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
        _SIGNALLED.append(self.hit)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def check(self, run_dir: Path):
        if self.hit:
            ck = checkpoint_dir(run_dir)
            done = json.loads((ck / "meta.json").read_text()).get("round") if ck and (ck / "meta.json").is_file() else None
            where = f"round {done} is the last checkpointed round" if done else "no round was complete yet"
            raise Interrupted(f"{self.hit} received; {where}. Resume with: bench run --resume {run_dir}")


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
    import hashlib

    h = hashlib.sha256(json.dumps({"shards": plan.shards, "ranks": plan.ranks}).encode())
    for shard in plan.shards:
        h.update(json.dumps([plan.dataset.train[i] for i in shard], sort_keys=True, default=str).encode())
    h.update(json.dumps(plan.dataset.test, sort_keys=True, default=str).encode())
    return h.hexdigest()


def run_federated(cfg: RunConfig, *, resume: str | None = None, plan: Plan | None = None, log=print) -> dict:
    """Run (or resume) a federated experiment end to end; returns the results record.

    Nothing is written until every input has been checked (preflight, output paths, the checkpoint
    to resume from)."""
    t_start = time.time()
    plan = plan or preflight(cfg)
    method = get_method(cfg.method)
    device = _device(cfg)
    dtype = _dtype(cfg, device)
    run_dir = Path(resume) if resume else Path(cfg.output_dir or Path("runs") / _run_id(cfg))
    run_id = run_dir.name
    _check_output_paths(cfg, run_dir, resume)
    config_hash = cfg.config_hash()
    part_hash = _partition_hash(plan)
    ck = None
    if resume:
        ck = load_checkpoint(run_dir, config_hash, cfg.method) if checkpoint_dir(run_dir) else None
        if ck and ck[3].get("partition_sha256", part_hash) != part_hash:
            raise BenchError(f"resume: the client partition or ranks differ from those of the checkpoint in {run_dir} "
                             "(the data files changed?); restore the data or start a new run")
    # ---- from here on, files are written
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        save_config(cfg, run_dir / "config.yaml")
    else:  # leftovers of a killed process: temporary folders never renamed into place
        for stale in list(run_dir.glob(".checkpoint.tmp*")) + list(run_dir.glob(".global_model.tmp*")):
            shutil.rmtree(stale, ignore_errors=True)

    log(f"[bench] run {run_id}: method={cfg.method} model={plan.model_id} dataset={cfg.dataset} ({plan.dataset.origin}) "
        f"partition={cfg.partition} clients={cfg.num_clients} rounds={cfg.rounds} device={device}")
    clients_info = []
    for k, shard in enumerate(plan.shards):
        hist = data_mod.label_histogram(plan.dataset, shard)
        clients_info.append({"id": k, "rank": plan.ranks[k], "num_examples": len(shard), "label_histogram": hist})
        log(f"[bench]   client {k}: rank {plan.ranks[k]:>3}  examples {len(shard):>5}  labels {hist}")

    timings = {"load_s": 0.0, "tokenize_s": 0.0, "train_s": 0.0, "aggregate_s": 0.0, "checkpoint_s": 0.0}
    t = time.time()
    cm = ClientModel(plan, device, dtype)
    timings["load_s"] = time.time() - t
    t = time.time()
    tok = cm.tokenizer
    client_examples = [[data_mod.tokenize(plan.dataset.train[i], tok, cfg.prompt_template, cfg.cutoff_len, cfg.train_on_inputs)
                        for i in shard] for shard in plan.shards]  # once per run, reused every round
    timings["tokenize_s"] = time.time() - t

    # No RNG state is saved: every draw derives from (seed, round, client) (see the module docstring),
    # so the checkpoint holds only what the rounds computed: global state, merged base, metrics so far.
    state, start_round, rounds_log = GlobalState(), 0, []
    last_merge_bytes = 0
    if ck:
        start_round, state, base, meta = ck
        if base:
            cm.set_base_weights(base)
        last_merge_bytes = meta.get("last_merge_bytes", 0)
        rounds_log = meta["rounds"] if "rounds" in meta else _read_metrics(run_dir)[:start_round]
        atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rounds_log))
        log(f"[bench] resumed {run_dir} after round {start_round}"
            + (" (all rounds done: redoing the final steps)" if start_round >= cfg.rounds else ""))
    else:
        if resume:
            log(f"[bench] {run_dir} has no checkpoint yet: starting from round 1")
        atomic_write_text(run_dir / "metrics.jsonl", "")

    from tqdm.auto import tqdm

    with _Signals() as signals:
        for rnd in range(start_round + 1, cfg.rounds + 1):
            t_round = time.time()
            rng = np.random.default_rng([cfg.seed, rnd])
            m = max(1, round(cfg.client_fraction * cfg.num_clients))
            sampled = sorted(rng.choice(cfg.num_clients, size=m, replace=False).tolist())
            updates, client_rows = [], []
            for k in sampled:
                signals.check(run_dir)
                r_k, s_k = plan.ranks[k], cfg.scaling(plan.ranks[k])
                init = method.configure(state, r_k, s_k)
                bytes_down = tensor_bytes(init) if not method.merges_into_base else last_merge_bytes
                seed = _seed(cfg.seed, rnd, k)
                adapter = cm.load_client(r_k, init, _seed(cfg.seed, rnd))
                t = time.time()
                steps_total = cfg.local_steps or max(1, math.ceil(cfg.local_epochs * len(client_examples[k]) / cfg.batch_size))

                def on_step(step, rnd=rnd, k=k):
                    if step == 1:
                        _test_kill(f"round{rnd}:client{k}")
                    signals.check(run_dir)  # a round cut short is redone on resume

                with tqdm(total=steps_total, desc=f"round {rnd} client {k} (r={r_k})", leave=False,
                          disable=not sys.stderr.isatty()) as bar:
                    stats = train_client(cm, client_examples[k], cfg, seed, bar, on_step=on_step)
                secs = time.time() - t
                timings["train_s"] += secs
                factors = cm.factors(adapter)
                _test_poison(rnd, k, factors)
                update = ClientUpdate(k, r_k, s_k, len(plan.shards[k]), factors)
                row = {"id": k, "rank": r_k, "examples": len(plan.shards[k]), **stats, "seconds": round(secs, 3),
                       "tokens_per_s": round(stats["tokens"] / secs, 2) if secs > 0 else None,
                       "bytes_up": tensor_bytes(factors), "bytes_down": bytes_down}
                reason = _fault(update, cfg)
                if reason:
                    row["excluded"] = reason
                    log(f"[bench]   round {rnd} client {k}: EXCLUDED ({reason})")
                else:
                    updates.append(update)
                client_rows.append(row)
                log(f"[bench]   round {rnd} client {k}: loss {stats['first_loss']:.3f} → {stats['last_loss']:.3f} "
                    f"({stats['steps']} steps, {secs:.1f} s)")
            if not updates:
                last = checkpoint_dir(run_dir)
                keep = (f"the last good checkpoint (round {rnd - 1}) is intact in {last}" if last
                        else "no round had completed, so there is no checkpoint")
                raise BenchError(f"clients: every client of round {rnd} was excluded (NaN/Inf or norm above max_update_norm); "
                                 f"{keep}; lower lr or raise max_update_norm")
            signals.check(run_dir)
            t = time.time()
            agg: Aggregate = method.aggregate(updates, state)
            if agg.merge:
                cm.add_to_base(agg.merge)
            agg_s = time.time() - t
            timings["aggregate_s"] += agg_s
            state = agg.state
            last_merge_bytes = tensor_bytes(agg.merge)
            _test_kill(f"round{rnd}:aggregate")
            row = {"round": rnd, "sampled": sampled, "clients": client_rows,
                   "excluded": [c["id"] for c in client_rows if "excluded" in c],
                   **{k: v for k, v in agg.metrics.items()}, "aggregate_seconds": round(agg_s, 4),
                   "seconds": round(time.time() - t_round, 3), "rss_mb": _rss_mb()}
            rounds_log.append(row)
            t = time.time()
            atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rounds_log))
            _test_kill(f"round{rnd}:metrics")
            save_checkpoint(run_dir, rnd, state, cm.base_weights() if method.merges_into_base else None,
                            {"config_hash": config_hash, "method": cfg.method, "run_id": run_id,
                             "last_merge_bytes": last_merge_bytes, "partition_sha256": part_hash, "rounds": rounds_log})
            timings["checkpoint_s"] += time.time() - t
            noise = agg.metrics.get("noise")
            log(f"[bench] round {rnd}/{cfg.rounds} done in {row['seconds']:.1f} s"
                + (f", aggregation noise {noise:.4f}" if noise else ""))
            if cfg.save_client_adapters:
                _save_client_adapters(cm, run_dir, rnd, updates, cfg)
            signals.check(run_dir)

        # the global model: base (+ merged rounds) + global adapter, as a plain HF model. A kill from
        # here on is resumed from the last round's checkpoint: training is skipped, these steps redone.
        t = time.time()
        if state.adapter:
            cm.add_to_base(state.adapter)
        global_model = cm.model.unload()
        global_model.config.use_cache = True
        test = plan.dataset.test
        if cfg.test_limit and len(test) > cfg.test_limit:
            pick = np.random.default_rng([cfg.seed, 31337]).permutation(len(test))[: cfg.test_limit]
            test = [test[i] for i in sorted(pick)]
        test_examples = [data_mod.tokenize(r, tok, cfg.prompt_template, cfg.cutoff_len, False) for r in test]
        _test_kill("test-loss")
        test_loss = held_out_loss(global_model, test_examples, tok.pad_token_id, device)
        timings["test_loss_s"] = time.time() - t
        log(f"[bench] global model held-out loss on {len(test_examples)} {cfg.dataset} test examples: {test_loss:.4f}")
        signals.check(run_dir)
        t = time.time()
        out = run_dir / "global_model"
        tmp = run_dir / f".global_model.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        global_model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        _test_kill("final-save")
        atomic_replace_dir(tmp, out)
        timings["save_s"] = time.time() - t
        signals.check(run_dir)

        cfg_for_record = cfg.to_dict()
        record = {
            "schema_version": RECORD_SCHEMA_VERSION, "kind": "run", "status": "complete", "run_id": run_id, "method": cfg.method,
            "setting": {**setting_of(cfg, plan.ranks), "model": plan.model_id},
            "seed": cfg.seed, "config": cfg_for_record, "config_hash": config_hash,
            "provenance": provenance(plan, device), "clients": clients_info, "rounds": rounds_log,
            "communication": {"bytes_up": sum(c["bytes_up"] for r in rounds_log for c in r["clients"]),
                              "bytes_down": sum(c["bytes_down"] for r in rounds_log for c in r["clients"])},
            "test_loss": test_loss, "test_examples": len(test_examples), "run_dir": str(run_dir),
        }
        if plan.eval_tasks:
            from evaluators import evaluate

            _test_kill("eval")
            t = time.time()
            record["eval"] = evaluate(str(out), plan.eval_tasks, backend=cfg.eval_backend, limit=cfg.eval_limit,
                                      num_fewshot=cfg.eval_num_fewshot, data_root=cfg.data_root,
                                      out_dir=str(run_dir / "eval"), seed=cfg.seed, dtype=cfg.eval_dtype)
            timings["eval_s"] = time.time() - t
            signals.check(run_dir)
        timings["total_s"] = time.time() - t_start
        record["timings"] = {k: round(v, 3) for k, v in timings.items()}
        record_path = Path(cfg.results_dir) / f"{run_id}.json"
        _test_kill("record")
        atomic_write_json(record_path, record)
        atomic_write_json(run_dir / "run.json", {"record": str(record_path.resolve())})
    log(f"[bench] wrote {record_path} and {out} in {timings['total_s']:.0f} s")
    return record


def _fault(update: ClientUpdate, cfg: RunConfig) -> str | None:
    """NaN/Inf or an absurd norm excludes a client's update from the round."""
    sq = 0.0
    for name, (a, b) in update.factors.items():
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            return f"non-finite values in {name}"
        sq += (update.scaling * product_fro_norm(b.double(), a.double())) ** 2
    if cfg.max_update_norm is not None and sq ** 0.5 > cfg.max_update_norm:
        return f"update norm {sq ** 0.5:.3g} > max_update_norm {cfg.max_update_norm:g}"
    return None


def _save_client_adapters(cm: ClientModel, run_dir: Path, rnd: int, updates: list[ClientUpdate], cfg: RunConfig) -> None:
    """Each client's trained adapter in PEFT format (adapter_config.json + adapter_model.safetensors)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    for u in updates:
        out = run_dir / "clients" / f"round_{rnd}" / f"client_{u.client_id}"
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        LoraConfig(r=u.rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=list(cfg.target_modules),
                   use_rslora=cfg.use_rslora, task_type="CAUSAL_LM",
                   base_model_name_or_path=str(cm.model.base_model.model.name_or_path)).save_pretrained(tmp)
        tensors = {}
        for name, (a, b) in u.factors.items():
            tensors[f"base_model.model.{name}.lora_A.weight"] = a.contiguous()
            tensors[f"base_model.model.{name}.lora_B.weight"] = b.contiguous()
        save_file(tensors, str(tmp / "adapter_model.safetensors"))
        atomic_replace_dir(tmp, out)


def _read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _run_id(cfg: RunConfig) -> str:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    return f"{cfg.method}-{cfg.preset or 'custom'}-s{cfg.seed}-{stamp}"
