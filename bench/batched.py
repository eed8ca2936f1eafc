"""A round's clients trained together: one forward and backward per micro-step for every client of the round.

The clients of an in-process round share the base weights (merges are applied once, to the runtime's base),
so their micro-batches can go through the model as one batch: the rows of client c carry c's LoRA term
s_c · B_c A_c x, computed for all clients at once by batched matmuls over factors stacked (clients × rank ×
d) and zero-padded to the round's largest rank. Padding is exact: a zero row of A and zero column of B add
nothing and receive zero gradients, so AdamW never moves them.

What stays each client's own, exactly as in the sequential path (bench/client.py, local_train):
- data order: the same seeded permutation stream and micro-batches (numpy, seeded by the client's seed);
- dropout: each client's LoRA dropout masks come from its own generator stream (the global RNG's state
  swapped per client), drawn on its own rows at its own width, so the masks equal the sequential ones;
- the loss: the sum over its labelled tokens divided by its own batch's token count (+ its method penalty);
- the optimizer: AdamW with its own moments and step count (the update of torch.optim.AdamW, vectorized over
  clients); a client whose local steps are done drops out of later micro-steps and is not updated.
Rows of different clients never interact (attention is within a sequence, norms are per token), so one
backward gives every client the gradient it would get alone: the batched round equals the sequential round
to float tolerance (tests/test_batched.py).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from methods import AggregationMethod

from . import data as data_mod
from .client import micro_batches, token_loss

# padded widths are rounded up to a multiple of this: fewer distinct shapes (cuDNN attention plans one graph
# per shape, ~2 ms of CPU each); exact, since the extra positions are masked like any padding
WIDTH_STEP = 64
MAX_TOKENS = 65536  # padded tokens per forward of a batched round (activation memory; exact at any value)


def use_batching(mode: str, device: torch.device) -> bool:
    """auto: batched on a GPU, where one client's micro-batch leaves most of the device idle; sequential on
    the CPU, whose matmuls are already at their rate with one client's batch (docs/performance.md)."""
    return mode == "on" or (mode == "auto" and device.type == "cuda")


def refusal(method) -> str | None:
    """Why this method's rounds cannot be batched (a one-line note), or None."""
    if not method.batchable:
        return f"{method.name} declares its clients unbatchable (batchable = False: see the method)"
    return None


@dataclass
class Job:
    """One client's part of a batched round: its data, seed, rank and scaling, starting factors (module ->
    (A: rank × d_in, B: d_out × rank)), which factors train, and its penalty (None: none)."""

    examples: list[dict]
    seed: int
    rank: int
    scaling: float
    init: dict[str, tuple[torch.Tensor, torch.Tensor]]
    train: str = "AB"
    penalty: object = None          # callable(live factors) -> tensor or None
    on_step: object = None          # callable(step) after each of its optimizer steps
    stats: dict = field(default_factory=dict)
    trained: dict = field(default_factory=dict)


def _schedule(job: Job, cfg):
    """local_train's batches for one client: a list of steps, each a list of micro-batches (example indices)."""
    n = len(job.examples)
    steps = cfg.local_steps or max(1, math.ceil(cfg.local_epochs * n / cfg.batch_size))
    rng = np.random.default_rng(job.seed)
    stream: list[int] = []
    out = []
    for _ in range(steps):
        while len(stream) < cfg.batch_size:
            stream.extend(rng.permutation(n).tolist())
        batch, stream = stream[: cfg.batch_size], stream[cfg.batch_size:]
        # the sequential path's grouping (length buckets or draw order), so dropout meets the same rows
        out.append([[batch[i] for i in m] for m in micro_batches([job.examples[i] for i in batch], cfg)])
    return out


class _Stacked:
    """The round's LoRA factors of one module, stacked over clients and zero-padded to the largest rank."""

    def __init__(self, jobs: list[Job], name: str, dtype, device):
        rmax = max(j.rank for j in jobs)
        a0, b0 = jobs[0].init[name]
        a = torch.zeros(len(jobs), rmax, a0.shape[1], dtype=dtype)
        b = torch.zeros(len(jobs), b0.shape[0], rmax, dtype=dtype)
        for c, j in enumerate(jobs):
            ja, jb = j.init[name]
            a[c, : j.rank] = ja
            b[c, :, : j.rank] = jb
        self.a = a.to(device).requires_grad_(True)
        self.b = b.to(device).requires_grad_(True)


