"""`bench` — the command line. It only wires registries together: config → engine → methods,
evaluators, reports. Every refused input prints one `error:` line and exits with code 2."""
from __future__ import annotations

import argparse
import sys

from bench import BenchError

FIELD_HELP = {
    "method": "aggregation method (see `bench methods`)",
    "model": "hub id, local HF folder, .gguf file, 'default' (SmolLM2-135M-Instruct) or 'tiny-random-llama'",
    "dataset": "dolly | gsm8k | codealpaca | boolq | arc-easy | arc-challenge | openbookqa | hf:<hub id> | <file.json[l]>",
    "data_root": "offline data folder (default: $BENCH_DATA_ROOT)",
    "field_map": "for files/hub ids: instruction=<f>,input=<f>,output=<f>,label=<f>",
    "partition": "iid | dirichlet | shards | predefined",
    "ranks": "explicit per-client ranks, e.g. 64,32,16,16,8,8,4,4,4,4",
    "rank_distribution": "homo | uniform | heavy-tail-light | heavy-tail-strong | normal | explicit",
    "rank_set": "ranks the distribution draws from, e.g. 4,8,16,32",
    "eval_tasks": "mmlu,gsm8k,humaneval,commonsense or single tasks, also mmlu_stem etc. (empty: no evaluation); "
                  "see `bench eval --help`",
    "eval_allow_code_execution": "consent for code tasks (humaneval*): model-written code runs in evaluators.sandbox",
    "eval_humaneval_form": "auto (instruct when the model has a chat template) | completion | instruct",
    "eval_dtype": "auto | float32 | bfloat16 | float16 for scoring (auto: float32 on CPU, bfloat16 on GPU)",
    "max_update_norm": "exclude a client update whose ‖s·B·A‖_F exceeds this",
    "method_options": "the method's own options, e.g. split=official (see `bench methods`)",
    "alpha_policy": "shared (every client lora_alpha; s_k = α/r_k) | proportional (α_k = alpha_ratio·r_k; FLoRA's heterogeneous runs)",
    "dtype": "training dtype: auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16 | float16",
    "compute_dtype": "local training's matmuls over float32 storage: float32 (default) | bfloat16 (autocast, float32 "
                     "masters, factors and AdamW state) | auto (bfloat16 on CPUs with avx512_bf16/amx_bf16): docs/precision.md",
    "length_buckets": "group each step's examples by length into micro-batches (no compute on padding; same loss): default on",
    "export_dtype": "global model on disk: auto (float32: holds every round's update) | float32 | bfloat16 | float16",
    "save_client_adapters": "audit trail: each client's trained adapter (PEFT folder), its upload and what it received, every round",
    "keep_round_states": "keep the server state after every round in rounds/round_<r>/, not only the last checkpoint",
    "keep_global_model": "false: delete <run>/global_model once the run is scored (bench eval/serve --run and bench "
                         "audit re-export it from the run's last checkpoint, tensor for tensor)",
    "dp_epsilon": "differential privacy: target ε per client over the run (DP-SGD on local training; σ calibrated; "
                  "needs --dp-delta): bench/privacy.py, docs/methods.md",
    "dp_delta": "δ of the (ε, δ) guarantee, below 1/n of every client (e.g. 1e-5)",
    "dp_noise_multiplier": "σ of DP-SGD's Gaussian noise (instead of --dp-epsilon); the spent ε is recorded per round",
    "dp_clip_norm": "C: each example's gradient on the trained factors is clipped to this L2 norm (default 1.0)",
    "dp_accountant": "rdp | prv: Opacus's accountant for calibration and the spent ε",
    "client_batching": "auto (default: on with CUDA, off on the CPU) | on | off: a round's in-process clients share one "
                       "forward/backward per micro-step, each with its own factors, optimizer, data order and dropout "
                       "(docs/performance.md)",
}


def _engine_help() -> str:
    from bench.transports import TRANSPORTS, transport_names

    return "where the clients run, a registered transport (bench/transports/): " + " | ".join(
        f"{n} ({TRANSPORTS[n].description})" for n in transport_names()) + "; docs/flower.md"


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    from bench.config import FIELDS

    helps = {**FIELD_HELP, "engine": _engine_help()}

    p.add_argument("--config", help="YAML config file (e.g. a run's config.yaml)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a killed run from its last complete round")
    p.add_argument("--no-eval", action="store_true", help="skip lm-eval scoring at the end")
    for name, f in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        if str(f.type).startswith("bool"):
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=helps.get(name))
        else:
            p.add_argument(flag, dest=name, default=None, metavar=name.upper(), help=helps.get(name))


