"""First-principles tests of the aggregation math in methods/ (float64, random shapes, mixed ranks).

Every reference here is computed *densely and independently* of methods/factors.py: the d_out × d_in
matrices Σ_k p_k s_k B_k A_k are formed explicitly from the clients' raw factors, and p_k is taken
from n_k directly (not from client_weights), so a bug in the shared algebra cannot cancel out.

Conventions (methods/base.py): a client adds s_k · B_k @ A_k, A_k: r_k × d_in, B_k: d_out × r_k,
s_k = α/r_k (LoRA) or α/√r_k (rsLoRA). The server state is *effective*: global = base + B_glob @ A_glob.
"""
from __future__ import annotations

import itertools
import math
import random
import zlib

import pytest
import torch

from methods import METHODS, AggregationMethod, ClientSpec, ClientUpdate, GlobalState, client_weights, get_method
from methods.factors import factored_svd, orthonormal_basis, product_fro_norm, stack, svd_factors
from methods.fedavg_lora import FedAvgLoRA
from methods.fedit import FedIT
from methods.flexlora import FlexLoRA
from methods.flora import FLoRA

DT = torch.float64
EPS = torch.finfo(DT).eps

# (d_out, d_in): always d_in != d_out, both orientations, plus one odd-sized pair
SHAPES = [(12, 7), (7, 12), (33, 20)]
# rank mixes: homogeneous, heterogeneous, one rank-1 client, ranks above min(d) for the small shapes
RANK_MIXES = [(4, 4, 4), (8, 4, 2, 1), (1, 16, 3, 5, 2)]
SCALINGS = ["lora", "rslora", "mixed"]
AVG_METHODS = ["fedavg-lora", "fedit"]
ALL_METHODS = ["fedavg-lora", "fedit", "flora", "flexlora"]


# ----------------------------------------------------------------------------------------------------
# helpers (independent of methods/factors.py)
# ----------------------------------------------------------------------------------------------------
def seed_of(*key) -> int:
    """A stable seed from a parameter tuple (hash() of str is salted per process)."""
    return zlib.crc32(repr(key).encode())


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def scaling_of(rank: int, alpha: float, mode: str, k: int = 0) -> float:
    if mode == "mixed":
        mode = "lora" if k % 2 == 0 else "rslora"
    return alpha / rank if mode == "lora" else alpha / math.sqrt(rank)


def make_updates(g: torch.Generator, shapes: dict[str, tuple[int, int]], ranks, mode: str = "mixed",
                 alpha: float = 16.0, examples=None) -> list[ClientUpdate]:
    """Random clients; B is *not* zero (a trained adapter), n_k random unless given."""
    ups = []
    for k, r in enumerate(ranks):
        factors = {}
        for name, (d_out, d_in) in shapes.items():
            a = torch.randn(r, d_in, generator=g, dtype=DT)
            b = torch.randn(d_out, r, generator=g, dtype=DT)
            factors[name] = (a, b)
        n = int(torch.randint(1, 50, (1,), generator=g)) if examples is None else examples[k]
        ups.append(ClientUpdate(client_id=k, rank=r, scaling=scaling_of(r, alpha, mode, k), num_examples=n,
                                factors=factors))
    return ups


def module_shapes(d_out: int, d_in: int) -> dict[str, tuple[int, int]]:
    # two modules: the given shape and its transpose (an "up" and a "down" projection)
    return {"layers.0.up": (d_out, d_in), "layers.0.down": (d_in, d_out)}


def probs(updates) -> list[float]:
    total = sum(u.num_examples for u in updates)
    return [u.num_examples / total for u in updates]


def dense_delta(updates, name: str) -> torch.Tensor:
    """Σ_k p_k s_k B_k A_k, formed densely, client by client."""
    out = None
    for u, p in zip(updates, probs(updates)):
        a, b = u.factors[name]
        term = p * u.scaling * (b @ a)
        out = term if out is None else out + term
    return out


