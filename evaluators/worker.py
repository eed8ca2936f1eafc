"""Run an evaluation plan in this interpreter and write the results as JSON.

Used by the vllm backend when vllm is not importable in the main environment: the main process runs
`<.venv-vllm>/bin/python -m evaluators.worker plan.json result.json`. Guarded by __main__ (vLLM spawns).
"""
from __future__ import annotations

import json
import sys
import traceback


def main(argv: list[str]) -> int:
    plan_path, result_path = argv[0], argv[1]
    with open(plan_path) as f:
        plan = json.load(f)
    from bench.io import atomic_write_json

    try:
        from evaluators.runner import run_plan

        result = run_plan(plan)
    except Exception as exc:  # reported to the parent as one line, the traceback goes to stderr
        traceback.print_exc()
        atomic_write_json(result_path, {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"})
        return 1
    atomic_write_json(result_path, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
