"""Task names, offline task YAMLs (prompts, choices, targets on the first records of each data file),
answer scoring through lm-eval's own filters/metrics, seeded limits, and the refusals before any work.

Uses the real data root (BENCH_DATA_ROOT, else ../shared/data beside the repo) and lm-eval itself; no model.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from bench import BenchError
from evaluators import TASK_GROUPS, evaluate, expand_tasks, validate_tasks
from evaluators import core, runner
from evaluators.tasknames import TASKS
from evaluators.tasks import loaders
from conftest import require_data_root

LM_EVAL_TASKS = Path(__import__("lm_eval").__file__).parent / "tasks"


def _data_root() -> Path:
    return require_data_root()


@pytest.fixture(scope="module")
def data_root() -> str:
    return str(_data_root())


def _task(name: str, data_root: str, subject: str | None = None):
    from lm_eval.tasks import TaskManager

    cfgs = runner.offline_configs(name, data_root)
    if subject:
        cfgs = [c for c in cfgs if c["task"] == f"fedlora_mmlu_{subject}"]
    loaded = TaskManager(include_defaults=False).load(cfgs)["tasks"]
    return next(iter(loaded.values()))


def _render(value, doc):
    """Render a built-in lm-eval YAML field (template string or function) on a doc."""
    from lm_eval import utils

    if callable(value):
        return value(doc)
    if isinstance(value, list):
        return value
    if value in doc:
        return doc[value]
    out = utils.apply_template(value, doc)
    if out.startswith("["):  # lm-eval reads a rendered list back with ast.literal_eval
        import ast
        return ast.literal_eval(out)
    return out


def _builtin(rel: str) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(str(LM_EVAL_TASKS / rel))


# --------------------------------------------------------------------------------------------- names
def test_expand_groups_and_names():
    assert TASK_GROUPS["commonsense"] == ["boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_easy",
                                         "arc_challenge", "openbookqa"]
    assert expand_tasks("mmlu,gsm8k,humaneval,commonsense") == ["mmlu", "gsm8k", "humaneval", *TASK_GROUPS["commonsense"]]
    assert expand_tasks("piqa, social_iqa,piqa") == ["piqa", "siqa"]
    assert expand_tasks(["arc_easy", "commonsense"])[:2] == ["arc_easy", "boolq"]


def test_unknown_task_is_one_line_with_did_you_mean():
    with pytest.raises(BenchError) as exc:
        validate_tasks("mmlu,gsm8kk", None)
    msg = str(exc.value)
    assert "\n" not in msg and "'gsm8k'" in msg and "did you mean" in msg and "humaneval" in msg
    with pytest.raises(BenchError, match="known"):
        expand_tasks("nope")


def test_mmlu_parts_are_lm_evals_categories_and_subjects(data_root):
    """mmlu_stem / _humanities / _social_sciences / _other partition the 57 subjects of the data root exactly as
    lm-eval's groups do (read from its own task files), and mmlu_<subject> is one subject."""
    from lm_eval.tasks._yaml_loader import load_yaml

    parts = {c: core.mmlu_subjects_of(f"mmlu_{c}") for c in loaders.MMLU_CATEGORIES}
    every = [s for subjects in parts.values() for s in subjects]
    assert sorted(every) == loaders.mmlu_subjects(data_root) and len(every) == len(set(every)) == 57
    assert {c: len(v) for c, v in parts.items()} == {"stem": 19, "humanities": 13, "social_sciences": 12, "other": 13}
    for category, subjects in parts.items():  # lm-eval's group yaml names the tag its subject files carry
        group = load_yaml(str(LM_EVAL_TASKS / "mmlu" / "default" / f"_mmlu_{category}.yaml"))
        assert group["task"] == [f"mmlu_{category}_tasks"]
        for subject in subjects[:3]:
            assert load_yaml(str(LM_EVAL_TASKS / "mmlu" / "default" / f"mmlu_{subject}.yaml"))["tag"] \
                == f"mmlu_{category}_tasks"
    assert core.mmlu_subjects_of("mmlu_anatomy") == ["anatomy"] and core.mmlu_subjects_of("mmlu") == []
    assert core.mmlu_subjects_of("gsm8k") is None and core.mmlu_subjects_of("mmlu_nope") is None
    assert expand_tasks("mmlu_stem,mmlu_anatomy") == ["mmlu_stem", "mmlu_anatomy"]
    with pytest.raises(BenchError, match="did you mean 'mmlu_humanities'"):
        expand_tasks("mmlu_humanites")
    with pytest.raises(BenchError, match="did you mean 'mmlu_anatomy'"):
        expand_tasks("mmlu_anatomyy")
    # the parts plan like mmlu: 5-shot, their own files hashed, and the hub path names lm-eval's subject tasks
    plan, missing = core.plan_tasks(["mmlu_stem", "mmlu_anatomy"], data_root=data_root, limit=None,
                                    num_fewshot=None, hub=False)
    assert not missing and [(p["num_fewshot"], p["source"]["files"]) for p in plan] == [(5, 19), (5, 1)]
    assert [c["task"] for c in runner.offline_configs("mmlu_anatomy", data_root)] == ["fedlora_mmlu_anatomy"]
    assert runner.hub_specs("mmlu_social_sciences") == [f"mmlu_{s}" for s in parts["social_sciences"]]
    assert len(runner.hub_specs("mmlu")) == 57
    _, missing = core.plan_tasks(["mmlu_anatomy"], data_root="/tmp", limit=None, num_fewshot=None, hub=False)
    assert "/tmp/mmlu/test/anatomy_test.csv" in missing["mmlu_anatomy"]


