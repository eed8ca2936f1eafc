"""Aggregation cost per method at Llama-7B LoRA shapes, against the dense-SVD FlexLoRA baseline.

    python -m benchmarks.aggregation --out runs/perf            # full (~4-5 min on a 2-core CPU)
    python -m benchmarks.aggregation --out runs/perf --quick    # CI smoke (~10-20 s)

Writes <out>/aggregation.json and <out>/aggregation.md; `run(out_dir, quick)` returns the JSON dict.

What is measured (float64 throughout, so that the singular values can be checked to 1e-5):
- each method's `aggregate()` on one module (the real code in methods/, not a sketch);
- FLoRA separately: the stacking (its aggregate) and the merge W += B_s A_s that the engine does;
- the public FlexLoRA code path as baseline: ΔW = Σ p_k s_k B_k A_k formed densely,
  torch.linalg.svd(ΔW), truncation to each client's rank;
- the dense formation of ΔW alone (reference for the other methods);
- our singular values vs the dense ones (max relative error, must be ≤ 1e-5) and ‖B'A' − ΔW‖/‖ΔW‖.
Timings: default torch threads, one warm-up then the median of a few repeats (the dense SVD, which
takes seconds, only once or twice; its LAPACK path is warmed up on a small matrix first).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable

import torch

from methods import ClientUpdate, GlobalState, client_weights, get_method

METHODS = ["fedavg-lora", "fedit", "flora", "flexlora"]
RANKS_10 = [64, 32, 16, 16, 8, 8, 4, 4, 4, 4]
ALPHA = 16.0
DTYPE = torch.float64
SV_TOL = 1e-5

# Llama-7B LoRA targets: (label, d_out, d_in, modules of this shape per layer)
LLAMA7B_SHAPES = [("q/k/v/o", 4096, 4096, 4), ("gate/up", 11008, 4096, 2), ("down", 4096, 11008, 1)]
LLAMA7B_LAYERS = 32

FULL = dict(shapes=[(d_out, d_in) for _, d_out, d_in, _ in LLAMA7B_SHAPES], client_counts=(10, 100),
            clients_curve=(2, 5, 10, 20, 50, 100), clients_curve_d=4096, d_curve=(512, 1024, 2048, 4096),
            repeats=7, dense_repeats={(4096, 4096, 10): 2}, dense_repeats_default=1)
# 1/8 of the Llama-7B shapes, same aspect ratio
QUICK = dict(shapes=[(512, 512), (1376, 512), (512, 1376)], client_counts=(10,),
             clients_curve=(2, 5, 10, 20), clients_curve_d=512, d_curve=(256, 512),
             repeats=5, dense_repeats={}, dense_repeats_default=1)


def ranks_for(k: int) -> list[int]:
    return [RANKS_10[i % len(RANKS_10)] for i in range(k)]


def make_updates(d_out: int, d_in: int, ranks: list[int], seed: int = 0) -> list[ClientUpdate]:
    g = torch.Generator().manual_seed(seed)
    ups = []
    for k, r in enumerate(ranks):
        a = torch.randn(r, d_in, generator=g, dtype=DTYPE) / d_in ** 0.5
        b = torch.randn(d_out, r, generator=g, dtype=DTYPE) / r ** 0.5
        n = int(torch.randint(20, 200, (1,), generator=g))
        ups.append(ClientUpdate(k, r, ALPHA / r, n, {"m": (a, b)}))
    return ups


def timeit(fn: Callable[[], object], repeats: int, warmup: int = 1, slow_ms: float = 1000.0) -> dict:
    """Median of `repeats` after `warmup` runs; if the warm-up took over slow_ms, only 3 repeats."""
    for _ in range(warmup):
        t0 = time.perf_counter()
        fn()
        if (time.perf_counter() - t0) * 1e3 > slow_ms:
            repeats = min(repeats, 3)
    times, cpu = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    # cpu_over_wall ≈ torch threads when the cores are ours alone; ≈ 1 or less when shared
    return {"median_ms": statistics.median(times), "min_ms": min(times), "repeats": repeats, "all_ms": times,
            "cpu_over_wall": sum(cpu) / max(sum(times), 1e-9), "median_cpu_ms": statistics.median(cpu)}


def dense_delta(updates: list[ClientUpdate]) -> torch.Tensor:
    a0, b0 = updates[0].factors["m"]
    dw = torch.zeros(b0.shape[0], a0.shape[1], dtype=a0.dtype, device=a0.device)
    for u, p in zip(updates, client_weights(updates)):
        a, b = u.factors["m"]
        dw.addmm_(b, a, alpha=p * u.scaling)
    return dw


def dense_flexlora(updates: list[ClientUpdate]):
    """The public FlexLoRA code path: dense ΔW, full SVD, truncate per client rank."""
    dw = dense_delta(updates)
    u, s, vh = torch.linalg.svd(dw, full_matrices=False)
    out = {}
    for r in sorted({x.rank for x in updates}):
        out[r] = (s[:r, None].sqrt() * vh[:r], u[:, :r] * s[:r].sqrt())
    return s, out, dw


def merge_into_base(w: torch.Tensor, merge_pair) -> None:
    a_s, b_s = merge_pair
    w.addmm_(b_s, a_s)


def method_times(updates: list[ClientUpdate], repeats: int, d_out: int, d_in: int) -> tuple[dict, dict]:
    ms, outputs = {}, {}
    for name in METHODS:
        m = get_method(name)
        t = timeit(lambda: m.aggregate(updates, GlobalState()), repeats)
        ms[name] = t
        outputs[name] = m.aggregate(updates, GlobalState())
    w = torch.zeros(d_out, d_in, dtype=DTYPE)
    ms["flora_merge"] = timeit(lambda: merge_into_base(w, outputs["flora"].merge["m"]), repeats)
    return ms, outputs


def sv_check(flex_out, s_dense: torch.Tensor, dw: torch.Tensor) -> dict:
    """Our singular values against the dense ones. Only the SVD-ordered part of the state counts (all of it on
    the exact path; the top R_max on the top-R path, whose state continues with the factored remainder); the
    dense tail beyond it must vanish only when the ordered part is the whole rank."""
    a, b = flex_out.state.adapter["m"]
    q = int(flex_out.state.extra["ordered"]) if "ordered" in flex_out.state.extra else a.shape[0]
    s_ours = torch.linalg.vector_norm(b[:, :q], dim=0) * torch.linalg.vector_norm(a[:q], dim=1)  # B'=U√S, A'=√S Vᵀ
    ref = s_dense[:q]
    diff = (s_ours - ref).abs()
    per_value = float((diff / ref.clamp_min(torch.finfo(DTYPE).tiny)).max())
    whole = q == a.shape[0]
    tail = float(s_dense[q:].max()) / float(s_dense[0]) if s_dense.numel() > q and whole else 0.0
    recon = float(torch.linalg.matrix_norm(b @ a - dw) / torch.linalg.matrix_norm(dw))
    return {"q": q, "max_rel_err": per_value, "max_err_over_sigma_max": float(diff.max() / ref[0]),
            "dense_tail_over_sigma_max": tail, "reconstruction_rel_err": recon, "tol": SV_TOL,
            "passed": bool(per_value <= SV_TOL and recon <= SV_TOL and tail <= SV_TOL)}


def machine_info() -> dict:
    from bench.provenance import cpu_model

    info = {"cpu": cpu_model() or platform.processor() or "", "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "dtype": str(DTYPE).replace("torch.", "")}
    try:
        info["loadavg_start"] = list(os.getloadavg())
    except OSError:
        pass
    return info


def _case(d_out: int, d_in: int, k: int, repeats: int, dense_repeats: int, log) -> dict:
    """One shape × client count: every method, the dense baseline, the singular-value check."""
    ranks = ranks_for(k)
    ups = make_updates(d_out, d_in, ranks, seed=d_out * 7 + d_in * 13 + k)
    ms, outs = method_times(ups, repeats, d_out, d_in)
    ms["dense_delta"] = timeit(lambda: dense_delta(ups), max(1, min(repeats, 3)), warmup=0)
    res = {}
    ms["dense_svd_baseline"] = timeit(lambda: res.update(out=dense_flexlora(ups)), dense_repeats, warmup=0)
    s_dense, _, dw = res["out"]
    check = sv_check(outs["flexlora"], s_dense, dw)
    case = {"d_out": d_out, "d_in": d_in, "clients": k, "rank_sum": sum(ranks), "max_rank": max(ranks),
            "ms": ms, "flexlora_speedup": ms["dense_svd_baseline"]["median_ms"] / ms["flexlora"]["median_ms"],
            "flexlora_speedup_min": ms["dense_svd_baseline"]["min_ms"] / ms["flexlora"]["min_ms"],
            "sv_check": check}
    log(f"  {d_out}x{d_in} K={k}: flexlora {ms['flexlora']['median_ms']:.1f} ms vs dense "
        f"{ms['dense_svd_baseline']['median_ms']:.0f} ms ({case['flexlora_speedup']:.0f}x), "
        f"sv err {check['max_rel_err']:.1e}")
    return case


def threads_probe(threads: list[int]) -> dict:
    """Small ops (those the factored path is made of) at each thread count: on a CPU shared with other
    processes, MKL/OpenMP with as many threads as cores can be 10-100× slower than one thread."""
    g = torch.Generator().manual_seed(0)
    b = torch.randn(4096, 160, generator=g, dtype=DTYPE)
    a = torch.randn(160, 4096, generator=g, dtype=DTYPE)
    core = torch.randn(160, 160, generator=g, dtype=DTYPE)
    before = torch.get_num_threads()
    out = {}
    try:
        for t in threads:
            torch.set_num_threads(t)
            out[str(t)] = {
                "qr_4096x160_ms": timeit(lambda: torch.linalg.qr(b), 3)["min_ms"],
                "svd_160x160_ms": timeit(lambda: torch.linalg.svd(core, full_matrices=False), 3)["min_ms"],
                "matmul_4096x160x4096_ms": timeit(lambda: b @ a, 3)["min_ms"],
            }
    finally:
        torch.set_num_threads(before)
    return out


def run(out_dir: str, quick: bool = False, *, threads: int | None = None, shapes=None, client_counts=None,
        clients_curve=None, clients_curve_d=None, d_curve=None, log=None) -> dict:
    """Run the benchmark; write <out_dir>/aggregation.json and .md; return the JSON dict.

    threads: torch threads for the run (None: the machine default, torch.get_num_threads()); restored after.
    The other keyword-only overrides exist for the smoke test (tiny shapes); `bench perf` uses the defaults.
    """
    default_threads = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        return _run(out_dir, quick, default_threads, shapes, client_counts, clients_curve, clients_curve_d,
                    d_curve, log)
    finally:
        torch.set_num_threads(default_threads)


def _run(out_dir, quick, default_threads, shapes, client_counts, clients_curve, clients_curve_d, d_curve, log):
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    cfg = dict(QUICK if quick else FULL)
    for key, val in [("shapes", shapes), ("client_counts", client_counts), ("clients_curve", clients_curve),
                     ("clients_curve_d", clients_curve_d), ("d_curve", d_curve)]:
        if val is not None:
            cfg[key] = val
    t_start = time.perf_counter()
    info = machine_info()
    info["default_threads"] = default_threads
    info["threads_probe"] = threads_probe(sorted({1, default_threads})) if not quick else {}
    torch.linalg.svd(torch.randn(256, 256, dtype=DTYPE))  # warm up LAPACK before any dense timing
    repeats = cfg["repeats"]

    def dense_reps(d_out, d_in, k):
        return cfg["dense_repeats"].get((d_out, d_in, k), cfg["dense_repeats_default"])

    log(f"aggregation benchmark ({'quick' if quick else 'full'}), {info['torch_threads']} threads, {info['cpu']}")
    cases = []
    for (d_out, d_in) in cfg["shapes"]:
        for k in cfg["client_counts"]:
            cases.append(_case(d_out, d_in, k, repeats, dense_reps(d_out, d_in, k), log))

    log("  scaling with the number of clients")
    d = cfg["clients_curve_d"]
    curve_k = []
    for k in cfg["clients_curve"]:
        ranks = ranks_for(k)
        ups = make_updates(d, d, ranks, seed=1000 + k)
        ms, _ = method_times(ups, max(1, repeats - 2), d, d)
        ms["dense_delta"] = timeit(lambda: dense_delta(ups), 1, warmup=0)
        curve_k.append({"d": d, "clients": k, "rank_sum": sum(ranks), "ms": ms})

    log("  scaling with d (square, 10 clients)")
    curve_d = []
    for dd in cfg["d_curve"]:
        main = next((c for c in cases if c["d_out"] == dd and c["d_in"] == dd and c["clients"] == 10), None)
        if main is not None:  # already measured above: reuse, do not pay the dense SVD twice
            curve_d.append({"d": dd, "clients": 10, "rank_sum": main["rank_sum"], "ms": main["ms"],
                            "flexlora_speedup": main["flexlora_speedup"],
                            "flexlora_speedup_min": main["flexlora_speedup_min"], "sv_check": main["sv_check"],
                            "from": "main table"})
            continue
        c = _case(dd, dd, 10, max(1, repeats - 2), 2 if dd <= 2048 else 1, log)
        curve_d.append({"d": dd, "clients": 10, "rank_sum": c["rank_sum"], "ms": c["ms"],
                        "flexlora_speedup": c["flexlora_speedup"], "flexlora_speedup_min": c["flexlora_speedup_min"],
                        "sv_check": c["sv_check"]})

    try:
        info["loadavg_end"] = list(os.getloadavg())
    except OSError:
        pass
    all_checks = [c["sv_check"]["passed"] for c in cases] + [c["sv_check"]["passed"] for c in curve_d]
    result = {
        "schema": "fedlora-bench/perf/aggregation/1",
        "quick": quick,
        "machine": info,
        "config": {"dtype": info["dtype"], "ranks_10": RANKS_10, "alpha": ALPHA, "scaling": "alpha/r",
                   "repeats": repeats, "statistic": "median after 1 warm-up (dense SVD: no warm-up, 1-2 runs)",
                   "shapes": [list(s) for s in cfg["shapes"]], "client_counts": list(cfg["client_counts"])},
        "methods": METHODS,
        "cases": cases,
        "scaling_clients": curve_k,
        "scaling_d": curve_d,
        "sv_check_passed": all(all_checks),
        "total_s": time.perf_counter() - t_start,
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "aggregation.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(out_dir, "aggregation.md"), "w") as f:
        f.write(to_markdown(result))
    log(f"  done in {result['total_s']:.0f} s; sv check {'passed' if result['sv_check_passed'] else 'FAILED'}")
    return result


def _ms(x: dict, key: str) -> str:
    v = x["ms"][key]["median_ms"]
    return f"{v:.3g}" if v < 100 else f"{v:,.0f}"


def to_markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        f"# Aggregation benchmark ({'quick' if r['quick'] else 'full'})",
        "",
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']} with {m['torch_threads']} threads, "
        f"(machine default {m.get('default_threads')}), Python {m['python']}; {m['dtype']}; load average at start {m.get('loadavg_start')}, "
        f"end {m.get('loadavg_end')}. Total {r['total_s']:.0f} s.",
        "",
        "Median ms per module per round (one warm-up, then the median; the dense SVD baseline: "
        "the number of runs in parentheses). Ranks cycle " + ", ".join(map(str, r["config"]["ranks_10"])) + ". "
        "Speed-up = dense-SVD FlexLoRA / ours, from medians and from minima. CPU/wall = process CPU time over "
        "wall time during the dense SVD: ≈ the thread count when the cores were ours alone, lower when shared.",
        "",
        "| d_out×d_in | K | Σr | FedAvg-LoRA | FedIT | FLoRA stack | FLoRA W+=B_sA_s | FlexLoRA (ours) "
        "| dense ΔW only | dense-SVD FlexLoRA | speed-up (median / min) | σ max rel err | ‖B'A'−ΔW‖/‖ΔW‖ | CPU/wall |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in r["cases"]:
        sv = c["sv_check"]
        lines.append(
            f"| {c['d_out']}×{c['d_in']} | {c['clients']} | {c['rank_sum']} | {_ms(c, 'fedavg-lora')} | {_ms(c, 'fedit')} "
            f"| {_ms(c, 'flora')} | {_ms(c, 'flora_merge')} | {_ms(c, 'flexlora')} | {_ms(c, 'dense_delta')} "
            f"| {_ms(c, 'dense_svd_baseline')} ({c['ms']['dense_svd_baseline']['repeats']}) "
            f"| **{c['flexlora_speedup']:.0f}×** / {c['flexlora_speedup_min']:.0f}× | {sv['max_rel_err']:.1e} "
            f"| {sv['reconstruction_rel_err']:.1e} | {c['ms']['dense_svd_baseline']['cpu_over_wall']:.2f} |")
    lines += ["", f"Singular values equal to {SV_TOL:g} relative everywhere: "
              f"**{'yes' if r['sv_check_passed'] else 'NO'}**.", ""]
    d = r["scaling_clients"][0]["d"] if r["scaling_clients"] else 0
    lines += [f"## Time vs number of clients ({d}×{d}, ms)", "",
              "| K | Σr | FedAvg-LoRA | FLoRA stack | FLoRA W+=B_sA_s | FlexLoRA (ours) | dense ΔW only |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    for c in r["scaling_clients"]:
        lines.append(f"| {c['clients']} | {c['rank_sum']} | {_ms(c, 'fedavg-lora')} | {_ms(c, 'flora')} "
                     f"| {_ms(c, 'flora_merge')} | {_ms(c, 'flexlora')} | {_ms(c, 'dense_delta')} |")
    lines += ["", "## Time vs d (d×d, 10 clients, ms)", "",
              "| d | FedAvg-LoRA | FLoRA stack | FLoRA W+=B_sA_s | FlexLoRA (ours) | dense-SVD FlexLoRA | speed-up (median / min) |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    for c in r["scaling_d"]:
        lines.append(f"| {c['d']} | {_ms(c, 'fedavg-lora')} | {_ms(c, 'flora')} | {_ms(c, 'flora_merge')} "
                     f"| {_ms(c, 'flexlora')} | {_ms(c, 'dense_svd_baseline')} | {c['flexlora_speedup']:.0f}× "
                     f"/ {c['flexlora_speedup_min']:.0f}× |")
    probe = r["machine"].get("threads_probe") or {}
    if probe:
        lines += ["", "## Threads probe (min ms; the building blocks of the factored path)", "",
                  "| threads | QR 4096×160 | SVD 160×160 | matmul 4096×160×4096 |", "|---:|---:|---:|---:|"]
        for t, v in probe.items():
            lines.append(f"| {t} | {v['qr_4096x160_ms']:.3g} | {v['svd_160x160_ms']:.3g} | {v['matmul_4096x160x4096_ms']:.3g} |")
    return "\n".join(lines) + "\n"


# ---- top-R SVD at scale: FlexLoRA's (and FLoRIST's) SVD through the factors, both paths vs the dense SVD ----
TOPR_SHAPES = [(4096, 4096), (4096, 11008)]
TOPR_CLIENTS = (10, 50, 100)
TOPR_TOL = 1e-6  # the top R_max singular values must equal the dense ones to this, relative


def topr_case(d_out: int, d_in: int, k: int, repeats: int, log) -> dict:
    """One shape × client count: the top R_max = max rank singular values of ΔW by the dense pipeline (form ΔW,
    torch.linalg.svd: the public FlexLoRA code), by the exact factored path and by the Krylov path; which path
    top_svd chooses; FlexLoRA's whole aggregate (top-R SVD, remainder, energy); the energy alone."""
    from methods.factors import gram_energy, krylov_pays, stack, top_svd

    ranks = ranks_for(k)
    r_max = max(ranks)
    ups = make_updates(d_out, d_in, ranks, seed=d_out * 7 + d_in * 13 + k)
    a_s, b_s = stack(ups, client_weights(ups), "m")
    ms, res, info = {}, {}, {}
    ms["dense"] = timeit(lambda: res.update(dense=dense_flexlora(ups)[0]), 1, warmup=0)
    ms["exact"] = timeit(lambda: res.update(exact=top_svd(b_s, a_s, r_max, path="exact")[1]), repeats)
    ms["krylov"] = timeit(lambda: res.update(krylov=top_svd(b_s, a_s, r_max, path="krylov", info=info)[1]), repeats)
    flex = get_method("flexlora")
    ms["flexlora"] = timeit(lambda: flex.aggregate(ups, GlobalState()), max(1, repeats - 2))
    ms["energy"] = timeit(lambda: gram_energy(b_s, a_s), max(1, repeats - 2))
    ref = res["dense"][:r_max]
    err = {p: float(((res[p] - ref).abs() / ref).max()) for p in ("exact", "krylov")}
    chosen = "krylov" if krylov_pays(b_s.shape[1], r_max) else "exact"
    dense = ms["dense"]["median_ms"]
    case = {"d_out": d_out, "d_in": d_in, "clients": k, "rank_sum": sum(ranks), "r_max": r_max, "ms": ms,
            "max_rel_err": err, "krylov": dict(info), "chosen": chosen,
            "speedup": {p: dense / ms[p]["median_ms"] for p in ("exact", "krylov", "flexlora")},
            # process CPU time: with one thread, the work done, whatever else the machine runs
            "speedup_cpu": {p: ms["dense"]["median_cpu_ms"] / max(ms[p]["median_cpu_ms"], 1e-9)
                            for p in ("exact", "krylov", "flexlora")},
            "passed": all(e <= TOPR_TOL for e in err.values())}
    case["speedup"]["chosen"] = case["speedup"][chosen]
    case["speedup_cpu"]["chosen"] = case["speedup_cpu"][chosen]
    log(f"  {d_out}x{d_in} K={k}: dense {dense:,.0f} ms | exact {ms['exact']['median_ms']:,.1f} ms "
        f"({case['speedup']['exact']:.0f}x, err {err['exact']:.1e}) | krylov {ms['krylov']['median_ms']:,.1f} ms "
        f"({case['speedup']['krylov']:.0f}x, err {err['krylov']:.1e}, "
        f"{'fell back to exact' if info.get('fallback') else str(info.get('steps')) + ' steps'}) | chosen {chosen}")
    return case


