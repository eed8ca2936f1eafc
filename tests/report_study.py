"""A small real study for the report tests: schema-2 records written by real tiny runs (`bench ablate`, in one
process) and a real base-model evaluation, plus the record fields the engine is adding next, computed from the
same runs' real outputs until it writes them itself (shapes agreed with the lead, issue #16/#17):

- test.per_client: the global model on each client's own data (the engine will use a held-out split per client;
  here each client's shard, tokenized as held-out examples are);
- method "centralized" (kind "run", the federated setting's fields): one client holding every example, i.e. a real
  `bench run` with one client, recorded under the setting of the federated cells it is a reference for;
- method "local-only": each client's own adapter after its first round (trained on its own data, never
  aggregated) on its own data, as `personalized.per_client`;
- a kind "reference" row of the base model (`bench eval --model`), through bench.record.build_record when
  evaluators still writes schema_version 1.

    python -m tests.report_study /tmp/study      # builds <dir>/results (12 tiny runs, 2 base evaluations)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

METHODS = "fedit,flexlora"          # fedit: factor averaging (noise); flexlora: SVD redistribution (truncation loss)
SEEDS = "0,1"
COMMON = ["--set", "eval_tasks=piqa", "--set", "eval_limit=10", "--set", "local_steps=1"]


def _ablate(root: Path, data_root: Path, *args: str, grid: str = "fp32") -> None:
    """One `bench ablate` grid; each grid has its own folders (the cell names do not say the eval dtype)."""
    from bench.cli import main

    argv = ["ablate", "--preset", "tiny", *args, "--set", f"data_root={data_root}", *COMMON,
            "--results-dir", str(root / "cells" / grid), "--runs-dir", str(root / "runs" / grid)]
    code = main(argv)
    assert code == 0, f"bench {' '.join(argv)} exited {code}"


def _client_examples(cfg, tok):
    from bench import data as data_mod
    from bench.engine import preflight

    plan = preflight(cfg)
    return plan, [[data_mod.tokenize(plan.dataset.train[i], tok, cfg.prompt_template, cfg.cutoff_len, False)
                   for i in shard] for shard in plan.shards]


def _losses(model, examples, tok) -> dict:
    from bench.client import held_out_losses, mean_loss

    sums, tokens = held_out_losses(model, examples, tok.pad_token_id, "cpu")
    return {"loss": mean_loss(sums, tokens), "loss_sums": sums, "tokens": tokens}


def _config(run_dir: Path):
    import dataclasses

    from bench.config import build_config

    # what the run trained on; its evaluation is not redone here
    return dataclasses.replace(build_config(config_file=str(run_dir / "config.yaml")), eval_tasks=[])


def add_per_client(record: dict, clients_of: Path | None = None) -> dict:
    """test.per_client: the run's global model on each client's own examples (the clients of the run in
    `clients_of`, default the record's own run)."""
    from transformers import AutoModelForCausalLM

    from bench.engine import load_tokenizer

    run_dir = Path(record["run_dir"])
    tok = load_tokenizer(str(run_dir / "global_model"))
    _, per_client = _client_examples(_config(clients_of or run_dir), tok)
    model = AutoModelForCausalLM.from_pretrained(run_dir / "global_model")
    record["test"]["per_client"] = [{"client": k, **_losses(model, ex, tok)} for k, ex in enumerate(per_client)]
    return record


def local_only(record: dict) -> dict:
    """A local-only reference record from a run saved with save_client_adapters: client k's own round-1
    adapter (its own data only) on its own examples."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from bench.engine import load_tokenizer
    from bench.record import build_record

    run_dir = Path(record["run_dir"])
    cfg = _config(run_dir)
    tok = load_tokenizer(str(run_dir / "global_model"))
    plan, per_client = _client_examples(cfg, tok)
    rows = []
    for k, ex in enumerate(per_client):
        base = AutoModelForCausalLM.from_pretrained(plan.model_path)
        model = PeftModel.from_pretrained(base, str(run_dir / "clients" / "round_1" / f"client_{k}"))
        rows.append({"client": k, **_losses(model, ex, tok)})
    rounds = [{"round": r, "clients": []} for r in range(1, record["setting"]["rounds"] + 1)]  # nothing exchanged
    return build_record(kind="run", run_id=f"local-only-{record['run_id']}", method="local-only",
                        setting=record["setting"], seed=record["seed"], config=record["config"],
                        config_hash="local-only-" + record["config_hash"], provenance=record["provenance"],
                        dtypes=record["dtypes"], timings=record["timings"], run_dir=record["run_dir"],
                        engine=record["engine"], clients=record["clients"], rounds=rounds, test=None, eval=None,
                        method_info={"personalized": True}) | {
        "personalized": {"per_client": rows, "loss": sum(r["loss"] for r in rows) / len(rows)}}


def centralized(record: dict, setting: dict) -> dict:
    """A centralized reference: a real one-client run, recorded under the federated setting it serves."""
    return dict(record, method="centralized", run_id="centralized-" + record["run_id"], setting=setting,
                method_info={"personalized": False})


def base_reference(root: Path, data_root: Path, seed: int) -> dict:
    """`bench eval --model tiny-random-llama` (real scoring); schema 2 through build_record if evaluators still
    writes schema 1."""
    from bench.cli import main
    from bench.io import RECORD_SCHEMA_VERSION
    from bench.record import build_record, reference_setting

    out = root / "base" / f"s{seed}"
    code = main(["eval", "--model", "tiny-random-llama", "--tasks", "piqa", "--limit", "10", "--seed", str(seed),
                 "--data-root", str(data_root), "--results-dir", str(out / "results"), "--output-dir", str(out / "run")])
    assert code == 0
    (path,) = (out / "results").glob("*.json")
    rec = json.loads(path.read_text())
    if rec["schema_version"] == RECORD_SCHEMA_VERSION:
        return rec
    return build_record(kind="reference", run_id=rec["run_id"], method="base",
                        setting=reference_setting(rec["setting"]["model"]), seed=rec["seed"], config=rec["config"],
                        config_hash=rec["config_hash"], provenance=rec["provenance"],
                        dtypes={"training": None, "master": None, "export": None, "eval": rec["eval"]["dtype"]},
                        timings=rec["timings"], run_dir=rec["run_dir"], eval=rec["eval"])


def build_study(root: Path, data_root: Path) -> Path:
    """<root>/results: fedit and flexlora at ranks 4,4,4 and 4,2,2 (seeds 0, 1; Dirichlet α=1 as the tiny preset),
    fedit at iid (ranks 4,2,2, seed 0); centralized and local-only references for ranks 4,2,2 (seeds 0, 1); the base
    model (seeds 0, 1); fedit at ranks 4,2,2, seed 0, scored in bfloat16. Every run is scored on piqa (10
    documents, the seed's subset)."""
    from bench.io import atomic_write_json

    root.mkdir(parents=True, exist_ok=True)
    _ablate(root, data_root, "--methods", METHODS, "--ranks-grid", "4,4,4;4,2,2", "--seeds", SEEDS,
            "--set", "save_client_adapters=true")
    _ablate(root, data_root, "--methods", "fedit", "--ranks-grid", "4,2,2", "--partitions", "iid", "--seeds", "0")
    _ablate(root, data_root, "--methods", "fedit", "--ranks-grid", "4", "--seeds", SEEDS,
            "--set", "max_examples_per_client=36")
    _ablate(root, data_root, "--methods", "fedit", "--ranks-grid", "4,2,2", "--seeds", "0",
            "--set", "eval_dtype=bfloat16", grid="bf16")
    results = root / "results"
    cells = {p.stem: json.loads(p.read_text()) for p in sorted((root / "cells" / "fp32").glob("*.json"))}
    cells.update({f"{p.stem}-bf16": json.loads(p.read_text()) for p in sorted((root / "cells" / "bf16").glob("*.json"))})
    hetero = {s: cells[f"fedit-r4-2-2-s{s}"]["setting"] for s in (0, 1)}
    for name, rec in cells.items():
        if name.startswith("fedit-r4-s"):
            fed = cells[f"fedit-r4-2-2-s{rec['seed']}"]
            rec = add_per_client(centralized(rec, hetero[rec["seed"]]), Path(fed["run_dir"]))
        else:
            rec = add_per_client(rec)
            if name in ("fedit-r4-2-2-s0", "fedit-r4-2-2-s1"):   # saved with their clients' adapters
                atomic_write_json(results / f"local-only-{name}.json", local_only(rec))
        atomic_write_json(results / f"{name}.json", rec)
    for seed in (0, 1):
        rec = base_reference(root, data_root, seed)
        atomic_write_json(results / f"{rec['run_id']}.json", rec)
    return results


if __name__ == "__main__":
    import os

    sys.exit(print(build_study(Path(sys.argv[1]), Path(os.environ.get("BENCH_DATA_ROOT", "../shared/data")))))
