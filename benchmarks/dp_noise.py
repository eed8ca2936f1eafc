"""How much of DP-SGD's noise reaches the global update ΔW, per method, at equal ε.

For every method that supports DP, two runs of the same setting and seed: one at (ε, δ) (σ calibrated per
client, bench/privacy.py) and its counterfactual with the same clipping and the same Poisson batches but
σ = 0 (no noise: no privacy, which `bench run` refuses; built here on purpose). Everything else being equal,
the difference of their global updates is what the noise did to the model:

    noise_rel = ‖ΔW_dp − ΔW_0‖_F / ‖ΔW_0‖_F     ΔW = global model − base (float64, from the run's checkpoint)

summed over the target modules. Methods without a global model (FedSA-LoRA: the server holds only Ā) are
measured on Ā instead, and say so.

    PYTHONPATH=. python -m benchmarks.dp_noise --seeds 0,1,2 --out benchmarks/results/dp_noise
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _global_delta(run_dir: Path) -> dict[str, torch.Tensor]:
    from bench.checkpoint import checkpoint_dir, read_state
    from bench.server import global_delta

    state, _, _ = read_state(checkpoint_dir(run_dir))
    delta = global_delta(state)
    if not delta:  # no global model: the shared factor the server holds
        delta = {n: a.double() for n, (a, _) in state.state.adapter.items() if a is not None}
    return delta


def _norm(d: dict[str, torch.Tensor]) -> float:
    return float(sum(float((t ** 2).sum()) for t in d.values()) ** 0.5)


def measure(method: str, seed: int, preset: str, epsilon: float, delta: float, work: Path) -> dict:
    from bench.config import build_config
    from bench.engine import run_federated

    cfg = build_config(preset=preset, overrides={"method": method, "seed": seed, "dp_epsilon": epsilon,
                                                 "dp_delta": delta, "results_dir": str(work / "results")})
    quiet = lambda *a, **k: None  # noqa: E731
    out = {}
    for name, c in (("dp", cfg), ("clip_only", dataclasses.replace(cfg, dp_epsilon=None, dp_noise_multiplier=0.0))):
        run_dir = work / f"{method}-s{seed}-{name}"
        rec = run_federated(dataclasses.replace(c, output_dir=str(run_dir)), log=quiet)
        out[name] = (rec, _global_delta(run_dir))
    (rec, d_dp), (_, d_0) = out["dp"], out["clip_only"]
    diff = {n: d_dp[n] - d_0[n] for n in d_0}
    from methods import get_method

    return {"method": method, "seed": seed, "has_global_model": get_method(method).has_global_model,
            "epsilon_spent": rec["privacy"]["epsilon_max"],
            "sigma": sorted({c["noise_multiplier"] for c in rec["privacy"]["clients"]}),
            "delta_w_norm_clip_only": _norm(d_0), "delta_w_norm_dp": _norm(d_dp), "noise_norm": _norm(diff),
            "noise_rel": _norm(diff) / _norm(d_0) if _norm(d_0) > 0 else None,
            "test_loss_dp": rec["test_loss"], "test_loss_clip_only": out["clip_only"][0]["test_loss"]}


def main(argv=None) -> int:
    from methods import METHODS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(sorted(n for n, c in METHODS.items() if c.supports_dp)))
    p.add_argument("--seeds", default="0")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--epsilon", type=float, default=8.0)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--out", default="benchmarks/results/dp_noise")
    args = p.parse_args(argv)
    rows = []
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                rows.append(measure(method, seed, args.preset, args.epsilon, args.delta, Path(tmp)))
                print(json.dumps(rows[-1]), flush=True)
    summary = {}
    for r in rows:
        summary.setdefault(r["method"], []).append(r)
    lines = [f"# DP noise in the global update, {args.preset} preset, ε = {args.epsilon:g}, δ = {args.delta:g} "
             f"(seeds {args.seeds})", "",
             "| method | ‖ΔW_dp − ΔW_0‖ / ‖ΔW_0‖ (mean, min–max) | ‖ΔW_0‖ | ‖ΔW_dp‖ | test loss DP / clip-only |",
             "|---|---|---|---|---|"]
    for method, rs in summary.items():
        rel = [r["noise_rel"] for r in rs]
        note = "" if rs[0]["has_global_model"] else " (Ā: no global model)"
        lines.append(f"| {method}{note} | {np.mean(rel):.3g} ({min(rel):.3g}–{max(rel):.3g}) | "
                     f"{np.mean([r['delta_w_norm_clip_only'] for r in rs]):.3g} | {np.mean([r['delta_w_norm_dp'] for r in rs]):.3g} | "
                     f"{np.mean([r['test_loss_dp'] for r in rs]):.4f} / {np.mean([r['test_loss_clip_only'] for r in rs]):.4f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from bench.provenance import CODE, cpu_model

    meta = {"machine": platform.processor() or platform.machine(), "cpu_model": cpu_model(), "torch": torch.__version__,
            "seconds": round(time.time() - t0, 1), "preset": args.preset, "epsilon": args.epsilon, "delta": args.delta,
            "seeds": args.seeds, **CODE}
    lines += ["", f"Machine: {meta['cpu_model'] or meta['machine']}, torch {meta['torch']}; commit {meta['git_commit'][:12]}"
                  f"{' (dirty)' if meta['git_dirty'] else ' (clean)'}; {meta['seconds']:g} s for every run."]
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
