"""Differential privacy for every method: DP-SGD (Opacus) on each client's local training.

What is guaranteed (record-level DP inside each client, the "client-level DP" of the benchmark's issue):
for every client k, the sequence of everything it uploads over the whole run (the factors of every round
it takes part in) is (ε_k, δ)-differentially private with respect to adding or removing ONE training
example of client k's local data set. The unit of privacy is a training example (an instruction/response
pair), not a client: a client's participation as a whole is not hidden. The server's state, the merges,
the exported model and every score are post-processing of those uploads, so they are covered too.

How: each optimizer step samples the client's examples by Poisson sampling (each one independently with
probability q = batch_size / n_k, the sampling the accountants assume), computes each example's gradient
of its own mean token loss on the trained LoRA factors with Opacus's GradSampleModule, clips it to L2
norm C (dp_clip_norm) over all trained factors together, sums, adds N(0, σ²C²) per coordinate (Opacus's
DPOptimizer), divides by the expected batch size q·n_k, and lets AdamW step (post-processing). A method's
client penalty (HetLoRA's tail regularizer) is a function of the factors alone, not of the data: its
gradient is added after the noise. σ is dp_noise_multiplier, or calibrated per client so that its
(q_k, T_k = local steps × exchanges a round × rounds) reaches dp_epsilon at dp_delta (Opacus's get_noise_multiplier, the
worst case of a client taking part in every round). The ε spent so far is computed per client after
every round from the (σ, q, steps) its rounds report, with Opacus's RDP or PRV accountant.

Outside the guarantee, stated in the record: each client's example count n_k (it sets q_k and the
aggregation weights p_k; treated as public, as Opacus's sample rate does), and the training-loss
telemetry the benchmark records per round (a deployment would not send it). The Gaussian noise comes
from a seeded generator so that runs and resumes reproduce; a deployment would use Opacus's secure_mode.
"""
from __future__ import annotations

import math
import warnings
from functools import lru_cache

import numpy as np
import torch

from . import BenchError
from . import data as data_mod
from .seeds import seed_stream

ACCOUNTANTS = ("rdp", "prv")
DEFINITION = ("record-level DP-SGD inside each client: each client's uploads over the whole run are (ε, δ)-DP "
              "with respect to adding or removing one training example of that client (Poisson sampling, "
              "per-example clipping of the trained LoRA factors' gradient, Gaussian noise; Opacus)")
OUTSIDE = ["num_examples: each client's example count (sets q and the aggregation weights p_k), treated as public",
           "training-loss telemetry in metrics.jsonl (the benchmark's own measurement; a deployment would not send it)"]


def enabled(cfg) -> bool:
    return cfg.dp_epsilon is not None or cfg.dp_noise_multiplier is not None


def validate(cfg, method) -> None:
    """Field checks and the method's refusal: one line each, before any work."""
    if not enabled(cfg):
        if cfg.dp_delta is not None:
            raise BenchError("dp_delta: given without --dp-epsilon or --dp-noise-multiplier; add one of them or drop it")
        return
    if cfg.dp_epsilon is not None and cfg.dp_noise_multiplier is not None:
        raise BenchError("dp_epsilon: give either --dp-epsilon (σ calibrated to it) or --dp-noise-multiplier, not both")
    if not method.supports_dp:
        raise BenchError(f"dp_epsilon: {cfg.method} does not support differential privacy ({method.dp_refusal}); "
                         "drop the --dp-* flags or choose a method that does (docs/methods.md, DP column)")
    if cfg.reference == "base":
        raise BenchError("dp_epsilon: the base reference trains nothing, so there is nothing to privatize; drop the --dp-* flags")
    if cfg.dp_epsilon is not None and not cfg.dp_epsilon > 0:
        raise BenchError(f"dp_epsilon: must be > 0, got {cfg.dp_epsilon}")
    if cfg.dp_noise_multiplier is not None and not cfg.dp_noise_multiplier > 0:
        raise BenchError(f"dp_noise_multiplier: must be > 0, got {cfg.dp_noise_multiplier}")
    if cfg.dp_delta is None or not 0 < cfg.dp_delta < 1:
        raise BenchError(f"dp_delta: DP needs a δ in (0, 1), got {cfg.dp_delta}; e.g. --dp-delta 1e-5 (below 1/n of every client)")
    if not cfg.dp_clip_norm > 0:
        raise BenchError(f"dp_clip_norm: must be > 0, got {cfg.dp_clip_norm}")
    if cfg.dp_accountant not in ACCOUNTANTS:
        raise BenchError(f"dp_accountant: unknown {cfg.dp_accountant!r}; choose one of {', '.join(ACCOUNTANTS)}")
    try:
        import opacus  # noqa: F401
    except ImportError:
        raise BenchError("dp_epsilon: differential privacy needs Opacus; pip install 'fedlora-bench[dp]' (opacus==1.6.0)") from None