def test_mmlu_in_parts_scores_what_mmlu_scores(tmp_path, shared_data):
    """A full MMLU run in parts (as the long CPU measurement does) gives each subject the same prompts, the same
    per-document log-likelihoods (to float noise: batch neighbours differ) and so the same accuracy as one mmlu
    run; the size-weighted mean of the parts is mmlu's score."""
    from bench.models import resolve_model

    root = tmp_path / "data"
    subjects, n_test = ("abstract_algebra", "anatomy"), {"abstract_algebra": 9, "anatomy": 14}
    for subject in subjects:  # a small data root: the first rows of two subjects' test files, their dev files
        for split in ("test", "dev"):
            src = Path(shared_data) / "mmlu" / split / f"{subject}_{split}.csv"
            dst = root / "mmlu" / split / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if split == "dev":
                dst.symlink_to(src)
            else:
                import csv
                with open(src, newline="", encoding="utf-8") as f:
                    rows = list(csv.reader(f))[: 1 + n_test[subject]]
                with open(dst, "w", newline="", encoding="utf-8") as f:
                    csv.writer(f).writerows(rows)
    model = resolve_model("tiny-random-llama")[0]
    whole = evaluate(model, ["mmlu"], backend="hf", data_root=str(root), out_dir=str(tmp_path / "whole"))
    parts = evaluate(model, [f"mmlu_{s}" for s in subjects], backend="hf", data_root=str(root),
                     out_dir=str(tmp_path / "parts"))["tasks"]
    mmlu = whole["tasks"]["mmlu"]
    assert mmlu["n"] == sum(n_test.values()) and [parts[f"mmlu_{s}"]["n"] for s in subjects] == [9, 14]
    for subject in subjects:
        assert parts[f"mmlu_{subject}"]["value"] == mmlu["metrics"]["subjects"][subject]
    weighted = sum(parts[t]["value"] * parts[t]["n"] for t in parts) / mmlu["n"]
    assert weighted == pytest.approx(mmlu["value"], abs=1e-12)

    def per_doc(path):
        return {(r["subtask"], r["doc_id"]): r for r in map(json.loads, open(path))}
    joined = {k: v for s in subjects for k, v in per_doc(parts[f"mmlu_{s}"]["samples"]).items()}
    reference = per_doc(mmlu["samples"])
    assert joined.keys() == reference.keys()
    for key, rec in joined.items():
        assert rec["prompt"] == reference[key]["prompt"] and rec["metrics"] == reference[key]["metrics"]
        got = [r[0][0] for r in rec["resps"]]
        assert got == pytest.approx([r[0][0] for r in reference[key]["resps"]], abs=1e-4)


