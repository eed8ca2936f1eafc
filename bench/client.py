"""The client step: a task message in, trained factors out. It owns the model and the optimizer.

One ClientRuntime serves every client it holds data for: one base model, one peft adapter slot per
rank, clients borrowing a slot in turn (in-process simulation: all clients; a Flower node: its own).
Between rounds a client keeps only what its method asks it to (ClientTask.keep) and its base.

Precision: the weights that receive merges have full-precision (float32) master copies. A merge is
added to the master (its product formed in float64), then the training view — the layer's weight, in
the training dtype — is refreshed from the master. In bfloat16 a round's update is often below the
weight's rounding step; added to the bf16 weight directly it would mostly vanish, added to the master
it accumulates, and the view is the master's nearest bf16 value.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from methods import ClientTask, Factors

from . import data as data_mod
from .compute import MixedPrecision, resolve_compute_dtype
from .config import RunConfig
from .messages import EvalReply, EvaluateMessage, Reply, TaskMessage, factor_groups, factors_to_tensors
from .references import resolve_method

# Architectures whose logits are exactly lm_head(final hidden state): no softcapping, no logit scale.
PLAIN_LM_HEAD = {"llama", "mistral", "qwen2", "qwen3", "phi3"}


def token_loss(model, batch, device, per_example: bool = False):
    """Sum of next-token losses over the labelled tokens, and their count (per example if asked).

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
        if torch.is_autocast_enabled(hidden.device.type):  # mixed precision: the output layer and its logits in float32
            with torch.autocast(hidden.device.type, enabled=False):
                logits = base.get_output_embeddings()(hidden.float())
        else:
            logits = base.get_output_embeddings()(hidden).float()
        losses = torch.nn.functional.cross_entropy(logits, target[keep], reduction="none")
    else:
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        losses = torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="none")
    if not per_example:
        return losses.sum(), int(keep.sum())
    row = keep.nonzero()[:, 0]  # the example each labelled token belongs to
    sums = torch.zeros(ids.shape[0], dtype=losses.dtype, device=losses.device).index_add_(0, row, losses)
    return sums, keep.sum(dim=1)


@torch.no_grad()
def held_out_losses(model, examples: list[dict], pad: int, device, batch_size: int = 8) -> tuple[list[float], list[int]]:
    """Each example's summed token loss and its labelled-token count (pair them for paired comparisons)."""
    model.eval()
    sums, counts = [], []
    for i in range(0, len(examples), batch_size):
        s, n = token_loss(model, data_mod.collate(examples[i:i + batch_size], pad), device, per_example=True)
        sums += [float(x) for x in s]
        counts += [int(x) for x in n]
    return sums, counts


@dataclass
class ModelSpec:
    """What a runtime loads: the resolved model folder, the device and the training dtype."""

    path: str
    device: torch.device
    dtype: torch.dtype


