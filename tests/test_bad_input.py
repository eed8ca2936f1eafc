"""Every refused input, through the real CLI (`bench.cli.main(["run", ...])`): exit code 2, one
`error: <field or file>: ... <fix>` line on stderr, and nothing written (the folder the test works in
is byte-for-byte unchanged: no run dir, no results dir). The table in docs/reliability.md lists the
same cases with their messages."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml

from bench.cli import main

DATA = Path(os.environ.get("BENCH_DATA_ROOT") or Path(__file__).resolve().parents[2] / "shared" / "data")

# a tiny experiment read from a small local file (fast to load); each case changes one thing
BASE = dict(method="flora", model="tiny-random-llama", dataset="{good}", partition="iid", num_clients=3, rounds=1,
            local_steps=1, batch_size=1, micro_batch_size=1, cutoff_len=32, lora_alpha=8, lora_dropout=0.0, rank=2,
            test_limit=2, eval_tasks=[], max_examples_per_client=6)


@pytest.fixture(autouse=True)
def _env(offline_data_env):
    """Every case runs against the real data root with the hub off."""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Input files shared by the cases (outside every case's working folder)."""
    d = tmp_path_factory.mktemp("inputs")
    rows = json.loads((DATA / "dolly_fedit_10clients" / "local_training_0.json").read_text())[:40]
    good = [{"instruction": r["instruction"], "input": r["context"], "output": r["response"], "label": r["category"]} for r in rows]
    (d / "good.jsonl").write_text("".join(json.dumps(r) + "\n" for r in good))
    (d / "four.json").write_text(json.dumps(good[:4]))
    (d / "empty.json").write_text("  \n")
    (d / "wrong_fields.json").write_text(json.dumps([{"question": "q", "answer": "a"}] * 5))
    (d / "bad_array.json").write_text('[\n{"instruction": "a", "output": "b"},\n{"instruction": "c" "output": "d"}\n]\n')
    (d / "bad_lines.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output":\n')
    (d / "not_objects.json").write_text('[["a", "b"], ["c", "d"]]')
    (d / "empty_output.json").write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c", "output": " "}]))
    (d / "no_label.json").write_text(json.dumps([{"instruction": f"i{n}", "output": f"o{n}"} for n in range(20)]))
    (d / "bad.yaml").write_text("rounds: 2\nlr: [0.1\nseed: 1\n")
    (d / "list.yaml").write_text("- rounds: 2\n")
    (d / "empty_dir").mkdir()
    (d / "no_config_model").mkdir()
    (d / "no_config_model" / "model.safetensors").write_bytes(b"")
    bert = d / "bert_model"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert", "hidden_size": 32}))
    broken = d / "broken_config_model"
    broken.mkdir()
    (broken / "config.json").write_text("{\"architectures\": [\"LlamaForCausalLM\"],\n oops")
    from bench.models import resolve_model

    tiny = Path(resolve_model("tiny-random-llama")[0])
    no_weights = d / "no_weights_model"
    no_weights.mkdir()
    for f in tiny.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, no_weights / f.name)
    no_tok = d / "no_tokenizer_model"
    no_tok.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny / name, no_tok / name)
    _write_gguf(d / "foreign.gguf", arch="fooformer")
    return d


def _write_gguf(path: Path, arch: str) -> None:
    import numpy as np
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), arch=arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.is_dir(), None if p.is_dir() else (p.stat().st_size, p.stat().st_mtime_ns))
            for p in sorted(root.rglob("*"))}


