"""fedlora-bench: federated LoRA aggregation benchmark (CLI, config, data, models, engine)."""

__version__ = "0.1.0"


class BenchError(Exception):
    """A refused input or an unrecoverable state, with a one-line message naming the field and the fix.

    The CLI prints it as `error: <message>` and exits with code 2, before anything is written.
    """