def test_missing_data_root_folder_is_refused():
    with pytest.raises(BenchError, match="not a folder"):
        validate_tasks("piqa", "/nonexistent/data")


# --------------------------------------------------------------------------------------------- prompts
FIRST = {  # the first record of each test file, after parsing
    "piqa": ("Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:",
             [" Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips, you "
              "will also need to supply it with a water bottle and a food dish.",
              " Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans material, you "
              "will also need to supply it with a water bottle and a food dish."], 0),
    "siqa": ("Q: Tracy didn't go home that evening and resisted Riley's attacks. What does Tracy need to do before "
             "this?\nA:", [" make a new plan", " Go home and see Riley", " Find somewhere to go"], 2),
    "arc_easy": ("Question: Which statement best explains why photosynthesis is the foundation of most food webs?"
                 "\nAnswer:", [" Sunlight is the source of energy for nearly all ecosystems.",
                               " Most ecosystems are found on land instead of in water.",
                               " Carbon dioxide is more available than other gases.",
                               " The producers in all ecosystems are plants."], 0),
    "arc_challenge": ("Question: An astronomer observes that a planet rotates faster after a meteorite impact. Which is "
                      "the most likely effect of this increase in rotation?\nAnswer:",
                      [" Planetary density will decrease.", " Planetary years will become longer.",
                       " Planetary days will become shorter.", " Planetary gravity will become stronger."], 2),
    "openbookqa": ("A person wants to start saving money so that they can afford a nice vacation at the end of the "
                   "year. After looking over their budget and expenses, they decide the best way to save money is to",
                   [" make more phone calls", " quit eating lunch out", " buy less with monopoly money",
                    " have lunch with friends"], 1),
    "boolq": ("Question: does ethanol take more energy make that produces?\nAnswer:", [" no", " yes"], 0),
}


@pytest.mark.parametrize("name", sorted(FIRST))
def test_offline_prompt_choices_target_on_first_record(name, data_root):
    task = _task(name, data_root)
    doc = task.test_docs()[0]
    text, choices, target = FIRST[name]
    assert task.doc_to_text(doc) == text
    assert [task.config.target_delimiter + c for c in task.doc_to_choice(doc)] == choices
    assert task.doc_to_target(doc) == target
    # and the full request lm-eval builds: (context, continuation) pairs
    reqs = task.construct_requests(doc, task.fewshot_context(doc, 0), metadata=(name, 0, 1))
    assert [r.arguments for r in reqs] == [(text, c) for c in choices]


BUILTIN_YAML = {"piqa": "piqa/piqa.yaml", "siqa": "siqa/siqa.yaml", "arc_easy": "arc/arc_easy.yaml",
                "openbookqa": "openbookqa/openbookqa.yaml", "winogrande": "winogrande/default.yaml",
                "boolq": "super_glue/boolq/default.yaml"}


@pytest.mark.parametrize("name", sorted(BUILTIN_YAML))
def test_offline_tasks_render_like_lm_eval_builtin(name, data_root):
    """On the first 25 parsed records, lm-eval's own YAML fields give the same prompt/choices/target."""
    task = _task(name, data_root)
    cfg = _builtin(BUILTIN_YAML[name])
    for doc in list(task.test_docs())[:25]:
        if name == "boolq":  # no passage offline: lm-eval's prompt minus its "<passage>\n" prefix
            assert "\n" + task.doc_to_text(doc) == _render(cfg["doc_to_text"], doc)
        else:
            assert task.doc_to_text(doc) == _render(cfg["doc_to_text"], doc)
        assert task.doc_to_choice(doc) == _render(cfg["doc_to_choice"], doc)
        assert str(task.doc_to_target(doc)) == str(_render(cfg["doc_to_target"], doc)).strip()


