"""The bench's two messages as Flower records, and what a Message costs on the wire.

A task or a reply is bench/messages.py's wire form (named float32 tensors + a flat config) put into a
Flower RecordDict: {"arrays": ArrayRecord, "config": ConfigRecord}. The run's config (RunConfig as
JSON) and the session (the bench run id) ride in the task's config, so a node needs nothing but the
message and its own data.

Everything arriving from the other side is untrusted: decode_* check dtype, shape and size before any
array is deserialised and raise ValueError naming the problem (the caller turns it into a refusal or an
error reply, never a crash).
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import torch

from ..messages import (EvalReply, EvaluateMessage, Reply, TaskMessage, pack_eval_reply, pack_evaluate, pack_reply,
                        pack_task, unpack_eval_reply, unpack_evaluate, unpack_reply, unpack_task)

ARRAYS, CONFIG = "arrays", "config"
PROTOCOL = 1                       # bumped when the records change shape
NPY_HEADER_BYTES = 128             # np.save's header for a 2-D float32 array (Flower's Array.data)
REPLY_CONFIG_LIMIT = 64 * 1024     # bytes of config (metrics JSON, error text) a reply may carry
REPLY_ARRAY_SLACK = 64 * 1024      # array bytes a reply may carry beyond the exact size of an honest one
ERROR_TEXT_LIMIT = 500


# ---- arrays ----------------------------------------------------------------------------------------

def encode_arrays(tensors: dict[str, torch.Tensor]):
    from flwr.app import Array, ArrayRecord

    rec = ArrayRecord()
    for name, t in tensors.items():  # pack_* already made them contiguous float32 on the CPU
        rec[name] = Array(t.detach().to("cpu", torch.float32).contiguous().numpy())
    return rec


def array_bytes(record) -> int:
    """Serialized size of an ArrayRecord's arrays, read from the records without deserialising them."""
    return sum(len(a.data) for a in record.values())


def decode_arrays(record, max_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """float32 2-D tensors from an ArrayRecord; ValueError on a wrong dtype, a shape that is not 2-D or
    does not match the data, or more than max_bytes of array data (checked before deserialising)."""
    if max_bytes is not None:
        total = array_bytes(record)
        if total > max_bytes:
            raise ValueError(f"payload {total} bytes over the limit of {max_bytes} bytes for this task")
    out = {}
    for name, arr in record.items():
        if not isinstance(name, str) or len(name) > 512:
            raise ValueError("array name: not a string of at most 512 characters")
        if arr.dtype != "float32":
            raise ValueError(f"array {name!r}: dtype {arr.dtype}, expected float32")
        shape = tuple(arr.shape)
        if len(shape) != 2:
            raise ValueError(f"array {name!r}: shape {shape} is not 2-D")
        try:
            nd = arr.numpy()
        except Exception as exc:  # np.load(allow_pickle=False) on untrusted bytes
            raise ValueError(f"array {name!r}: not a numpy array ({str(exc)[:120]})") from None
        if nd.dtype != np.float32 or tuple(nd.shape) != shape:
            raise ValueError(f"array {name!r}: data is {nd.dtype}{tuple(nd.shape)}, declared float32{shape}")
        out[name] = torch.from_numpy(np.array(nd, copy=True))
    return out


# ---- tasks and replies ----------------------------------------------------------------------------

def task_content(msg: TaskMessage, run_json: str, session: str):
    from flwr.app import ConfigRecord, RecordDict

    arrays, config = pack_task(msg)
    return RecordDict({ARRAYS: encode_arrays(arrays),
                       CONFIG: ConfigRecord({**config, "protocol": PROTOCOL, "run": run_json, "session": session})})


def task_of(content) -> tuple[TaskMessage, str, str]:
    """(task, run config JSON, session) from a task message's content; ValueError if malformed."""
    if ARRAYS not in content or CONFIG not in content:
        raise ValueError("task: the message has no 'arrays' or 'config' record")
    config = dict(content[CONFIG])
    if config.get("protocol") != PROTOCOL:
        raise ValueError(f"task: protocol {config.get('protocol')!r}, this client speaks {PROTOCOL}; "
                         "install the same fedlora-bench version on the server and the nodes")
    try:
        msg = unpack_task(decode_arrays(content[ARRAYS]), config)
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"task: malformed ({type(exc).__name__}: {exc})") from None
    return msg, str(config.get("run", "")), str(config.get("session", ""))


