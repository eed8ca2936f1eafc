"""A hostile ClientApp for tests/test_flower_deploy.py: bench's real client (bench/flower/client_app.py)
trains, then the reply is corrupted as the run config's `hostile` entry says for this round and partition:
    "<round>:<partition>:<kind>,..." with kind one of
    shape     A of the first module gets one column too many
    module    a module name the server never sent
    nan, inf  non-finite values in A of the first module
    rank      factors of rank r+1 for a rank-r task (and the reply claims rank r+1)
    big       A of the first module with 256× the rows: an upload over the task's size limit
    malformed the reply's config lacks num_examples
    crash     the ClientApp raises (Flower turns it into an error reply)
It is copied into the Flower app folder (the FAB carries *.py), and named as the app's clientapp.
"""
from __future__ import annotations

import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp

from bench.flower import client_app as bench_client
from bench.flower import wire

app = ClientApp()


@app.query()
def hello(msg: Message, context) -> Message:
    info = bench_client.hello_info(msg.content, context)
    return Message(RecordDict({wire.CONFIG: ConfigRecord({**info, "protocol": wire.PROTOCOL})}), reply_to=msg)


def _plan(context) -> dict[tuple[int, int], str]:
    out = {}
    for item in str(context.run_config.get("hostile", "")).split(","):
        if item.strip():
            r, k, kind = item.strip().split(":")
            out[(int(r), int(k))] = kind
    return out


@app.train()
def train(msg: Message, context) -> Message:
    reply = bench_client.train_reply(msg.content, context)
    kind = _plan(context).get((reply.round, reply.client_id))
    if kind == "crash":
        raise RuntimeError("hostile client: crash on purpose")
    first = sorted(reply.factors)[0] if reply.factors else None
    if kind and first:
        a, b = reply.factors[first]
        if kind == "shape":
            reply.factors[first] = (torch.cat([a, a[:, :1]], dim=1), b)
        elif kind == "module":
            reply.factors["model.layers.99.self_attn.q_proj"] = reply.factors.pop(first)
        elif kind in ("nan", "inf"):
            a = a.clone()
            a[0, 0] = float("nan") if kind == "nan" else float("inf")
            reply.factors[first] = (a, b)
        elif kind == "rank":
            reply.factors = {n: (torch.cat([a_, a_[:1]], dim=0), torch.cat([b_, b_[:, :1]], dim=1))
                             for n, (a_, b_) in reply.factors.items()}
            reply.rank += 1
        elif kind == "big":
            reply.factors[first] = (a.repeat(256, 1), b)
    content = wire.reply_content(reply)
    if kind == "malformed":
        config = dict(content[wire.CONFIG])
        del config["num_examples"]
        content[wire.CONFIG] = ConfigRecord(config)
    return Message(content, reply_to=msg)