def setting(cfg) -> dict | None:
    """The DP part of a run's setting (the leaderboard's row key), None without DP."""
    if not enabled(cfg):
        return None
    given = {"epsilon": cfg.dp_epsilon, "noise_multiplier": cfg.dp_noise_multiplier, "delta": cfg.dp_delta,
             "clip_norm": cfg.dp_clip_norm, "accountant": cfg.dp_accountant}
    return {"kind": "dp-sgd", **{k: v for k, v in given.items() if v is not None}}


def steps_per_round(cfg, n: int) -> int:
    """A client's local steps in one round (local_train's rule)."""
    return cfg.local_steps or max(1, math.ceil(cfg.local_epochs * n / cfg.batch_size))


def sample_rate(cfg, n: int) -> float:
    """q: each example's probability of being in a step's batch (expected batch size q·n = batch_size)."""
    return min(1.0, cfg.batch_size / n)


def noise_multiplier(cfg, n: int) -> float:
    """σ for a client of n examples: the given one, or the smallest that keeps ε ≤ dp_epsilon after every round."""
    if cfg.dp_noise_multiplier is not None:
        return float(cfg.dp_noise_multiplier)
    from methods import get_method

    # a client trains in every exchange of a round (RoLoRA's schedule=paper: two), so its steps over the run are
    # local steps × exchanges × rounds; a reference row trains with FedAvg, one exchange a round
    exchanges = 1 if cfg.reference else get_method(cfg.method, cfg.method_options).exchanges_per_round
    return _calibrated(cfg.dp_epsilon, cfg.dp_delta, sample_rate(cfg, n), steps_per_round(cfg, n) * exchanges * cfg.rounds,
                       cfg.dp_accountant)


@lru_cache(maxsize=256)
def _calibrated(epsilon: float, delta: float, q: float, steps: int, accountant: str) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    try:
        return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=q, steps=steps,
                                          accountant=accountant, epsilon_tolerance=0.01))
    except ValueError as exc:
        raise BenchError(f"dp_epsilon: {epsilon} cannot be reached at δ={delta} over {steps} steps at q={q:.3g} ({exc}); "
                         "raise dp_epsilon or lower the rounds or local steps") from None


def epsilon(history: list[tuple[float, float, int]], delta: float, accountant: str = "rdp") -> float:
    """ε spent after the given (σ, q, steps) rounds, by Opacus's accountant."""
    from opacus.accountants import create_accountant

    if not history:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = [(float(s), float(q), int(t)) for s, q, t in history]
    return float(acc.get_epsilon(delta=delta))


def preflight(cfg, shard_sizes: list[int]) -> None:
    """What needs the partition: δ below 1/n of every client, and σ reachable for every client's n."""
    if not enabled(cfg):
        return
    k = min(range(len(shard_sizes)), key=lambda i: shard_sizes[i])
    if cfg.dp_delta >= 1 / max(shard_sizes[k], 1):
        raise BenchError(f"dp_delta: {cfg.dp_delta} is not below 1/n = 1/{shard_sizes[k]} of client {k}'s examples "
                         "(such a δ allows releasing an example outright); use e.g. 1e-5")
    for n in sorted(set(shard_sizes)):
        noise_multiplier(cfg, n)


