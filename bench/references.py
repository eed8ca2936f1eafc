"""The reference rows every federated benchmark needs, run by the same engine on the same data:

- base:        no training; the global model is the base model.
- centralized: one client holding the pooled training data of every client, at the largest rank, for the
               same total number of local steps as the federated run (the upper bound).
- local-only:  every client trains alone on its own data for all rounds and shares nothing; scored as the
               mean over clients of its own model, on the pooled and on its own held-out split.
The record keeps the federated setting it is a reference for, with `method` set to the reference's name.
"""
from __future__ import annotations

import dataclasses
import math

from methods import Aggregate, AggregationMethod, ClientTask, GlobalState, get_method


class LocalOnly(AggregationMethod):
    """Each client continues from its own last factors (keep AB) and sends nothing (upload '')."""

    name = "local-only"
    description = "every client trains alone; nothing is shared"
    personalized = True

    def configure(self, state, client):
        return ClientTask(keep="AB", upload="")

    def aggregate(self, updates, state):
        return Aggregate(GlobalState({}, state.round + 1))


def resolve_method(name: str, options: dict | None = None) -> AggregationMethod:
    """A registered method, or the local-only reference (which trains like a method but is not one)."""
    return LocalOnly() if name == LocalOnly.name else get_method(name, options)


def total_client_steps(cfg, plan, sample) -> int:
    """Σ over rounds and sampled clients of their local steps: what the federated run trains in all."""
    total = 0
    for rnd in range(1, cfg.rounds + 1):
        for k in sample(rnd):
            total += cfg.local_steps or max(1, math.ceil(cfg.local_epochs * len(plan.shards[k]) / cfg.batch_size))
    return total


def reference_run(cfg, plan, sample):
    """(config to train with, plan to train on, method) for cfg.reference; the record keeps cfg's setting."""
    if cfg.reference == "base":
        return dataclasses.replace(cfg, rounds=0), plan, get_method("fedavg-lora")
    if cfg.reference == "local-only":
        return cfg, plan, LocalOnly()
    # centralized
    pooled = sorted(i for shard in plan.shards for i in shard)
    rank = max(plan.ranks)
    train_cfg = dataclasses.replace(cfg, num_clients=1, client_fraction=1.0, rounds=1, ranks=[rank],
                                    local_steps=total_client_steps(cfg, plan, sample), local_epochs=None)
    return train_cfg, dataclasses.replace(plan, shards=[pooled], ranks=[rank],
                                          client_tests=[sorted(i for t in plan.client_tests for i in t)]), \
        get_method("fedavg-lora")
