"""The task and backend registries: a task of an existing format is one YAML, a backend is one registered class.

A throwaway task (a YAML outside the package, ARC's LLM-Adapters format, 6 documents of the real ARC-Easy file)
and a throwaway backend (hf with batch size 1) are registered here and scored with a real tiny model through
`evaluate` and `bench eval`; the built-in registry's view of every YAML is checked against the YAMLs; loading every
offline task through lm-eval emits none of its "aggregation / higher_is_better is not" warnings.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import pytest

from bench import BenchError
from conftest import require_data_root
from evaluators import core, evaluate, expand_tasks, runner
from evaluators.backends import BACKENDS, get_backend, register_backend
from evaluators.backends.hf import HFBackend
from evaluators.tasknames import KNOWN_TASKS, TASK_GROUPS, TASKS, register_task, unregister_task

TINY_TASK = """\
# A throwaway task: ARC's offline format, its own files.
task: fedlora_tiny_arc
custom_dataset: !function evaluators.tasks.loaders.load_commonsense
dataset_kwargs: {format: arc, data_root: null}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_target: "{{choices.label.index(answerKey)}}"
doc_to_choice: "{{choices.text}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
  fedlora:
    files: {test: tiny/arc_test.json}
    chance: 0.25
    aliases: [tiny]
"""


@pytest.fixture
def tiny_task(tmp_path):
    root = require_data_root()
    data = tmp_path / "data"
    (data / "tiny").mkdir(parents=True)
    records = json.loads((root / TASKS["arc_easy"].files["test"]).read_text())[:6]
    (data / "tiny" / "arc_test.json").write_text(json.dumps(records))
    yaml = tmp_path / "tiny_arc.yaml"
    yaml.write_text(TINY_TASK)
    spec = register_task(yaml)
    yield spec, str(data)
    unregister_task("tiny_arc")


@pytest.fixture
def batch1_backend():
    @register_backend("hf_batch1")
    class Batch1(HFBackend):
        """hf, one request at a time: the same numbers as hf, from another registered name."""
        made = 0

        def make_lm(self, plan, adapter=None):
            type(self).made += 1
            return super().make_lm(dict(plan, batch_size=1), adapter)

    yield BACKENDS["hf_batch1"]
    del BACKENDS["hf_batch1"]


def _floats(x) -> list[float]:
    if isinstance(x, (list, tuple)):
        return [f for v in x for f in _floats(v)]
    return [float(x)] if isinstance(x, float) else []


def _cli(argv: list[str]) -> int:
    from evaluators import cli

    p = argparse.ArgumentParser(prog="bench eval")
    cli.add_arguments(p)
    return cli.main(p.parse_args(argv))


def test_a_registered_task_and_backend_run_end_to_end(tiny_task, batch1_backend, tmp_path, capsys):
    from bench.models import resolve_model

    spec, data_root = tiny_task
    assert expand_tasks("tiny") == ["tiny_arc"] and "tiny_arc" in KNOWN_TASKS
    assert spec.primary_metric == "acc" and spec.chance == 0.25 and spec.files == {"test": "tiny/arc_test.json"}
    model = resolve_model("tiny-random-llama")[0]
    ours = evaluate(model, "tiny_arc", backend="hf_batch1", data_root=data_root, out_dir=str(tmp_path / "a"))
    ref = evaluate(model, "tiny_arc", backend="hf", data_root=data_root, out_dir=str(tmp_path / "b"))
    assert batch1_backend.made == 1 and ours["backend"] == "hf_batch1"
    t, r = ours["tasks"]["tiny_arc"], ref["tasks"]["tiny_arc"]
    assert t["n"] == 6 and t["metric"] == "acc" and t["source"]["path"].endswith("tiny/arc_test.json")
    lls = [_floats([json.loads(line)["resps"] for line in Path(x["samples"]).read_text().splitlines()])
           for x in (t, r)]
    assert len(lls[0]) >= 24 and lls[0] == pytest.approx(lls[1], abs=1e-4) and t["value"] == r["value"]
    # the CLI offers the new backend and task, and scores them
    from evaluators import cli

    p = argparse.ArgumentParser(prog="bench eval")
    cli.add_arguments(p)
    help_text = p.format_help()
    assert "hf_batch1" in help_text and "tiny_arc" in help_text
    assert _cli(["--model", model, "--tasks", "tiny", "--backend", "hf_batch1", "--data-root", data_root,
                 "--results-dir", str(tmp_path / "results"), "--output-dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "tiny_arc" in out and "acc" in out
    record = json.loads(next((tmp_path / "results").glob("*.json")).read_text())
    assert record["eval"]["backend"] == "hf_batch1" and record["eval"]["tasks"]["tiny_arc"]["n"] == 6


def test_registering_twice_or_unknown_names_are_refused(tiny_task):
    spec, _ = tiny_task
    with pytest.raises(ValueError, match="registered twice"):
        register_task(spec.yaml)
    with pytest.raises(ValueError, match="registered twice"):
        register_backend("hf")(type("Again", (HFBackend,), {}))
    with pytest.raises(BenchError, match="unknown backend 'tpu'; use hf"):
        get_backend("tpu")


def test_the_registry_is_what_the_yamls_say():
    """Every YAML in evaluators/tasks/ is a task; the suite's names, groups and metrics come from them."""
    yamls = sorted(p.stem for p in (Path(core.__file__).parent / "tasks").glob("[!_]*.yaml"))
    assert sorted(TASKS) == yamls
    assert TASK_GROUPS["commonsense"] == ["boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_easy",
                                         "arc_challenge", "openbookqa"]
    assert KNOWN_TASKS[:3] == ["mmlu", "gsm8k", "humaneval"]
    assert TASKS["gsm8k"].primary_metric == "exact_match,strict-match" and TASKS["gsm8k"].num_fewshot == 5
    assert TASKS["mmlu"].num_fewshot == 5 and TASKS["mmlu_flora"].fewshot_fixed and TASKS["humaneval"].code
    assert TASKS["humaneval"].hub is None and TASKS["siqa"].hub == "social_iqa"
    assert not TASKS["hellaswag"].offline
    for name in ["mmlu", "gsm8k", "humaneval", "mmlu_flora", *TASK_GROUPS["commonsense"]]:
        assert TASKS[name].chance is not None, name  # the suite's tasks know their chance level