def refuse(tmp: Path, capsys, monkeypatch, *, cfg: dict | None = None, args: list[str] = (), use_config: bool = True,
           outputs: bool = True) -> str:
    """Run the CLI in an empty working folder; assert exit 2, one error line, nothing written; return the message."""
    work = tmp / "work"
    work.mkdir(exist_ok=True)
    argv = ["run"]
    if use_config:
        conf = {**BASE, **(cfg or {})}
        conf = {k: (None if v == "__null__" else v) for k, v in conf.items() if v is not None}  # None drops a key
        cfg_path = tmp / "config.yaml"
        cfg_path.write_text(yaml.safe_dump(conf))
        argv += ["--config", str(cfg_path)]
    if outputs:
        argv += ["--output-dir", str(work / "out"), "--results-dir", str(work / "results")]
    argv += [str(a) for a in args]
    monkeypatch.chdir(work)  # a default runs/ or results/ would land here
    before = _snapshot(tmp)
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    errors = [l for l in err.splitlines() if l.startswith("error:")]
    assert rc == 2, err[-2000:]
    assert len(errors) == 1, err[-2000:]
    msg = errors[0][len("error: "):]
    assert re.match(r"^[a-z_\-]+: \S", msg), msg  # names the field (or what) first
    assert _snapshot(tmp) == before, "something was written"
    if os.environ.get("BENCH_DUMP_MESSAGES"):  # regenerates the table in docs/reliability.md
        with open(os.environ["BENCH_DUMP_MESSAGES"], "a") as f:
            f.write(json.dumps({"test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0], "argv": argv[1:],
                                "msg": errors[0], "tmp": str(tmp)}) + "\n")
    assert not (work / "out").exists() and not (work / "results").exists() and not (work / "runs").exists()
    return msg


def _good(inputs: Path) -> str:
    return str(inputs / "good.jsonl")


