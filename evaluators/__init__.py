"""fedlora-bench evaluators: lm-eval tasks (hub or offline YAML from the data root) x backend (hf | vllm | openai).

Tasks are registered from their YAMLs (evaluators/tasknames.py), backends by name (evaluators/backends/).

    from evaluators import evaluate, expand_tasks, validate_tasks, TASK_GROUPS
    section = evaluate("runs/x/global_model", expand_tasks("commonsense,gsm8k"), limit=50)

`evaluate` returns the results record's `eval` section (see ARCHITECTURE.md). `bench eval` is
evaluators.cli (add_arguments / main). Code execution (humaneval) happens only in evaluators.sandbox and
only with allow_code_execution=True.
"""
from .cli import summary_table
from .core import (COMMONSENSE, KNOWN_TASKS, TASK_GROUPS, check_code_consent, default_backend, evaluate,
                   expand_tasks, validate_tasks)

__all__ = ["evaluate", "expand_tasks", "validate_tasks", "check_code_consent", "summary_table", "TASK_GROUPS",
           "KNOWN_TASKS", "COMMONSENSE", "default_backend"]