def _offline_names() -> list[str]:
    return [n for n, s in TASKS.items() if s.offline]


def test_loading_every_offline_task_emits_no_metric_warning(offline_data_env):
    """lm-eval warns when a metric's aggregation or higher_is_better is left to its defaults; every YAML sets both."""
    from lm_eval.tasks import TaskManager

    seen: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Catch(level=logging.WARNING)
    logger = logging.getLogger("lm_eval")
    logger.addHandler(handler)
    try:
        root = str(offline_data_env)
        for name in _offline_names():
            cfgs = runner.offline_configs(name, root)
            if name == "mmlu":
                cfgs = cfgs[:3]  # 57 copies of one template
            loaded = TaskManager(include_defaults=False).load(cfgs)["tasks"]
            assert loaded, name
    finally:
        logger.removeHandler(handler)
    bad = [m for m in seen if "aggregation is not" in m or "higher_is_better is not" in m]
    assert not bad, bad


def test_request_cache_counts_generation_answers(offline_data_env, tmp_path):
    """A generation task scored twice into one folder: the first scoring answers nothing from the cache, the second
    everything (a backend's cache hook storing answers under a second key once made the first count negative)."""
    from bench.models import resolve_model

    model = resolve_model("tiny-random-llama")[0]
    kw = dict(backend="hf", limit=2, num_fewshot=0, data_root=str(offline_data_env), out_dir=str(tmp_path))
    first = evaluate(model, "gsm8k", **kw)
    again = evaluate(model, "gsm8k", **kw)
    assert first["request_cache"]["requests"] == again["request_cache"]["requests"] == 2
    assert first["request_cache"]["answered_from_cache"] == 0 and again["request_cache"]["answered_from_cache"] == 2
    assert first["tasks"]["gsm8k"]["value"] == again["tasks"]["gsm8k"]["value"]


# --------------------------------------------------------------------------------------------- HumanEval's forms
def test_humaneval_form_follows_the_chat_template(tmp_path):
    from bench.models import resolve_model

    model = resolve_model("tiny-random-llama")[0]  # the default model's tokenizer: ChatML template
    assert core.has_chat_template(model) and not core.has_chat_template(str(tmp_path))
    names = ["humaneval", "humaneval_10", "piqa"]
    assert core.task_forms(names, "auto", True) == {"humaneval": "humaneval_instruct",
                                                    "humaneval_10": "humaneval_instruct_10", "piqa": "piqa"}
    assert core.task_forms(names, "auto", False) == {n: n for n in names}
    assert core.task_forms(names, "completion", True) == {n: n for n in names}
    assert core.task_forms(["humaneval"], "instruct", False) == {"humaneval": "humaneval_instruct"}
    with pytest.raises(BenchError, match="humaneval-form: unknown 'chat'"):
        core.task_forms(names, "chat", True)


