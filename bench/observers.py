"""Observers of a run: each gets the events of the rounds and owns one output. The engine calls them in
order (through Observers); none of them changes what the server or the clients compute.

Events: client_done (a reply arrived), aggregated, round_done, point(name) (a named point of the run: the loop,
bench/checkpoint.py, bench/export.py and the evaluators' request cache announce them; bench/hooks.py lists them) and signal(name) (SIGINT or
SIGTERM arrived). Observers that are not the engine's own (test hooks) subscribe a factory: each run asks it
for an observer (subscribe, run_observers).

- MetricsLog:  metrics.jsonl, one line per round (rewritten atomically, so a reader never sees half a line)
- Progress:    the human-readable log lines
- AuditTrail:  with save_client_adapters, every client's upload (a PEFT folder), what it received (its task
               and starting factors, the merges) and, for an excluded update, why
- RoundStates: with keep_round_states, the server's state after every round (the checkpoint keeps only the last)
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .io import atomic_write_json, atomic_write_text
from .messages import Reply, TaskMessage


def rss_mb() -> float | None:
    """Resident set size of this process now (not the peak), in MiB."""
    try:
        with open("/proc/self/statm") as f:
            return round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20, 1)
    except (OSError, ValueError, AttributeError):
        return None


class Observer:
    def client_done(self, msg: TaskMessage, reply: Reply) -> None: ...

    def aggregated(self, result) -> None:
        """Right after the server aggregated (before the round is written, and even if nothing was left)."""

    def round_done(self, result, row: dict) -> None: ...

    def point(self, name: str) -> None:
        """A named point of the run was reached (bench/hooks.py lists them)."""

    def signal(self, name: str) -> None:
        """SIGINT or SIGTERM arrived (the engine stops at its next safe point)."""


class Observers(Observer):
    """A run's observers, called in order for every event."""

    def __init__(self, observers: list[Observer]):
        self.observers = list(observers)

    def client_done(self, msg, reply):
        for o in self.observers:
            o.client_done(msg, reply)

    def aggregated(self, result):
        for o in self.observers:
            o.aggregated(result)

    def round_done(self, result, row):
        for o in self.observers:
            o.round_done(result, row)

    def point(self, name):
        for o in self.observers:
            o.point(name)

    def signal(self, name):
        for o in self.observers:
            o.signal(name)


_FACTORIES: list = []  # callables () -> Observer | None, asked once per run


def subscribe(factory) -> "callable":
    """Every run from now on gets the observer factory() returns (None: none this run), ahead of the engine's
    own; returns the function that unsubscribes it."""
    _FACTORIES.append(factory)
    return lambda: _FACTORIES.remove(factory)


def run_observers() -> list[Observer]:
    return [o for o in (f() for f in list(_FACTORIES)) if o is not None]


class MetricsLog(Observer):
    def __init__(self, run_dir: Path, rounds: list[dict]):
        self.path, self.rounds = run_dir / "metrics.jsonl", rounds
        self._write()

    def _write(self) -> None:
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.rounds))

    def round_done(self, result, row):
        self.rounds.append(row)
        self._write()


class Progress(Observer):
    def __init__(self, log, total_rounds: int):
        self.log, self.total = log, total_rounds

    def client_done(self, msg, reply):
        if reply.error:
            self.log(f"[bench]   round {msg.round} client {msg.client_id}: no update ({reply.error})")
            return
        m = reply.metrics
        self.log(f"[bench]   round {msg.round} client {msg.client_id}: loss {m['first_loss']:.3f} → {m['last_loss']:.3f} "
                 f"({m['steps']} steps, {m['seconds']:.1f} s)")

    def aggregated(self, result):
        for e in result.excluded:
            self.log(f"[bench]   round {result.round} client {e['id']}: EXCLUDED ({e['reason']})")

    def round_done(self, result, row):
        noise = row.get("noise")
        self.log(f"[bench] round {row['round']}/{self.total} done in {row['seconds']:.1f} s"
                 + (f", aggregation noise {noise:.4f}" if noise else ""))