# ---- the client side -----------------------------------------------------------------------------

def dp_local_train(model, examples: list[dict], cfg, seed: int, device, pad_id: int, params: list,
                   penalty=None, on_step=None) -> dict:
    """local_train under DP-SGD (see the module docstring); the same statistics, plus the round's
    (σ, q, C) for the accountant (with its steps) and the share of sampled examples whose gradient was clipped."""
    n = len(examples)
    q, steps, sigma = sample_rate(cfg, n), steps_per_round(cfg, n), noise_multiplier(cfg, n)
    model.train()
    torch.manual_seed(seed)  # dropout
    rng = seed_stream("dp_sampling", seed)
    losses, tokens, sampled, clipped = [], 0, 0, 0
    with PrivateGradient(model, params, cfg.dp_clip_norm, sigma, q * n, seed, device) as dp:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        for step in range(steps):
            batch = np.flatnonzero(rng.random(n) < q).tolist()  # Poisson sampling
            loss_sum, labelled, seen = dp.backward(examples, batch, cfg.micro_batch_size, pad_id)
            norms = dp.per_example_norms()
            sampled, clipped = sampled + len(batch), clipped + int((norms > cfg.dp_clip_norm).sum())
            dp.noisy_gradient()
            extra = penalty() if penalty is not None else None
            if extra is not None:  # a function of the factors alone, not of the data: added after the noise
                for p, g in zip(params, torch.autograd.grad(extra, params, allow_unused=True)):
                    if g is not None:
                        p.grad += g
            opt.step()
            dp.zero_grad()
            losses.append(loss_sum / max(labelled, 1))
            tokens += seen
            if on_step is not None:
                on_step(step + 1)
    return {"loss": float(np.mean(losses)), "first_loss": losses[0], "last_loss": losses[-1], "steps": steps,
            "tokens": tokens, "dp_noise_multiplier": sigma, "dp_sample_rate": q,
            "dp_clip_norm": float(cfg.dp_clip_norm), "dp_clipped_fraction": clipped / sampled if sampled else 0.0}


class PrivateGradient:
    """Opacus on one model for one client's round: per-example gradients of `params` (GradSampleModule's hooks,
    removed on exit so the model serves the next client as it was), then clipping, noise and the division by
    the expected batch size (DPOptimizer's pre_step) into each parameter's .grad."""

    def __init__(self, model, params: list, clip_norm: float, sigma: float, expected_batch: float, seed: int, device):
        self.model, self.params, self.expected_batch = model, params, expected_batch
        self.device, self.clip_norm, self.sigma, self.seed = device, clip_norm, sigma, seed

    def __enter__(self):
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        # the frozen embeddings give the hooked modules no input gradient; Opacus's hooks fire on outputs
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        self.gsm = GradSampleModule(self.model, batch_first=True, loss_reduction="sum", strict=False)
        # DPOptimizer's own step is not used (its "mean" reduction divides by the number of micro-batches,
        # which depends on the Poisson draw): pre_step clips and adds the noise, we divide by q·n
        gen = torch.Generator(device=self.device).manual_seed(self.seed)
        self.opt = DPOptimizer(torch.optim.SGD(self.params, lr=0.0), noise_multiplier=self.sigma,
                               max_grad_norm=self.clip_norm, expected_batch_size=max(1, round(self.expected_batch)),
                               loss_reduction="sum", generator=gen)
        return self

    def __exit__(self, *exc):
        self.gsm._close()
        self._warnings.__exit__(*exc)

    def backward(self, examples: list[dict], batch: list[int], micro: int, pad_id: int) -> tuple[float, int, int]:
        """Per-example gradients of the batch, each of its example's own mean token loss (one example, one unit
        of privacy); returns the summed token loss, the labelled tokens and all tokens, for the statistics."""
        from .client import token_loss

        loss_sum, labelled, tokens = 0.0, 0, 0
        for i in range(0, len(batch), micro):
            enc = data_mod.collate([examples[j] for j in batch[i:i + micro]], pad_id)
            sums, counts = token_loss(self.model, enc, self.device, per_example=True)
            (sums / counts.clamp_min(1)).sum().backward()
            loss_sum, labelled, tokens = loss_sum + float(sums.detach().sum()), labelled + int(counts.sum()), tokens + int(enc[2].sum())
        if not batch:  # an empty Poisson batch still takes a noisy step
            for p in self.params:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        return loss_sum, labelled, tokens

    def per_example_norms(self) -> torch.Tensor:
        """Each example's gradient norm over all trained factors together (what Opacus clips)."""
        gs = self.opt.grad_samples
        if not gs or len(gs[0]) == 0:
            return torch.zeros(0)
        wide = torch.promote_types(gs[0].dtype, torch.float32)  # bfloat16 norms in float32, float64 stays
        return torch.stack([g.reshape(len(g), -1).to(wide).norm(dim=1) for g in gs], 1).norm(dim=1)

    def noisy_gradient(self) -> None:
        """p.grad = (Σ_i clip_C(g_i) + N(0, σ²C²)) / (q·n): the divisor does not depend on the draw."""
        self.opt.pre_step()
        for p in self.params:
            p.grad /= self.expected_batch

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)


