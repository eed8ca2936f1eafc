"""Seeded hierarchical bootstrap over seeds and examples: the leaderboard's CIs and the paired differences.

A metric of one record (one seed) is the mean over its *parts* of a ratio Σ num / Σ den over the part's examples:
  held-out loss: one part; num = an example's summed token loss, den = its labelled tokens (so Σ/Σ = token mean);
  loss on each client's own split: one part per client (every client counts equally);
  a task score: one part; num = the document's metric, den = 1; the task average: one part per task.
A value stored without per-example data is a part of one example (nothing to resample within its seed).

Replicate b of B:
  1. draw n seeds with replacement (a row: its n seeds; a paired difference: the n seeds both rows have);
  2. at each position j, resample every part's examples with replacement (stratified by part). The resample of
     (position j, replicate b) is row b·J + j of a weight matrix drawn once per (context, seed, part, example
     set): every row and comparison in a context (same setting and dtypes) sees the same resampled examples, so
     a difference is paired by example as well as by seed;
  3. the replicate is the mean over positions of the seed's metric under its resample.
CI: 2.5th–97.5th percentile of the replicates (for a difference: of method − baseline replicates); SE: their
standard deviation; MDD = (z_0.975 + z_0.80) · SE, the difference a two-sided test at α = 0.05 detects with 80%
power at this study's size. Resampling seeds *and* examples counts the example noise once more on top of the
seed-to-seed spread it already contains, so the intervals lean wide (conservative), never narrow.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist

import numpy as np

N_BOOT = 2000
CI_LEVEL = 0.95
POWER = 0.80
ALPHA = 0.05
MDD_FACTOR = NormalDist().inv_cdf(1 - ALPHA / 2) + NormalDist().inv_cdf(POWER)   # 1.960 + 0.842 = 2.802
_CHUNK = 4_000_000  # resampled example indices materialised at once


@dataclass(frozen=True)
class Estimate:
    mean: float
    lo: float | None   # None: no spread information (one seed and no per-example data)
    hi: float | None
    n: int             # seeds
    se: float | None = None

    @property
    def half_width(self) -> float | None:
        if self.lo is None or self.hi is None:
            return None
        return (self.hi - self.lo) / 2

    @property
    def excludes_zero(self) -> bool:
        return self.lo is not None and (self.lo > 0 or self.hi < 0)

    @property
    def mdd(self) -> float | None:
        return None if self.se is None else MDD_FACTOR * self.se


def rng_for(*key) -> np.random.Generator:
    """A generator seeded from a stable hash of `key`: the same inputs always get the same draws."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


@dataclass(frozen=True)
class Part:
    """One stratum of a seed's metric: its examples (sorted by key), numerators and denominators."""

    keys: tuple
    num: np.ndarray = field(repr=False)
    den: np.ndarray = field(repr=False)

    @property
    def size(self) -> int:
        return len(self.keys)

    @property
    def value(self) -> float:
        return float(self.num.sum() / self.den.sum())

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.keys).encode()).hexdigest()[:16]

    def restrict(self, keys: tuple) -> Part:
        if keys == self.keys:
            return self
        where = {k: i for i, k in enumerate(self.keys)}
        idx = np.array([where[k] for k in keys], dtype=int)
        return Part(keys, self.num[idx], self.den[idx])


def make_part(keys, num, den=None) -> Part | None:
    """A Part sorted by key; examples with a zero denominator (no labelled token) carry nothing and are left out.
    None when nothing is left or a key repeats."""
    num = np.asarray(num, dtype=float)
    den = np.ones_like(num) if den is None else np.asarray(den, dtype=float)
    keys = [tuple(k) if isinstance(k, list) else k for k in keys]
    if len(set(keys)) != len(keys) or not (len(keys) == num.size == den.size):
        return None
    order = sorted(range(len(keys)), key=lambda i: keys[i])
    keep = [i for i in order if den[i] > 0]
    if not keep:
        return None
    return Part(tuple(keys[i] for i in keep), num[keep], den[keep])


def scalar_part(value: float) -> Part:
    return Part(("value",), np.array([float(value)]), np.array([1.0]))


# seed -> part name -> Part: one row's data for one metric
Series = dict[int, dict[str, Part]]


def series_value(series: Series) -> float:
    """The point estimate: mean over seeds of the mean over parts."""
    return float(np.mean([np.mean([p.value for p in parts.values()]) for parts in series.values()]))