def test_winogrande_partial_evaluation_first_record(data_root):
    task = _task("winogrande", data_root)
    doc = task.test_docs()[0]
    assert doc == {"sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
                   "option1": "Sarah", "option2": "Maria", "answer": "2"}
    assert task.doc_to_choice(doc) == ["Sarah was a much better surgeon than Maria so Sarah",
                                       "Sarah was a much better surgeon than Maria so Maria"]
    assert task.doc_to_text(doc) == 1  # lm-eval's winogrande: the gold index picks the context
    assert task.doc_to_target(doc) == "always got the easier cases."


def test_every_commonsense_record_parses(data_root):
    counts = {"boolq": 3270, "piqa": 1838, "siqa": 1954, "winogrande": 1267, "arc_easy": 2376,
              "arc_challenge": 1172, "openbookqa": 500}
    for name, n in counts.items():
        cfg = runner.offline_configs(name, data_root)[0]
        recs = loaders.read_commonsense(cfg["dataset_kwargs"]["format"], Path(data_root) / TASKS[name].files["test"])
        assert len(recs) == n
    arc = loaders.read_commonsense("arc", Path(data_root) / TASKS["arc_easy"].files["test"])
    assert {len(r["choices"]["text"]) for r in arc} <= {3, 4, 5}


def test_malformed_instruction_is_refused():
    with pytest.raises(ValueError):
        loaders.parse_piqa({"instruction": "Please choose the correct solution to the question: x", "answer": "solution1"})
    with pytest.raises(ValueError):
        loaders.parse_arc({"instruction": "Please choose the correct answer to the question: q\n\nAnswer1: a Answer3: "
                                          "c\n\nAnswer format: answer1/answer2", "answer": "answer1"})


def test_mmlu_five_shot_prompt_and_letter_mapping(data_root):
    task = _task("mmlu", data_root, subject="abstract_algebra")
    doc = task.test_docs()[0]
    assert doc["choices"] == ["0", "4", "2", "6"] and doc["answer"] == 1  # CSV "answer" 1 -> index 1
    assert task.doc_to_text(doc) == ("Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) "
                                     "over Q.\nA. 0\nB. 4\nC. 2\nD. 6\nAnswer:")
    assert task.doc_to_choice(doc) == ["A", "B", "C", "D"]
    assert task.doc_to_choice(doc)[task.doc_to_target(doc)] == "B"
    ctx = task.fewshot_context(doc, 5)
    assert ctx.startswith("The following are multiple choice questions (with answers) about abstract algebra.\n\n")
    assert ctx.count("\nAnswer:") == 6 and ctx.endswith(task.doc_to_text(doc))
    dev = loaders.read_mmlu_csv(Path(data_root) / "mmlu/dev/abstract_algebra_dev.csv", "abstract_algebra")
    # first_n sampler: the dev rows in file order, each followed by its letter
    assert f"{dev[0]['question'].strip()}\nA. {dev[0]['choices'][0]}" in ctx.split("\n\n", 1)[1].split("\n\n")[0]
    letter = "ABCD"[dev[0]["answer"]]
    assert ctx.split("\n\n", 1)[1].split("\n\n")[0].endswith(f"Answer: {letter}")
    # scoring: acc is 1 only when the gold letter has the highest log-likelihood (0-based answer -> A..D)
    right = [(-9.0, False), (-1.0, True), (-7.0, False), (-8.0, False)]
    wrong = [(-1.0, True), (-9.0, False), (-7.0, False), (-8.0, False)]
    assert task.process_results(doc, right)["acc"] == 1.0
    assert task.process_results(doc, wrong)["acc"] == 0.0


def test_mmlu_csv_fields_stay_strings(tmp_path):
    p = tmp_path / "x_test.csv"
    p.write_text('question,choice0,choice1,choice2,choice3,answer\n"Which, if any?",None,01,1.50,N/A,0\n')
    rows = loaders.read_mmlu_csv(p, "x")
    assert rows == [{"question": "Which, if any?", "subject": "x", "choices": ["None", "01", "1.50", "N/A"], "answer": 0}]
    p.write_text("question,choice0,choice1,choice2,choice3,answer\nq,a,b,c,d,4\n")
    with pytest.raises(ValueError):
        loaders.read_mmlu_csv(p, "x")


