"""The application layer: the entry points that wire bench's core, evaluators/, reports/ and benchmarks/ together.

    cli.py               `bench` (the console script; `python -m bench.cli` reaches it through bench/cli.py)
    ablate.py            `bench ablate`: a resumable grid of runs
    evaluator.py         what scores a run's global model (evaluators/), injected into the engine
    launch.py            `bench run`'s one dispatch: the engine's transport (cfg.engine) says who starts the run
    flower_server_app.py Flower's ServerApp: the engine's loop with a GridTransport
    flower_launch.py     `bench run --engine flower-sim | flower`: Flower's simulation, or a run submitted to a SuperLink

Imports run one way: this package uses the core (bench/ outside app/, methods/), evaluators/ and reports/; none
of them imports this package (tests/test_layers.py checks the import graph).
"""
