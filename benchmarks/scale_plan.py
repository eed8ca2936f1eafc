"""The "scale plan on paper": one federated round at Llama-7B scale, from the measured per-module figures.

    python -m benchmarks.scale_plan runs/perf/aggregation.json   # prints markdown

Inputs are the full run's per-module medians (benchmarks/aggregation.py) at 4096×4096, 11008×4096 and
4096×11008 with K = 10 and 100 clients; K = 1000 is extrapolated (stated as such in the output).
Bytes are exact counts (they do not depend on the machine).
"""
from __future__ import annotations

import json
import math
import sys

from .aggregation import LLAMA7B_LAYERS, LLAMA7B_SHAPES, RANKS_10, ranks_for

BYTES = 4  # fp32 factors on the wire (bf16: halve every byte figure)
KS = (10, 100, 1000)


def _gb(x: float) -> str:
    return f"{x / 1e9:,.2f} GB" if x >= 1e8 else f"{x / 1e6:,.1f} MB"


def _s(ms: float) -> str:
    return f"{ms / 1e3:,.2f} s" if ms >= 1e3 else f"{ms:,.0f} ms"


def _per_module(results: dict) -> dict:
    """(d_out, d_in, K) -> ms dict of medians."""
    out = {}
    for c in results["cases"]:
        out[(c["d_out"], c["d_in"], c["clients"])] = {k: v["median_ms"] for k, v in c["ms"].items()}
    return out


def _exponent(results: dict, key: str) -> float:
    """log-log slope of time vs K between the two largest points of the K-curve (≥ 0)."""
    pts = [(c["clients"], c["ms"][key]["median_ms"]) for c in results["scaling_clients"]]
    (k1, t1), (k2, t2) = sorted(pts)[-2:]
    return max(0.0, math.log(t2 / t1) / math.log(k2 / k1))