def _gsm8k_scores(task, doc, text: str) -> dict[str, float]:
    from lm_eval.api.instance import Instance

    inst = Instance(request_type="generate_until", doc=doc, arguments=("ctx", {}), idx=0,
                    metadata=("gsm8k", 0, 1))
    inst.resps = [text]
    out = {}
    for f in task._filters:
        f.apply([inst])
        out[f.name] = task.process_results(doc, [inst.filtered_resps[f.name]])["exact_match"]
    return out


def test_gsm8k_prompt_fewshot_and_answer_extraction(data_root):
    task = _task("gsm8k", data_root)
    doc = task.test_docs()[0]
    assert task.doc_to_text(doc).startswith("Question: Janet’s ducks lay 16 eggs per day.")
    assert task.doc_to_text(doc).endswith("at the farmers' market?\nAnswer:")
    assert task.doc_to_target(doc).endswith("#### 18")
    ctx = task.fewshot_context(doc, 5)
    assert ctx.count("Question:") == 6 and ctx.count("#### ") == 5
    assert _gsm8k_scores(task, doc, " She sells 9 eggs for $2 each.\n#### 18") == {"strict-match": 1.0,
                                                                                   "flexible-extract": 1.0}
    assert _gsm8k_scores(task, doc, " 16 - 3 - 4 = 9 eggs, 9 * 2 = 18 dollars.") == {"strict-match": 0.0,
                                                                                     "flexible-extract": 1.0}
    assert _gsm8k_scores(task, doc, " The answer is 18 but\n#### 17") == {"strict-match": 0.0,
                                                                           "flexible-extract": 0.0}
    assert _gsm8k_scores(task, doc, " #### 1,018") == {"strict-match": 0.0, "flexible-extract": 0.0}
    big = dict(doc, answer="... #### 1018")
    assert _gsm8k_scores(task, big, " #### 1,018") == {"strict-match": 1.0, "flexible-extract": 1.0}


def test_humaneval_task_and_consent(data_root, monkeypatch):
    task = _task("humaneval", data_root)
    doc = task.test_docs()[0]
    assert doc["task_id"] == "HumanEval/0" and task.doc_to_text(doc) == doc["prompt"]
    assert task.config.generation_kwargs["until"] == ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
    monkeypatch.delenv(loaders.ALLOW_ENV, raising=False)
    with pytest.raises(PermissionError, match="allow_code_execution"):
        loaders.humaneval_process_results(doc, [[doc["prompt"] + doc["canonical_solution"]]])
    monkeypatch.setenv(loaders.ALLOW_ENV, "1")
    assert loaders.humaneval_process_results(doc, [[doc["prompt"] + doc["canonical_solution"]]]) == {"pass@1": 1.0}
    assert loaders.humaneval_process_results(doc, [[doc["prompt"] + "    return True\n"]]) == {"pass@1": 0.0}


# --------------------------------------------------------------------------------------------- plan, limits
def test_seeded_subset_is_random_reproducible_and_recorded():
    a = runner.seeded_subset(1000, 10, 0, "piqa")
    assert a == runner.seeded_subset(1000, 10, 0, "piqa") and len(a) == 10 and a == sorted(a)
    assert a != list(range(10))
    assert a != runner.seeded_subset(1000, 10, 1, "piqa")
    assert runner.seeded_subset(5, 10, 0, "piqa") is None


def test_plan_offline_and_missing(data_root):
    plan, missing = core.plan_tasks(["piqa", "hellaswag", "mmlu"], data_root=data_root, limit=5, num_fewshot=None,
                                    hub=False)
    assert [p["name"] for p in plan] == ["piqa", "mmlu"]
    assert plan[0]["source"]["md5"] == "da8ed93e6be330cb8f8a9606213ad46d"  # SOURCES.md
    assert plan[1]["num_fewshot"] == 5 and plan[1]["source"]["files"] == 57
    assert missing == {"hellaswag": f"no data at {Path(data_root).resolve()}/commonsense/hellaswag/test.json "
                                    "and the hub is unreachable"}
    plan, _ = core.plan_tasks(["piqa", "mmlu"], data_root=data_root, limit=None, num_fewshot=0, hub=True)
    assert [(p["mode"], p["num_fewshot"]) for p in plan] == [("hub", 0), ("hub", 0)]
    _, missing = core.plan_tasks(["gsm8k"], data_root=None, limit=None, num_fewshot=None, hub=False)
    assert "BENCH_DATA_ROOT" in missing["gsm8k"]


