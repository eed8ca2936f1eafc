"""The bench's server and client over Flower (flwr ≥ 1.42, Message API).

Nothing here changes what is computed: the engine (bench/engine.py) still drives the rounds, the
server (bench/server.py behind bench/guard.py) still configures and aggregates, the client runtime
(bench/client.py) still trains and scores its own models. Flower only carries the messages of
bench/messages.py (TRAIN, and EVALUATE for personalized methods):

    wire.py        TaskMessage/Reply <-> Flower RecordDict (float32 ArrayRecord + ConfigRecord), the
                   reply size limit, the bytes a Message puts on the wire
    client_app.py  the ClientApp: one node = one client (partition id from the node config); its base
                   merges and personal factors live in context.state between messages
    transport.py   GridTransport: the engine's transport over a Flower Grid (node discovery, one TRAIN
                   message per client, replies checked before they reach the engine, timeouts), registered
                   as flower-sim and flower (bench/transports/ imports it)
    options.py     the Flower flags of `bench run` and the job a ServerApp runs (no flwr import: the CLI
                   works without flwr)

The ServerApp (run_federated with a GridTransport) and the launcher (Flower's simulation engine, or a run
submitted to a SuperLink) are entry points: bench/app/flower_server_app.py and bench/app/flower_launch.py.

flwr is an optional dependency (`pip install 'fedlora-bench[flower]'`); see docs/flower.md.
"""
from __future__ import annotations

from .. import BenchError


def require_flwr() -> None:
    """BenchError naming the fix when flwr (or Ray, for the simulation) is missing."""
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise BenchError("engine: the Flower engines need flwr; pip install 'fedlora-bench[flower]' "
                         "(or bash setup.sh --with-test-deps), or use --engine inprocess") from None