# (id, config changes, extra CLI args, expected fragment); "{in}" is the inputs folder
CASES = [
    # ---- config fields: unknown keys, types, ranges
    ("unknown-key", {"num_client": 3}, [], "num_client: unknown config key in config {cfg}; did you mean 'num_clients'?"),
    ("unknown-key-typo", {"lora_alpah": 8}, [], "lora_alpah: unknown config key in config {cfg}; did you mean 'lora_alpha'?"),
    ("type-int", {"rounds": "three"}, [], "rounds: expected int, got 'three'"),
    ("type-int-float", {"rounds": 2.5}, [], "rounds: expected int, got 2.5"),
    ("type-float-flag", {}, ["--lr", "fast"], "lr: expected float, got 'fast'"),
    ("type-list-int", {"ranks": [2, "x", 2], "rank_distribution": "explicit"}, [], "ranks: expected list[int]"),
    ("type-bool", {"train_on_inputs": "maybe"}, [], "train_on_inputs: expected bool, got 'maybe'"),
    ("type-dict", {}, ["--field-map", "instruction"], "field_map: expected dict[str, str]"),
    ("empty-value", {"lr": "__null__"}, [], "lr: must not be empty; give a value or drop the key"),
    ("rounds-0", {"rounds": 0}, [], "rounds: must be ≥ 1, got 0"),
    ("client-fraction", {"client_fraction": 1.5}, [], "client_fraction: must be in (0, 1], got 1.5"),
    ("client-fraction-0", {"client_fraction": 0}, [], "client_fraction: must be in (0, 1], got 0.0"),
    ("lr-negative", {"lr": -0.001}, [], "lr: must be > 0, got -0.001"),
    ("micro-batch", {"batch_size": 4, "micro_batch_size": 3}, [], "micro_batch_size: must divide batch_size (4), got 3"),
    ("lora-dropout", {"lora_dropout": 1.0}, [], "lora_dropout: must be in [0, 1), got 1.0"),
    ("cutoff-len", {"cutoff_len": 4}, [], "cutoff_len: must be ≥ 8 tokens, got 4"),
    ("local-steps-0", {"local_steps": 0}, [], "local_steps: must be ≥ 1, got 0"),
    ("num-clients-0", {"num_clients": 0}, [], "num_clients: must be ≥ 1, got 0"),
    ("max-update-norm", {"max_update_norm": 0}, [], "max_update_norm: must be > 0, got 0.0"),
    ("dtype", {"dtype": "float8"}, [], "dtype: unknown 'float8'; choose one of auto, float32, bfloat16, float16"),
    ("eval-dtype", {"eval_dtype": "fp8"}, [], "eval_dtype: unknown 'fp8'; choose one of auto, float32, bfloat16, float16"),
    ("seed", {"seed": -1}, [], "seed: must be ≥ 0, got -1"),
    ("test-fraction", {"test_fraction": 1}, [], "test_fraction: must be in (0, 1), got 1.0"),
    ("method", {"method": "flor"}, [], "method: unknown method 'flor'; did you mean 'flora'?"),
    ("partition-name", {"partition": "dirichlett"}, [], "partition: unknown partition 'dirichlett'; did you mean 'dirichlet'?"),
    ("rank-distribution", {"rank_distribution": "heavy-tail"}, [], "rank_distribution: unknown 'heavy-tail'; did you mean"),
    ("explicit-without-ranks", {"rank_distribution": "explicit"}, [], "ranks: rank_distribution 'explicit' needs a ranks list"),
    ("ranks-and-distribution", {"ranks": [4, 2, 2], "rank_distribution": "uniform"}, [],
     "gives both a rank list and rank_distribution 'uniform'; keep one"),
    # ---- ranks vs clients and module shapes
    ("ranks-count", {"ranks": [4, 2], "rank_distribution": "explicit"}, [], "ranks: 2 ranks given for 3 clients"),
    ("ranks-zero", {"ranks": [4, 0, 2], "rank_distribution": "explicit"}, [], "ranks: every rank must be ≥ 1"),
    ("rank-vs-module", {"ranks": [64, 2, 2], "rank_distribution": "explicit"}, [],
     "ranks: rank 64 exceeds the smaller dimension (32) of target module"),
    ("target-module", {"target_modules": ["q_projj"]}, [], "target_modules: 'q_projj' is not a Linear module of this model; did you mean 'q_proj'?"),
    # ---- partition parameters and client counts vs data
    ("alpha-0", {"partition": "dirichlet", "dirichlet_alpha": 0}, [], "dirichlet_alpha: must be > 0, got 0.0"),
    ("alpha-negative", {"partition": "dirichlet", "dirichlet_alpha": -0.5}, [], "dirichlet_alpha: must be > 0, got -0.5"),
    ("shards-vs-labels", {"partition": "shards", "shards_per_client": 99}, [],
     "shards_per_client: 99 label shards per client but the data has only"),
    ("clients-vs-data-iid", {"dataset": "{in}/four.json", "num_clients": 5, "max_examples_per_client": None}, [],
     "num_clients: client 3 has 0 examples after partitioning (iid)"),
    ("clients-vs-data-dirichlet", {"dataset": "dolly", "partition": "dirichlet", "num_clients": 20000}, [],
     "examples cannot give 20000 clients at least 1 each"),
    ("predefined-count", {"dataset": "dolly", "partition": "predefined", "num_clients": 3}, [],
     "num_clients: the predefined split of dolly has 10 clients, got num_clients=3; set num_clients=10"),
    ("predefined-missing", {"partition": "predefined"}, [], "partition: dataset "),
    ("no-labels", {"dataset": "{in}/no_label.json", "partition": "dirichlet"}, [], "label_field: partition 'dirichlet' needs a label per record"),
    # ---- data files
    ("data-missing", {"dataset": "{in}/nope.json"}, [], "dataset: data file {in}/nope.json does not exist"),
    ("data-empty", {"dataset": "{in}/empty.json"}, [], "dataset: data file {in}/empty.json is empty"),
    ("data-wrong-fields", {"dataset": "{in}/wrong_fields.json"}, [], "field_map: {in}/wrong_fields.json record 1 has no field 'instruction' (for instruction)"),
    ("data-bad-json", {"dataset": "{in}/bad_array.json"}, [], "dataset: {in}/bad_array.json is not valid JSON at line 3"),
    ("data-bad-jsonl", {"dataset": "{in}/bad_lines.jsonl"}, [], "dataset: {in}/bad_lines.jsonl line 2 is not valid JSON"),
    ("data-not-objects", {"dataset": "{in}/not_objects.json"}, [], "record 1 is a list, not an object"),
    ("data-empty-output", {"dataset": "{in}/empty_output.json"}, [], "record 2 has an empty instruction or output"),
    ("dataset-name", {"dataset": "dolyl"}, [], "dataset: unknown dataset 'dolyl'; did you mean 'dolly'?"),
    ("dataset-needs-root", {"dataset": "boolq", "data_root": "{in}/empty_dir"}, [], "dataset: boolq needs the data root"),
    # ---- model paths
    ("model-missing", {"model": "{in}/no/such/model"}, [], "model: {in}/no/such/model is neither an existing path nor a hub id"),
    ("model-no-config", {"model": "{in}/no_config_model"}, [], "is not a Hugging Face model folder (no config.json)"),
    ("model-not-causal", {"model": "{in}/bert_model"}, [], "model: {in}/bert_model is a BertModel, not a causal LM"),
    ("model-bad-config", {"model": "{in}/broken_config_model"}, [], "config.json is not valid JSON"),
    ("model-no-weights", {"model": "{in}/no_weights_model"}, [], "has no weights (*.safetensors or *.bin)"),
    ("model-no-tokenizer", {"model": "{in}/no_tokenizer_model"}, [], "has no tokenizer"),
    ("gguf-missing", {"model": "{in}/nope.gguf"}, [], "model: GGUF file {in}/nope.gguf does not exist"),
    ("gguf-foreign-arch", {"model": "{in}/foreign.gguf"}, [], "model: cannot read GGUF {in}/foreign.gguf"),
    # ---- eval tasks
    ("eval-unknown-task", {"eval_tasks": ["foo"]}, [], "tasks: unknown task 'foo'"),
    ("eval-missing-data", {"eval_tasks": ["gsm8k"], "data_root": "{in}/no_such_root"}, [], "data-root: {in}/no_such_root is not a folder"),
]