def reply_content(reply: Reply):
    from flwr.app import ConfigRecord, RecordDict

    if reply.error:
        reply.error = reply.error[:ERROR_TEXT_LIMIT]
    arrays, config = pack_reply(reply)
    return RecordDict({ARRAYS: encode_arrays(arrays), CONFIG: ConfigRecord({**config, "protocol": PROTOCOL})})


def expected_reply_bytes(msg: TaskMessage, module_shapes: dict[str, tuple[int, int]], audit: bool = False) -> int:
    """The size limit of a reply's arrays: an honest reply holds rank × Σ(d_in + d_out) × 4 bytes over the
    factors the task uploads (a core, upload "R": rank² per module), plus one npy header per array; with audit
    (the run saves client adapters) also the client's trained adapter, both factors; REPLY_ARRAY_SLACK on top (a
    reply just over the exact size is refused by the shape checks, with a more telling reason)."""
    if msg.task.upload == "R":
        size, n_arrays = msg.rank * msg.rank * 4 * len(module_shapes), len(module_shapes)
    else:
        per_module = sum(d_in for _, d_in in module_shapes.values()) * ("A" in msg.task.upload) \
            + sum(d_out for d_out, _ in module_shapes.values()) * ("B" in msg.task.upload)
        size, n_arrays = msg.rank * per_module * 4, len(module_shapes) * len(msg.task.upload)
    if audit:
        size += msg.rank * sum(d_in + d_out for d_out, d_in in module_shapes.values()) * 4
        n_arrays += 2 * len(module_shapes)
    return size + n_arrays * NPY_HEADER_BYTES + REPLY_ARRAY_SLACK


def reply_of(content, max_array_bytes: int | None = None) -> Reply:
    """A Reply from a reply message's content; ValueError (naming the problem) for anything malformed or
    over the size limit. The checks against the task (shapes, modules, rank, finiteness) are the
    ReplyFilter's (bench/guard.py)."""
    if ARRAYS not in content or CONFIG not in content:
        raise ValueError("reply: the message has no 'arrays' or 'config' record")
    config = dict(content[CONFIG])
    size = sum(len(v) if isinstance(v, (str, bytes)) else 16 for v in config.values())
    if size > REPLY_CONFIG_LIMIT:
        raise ValueError(f"reply: config of {size} bytes over the limit of {REPLY_CONFIG_LIMIT}")
    if config.get("protocol") != PROTOCOL:
        raise ValueError(f"reply: protocol {config.get('protocol')!r}, expected {PROTOCOL}")
    reply = unpack_reply(decode_arrays(content[ARRAYS], max_array_bytes), config)
    if reply.error:
        reply.error = reply.error[:ERROR_TEXT_LIMIT]
        return reply
    missing = [k for k in ("first_loss", "last_loss", "steps", "seconds") if not _is_number(reply.metrics.get(k))]
    if missing:
        raise ValueError(f"reply: metric {missing[0]!r} missing or not a number")
    return reply


# ---- evaluation (personalized methods: each client scores its own model) ----------------------------

def evaluate_content(ask: EvaluateMessage, run_json: str, session: str):
    from flwr.app import ConfigRecord, RecordDict

    arrays, config = pack_evaluate(ask)
    return RecordDict({ARRAYS: encode_arrays(arrays),
                       CONFIG: ConfigRecord({**config, "protocol": PROTOCOL, "run": run_json, "session": session})})