class ClientRuntime:
    """The model side of every client this process serves."""

    def __init__(self, cfg: RunConfig, spec: ModelSpec, ranks: list[int], examples: dict[int, list[dict]],
                 heldout: data_mod.HeldOut | None = None):
        """heldout: the sets its clients score their own models on (EVALUATE); None: this runtime only trains."""
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg, self.device, self.dtype = cfg, spec.device, spec.dtype
        self.examples = examples  # client id -> tokenized training examples
        self.heldout = heldout
        self.tokenizer = AutoTokenizer.from_pretrained(spec.path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # loaded in float32 so that the masters hold the file's weights exactly, then cast for training
        base = AutoModelForCausalLM.from_pretrained(spec.path, dtype=torch.float32)
        base.config.use_cache = False
        self._LoraConfig = LoraConfig
        self.model = None
        self.max_rank = max(ranks)
        for r in sorted(set(ranks)):
            if self.model is None:
                self.model = get_peft_model(base, self._lora_config(r), adapter_name=f"r{r}")
            else:
                self.model.add_adapter(f"r{r}", self._lora_config(r))
        prefix = "base_model.model."
        self.layers = {}
        for name, mod in self.model.named_modules():
            if hasattr(mod, "lora_A") and hasattr(mod, "base_layer") and len(mod.lora_A):
                self.layers[name[len(prefix):] if name.startswith(prefix) else name] = mod
        # masters: float32 copies of the merge-receiving weights; in float32 training the weight is its own master
        self.master = {n: (l.base_layer.weight.detach().clone() if spec.dtype != torch.float32 else None)
                       for n, l in self.layers.items()}
        self.model.to(spec.device, spec.dtype)
        for n, m in self.master.items():
            if m is not None:
                self.master[n] = m.to(spec.device)
        self.compute_dtype, _ = resolve_compute_dtype(cfg.compute_dtype, spec.dtype, spec.device)
        self.precision = MixedPrecision(self.model, self.compute_dtype) if self.compute_dtype != spec.dtype else None
        for r in sorted(set(ranks)):
            self._check_scaling(f"r{r}", r)
        self.base_round = 0          # merges of rounds ≤ this are in the base
        self.personal: dict[int, dict] = {}  # client id -> {"factors": Factors, "rank": int} (ClientTask.keep)
        self.on_step = None          # callable(task message, step) after each optimizer step (signals, test hooks)

    @classmethod
    def for_run(cls, cfg: RunConfig, model_path: str, ranks: list[int], examples: dict[int, list[dict]],
                heldout: data_mod.HeldOut | None = None) -> ClientRuntime:
        """A runtime on the run's device in its training dtype (cfg.device, cfg.dtype)."""
        from .compute import resolve_device, resolve_dtype

        device = resolve_device(cfg)
        return cls(cfg, ModelSpec(model_path, device, resolve_dtype(cfg.dtype, device)), ranks, examples, heldout)

    # ---- slots and scaling -----------------------------------------------------------------------
    def _lora_config(self, r: int):
        cfg = self.cfg
        return self._LoraConfig(r=r, lora_alpha=cfg.alpha_for(r), lora_dropout=cfg.lora_dropout,
                                target_modules=list(cfg.target_modules), use_rslora=cfg.use_rslora, task_type="CAUSAL_LM")

    def _check_scaling(self, adapter: str, r: int) -> None:
        for name, layer in self.layers.items():  # the scaling we aggregate with must be peft's own
            if not math.isclose(layer.scaling[adapter], self.cfg.scaling(r), rel_tol=1e-9):
                raise RuntimeError(f"scaling mismatch at {name}: peft {layer.scaling[adapter]}, config {self.cfg.scaling(r)}")

    def _slot(self, rank: int) -> str:
        adapter = f"r{rank}"
        if adapter not in self.model.peft_config:  # a rank first seen now (a client lowered its rank)
            self.model.add_adapter(adapter, self._lora_config(rank))
            self.model.to(self.device, self.dtype)
            self._check_scaling(adapter, rank)
        return adapter

    # ---- the base ---------------------------------------------------------------------------------
    def apply_merges(self, merges: dict[int, Factors]) -> None:
        """Add each merge's B @ A to the base, in round order, once; refuse a gap (the server resends)."""
        with torch.no_grad():
            for rnd in sorted(merges):
                if rnd <= self.base_round:
                    continue  # already in (clients of one runtime share the base)
                if rnd != self.base_round + 1:
                    raise BaseOutOfSync(f"base holds merges up to round {self.base_round}, got round {rnd}")
                for name, (a, b) in merges[rnd].items():
                    delta = (b.double() @ a.double()).to(self.device, torch.float32)
                    w = self.layers[name].base_layer.weight
                    m = self.master[name]
                    if m is None:
                        w.add_(delta)
                    else:
                        m.add_(delta)
                        w.copy_(m.to(w.dtype))
                self.base_round = rnd

    def base_weights(self) -> dict[str, torch.Tensor]:
        """The full-precision base of the merge-receiving modules (masters), on the CPU."""
        return {n: (m if m is not None else self.layers[n].base_layer.weight).detach().float().cpu().clone()
                for n, m in self.master.items()}

    def set_base_weights(self, weights: dict[str, torch.Tensor], rnd: int) -> None:
        """Take merged float32 weights (base_weights() of a runtime at merge round rnd) as the base: the masters take
        them exactly and the training view is refreshed from them, as apply_merges does after adding a merge."""
        with torch.no_grad():
            for name, w in weights.items():
                view, master = self.layers[name].base_layer.weight, self.master[name]
                if master is None:
                    view.copy_(w.to(view.device))
                else:
                    master.copy_(w.to(master.device))
                    view.copy_(master.to(view.dtype))
        self.base_round = rnd

    def base_bytes(self) -> int:
        """Bytes of the merge-receiving weights in float32 (what base_weights() holds)."""
        return sum(4 * layer.base_layer.weight.numel() for layer in self.layers.values())

    def set_personal(self, k: int, kept: dict | None) -> None:
        """Client k's kept factors ({"rank", "factors"}, as it kept them after a round), or None: it keeps none."""
        if kept is None:
            self.personal.pop(k, None)
        else:
            self.personal[k] = kept

    # ---- one client's round -----------------------------------------------------------------------
    def train(self, msg: TaskMessage) -> Reply:
        ready = self.prepare(msg)
        if isinstance(ready, Reply):
            return ready
        method, adapter = ready
        t = time.time()
        with self._core(adapter, msg.task.core) as cores:
            stats = self._fit(adapter, msg.task, method, msg, cores)
            trained = self._factors(adapter)   # a core task: A is R @ A_init, as its model computes it
            core = {n: c.detach().float().cpu().clone() for n, c in cores.items()}
        return self.reply(msg, method, trained, stats, time.time() - t, core)

    def prepare(self, msg: TaskMessage):
        """(method, adapter slot) with the merges applied and the slot loaded with the client's starting
        factors, or the error Reply."""
        k = msg.client_id
        if k not in self.examples:
            return Reply(msg.round, k, msg.rank, 0, {}, error=f"this runtime holds no data for client {k}")
        try:
            self.apply_merges(msg.merges)
        except BaseOutOfSync as exc:
            return Reply(msg.round, k, msg.rank, 0, {}, base_round=self.base_round, error=f"base out of sync: {exc}")
        method = resolve_method(msg.method, msg.method_options)
        adapter = self._slot(msg.rank)
        self._load(adapter, msg.rank, self._start(msg), msg.init_seed)
        return method, adapter

    def reply(self, msg: TaskMessage, method, trained: Factors, stats: dict, secs: float,
              core: dict[str, torch.Tensor] | None = None) -> Reply:
        """The client's reply from its trained factors (and, for a core task, its trained cores): kept factors
        stored, the method's client_finish."""
        k, task = msg.client_id, msg.task
        if task.keep:
            self.personal[k] = {"rank": msg.rank, "factors": {n: _only(p, task.keep) for n, p in trained.items()}}
        sent = method.client_finish(trained, task)
        rank = next(iter(sent.values()))[0].shape[0] if sent else msg.rank
        if task.upload == "R":
            factors = {n: (c, None) for n, c in core.items()}
        else:
            factors = {n: _only(p, task.upload) for n, p in sent.items()}
        return Reply(msg.round, k, rank, len(self.examples[k]), factors,
                     {**stats, "seconds": round(secs, 3), "tokens_per_s": round(stats["tokens"] / secs, 2) if secs > 0 else None},
                     base_round=self.base_round, trained=sent if self.cfg.save_client_adapters else None)

    @contextlib.contextmanager
    def _core(self, adapter: str, core: dict[str, torch.Tensor] | None):
        """With a core (ClientTask.core): each layer's lora_A slot becomes CoreAfterA (x ↦ R (A x), A the loaded
        lora_A weight, frozen; R an r×r Linear started from the core), so the model is s · B R A and R is what
        trains. Yields module -> R; on exit the slot is lora_A again, its weight R @ A."""
        if core is None:
            yield {}
            return
        frozen = {n: self.layers[n].lora_A[adapter] for n in core}
        for name, a in frozen.items():
            a.weight.requires_grad_(False)
            self.layers[name].lora_A[adapter] = CoreAfterA(a, core[name].to(a.weight.device, a.weight.dtype))
        try:
            yield {n: self.layers[n].lora_A[adapter].core.weight for n in frozen}
        finally:
            with torch.no_grad():
                for name, a in frozen.items():
                    a.weight.copy_(self.layers[name].lora_A[adapter].weight)
                    a.weight.requires_grad_(True)
                    self.layers[name].lora_A[adapter] = a

    def _start(self, msg: TaskMessage) -> Factors | None:
        """The task's init, with the factors the client keeps taken from its own last round."""
        task = msg.task
        if not task.keep:
            return task.init
        mine = self.personal.get(msg.client_id, {}).get("factors", {})
        names = set(self.layers)
        out: Factors = {}
        for name in names:
            a, b = (task.init or {}).get(name, (None, None))
            pa, pb = mine.get(name, (None, None))
            out[name] = (pa if "A" in task.keep else a, pb if "B" in task.keep else b)
        return out

    def _load(self, adapter: str, rank: int, init: Factors | None, init_seed: int) -> None:
        """peft-style fresh init (A kaiming-uniform, B zero), then the given factors in the first rows/columns.

        The fresh A is the first `rank` rows of one max-rank draw seeded by (seed, round) alone: every
        client of a round starts from the same global initialisation, as the server would send it
        (FedIT, Flower). Independent per-client draws would make averaged A's shrink like 1/√K and
        inflate FedAvg's aggregation noise with randomness that no real deployment has.
        """
        self.model.set_adapter(adapter)
        gen = torch.Generator().manual_seed(init_seed)
        with torch.no_grad():
            for name, layer in self.layers.items():
                a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
                fresh = torch.empty(max(self.max_rank, rank), a.shape[1], dtype=torch.float32)
                torch.nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=gen)  # bound depends on d_in only
                a.copy_(fresh[:rank])
                b.zero_()
                a0, b0 = (init or {}).get(name, (None, None))
                if a0 is not None:
                    a[: a0.shape[0]].copy_(a0)
                if b0 is not None:
                    b[:, : b0.shape[1]].copy_(b0)

    def _factors(self, adapter: str) -> Factors:
        return {name: (layer.lora_A[adapter].weight.detach().float().cpu().clone(),
                       layer.lora_B[adapter].weight.detach().float().cpu().clone())
                for name, layer in self.layers.items()}

    def _fit(self, adapter: str, task: ClientTask, method, msg: TaskMessage, cores: dict) -> dict:
        """Train the factors the task names (the others stay bit for bit), with the method's penalty; a core task
        (train "R") trains the cores alone."""
        live = {n: (cores.get(n, l.lora_A[adapter].weight), l.lora_B[adapter].weight) for n, l in self.layers.items()}
        params = []
        for pair in live.values():
            for which, p in zip("AB", pair):
                on = which in task.train or (task.train == "R" and which == "A")  # a core sits in A's place
                p.requires_grad_(on)
                if on:
                    params.append(p)
        try:
            return local_train(self.model, self.examples[msg.client_id], self.cfg, msg.train_seed, self.device,
                               self.tokenizer.pad_token_id, params, penalty=lambda: method.client_penalty(live, task),
                               on_step=(lambda step: self.on_step(msg, step)) if self.on_step else None,
                               precision=self.precision)
        finally:
            for a, b in live.values():
                a.requires_grad_(True)
                b.requires_grad_(True)

    def evaluate(self, ask: EvaluateMessage) -> EvalReply:
        """The client's own model on the held-out sets asked for: what it would start its next round from (the
        task's factors, its kept ones in place, on its base), as the personalized methods define a client's model."""
        msg, k = ask.task, ask.task.client_id
        if self.heldout is None:
            return EvalReply(msg.round, k, error="this runtime holds no held-out sets")
        try:
            self.apply_merges(msg.merges)
        except BaseOutOfSync as exc:
            return EvalReply(msg.round, k, error=f"base out of sync: {exc}")
        self._load(self._slot(msg.rank), msg.rank, self._start(msg), msg.init_seed)
        sets = {"pooled": self.heldout.pooled, "own": lambda: self.heldout.own(k)}
        losses = {}
        for name in ask.sets:
            examples = sets[name]()
            losses[name] = held_out_losses(self.model, examples, self.tokenizer.pad_token_id, self.device) if examples else ([], [])
        return EvalReply(msg.round, k, losses)

    # ---- the clients' own state (checkpointed with the run by the in-process transport) ------------
    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, meta = {}, {"base_round": self.base_round, "personal": {}}
        for k, st in self.personal.items():
            meta["personal"][str(k)] = st["rank"]
            tensors.update({key: t.contiguous() for key, t in factors_to_tensors(st["factors"], f"personal/{k}").items()})
        return tensors, meta

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.personal = {int(k): {"rank": r, "factors": {}} for k, r in meta.get("personal", {}).items()}
        for k, factors in factor_groups(tensors, "personal").items():
            self.personal[int(k)]["factors"] = factors