def run_topr(out_dir: str, *, shapes=None, client_counts=None, repeats: int = 5, threads: int | None = None,
             log=None) -> dict:
    """The top-R SVD comparison; writes <out_dir>/topr_svd.json and .md and returns the JSON dict."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    default_threads = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        t0 = time.perf_counter()
        info = machine_info()
        info["default_threads"] = default_threads
        torch.linalg.svd(torch.randn(256, 256, dtype=DTYPE))  # warm up LAPACK before the dense timings
        log(f"top-R SVD benchmark, {info['torch_threads']} threads, load {info.get('loadavg_start')}")
        cases = [topr_case(d_out, d_in, k, repeats, log) for d_out, d_in in (shapes or TOPR_SHAPES)
                 for k in (client_counts or TOPR_CLIENTS)]
        try:
            info["loadavg_end"] = list(os.getloadavg())
        except OSError:
            pass
        result = {"schema": "fedlora-bench/perf/topr/1", "machine": info, "tol": TOPR_TOL, "cases": cases,
                  "passed": all(c["passed"] for c in cases), "total_s": time.perf_counter() - t0}
    finally:
        torch.set_num_threads(default_threads)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "topr_svd.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(out_dir, "topr_svd.md"), "w") as f:
        f.write(topr_markdown(result))
    return result


def topr_markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        "# Top-R SVD through the factors vs the dense SVD", "",
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']} with {m['torch_threads']} threads; "
        f"{m['dtype']}; load average at start {m.get('loadavg_start')}, end {m.get('loadavg_end')}. Total {r['total_s']:.0f} s.",
        "",
        "R_max = 64 (ranks cycle 64, 32, 16, 16, 8, 8, 4, 4, 4, 4). Median ms per module (dense: one run, "
        "ΔW formed then torch.linalg.svd, the public FlexLoRA path). exact: factored_svd (bases of B_s and A_sᵀ, "
        "core SVD), top R kept. krylov: block Krylov applying B_s(A_s x), linear in Σr. chosen: what top_svd "
        "takes by default. FlexLoRA: its whole aggregate (top-R SVD, factored remainder, the energy ‖ΔW‖² for the "
        f"truncation loss). Errors: max relative error of the top R_max singular values vs the dense SVD (goal ≤ {r['tol']:g}).",
        "",
        "| d_out×d_in | K | Σr | dense | exact | krylov (steps) | chosen | speed-up exact / krylov / chosen | "
        "same, in CPU time | err exact | err krylov | FlexLoRA aggregate (speed-up) | energy ‖ΔW‖² |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in r["cases"]:
        ms, sp = c["ms"], c["speedup"]
        lines.append(
            f"| {c['d_out']}×{c['d_in']} | {c['clients']} | {c['rank_sum']} | {ms['dense']['median_ms']:,.0f} "
            f"| {ms['exact']['median_ms']:,.1f} | {ms['krylov']['median_ms']:,.1f} "
            f"({'fell back to exact' if c['krylov'].get('fallback') else c['krylov'].get('steps', '–')}) "
            f"| {c['chosen']} | {sp['exact']:.0f}× / {sp['krylov']:.0f}× / **{sp['chosen']:.0f}×** "
            f"| {c['speedup_cpu']['exact']:.0f}× / {c['speedup_cpu']['krylov']:.0f}× / {c['speedup_cpu']['chosen']:.0f}× "
            f"| {c['max_rel_err']['exact']:.1e} | {c['max_rel_err']['krylov']:.1e} "
            f"| {ms['flexlora']['median_ms']:,.1f} ({sp['flexlora']:.0f}×) | {ms['energy']['median_ms']:,.1f} |")
    lines += ["", f"Top R_max singular values equal to {r['tol']:g} relative everywhere: **{'yes' if r['passed'] else 'NO'}**.", ""]
    return "\n".join(lines)


# ---- FlexLoRA's whole aggregate vs the dense path, alternated in one process ----
VS_DENSE = dict(d_out=4096, d_in=4096, clients=100)
# Σr = 960 < the widths and ≥ 5 × the block, the Gram iteration converging inside its basis cap: the path K = 100
# takes at 4096² (a stack as wide as the layer, the old 640×512 at K = 40, takes the dense SVD)
VS_DENSE_QUICK = dict(d_out=1024, d_in=1024, clients=60)
VS_DENSE_GOAL = 100.0  # speed-up over the dense path that FlexLoRA's aggregate at K = 100 should reach


def _commit() -> dict:
    """The repository's commit and whether its tracked files differ from it (a record names what it measured)."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "clean": None}
    return {"commit": head, "clean": not dirty}