def cmd_run(args) -> int:
    from bench.config import FIELDS, build_config
    from bench.engine import Interrupted

    overrides = {k: getattr(args, k) for k in FIELDS if getattr(args, k, None) is not None}
    if args.no_eval:
        overrides["eval_tasks"] = []
    if args.resume:
        from pathlib import Path

        cfg_file = Path(args.resume) / "config.yaml"
        if not cfg_file.is_file():
            raise BenchError(f"resume: {cfg_file} not found; pass the run directory that `bench run` created")
        cfg = build_config(config_file=str(cfg_file), overrides={**overrides, "output_dir": args.resume})
    else:
        preset = None if (args.config or overrides.get("preset")) else "quick"
        cfg = build_config(preset=preset, config_file=args.config, overrides=overrides)
    from .evaluator import evaluator_for
    from .launch import launch

    evaluator = evaluator_for(cfg)
    try:
        record = launch(cfg, args, evaluator)
    except Interrupted as exc:
        print(f"interrupted: {exc}", file=sys.stderr)
        return 130
    if evaluator is not None and (record or {}).get("eval"):  # last, after lm-eval's progress output
        print(evaluator.summary_table(record["eval"]))
    return 0


def cmd_methods(args) -> int:
    from methods import METHODS

    for name, cls in sorted(METHODS.items()):
        print(f"{name:13s} {cls.description}")
        print(f"{'':13s} {cls.citation}")
        traits = [t for t, on in (("heterogeneous ranks", cls.heterogeneous_ranks), ("merges into the base", cls.merges_into_base),
                                  ("averages factors", cls.averages_factors), ("personalized", cls.personalized),
                                  ("no global model", not cls.has_global_model), ("no DP", not cls.supports_dp)) if on]
        print(f"{'':13s} [{', '.join(traits) or 'homogeneous ranks only'}]")
        for opt, o in cls.options.items():
            print(f"{'':13s} --method-options {opt}=…  (default {o.default!r}) {o.help}")
    return 0


def cmd_audit(args) -> int:
    from bench.audit import replay

    report = replay(args.run_dir)
    worst = max([max(r["init_rel_err"], r["merge_rel_err"], r["peft_rel_err"]) for r in report["rounds"]] or [0.0])
    for r in report["rounds"]:
        print(f"round {r['round']}: {r['clients']} clients, starting factors rel. err {r['init_rel_err']:.2e}, "
              f"merges rel. err {r['merge_rel_err']:.2e}, |p - recorded p| {r['p_abs_err']:.1e}, "
              f"PEFT folders (scaling, rank, factors) rel. err {r['peft_rel_err']:.2e}")
    ex = report["export_rel_err"]
    print(f"global model - base vs replayed deltas: rel. err {ex['relative']:.2e} over {ex['modules']} modules"
          + (f" ({ex['global_dtype']} on disk)" if "global_dtype" in ex else ""))
    ok = worst <= 1e-5 and ex["relative"] <= 1e-2
    print("audit: " + ("consistent" if ok else "INCONSISTENT"))
    return 0 if ok else 1


def cmd_presets(args) -> int:
    from bench.config import PRESETS_DIR, preset_names

    for name in preset_names():
        first = (PRESETS_DIR / f"{name}.yaml").read_text().splitlines()[0].lstrip("# ")
        print(f"{name:15s} {first}")
    return 0


# Subcommands from other packages, each `add_arguments(parser)` + `main(args)`. Imported when the parser is built;
# an ImportError (a missing extra) turns the command into a one-line error with the install hint.
def _eval():
    from evaluators import cli
    return cli


def _serve():
    from evaluators import serve
    return serve


def _report():
    from reports import cli
    return cli


def _ablate():
    from . import ablate
    return ablate


def _perf():
    from benchmarks import cli
    return cli


SUBCOMMANDS = (("eval", _eval, "score a run's global model or a base model with lm-eval"),
               ("serve", _serve, "serve a run's global model or adapters over vLLM's OpenAI-compatible API"),
               ("report", _report, "regenerate the leaderboard (and --plots) from results/"),
               ("ablate", _ablate, "run a resumable grid of methods × ranks × data heterogeneity × seeds"),
               ("perf", _perf, "measure aggregation speed, memory per client and loop overhead"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench", description="fedlora-bench: federated LoRA aggregation benchmark")
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run a federated fine-tuning experiment (default preset: quick)")
    _add_run_flags(p_run)
    from bench.flower.options import add_flags as add_flower_flags

    add_flower_flags(p_run)
    p_run.set_defaults(func=cmd_run)
    sub.add_parser("methods", help="list registered aggregation methods").set_defaults(func=cmd_methods)
    sub.add_parser("presets", help="list shipped presets").set_defaults(func=cmd_presets)
    p_audit = sub.add_parser("audit", help="re-derive a run (made with --save-client-adapters) from its files alone")
    p_audit.add_argument("run_dir")
    p_audit.set_defaults(func=cmd_audit)
    for name, load, help_text in SUBCOMMANDS:
        p = sub.add_parser(name, help=help_text)
        try:
            mod = load()
        except ImportError as exc:
            p.set_defaults(func=lambda a, exc=exc, name=name: _unavailable(name, exc))
            continue
        mod.add_arguments(p)
        p.set_defaults(func=mod.main)
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _unavailable(name: str, exc: Exception) -> int:
    raise BenchError(f"{name}: this command is unavailable ({exc}); install the extra it needs, e.g. pip install 'fedlora-bench[eval,report]'")
