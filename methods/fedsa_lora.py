"""FedSA-LoRA (Guo et al., ICLR 2025): only A is shared and averaged; each client keeps its own B.

Clients train A and B; they upload A only. The server averages
    Ā[i] = Σ_{k: r_k > i} p_k A_k[i] / Σ_{k: r_k > i} p_k      (row i over the clients that have row i)
and client k starts its next round from (Ā[:r_k], its own B_k from its previous round). B never leaves the
client (ClientTask.keep / upload): the engine keeps it with the client, checkpoints and restores it.

Client k's own model after a round is base + s_k B_k Ā[:r_k]: the global A with its personal B (the
FederatedScope `personalization.local_param: ['lora_B']` evaluation of the public code). The server
holds no B, so there is no global model: the exported "global model" of a run is the base model (its
adapter has no B), and the method's score is the personalized one, per client.

Heterogeneous ranks (the paper's clients share one rank): row i of Ā averages the clients that hold
row i, weights renormalised over them; a row no client of the round holds keeps its previous value. A is
not multiplied by any shared B on the server, so nothing needs zero-padding to stay exact, and averaging
in zeros for rows a client never had would only shrink the rows of the larger clients.
"""
from __future__ import annotations

import torch

from . import register_method
from .base import Aggregate, AggregationMethod, ClientTask, GlobalState, client_weights, module_names


def row_average(parts: list[tuple[float, torch.Tensor]], previous: torch.Tensor | None) -> torch.Tensor:
    """Row i = weighted mean of the parts that have row i (weights renormalised); rows beyond every part
    keep `previous`."""
    rows = max(max(t.shape[0] for _, t in parts), previous.shape[0] if previous is not None else 0)
    t0 = parts[0][1]
    out = torch.zeros(rows, t0.shape[1], dtype=t0.dtype, device=t0.device)
    mass = torch.zeros(rows, 1, dtype=torch.float64, device=t0.device)
    for w, t in parts:
        out[: t.shape[0]] += w * t
        mass[: t.shape[0]] += w
    held = (mass > 0).squeeze(1)
    out[held] = out[held] / mass[held].to(out.dtype)
    if previous is not None and not bool(held.all()):  # rows beyond every client of the round
        idx = (~held).nonzero().squeeze(1)
        out[idx] = previous[idx].to(out.dtype)
    return out


@register_method("fedsa-lora")
class FedSALoRA(AggregationMethod):
    description = "share and average only A; every client keeps its own B (personalized, no global model)"
    citation = ("Guo et al., Selective Aggregation for Low-Rank Adaptation in Federated Learning, ICLR 2025 "
                "(arXiv 2410.01463); code github.com/Pengxin-Guo/FedSA-LoRA")
    personalized = True
    has_global_model = False
    # federatedscope/llm/yamls/fedsa-lora.yaml of the public code: r 8, lora_alpha 16, dropout 0.05. Its
    # lr 0.005 is for FederatedScope's SGD (this engine trains with AdamW) and its 30 local steps of batch 1
    # are for a 3-client GSM8K run: neither is set here.
    recipe = {"rank": 8, "lora_alpha": 16.0, "lora_dropout": 0.05}

    def configure(self, state, client):
        init = ({name: (a[: client.rank].clone(), None) for name, (a, _) in state.adapter.items()}
                if state.adapter else None)
        return ClientTask(init=init, train="AB", keep="B", upload="A")

    def aggregate(self, updates, state):
        weights = client_weights(updates)
        adapter = {}
        for name in module_names(updates):
            previous = state.adapter.get(name, (None, None))[0]
            adapter[name] = (row_average([(p, u.factors[name][0]) for u, p in zip(updates, weights)], previous), None)
        rows = next(iter(adapter.values()))[0].shape[0]
        return Aggregate(GlobalState(adapter, state.round + 1), metrics={"a_rows": rows})
