"""What scores a run's global model: the evaluators package, injected into the engine by the entry points (the
CLI, `bench ablate`, the Flower ServerApp); the core never imports evaluators/."""
from __future__ import annotations

from bench import BenchError


def evaluator_for(cfg):
    """The evaluators package when the run evaluates (imported only then), else None."""
    if not cfg.eval_tasks:
        return None
    try:
        import evaluators
    except ImportError as exc:
        raise BenchError(f"eval_tasks: evaluation needs the eval extra ({exc}); pip install 'fedlora-bench[eval]' "
                         "or pass --no-eval") from None
    return evaluators