def _fill(value, inputs: Path, good: str):
    if isinstance(value, str):
        return value.replace("{in}", str(inputs)).replace("{good}", good)
    if isinstance(value, list):
        return [_fill(v, inputs, good) for v in value]
    return value


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_refused_before_work(case, inputs, tmp_path, capsys, monkeypatch):
    name, changes, args, expected = case
    if name.startswith("eval-"):
        try:
            from evaluators import validate_tasks  # noqa: F401
        except ImportError:
            pytest.xfail("evaluators.validate_tasks is not importable yet")
    good = _good(inputs)
    cfg = {**BASE, **{k: _fill(v, inputs, good) for k, v in changes.items()}}
    cfg = {k: _fill(v, inputs, good) for k, v in cfg.items()}
    msg = refuse(tmp_path, capsys, monkeypatch, cfg=cfg, args=[_fill(a, inputs, good) for a in args])
    assert _fill(expected, inputs, good).replace("{cfg}", str(tmp_path / "config.yaml")) in msg


def test_base_config_is_accepted(inputs, tmp_path, monkeypatch):
    """The cases above are refused because of their one change: the base passes preflight."""
    from bench.config import build_config
    from bench.engine import preflight

    p = tmp_path / "config.yaml"
    p.write_text(yaml.safe_dump({**BASE, "dataset": _good(inputs)}))
    preflight(build_config(config_file=str(p)))


def test_a_later_layer_decides_how_ranks_are_chosen():
    """--rank-distribution over a preset's rank list draws the ranks (it used to be ignored silently); --ranks
    over a preset's distribution is explicit."""
    from bench.config import build_config

    homo = build_config(preset="study", overrides={"rank_distribution": "homo"})
    assert homo.ranks is None and homo.client_ranks() == [8, 8, 8, 8]
    drawn = build_config(preset="study", overrides={"rank_distribution": "heavy-tail-light", "num_clients": 6})
    assert len(drawn.client_ranks()) == 6 and set(drawn.client_ranks()) <= {4, 8, 16}
    listed = build_config(preset="study", overrides={"ranks": [8, 8, 8, 8]})
    assert listed.rank_distribution == "explicit" and listed.client_ranks() == [8, 8, 8, 8]
    assert build_config(preset="study").client_ranks() == [16, 8, 4, 4]


# ---- cases that need more than a config ----------------------------------------------------------

def test_unknown_preset_did_you_mean(tmp_path, capsys, monkeypatch):
    msg = refuse(tmp_path, capsys, monkeypatch, use_config=False, args=["--preset", "tinyy"])
    assert msg.startswith("preset: unknown preset 'tinyy'; did you mean 'tiny'?")


def test_config_file_missing(tmp_path, capsys, monkeypatch):
    msg = refuse(tmp_path, capsys, monkeypatch, use_config=False, args=["--config", str(tmp_path / "nope.yaml")])
    assert msg == f"config: file {tmp_path / 'nope.yaml'} does not exist; pass an existing YAML file"


def test_config_file_invalid_yaml(inputs, tmp_path, capsys, monkeypatch):
    msg = refuse(tmp_path, capsys, monkeypatch, use_config=False, args=["--config", str(inputs / "bad.yaml")])
    assert msg == f"config: {inputs / 'bad.yaml'} is not valid YAML at line 3; fix the syntax"