# --------------------------------------------------------------------------------------------- refusals
def test_refusals_before_any_work(data_root, tmp_path, monkeypatch):
    with pytest.raises(BenchError, match="allow-code-execution"):
        evaluate(str(tmp_path), ["humaneval"], data_root=data_root)
    with pytest.raises(BenchError, match="unknown backend"):
        evaluate(str(tmp_path), ["piqa"], backend="tpu", data_root=data_root)
    with pytest.raises(BenchError, match="limit"):
        evaluate(str(tmp_path), ["piqa"], limit=0, data_root=data_root)
    with pytest.raises(BenchError, match="dtype: unknown 'fp8'; choose one of auto, float32"):
        evaluate(str(tmp_path), ["piqa"], dtype="fp8", data_root=data_root)


def test_vllm_missing_message(monkeypatch, tmp_path):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is importable here")
    monkeypatch.setenv("FEDLORA_VLLM_PYTHON", str(tmp_path / "no-such-python"))
    with pytest.raises(BenchError) as exc:
        core.vllm_mode()
    msg = str(exc.value)
    assert "setup_vllm_cpu.sh" in msg and "fedlora-bench[vllm]" in msg and "--backend hf" in msg and "\n" not in msg


def _cli(argv: list[str]) -> int:
    from evaluators import cli

    p = argparse.ArgumentParser(prog="bench eval")
    cli.add_arguments(p)
    return cli.main(p.parse_args(argv))