def align(a: Series, b: Series) -> tuple[Series, Series]:
    """The seeds both series have, each part restricted to the examples both have (a seed with a part that
    the other lacks, or with no example in common, is left out)."""
    out_a, out_b = {}, {}
    for seed in sorted(set(a) & set(b)):
        pa, pb = a[seed], b[seed]
        if set(pa) != set(pb):
            continue
        ra, rb = {}, {}
        for name in sorted(pa):
            common = tuple(sorted(set(pa[name].keys) & set(pb[name].keys)))
            if not common:
                break
            ra[name], rb[name] = pa[name].restrict(common), pb[name].restrict(common)
        else:
            out_a[seed], out_b[seed] = ra, rb
    return out_a, out_b


class Resampler:
    """The example resamples of one context, shared by every row and comparison in it (see the module doc).

    prepare() takes every (tag, seed, part name, Part) the context will ask for, so that each weight matrix is
    drawn once and applied to all parts with the same examples at once; values() answers from that, or draws
    the (deterministic) matrix again for a part it was not given.
    """

    def __init__(self, key, positions: int):
        self.key = key
        self.J = max(1, positions)
        self._values: dict[tuple, np.ndarray] = {}

    def _id(self, tag, seed, name, part: Part) -> tuple:
        return (tag, seed, name, part.fingerprint)

    def prepare(self, items) -> None:
        groups: dict[tuple, list[tuple[tuple, Part]]] = {}
        for tag, seed, name, part in items:
            vid = self._id(tag, seed, name, part)
            if vid not in self._values:
                groups.setdefault((seed, name, part.fingerprint), []).append((vid, part))
        for (seed, name, fp), members in sorted(groups.items(), key=lambda kv: str(kv[0])):
            uniq = dict(members)
            vals = self._compute(seed, name, fp, list(uniq.values()))
            for vid, v in zip(uniq, vals):
                self._values[vid] = v

    def values(self, tag, seed, name, part: Part) -> np.ndarray:
        vid = self._id(tag, seed, name, part)
        if vid not in self._values:
            self._values[vid] = self._compute(seed, name, part.fingerprint, [part])[0]
        return self._values[vid]

    def _compute(self, seed, name, fp, parts: list[Part]) -> list[np.ndarray]:
        rows, m = N_BOOT * self.J, parts[0].size
        if m == 1:
            return [np.full(rows, p.value) for p in parts]
        num = np.stack([p.num for p in parts], axis=1)   # (m, S)
        den = np.stack([p.den for p in parts], axis=1)
        rng = rng_for("examples", self.key, seed, name, fp)
        out = np.empty((rows, len(parts)))
        step = max(1, _CHUNK // m)
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            idx = rng.integers(0, m, size=(stop - start, m), dtype=np.int32)
            # counts of each example in each resample, one bincount for the whole chunk
            w = np.bincount((idx + (np.arange(stop - start, dtype=np.int64) * m)[:, None]).ravel(),
                            minlength=(stop - start) * m).reshape(stop - start, m).astype(float)
            out[start:stop] = (w @ num) / (w @ den)
        return [out[:, i] for i in range(len(parts))]


def seed_draws(key, n: int) -> np.ndarray:
    """(B, n) seed positions drawn with replacement; the same key and n always give the same draws."""
    return rng_for("seeds", key, n).integers(0, n, size=(N_BOOT, n))


def replicates(res: Resampler, tag, series: Series, draws: np.ndarray) -> np.ndarray:
    """(B,) replicate means of `series` (its seeds in sorted order are the draws' 0..n-1)."""
    seeds = sorted(series)
    per_seed = np.stack([np.mean([res.values(tag, s, name, part) for name, part in sorted(series[s].items())],
                                 axis=0) for s in seeds])                                  # (n, B·J)
    n = len(seeds)
    positions = np.arange(N_BOOT)[:, None] * res.J + np.arange(n)[None, :]
    return per_seed[draws, positions].mean(axis=1)


def has_spread(series: Series) -> bool:
    return len(series) > 1 or any(p.size > 1 for parts in series.values() for p in parts.values())


def estimate(point: float, reps: np.ndarray | None, n: int) -> Estimate:
    if reps is None:
        return Estimate(point, None, None, n)
    a = (1 - CI_LEVEL) / 2
    lo, hi = np.quantile(reps, [a, 1 - a])
    se = float(reps.std(ddof=1))
    # a percentile interval holds the point estimate when the resamples are centred; guard rounding
    return Estimate(point, float(min(lo, point)), float(max(hi, point)), n, se)


def bootstrap_series(res: Resampler, tag, key, series: Series) -> Estimate:
    """Mean ± CI of one row's metric."""
    point = series_value(series)
    if not has_spread(series):
        return Estimate(point, None, None, len(series))
    return estimate(point, replicates(res, tag, series, seed_draws(key, len(series))), len(series))


def bootstrap_difference(res: Resampler, tags: tuple, key, a: Series, b: Series) -> Estimate:
    """a − b, paired: a and b aligned (align()), the same seed draws and the same example resamples."""
    n = len(a)
    point = series_value(a) - series_value(b)
    if not (has_spread(a) or has_spread(b)):
        return Estimate(point, None, None, n)
    draws = seed_draws(key, n)
    return estimate(point, replicates(res, tags[0], a, draws) - replicates(res, tags[1], b, draws), n)


def bootstrap_values(key, values: list[float]) -> Estimate:
    """Mean ± CI over seeds of a per-seed scalar with no per-example data (e.g. aggregation noise at a round)."""
    vals = np.asarray(values, dtype=float)
    point = float(vals.mean())
    if vals.size < 2:
        return Estimate(point, None, None, int(vals.size))
    return estimate(point, vals[seed_draws(("values", key), vals.size)].mean(axis=1), int(vals.size))


# ---------------------------------------------------------------------------------------------- per-sample files

@dataclass(frozen=True)
class Samples:
    """One task's per-document values from an lm-eval samples JSONL, keyed (subtask, doc_id)."""

    keys: tuple
    values: np.ndarray
    chance: float | None   # mean of 1/(number of choices) over multiple-choice documents; None otherwise


def _metric_places(obj: dict, metric: str) -> list[tuple[dict, str]]:
    """Where a document's value of `metric` may sit: lm-eval's per-sample lines (as evaluators writes them) nest
    it under its filter, {"metrics": {"none": {"acc": 1.0}}}; a metric named "m,filter" sits under that filter;
    flat {"acc": 1.0} lines are accepted too."""
    nested = obj.get("metrics") if isinstance(obj.get("metrics"), dict) else {}
    name, _, flt = metric.partition(",")
    if flt:
        return [(nested.get(flt) if isinstance(nested.get(flt), dict) else {}, name)]
    return [(obj, name)] + [(nested[f], name) for f in sorted(nested) if isinstance(nested[f], dict)]


def sample_lines(path: Path) -> list[tuple[tuple, dict]] | None:
    """(key, line) per document of a per-sample file, the key (subtask, doc_id) (the line number where doc_id is
    missing). None when the file is absent or unreadable, a line is not a JSON object, or a key repeats."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return None
    out = []
    for i, line in enumerate(text.split("\n")):   # not splitlines(): U+2028 inside a JSON string is no line end
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            return None
        if not isinstance(obj, dict):
            return None
        doc = obj.get("doc_id")
        out.append(((str(obj.get("subtask") or obj.get("task") or ""), doc if isinstance(doc, int) else i), obj))
    return out if len({k for k, _ in out}) == len(out) else None


def n_choices(line: dict) -> int | None:
    """A per-sample line's number of answer choices: its continuations (a run folder's line) or n_choices (a lean
    committed line, reports.samples); None for a generated answer."""
    c = line.get("continuations")
    if isinstance(c, list):
        return len(c)
    n = line.get("n_choices")
    return n if isinstance(n, int) and not isinstance(n, bool) else None


def load_samples(path: Path, metric: str | None) -> Samples | None:
    """None when the file is absent, unreadable, or a line lacks a numeric value of the metric."""
    lines = sample_lines(path)
    if not lines:
        return None
    vals, inv_choices = [], []
    for _, obj in lines:
        value = None
        for m in [x for x in (metric, "value", "score") if x]:
            value = next((place[name] for place, name in _metric_places(obj, m) if name in place), None)
            if value is not None:
                break
        if isinstance(value, bool):
            value = float(value)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return None
        vals.append(float(value))
        # a multiple-choice document has choices; a generated answer has none (no chance level)
        choices = n_choices(obj)
        inv_choices.append(1 / choices if choices is not None and choices > 1 else None)
    chance = float(np.mean(inv_choices)) if all(c is not None for c in inv_choices) else None
    return Samples(tuple(k for k, _ in lines), np.asarray(vals), chance)


# ---------------------------------------------------------------------------------------------- seed level

def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| ≥ |t|) for Student's t with a positive integer df: A(t|ν) = P(|T| < t) is a finite sum in θ =
    atan(t/√ν) (Abramowitz & Stegun 26.7.3–4); seeds give integer degrees of freedom."""
    if not (isinstance(df, int) and df >= 1):
        raise ValueError(f"df must be a positive integer, got {df!r}")
    if math.isinf(t):
        return 0.0
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2:   # odd: (2/π)[θ + sin θ cos θ (1 + (2/3) cos²θ + (2·4)/(3·5) cos⁴θ + …)], ν − 2 terms' worth
        term, total = 1.0, 1.0 if df > 1 else 0.0
        for k in range(1, (df - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        inside = 2 / math.pi * (theta + s * math.cos(theta) * total)
    else:        # even: sin θ (1 + (1/2) cos²θ + (1·3)/(2·4) cos⁴θ + …)
        term, total = 1.0, 1.0
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        inside = s * total
    return min(1.0, max(0.0, 1.0 - inside))


def t_quantile(q: float, df: int) -> float:
    """The q-quantile of Student's t (0.5 < q < 1), by bisection on the two-sided tail to 1e-12 relative."""
    if not 0.5 < q < 1:
        raise ValueError(f"q must lie in (0.5, 1), got {q!r}")
    tail = 2 * (1 - q)
    lo, hi = 0.0, 1.0
    while t_two_sided_p(hi, df) > tail:
        lo, hi = hi, hi * 2
    while hi - lo > 1e-12 * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_two_sided_p(mid, df) > tail else (lo, mid)
    return (lo + hi) / 2


def seed_values(series: Series) -> dict:
    """seed -> that seed's metric (mean over its parts of Σ num / Σ den)."""
    return {s: float(np.mean([p.value for p in parts.values()])) for s, parts in series.items()}


@dataclass
class SeedTest:
    """A paired difference at the seed level: each seed's difference is the difference of the two rows' metrics on
    the examples both scored at that seed; the test is a one-sample t-test of those differences against 0, n − 1
    degrees of freedom. holm() sets the level its interval is drawn at and the verdict, family by family."""

    diffs: tuple                     # per seed, in seed order
    p: float | None = None           # two-sided; None with fewer than 2 seeds
    alpha: float | None = None       # the level Holm tested it at (holm())
    family: int | None = None        # comparisons in its Holm family
    p_holm: float | None = None      # Holm-adjusted p

    @property
    def n(self) -> int:
        return len(self.diffs)

    @property
    def mean(self) -> float:
        return float(np.mean(self.diffs))

    @property
    def se(self) -> float | None:
        return float(np.std(self.diffs, ddof=1) / math.sqrt(self.n)) if self.n >= 2 else None

    def interval(self, alpha: float) -> tuple[float, float] | None:
        if self.se is None:
            return None
        half = t_quantile(1 - alpha / 2, self.n - 1) * self.se
        return self.mean - half, self.mean + half

    @property
    def ci(self) -> tuple[float, float] | None:
        """The interval at Holm's level for this comparison (None before holm(), or with fewer than 2 seeds)."""
        return None if self.alpha is None else self.interval(self.alpha)

    @property
    def significant(self) -> bool:
        return self.p is not None and self.alpha is not None and self.p < self.alpha

    def mdd(self, alpha: float, power: float = POWER) -> float | None:
        """The true difference a two-sided t-test at `alpha` detects with `power` at this n and spread:
        (t_{1−α/2, n−1} + t_{power, n−1}) · SE."""
        if self.se is None:
            return None
        return (t_quantile(1 - alpha / 2, self.n - 1) + t_quantile(power, self.n - 1)) * self.se


def seed_test(a: Series, b: Series) -> SeedTest:
    """a − b per seed; a and b aligned (align()): the same seeds, each part on the examples both have."""
    va, vb = seed_values(a), seed_values(b)
    test = SeedTest(tuple(va[s] - vb[s] for s in sorted(a)))
    if test.n >= 2:
        se = test.se
        test.p = (1.0 if test.mean == 0 else 0.0) if se == 0 else t_two_sided_p(test.mean / se, test.n - 1)
    return test


def holm(tests: list[SeedTest], alpha: float = ALPHA) -> None:
    """Holm's step-down over one family (the tests with a p-value; the others stay n/a). The i-th smallest p is
    tested at α/(k − i + 1) until the first that is not rejected; that one and every later one keep that step's
    level, so each interval, drawn at its level, excludes 0 exactly where Holm rejects. p_holm is the adjusted p,
    max over j ≤ i of min(1, (k − j + 1) p_(j))."""
    family = [t for t in tests if t.p is not None]
    k = len(family)
    stop, running = None, 0.0
    for i, t in enumerate(sorted(family, key=lambda t: t.p)):
        level = alpha / (k - i) if stop is None else stop
        if stop is None and not t.p < level:
            stop = level
        running = max(running, min(1.0, (k - i) * t.p))
        t.alpha, t.family, t.p_holm = level, k, running