# ---- the server side: the accountant after every round -------------------------------------------

def client_history(rounds: list[dict], client: int) -> list[tuple[float, float, int]]:
    """(σ, q, steps) of every round in which the client trained (excluded uploads count: the server saw them)."""
    return [(c["dp_noise_multiplier"], c["dp_sample_rate"], c["steps"])
            for row in rounds for c in row["clients"] if c["id"] == client and "dp_noise_multiplier" in c]


def account_round(cfg, rounds: list[dict], row: dict) -> None:
    """Add each client's spent ε (cumulative, through this round) to its row, and the round's summary."""
    if not enabled(cfg):
        return
    for c in row["clients"]:
        if "dp_noise_multiplier" in c:
            c["dp_epsilon"] = epsilon(client_history(rounds + [row], c["id"]), cfg.dp_delta, cfg.dp_accountant)
    spent = [c["dp_epsilon"] for c in row["clients"] if "dp_epsilon" in c]
    row["privacy"] = {"delta": cfg.dp_delta, "accountant": cfg.dp_accountant, "epsilon_max": max(spent, default=0.0)}


def record_section(cfg, rounds: list[dict], num_clients: int) -> dict:
    """The record's privacy section: the definition, the mechanism and each client's final spent ε."""
    clients = []
    for k in range(num_clients):
        hist = client_history(rounds, k)
        clients.append({"client": k, "epsilon": epsilon(hist, cfg.dp_delta, cfg.dp_accountant),
                        "noise_multiplier": hist[0][0] if hist else None, "sample_rate": hist[0][1] if hist else None,
                        "steps": sum(t for _, _, t in hist), "rounds": len(hist)})
    return {"definition": DEFINITION, "unit": "one training example of one client", "adjacency": "add/remove",
            "sampling": "poisson", "accountant": cfg.dp_accountant, "delta": cfg.dp_delta,
            "target_epsilon": cfg.dp_epsilon, "noise_multiplier": cfg.dp_noise_multiplier, "clip_norm": cfg.dp_clip_norm,
            "calibration": ("σ per client so that ε ≤ target if it takes part in every round" if cfg.dp_epsilon is not None
                            else "σ given"),
            "epsilon_max": max((c["epsilon"] for c in clients), default=0.0), "clients": clients,
            "outside_guarantee": OUTSIDE, "noise": "seeded torch generator (reproducible; not Opacus secure_mode)"}
