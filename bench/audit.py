"""`bench audit RUN_DIR`: check a run from its files alone.

A run made with --save-client-adapters keeps, per round and client (and per exchange, for a method with several
exchanges a round), the upload (a PEFT folder), what the client received (received.safetensors) and its task
(task.json: rank, scaling, p); metrics.jsonl keeps the rounds. The audit replays the server from those files with
the run's own method and config:
  - each client's starting factors and base merges, re-derived, against what it received;
  - p_k re-derived from the example counts, against the recorded p;
  - each saved PEFT folder (adapter_config.json: r, lora_alpha, rsLoRA) against the scaling the client trained
    with and the rank it sent, and its factors against what the server received (sent.safetensors);
  - the exported global model minus the base, against the replayed merges plus the global adapter.
Nothing of the run's process is needed: a reviewer can run it on a copied folder.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from methods import ClientSpec, ClientUpdate, GlobalState, get_method

from . import BenchError
from .export import global_model_dir

PREFIX = "base_model.model."


def _read_upload(folder: Path) -> dict:
    from safetensors.torch import load_file

    out: dict[str, list] = {}
    path = folder / "adapter_model.safetensors"
    if not path.is_file():
        return {}
    for key, t in load_file(str(path)).items():
        name, which = key[len(PREFIX):].rsplit(".lora_", 1)
        out.setdefault(name, [None, None])["AB".index(which[0])] = t
    return {n: tuple(p) for n, p in out.items()}


def _read_sent(folder: Path) -> dict:
    """What the server received from this client (sent.safetensors); a run without it: the PEFT folder."""
    from safetensors.torch import load_file

    from .messages import factor_groups

    path = folder / "sent.safetensors"
    return factor_groups(load_file(str(path)), "up").get("-", {}) if path.is_file() else _read_upload(folder)


def peft_scaling(folder: Path) -> tuple[int, float]:
    """(r, scaling) that peft applies to a saved adapter folder, from its adapter_config.json."""
    spec = json.loads((folder / "adapter_config.json").read_text())
    r = int(spec["r"])
    return r, float(spec["lora_alpha"]) / (r ** 0.5 if spec.get("use_rslora") else r)


def _peft_error(folder: Path, task: dict, sent: dict, init: dict | None, core: dict) -> float:
    """The saved PEFT folder against the task and the upload: its scaling against the one the client trained with
    (relative), its rank against the rank sent (inf if not), and each factor the server received against the
    folder's (a core: the folder's A against R @ A_init)."""
    if not (folder / "adapter_config.json").is_file():
        return 0.0 if not sent else float("inf")
    r, scaling = peft_scaling(folder)
    if r != task.get("rank_sent", task["rank"]):
        return float("inf")
    err = abs(scaling - task["scaling"]) / task["scaling"]
    saved = _read_upload(folder)
    upload = task["task"]["upload"]
    for name, (a, b) in sent.items():
        fa, fb = saved.get(name, (None, None))
        if upload == "R":
            a0 = init[name][0][: a.shape[0]]
            err = max(err, _rel(fa, a.double() @ a0.double()) if fa is not None else float("inf"))
            continue
        for got, want in ((fa, a), (fb, b)):
            if want is not None:
                err = max(err, _rel(got, want) if got is not None and got.shape == want.shape else float("inf"))
    return err


def _read_received(folder: Path) -> tuple[dict | None, dict[int, dict]]:
    from safetensors.torch import load_file

    from .messages import factor_groups

    arrays = load_file(str(folder / "received.safetensors"))
    init = factor_groups(arrays, "init").get("-")
    merges = {int(r): f for r, f in factor_groups(arrays, "merge").items()}
    return init, merges


def _read_core(folder: Path) -> dict:
    """A core task's starting core (module -> R) from received.safetensors; {} for other tasks."""
    from safetensors.torch import load_file

    from .messages import factor_groups

    return {n: a for n, (a, _) in factor_groups(load_file(str(folder / "received.safetensors")), "core").get("-", {}).items()}


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    scale = float(torch.linalg.vector_norm(y.double()))
    return float(torch.linalg.vector_norm(x.double() - y.double())) / scale if scale > 0 else float(torch.linalg.vector_norm(x.double()))


def _pair_error(got, want) -> float:
    """Relative error between two factor pairs, on each factor given (None on both sides: nothing to compare)."""
    err = 0.0
    for g, w in zip(got, want):
        if (g is None) != (w is None):
            return float("inf")
        if g is not None:
            err = max(err, _rel(g, w))
    return err