def test_config_file_not_a_mapping(inputs, tmp_path, capsys, monkeypatch):
    msg = refuse(tmp_path, capsys, monkeypatch, use_config=False, args=["--config", str(inputs / "list.yaml")])
    assert msg == f"config: {inputs / 'list.yaml'} must hold a mapping of config keys, not a list"


def test_cuda_without_gpu(inputs, tmp_path, capsys, monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    msg = refuse(tmp_path, capsys, monkeypatch, cfg={"dataset": _good(inputs), "device": "cuda"})
    assert msg.startswith("device: cuda requested but no CUDA GPU is available; use --device cpu")


def test_output_dir_is_a_file(inputs, tmp_path, capsys, monkeypatch):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "afile").write_text("x")
    msg = refuse(tmp_path, capsys, monkeypatch, cfg={"dataset": _good(inputs)}, outputs=False,
                 args=["--output-dir", str(tmp_path / "work" / "afile"), "--results-dir", str(tmp_path / "work" / "results")])
    assert msg.startswith(f"output_dir: {tmp_path / 'work' / 'afile'} exists and is not a folder")


def test_results_dir_under_a_file(inputs, tmp_path, capsys, monkeypatch):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "afile").write_text("x")
    msg = refuse(tmp_path, capsys, monkeypatch, cfg={"dataset": _good(inputs)}, outputs=False,
                 args=["--output-dir", str(tmp_path / "work" / "out"), "--results-dir", str(tmp_path / "work" / "afile" / "results")])
    assert msg.startswith(f"results_dir: {tmp_path / 'work' / 'afile'} (a parent of")


# ---- resume: a real checkpoint, then corrupted / foreign / changed copies ------------------------

@pytest.fixture(scope="module")
def finished_run(inputs, tmp_path_factory):
    """One real 1-round run of the tiny model (in-process), with its own copy of the data file."""
    from bench.config import build_config
    from bench.engine import run_federated

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    d = tmp_path_factory.mktemp("finished")
    data = d / "data.jsonl"
    shutil.copy(inputs / "good.jsonl", data)
    runs = {}
    for method in ("flora", "fedavg-lora"):
        p = d / f"{method}.yaml"
        p.write_text(yaml.safe_dump({**BASE, "method": method, "dataset": str(data), "data_root": str(DATA)}))
        cfg = build_config(config_file=str(p), overrides={"output_dir": str(d / method), "results_dir": str(d / "results")})
        run_federated(cfg, log=lambda *a: None)
        runs[method] = d / method
    return runs, data


def _copy_run(src: Path, tmp: Path) -> Path:
    dst = tmp / "work" / "run"
    shutil.copytree(src, dst)
    return dst


def test_resume_missing_run_dir(tmp_path, capsys, monkeypatch):
    msg = refuse(tmp_path, capsys, monkeypatch, use_config=False, outputs=False, args=["--resume", str(tmp_path / "work" / "nope")])
    assert msg == f"resume: {tmp_path / 'work' / 'nope' / 'config.yaml'} not found; pass the run directory that `bench run` created"


def test_resume_corrupt_checkpoint(finished_run, tmp_path, capsys, monkeypatch):
    run = _copy_run(finished_run[0]["flora"], tmp_path)
    state = run / "checkpoint" / "server.safetensors"
    blob = bytearray(state.read_bytes())
    blob[-10] ^= 0xFF
    state.write_bytes(bytes(blob))
    msg = refuse(tmp_path, capsys, monkeypatch, use_config=False, outputs=False, args=["--resume", str(run)])
    assert msg == f"resume: {state} is missing or corrupt (checksum mismatch); delete {run / 'checkpoint'} and start again"


def test_resume_checkpoint_meta_not_json(finished_run, tmp_path, capsys, monkeypatch):
    run = _copy_run(finished_run[0]["flora"], tmp_path)
    (run / "checkpoint" / "meta.json").write_text('{"round": 1, ')
    msg = refuse(tmp_path, capsys, monkeypatch, use_config=False, outputs=False, args=["--resume", str(run)])
    assert msg.startswith(f"resume: {run / 'checkpoint' / 'meta.json'} is corrupt (not JSON)")