def local_train(model, examples: list[dict], cfg: RunConfig, seed: int, device, pad_id: int, params: list,
                penalty=None, on_step=None, precision: MixedPrecision | None = None) -> dict:
    """Local training: AdamW over `params`, gradient accumulation, mean loss on labelled tokens (+ penalty()).

    precision: bfloat16 forwards and backwards over the float32 model (bench/compute.py); the penalty and the
    optimizer step stay in float32."""
    from . import privacy

    if privacy.enabled(cfg):  # DP-SGD: Poisson batches, per-example clipping, Gaussian noise (bench/privacy.py)
        return privacy.dp_local_train(model, examples, cfg, seed, device, pad_id, params, penalty, on_step)
    with precision.views() if precision is not None else contextlib.nullcontext():
        return _local_train(model, examples, cfg, seed, torch.device(device), pad_id, params, penalty, on_step, precision)


def _local_train(model, examples, cfg, seed, device, pad_id, params, penalty, on_step, precision) -> dict:
    forward = (lambda: precision.autocast(device.type)) if precision is not None else contextlib.nullcontext
    model.train()
    torch.manual_seed(seed)  # dropout
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0) if params else None
    n = len(examples)
    steps = cfg.local_steps or max(1, math.ceil(cfg.local_epochs * n / cfg.batch_size))
    rng = np.random.default_rng(seed)
    stream: list[int] = []
    losses, tokens = [], 0
    for _ in range(steps):
        while len(stream) < cfg.batch_size:
            stream.extend(rng.permutation(n).tolist())
        batch, stream = stream[: cfg.batch_size], stream[cfg.batch_size:]
        step_loss, n_tok, step_tokens = accumulate_step(model, [examples[j] for j in batch], cfg, device, pad_id,
                                                        forward, backward=opt is not None)
        extra = penalty() if penalty is not None and opt is not None else None
        if extra is not None:
            extra.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses.append(step_loss / max(n_tok, 1))
        tokens += step_tokens
        if on_step is not None:  # the engine's signal check and test hooks; may raise
            on_step(len(losses))
    del opt
    return {"loss": float(np.mean(losses)), "first_loss": losses[0], "last_loss": losses[-1], "steps": steps,
            "tokens": tokens}