class _AdamW:
    """torch.optim.AdamW (weight decay 0, the default betas and eps), one instance per client, vectorized: the
    moments are tensors like the parameter, the step count and the trainable flag are per client (dim 0)."""

    def __init__(self, params: list[torch.Tensor], trains: list[torch.Tensor], lr: float):
        self.params, self.trains, self.lr = params, trains, lr
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.steps = torch.zeros(params[0].shape[0], dtype=torch.float64)

    @torch.no_grad()
    def step(self, active: torch.Tensor) -> None:
        """Update the clients flagged in `active` (bool, per client, on the CPU); the others stay bit for bit."""
        beta1, beta2, eps = 0.9, 0.999, 1e-8
        self.steps += active.double()
        dev = self.params[0].device
        step_size = (self.lr / (1 - beta1 ** self.steps).clamp_min(1e-300)).to(dev)
        bc2_sqrt = (1 - beta2 ** self.steps).sqrt().clamp_min(1e-300).to(dev)
        masks = {}
        for p, m, v, train in zip(self.params, self.m, self.v, self.trains):
            on = active & train
            if p.grad is None or not bool(on.any()):  # host tensors: no device sync
                p.grad = None
                continue
            shape = (-1,) + (1,) * (p.dim() - 1)
            key = (id(train), p.dim())
            if key not in masks:
                masks[key] = on.to(dev, non_blocking=True).view(shape)
            sel, g = masks[key], p.grad
            m.copy_(torch.where(sel, m.lerp(g, 1 - beta1), m))
            v.copy_(torch.where(sel, v * beta2 + (1 - beta2) * g * g, v))
            denom = v.sqrt() / bc2_sqrt.view(shape).to(v.dtype) + eps
            p.copy_(torch.where(sel, p - (step_size.view(shape) * (m / denom)).to(p.dtype), p))
            p.grad = None


@contextmanager
def _client_rng(states: list, c: int, device: torch.device):
    """Run the block on client c's generator stream (the global RNG of `device`, swapped in and out)."""
    if device.type == "cuda":
        get, put = (lambda: torch.cuda.get_rng_state(device)), (lambda s: torch.cuda.set_rng_state(s, device))
    else:
        get, put = torch.get_rng_state, torch.set_rng_state
    outer = get()
    put(states[c])
    try:
        yield
    finally:
        states[c] = get()
        put(outer)