def test_cli_refusals(tmp_path, capsys, data_root):
    assert _cli(["--model", "default", "--tasks", "piqa,mmlux", "--data-root", data_root]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: tasks: unknown task 'mmlux'") and "mmlu" in err and "\n" not in err
    assert _cli(["--run", str(tmp_path), "--tasks", "piqa", "--data-root", data_root]) == 2
    assert "global_model" in capsys.readouterr().err
    assert _cli(["--model", "default", "--tasks", "humaneval", "--data-root", data_root]) == 2
    assert "--allow-code-execution" in capsys.readouterr().err
    (tmp_path / "global_model").mkdir()
    (tmp_path / "global_model" / "config.json").write_text("{}")
    (tmp_path / "run.json").write_text(json.dumps({"record": str(tmp_path / "rec.json")}))
    (tmp_path / "rec.json").write_text(json.dumps({"schema_version": 99}))
    assert _cli(["--run", str(tmp_path), "--tasks", "piqa", "--data-root", data_root]) == 2
    assert "schema_version 99" in capsys.readouterr().err


def test_hellaswag_file_without_hub_is_still_missing(tmp_path):
    f = tmp_path / "commonsense" / "hellaswag" / "test.json"
    f.parent.mkdir(parents=True)
    f.write_text("[]")
    plan, missing = core.plan_tasks(["hellaswag"], data_root=str(tmp_path), limit=None, num_fewshot=None, hub=False)
    assert plan == [] and "has no offline version" in missing["hellaswag"] and str(f) in missing["hellaswag"]


def test_evaluate_restores_the_callers_thread_count(tmp_path, monkeypatch, shared_data):
    """The hf backend may use one thread on a loaded CPU; the caller (e.g. an ablation grid that trains
    next) must get its own thread count back, or its numbers would depend on the load."""
    import torch

    from bench.models import resolve_model
    from evaluators import evaluate

    monkeypatch.setenv("FEDLORA_EVAL_THREADS", "1")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        evaluate(resolve_model("tiny-random-llama")[0], ["openbookqa"], backend="hf", limit=2,
                 data_root=str(shared_data), out_dir=str(tmp_path))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------- mmlu_flora
def test_mmlu_flora_records_are_mmlu_test_questions(data_root):
    """FLoRA's subset: 1444 records over the 57 subjects, each the same question, options and answer as a row of
    that subject's MMLU test CSV (matched on all three: MMLU repeats some questions with other options)."""
    root = Path(data_root)
    recs = loaders.read_mmlu_flora(root / TASKS["mmlu_flora"].files["test"])
    assert len(recs) == 1444 and len({r["subject"] for r in recs}) == 57
    rows: dict[str, set] = {}
    for r in recs:
        s = r["subject"]
        if s not in rows:
            rows[s] = {(x["question"].strip(), tuple(c.strip() for c in x["choices"]), x["answer"])
                       for x in loaders.read_mmlu_csv(root / loaders.MMLU_DIRS[0] / f"{s}_test.csv", s)}
        assert (r["question"].strip(), tuple(c.strip() for c in r["choices"]), r["answer"]) in rows[s]


def test_mmlu_flora_prompt_is_mmlus_zero_shot_prompt(data_root):
    flora = _task("mmlu_flora", data_root)
    doc = flora.test_docs()[0]
    assert doc["subject"] == "medical_genetics" and doc["answer"] == 2  # "The answer is: C. Hurler syndrome"
    mmlu = _task("mmlu", data_root, subject="medical_genetics")
    same = next(d for d in mmlu.test_docs() if d["question"].strip() == doc["question"].strip())
    assert flora.fewshot_context(doc, 0) == mmlu.fewshot_context(same, 0)
    assert flora.doc_to_choice(doc) == mmlu.doc_to_choice(same) == ["A", "B", "C", "D"]
    assert flora.doc_to_target(doc) == mmlu.doc_to_target(same) == 2


def test_mmlu_flora_malformed_record_is_refused():
    ok = {"input": "Qusetion: q? Options: A. a, B. b, C. c, D. d", "output": "The answer is: B. b", "class": "x"}
    assert loaders.parse_mmlu_flora(ok) == {"question": "q?", "subject": "x", "choices": ["a", "b", "c", "d"],
                                            "answer": 1}
    with pytest.raises(ValueError, match="', B.' occurs 2 times"):
        loaders.parse_mmlu_flora(dict(ok, input="Qusetion: q? Options: A. a, B. b, C. c, B. e, D. d"))
    with pytest.raises(ValueError, match="The answer is"):
        loaders.parse_mmlu_flora(dict(ok, output="The answer is: E. e"))


def test_mmlu_flora_is_read_offline_even_with_the_hub(data_root, tmp_path):
    plan, missing = core.plan_tasks(["mmlu_flora"], data_root=data_root, limit=None, num_fewshot=None, hub=True)
    assert missing == {} and plan[0]["mode"] == "offline" and plan[0]["num_fewshot"] == 0
    assert plan[0]["source"]["md5"] == "d3046d7f4bf33baece7e0ea355a8ffdb"  # SOURCES.md
    _, missing = core.plan_tasks(["mmlu_flora"], data_root=str(tmp_path), limit=None, num_fewshot=None, hub=True)
    assert missing == {"mmlu_flora": f"no data at {tmp_path.resolve()}/mmlu_flora/mmlu_test_1444.jsonl"}
    assert expand_tasks("mmlu_flora") == ["mmlu_flora"] and core.task_family("mmlu_flora") == "mmlu_flora"


@pytest.mark.parametrize("name", ["gsm8k", "boolq"])
def test_a_data_root_without_the_train_file_has_no_train_split(name, data_root, tmp_path):
    """A task read from a test file alone (no train file beside it) asks lm-eval for no train or few-shot split;
    with the train file there, the task's YAML keeps them."""
    test, train = TASKS[name].files["test"], TASKS[name].files["train"]
    full = runner.offline_configs(name, data_root)[0]
    assert full.get("training_split") == "train"
    (tmp_path / test).parent.mkdir(parents=True)
    (tmp_path / test).symlink_to(Path(data_root) / test)
    alone = runner.offline_configs(name, str(tmp_path))[0]
    assert "training_split" not in alone and "fewshot_split" not in alone
    (tmp_path / train).symlink_to(Path(data_root) / train)
    assert runner.offline_configs(name, str(tmp_path))[0].get("training_split") == "train"
