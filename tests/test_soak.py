"""Soak (shortened): a 15-round run of the tiny model, 20 clients, client fraction 0.3, in a real
`bench run` subprocess; resident memory must not grow more than 5% after round 5. RSS comes from two
places that must agree: the engine's per-round `rss_mb` (metrics.jsonl) and psutil sampling the process
from outside. The full 50-round × 4-method soak and its figures are in docs/reliability.md."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("BENCH_DATA_ROOT") or Path(__file__).resolve().parents[2] / "shared" / "data")
ROUNDS, FROM_ROUND, LIMIT = 15, 5, 0.05


def _growth(by_round: dict[int, list[float]]) -> float:
    """Relative growth of RSS after round FROM_ROUND: the median of the last 3 rounds against the median of
    rounds FROM_ROUND..FROM_ROUND+2 (medians: the allocator moves RSS up and down by a few MB per round)."""
    rounds = sorted(r for r in by_round if r >= FROM_ROUND)
    early = [v for r in rounds[:3] for v in by_round[r]]
    late = [v for r in rounds[-3:] for v in by_round[r]]
    return statistics.median(late) / statistics.median(early) - 1


@pytest.mark.slow
def test_rss_flat_over_rounds(tmp_path):
    psutil = pytest.importorskip("psutil")
    if not (DATA / "dolly_fedit_10clients").is_dir():
        pytest.fail(f"the real data root is missing at {DATA}; set BENCH_DATA_ROOT")
    run = tmp_path / "run"
    ranks = ",".join(["4", "2", "2"] * 6 + ["4", "2"])
    args = [sys.executable, "-m", "bench.cli", "run", "--preset", "tiny", "--method", "flexlora", "--num-clients", "20",
            "--client-fraction", "0.3", "--ranks", ranks, "--rounds", str(ROUNDS), "--local-steps", "1", "--batch-size", "1",
            "--micro-batch-size", "1", "--cutoff-len", "32", "--output-dir", str(run), "--results-dir", str(tmp_path / "results")]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("BENCH_TEST_")},
           "BENCH_DATA_ROOT": str(DATA), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    t0 = time.time()
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    outside: dict[int, list[float]] = {}  # round in progress -> RSS samples (MiB)
    while proc.poll() is None:
        try:
            rss = ps.memory_info().rss / 2 ** 20
            done = len((run / "metrics.jsonl").read_text().splitlines()) if (run / "metrics.jsonl").is_file() else 0
        except (psutil.NoSuchProcess, OSError):
            break
        if 1 <= done < ROUNDS:
            outside.setdefault(done + 1, []).append(rss)
        time.sleep(0.1)
    err = proc.stderr.read()
    assert proc.wait() == 0, err[-3000:]
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
    inside = {r["round"]: [r["rss_mb"]] for r in rows}
    assert all(isinstance(v[0], float) and v[0] > 50 for v in inside.values())
    g_in, g_out = _growth(inside), _growth(outside)
    print(f"\nsoak: {ROUNDS} rounds in {time.time() - t0:.0f} s; RSS rounds {FROM_ROUND}-{ROUNDS} (engine): "
          f"{[inside[r][0] for r in range(FROM_ROUND, ROUNDS + 1)]}; growth engine {g_in:+.2%}, psutil {g_out:+.2%}")
    assert g_in < LIMIT, f"RSS grew {g_in:.1%} after round {FROM_ROUND} (engine rss_mb): {inside}"
    assert g_out < LIMIT, f"RSS grew {g_out:.1%} after round {FROM_ROUND} (psutil): {outside}"
    # the engine's figure is the process's RSS (same ballpark as psutil's)
    late_out = [v for r in sorted(outside)[-3:] for v in outside[r]]
    assert abs(statistics.median([inside[r][0] for r in range(ROUNDS - 2, ROUNDS + 1)]) / statistics.median(late_out) - 1) < 0.2