def _groups(act: list[int], parts: list, max_tokens: int | None) -> list[list[int]]:
    """The active clients in forward groups of at most max_tokens padded tokens (None: one group)."""
    if max_tokens is None:
        return [act]
    per = max(p[0].shape[0] * max(q[0].shape[1] for q in parts) for p in parts)
    size = max(1, max_tokens // per)
    return [act[i:i + size] for i in range(0, len(act), size)]


def train_batched(model, layers: dict, jobs: list[Job], cfg, device, pad_id: int, dtype=None,
                  max_tokens: int | None = None) -> None:
    """Train every job's factors together (see the module docstring); fills job.trained (module -> (A, B),
    float32 on the CPU, at the job's rank) and job.stats (local_train's statistics).

    model: the peft model whose LoRA layers are `layers` (module name -> peft LoraLayer); its adapters are
    disabled for the duration, the round's factors enter through forward hooks on those layers.
    max_tokens: at most this many padded tokens per forward; more clients are split into groups, each its own
    forward/backward (exact: a client's gradient depends on its own rows only)."""
    names = list(layers)
    first = next(iter(layers.values()))
    dtype = dtype or next(iter(first.lora_A.values())).weight.dtype
    p_drop = float(cfg.lora_dropout)
    stacks = {n: _Stacked(jobs, n, dtype, device) for n in names}
    scale = torch.tensor([j.scaling for j in jobs], dtype=torch.float32, device=device)
    trains_a = torch.tensor(["A" in j.train for j in jobs])
    trains_b = torch.tensor(["B" in j.train for j in jobs])
    params, trains = [], []
    for n in names:
        params += [stacks[n].a, stacks[n].b]
        trains += [trains_a, trains_b]
    opt = _AdamW(params, trains, cfg.lr)
    schedules = [_schedule(j, cfg) for j in jobs]
    rng_states = []
    for j in jobs:  # local_train seeds the global RNG with the client's seed (dropout)
        torch.manual_seed(j.seed)
        rng_states.append(torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state())
    live = {}  # per micro-step: active client indices, their rows' widths, rows per client
    hooks = []

    def lora_hook(name):
        st = stacks[name]

        def hook(module, args, output):
            x = args[0]
            act, widths, rows = live["act"], live["widths"], live["rows"]
            t = x.shape[1]
            x4 = x.to(dtype).view(len(act), rows, t, x.shape[-1])
            if p_drop > 0:  # each client's masks from its own stream, drawn at its own width
                xd = torch.zeros_like(x4)
                for i, c in enumerate(act):
                    with _client_rng(rng_states, c, device):
                        xd[i, :, : widths[i]] = F.dropout(
                            x4[i, :, : widths[i]].contiguous(), p_drop, training=True)
                x4 = xd
            idx = live["idx"]
            a = st.a if idx is None else st.a.index_select(0, idx)
            b = st.b if idx is None else st.b.index_select(0, idx)
            h = torch.bmm(x4.reshape(len(act), rows * t, -1), a.mT)
            lora = torch.bmm(h, b.mT) * live["scale"].to(h.dtype)
            return (output + lora.view(output.shape)).to(output.dtype)

        return hook

    model.train()
    for n in names:
        hooks.append(layers[n].register_forward_hook(lora_hook(n)))
    steps = [len(s) for s in schedules]
    losses = [[] for _ in jobs]
    tokens = [0] * len(jobs)
    try:
        with model.disable_adapter():
            for step in range(max(steps)):
                act = [c for c in range(len(jobs)) if steps[c] > step]
                active = torch.zeros(len(jobs), dtype=torch.bool)
                active[act] = True
                n_micro = len(schedules[act[0]][step])
                enc = {c: [data_mod.collate([jobs[c].examples[k] for k in mb], pad_id) for mb in schedules[c][step]]
                       for c in act}
                n_tok = {c: sum(int((e[1][:, 1:] != -100).sum()) for e in enc[c]) for c in act}
                step_loss = dict.fromkeys(act, 0.0)
                for mi in range(n_micro):
                    for group in _groups(act, [enc[c][mi] for c in act], max_tokens):
                        parts = [enc[c][mi] for c in group]
                        width = -(-max(p[0].shape[1] for p in parts) // WIDTH_STEP) * WIDTH_STEP
                        rows = parts[0][0].shape[0]
                        ids = torch.cat([F.pad(p[0], (0, width - p[0].shape[1]), value=pad_id) for p in parts])
                        labels = torch.cat([F.pad(p[1], (0, width - p[1].shape[1]), value=-100) for p in parts])
                        mask = torch.cat([F.pad(p[2], (0, width - p[2].shape[1]), value=0) for p in parts])
                        idx = None if len(group) == len(jobs) else torch.tensor(group, device=device)
                        live.update(act=group, widths=[p[0].shape[1] for p in parts], rows=rows, idx=idx,
                                    scale=(scale if idx is None else scale.index_select(0, idx)).view(-1, 1, 1))
                        sums, _ = token_loss(model, (ids, labels, mask), device, per_example=True)
                        per_client = sums.view(len(group), rows).sum(1)
                        weight = torch.tensor([1.0 / max(n_tok[c], 1) for c in group], dtype=per_client.dtype,
                                              device=per_client.device)
                        (per_client * weight).sum().backward()
                        for c, v in zip(group, per_client.tolist()):
                            step_loss[c] += v
                for c in act:
                    if jobs[c].penalty is not None:
                        view = {n: (stacks[n].a[c, : jobs[c].rank], stacks[n].b[c, :, : jobs[c].rank]) for n in names}
                        extra = jobs[c].penalty(view)
                        if extra is not None:
                            extra.backward()
                opt.step(active)
                for c in act:
                    losses[c].append(step_loss[c] / max(n_tok[c], 1))
                    tokens[c] += sum(int(e[2].sum()) for e in enc[c])
                    if jobs[c].on_step is not None:
                        jobs[c].on_step(len(losses[c]))
    finally:
        for h in hooks:
            h.remove()
    for c, j in enumerate(jobs):
        j.trained = {n: (stacks[n].a[c, : j.rank].detach().float().cpu().clone(),
                         stacks[n].b[c, :, : j.rank].detach().float().cpu().clone()) for n in names}
        j.stats = {"loss": float(np.mean(losses[c])), "first_loss": losses[c][0], "last_loss": losses[c][-1],
                   "steps": steps[c], "tokens": tokens[c]}


def has_penalty(method) -> bool:
    return type(method).client_penalty is not AggregationMethod.client_penalty


def train_round(runtime, msgs: list, on_reply=None) -> dict:
    """The in-process transport's batched round: every message's client trained in one train_batched call
    (the runtime's model and base, each client's starting factors as ClientRuntime.prepare loads them);
    replies by client id, on_reply(msg, reply) for each, as InProcessTransport.run."""
    import time

    from .messages import Reply

    replies, jobs, ready = {}, [], []
    for msg in msgs:
        got = runtime.prepare(msg)
        if isinstance(got, Reply):
            replies[msg.client_id] = got
            continue
        method, adapter = got
        init = {n: (l.lora_A[adapter].weight.detach().clone(), l.lora_B[adapter].weight.detach().clone())
                for n, l in runtime.layers.items()}
        penalty = None
        if has_penalty(method):
            penalty = (lambda m, t: (lambda live: m.client_penalty(live, t)))(method, msg.task)
        on_step = None if runtime.on_step is None else (lambda m: (lambda step: runtime.on_step(m, step)))(msg)
        jobs.append(Job(runtime.examples[msg.client_id], msg.train_seed, msg.rank, runtime.cfg.scaling(msg.rank),
                        init, msg.task.train, penalty, on_step))
        ready.append((msg, method))
    if jobs:
        t = time.time()
        train_batched(runtime.model, runtime.layers, jobs, runtime.cfg, runtime.device, runtime.tokenizer.pad_token_id,
                      max_tokens=MAX_TOKENS)
        secs = time.time() - t
        for (msg, method), job in zip(ready, jobs):
            reply = runtime.reply(msg, method, job.trained, {**job.stats, "batched_clients": len(jobs)}, secs)
            replies[msg.client_id] = reply
    out = {}
    for msg in msgs:  # in the order of the tasks, as the sequential transport answers
        if on_reply is not None:
            on_reply(msg, replies[msg.client_id])
        out[msg.client_id] = replies[msg.client_id]
    return out