def evaluate_of(content) -> tuple[EvaluateMessage, str, str]:
    """(evaluation request, run config JSON, session) from an EVALUATE message's content; ValueError if malformed."""
    if ARRAYS not in content or CONFIG not in content:
        raise ValueError("evaluate: the message has no 'arrays' or 'config' record")
    config = dict(content[CONFIG])
    if config.get("protocol") != PROTOCOL:
        raise ValueError(f"evaluate: protocol {config.get('protocol')!r}, this client speaks {PROTOCOL}; "
                         "install the same fedlora-bench version on the server and the nodes")
    try:
        ask = unpack_evaluate(decode_arrays(content[ARRAYS]), config)
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"evaluate: malformed ({type(exc).__name__}: {exc})") from None
    return ask, str(config.get("run", "")), str(config.get("session", ""))


def eval_reply_content(reply: EvalReply):
    from flwr.app import ConfigRecord, RecordDict

    if reply.error:
        reply.error = reply.error[:ERROR_TEXT_LIMIT]
    return RecordDict({CONFIG: ConfigRecord({**pack_eval_reply(reply), "protocol": PROTOCOL})})


def expected_eval_config_bytes(own_examples: int, pooled_examples: int) -> int:
    """The size limit of an evaluation reply's config: a float's JSON (≤ 24 characters) and a count (≤ 12) per
    example of both sets, plus the error text and REPLY_CONFIG_LIMIT of slack."""
    return 40 * (own_examples + pooled_examples) + ERROR_TEXT_LIMIT + REPLY_CONFIG_LIMIT


def eval_reply_of(content, max_config_bytes: int) -> EvalReply:
    """An EvalReply from an EVALUATE reply's content; ValueError (naming the problem) for anything malformed or
    over the size limit. The example counts are checked against the task by the server (Server.aggregate_evaluate)."""
    if CONFIG not in content:
        raise ValueError("evaluation reply: the message has no 'config' record")
    config = dict(content[CONFIG])
    size = sum(len(v) if isinstance(v, (str, bytes)) else 16 for v in config.values())
    if size > max_config_bytes:
        raise ValueError(f"evaluation reply: config of {size} bytes over the limit of {max_config_bytes}")
    if config.get("protocol") != PROTOCOL:
        raise ValueError(f"evaluation reply: protocol {config.get('protocol')!r}, expected {PROTOCOL}")
    reply = unpack_eval_reply(config)
    if reply.error:
        reply.error = reply.error[:ERROR_TEXT_LIMIT]
    return reply


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# ---- what goes over the wire -----------------------------------------------------------------------

def wire_bytes(message) -> int:
    """Bytes Flower serialises for a Message: every object of its tree (the message, its RecordDict,
    records, arrays and their ≤ 5 MB chunks) deflated as it is pushed, identical objects once.

    This is what push_messages uploads when the receiver holds none of the objects yet; a SuperLink
    that already holds an identical chunk skips it, and the HTTP framing is not counted."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


# ---- the run's config and the data a node trains on ------------------------------------------------

def config_to_json(cfg) -> str:
    return json.dumps(cfg.to_dict(), sort_keys=True)


def config_from_json(text: str):
    """The RunConfig a message carries, type-checked and validated like a config file (BenchError or
    ValueError naming the field)."""
    from ..config import FIELDS, RunConfig, coerce_field, validate

    try:
        data = json.loads(text)
    except (TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"run config: not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError("run config: not a JSON object")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise ValueError(f"run config: unknown key {unknown[0]!r} (a newer fedlora-bench on the server?)")
    cfg = RunConfig(**{k: coerce_field(k, v) for k, v in data.items()})
    validate(cfg)
    return cfg


def shard_digest(records: list[dict]) -> str:
    """Fingerprint of one client's training records: the server and the node must hold the same shard."""
    return hashlib.sha256(json.dumps(records, sort_keys=True, default=str).encode()).hexdigest()