def micro_batches(batch: list[dict], cfg: RunConfig) -> list[list[int]]:
    """Positions of a step's examples in each micro-batch: grouped by length, or in draw order."""
    if cfg.length_buckets:
        return data_mod.length_buckets([len(e["input_ids"]) for e in batch], cfg.micro_batch_size)
    return [list(range(i, min(i + cfg.micro_batch_size, len(batch)))) for i in range(0, len(batch), cfg.micro_batch_size)]


def accumulate_step(model, batch: list[dict], cfg: RunConfig, device, pad_id: int, forward=contextlib.nullcontext,
                    backward: bool = True) -> tuple[float, int, int]:
    """One step's gradients, accumulated over its micro-batches: Σ token losses / the labelled tokens of the whole
    step, so that any grouping into micro-batches gives one big batch's gradient. Returns (the summed token loss,
    the labelled tokens, the tokens computed without padding)."""
    encoded = [data_mod.collate([batch[i] for i in m], pad_id) for m in micro_batches(batch, cfg)]
    n_tok = sum(int((e[1][:, 1:] != -100).sum()) for e in encoded)
    step_loss = 0.0
    for enc in encoded:
        with forward():
            loss, _ = token_loss(model, enc, device)
        if backward:
            (loss / max(n_tok, 1)).backward()
        step_loss += loss.item()
    return step_loss, n_tok, sum(int(e[2].sum()) for e in encoded)


class BaseOutOfSync(Exception):
    pass


class CoreAfterA(torch.nn.Module):
    """peft's lora_A slot in a core task: x ↦ R (A x), A the slot's own Linear (frozen) and R an r×r Linear of its
    own, so that Opacus's per-example gradient hooks for nn.Linear see R (DP-SGD trains it like any factor)."""

    def __init__(self, a: torch.nn.Linear, start: torch.Tensor):
        super().__init__()
        self.a = a
        self.core = torch.nn.Linear(start.shape[1], start.shape[0], bias=False, device=start.device, dtype=start.dtype)
        with torch.no_grad():
            self.core.weight.copy_(start)

    @property
    def weight(self) -> torch.Tensor:
        """R @ A: the lora_A weight the slot stands for (peft reads its dtype; the slot's exit writes it back)."""
        return self.core.weight @ self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.core(self.a(x))


def _only(pair, which: str):
    a, b = pair
    return (a if "A" in which else None, b if "B" in which else None)
