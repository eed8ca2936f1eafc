"""`bench perf`: aggregation speed, memory per client, engine loop overhead, local training speed and (with CUDA)
GPU throughput.

    bench perf                                   # everything, results/perf/perf.json + perf.md
    bench perf --quick                           # CI-sized
    bench perf --only memory,overhead --model tiny-random-llama --out /tmp/perf
    bench perf --only svd                        # the top-R SVD alone: K = 10, 50, 100 at 4096² and 4096×11008
    bench perf --only training                   # the study preset's local training: float32 padded vs bf16, buckets

Each measure is reported as a ratio against a baseline measured by the same `bench perf` process
(memory: the 1-client run; overhead: a bare peft loop; aggregation: the dense-SVD FlexLoRA path; training: today's
float32 padded local training).
Speed is measured here and never asserted in tests.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

SECTIONS = ("aggregation", "svd", "memory", "overhead", "training", "gpu", "clients", "flower")
SCHEMA = "fedlora-bench/perf/1"


def add_arguments(p) -> None:
    p.add_argument("--quick", action="store_true", help="CI-sized measurements (< 2 min on a 2-core CPU)")
    p.add_argument("--only", default=",".join(SECTIONS), metavar="SECTIONS",
                   help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    p.add_argument("--out", default="results/perf", help="output folder for perf.json and perf.md (default: results/perf)")
    p.add_argument("--model", default="default",
                   help="model for memory and overhead (default: SmolLM2-135M-Instruct; tiny-random-llama for smoke runs)")
    p.add_argument("--method", default="flora", help="aggregation method of the memory and overhead runs (default: flora)")
    p.add_argument("--preset", default="study", help="preset whose local training `training` measures (default: study)")
    p.add_argument("--repeats", type=int, default=None,
                   help="engine/bare pairs in the overhead measure (default: 3, quick: 2); passes over the training variants (default: 3, quick: 1)")
    p.add_argument("--memory-clients", default="1,5,20", metavar="N,N,...",
                   help="client counts of the memory runs; the first is the baseline (default: 1,5,20)")


def _machine() -> dict:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
            "load_avg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def _aggregation(out_dir: str, quick: bool, log) -> dict:
    try:
        from benchmarks import aggregation
    except ImportError as exc:
        return {"status": "missing", "reason": f"benchmarks.aggregation is not available ({exc})"}
    if not hasattr(aggregation, "run"):
        return {"status": "missing", "reason": "benchmarks.aggregation has no run(out_dir, quick)"}
    r = aggregation.run(out_dir, quick=quick)
    summary = []
    for case in r.get("cases", []):
        ms = case.get("ms", {})
        base = ms.get("dense_svd_baseline", {}).get("median_ms")
        flex = ms.get("flexlora", {}).get("median_ms")
        summary.append({"shape": f"{case.get('d_out')}x{case.get('d_in')}", "clients": case.get("clients"),
                        "flexlora_ms": flex, "dense_svd_baseline_ms": base,
                        "ratio": round(flex / base, 5) if flex and base else None})
    # the K = 100 goal, measured apart: dense and ours alternated in this process at one thread
    v = aggregation.run_vs_dense(out_dir, quick=quick, log=log)
    vs_dense = {"shape": f"{v['case']['d_out']}x{v['case']['d_in']}", "clients": v["case"]["clients"],
                "flexlora_ms": v["median"]["flexlora"]["wall_ms"], "dense_ms": v["median"]["dense"]["wall_ms"],
                "speedup_wall": v["speedup_wall"], "speedup_cpu": v["speedup_cpu"], "goal": v["goal"],
                "goal_met": v["goal_met"], "check_passed": v["check"]["passed"],
                "json": os.path.join(out_dir, "flexlora_vs_dense.json")}
    return {"status": "ok", "json": os.path.join(out_dir, "aggregation.json"), "markdown": os.path.join(out_dir, "aggregation.md"),
            "sv_check_passed": r.get("sv_check_passed"), "baseline": "dense ΔW + torch.linalg.svd (public FlexLoRA path)",
            "flexlora_vs_dense": summary, "vs_dense_alternated": vs_dense}


def _svd(out_dir: str, quick: bool, log) -> dict:
    """FlexLoRA's / FLoRIST's top-R SVD: exact factored path and Krylov path against the dense SVD."""
    from benchmarks import aggregation

    shapes = [(512, 512), (512, 1376)] if quick else None
    r = aggregation.run_topr(out_dir, shapes=shapes, repeats=3 if quick else 5, log=log)
    return {"status": "ok", "json": os.path.join(out_dir, "topr_svd.json"), "markdown": os.path.join(out_dir, "topr_svd.md"),
            "passed": r["passed"], "tol": r["tol"],
            "cases": [{"shape": f"{c['d_out']}x{c['d_in']}", "clients": c["clients"], "rank_sum": c["rank_sum"],
                       "dense_ms": c["ms"]["dense"]["median_ms"], "exact_ms": c["ms"]["exact"]["median_ms"],
                       "krylov_ms": c["ms"]["krylov"]["median_ms"], "chosen": c["chosen"], "speedup": c["speedup"],
                       "max_rel_err": c["max_rel_err"]} for c in r["cases"]]}


def main(args) -> int:
    from bench import BenchError

    from . import engine_perf

    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in SECTIONS]
    if unknown or not only:
        raise BenchError(f"only: unknown section {unknown[0] if unknown else '(empty)'!r}; choose from {', '.join(SECTIONS)}")
    if args.repeats is not None and int(args.repeats) < 1:
        raise BenchError(f"repeats: must be ≥ 1, got {args.repeats}")
    try:
        mem_clients = tuple(int(x) for x in str(args.memory_clients).split(",") if x.strip())
    except ValueError:
        mem_clients = ()
    if not mem_clients or min(mem_clients) < 1:
        raise BenchError(f"memory-clients: expected client counts ≥ 1 like 1,5,20, got {args.memory_clients!r}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    result = {"schema": SCHEMA, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "command": "bench perf " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["perf"] else None,
              "quick": bool(args.quick), "only": only, "machine": _machine(), "sections": {}, "seconds": {}}
    for section in SECTIONS:
        if section not in only:
            continue
        t = time.time()
        try:
            if section == "aggregation":
                r = _aggregation(str(out), args.quick, log)
            elif section == "svd":
                r = _svd(str(out), args.quick, log)
            elif section == "memory":
                r = engine_perf.measure_memory(args.model, args.method, clients=mem_clients, log=log)
            elif section == "overhead":
                r = engine_perf.measure_overhead(args.model, args.method, quick=args.quick, repeats=args.repeats, log=log)
            elif section == "training":  # benchmarks/train_perf.py
                from . import train_perf

                r = train_perf.measure_training(args.model, quick=args.quick, repeats=args.repeats, log=log,
                                                preset=args.preset)
            elif section == "clients":  # a round's clients batched vs sequential (benchmarks/clients_perf.py)
                from . import clients_perf

                r = clients_perf.measure_clients(quick=args.quick, log=log)
            elif section == "flower":  # a flower-sim round vs the in-process round (benchmarks/flower_perf.py)
                from .flower_perf import measure as measure_flower

                r = measure_flower(args.model, args.method, quick=args.quick, log=log)
            else:
                r = engine_perf.measure_gpu(quick=args.quick, log=log)
        except BenchError:
            raise
        except Exception as exc:  # one broken section must not hide the others
            r = {"status": "error", "reason": f"{type(exc).__name__}: {str(exc)[:500]}", "traceback": traceback.format_exc()[-2000:]}
            log(f"[perf] {section}: ERROR {r['reason']}")
        result["sections"][section] = r
        result["seconds"][section] = round(time.time() - t, 1)
        _write(out, result)  # after every section, so a long run leaves what it measured
    print(out / "perf.md")
    agg = result["sections"].get("aggregation", {})
    svd = result["sections"].get("svd", {})
    failed = (agg.get("status") == "ok" and agg.get("sv_check_passed") is False) or \
        (agg.get("status") == "ok" and agg.get("vs_dense_alternated", {}).get("check_passed") is False) or \
        (svd.get("status") == "ok" and svd.get("passed") is False)
    return 1 if failed else 0


def _write(out: Path, result: dict) -> None:
    from bench.io import atomic_write_json, atomic_write_text

    atomic_write_json(out / "perf.json", result)
    atomic_write_text(out / "perf.md", to_markdown(result))


def _mb(x) -> str:
    return "–" if x is None else f"{x:,.0f}"


def _fmt(x, spec=".3g") -> str:
    return "–" if x is None else (x if isinstance(x, str) else format(x, spec))


def to_markdown(r: dict) -> str:
    m = r["machine"]
    lines = [f"# bench perf ({'quick' if r['quick'] else 'full'})", "",
             f"{r['created']} · torch {m['torch']} · {m['cpu']} × {m['cpu_count']} cores, {m['torch_threads']} torch threads"
             f" · CUDA: {'yes' if m['cuda'] else 'no'} · load average at start {m['load_avg_at_start']}", "",
             "| measure | value | baseline (same process) | ratio | goal | met |", "|---|---:|---|---:|---|---|"]
    s = r["sections"]
    rows = []
    if "aggregation" in s:
        a = s["aggregation"]
        if a["status"] == "ok":
            for c in a["flexlora_vs_dense"]:
                rows.append(f"| aggregation: FlexLoRA {c['shape']}, {c['clients']} clients | {_fmt(c['flexlora_ms'])} ms "
                            f"| dense SVD {_fmt(c['dense_svd_baseline_ms'])} ms | {_fmt(c['ratio'])} | – | – |")
            rows.append(f"| aggregation: singular values vs dense SVD | {'pass' if a['sv_check_passed'] else 'FAIL'} | – | – | ≤ 1e-5 rel. | "
                        f"{'yes' if a['sv_check_passed'] else 'no'} |")
            v = a.get("vs_dense_alternated")
            if v:
                rows.append(f"| aggregation: FlexLoRA {v['shape']}, {v['clients']} clients, alternated, 1 thread "
                            f"| {_fmt(v['flexlora_ms'])} ms | dense {_fmt(v['dense_ms'])} ms "
                            f"| {v['speedup_wall']:.3g}× (CPU {v['speedup_cpu']:.3g}×) | ≥ {v['goal']:g}×, σ and energy ≤ 1e-6 rel. "
                            f"| {'yes' if v['goal_met'] and v['check_passed'] else 'no'} |")
        else:
            rows.append(f"| aggregation | {a['status']}: {a['reason']} | – | – | – | – |")
    if "svd" in s:
        a = s["svd"]
        if a["status"] == "ok":
            for c in a["cases"]:
                sp = c["speedup"]
                rows.append(f"| top-R SVD {c['shape']}, {c['clients']} clients (Σr {c['rank_sum']}): {c['chosen']} path | "
                            f"{_fmt(c[c['chosen'] + '_ms'])} ms (exact {_fmt(c['exact_ms'])}, Krylov {_fmt(c['krylov_ms'])}) "
                            f"| dense SVD {_fmt(c['dense_ms'])} ms | {sp['chosen']:.0f}× | – | – |")
            rows.append(f"| top-R SVD: top R_max singular values vs dense | {'pass' if a['passed'] else 'FAIL'} | – | – | "
                        f"≤ {a['tol']:g} rel. | {'yes' if a['passed'] else 'no'} |")
        else:
            rows.append(f"| svd | {a['status']}: {a.get('reason')} | – | – | – | – |")
    if "memory" in s:
        a = s["memory"]
        if a["status"] == "ok":
            base = a["runs"][0]
            for run in a["runs"]:
                rows.append(f"| memory: peak RSS, {run['clients']} clients | {_mb(run['peak_rss_mb'])} MiB | "
                            f"{base['clients']} client: {_mb(base['peak_rss_mb'])} MiB | {run['ratio_vs_1_client']:.3f} | "
                            f"{'≤ ' + str(engine_perf_goal('memory')) + '×' if run is a['runs'][-1] else '–'} | "
                            f"{('yes' if a['meets_goal'] else 'no') if run is a['runs'][-1] else '–'} |")
        else:
            rows.append(f"| memory | {a['status']}: {a['reason']} | – | – | – | – |")
    if "overhead" in s:
        a = s["overhead"]
        if a["status"] == "ok":
            rows.append(f"| overhead: engine loop tokens/s (median of {a['repeats']}) | {a['engine_tokens_per_s_median']:.1f} | "
                        f"bare peft loop {a['bare_tokens_per_s_median']:.1f} | {a['ratio']:.3f} | ≥ {engine_perf_goal('overhead')} | "
                        f"{'yes' if a['meets_goal'] else 'no'} |")
            rows.append(f"| overhead: engine train_client only | {a['engine_train_only_tokens_per_s_median']:.1f} | "
                        f"bare peft loop {a['bare_tokens_per_s_median']:.1f} | {a['ratio_train_only']:.3f} | – | – |")
        else:
            rows.append(f"| overhead | {a['status']}: {a['reason']} | – | – | – | – |")
    if "gpu" in s:
        a = s["gpu"]
        if a["status"] == "ok":
            for label, t in a["train"].items():
                if "error" in t:
                    rows.append(f"| gpu: {label} | error: {t['error']} | – | – | – | – |")
                else:
                    rows.append(f"| gpu: {label} {t['dtype']} training tokens/s | {t['tokens_per_s']:,.0f} | "
                                f"peak {_fmt(a['peak_bf16_tflops'])} TFLOP/s | MFU {_fmt(t['mfu'])} | – | – |")
        else:
            rows.append(f"| gpu | {a.get('reason', a['status'])} | – | – | – | – |")
    if "training" in s:
        from .train_perf import markdown_rows as training_rows

        rows += training_rows(s["training"])
    if "clients" in s:
        from .clients_perf import summary_rows

        rows += summary_rows(s["clients"]) if "rounds" in s["clients"] or s["clients"].get("status") != "ok" else []
    if "flower" in s:
        from .flower_perf import markdown_rows

        rows += markdown_rows(s["flower"])
    lines += rows + [""]

    if "memory" in s and s["memory"]["status"] == "ok":
        a = s["memory"]
        b = a["bytes_per_client"]
        lines += [f"## Memory ({a['model']}, method {a['method']}, one fresh subprocess per row)", "",
                  f"Config: {json.dumps(a['config'])}; ranks: {a['ranks']}.", "",
                  "| clients | peak RSS (MiB, kernel, this child) | ratio | RSS after imports (MiB) | RSS end of round (MiB) "
                  "| factors held during the round (bytes) | run wall (s) |", "|---:|---:|---:|---:|---:|---:|---:|"]
        for run in a["runs"]:
            lines.append(f"| {run['clients']} | {_mb(run['peak_rss_mb'])} | {run['ratio_vs_1_client']:.3f} | {_mb(run['rss_after_imports_mb'])} "
                         f"| {_mb(run['rss_end_of_round_mb'])} | {run['updates_held_in_round_bytes']:,} | {run['wall_s']} |")
        lines += ["", "Bytes per client (LoRA factors, float32; formula: " + b["factors_formula"] + "; "
                  f"equal to the engine's bytes_up: {'yes' if b['factors_match_engine_bytes_up'] else 'NO'}):", "",
                  "| rank | bytes |", "|---:|---:|"]
        lines += [f"| {rk} | {v:,} |" for rk, v in b["factors_by_rank"].items()]
        lines += ["", f"Between rounds a client holds no tensors ({b['held_between_rounds_note']}): "
                  f"{b['tokenised_examples']} examples, {b['tokenised_tokens']:,} tokens = {b['tokenised_examples_python_bytes']:,} bytes "
                  f"as Python lists ({b['tokenised_as_int32_tensors_bytes']:,} bytes as int32 tensors).", ""]
    if "overhead" in s and s["overhead"]["status"] == "ok":
        a = s["overhead"]
        lines += [f"## Loop overhead ({a['model']}, method {a['method']})", "",
                  f"Config: {json.dumps(a['config'])}; {a['steps_per_run']} optimizer steps, {a['tokens_per_run']:,} tokens per run "
                  f"(same batches in both: {'yes' if a['same_tokens_and_steps'] else 'NO'}). {a['definition']}.", "",
                  "| pair | engine tokens/s | engine train-only tokens/s | bare tokens/s | ratio |", "|---:|---:|---:|---:|---:|"]
        for i, (e, bare) in enumerate(zip(a["engine_runs"], a["bare_runs"])):
            lines.append(f"| {i + 1} | {e['tokens_per_s']:.1f} | {e['train_tokens_per_s']:.1f} | {bare['tokens_per_s']:.1f} | {a['pair_ratios'][i]:.3f} |")
        lines.append("")
    if "training" in s:
        from .train_perf import markdown_section

        lines += markdown_section(s["training"])
    if "gpu" in s and s["gpu"]["status"] == "ok":
        a = s["gpu"]
        lines += [f"## GPU: {a['device']}", "", f"MFU convention: {a['mfu_convention']}.", "",
                  "| model | params | batch × seq | tokens/s | model TFLOP/s | MFU | max GPU memory (GB) |", "|---|---:|---|---:|---:|---:|---:|"]
        for label, t in a["train"].items():
            if "error" not in t:
                lines.append(f"| {label} | {t['params']:,} | {t['batch_size']} × {t['seq_len']} | {t['tokens_per_s']:,.0f} | "
                             f"{t['model_tflops']} | {_fmt(t['mfu'])} | {_fmt(t.get('max_memory_allocated_gb'))} |")
        lines += ["", f"Aggregation on the GPU ({a['aggregation_dtype']}, 10 clients, ranks 64…4), median ms:", "",
                  "| shape | " + " | ".join(next(iter(a["aggregation_ms"].values())).keys()) + " |",
                  "|---|" + "---:|" * len(next(iter(a["aggregation_ms"].values())))]
        for shape, row in a["aggregation_ms"].items():
            lines.append(f"| {shape} | " + " | ".join(_fmt(v) for v in row.values()) + " |")
        lines.append("")
    elif "gpu" in s:
        lines += ["## GPU", "", s["gpu"].get("reason", s["gpu"]["status"]), ""]
    if "clients" in s and s["clients"].get("status") == "ok":
        from .clients_perf import markdown

        lines += markdown(s["clients"])
    if "aggregation" in s and s["aggregation"]["status"] == "ok":
        lines += ["## Aggregation", "", f"Details: {s['aggregation']['markdown']}", ""]
    if "svd" in s and s["svd"]["status"] == "ok":
        lines += ["## Top-R SVD", "", f"Details: {s['svd']['markdown']}", ""]
    lines.append("Seconds per section: " + ", ".join(f"{k} {v}" for k, v in r["seconds"].items()))
    return "\n".join(lines) + "\n"


def engine_perf_goal(section: str):
    from . import engine_perf

    return engine_perf.MEMORY_GOAL if section == "memory" else engine_perf.OVERHEAD_GOAL