def plan(results: dict) -> str:
    pm = _per_module(results)
    need = [(d_out, d_in, k) for _, d_out, d_in, _ in LLAMA7B_SHAPES for k in (10, 100)]
    missing = [n for n in need if n not in pm]
    if missing:
        return f"(scale plan needs the full run; missing cases {missing})\n"
    L = LLAMA7B_LAYERS
    p_rank = L * sum(n * (d_out + d_in) for _, d_out, d_in, n in LLAMA7B_SHAPES)  # params per rank unit
    p_dense = L * sum(n * d_out * d_in for _, d_out, d_in, n in LLAMA7B_SHAPES)
    modules = L * sum(n for *_, n in LLAMA7B_SHAPES)
    beta = {key: _exponent(results, key) for key in ("fedavg-lora", "flora", "flora_merge", "flexlora", "dense_delta")}

    def per_module_ms(key: str, d_out: int, d_in: int, k: int) -> tuple[float, str]:
        if k in (10, 100):
            return pm[(d_out, d_in, k)][key], "measured"
        base = pm[(d_out, d_in, 100)]
        if key == "flexlora":
            # Σr = 16000 > d: the factored path has no advantage left (QR of a d×Σr matrix ≈ forming ΔW);
            # lower bound = dense ΔW (linear in Σr) + the dense SVD, both measured
            svd_only = base["dense_svd_baseline"] - base["dense_delta"]
            return 10 * base["dense_delta"] + svd_only, "≥ dense path, extrapolated"
        if key in ("flora", "flora_merge", "dense_delta"):
            return 10 * base[key], "×10 (linear in Σr)"
        return base[key] * 10 ** beta[key], f"×10^{beta[key]:.2f} (K-curve slope)"

    lines = ["## Scale plan on paper: one round of Llama-7B (32 layers; q,k,v,o 4096×4096; gate/up 11008×4096; "
             "down 4096×11008)", "",
             f"Modules per round: 32 × 7 = **{modules}**. Parameters per unit of LoRA rank across them: "
             f"P_r = 32 · (4·(4096+4096) + 3·(4096+11008)) = **{p_rank:,}** (= {_gb(p_rank * BYTES)} in fp32). "
             f"Dense ΔW of all of them: P_dense = 32 · (4·4096² + 3·4096·11008) = {p_dense:,} "
             f"(= {_gb(p_dense * BYTES)} in fp32).",
             "",
             "Ranks cycle " + ", ".join(map(str, RANKS_10)) + " (mean r̄ = 16, R_max = 64); Σr = 16·K.",
             "",
             "### Server compute per round",
             "",
             "T_round(method, K) = 32 · (4·t(4096×4096, K) + 2·t(11008×4096, K) + 1·t(4096×11008, K)), "
             "t = measured median ms per module (table above) for K = 10 and 100. K = 1000 is extrapolated: "
             "FLoRA's stack and merge ×10 (linear in Σr); FedAvg/FedIT by the K-curve's log-log slope between its "
             f"two largest points ({beta['fedavg-lora']:.2f}); FlexLoRA: Σr = 16,000 > 4096, the factored SVD "
             "has no advantage left, so we give the dense path (dense ΔW ×10 + dense SVD, both measured) as its "
             "lower bound. These are single-process CPU figures in float64.",
             "",
             "| method | what | K = 10 | K = 100 | K = 1000 |",
             "|---|---|---:|---:|---:|"]
    rows = [("FedAvg-LoRA / FedIT", "aggregate (average + noise metric)", "fedavg-lora"),
            ("FLoRA", "stack", "flora"),
            ("FLoRA", "W += B_s A_s (server, and every client again)", "flora_merge"),
            ("FlexLoRA (ours, factored)", "aggregate (stack + QR + core SVD)", "flexlora"),
            ("FlexLoRA (public code, dense)", "dense ΔW + torch.linalg.svd", "dense_svd_baseline")]
    for label, what, key in rows:
        cells = []
        for k in KS:
            total, notes = 0.0, set()
            for _, d_out, d_in, n in LLAMA7B_SHAPES:
                if key == "dense_svd_baseline" and k == 1000:
                    base = pm[(d_out, d_in, 100)]
                    t, note = 10 * base["dense_delta"] + base["dense_svd_baseline"] - base["dense_delta"], "extrapolated"
                else:
                    t, note = per_module_ms(key, d_out, d_in, k)
                total += L * n * t
                notes.add(note)
            cells.append(_s(total) + ("" if notes == {"measured"} else " *"))
        lines.append(f"| {label} | {what} | " + " | ".join(cells) + " |")
    lines += ["", "\\* extrapolated, see above.", "",
              "### Bytes per round (fp32; bf16 halves everything)", "",
              "Upload, every method: client k sends r_k·P_r params, total Σr·P_r. Download per client: "
              "FedAvg/FedIT broadcast the padded state, R_max·P_r (slicing to r_k, as `configure` does, would "
              "send r_k·P_r); FLoRA sends every client the whole stack, Σr·P_r (capped by the dense ΔW, "
              "P_dense, once Σr·P_r > P_dense); FlexLoRA sends client k its rank-r_k factors, r_k·P_r.", "",
              "| method | per client down (mean) | total down | total up |", "|---|---:|---:|---:|"]
    for k in KS:
        ranks = ranks_for(k)
        sr, rmax = sum(ranks), max(ranks)
        up = sr * p_rank * BYTES
        flora_pc = min(sr * p_rank, p_dense) * BYTES
        rows_b = [("FedAvg-LoRA / FedIT", rmax * p_rank * BYTES),
                  ("FLoRA", flora_pc),
                  ("FlexLoRA", sr / k * p_rank * BYTES)]
        for label, pc in rows_b:
            lines.append(f"| K = {k}: {label} | {_gb(pc)} | {_gb(pc * k)} | {_gb(up)} |")
    lines += ["", "### Server memory per round (fp32 factors)", "",
              "All uploads held at once: Σr·P_r (FLoRA, FlexLoRA and FedAvg's noise metric all stack them). "
              "State kept between rounds: FedAvg R_max·P_r; FLoRA none (merged into the base, P_dense already "
              "resident); FlexLoRA min(Σr, d)·(d_in + d_out) per module. Transient per module: FlexLoRA's two "
              "Q factors (d_out + d_in)·min(Σr, d) and a min(Σr, d)² core; the dense baseline a d_out×d_in ΔW "
              "plus U, Vᵀ (≈ 3·d_out·d_in for the square case).", "",
              "| K | Σr | uploads held | FedAvg state | FlexLoRA state | FlexLoRA transient (largest module) "
              "| dense-SVD transient (largest module) |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for k in KS:
        ranks = ranks_for(k)
        sr, rmax = sum(ranks), max(ranks)
        flex_state = L * sum(n * min(sr, d_out, d_in) * (d_out + d_in) for _, d_out, d_in, n in LLAMA7B_SHAPES)
        q = min(sr, 4096)
        flex_tr = ((11008 + 4096) * q + q * q) * BYTES
        dense_tr = (11008 * 4096 + 11008 * 4096 + 4096 * 4096) * BYTES
        lines.append(f"| {k} | {sr:,} | {_gb(sr * p_rank * BYTES)} | {_gb(rmax * p_rank * BYTES)} "
                     f"| {_gb(flex_state * BYTES)} | {_gb(flex_tr)} | {_gb(dense_tr)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0] if argv else "runs/perf/aggregation.json") as f:
        print(plan(json.load(f)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
