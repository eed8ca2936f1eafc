"""Seeded (deterministic) bootstrap confidence intervals over seeds and, where available, over samples.

For one leaderboard row with seeds s = 1..n, each seed has a stored score v_s and a within-seed spread
source, used to draw a within-seed deviation d_s per bootstrap replicate:
  * per-sample outputs (the task's `samples` JSONL): d_s = mean(resampled samples) − mean(samples);
  * otherwise the stored `stderr`: d_s ~ Normal(0, stderr);
  * otherwise d_s = 0.
Replicate b draws n seeds with replacement, s_1..s_n, and takes mean_k (v_{s_k} + d_{s_k,b,k}). The 95% CI is
the 2.5th–97.5th percentile of the replicates; the point estimate is the mean of the stored v_s. The task
average is bootstrapped with the same seed draws for every task (seeds are paired across tasks).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

N_BOOT = 2000
CI_LEVEL = 0.95
_CHUNK = 4_000_000  # resampled sample values materialised at once


@dataclass(frozen=True)
class Estimate:
    mean: float
    lo: float | None   # None: no spread information at all (one seed, no samples, no stderr)
    hi: float | None
    n: int             # seeds

    @property
    def half_width(self) -> float | None:
        if self.lo is None or self.hi is None:
            return None
        return (self.hi - self.lo) / 2


def rng_for(*key) -> np.random.Generator:
    """A generator seeded from a stable hash of `key`: the same row always gets the same draws."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def load_sample_values(path: Path, metric: str | None) -> np.ndarray | None:
    """Per-sample metric values from an lm-eval samples JSONL (one object per line, the metric as a key).

    Returns None when the file is absent, unreadable, or carries no numeric value for the metric.
    """
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return None
    keys = [k for k in (metric, "value", "score") if k]
    vals = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            return None
        if not isinstance(obj, dict):
            return None
        # lm-eval's own per-sample lines (what evaluators writes) nest the metric under its filter:
        # {"metrics": {"none": {"acc": 1.0}}}; flat {"acc": 1.0} lines are accepted too
        nested = obj.get("metrics") if isinstance(obj.get("metrics"), dict) else {}
        places = [obj] + [nested[f] for f in sorted(nested) if isinstance(nested[f], dict)]
        for k in keys:
            v = next((place[k] for place in places if k in place), None)
            if isinstance(v, bool):
                v = float(v)
            if isinstance(v, (int, float)) and math.isfinite(v):
                vals.append(float(v))
                break
        else:
            return None
    return np.asarray(vals, dtype=float) if vals else None


def _sample_deviations(rng: np.random.Generator, samples: np.ndarray, count: int) -> np.ndarray:
    """`count` bootstrap deviations of the sample mean: mean(resample) − mean(samples)."""
    m = samples.size
    out = np.empty(count)
    step = max(1, _CHUNK // m)
    base = samples.mean()
    for start in range(0, count, step):
        stop = min(count, start + step)
        idx = rng.integers(0, m, size=(stop - start, m))
        out[start:stop] = samples[idx].mean(axis=1) - base
    return out


@dataclass
class SeedValue:
    value: float
    stderr: float | None = None
    samples: np.ndarray | None = None


def seed_replicates(rng: np.random.Generator, seeds: list[SeedValue], draws: np.ndarray) -> np.ndarray:
    """Replicate means (B,) for one task, given the seed draws (B, n): each drawn seed gets its own
    within-seed deviation (from its samples or its stderr)."""
    values = np.array([s.value for s in seeds])
    cells = values[draws].astype(float)
    for i, s in enumerate(seeds):
        mask = draws == i
        count = int(mask.sum())
        if not count:
            continue
        if s.samples is not None and s.samples.size > 1:
            cells[mask] += _sample_deviations(rng, s.samples, count)
        elif s.stderr is not None and s.stderr > 0:
            cells[mask] += rng.normal(0.0, s.stderr, size=count)
    return cells.mean(axis=1)


def has_spread(seeds: list[SeedValue]) -> bool:
    return len(seeds) > 1 or any((s.samples is not None and s.samples.size > 1) or (s.stderr or 0) > 0
                                 for s in seeds)


def estimate_from_replicates(point: float, reps: np.ndarray | None, n: int) -> Estimate:
    if reps is None:
        return Estimate(point, None, None, n)
    alpha = (1 - CI_LEVEL) / 2
    lo, hi = np.quantile(reps, [alpha, 1 - alpha])
    # a percentile interval always holds the point estimate when the deviations are centred; guard rounding
    return Estimate(point, float(min(lo, point)), float(max(hi, point)), n)


def bootstrap_tasks(key, per_task: dict[str, list[SeedValue]], n_seeds: int,
                    seed_index: dict[str, list[int]]) -> tuple[dict[str, Estimate], Estimate | None]:
    """Estimates for each task and for the task average.

    per_task[t]: the SeedValues of the seeds that have task t; seed_index[t]: their positions in 0..n_seeds-1.
    The average is estimated only over seeds that have every task (it is None when there are none).
    """
    rng = rng_for("tasks", key)
    out: dict[str, Estimate] = {}
    for t in sorted(per_task):
        seeds = per_task[t]
        point = float(np.mean([s.value for s in seeds]))
        if not has_spread(seeds):
            out[t] = Estimate(point, None, None, len(seeds))
            continue
        trng = rng_for("task", key, t)
        tdraws = trng.integers(0, len(seeds), size=(N_BOOT, len(seeds)))
        out[t] = estimate_from_replicates(point, seed_replicates(trng, seeds, tdraws), len(seeds))
    # the average: paired over seeds that carry every task
    tasks = sorted(per_task)
    if not tasks or not n_seeds:
        return out, None
    common = set(range(n_seeds))
    for t in tasks:
        common &= set(seed_index[t])
    if not common:
        return out, None
    common_l = sorted(common)
    n = len(common_l)
    adraws = rng.integers(0, n, size=(N_BOOT, n))
    per_seed_avg = []
    reps_sum = np.zeros(N_BOOT)
    spread = n > 1
    for t in tasks:
        pos = {p: i for i, p in enumerate(seed_index[t])}
        seeds = [per_task[t][pos[p]] for p in common_l]
        spread = spread or has_spread(seeds)
        reps_sum += seed_replicates(rng_for("avg", key, t), seeds, adraws)
        per_seed_avg.append([s.value for s in seeds])
    point = float(np.mean(np.mean(np.array(per_seed_avg), axis=0)))
    reps = reps_sum / len(tasks) if spread else None
    return out, estimate_from_replicates(point, reps, n)


def bootstrap_values(key, values: list[float]) -> Estimate:
    """Mean ± CI over seeds for a per-seed scalar (test loss, noise at a round): bootstrap over seeds."""
    vals = np.asarray(values, dtype=float)
    point = float(vals.mean())
    if vals.size < 2:
        return Estimate(point, None, None, int(vals.size))
    rng = rng_for("values", key)
    draws = rng.integers(0, vals.size, size=(N_BOOT, vals.size))
    return estimate_from_replicates(point, vals[draws].mean(axis=1), int(vals.size))