def test_pass_at_k_from_sampled_programs(monkeypatch):
    """10 programs, 3 of them correct: pass@1 = 3/10, pass@10 = 1; none correct: both 0 (the sandbox runs each)."""
    from evaluators.tasks import loaders

    monkeypatch.setenv(loaders.ALLOW_ENV, "1")
    doc = next(iter(loaders.load_humaneval()["test"]))
    good, bad = doc["prompt"] + doc["canonical_solution"], doc["prompt"] + "    return None\n"
    out = loaders.humaneval_process_results(doc, [[good] * 3 + [bad] * 7])
    assert out == {"pass@1": pytest.approx(0.3), "pass@10": 1.0}
    assert loaders.humaneval_process_results(doc, [[bad] * 10]) == {"pass@1": 0.0, "pass@10": 0.0}
    assert loaders.humaneval_process_results(doc, [[good]]) == {"pass@1": 1.0}


def test_humaneval_instruct_and_sampled_run_on_a_model(tmp_path, monkeypatch):
    """On a model with a chat template, `humaneval` is scored in lm-eval's instruct form (ChatML prompt ending in
    the "```python" prefix and the problem) and the record names the variant; humaneval_10 samples 10 programs."""
    from bench.models import resolve_model

    monkeypatch.setenv("FEDLORA_HUMANEVAL_MAX_GEN_TOKS", "8")
    model = resolve_model("tiny-random-llama")[0]
    section = evaluate(model, "humaneval,humaneval_10", backend="hf", limit=1, allow_code_execution=True,
                       out_dir=str(tmp_path))
    he, he10 = section["tasks"]["humaneval"], section["tasks"]["humaneval_10"]
    assert he["variant"] == "humaneval_instruct" and he10["variant"] == "humaneval_instruct_10"
    assert "scored as humaneval_instruct" in he["notes"] and he["metric"] == "pass@1"
    sample = json.loads(Path(he["samples"]).read_text().splitlines()[0])
    assert sample["prompt"].startswith("<|im_start|>") and "Write a solution to the following problem" in sample["prompt"]
    # lm-eval's gen_prefix "...```python\n{{ prompt }}\n" after the assistant turn's start
    assert sample["prompt"].endswith("<|im_start|>assistant\nHere is the completed function:\n```python\n"
                                     + sample["doc"]["prompt"] + "\n")
    assert he10["metric"] == "pass@10" and set(he10["metrics"]) >= {"pass@1", "pass@10"}
    s10 = json.loads(Path(he10["samples"]).read_text().splitlines()[0])
    texts = _strings(s10["resps"])
    assert len(texts) == 10 and len(set(texts)) > 1  # sampled at temperature 0.8, not one greedy answer
    plain = evaluate(model, "humaneval", backend="hf", limit=1, allow_code_execution=True, humaneval_form="completion",
                     out_dir=str(tmp_path / "completion"))["tasks"]["humaneval"]
    first = json.loads(Path(plain["samples"]).read_text().splitlines()[0])
    assert plain["variant"] == "humaneval" and first["prompt"] == first["doc"]["prompt"]


def _strings(x) -> list[str]:
    if isinstance(x, (list, tuple)):
        return [s for v in x for s in _strings(v)]
    return [x] if isinstance(x, str) else []


# --------------------------------------------------------------------------------------------- the code track
def test_code_preset_runs_and_records_humaneval_pass_at_k(tmp_path, monkeypatch, offline_data_env, capsys):
    """`bench run --preset code --method flexlora`: clients train on CodeAlpaca, the record carries HumanEval pass@1
    (instruct form) and pass@10, and the run ends with the summary table. Without the preset's consent to run
    model-written code the run is refused before any training."""
    from bench.cli import main as bench_main

    monkeypatch.setenv("FEDLORA_HUMANEVAL_MAX_GEN_TOKS", "4")
    common = ["run", "--preset", "code", "--method", "flexlora", "--model", "tiny-random-llama", "--eval-limit", "1",
              "--eval-backend", "hf", "--max-examples-per-client", "8", "--test-limit", "4",
              "--results-dir", str(tmp_path / "results")]
    assert bench_main([*common, "--no-eval-allow-code-execution", "--output-dir", str(tmp_path / "refused")]) == 2
    assert "allow-code-execution" in capsys.readouterr().err and not (tmp_path / "refused").exists()
    assert bench_main([*common, "--output-dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    record = json.loads(next((tmp_path / "results").glob("*.json")).read_text())
    assert record["config"]["dataset"] == "codealpaca" and record["method"] == "flexlora"
    he, he10 = record["eval"]["tasks"]["humaneval"], record["eval"]["tasks"]["humaneval_10"]
    assert he["metric"] == "pass@1" and he["variant"] == "humaneval_instruct" and he["n"] == 1
    assert he10["metric"] == "pass@10" and "pass@1" in he10["metrics"] and he10["variant"] == "humaneval_instruct_10"
    table = out[out.index("task "):]
    assert "humaneval (humaneval_instruct)" in table and "pass@10" in table