class AuditTrail(Observer):
    """clients/round_<r>/client_<k>/: the client's adapter as it ended the round as a PEFT folder (adapter_config.json
    + adapter_model.safetensors: both factors, at the rank it sent, with the lora_alpha that makes peft's scaling the
    one it trained with, so that PeftModel.from_pretrained gives the model it trained, a pruned one included),
    sent.safetensors (up/-/<module>/<A|B>: exactly what the server received; a factor the task keeps or freezes is in
    the PEFT folder only), received.safetensors (init/<module>/<A|B>: the starting factors as sent, un-scaled;
    core/-/<module>/A: a core task's starting core; merge/<round>/<module>/<A|B>: the base merges sent) and task.json
    (rank, scaling, p, seeds, what trains / is kept / is sent, the method's info, and `excluded` with its reason).
    A method with several exchanges a round (exchanges_per_round E > 1) gets one folder per exchange:
    clients/round_<r>/exchange_<e>/client_<k>/, for the server's exchange (r − 1)·E + e (the task's round)."""

    def __init__(self, run_dir: Path, cfg, base_model: str, exchanges_per_round: int = 1):
        self.root, self.cfg, self.base_model = run_dir / "clients", cfg, base_model
        self.per_round = exchanges_per_round

    def folder(self, rnd: int, k: int, exchange: int | None = None) -> Path:
        """rnd: the engine's round; exchange: its exchange (1…E), None with one exchange a round."""
        return self.root / f"round_{rnd}" / (f"exchange_{exchange}" if exchange else "") / f"client_{k}"

    def task_folder(self, msg) -> Path:
        """The folder of a task: its round counts the server's exchanges."""
        if self.per_round == 1:
            return self.folder(msg.round, msg.client_id)
        rnd, e = divmod(msg.round - 1, self.per_round)
        return self.folder(rnd + 1, msg.client_id, e + 1)

    def client_done(self, msg, reply):
        from safetensors.torch import save_file

        from .export import save_peft_adapter
        from .messages import pack_reply, pack_task

        out = self.task_folder(msg)
        cfg = self.cfg
        if not reply.error and reply.factors:
            adapter = reply.trained or reply.factors
            # peft's scaling is lora_alpha / r (/ √r with rsLoRA) at the rank saved; the client trained at msg.scaling
            # (its rank before any pruning), so the alpha saved is the one that gives that scaling at this rank
            alpha = msg.scaling * (reply.rank ** 0.5 if cfg.use_rslora else reply.rank)
            save_peft_adapter(adapter, reply.rank, alpha, cfg.use_rslora, cfg.target_modules, self.base_model, out)
            sent, _ = pack_reply(reply)
            save_file({k: v for k, v in sent.items() if k.startswith("up/")}, str(out / "sent.safetensors"))
        out.mkdir(parents=True, exist_ok=True)
        arrays, config = pack_task(msg)
        save_file({k: v.contiguous() for k, v in arrays.items()}, str(out / "received.safetensors"))
        atomic_write_json(out / "task.json", {**config, "task": json.loads(config["task"]),
                                              "rank_sent": reply.rank, "error": reply.error})

    def round_done(self, result, row):
        for c in row["clients"]:
            path = self.folder(row["round"], c["id"], c.get("exchange")) / "task.json"
            if path.is_file():
                rec = json.loads(path.read_text())
                rec.update({k: c[k] for k in ("p", "excluded") if k in c})
                atomic_write_json(path, rec)


class RoundStates(Observer):
    """rounds/round_<r>/: server.safetensors + meta.json, as a checkpoint holds them (bench.checkpoint.read_state)."""

    def __init__(self, run_dir: Path, server):
        self.root, self.server = run_dir / "rounds", server

    def round_done(self, result, row):
        import shutil

        from .checkpoint import write_state
        from .io import atomic_replace_dir

        final = self.root / f"round_{row['round']}"
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        write_state(tmp, self.server.s, {"round_row": {k: row[k] for k in ("round", "sampled")}})
        atomic_replace_dir(tmp, final)