def test_resume_not_our_checkpoint(finished_run, tmp_path, capsys, monkeypatch):
    run = _copy_run(finished_run[0]["flora"], tmp_path)
    (run / "checkpoint" / "meta.json").write_text(json.dumps({"epoch": 3, "global_step": 100}))
    msg = refuse(tmp_path, capsys, monkeypatch, use_config=False, outputs=False, args=["--resume", str(run)])
    assert msg.startswith(f"resume: {run / 'checkpoint' / 'meta.json'} is not a fedlora-bench v2 checkpoint")


def test_resume_foreign_checkpoint(finished_run, tmp_path, capsys, monkeypatch):
    """The checkpoint of another run (fedavg-lora) inside a flora run folder."""
    run = _copy_run(finished_run[0]["flora"], tmp_path)
    shutil.rmtree(run / "checkpoint")
    shutil.copytree(finished_run[0]["fedavg-lora"] / "checkpoint", run / "checkpoint")
    msg = refuse(tmp_path, capsys, monkeypatch, use_config=False, outputs=False, args=["--resume", str(run)])
    assert msg.startswith(f"resume: the checkpoint in {run / 'checkpoint'} belongs to another run (method or config differs)")


def test_resume_checkpoint_tensors_garbage(finished_run, tmp_path, capsys, monkeypatch):
    from bench.models import file_sha256

    run = _copy_run(finished_run[0]["flora"], tmp_path)
    state = run / "checkpoint" / "server.safetensors"
    state.write_bytes(b"\x00" * 64)
    meta = json.loads((run / "checkpoint" / "meta.json").read_text())
    meta["sha256"]["server.safetensors"] = file_sha256(state)
    (run / "checkpoint" / "meta.json").write_text(json.dumps(meta))
    msg = refuse(tmp_path, capsys, monkeypatch, use_config=False, outputs=False, args=["--resume", str(run)])
    assert msg.startswith(f"resume: {state} does not hold fedlora-bench checkpoint tensors")


def test_resume_after_data_changed(finished_run, tmp_path, capsys, monkeypatch):
    runs, data = finished_run
    run = _copy_run(runs["flora"], tmp_path)
    original = data.read_bytes()
    try:
        rows = [json.loads(l) for l in original.decode().splitlines()]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows[::-1]))  # same records, other order
        msg = refuse(tmp_path, capsys, monkeypatch, use_config=False, outputs=False, args=["--resume", str(run)])
    finally:
        data.write_bytes(original)
    assert msg.startswith(f"resume: the client partition or ranks differ from those of the checkpoint in {run}")


def test_output_dir_holds_a_run(finished_run, inputs, tmp_path, capsys, monkeypatch):
    run = _copy_run(finished_run[0]["flora"], tmp_path)
    msg = refuse(tmp_path, capsys, monkeypatch, cfg={"dataset": _good(inputs)}, outputs=False,
                 args=["--output-dir", str(run), "--results-dir", str(tmp_path / "work" / "results")])
    assert msg == f"output_dir: {run} already holds a run; use --resume {run} or another --output-dir"


# ---- results records from a newer schema -----------------------------------------------------------

def test_newer_schema_record_refused_and_skipped_by_report(tmp_path, capsys):
    from bench import BenchError
    from bench.io import RECORD_SCHEMA_VERSION, read_record

    results = tmp_path / "results"
    results.mkdir()
    rec = results / "future.json"
    rec.write_text(json.dumps({"schema_version": RECORD_SCHEMA_VERSION + 1, "kind": "run"}))
    with pytest.raises(BenchError) as exc:
        read_record(rec)
    assert str(exc.value) == (f"record: {rec} has schema_version {RECORD_SCHEMA_VERSION + 1}, newer than this "
                              f"fedlora-bench reads ({RECORD_SCHEMA_VERSION}); upgrade fedlora-bench")
    try:
        import reports  # noqa: F401  (another engineer's package)
    except ImportError as e:
        pytest.skip(f"reports not importable: {e}")
    capsys.readouterr()
    rc = main(["report", "--results", str(results), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert any(l.startswith(f"skipped {rec}") and str(RECORD_SCHEMA_VERSION + 1) in l for l in err.splitlines()), err