def replay(run_dir: str | Path) -> dict:
    """Re-derive the run from its files; returns per-round maxima of the relative errors and the export check."""
    from .config import build_config
    from .models import resolve_model

    run_dir = Path(run_dir)
    if not (run_dir / "clients").is_dir():
        raise BenchError(f"audit: {run_dir}/clients is missing; audit needs a run made with --save-client-adapters")
    cfg = build_config(config_file=str(run_dir / "config.yaml"))
    method = get_method(cfg.method, cfg.method_options)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    per_round = method.exchanges_per_round
    state, merges, report = GlobalState(), {}, {"method": cfg.method, "rounds": []}
    for row in rows:
        rnd = row["round"]
        init_err = merge_err = p_err = peft_err = 0.0
        # a round of E > 1 exchanges: its clients' rows name their exchange, and each exchange is a server round
        for e in (range(1, per_round + 1) if per_round > 1 else [None]):
            h = (rnd - 1) * per_round + (e or 1)
            clients = [c for c in row["clients"] if c.get("exchange") == e]
            updates = []
            for c in clients:
                folder = run_dir / "clients" / f"round_{rnd}" / (f"exchange_{e}" if e else "") / f"client_{c['id']}"
                task = json.loads((folder / "task.json").read_text())
                init, got_merges = _read_received(folder)
                core = _read_core(folder)
                expected = method.configure(state, ClientSpec(c["id"], task["rank"], task["scaling"], h))
                want = expected.init
                if (init is None) != (want is None) or (expected.core is None) != (not core):
                    init_err = float("inf")
                for name in (want or {}):
                    init_err = max(init_err, _pair_error(init.get(name, (None, None)), want[name]))
                for name, r in (expected.core or {}).items():
                    init_err = max(init_err, _rel(core[name], r) if name in core else float("inf"))
                sent = _read_sent(folder)
                if sent:
                    peft_err = max(peft_err, _peft_error(folder, task, sent, init, core))
                for r, m in got_merges.items():
                    for name, pair in m.items():
                        merge_err = max(merge_err, _rel(pair[1] @ pair[0], merges[r][name][1] @ merges[r][name][0]))
                if "excluded" not in c:
                    updates.append(ClientUpdate(c["id"], task.get("rank_sent", task["rank"]), task["scaling"],
                                                c["examples"], sent))
            agg = method.aggregate(updates, state)
            total = sum(u.num_examples for u in updates)
            for u, c in zip(updates, [c for c in clients if "excluded" not in c]):
                p_err = max(p_err, abs(u.num_examples / total - c["p"]))
            state = agg.state
            if agg.merge:
                merges[h] = agg.merge
        report["rounds"].append({"round": rnd, "clients": len(row["clients"]), "init_rel_err": init_err,
                                 "merge_rel_err": merge_err, "p_abs_err": p_err, "peft_rel_err": peft_err})
    report["export_rel_err"] = _export_error(run_dir, resolve_model(cfg.model)[0], merges, state)
    return report


def _export_error(run_dir: Path, base_path: str, merges: dict, state: GlobalState) -> dict:
    """‖(W_glob − W0) − (Σ merges + B A)‖ / ‖Σ merges + B A‖ over every module, from the files."""
    from safetensors import safe_open

    def weights(folder):
        out = {}
        for f in sorted(Path(folder).glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                out.update({k: h.get_tensor(k) for k in h.keys()})
        return out

    expect: dict[str, torch.Tensor] = {}
    for m in list(merges.values()) + [state.adapter]:
        for name, (a, b) in m.items():
            if a is not None and b is not None:
                expect[name] = expect.get(name, 0) + b.double() @ a.double()
    if not expect:
        return {"relative": 0.0, "modules": 0}
    base, glob = weights(base_path), weights(global_model_dir(run_dir))
    num = den = 0.0
    for name, d in expect.items():
        key = name + ".weight"
        got = glob[key].double() - base[key].double()
        num += float(torch.linalg.vector_norm(got - d)) ** 2
        den += float(torch.linalg.vector_norm(d)) ** 2
    return {"relative": (num / den) ** 0.5 if den > 0 else 0.0, "modules": len(expect),
            "global_dtype": str(next(iter(glob.values())).dtype)[6:]}
