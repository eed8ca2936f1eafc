"""RoLoRA (Chen et al., NeurIPS 2025): alternating rounds; train and average only B with A frozen, then only
A with B frozen.

B-step (exchanges 1, 3, 5, …; an exchange is a round under schedule=alternate): every client holds the same A (the server's, or the round's shared draw in
round 1), so   B̄ = Σ p_k s_k pad(B_k)  ⇒  B̄ A = Σ p_k s_k B_k A[:r_k]          exactly.
A-step (exchanges 2, 4, …): every client holds the same effective B̄ (s_k · B̄[:, :r_k] / s_k), so
               Ā = Σ p_k pad(A_k)      ⇒  B̄ Ā = Σ p_k B̄[:, :r_k] A_k            exactly.
Zero-padding keeps both exact with heterogeneous ranks (a padded row or column meets one the client did
not have); with partial participation, rows of A that no client of an A-round holds keep their value
(zeroing them would kill those ranks for good), and their untouched product is recorded as `noise`.
Only the trained factor travels up, except that a client whose rank reaches beyond the rows
of A the server holds also uploads its (frozen, freshly drawn) A in a B-round, once, so that the server
can form B̄ A (in round 1 that is every client). `frozen_mismatch` checks that those A's agree with the
server's rows (0: frozen and shared).

B first, A second: B starts at zero (peft's init), so an A-round first would see zero gradient. `first=A` swaps.

Schedules. The paper's iteration (arXiv 2502.01755; its full text was not readable from here, its summaries and
reviews were: "alternately freezes A and B", "maintains exact model aggregation", "reduces communication costs by
half") is both half-steps, each followed by its own aggregation. `schedule=alternate` (the default) makes one engine round one
half-step, one communication: T paper iterations are 2T rounds. `schedule=paper` makes one engine round one
iteration: two exchanges inside the round (exchanges_per_round = 2, bench/engine.py), B-step then A-step (with
first=B), every sampled client training in both, each aggregation exact as above, so a round's row shows both
factors changed. Both schedules compute the same thing exchange for exchange; what differs is what a round
counts, which `round_convention` (in the record's method_info) and each round's `iteration` say.
"""
from __future__ import annotations

import torch

from . import register_method
from .base import Aggregate, AggregationMethod, ClientTask, GlobalState, Option, client_weights, module_names, slice_adapter
from .factors import aggregation_noise, padded_sum
from .ffa_lora import grow_rows


@register_method("rolora")
class RoLoRA(AggregationMethod):
    description = "alternating rounds: train and average only B with A frozen, then only A with B frozen (exact)"
    citation = ("Chen et al., Robust Federated Finetuning of LLMs via Alternating Optimization of LoRA, "
                "NeurIPS 2025 (arXiv 2502.01755)")
    options = {"first": Option("B", "the factor trained in round 1 ('B': B starts at zero, so A first learns nothing)"),
               "schedule": Option("alternate", "'alternate': one round = one half-step (one factor trained and averaged "
                                  "a round; 2 rounds = 1 paper iteration); 'paper': one round = one iteration of the "
                                  "paper's alternating optimization (Chen et al., NeurIPS 2025, arXiv 2502.01755): both half-steps, "
                                  "each with its own exact aggregation (two exchanges a round)")}
    CONVENTIONS = {
        "alternate": ("one round = one half-step of the paper's iteration: round 2t-1 trains and averages one factor, "
                      "round 2t the other; 2 rounds = 1 RoLoRA iteration (equal communications, half the iterations)"),
        "paper": ("one round = one iteration of the paper's alternating optimization: two exchanges, the first factor trained and "
                  "averaged, then the other (each client trains in both: 2 × local_steps a round, two uploads of "
                  "one factor each); 1 round = 1 RoLoRA iteration = 2 half-step rounds of schedule=alternate")}
    round_convention = CONVENTIONS["alternate"]  # the default schedule's; an instance states its own

    def __init__(self, **options):
        super().__init__(**options)
        if self.opts["first"] not in ("A", "B"):
            raise ValueError(f"method_options: rolora first must be 'A' or 'B', got {self.opts['first']!r}")
        if self.opts["schedule"] not in self.CONVENTIONS:
            raise ValueError(f"method_options: rolora schedule must be 'alternate' or 'paper', got {self.opts['schedule']!r}")
        self.round_convention = self.CONVENTIONS[self.opts["schedule"]]
        self.exchanges_per_round = 2 if self.opts["schedule"] == "paper" else 1

    def trained(self, rnd: int) -> str:
        """The factor exchange rnd trains (the server's round number: one exchange is one half-step)."""
        other = "A" if self.opts["first"] == "B" else "B"
        return self.opts["first"] if rnd % 2 == 1 else other

    def configure(self, state, client):
        rows = next(iter(state.adapter.values()))[0].shape[0] if state.adapter else 0
        train = self.trained(client.round)
        init = slice_adapter(state.adapter, client.rank, client.scaling) if state.adapter else None
        upload = "AB" if train == "B" and client.rank > rows else train
        return ClientTask(init=init, train=train, upload=upload)

    def aggregate(self, updates, state):
        weights = client_weights(updates)
        train = self.trained(state.round + 1)
        adapter, mismatch, kept_rows = {}, 0.0, False
        for name in module_names(updates):
            a_old, b_old = state.adapter.get(name, (None, None))
            if train == "B":
                a, bad = grow_rows(a_old, updates, name)
                b = padded_sum([(p * u.scaling, u.factors[name][1]) for u, p in zip(updates, weights)], a.shape[0], 1)
                mismatch = max(mismatch, bad)
            else:
                if b_old is None:
                    raise ValueError("rolora: an A-round needs the B of an earlier B-round; use first=B")
                top = max(u.rank for u in updates)
                a = padded_sum([(p, u.factors[name][0]) for u, p in zip(updates, weights)], max(top, a_old.shape[0]), 0)
                if top < a_old.shape[0]:  # rows no client of the round holds keep their value (else they would die)
                    a[top:] = a_old[top:].to(a.dtype)
                    kept_rows = True
                b = padded_sum([(1.0, b_old)], a.shape[0], 1) if b_old.shape[1] < a.shape[0] else b_old
            adapter[name] = (a, b)
        # exact by construction, unless an A-round kept rows that no client of the round held (partial
        # participation): then the untouched B̄[:, r:] A[r:] stays in the product and is what `noise` measures
        noise = 0.0
        if kept_rows:  # the clients' products: Σ p_k s_k (B̄[:, :r_k] / s_k) A_k, stacked
            exact = {n: (torch.cat([u.factors[n][0] for u in updates], 0),
                         torch.cat([p * b[:, : u.rank] for u, p in zip(updates, weights)], 1))
                     for n, (_, b) in adapter.items()}
            noise = aggregation_noise(adapter, exact)[0]
        return Aggregate(GlobalState(adapter, state.round + 1),
                         metrics={"noise": noise, "trained_b": int(train == "B"), "frozen_mismatch": mismatch,
                                  "iteration": (state.round + 2) // 2})
