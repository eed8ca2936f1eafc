"""Training data: source → records → partition → client shards → tokenised examples.

A record is {"instruction", "input", "output", "label"}. Named sources read the data root when it
holds them (offline, checksummed) and fall back to the Hugging Face hub otherwise; any local
JSON/JSONL file works with a field map.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import BenchError
from .seeds import HELDOUT_SEED, seed_stream

# named source -> (hub id, hub config, data-root files, field map); fields: instruction, input, output, label
COMMONSENSE = {"boolq": "boolq", "arc-easy": "ARC-Easy", "arc-challenge": "ARC-Challenge", "openbookqa": "openbookqa"}
SOURCES = {
    "dolly": dict(hub=("databricks/databricks-dolly-15k", None), train="dolly_fedit_10clients/local_training_{i}.json",
                  clients=10, test="dolly_fedit_10clients/global_test.json",
                  fields={"instruction": "instruction", "input": "context", "output": "response", "label": "category"}),
    # FedIT's 10-client Dolly split with a held-out test set large enough for generation metrics (its own
    # global_test holds 80) and a validation set for tuning, both drawn once from the pool (the same for every run
    # and every seed) and removed from the clients' shards
    "dolly-heldout": dict(hub=("databricks/databricks-dolly-15k", None), train="dolly_fedit_10clients/local_training_{i}.json",
                          clients=10, test=None, heldout={"test": 500, "validation": 200},
                          fields={"instruction": "instruction", "input": "context", "output": "response", "label": "category"}),
    "gsm8k": dict(hub=("openai/gsm8k", "main"), train="gsm8k/train.jsonl", test="gsm8k/test.jsonl",
                  fields={"instruction": "question", "output": "answer"}),
    # the repo's 4,535-record set: its 2k pilot file (code_alpaca_2k.json) has two records with an empty output
    "codealpaca": dict(hub=("sahil280114/codealpaca", None), train="codealpaca/new_codealpaca.json", test=None,
                       fields={"instruction": "instruction", "input": "input", "output": "output"}),
    **{name: dict(hub=None, train=f"commonsense/{d}/train.json", test=f"commonsense/{d}/test.json",
                  fields={"instruction": "instruction", "input": "input", "output": "output", "label": "answer"})
       for name, d in COMMONSENSE.items()},
    # the four commonsense training sets together, labelled by task: a task-heterogeneous federation (FlexLoRA's
    # setting) with `predefined` (one client per task) or `dirichlet` over the task label; test = the four test sets
    "commonsense-mix": dict(hub=None, tasks={name: (f"commonsense/{d}/train.json", f"commonsense/{d}/test.json")
                                             for name, d in COMMONSENSE.items()},
                            fields={"instruction": "instruction", "input": "input", "output": "output"}),
}

ALPACA = ("Below is an instruction that describes a task, paired with an input that provides further context. "
          "Write a response that appropriately completes the request.\n\n"
          "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
                   "### Instruction:\n{instruction}\n\n### Response:\n")


@dataclass
class Dataset:
    train: list[dict]
    test: list[dict]
    predefined: list[list[int]] | None   # the source's own client split (indices into train)
    files: dict[str, str]                # file path -> md5 (provenance)
    origin: str                          # "data-root", "hub:<id>" or "file"
    validation: list[dict] = field(default_factory=list)  # held out for tuning, disjoint from train and test
    test_by_seed: bool = False           # the test split is drawn with the run's seed (no fixed split in the source)


def carve_heldout(train: list[dict], predefined: list[list[int]] | None, sizes: dict[str, int]):
    """(train, predefined, test, validation) with `sizes["test"]` then `sizes["validation"]` records drawn from the
    pool and removed from it; predefined client shards keep their remaining records, re-indexed."""
    order = np.random.default_rng(HELDOUT_SEED).permutation(len(train))
    n_test, n_val = sizes["test"], sizes.get("validation", 0)
    if n_test + n_val >= len(train):
        raise BenchError(f"dataset: holding out {n_test}+{n_val} records leaves no training data ({len(train)} in all)")
    test_idx, val_idx = sorted(order[:n_test].tolist()), sorted(order[n_test:n_test + n_val].tolist())
    held = set(test_idx) | set(val_idx)
    keep = [i for i in range(len(train)) if i not in held]
    new_index = {old: new for new, old in enumerate(keep)}
    shards = None if predefined is None else [[new_index[i] for i in s if i in new_index] for s in predefined]
    return [train[i] for i in keep], shards, [train[i] for i in test_idx], [train[i] for i in val_idx]


def heldout_records(name: str, data_root: str | Path, split: str) -> list[dict]:
    """The `split` ("test" or "validation") records that source `name` holds out, read from the data root: what
    the evaluation tasks score, identical to the held-out split of every training run on that source."""
    src = SOURCES[name]
    root = Path(data_root).expanduser()
    pool = []
    for i in range(src.get("clients", 1)):
        p = root / src["train"].format(i=i)
        pool += map_fields(read_json_records(p), src["fields"], str(p))
    _, _, test, validation = carve_heldout(pool, None, src["heldout"])
    return {"test": test, "validation": validation}[split]


def md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def read_json_records(path: Path) -> list[dict]:
    """A JSON array or JSONL; errors name the file and the line."""
    if not path.is_file():
        raise BenchError(f"dataset: data file {path} does not exist; check --dataset / --data-root")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise BenchError(f"dataset: data file {path} is empty; give a file with records")
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BenchError(f"dataset: {path} is not valid JSON at line {exc.lineno}: {exc.msg}; fix the file") from None
    else:
        data = []
        # JSON Lines end at "\n" only: str.splitlines() also splits at U+2028, U+0085 and the like, which a JSON
        # string may hold raw
        for n, line in enumerate(text.split("\n"), 1):
            if line.strip():
                try:
                    data.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise BenchError(f"dataset: {path} line {n} is not valid JSON ({exc.msg}); fix or remove that line") from None
    for n, rec in enumerate(data, 1):
        if not isinstance(rec, dict):
            raise BenchError(f"dataset: {path} record {n} is a {type(rec).__name__}, not an object; each record must be a JSON object")
    return data


def map_fields(rows: list[dict], fields: dict[str, str], where: str) -> list[dict]:
    """Rename source fields to instruction/input/output/label; instruction and output are required."""
    out = []
    for n, row in enumerate(rows, 1):
        rec = {}
        for ours in ("instruction", "input", "output", "label"):
            theirs = fields.get(ours)
            if theirs is None:
                rec[ours] = "" if ours != "label" else None
                continue
            if theirs not in row:
                if ours in ("instruction", "output"):
                    raise BenchError(f"field_map: {where} record {n} has no field {theirs!r} (for {ours}); its fields are "
                                     f"{', '.join(sorted(row))}; set --field-map {ours}=<field>")
                rec[ours] = "" if ours != "label" else None
                continue
            value = row[theirs]
            rec[ours] = value if ours == "label" else ("" if value is None else str(value))
        if not rec["instruction"].strip() or not rec["output"].strip():
            raise BenchError(f"dataset: {where} record {n} has an empty instruction or output; clean the file")
        out.append(rec)
    return out


def _seeded_split(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    rng = seed_stream("file_split", seed)
    order = rng.permutation(len(rows))
    n_test = max(1, int(round(len(rows) * fraction)))
    test = [rows[i] for i in sorted(order[:n_test])]
    train = [rows[i] for i in sorted(order[n_test:])]
    return train, test


def load_dataset(cfg) -> Dataset:
    name = cfg.dataset
    path = Path(name).expanduser()
    if name.endswith((".json", ".jsonl")) or path.is_file():
        fields = {"instruction": "instruction", "input": "input", "output": "output", "label": cfg.label_field, **cfg.field_map}
        rows = map_fields(read_json_records(path), fields, str(path))
        train, test = _seeded_split(rows, cfg.test_fraction, cfg.seed)
        return Dataset(train, test, None, {str(path): md5(path)}, "file", test_by_seed=True)
    if name.startswith("hf:"):
        return _from_hub(name[3:], None, {"instruction": "instruction", "input": "input", "output": "output",
                                          "label": cfg.label_field, **cfg.field_map}, cfg)
    if name not in SOURCES:
        import difflib
        close = difflib.get_close_matches(name, list(SOURCES), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise BenchError(f"dataset: unknown dataset {name!r}{hint}; use one of {', '.join(SOURCES)}, "
                         "hf:<hub id>, or a .json/.jsonl file")
    src = SOURCES[name]
    fields = {**src["fields"], **cfg.field_map}
    root = Path(cfg.data_root).expanduser() if cfg.data_root else None
    if "tasks" in src:
        return _task_mix(src, fields, root, name)
    first = src["train"].format(i=0)
    if root is not None and (root / first).is_file():
        files, parts = {}, []
        for i in range(src.get("clients", 1)):
            p = root / src["train"].format(i=i)
            parts.append(map_fields(read_json_records(p), fields, str(p)))
            files[str(p)] = md5(p)
        train = [r for part in parts for r in part]
        predefined = None
        if "clients" in src:
            bounds = np.cumsum([0] + [len(p) for p in parts])
            predefined = [list(range(bounds[i], bounds[i + 1])) for i in range(len(parts))]
        validation, by_seed = [], False
        if "heldout" in src:
            train, predefined, test, validation = carve_heldout(train, predefined, src["heldout"])
        elif src["test"]:
            p = root / src["test"]
            test = map_fields(read_json_records(p), fields, str(p))
            files[str(p)] = md5(p)
        else:
            train, test = _seeded_split(train, cfg.test_fraction, cfg.seed)
            predefined, by_seed = None, True
        return Dataset(train, test, predefined, files, "data-root", validation, by_seed)
    if src["hub"] is None:
        where = root / first if root else f"<data root>/{first}"
        raise BenchError(f"dataset: {name} needs the data root ({where} not found); pass --data-root or set BENCH_DATA_ROOT")
    return _from_hub(src["hub"][0], src["hub"][1], fields, cfg, src.get("heldout"))


def _task_mix(src: dict, fields: dict, root: Path | None, name: str) -> Dataset:
    """Several sources as one, each record labelled with its task; the predefined split is one client per task."""
    if root is None:
        raise BenchError(f"dataset: {name} needs the data root; pass --data-root or set BENCH_DATA_ROOT")
    train, test, files, predefined = [], [], {}, []
    for task, (train_file, test_file) in src["tasks"].items():
        for rel, out in ((train_file, train), (test_file, test)):
            p = root / rel
            rows = map_fields(read_json_records(p), fields, str(p))
            files[str(p)] = md5(p)
            if out is train:
                predefined.append(list(range(len(train), len(train) + len(rows))))
            out.extend({**r, "label": task} for r in rows)
    return Dataset(train, test, predefined, files, "data-root")


def _from_hub(hub_id: str, config_name: str | None, fields: dict, cfg, heldout: dict | None = None) -> Dataset:
    from . import models

    if not models.hub_reachable():
        raise BenchError(f"dataset: {hub_id} needs the Hugging Face hub, which is unreachable; pass --data-root "
                         "(or BENCH_DATA_ROOT) holding the offline copy, or a local .json/.jsonl file")
    import datasets

    ds = datasets.load_dataset(hub_id, config_name)
    train = map_fields(list(ds["train"]), fields, hub_id)
    files = {f"hub:{hub_id}": getattr(ds["train"], "_fingerprint", "")}
    if heldout:  # the hub's record order differs from the data root's client files, so the draw differs too
        train, _, test, validation = carve_heldout(train, None, heldout)
        return Dataset(train, test, None, files, f"hub:{hub_id}", validation)
    if "test" in ds:
        test = map_fields(list(ds["test"]), fields, hub_id)
    else:
        train, test = _seeded_split(train, cfg.test_fraction, cfg.seed)
        return Dataset(train, test, None, files, f"hub:{hub_id}", test_by_seed=True)
    return Dataset(train, test, None, files, f"hub:{hub_id}")


# ---- partitioning ------------------------------------------------------------------------------

def partition(cfg, data: Dataset) -> list[list[int]]:
    """Client shards as lists of indices into data.train; seeded; refuses empty clients."""
    n, k = len(data.train), cfg.num_clients
    rng = seed_stream("partition", cfg.seed)
    labels = [r["label"] for r in data.train]
    if cfg.partition == "predefined":
        if data.predefined is None:
            raise BenchError(f"partition: dataset {cfg.dataset!r} has no predefined client split; use iid, dirichlet or shards")
        if len(data.predefined) != k:
            raise BenchError(f"num_clients: the predefined split of {cfg.dataset} has {len(data.predefined)} clients, "
                             f"got num_clients={k}; set num_clients={len(data.predefined)}")
        shards = [list(s) for s in data.predefined]
    elif cfg.partition == "iid":
        shards = [sorted(s.tolist()) for s in np.array_split(rng.permutation(n), k)]
    else:
        if any(l is None for l in labels):
            raise BenchError(f"label_field: partition {cfg.partition!r} needs a label per record, and dataset "
                             f"{cfg.dataset} has none; set --label-field / --field-map label=<field>, or use iid")
        classes = sorted(set(map(str, labels)))
        by_class = {c: [i for i, l in enumerate(labels) if str(l) == c] for c in classes}
        if cfg.partition == "dirichlet":
            shards = _dirichlet(by_class, k, cfg.dirichlet_alpha, cfg.min_examples_per_client, rng)
        else:
            shards = _label_shards(by_class, classes, k, cfg.shards_per_client, rng)
    if cfg.max_examples_per_client:
        shards = [sorted(rng.permutation(s)[: cfg.max_examples_per_client].tolist()) if len(s) > cfg.max_examples_per_client
                  else s for s in shards]
    for i, s in enumerate(shards):
        if len(s) == 0:
            raise BenchError(f"num_clients: client {i} has 0 examples after partitioning ({cfg.partition}); "
                             "use fewer clients, a larger dirichlet_alpha, or more data")
    return shards


def client_test_splits(cfg, shards: list[list[int]]) -> tuple[list[list[int]], list[list[int]]]:
    """Each client's own held-out split: a seeded client_test_fraction of its shard (at least one example),
    taken out of its training data. Empty splits when client_test_fraction is 0."""
    if not cfg.client_test_fraction:
        return shards, [[] for _ in shards]
    train, test = [], []
    for k, shard in enumerate(shards):
        if len(shard) < 2:
            raise BenchError(f"client_test_fraction: client {k} has {len(shard)} example(s), too few to hold any out; "
                             "use more examples per client or client_test_fraction 0")
        order = seed_stream("client_test", cfg.seed, k).permutation(len(shard))
        n_test = min(len(shard) - 1, max(1, int(round(len(shard) * cfg.client_test_fraction))))
        test.append(sorted(shard[i] for i in order[:n_test]))
        train.append(sorted(shard[i] for i in order[n_test:]))
    return train, test


def federated_split(cfg) -> tuple[Dataset, list[list[int]], list[list[int]]]:
    """(dataset, each client's training shard, each client's own held-out split): what the server and every client
    process derive alike from the config, so that they hold the same partition."""
    dataset = load_dataset(cfg)
    shards, client_tests = client_test_splits(cfg, partition(cfg, dataset))
    return dataset, shards, client_tests


def _dirichlet(by_class: dict[str, list[int]], k: int, alpha: float, min_size: int, rng) -> list[list[int]]:
    """Per class, split its examples among clients with proportions ~ Dir(α); redraw until every client
    holds at least min_size examples (the usual recipe of Hsu et al. 2019)."""
    total = sum(len(v) for v in by_class.values())
    if total < k * min_size:
        raise BenchError(f"num_clients: {total} examples cannot give {k} clients at least {min_size} each; "
                         "use fewer clients or lower min_examples_per_client")
    for _ in range(1000):
        shards: list[list[int]] = [[] for _ in range(k)]
        for c, idx in by_class.items():
            idx = rng.permutation(idx)
            props = rng.dirichlet([alpha] * k)
            cuts = (np.cumsum(props) * len(idx)).astype(int)[:-1]
            for client, part in enumerate(np.split(idx, cuts)):
                shards[client].extend(part.tolist())
        if min(len(s) for s in shards) >= min_size:
            return [sorted(s) for s in shards]
    raise BenchError(f"dirichlet_alpha: α={alpha} left a client with fewer than {min_size} examples in 1000 draws; "
                     "raise dirichlet_alpha or lower min_examples_per_client / num_clients")


def _label_shards(by_class, classes, k: int, per_client: int, rng) -> list[list[int]]:
    """Pathological non-IID (McMahan et al.): sort by label, cut into k·per_client shards, deal them out."""
    if per_client > len(classes):
        raise BenchError(f"shards_per_client: {per_client} label shards per client but the data has only "
                         f"{len(classes)} labels; set shards_per_client ≤ {len(classes)}")
    ordered = np.array([i for c in classes for i in by_class[c]])
    pieces = np.array_split(ordered, k * per_client)
    order = rng.permutation(len(pieces))
    return [sorted(np.concatenate([pieces[j] for j in order[c * per_client:(c + 1) * per_client]]).tolist()) for c in range(k)]


def label_histogram(data: Dataset, shard: list[int]) -> dict[str, int]:
    counts = Counter(str(data.train[i]["label"]) for i in shard if data.train[i]["label"] is not None)
    return dict(sorted(counts.items()))


# ---- prompts and tokenisation ------------------------------------------------------------------

def prompt_text(rec: dict, template: str, tokenizer) -> str:
    if template == "chat":
        user = rec["instruction"] + (f"\n\n{rec['input']}" if rec["input"] else "")
        return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
    fmt = ALPACA if rec["input"] else ALPACA_NO_INPUT
    return fmt.format(**rec)


def tokenize(rec: dict, tokenizer, template: str, cutoff_len: int, train_on_inputs: bool) -> dict:
    """input_ids and labels (-100 on the prompt unless train_on_inputs), at most cutoff_len tokens.

    Plain right-truncation would drop every answer token of a long prompt (a wasted example, loss 0).
    Instead the answer keeps at least a quarter of the budget, and an over-long prompt loses the end of its
    input (the passage), never its instruction; a prompt still too long without input loses its middle,
    keeping its head and the template's tail (`### Response:`), which the model must see.
    """
    answer_ids = tokenizer(rec["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    prompt_ids = tokenizer(prompt_text(rec, template, tokenizer), add_special_tokens=False)["input_ids"]
    if len(prompt_ids) + len(answer_ids) > cutoff_len:
        answer_budget = min(len(answer_ids), max(cutoff_len // 4, cutoff_len - len(prompt_ids)))
        prompt_budget = cutoff_len - answer_budget
        if len(prompt_ids) > prompt_budget and rec["input"]:
            prompt_ids = _prompt_with_shorter_input(rec, template, tokenizer, prompt_budget)
        if len(prompt_ids) > prompt_budget:
            tail = min(16, prompt_budget // 2)
            prompt_ids = prompt_ids[: prompt_budget - tail] + prompt_ids[len(prompt_ids) - tail:]
        answer_ids = answer_ids[: cutoff_len - len(prompt_ids)]
    ids = prompt_ids + answer_ids
    labels = (list(prompt_ids) if train_on_inputs else [-100] * len(prompt_ids)) + answer_ids
    return {"input_ids": ids, "labels": labels}


def _prompt_with_shorter_input(rec: dict, template: str, tokenizer, budget: int) -> list[int]:
    """The prompt's tokens with its input cut from the end until the prompt fits `budget` (or the input is gone).
    Re-tokenising the shortened text can merge tokens differently, hence the loop."""
    input_ids = tokenizer(rec["input"], add_special_tokens=False)["input_ids"]
    prompt_ids = tokenizer(prompt_text(rec, template, tokenizer), add_special_tokens=False)["input_ids"]
    while len(prompt_ids) > budget and input_ids:
        input_ids = input_ids[: max(0, len(input_ids) - (len(prompt_ids) - budget) - 1)]
        short = dict(rec, input=tokenizer.decode(input_ids).rstrip())
        prompt_ids = tokenizer(prompt_text(short, template, tokenizer), add_special_tokens=False)["input_ids"]
    return prompt_ids


MICRO_BATCH_OVERHEAD = 16   # a micro-batch's fixed cost (dispatch of every layer's ops, fwd + bwd), in tokens


def load_tokenizer(model_path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def client_examples(cfg, plan, tokenizer, clients) -> dict[int, list[dict]]:
    """The tokenized training examples of the given clients (plan: its dataset and shards; once per run, reused
    every round)."""
    return {k: [tokenize(plan.dataset.train[i], tokenizer, cfg.prompt_template, cfg.cutoff_len, cfg.train_on_inputs)
                for i in plan.shards[k]] for k in clients}


class HeldOut:
    """The held-out examples of a run, tokenized on first use: the pooled set every model is scored on
    (heldout_split, at most test_limit examples, the same ones for every seed) and each client's own split
    (records of the training data, client_test_splits). The server scores the global model on them and a
    client process its own models (bench/client.py), so both sides build them here."""

    def __init__(self, cfg, dataset: Dataset, client_tests: list[list[int]], tokenizer):
        self.cfg, self.dataset, self.client_tests, self.tokenizer = cfg, dataset, client_tests, tokenizer
        self._pooled: list[dict] | None = None
        self._own: dict[int, list[dict]] = {}

    def _tokenize(self, rec: dict) -> dict:
        return tokenize(rec, self.tokenizer, self.cfg.prompt_template, self.cfg.cutoff_len, False)

    def pooled(self) -> list[dict]:
        if self._pooled is None:
            cfg = self.cfg
            test = self.dataset.validation if cfg.heldout_split == "validation" else self.dataset.test
            if cfg.test_limit and len(test) > cfg.test_limit:
                pick = seed_stream("test_limit", cfg.eval_seed).permutation(len(test))[: cfg.test_limit]  # same examples for every seed
                test = [test[i] for i in sorted(pick)]
            self._pooled = [self._tokenize(r) for r in test]
        return self._pooled

    def own(self, k: int) -> list[dict]:
        """Client k's own split (empty when the run holds none out)."""
        if k not in self._own:
            split = self.client_tests[k] if self.client_tests else []
            self._own[k] = [self._tokenize(self.dataset.train[i]) for i in split]
        return self._own[k]


def length_buckets(lengths: list[int], max_size: int, overhead: int = MICRO_BATCH_OVERHEAD) -> list[list[int]]:
    """Positions of one step's examples grouped into micro-batches of at most max_size, by length.

    Right-padded, a micro-batch computes size × its longest length. Over the examples sorted by length, the
    grouping into runs that minimises the padded tokens plus `overhead` per micro-batch is found exactly (a
    dynamic programme over run boundaries). Each micro-batch keeps its examples in their drawn order, so a step
    whose best grouping is the draw order's is unchanged.
    """
    n = len(lengths)
    order = sorted(range(n), key=lambda i: -lengths[i])
    best, cut = [0] + [None] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(max(0, j - max_size), j):
            cost = best[i] + (j - i) * lengths[order[i]] + overhead
            if best[j] is None or cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j > 0:
        groups.append(sorted(order[cut[j]:j]))
        j = cut[j]
    return sorted(groups)


def collate(batch: list[dict], pad_id: int):
    import torch

    width = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[i, :n] = torch.tensor(b["input_ids"])
        labels[i, :n] = torch.tensor(b["labels"])
        mask[i, :n] = 1
    return ids, labels, mask