def dense_avg_factors(updates, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ p_k pad(A_k), Σ p_k s_k pad(B_k), padding by hand."""
    rmax = max(u.rank for u in updates)
    d_in = updates[0].factors[name][0].shape[1]
    d_out = updates[0].factors[name][1].shape[0]
    a_bar = torch.zeros(rmax, d_in, dtype=DT)
    b_bar = torch.zeros(d_out, rmax, dtype=DT)
    for u, p in zip(updates, probs(updates)):
        a, b = u.factors[name]
        a_bar[: u.rank] += p * a
        b_bar[:, : u.rank] += p * u.scaling * b
    return a_bar, b_bar


def fro(x: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x))  # Frobenius for matrices, 2-norm for vectors


def assert_close(x: torch.Tensor, y: torch.Tensor, rel: float = 1e-12, what: str = ""):
    scale = max(fro(y), 1e-300)
    err = fro(x - y) / scale
    assert err <= rel, f"{what}: relative error {err:.3e} > {rel:.0e}"


def start_of(m, state, rank: int, scaling: float):
    """The factors a client of this rank starts from (its task's init)."""
    return m.configure(state, ClientSpec(0, rank, scaling, state.round + 1)).init


def effective(adapter_pair) -> torch.Tensor:
    a, b = adapter_pair
    return b @ a


# ----------------------------------------------------------------------------------------------------
# FLoRA: stacking is exact
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ranks", RANK_MIXES)
@pytest.mark.parametrize("mode", SCALINGS)
def test_flora_merge_is_exact_weighted_sum(shape, ranks, mode):
    g = gen(seed_of(shape, ranks, mode))
    ups = make_updates(g, module_shapes(*shape), ranks, mode)
    agg = get_method("flora").aggregate(ups, GlobalState(round=3))
    assert agg.state.round == 4 and agg.state.adapter == {}
    assert set(agg.merge) == set(ups[0].factors)
    for name in ups[0].factors:
        a_s, b_s = agg.merge[name]
        assert a_s.shape[0] == b_s.shape[1] == sum(ranks)  # the whole stack, Σ r_k
        assert_close(b_s @ a_s, dense_delta(ups, name), 1e-12, f"flora merge {name}")
    assert agg.metrics["noise"] == 0.0


@pytest.mark.parametrize("seed", range(6))
def test_flora_any_sampled_subset(seed):
    """p_k is over the clients that took part in the round, not over the whole population."""
    g = gen(100 + seed)
    population = make_updates(g, module_shapes(11, 19), (8, 8, 4, 4, 2, 2, 1, 16), "mixed")
    rng = random.Random(seed)
    subset = rng.sample(population, rng.randint(1, len(population)))
    agg = get_method("flora").aggregate(subset, GlobalState())
    for name in subset[0].factors:
        a_s, b_s = agg.merge[name]
        assert_close(b_s @ a_s, dense_delta(subset, name), 1e-12, f"subset {[u.client_id for u in subset]}")
    # ... and the population-weighted sum is a different matrix unless the subset is everyone
    if len(subset) < len(population):
        name = "layers.0.up"
        a_s, b_s = agg.merge[name]
        assert fro(b_s @ a_s - dense_delta(population, name)) > 1e-3


def test_flora_configure_is_fresh_and_merges_into_base():
    m = get_method("flora")
    assert m.merges_into_base is True
    state = GlobalState(adapter={"x": (torch.ones(2, 3, dtype=DT), torch.ones(4, 2, dtype=DT))})
    assert start_of(m, state, 8, 2.0) is None
    assert start_of(m, GlobalState(), 8, 2.0) is None
    for other in ("fedavg-lora", "fedit", "flexlora"):
        assert get_method(other).merges_into_base is False


def test_flora_merge_equals_engine_update_of_base():
    """What the engine does with the merge: W ← W + B_s A_s; two rounds accumulate both sums."""
    g = gen(7)
    shapes = module_shapes(9, 14)
    base = {n: torch.randn(*s, generator=g, dtype=DT) for n, s in shapes.items()}
    w = {n: t.clone() for n, t in base.items()}
    expected = {n: t.clone() for n, t in base.items()}
    m = get_method("flora")
    state = GlobalState()
    for rnd in range(2):
        ups = make_updates(g, shapes, (4, 2, 8), "mixed")
        agg = m.aggregate(ups, state)
        state = agg.state
        for n, (a_s, b_s) in agg.merge.items():
            w[n] += b_s @ a_s
            expected[n] += dense_delta(ups, n)
    for n in shapes:
        assert_close(w[n], expected[n], 1e-12, n)


# ----------------------------------------------------------------------------------------------------
# FedAvg-LoRA / FedIT: averaging, padding, noise
# ----------------------------------------------------------------------------------------------------
def _zero_noise_case(case: str, g: torch.Generator, shape):
    shapes = module_shapes(*shape)
    r = 4
    base = make_updates(g, shapes, (r,), "lora")[0]
    ups = []
    for k in range(4):
        factors = {}
        for name, (a, b) in base.factors.items():
            if case == "shared_A_distinct_B":  # FFA-LoRA-like: with one A, averaging B is exact
                b = torch.randn(b.shape, generator=g, dtype=DT)
            factors[name] = (a.clone(), b.clone())
        s = 2.0 if case != "same_factors_distinct_scaling" else scaling_of(r, 8.0 * (k + 1), "lora")
        ups.append(ClientUpdate(k, r, s, 5 + 3 * k, factors))
    return ups


ZERO_NOISE_CASES = ["identical", "shared_A_distinct_B", "same_factors_distinct_scaling"]
@pytest.mark.parametrize("method", AVG_METHODS)
@pytest.mark.parametrize("case", ZERO_NOISE_CASES)
def test_avg_noise_is_zero_when_averaging_is_exact(method, case):
    # several seeds: the former Gram-trace norm gave ~1e-8 or exactly 0 depending on the sign of a
    # rounding error (its sum was clamped at 0), so one seed alone could pass by luck
    worst = 0.0
    for seed in range(8):
        ups = _zero_noise_case(case, gen(seed), (33, 20))
        agg = get_method(method).aggregate(ups, GlobalState())
        # the averaged product *is* the exact sum here (checked densely, so the case itself is right) …
        for name in ups[0].factors:
            assert_close(effective(agg.state.adapter[name]), dense_delta(ups, name), 1e-13, name)
        # … so the recorded noise must be zero up to rounding
        worst = max(worst, agg.metrics["noise"], *agg.metrics["noise_per_module"].values())
    assert worst <= 1e-12


def test_product_fro_norm_of_a_cancelling_difference():
    """‖[B, −B][A; A]‖ = ‖BA − BA‖ = 0: the norm through the factors must not have a √eps floor."""
    g = gen(59)
    for m in (1, 8, 30):
        b, a = torch.randn(25, m, generator=g, dtype=DT), torch.randn(m, 16, generator=g, dtype=DT)
        scale = fro(b) * fro(a)
        assert product_fro_norm(torch.cat([b, -b], 1), torch.cat([a, a], 0)) <= 1e-14 * scale
        # a small true difference is measured to relative accuracy, not swamped by the √eps floor
        delta = 1e-9
        got = product_fro_norm(torch.cat([b, -b], 1), torch.cat([a * (1 + delta), a], 0))
        assert got == pytest.approx(delta * fro(b @ a), rel=1e-5)


@pytest.mark.parametrize("method", AVG_METHODS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ranks", RANK_MIXES)
def test_avg_noise_positive_and_equals_dense(method, shape, ranks):
    g = gen(seed_of(method, shape, ranks))
    ups = make_updates(g, module_shapes(*shape), ranks, "mixed")
    agg = get_method(method).aggregate(ups, GlobalState())
    diff_sq = exact_sq = 0.0
    for name in ups[0].factors:
        a_bar, b_bar = dense_avg_factors(ups, name)
        exact = dense_delta(ups, name)
        d = fro(b_bar @ a_bar - exact)
        e = fro(exact)
        assert agg.metrics["noise_per_module"][name] == pytest.approx(d / e, rel=1e-9, abs=0)
        diff_sq, exact_sq = diff_sq + d * d, exact_sq + e * e
    noise = math.sqrt(diff_sq) / math.sqrt(exact_sq)
    assert noise > 1e-3
    assert agg.metrics["noise"] == pytest.approx(noise, rel=1e-9, abs=0)


@pytest.mark.parametrize("method", AVG_METHODS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ranks", RANK_MIXES)
@pytest.mark.parametrize("mode", ["mixed", "rslora"])
def test_avg_state_is_padded_weighted_mean(method, shape, ranks, mode):
    g = gen(seed_of(method, shape, ranks, mode, "state"))
    ups = make_updates(g, module_shapes(*shape), ranks, mode)
    agg = get_method(method).aggregate(ups, GlobalState(round=1))
    assert agg.state.round == 2 and agg.merge == {}
    rmax = max(ranks)
    for name in ups[0].factors:
        a, b = agg.state.adapter[name]
        a_ref, b_ref = dense_avg_factors(ups, name)
        assert a.shape == a_ref.shape and b.shape == b_ref.shape and a.shape[0] == rmax
        assert_close(a, a_ref, 1e-14, f"{name} A")
        assert_close(b, b_ref, 1e-14, f"{name} B")


def test_avg_heterogeneous_padding_rows_by_hand():
    """Ranks (8, 2): rows 2..7 of Ā come from client 0 alone, weighted by p_0 (not renormalised),
    rows 0..1 from both; same for B̄'s columns with p_k s_k."""
    g = gen(5)
    ups = make_updates(g, {"m": (10, 6)}, (8, 2), "lora", alpha=16.0, examples=[3, 1])
    a, b = get_method("fedavg-lora").aggregate(ups, GlobalState()).state.adapter["m"]
    (a0, b0), (a1, b1) = ups[0].factors["m"], ups[1].factors["m"]
    s0, s1 = ups[0].scaling, ups[1].scaling  # 2.0 and 8.0
    assert torch.allclose(a[2:], 0.75 * a0[2:], rtol=0, atol=1e-15)
    assert torch.allclose(a[:2], 0.75 * a0[:2] + 0.25 * a1, rtol=0, atol=1e-15)
    assert torch.allclose(b[:, 2:], 0.75 * s0 * b0[:, 2:], rtol=0, atol=1e-14)
    assert torch.allclose(b[:, :2], 0.75 * s0 * b0[:, :2] + 0.25 * s1 * b1, rtol=0, atol=1e-14)


# ----------------------------------------------------------------------------------------------------
# configure: the client's effective update is the rank-r slice of the global one (the scaling bug)
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["fedavg-lora", "fedit", "flexlora"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ranks", RANK_MIXES)
def test_configure_effective_update_is_global_slice(method, shape, ranks):
    g = gen(seed_of(method, shape, ranks, "cfg"))
    ups = make_updates(g, module_shapes(*shape), ranks, "mixed")
    m = get_method(method)
    state = m.aggregate(ups, GlobalState()).state
    for r in sorted(set(ranks)) + [max(ranks) + 3]:
        for alpha, mode in [(16.0, "lora"), (16.0, "rslora"), (3.0, "lora"), (1.0 * r, "lora")]:
            s = scaling_of(r, alpha, mode)
            cfg = start_of(m, state, r, s)
            for name, (a_glob, b_glob) in state.adapter.items():
                a_c, b_c = cfg[name]
                R = a_glob.shape[0]
                r_eff = min(r, R)
                assert a_c.shape == (r_eff, a_glob.shape[1]) and b_c.shape == (b_glob.shape[0], r_eff)
                target = b_glob[:, :r_eff] @ a_glob[:r_eff]
                assert_close(s * (b_c @ a_c), target, 1e-13, f"{name} r={r} s={s}")
                # the raw factors are the global ones with B divided by s (not multiplied, not left as is)
                assert torch.equal(a_c, a_glob[:r_eff])
                assert torch.allclose(b_c * s, b_glob[:, :r_eff], rtol=1e-15, atol=0)
                if abs(s - 1.0) > 1e-6:
                    assert fro(b_c @ a_c - target) > 1e-6 * fro(target)


@pytest.mark.parametrize("method", ["fedavg-lora", "fedit", "flexlora"])
def test_configure_does_not_alias_state(method):
    g = gen(3)
    ups = make_updates(g, {"m": (8, 5)}, (4, 2), "lora")
    m = get_method(method)
    state = m.aggregate(ups, GlobalState()).state
    before = {n: (a.clone(), b.clone()) for n, (a, b) in state.adapter.items()}
    cfg = start_of(m, state, 4, 1.0)  # s = 1: B / 1 must still be a copy
    for a, b in cfg.values():
        a.add_(1.0)  # a client training in place
        b.add_(1.0)
    for n, (a, b) in state.adapter.items():
        assert torch.equal(a, before[n][0]) and torch.equal(b, before[n][1])


def test_configure_empty_state_is_fresh_init():
    for name in ALL_METHODS:
        assert start_of(get_method(name), GlobalState(), 8, 2.0) is None


@pytest.mark.parametrize("method", ["fedavg-lora", "fedit", "flexlora"])
@pytest.mark.parametrize("alphas", [(16.0, 16.0, 16.0), (8.0, 32.0, 5.0)])
def test_untrained_round_is_a_fixed_point(method, alphas):
    """Clients that start from configure() and do not train send back exactly the global adapter's
    effective update, whatever their α and LoRA/rsLoRA choice: one more round leaves the global
    effective adapter unchanged. Dividing B by s twice (or not at all) breaks this."""
    g = gen(17)
    r = 4
    shapes = module_shapes(13, 6)
    m = get_method(method)
    state = m.aggregate(make_updates(g, shapes, (r, r, r), "mixed"), GlobalState()).state
    R = next(iter(state.adapter.values()))[0].shape[0]
    modes = ["lora", "rslora", "lora"]
    ups = []
    for k, (alpha, mode) in enumerate(zip(alphas, modes)):
        s = scaling_of(R, alpha, mode)
        ups.append(ClientUpdate(k, R, s, 3 + 4 * k, start_of(m, state, R, s)))
    new = m.aggregate(ups, state).state
    for name in shapes:
        assert_close(effective(new.adapter[name]), effective(state.adapter[name]), 1e-12, name)


# ----------------------------------------------------------------------------------------------------
# every client's contribution counts (the misspelt accumulator in FLoRA's public FedIT code)
# ----------------------------------------------------------------------------------------------------
def _perturb(update: ClientUpdate, g, name: str) -> tuple[ClientUpdate, torch.Tensor, torch.Tensor]:
    a, b = update.factors[name]
    da = torch.randn(a.shape, generator=g, dtype=DT)
    db = torch.randn(b.shape, generator=g, dtype=DT)
    factors = dict(update.factors)
    factors[name] = (a + da, b + db)
    return ClientUpdate(update.client_id, update.rank, update.scaling, update.num_examples, factors), da, db


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("which", [-1, 0, 2])
def test_every_client_counts(method, which):
    g = gen(seed_of(method, which))
    ranks = (8, 4, 2, 4, 1)
    ups = make_updates(g, module_shapes(15, 9), ranks, "mixed")
    name = "layers.0.up"
    pert, da, db = _perturb(ups[which], g, name)
    ups2 = list(ups)
    ups2[which] = pert
    k = which % len(ups)
    p_k, s_k, r_k = probs(ups)[k], ups[k].scaling, ups[k].rank
    m = get_method(method)
    agg1, agg2 = m.aggregate(ups, GlobalState()), m.aggregate(ups2, GlobalState())
    a, b = ups[k].factors[name]
    # the exact sum moves by p_K s_K (B'A' − BA)
    d_exact = p_k * s_k * ((b + db) @ (a + da) - b @ a)
    assert fro(d_exact) > 1e-3
    if method == "flora":
        got = effective(agg2.merge[name]) - effective(agg1.merge[name])
        assert_close(got, d_exact, 1e-11, "flora")
    elif method == "flexlora":
        got = effective(agg2.state.adapter[name]) - effective(agg1.state.adapter[name])
        assert_close(got, d_exact, 1e-10, "flexlora")
    else:  # factors move by p_K ΔA_K and p_K s_K ΔB_K, in the client's first r_K rows/columns only
        (a1, b1), (a2, b2) = agg1.state.adapter[name], agg2.state.adapter[name]
        exp_da = torch.zeros_like(a1)
        exp_db = torch.zeros_like(b1)
        exp_da[:r_k] = p_k * da
        exp_db[:, :r_k] = p_k * s_k * db
        assert_close(a2 - a1, exp_da, 1e-12, "ΔĀ")
        assert_close(b2 - b1, exp_db, 1e-12, "ΔB̄")
    # the other module is untouched
    other = "layers.0.down"
    if method == "flora":
        assert torch.equal(effective(agg1.merge[other]), effective(agg2.merge[other]))
    else:
        assert torch.equal(effective(agg1.state.adapter[other]), effective(agg2.state.adapter[other]))


@pytest.mark.parametrize("method", ALL_METHODS)
def test_aggregate_is_not_first_client_only(method):
    """Guard against `agg = p_1 A_1` style bugs: two clients, the result is not client 0's alone."""
    g = gen(23)
    ups = make_updates(g, {"m": (6, 10)}, (2, 2), "lora", examples=[1, 1])
    agg = get_method(method).aggregate(ups, GlobalState())
    pair = agg.merge["m"] if method == "flora" else agg.state.adapter["m"]
    only_first = make_updates(gen(23), {"m": (6, 10)}, (2,), "lora", examples=[1])
    first = dense_delta(only_first, "m")
    assert fro(effective(pair) - first) > 1e-2 * fro(first)


# ----------------------------------------------------------------------------------------------------
# FlexLoRA: factored SVD, Eckart–Young redistribution
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES + [(40, 9)])
@pytest.mark.parametrize("ranks", RANK_MIXES + [(2,), (16, 16)])
def test_factored_svd_matches_dense(shape, ranks):
    d_out, d_in = shape
    g = gen(seed_of(shape, ranks, "fsvd"))
    ups = make_updates(g, {"m": shape}, ranks, "mixed")
    w = probs(ups)
    a_s, b_s = stack(ups, w, "m")
    dense = dense_delta(ups, "m")
    u, s, v = factored_svd(b_s, a_s)
    q = min(sum(ranks), d_out, d_in)
    assert u.shape == (d_out, q) and s.shape == (q,) and v.shape == (d_in, q)
    s_ref = torch.linalg.svdvals(dense)
    assert torch.all(s[:-1] >= s[1:])
    assert float((s - s_ref[:q]).abs().max()) <= 1e-10 * float(s_ref[0])
    if s_ref.numel() > q:  # rank ≤ q: the dense tail is rounding noise
        assert float(s_ref[q:].abs().max()) <= 1e-10 * float(s_ref[0])
    assert_close(u @ torch.diag(s) @ v.T, dense, 1e-12, "reconstruction")
    assert_close(u.T @ u, torch.eye(q, dtype=DT), 1e-12, "UᵀU")
    assert_close(v.T @ v, torch.eye(q, dtype=DT), 1e-12, "VᵀV")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ranks", RANK_MIXES)
@pytest.mark.parametrize("mode", ["mixed", "rslora"])
@pytest.mark.parametrize("split", ["official", "sqrt"])
def test_flexlora_state_is_exact_and_svd_ordered(shape, ranks, mode, split):
    g = gen(seed_of(shape, ranks, mode, "flex"))
    ups = make_updates(g, module_shapes(*shape), ranks, mode)
    agg = get_method("flexlora", {"split": split}).aggregate(ups, GlobalState(round=5))
    assert agg.state.round == 6 and agg.merge == {} and agg.metrics["noise"] == 0.0
    for name in ups[0].factors:
        a, b = agg.state.adapter[name]
        dense = dense_delta(ups, name)
        assert_close(b @ a, dense, 1e-12, f"{name} global = ΔW")
        s_ref = torch.linalg.svdvals(dense)
        q = a.shape[0]
        assert q == min(sum(ranks), *dense.shape)
        if split == "sqrt":  # B' = U√S, A' = √S Vᵀ  ⇒  BᵀB = diag(S) = AAᵀ
            assert_close(b.T @ b, torch.diag(s_ref[:q]), 1e-12, "B'ᵀB'")
            assert_close(a @ a.T, torch.diag(s_ref[:q]), 1e-12, "A'A'ᵀ")
        else:  # the public code's B' = U S, A' = Vᵀ  ⇒  BᵀB = diag(S²), AAᵀ = I
            assert_close(b.T @ b, torch.diag(s_ref[:q] ** 2), 1e-12, "B'ᵀB'")
            assert_close(a @ a.T, torch.eye(q, dtype=a.dtype), 1e-12, "A'A'ᵀ")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ranks", RANK_MIXES)
def test_flexlora_redistribution_is_best_rank_r(shape, ranks):
    g = gen(seed_of(shape, ranks, "ey"))
    ups = make_updates(g, module_shapes(*shape), ranks, "mixed")
    m = get_method("flexlora")
    state = m.aggregate(ups, GlobalState()).state
    for name in ups[0].factors:
        dw = dense_delta(ups, name)
        u_d, s_d, vh_d = torch.linalg.svd(dw, full_matrices=False)
        total = float((s_d ** 2).sum())
        for k, u in enumerate(ups):
            r, s_k = u.rank, u.scaling
            a_c, b_c = start_of(m, state, r, s_k)[name]
            approx = s_k * (b_c @ a_c)
            err = fro(dw - approx) ** 2
            tail = float((s_d[r:] ** 2).sum())  # Eckart–Young: Σ_{j>r} σ_j²
            assert err == pytest.approx(tail, rel=1e-9, abs=1e-12 * total)
            # the dense SVD truncation (the public code's answer) is not better
            trunc = u_d[:, :r] @ torch.diag(s_d[:r]) @ vh_d[:r]
            assert err <= fro(dw - trunc) ** 2 + 1e-10 * total
            # no random rank-r matrix, nor a perturbation of ours, does better
            for _ in range(5):
                x = torch.randn(dw.shape[0], r, generator=g, dtype=DT)
                y = torch.randn(r, dw.shape[1], generator=g, dtype=DT)
                assert fro(dw - x @ y) ** 2 > err
                # best scalar multiple of a random rank-r matrix (a stronger competitor)
                c = float((dw * (x @ y)).sum()) / fro(x @ y) ** 2
                assert fro(dw - c * (x @ y)) ** 2 >= err - 1e-10 * total
                if r < min(dw.shape):
                    eps = 1e-3
                    dx = torch.randn(b_c.shape, generator=g, dtype=DT) * eps
                    dy = torch.randn(a_c.shape, generator=g, dtype=DT) * eps
                    assert fro(dw - s_k * (b_c + dx) @ (a_c + dy)) ** 2 > err


def test_flexlora_rank_sum_beyond_min_dim():
    """Σ r_k = 24 ≥ min(d) = 7: the state has rank 7, every client of rank ≥ 7 gets ΔW exactly."""
    g = gen(29)
    ups = make_updates(g, {"m": (18, 7)}, (8, 8, 4, 4), "mixed")
    m = get_method("flexlora")
    state = m.aggregate(ups, GlobalState()).state
    a, b = state.adapter["m"]
    assert a.shape == (7, 7) and b.shape == (18, 7)
    dw = dense_delta(ups, "m")
    assert_close(b @ a, dw, 1e-12, "ΔW")
    for u in ups:
        a_c, b_c = start_of(m, state, u.rank, u.scaling)["m"]
        assert a_c.shape[0] == min(u.rank, 7)
        if u.rank >= 7:
            assert_close(u.scaling * (b_c @ a_c), dw, 1e-12, f"rank {u.rank}")
        else:
            tail = float((torch.linalg.svdvals(dw)[u.rank:] ** 2).sum())
            assert fro(dw - u.scaling * (b_c @ a_c)) ** 2 == pytest.approx(tail, rel=1e-9)


def _conditioned(g: torch.Generator, n: int, m: int, kappa: float) -> torch.Tensor:
    """n×m float64 matrix with singular values spread log-evenly from 1 to 1/kappa (exactly rank-deficient: inf)."""
    u, _ = torch.linalg.qr(torch.randn(n, m, generator=g, dtype=DT))
    v, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=DT))
    s = torch.logspace(0, -math.log10(kappa), m, dtype=DT) if math.isfinite(kappa) else \
        torch.cat([torch.ones(m - m // 3, dtype=DT), torch.zeros(m // 3, dtype=DT)])
    return (u * s) @ v.T


def _householder_calls(monkeypatch) -> list:
    """Record when orthonormal_basis takes its Householder path (torch.linalg.qr), still running it."""
    calls, real = [], torch.linalg.qr
    monkeypatch.setattr(torch.linalg, "qr", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


# (kappa, dtype, the path orthonormal_basis must take): CholeskyQR2 only where κ² u is small
BASIS_CASES = [(1.0, torch.float64, "cholqr2"), (1e4, torch.float64, "cholqr2"), (1e6, torch.float64, "cholqr2"),
               (3e8, torch.float64, "householder"),  # Cholesky succeeds, first pass too far from orthogonal
               (1e12, torch.float64, "householder"), (math.inf, torch.float64, "householder"),
               (10.0, torch.float32, "cholqr2"), (1e6, torch.float32, "householder"),
               (math.inf, torch.float32, "householder")]


@pytest.mark.parametrize("kappa,dtype,path", BASIS_CASES)
@pytest.mark.parametrize("n,m", [(300, 40), (41, 40), (64, 1)])
def test_orthonormal_basis_both_paths_are_a_qr(kappa, dtype, path, n, m, monkeypatch):
    """Q orthonormal, R upper triangular, Q R = x to rounding, on either path; and the path is the one expected:
    the fast CholeskyQR2 on well-conditioned input, Householder on ill-conditioned or rank-deficient input."""
    if m == 1 and not math.isfinite(kappa):
        pytest.skip("a single column has no rank deficiency short of zero")
    x = _conditioned(gen(seed_of(kappa, n, m, "basis")), n, m, kappa).to(dtype)
    calls = _householder_calls(monkeypatch)
    q, r = orthonormal_basis(x)
    assert ("householder" if calls else "cholqr2") == (path if m > 1 else "cholqr2")
    u = torch.finfo(dtype).eps
    assert q.shape == (n, m) and r.shape == (m, m)
    assert torch.equal(r, torch.triu(r))
    assert float(torch.linalg.matrix_norm(q.mT @ q - torch.eye(m, dtype=dtype))) <= 50 * m * u
    assert float(torch.linalg.matrix_norm(x - q @ r)) <= 50 * m * u * float(torch.linalg.matrix_norm(x))


def test_orthonormal_basis_wide_and_zero_input():
    g = gen(41)
    wide = torch.randn(5, 9, generator=g, dtype=DT)
    q, r = orthonormal_basis(wide)
    assert q.shape == (5, 5) and r.shape == (5, 9)
    assert_close(q @ r, wide, 1e-13, "wide QR")
    q0, r0 = orthonormal_basis(torch.zeros(30, 4, dtype=DT))
    assert float(r0.abs().max()) == 0.0 and q0.shape == (30, 4)


@pytest.mark.parametrize("delta", [1e-2, 1e-5, 1e-9, 0.0])
def test_factored_svd_on_realistic_flexlora_stacks(delta):
    """What real rounds send: every client's A starts as rows of one shared A₀ (or of the last global factors)
    and moves by a small local update, so the stack holds near-duplicate rows (exact duplicates at delta 0).
    The factored SVD must still equal the dense one, whichever QR path the conditioning selects."""
    g = gen(seed_of(delta, "realistic"))
    d_out, d_in, ranks = 48, 36, (8, 4, 4, 2)
    a0 = torch.randn(max(ranks), d_in, generator=g, dtype=DT) / d_in ** 0.5
    b0 = torch.randn(d_out, max(ranks), generator=g, dtype=DT) / max(ranks) ** 0.5
    ups = []
    for k, r in enumerate(ranks):
        a = a0[:r] + delta * torch.randn(r, d_in, generator=g, dtype=DT)
        b = b0[:, :r] + delta * torch.randn(d_out, r, generator=g, dtype=DT)
        ups.append(ClientUpdate(k, r, 16.0 / r, 10 + 7 * k, {"m": (a, b)}))
    a_s, b_s = stack(ups, probs(ups), "m")
    dense = dense_delta(ups, "m")
    u, s, v = factored_svd(b_s, a_s)
    s_ref = torch.linalg.svdvals(dense)
    q = s.numel()
    assert float((s - s_ref[:q]).abs().max()) <= 1e-12 * float(s_ref[0])
    assert_close(u @ torch.diag(s) @ v.T, dense, 1e-12, "reconstruction")
    m = get_method("flexlora")
    state = m.aggregate(ups, GlobalState()).state
    for up in ups:  # Eckart–Young for every client, as in test_flexlora_redistribution_is_best_rank_r
        a_c, b_c = start_of(m, state, up.rank, up.scaling)["m"]
        err = fro(dense - up.scaling * (b_c @ a_c)) ** 2
        assert err == pytest.approx(float((s_ref[up.rank:] ** 2).sum()), rel=1e-8, abs=1e-24 + 1e-12 * fro(dense) ** 2)


def test_svd_factors_product_and_order():
    g = gen(31)
    b, a = torch.randn(20, 6, generator=g, dtype=DT), torch.randn(6, 11, generator=g, dtype=DT)
    a2, b2 = svd_factors(b, a)
    assert_close(b2 @ a2, b @ a, 1e-12, "B'A'")
    norms = torch.linalg.vector_norm(b2, dim=0) * torch.linalg.vector_norm(a2, dim=1)
    assert torch.all(norms[:-1] >= norms[1:])
    assert_close(norms, torch.linalg.svdvals(b @ a)[:6], 1e-12, "σ")


def test_product_fro_norm_matches_dense():
    g = gen(37)
    for m in (1, 5, 40):
        b, a = torch.randn(17, m, generator=g, dtype=DT), torch.randn(m, 9, generator=g, dtype=DT)
        assert product_fro_norm(b, a) == pytest.approx(fro(b @ a), rel=1e-12)


# ----------------------------------------------------------------------------------------------------
# scaling: α/r vs rsLoRA α/√r
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("r", [1, 4, 16])
def test_scaling_lora_vs_rslora(method, r):
    """One client, same factors: the aggregate's effective update is s·B·A with s = α/r or α/√r,
    so rsLoRA's is √r times LoRA's."""
    alpha = 8.0
    g = gen(41 + r)
    a = torch.randn(r, 10, generator=g, dtype=DT)
    b = torch.randn(14, r, generator=g, dtype=DT)
    eff = {}
    for mode in ("lora", "rslora"):
        s = scaling_of(r, alpha, mode)
        u = ClientUpdate(0, r, s, 7, {"m": (a.clone(), b.clone())})
        agg = get_method(method).aggregate([u], GlobalState())
        pair = agg.merge["m"] if method == "flora" else agg.state.adapter["m"]
        eff[mode] = effective(pair)
        assert_close(eff[mode], s * (b @ a), 1e-12, mode)
    assert_close(eff["rslora"], math.sqrt(r) * eff["lora"], 1e-12, "rslora = √r · lora")
    if r == 1:
        assert torch.equal(eff["rslora"], eff["lora"]) or fro(eff["rslora"] - eff["lora"]) < 1e-12 * fro(eff["lora"])


def test_scaling_mixed_clients_fold_per_client():
    """Two clients with identical factors but s = α/r and α/√r: the sum weights each by its own s_k."""
    r, alpha = 16, 32.0
    g = gen(43)
    a, b = torch.randn(r, 5, generator=g, dtype=DT), torch.randn(9, r, generator=g, dtype=DT)
    ups = [ClientUpdate(0, r, alpha / r, 1, {"m": (a, b)}), ClientUpdate(1, r, alpha / math.sqrt(r), 3, {"m": (a, b)})]
    expected = (0.25 * 2.0 + 0.75 * 8.0) * (b @ a)
    for method in ALL_METHODS:
        agg = get_method(method).aggregate(ups, GlobalState())
        pair = agg.merge["m"] if method == "flora" else agg.state.adapter["m"]
        assert_close(effective(pair), expected, 1e-12, method)


# ----------------------------------------------------------------------------------------------------
# client weights
# ----------------------------------------------------------------------------------------------------
def _u(n: int, k: int = 0) -> ClientUpdate:
    return ClientUpdate(k, 1, 1.0, n, {})


def test_client_weights_are_proportional_for_every_subset():
    population = [_u(n, k) for k, n in enumerate([1, 7, 13, 120, 3, 50, 999, 2])]
    for size in range(1, len(population) + 1):
        for subset in itertools.combinations(population, size):
            w = client_weights(list(subset))
            total = sum(u.num_examples for u in subset)
            assert len(w) == size
            assert all(isinstance(x, float) and x > 0 for x in w)
            assert w == [u.num_examples / total for u in subset]
            assert abs(math.fsum(w) - 1.0) <= size * EPS
    assert client_weights([_u(5)]) == [1.0]


@pytest.mark.parametrize("counts", [[1] * 10, [3, 3, 3, 1], [1] * 19 + [7], [82, 448, 675, 77, 686, 777, 857, 864, 574]])
def test_client_weights_sum_within_k_ulp(counts):
    """The documented contract (methods/base.py): Σ p_k = 1 within K ulp. Not exactly: n_k/Σn is rounded
    per client, and these count lists (ten equal clients among them) give 0.9999999999999999."""
    w = client_weights([_u(x, k) for k, x in enumerate(counts)])
    assert abs(sum(w) - 1.0) <= len(w) * EPS
    assert abs(math.fsum(w) - 1.0) <= len(w) * EPS


def test_client_weights_sum_within_k_ulp_any_subset():
    rng = random.Random(1)
    population = [_u(rng.randint(1, 1000), k) for k in range(12)]
    for _ in range(2000):
        subset = rng.sample(population, rng.randint(1, 12))
        w = client_weights(subset)
        assert abs(sum(w) - 1.0) <= len(w) * EPS, [u.num_examples for u in subset]


@pytest.mark.parametrize("counts", [[0], [0, 0, 0]])
def test_client_weights_zero_total_raises(counts):
    with pytest.raises(ValueError, match="num_examples"):
        client_weights([_u(n, k) for k, n in enumerate(counts)])
    for method in ALL_METHODS:
        g = gen(1)
        ups = make_updates(g, {"m": (4, 3)}, (2,) * len(counts), "lora", examples=counts)
        with pytest.raises(ValueError, match="num_examples"):
            get_method(method).aggregate(ups, GlobalState())


def test_zero_example_client_contributes_nothing():
    g = gen(47)
    ups = make_updates(g, {"m": (6, 4)}, (2, 2, 2), "mixed", examples=[5, 0, 7])
    for method in ALL_METHODS:
        full = get_method(method).aggregate(ups, GlobalState())
        dropped = get_method(method).aggregate([ups[0], ups[2]], GlobalState())
        pf = full.merge["m"] if method == "flora" else full.state.adapter["m"]
        pd = dropped.merge["m"] if method == "flora" else dropped.state.adapter["m"]
        assert_close(effective(pf), effective(pd), 1e-13, method)


def test_mismatched_modules_raise():
    g = gen(53)
    u0 = make_updates(g, {"a": (4, 3), "b": (5, 3)}, (2,), "lora")[0]
    u1 = make_updates(g, {"a": (4, 3)}, (2,), "lora")[0]
    for method in ALL_METHODS:
        with pytest.raises(ValueError, match="factors"):
            get_method(method).aggregate([u0, u1], GlobalState())


# ----------------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,cls", [("fedavg-lora", FedAvgLoRA), ("fedit", FedIT), ("flora", FLoRA),
                                      ("flexlora", FlexLoRA)])
def test_get_method_returns_fresh_instances(name, cls):
    m = get_method(name)
    assert type(m) is cls and isinstance(m, AggregationMethod)
    assert m.name == name and METHODS[name] is cls
    assert get_method(name) is not m


def test_unknown_method_lists_registered():
    with pytest.raises(KeyError) as exc:
        get_method("fedprox-lora")
    msg = str(exc.value)
    assert "fedprox-lora" in msg
    for name in ("fedavg-lora", "fedit", "flexlora", "flora"):
        assert name in msg
    assert {"fedavg-lora", "fedit", "flexlora", "flora"} <= set(METHODS)


def test_fedit_recipe():
    # Shepherd's main.py keyword defaults, as methods/fedit.py cites them
    assert FedIT.recipe == {"client_fraction": 0.1, "rank": 16, "lora_alpha": 16.0, "lora_dropout": 0.05,
                            "target_modules": ["q_proj"], "lr": 3e-4, "prompt_template": "alpaca"}
    assert FedAvgLoRA.recipe == {}