def _timed(fn: Callable[[], object]) -> tuple[object, float, float]:
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3


def run_vs_dense(out_dir: str, *, quick: bool = False, repeats: int = 3, threads: int | None = 1, shape=None,
                 log=None) -> dict:
    """FlexLoRA's whole aggregate (methods/flexlora.py: stack, top-R SVD through the factors' Grams, remainder,
    energy) against the dense path (ΔW formed, full SVD, truncation per rank: the public FlexLoRA code), in one
    process at `threads` torch threads (default 1: on a shared machine the process CPU time is then the work done,
    whatever else runs). One warm-up of each (whose outputs are checked), then `repeats` rounds alternating dense
    and ours; medians of wall and CPU time. Checks: the top R_max singular values vs the dense SVD's (≤ TOPR_TOL
    relative), the recorded energy ‖ΔW‖_F² vs Σσ² of the dense SVD (≤ TOPR_TOL relative), ‖B'A' − ΔW‖/‖ΔW‖.
    Writes <out_dir>/flexlora_vs_dense.json and .md; returns the JSON dict."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    cfg = dict(shape or (VS_DENSE_QUICK if quick else VS_DENSE))
    default_threads = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        info = machine_info()
        info["default_threads"] = default_threads
        info.update(_commit())
        ranks = ranks_for(cfg["clients"])
        r_max = max(ranks)
        ups = make_updates(cfg["d_out"], cfg["d_in"], ranks, seed=cfg["d_out"] * 7 + cfg["d_in"] * 13 + cfg["clients"])
        flex = get_method("flexlora")
        log(f"FlexLoRA vs dense, {cfg['d_out']}x{cfg['d_in']}, K={cfg['clients']}, {info['torch_threads']} threads, "
            f"load {info.get('loadavg_start')}")
        ours_out, _, _ = _timed(lambda: flex.aggregate(ups, GlobalState()))          # warm-ups, checked below
        dense_out, _, _ = _timed(lambda: dense_flexlora(ups))
        runs = {"dense": [], "flexlora": []}
        for rep in range(repeats):
            for name, fn in (("dense", lambda: dense_flexlora(ups)), ("flexlora", lambda: flex.aggregate(ups, GlobalState()))):
                _, wall, cpu = _timed(fn)
                runs[name].append({"wall_ms": wall, "cpu_ms": cpu})
            log(f"  round {rep + 1}: dense {runs['dense'][-1]['cpu_ms']:,.0f} ms CPU, "
                f"flexlora {runs['flexlora'][-1]['cpu_ms']:,.1f} ms CPU")
        # the floor: ‖ΔW‖² exactly needs both m×m Grams, (d_out + d_in) m² flops at best (symmetric halves), at
        # this machine's float32 matmul rate on the same shape (min of 3 full Grams x xᵀ, this process, now)
        m = sum(ranks)
        x = torch.randn(m, cfg["d_in"], generator=torch.Generator().manual_seed(1), dtype=torch.float32)
        gram_ms = min(_timed(lambda: x @ x.mT)[2] for _ in range(4))
        del x
        rate = 2 * m * m * cfg["d_in"] / (gram_ms * 1e6)
        floor_ms = (cfg["d_out"] + cfg["d_in"]) * m * m / (rate * 1e6)
        phases, design = _phases_and_design_floor(ups, r_max) if _path(cfg, ranks) == "krylov" else (None, None)
        try:
            info["loadavg_end"] = list(os.getloadavg())
        except OSError:
            pass
    finally:
        torch.set_num_threads(default_threads)
    s_dense, _, dw = dense_out
    a, b = ours_out.state.adapter["m"]
    q = int(ours_out.state.extra["ordered"])
    s_ours = torch.linalg.vector_norm(b[:, :q], dim=0) * torch.linalg.vector_norm(a[:q], dim=1)
    energy_ref = float((s_dense.double() ** 2).sum())
    energy = float(ours_out.state.extra["energy/m"])
    med = {name: {key: statistics.median(x[key] for x in v) for key in ("wall_ms", "cpu_ms")} for name, v in runs.items()}
    check = {"ordered": q, "r_max": r_max,
             "sv_max_rel_err": float(((s_ours[:r_max] - s_dense[:r_max]).abs() / s_dense[:r_max]).max()),
             "energy_rel_err": abs(energy - energy_ref) / energy_ref,
             "reconstruction_rel_err": float(torch.linalg.matrix_norm(b @ a - dw) / torch.linalg.matrix_norm(dw))}
    check["passed"] = bool(q >= r_max and check["sv_max_rel_err"] <= TOPR_TOL and check["energy_rel_err"] <= TOPR_TOL
                           and check["reconstruction_rel_err"] <= TOPR_TOL)
    result = {"schema": "fedlora-bench/perf/flexlora-vs-dense/1", "quick": quick, "machine": info,
              "case": {**cfg, "rank_sum": sum(ranks), "r_max": r_max, "dtype": info["dtype"], "path": _path(cfg, ranks)},
              "statistic": f"one warm-up each, then {repeats} rounds alternating dense and ours; medians",
              "runs": runs, "median": med,
              "speedup_wall": med["dense"]["wall_ms"] / med["flexlora"]["wall_ms"],
              "speedup_cpu": med["dense"]["cpu_ms"] / med["flexlora"]["cpu_ms"],
              "goal": VS_DENSE_GOAL, "tol": TOPR_TOL, "check": check,
              "gram_floor": {"float32_gflops_cpu": rate, "half_grams_gflop": (cfg["d_out"] + cfg["d_in"]) * m * m / 1e9,
                             "floor_cpu_ms": floor_ms, "speedup_bound_cpu": med["dense"]["cpu_ms"] / floor_ms},
              "phases_cpu_ms": phases,
              "design_floor": design and {**design, "speedup_bound_cpu": med["dense"]["cpu_ms"] / design["total_cpu_ms"]}}
    result["goal_met"] = bool(min(result["speedup_wall"], result["speedup_cpu"]) >= VS_DENSE_GOAL)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "flexlora_vs_dense.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(out_dir, "flexlora_vs_dense.md"), "w") as f:
        f.write(vs_dense_markdown(result))
    log(f"  speed-up {result['speedup_wall']:.3g}x wall, {result['speedup_cpu']:.3g}x CPU; σ err "
        f"{check['sv_max_rel_err']:.1e}, energy err {check['energy_rel_err']:.1e}")
    return result


def _path(cfg: dict, ranks: list[int]) -> str:
    """The way methods.factors.svd_factors_top takes for this case (factors.top_path)."""
    from methods import factors

    return factors.top_path(sum(ranks), cfg["d_out"], cfg["d_in"], max(ranks))


def _phases_and_design_floor(ups: list[ClientUpdate], r_max: int, repeats: int = 3) -> tuple[dict, dict]:
    """Where the aggregate's CPU time goes, and what this design cannot do without (this process, now).
    Phases (median CPU ms): the stack (methods.factors.stack, the state's memory) and the rest of the aggregate
    (svd_factors_top: working copies, Grams, energy, iteration, float64 finish, remainder).
    Design floor (min CPU ms): writing the state's float64 factors once into fresh memory, the two float32 Grams
    by methods.factors.gram (the exact meter's cost), and the float64 Rayleigh–Ritz's two products Bᵀ U0 and
    Aᵀ (Bᵀ U0) at the refinement's width: the float64 accuracy the tests hold the Krylov path to."""
    from methods import factors

    name = next(iter(ups[0].factors))
    weights = client_weights(ups)
    m = sum(u.rank for u in ups)
    spare = r_max if factors.krylov_pays(m, r_max) else 0
    cpu = lambda fn: _timed(fn)[2]
    stack_ms, rest_ms = [], []
    for _ in range(repeats):
        (a_s, b_s), _, c = _timed(lambda: factors.stack(ups, weights, name, spare=spare))
        stack_ms.append(c)
        rest_ms.append(cpu(lambda: factors.svd_factors_top(b_s, a_s, r_max, spare=spare)))
    d_out, d_in = b_s.shape[0], a_s.shape[1]
    del a_s, b_s
    width = r_max + max(r_max // 4, 8)                    # _gram_krylov's refinement basis
    g = torch.Generator().manual_seed(2)
    a32, bt32 = torch.randn(m, d_in, generator=g), torch.randn(m, d_out, generator=g)
    a64, b64 = a32.double(), bt32.double().mT
    u0 = torch.randn(d_out, width, generator=g, dtype=torch.float64)
    write = lambda: (torch.empty(m + 2 * spare, d_in, dtype=DTYPE).fill_(1),
                     torch.empty(m + 2 * spare, d_out, dtype=DTYPE).fill_(1))
    design = {"state_write_cpu_ms": min(cpu(write) for _ in range(repeats)),
              "grams_cpu_ms": min(cpu(lambda: (factors.gram(a32), factors.gram(bt32))) for _ in range(repeats)),
              "float64_finish_cpu_ms": min(cpu(lambda: (u0.mT @ b64) @ a64) for _ in range(repeats)),
              "finish_width": width}
    design["total_cpu_ms"] = design["state_write_cpu_ms"] + design["grams_cpu_ms"] + design["float64_finish_cpu_ms"]
    phases = {"stack": statistics.median(stack_ms), "svd_factors_top": statistics.median(rest_ms)}
    return phases, design


def vs_dense_markdown(r: dict) -> str:
    m, c, med, ck, fl = r["machine"], r["case"], r["median"], r["check"], r["gram_floor"]
    runs = lambda name, key: ", ".join(f"{x[key]:,.0f}" for x in r["runs"][name])
    return "\n".join([
        "# FlexLoRA's whole aggregate vs the dense path", "",
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']} with {m['torch_threads']} thread(s) "
        f"(machine default {m.get('default_threads')}), Python {m['python']}; {c['dtype']}; load average at start "
        f"{m.get('loadavg_start')}, end {m.get('loadavg_end')}. Commit {m.get('commit')} "
        f"({'clean' if m.get('clean') else 'with local changes'}).", "",
        f"{c['d_out']}×{c['d_in']}, K = {c['clients']} clients (ranks cycle {', '.join(map(str, RANKS_10))}: "
        f"Σr = {c['rank_sum']}, R_max = {c['r_max']}). Dense: ΔW = Σ p_k s_k B_k A_k formed, torch.linalg.svd, "
        "truncation per rank (the public FlexLoRA code). Ours: FlexLoRA.aggregate (stack, top-R SVD by block Krylov "
        "on the factors' Gram matrices with a float64 finish, the remainder kept factored, ‖ΔW‖_F² for the "
        f"truncation-loss meter). {r['statistic']}; CPU = process CPU time.", "",
        "| | dense | FlexLoRA (ours) | speed-up |", "|---|---:|---:|---:|",
        f"| wall, median ms | {med['dense']['wall_ms']:,.0f} | {med['flexlora']['wall_ms']:,.1f} | **{r['speedup_wall']:.3g}×** |",
        f"| CPU, median ms | {med['dense']['cpu_ms']:,.0f} | {med['flexlora']['cpu_ms']:,.1f} | **{r['speedup_cpu']:.3g}×** |",
        f"| wall, each round | {runs('dense', 'wall_ms')} | {runs('flexlora', 'wall_ms')} | |",
        f"| CPU, each round | {runs('dense', 'cpu_ms')} | {runs('flexlora', 'cpu_ms')} | |", "",
        f"Goal ≥ {r['goal']:g}× (wall and CPU): **{'met' if r['goal_met'] else 'not met'}**.", "",
        f"Accuracy (goal ≤ {r['tol']:g} relative): top {c['r_max']} singular values {ck['sv_max_rel_err']:.1e}; "
        f"energy ‖ΔW‖_F² {ck['energy_rel_err']:.1e}; ‖B'A' − ΔW‖/‖ΔW‖ {ck['reconstruction_rel_err']:.1e}; SVD-ordered "
        f"rows {ck['ordered']}: **{'pass' if ck['passed'] else 'FAIL'}**.", "",
        *_floor_lines(r)])


def _floor_lines(r: dict) -> list[str]:
    path, fl = r["case"].get("path", "krylov"), r["gram_floor"]
    if path != "krylov":
        return [f"Path: **{path}** (methods.factors.svd_factors_top: "
                + ("Σr ≥ the narrower width, so the SVD of the formed product, every triplet ordered" if path == "dense"
                   else "few clients, the SVD through the factors' bases")
                + "); the Krylov path's floors do not apply.", ""]
    return [f"Floor: ‖ΔW‖_F² exactly needs both Gram matrices, {fl['half_grams_gflop']:.1f} GFLOP with their symmetry; "
            f"at this process's float32 matmul rate ({fl['float32_gflops_cpu']:.0f} GFLOP per CPU-second, x xᵀ on the "
            f"stack's shape) that is {fl['floor_cpu_ms']:.0f} ms CPU, a bound of {fl['speedup_bound_cpu']:.0f}× over "
            "the dense path for any method that keeps the meter exact.", "", *_design_floor_lines(r)]


def _design_floor_lines(r: dict) -> list[str]:
    if not r.get("design_floor"):   # records made before the floor was split, or a case off the Krylov path
        return []
    ph, d = r["phases_cpu_ms"], r["design_floor"]
    return [f"Where ours goes (median CPU ms, measured separately after the rounds): the stack {ph['stack']:,.0f} (the "
            f"state's float64 memory), the rest (working copies, Grams, energy, iteration, float64 finish, remainder) "
            f"{ph['svd_factors_top']:,.0f}.", "",
            f"This design's floor (min CPU ms): writing the state's float64 factors once into fresh memory "
            f"{d['state_write_cpu_ms']:,.0f} + the two float32 Grams (methods.factors.gram) {d['grams_cpu_ms']:,.0f} + "
            f"the float64 Rayleigh–Ritz's two products at width {d['finish_width']} {d['float64_finish_cpu_ms']:,.0f} "
            f"= **{d['total_cpu_ms']:,.0f} ms, a bound of {d['speedup_bound_cpu']:.0f}×** over the dense path, with the "
            "meter exact and the top triplets to float64 accuracy.", ""]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.aggregation", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/perf", help="output folder (default: runs/perf)")
    ap.add_argument("--quick", action="store_true", help="small shapes, for CI smoke use (~seconds)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: the machine default; 1 on a CPU shared with other jobs)")
    ap.add_argument("--topr", action="store_true", help="only the top-R SVD comparison (K = 10, 50, 100)")
    ap.add_argument("--vs-dense", action="store_true",
                    help="only FlexLoRA's whole aggregate at K = 100, 4096², vs the dense path, alternated (1 thread "
                         "unless --threads)")
    ap.add_argument("--repeats", type=int, default=3, help="alternated rounds of --vs-dense (default 3)")
    ap.add_argument("--shape", default=None, metavar="D_OUTxD_IN",
                    help="--vs-dense at another module shape, e.g. 576x576 (the default model's q projection); "
                         "default 4096x4096")
    ap.add_argument("--clients", type=int, default=None, help="--vs-dense with this many clients (default 100); "
                                                              "ranks cycle 64, 32, 16, 16, 8, 8, 4, 4, 4, 4")
    args = ap.parse_args(argv)
    shape = None
    if args.shape or args.clients:
        if not args.vs_dense:
            ap.error("--shape and --clients go with --vs-dense")
        try:
            d_out, d_in = (int(x) for x in (args.shape or "4096x4096").lower().split("x"))
        except ValueError:
            ap.error(f"--shape: expected D_OUTxD_IN such as 576x576, got {args.shape!r}")
        if min(d_out, d_in) < 1 or (args.clients is not None and args.clients < 1):
            ap.error("--shape and --clients must be positive")
        shape = dict(d_out=d_out, d_in=d_in, clients=args.clients or VS_DENSE["clients"])
    if args.vs_dense:
        r = run_vs_dense(args.out, quick=args.quick, repeats=args.repeats, threads=args.threads or 1, shape=shape)
        print(os.path.join(args.out, "flexlora_vs_dense.md"))
        return 0 if r["check"]["passed"] else 1
    if args.topr:
        r = run_topr(args.out, threads=args.threads)
        print(os.path.join(args.out, "topr_svd.md"))
        return 0 if r["passed"] else 1
    r = run(args.out, quick=args.quick, threads=args.threads)
    print(os.path.join(args.out, "aggregation.md"))
    return 0 if r["sv_check_passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
