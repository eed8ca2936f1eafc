"""First-principles tests of HetLoRA, FFA-LoRA, FedSA-LoRA, FedEx-LoRA, FLoRIST, LoRA-FAIR, RoLoRA and the top-R SVD
(float64, random shapes with d_in ≠ d_out, mixed ranks), in the style of test_methods_math.py: every reference is
formed densely and independently of methods/factors.py (the d_out × d_in products, padding by hand, p_k from n_k,
torch's dense SVD), so a bug in the shared algebra cannot cancel out."""
from __future__ import annotations

import math

import pytest
import torch

from methods import ClientSpec, ClientTask, ClientUpdate, GlobalState, get_method
import methods.factors as factors
from methods.factors import factored_svd, gram_energy, svd_factors_top, svd_for_energy, top_svd
from test_methods_math import (DT, RANK_MIXES, SHAPES, assert_close, dense_delta, fro, gen, make_updates,
                               module_shapes, probs, scaling_of, seed_of)

NEW_METHODS = ["hetlora", "ffa-lora", "fedsa-lora", "fedex-lora", "florist", "lora-fair", "rolora"]


def task_of(m, state, rank, scaling, rnd=None):
    return m.configure(state, ClientSpec(0, rank, scaling, state.round + 1 if rnd is None else rnd))


def pad_by_hand(t: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    out = torch.zeros((rank, t.shape[1]) if dim == 0 else (t.shape[0], rank), dtype=t.dtype)
    if dim == 0:
        out[: t.shape[0]] = t
    else:
        out[:, : t.shape[1]] = t
    return out


def shared_a_updates(g, shapes, ranks, mode="mixed", frozen=None):
    """Clients that share A (rows of one draw, as FFA-LoRA / RoLoRA B-rounds have it), random trained B."""
    top = max(ranks)
    base_a = frozen or {n: torch.randn(top, d_in, generator=g, dtype=DT) for n, (_, d_in) in shapes.items()}
    ups = []
    for k, r in enumerate(ranks):
        factors = {n: (base_a[n][:r].clone(), torch.randn(d_out, r, generator=g, dtype=DT))
                   for n, (d_out, _) in shapes.items()}
        ups.append(ClientUpdate(k, r, scaling_of(r, 16.0, mode, k), int(torch.randint(1, 50, (1,), generator=g)), factors))
    return ups, base_a


def dense_svd(x):
    return torch.linalg.svd(x, full_matrices=False)


# ----------------------------------------------------------------------------------------------------
# the registry: every method lists a description, a citation, and refuses bad options in one line
# ----------------------------------------------------------------------------------------------------
def test_registry_lists_thirteen_methods_with_description_and_citation():
    from methods import METHODS

    assert len(METHODS) == 13 and set(NEW_METHODS) | {"fedsvd", "fed-sb"} <= set(METHODS)
    for name, cls in METHODS.items():
        assert cls.description and "\n" not in cls.description, name
        assert cls.citation and any(y in cls.citation for y in ("2017", "2024", "2025")), name


@pytest.mark.parametrize("name,bad", [("hetlora", {"gamma": 1.5}), ("hetlora", {"weighting": "x"}),
                                      ("florist", {"tau": 0.0}), ("lora-fair", {"lam": -1.0}),
                                      ("rolora", {"first": "C"}), ("florist", {"nope": 1})])
def test_bad_options_refused_in_one_line(name, bad):
    with pytest.raises(ValueError) as exc:
        get_method(name, bad)
    assert "\n" not in str(exc.value) and str(exc.value).startswith("method_options:")


# ----------------------------------------------------------------------------------------------------
# HetLoRA: sparsity-weighted zero-padded average, truncation, tail regularizer, self-pruning
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ranks", RANK_MIXES)
def test_hetlora_weights_are_update_norms_and_state_is_padded_mean(shape, ranks):
    ups = make_updates(gen(seed_of("het", shape, ranks)), module_shapes(*shape), ranks)
    agg = get_method("hetlora").aggregate(ups, GlobalState(round=2))
    rmax = max(ranks)
    for name in ups[0].factors:
        norms = [u.scaling * fro(u.factors[name][1] @ u.factors[name][0]) for u in ups]   # dense ‖s_k B_k A_k‖_F
        w = [x / sum(norms) for x in norms]
        a_ref = sum(wk * pad_by_hand(u.factors[name][0], rmax, 0) for wk, u in zip(w, ups))
        b_ref = sum(wk * u.scaling * pad_by_hand(u.factors[name][1], rmax, 1) for wk, u in zip(w, ups))
        a, b = agg.state.adapter[name]
        assert_close(a, a_ref, 1e-13, "Ā")
        assert_close(b, b_ref, 1e-13, "B̄")
        exact = sum(wk * u.scaling * u.factors[name][1] @ u.factors[name][0] for wk, u in zip(w, ups))
        assert agg.metrics["noise_per_module"][name] == pytest.approx(fro(b_ref @ a_ref - exact) / fro(exact), rel=1e-9)
    assert sum(agg.metrics["weights"].values()) == pytest.approx(1.0, abs=1e-12)


def test_hetlora_examples_weighting_is_fedavg():
    ups = make_updates(gen(11), module_shapes(9, 14), (8, 4, 2))
    het = get_method("hetlora", {"weighting": "examples"}).aggregate(ups, GlobalState()).state.adapter
    avg = get_method("fedavg-lora").aggregate(ups, GlobalState()).state.adapter
    assert all(torch.equal(het[n][0], avg[n][0]) and torch.equal(het[n][1], avg[n][1]) for n in het)


def test_hetlora_penalty_is_lambda_times_tail_product_norms():
    m = get_method("hetlora", {"gamma": 0.7, "lam": 0.3})
    g = gen(3)
    live = {f"m{i}": (torch.randn(10, 13, generator=g, dtype=DT, requires_grad=True),
                      torch.randn(6, 10, generator=g, dtype=DT, requires_grad=True)) for i in range(2)}
    pen = m.client_penalty(live, ClientTask())
    start = math.floor(0.7 * 10)
    ref = sum(fro(b[:, start:] @ a[start:]) for a, b in live.values())
    assert float(pen) == pytest.approx(0.3 * ref, rel=1e-12)
    pen.backward()
    assert all(torch.isfinite(t.grad).all() for pair in live.values() for t in pair)
    # at B = 0 (a fresh adapter) the penalty is 0 and its gradient 0, never NaN
    zero = {"m": (torch.randn(10, 13, generator=g, dtype=DT, requires_grad=True),
                  torch.zeros(6, 10, dtype=DT, requires_grad=True))}
    p0 = m.client_penalty(zero, ClientTask())
    p0.backward()
    assert float(p0) < 1e-100 and all(torch.equal(t.grad, torch.zeros_like(t)) for t in zero["m"])


def test_hetlora_prunes_only_when_the_tail_shrank():
    m = get_method("hetlora", {"gamma": 0.75})
    g = gen(4)
    a0, b0 = torch.randn(8, 11, generator=g, dtype=DT), torch.randn(5, 8, generator=g, dtype=DT)
    task = ClientTask(init={"m": (a0, b0)})
    shrunk = {"m": (a0.clone(), torch.cat([b0[:, :6], 0.5 * b0[:, 6:]], 1))}
    grown = {"m": (a0.clone(), torch.cat([b0[:, :6], 2.0 * b0[:, 6:]], 1))}
    out = m.client_finish(shrunk, task)
    assert out["m"][0].shape == (6, 11) and torch.equal(out["m"][0], a0[:6]) and torch.equal(out["m"][1], shrunk["m"][1][:, :6])
    assert m.client_finish(grown, task)["m"][0].shape[0] == 8
    # a first round (fresh init, tail 0 at the start) never prunes; min_rank bounds the pruning
    assert m.client_finish(shrunk, ClientTask())["m"][0].shape[0] == 8
    tiny = get_method("hetlora", {"gamma": 0.5, "min_rank": 2})
    two = {"m": (a0[:2].clone(), b0[:, :2].clone())}
    assert tiny.client_finish(two, ClientTask(init={"m": (a0[:2], 3 * b0[:, :2])}))["m"][0].shape[0] == 2


@pytest.mark.parametrize("ranks", RANK_MIXES)
def test_hetlora_truncation_is_the_global_slice(ranks):
    ups = make_updates(gen(seed_of("het-trunc", ranks)), module_shapes(12, 7), ranks)
    m = get_method("hetlora")
    state = m.aggregate(ups, GlobalState()).state
    for r in sorted(set(ranks)):
        s = scaling_of(r, 16.0, "lora")
        init = task_of(m, state, r, s).init
        for name, (a, b) in state.adapter.items():
            assert torch.equal(init[name][0], a[:r]) and torch.allclose(s * init[name][1], b[:, :r], rtol=1e-15, atol=0)


# ----------------------------------------------------------------------------------------------------
# FFA-LoRA: A frozen and shared, only B trained and averaged: exact for any ranks
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ranks", RANK_MIXES)
def test_ffa_exact_aggregation_and_a_unchanged(shape, ranks):
    g = gen(seed_of("ffa", shape, ranks))
    shapes = module_shapes(*shape)
    m = get_method("ffa-lora")
    # round 1: every client uploads its (shared, untrained) A with its B
    ups, base_a = shared_a_updates(g, shapes, ranks)
    agg = m.aggregate(ups, GlobalState())
    for name in shapes:
        a, b = agg.state.adapter[name]
        assert torch.equal(a, base_a[name][: max(ranks)])                     # A: the shared draw, bit for bit
        assert_close(b @ a, dense_delta(ups, name), 1e-12, "B̄A = Σ p s B A")   # exact
    assert agg.metrics["noise"] == 0.0 and agg.metrics["a_mismatch"] == 0.0
    # round 2: the server sends A; clients within its rows upload only B; A stays bit for bit
    for r in sorted(set(ranks)):
        task = task_of(m, agg.state, r, scaling_of(r, 16.0, "lora"))
        assert task.train == "B" and task.upload == "B"
        assert all(torch.equal(task.init[n][0], agg.state.adapter[n][0][:r]) for n in shapes)
    ups2, _ = shared_a_updates(g, shapes, ranks, frozen={n: agg.state.adapter[n][0] for n in shapes})
    for u in ups2:
        u.factors = {n: (None, b) for n, (_, b) in u.factors.items()}
    agg2 = m.aggregate(ups2, agg.state)
    for name in shapes:
        assert torch.equal(agg2.state.adapter[name][0], agg.state.adapter[name][0])
        exact = sum(p * u.scaling * u.factors[name][1] @ base_a[name][: u.rank] for u, p in zip(ups2, probs(ups2)))
        assert_close(agg2.state.adapter[name][1] @ agg2.state.adapter[name][0], exact, 1e-12, "round 2 exact")


def test_ffa_larger_client_uploads_its_new_rows_once_and_a_changed_a_is_flagged():
    g = gen(9)
    shapes = module_shapes(10, 6)
    m = get_method("ffa-lora")
    ups, base_a = shared_a_updates(g, shapes, (2, 2))
    state = m.aggregate(ups, GlobalState()).state
    assert task_of(m, state, 5, 1.0).upload == "AB" and task_of(m, state, 2, 1.0).upload == "B"
    big, _ = shared_a_updates(g, shapes, (5,))
    big[0].factors = {n: (torch.cat([state.adapter[n][0], big[0].factors[n][0][2:]], 0), b)
                      for n, (_, b) in big[0].factors.items()}
    agg = m.aggregate(big, state)
    assert all(agg.state.adapter[n][0].shape[0] == 5 and torch.equal(agg.state.adapter[n][0][:2], state.adapter[n][0])
               for n in shapes)
    bent = [ClientUpdate(0, 2, 1.0, 3, {n: (state.adapter[n][0] + 1e-3, torch.ones(shapes[n][0], 2, dtype=DT))
                                         for n in shapes})]
    assert m.aggregate(bent, state).metrics["a_mismatch"] == pytest.approx(1e-3)


# ----------------------------------------------------------------------------------------------------
# FedSA-LoRA: A averaged per row over the clients that hold it; B stays on the client
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ranks", RANK_MIXES)
def test_fedsa_a_is_the_per_row_mean_and_b_never_reaches_the_server(ranks):
    g = gen(seed_of("fedsa", ranks))
    shapes = module_shapes(13, 8)
    ups = make_updates(g, shapes, ranks)
    for u in ups:  # what the server receives: A only
        u.factors = {n: (a, None) for n, (a, _) in u.factors.items()}
    m = get_method("fedsa-lora")
    prev = {n: (torch.randn(max(ranks) + 2, d_in, generator=g, dtype=DT), None) for n, (_, d_in) in shapes.items()}
    agg = m.aggregate(ups, GlobalState(prev, round=4))
    n_k = [u.num_examples for u in ups]
    for name in shapes:
        a, b = agg.state.adapter[name]
        assert b is None
        for i in range(a.shape[0]):
            holders = [k for k, u in enumerate(ups) if u.rank > i]
            if holders:
                ref = sum(n_k[k] * ups[k].factors[name][0][i] for k in holders) / sum(n_k[k] for k in holders)
                assert_close(a[i], ref, 1e-13, f"row {i}")
            else:
                assert torch.equal(a[i], prev[name][0][i])
    task = task_of(m, agg.state, 3, 2.0)
    assert (task.train, task.keep, task.upload) == ("AB", "B", "A")
    assert all(task.init[n][1] is None and torch.equal(task.init[n][0], agg.state.adapter[n][0][:3]) for n in shapes)
    assert m.personalized and not m.has_global_model
    assert task_of(m, GlobalState(), 3, 2.0).init is None


# ----------------------------------------------------------------------------------------------------
# FedEx-LoRA: FedAvg state plus the residual merged into the base: exact; bytes recorded both ways
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ranks", RANK_MIXES)
def test_fedex_base_plus_global_is_exact(shape, ranks):
    ups = make_updates(gen(seed_of("fedex", shape, ranks)), module_shapes(*shape), ranks)
    agg = get_method("fedex-lora").aggregate(ups, GlobalState())
    avg = get_method("fedavg-lora").aggregate(ups, GlobalState())
    factored = dense = 0
    for name in ups[0].factors:
        a, b = agg.state.adapter[name]
        assert torch.equal(a, avg.state.adapter[name][0]) and torch.equal(b, avg.state.adapter[name][1])
        ma, mb = agg.merge[name]
        assert_close(mb @ ma + b @ a, dense_delta(ups, name), 1e-12, "base' + B̄Ā")
        d_out, d_in = b.shape[0], a.shape[1]
        factored += (sum(ranks) + max(ranks)) * (d_in + d_out) * 4
        dense += d_out * d_in * 4
    assert agg.metrics["residual_bytes_factored"] == factored and agg.metrics["residual_bytes_dense"] == dense
    assert agg.metrics["noise"] == 0.0 and agg.metrics["fedavg_noise"] == pytest.approx(avg.metrics["noise"], rel=1e-12)


# ----------------------------------------------------------------------------------------------------
# FLoRIST: energy threshold → one global rank per module, merged; retained energy ≥ τ; Eckart–Young
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ranks", RANK_MIXES)
@pytest.mark.parametrize("tau", [0.5, 0.9, 0.99, 1.0])
def test_florist_rank_rule_and_truncation(shape, ranks, tau):
    ups = make_updates(gen(seed_of("florist", shape, ranks)), module_shapes(*shape), ranks)
    agg = get_method("florist", {"tau": tau}).aggregate(ups, GlobalState(round=1))
    assert agg.state.adapter == {} and agg.state.round == 2
    for name in ups[0].factors:
        dw = dense_delta(ups, name)
        _, s, _ = dense_svd(dw)
        frac = torch.cumsum(s ** 2, 0) / (s ** 2).sum()
        k_ref = int((frac < tau - 1e-12).sum()) + 1
        k = agg.metrics["rank_per_module"][name]
        assert k == min(k_ref, s.numel())
        assert agg.metrics["retained_energy"][name] >= tau - 1e-12
        assert agg.metrics["retained_energy"][name] == pytest.approx(float(frac[k - 1]), abs=1e-12)
        a, b = agg.merge[name]
        assert a.shape[0] == b.shape[1] == k
        # the best rank-k approximation: error = energy beyond k (Eckart–Young)
        assert fro(dw - b @ a) == pytest.approx(float(s[k:].norm()), rel=1e-9, abs=1e-12 * float(s[0]))
    assert get_method("florist").configure(agg.state, ClientSpec(0, 4, 1.0, 2)).init is None


# ----------------------------------------------------------------------------------------------------
# LoRA-FAIR: the correction lowers the objective, raises the similarity; λ → ∞ is FedAvg; λ = 0 the optimum
# ----------------------------------------------------------------------------------------------------
def cos_dense(x, y):
    return float((x * y).sum() / (fro(x) * fro(y)))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ranks", RANK_MIXES)
def test_lora_fair_correction_improves_the_objective(shape, ranks):
    ups = make_updates(gen(seed_of("fair", shape, ranks)), module_shapes(*shape), ranks)
    lam = 0.01
    agg = get_method("lora-fair", {"lam": lam}).aggregate(ups, GlobalState())
    avg = get_method("fedavg-lora").aggregate(ups, GlobalState()).state.adapter
    unit = sum(p * u.scaling for u, p in zip(ups, probs(ups)))
    for name in ups[0].factors:
        dw = dense_delta(ups, name)
        a_bar, b_bar = avg[name]
        a, b = agg.state.adapter[name]
        assert torch.equal(a, a_bar)                                      # A: the plain average, untouched
        obj = lambda bb: 1 - cos_dense(dw, bb @ a_bar) + lam * fro(bb - b_bar) / unit
        assert obj(b) <= obj(b_bar) + 1e-12
        assert cos_dense(dw, b @ a) >= cos_dense(dw, b_bar @ a_bar) - 1e-12
    assert agg.metrics["cos_after"] >= agg.metrics["cos_before"] - 1e-12


def test_lora_fair_limits_of_lambda():
    ups = make_updates(gen(21), module_shapes(15, 9), (4, 2, 3))
    avg = get_method("fedavg-lora").aggregate(ups, GlobalState()).state.adapter
    stiff = get_method("lora-fair", {"lam": 1e6}).aggregate(ups, GlobalState()).state.adapter
    free = get_method("lora-fair", {"lam": 0.0, "iters": 500}).aggregate(ups, GlobalState()).state.adapter
    for name in avg:
        assert_close(stiff[name][1], avg[name][1], 1e-9, "λ→∞: no correction")
        dw = dense_delta(ups, name)
        a_bar = avg[name][0]
        # the best direction reachable with rows of Ā: ΔW projected on Ā's row space
        proj = dw @ a_bar.T @ torch.linalg.solve(a_bar @ a_bar.T, a_bar)
        assert cos_dense(dw, free[name][1] @ a_bar) == pytest.approx(fro(proj) / fro(dw), abs=1e-9)


# ----------------------------------------------------------------------------------------------------
# RoLoRA: alternating B- and A-rounds, each exact; the frozen factor unchanged bit for bit
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ranks", RANK_MIXES)
def test_rolora_alternates_exactly(shape, ranks):
    g = gen(seed_of("rolora", shape, ranks))
    shapes = module_shapes(*shape)
    m = get_method("rolora")
    assert [task_of(m, GlobalState(), 4, 1.0, rnd).train for rnd in (1, 2, 3, 4)] == ["B", "A", "B", "A"]
    ups, base_a = shared_a_updates(g, shapes, ranks)                        # round 1: B trained, A shared
    s1 = m.aggregate(ups, GlobalState()).state
    for name in shapes:
        assert torch.equal(s1.adapter[name][0], base_a[name][: max(ranks)])
        assert_close(s1.adapter[name][1] @ s1.adapter[name][0], dense_delta(ups, name), 1e-12, "B-round")
    # round 2: every client starts from (A, B̄/s_k), trains A, uploads A; B̄ stays bit for bit
    ups2 = []
    for k, r in enumerate(ranks):
        s = scaling_of(r, 16.0, "mixed", k)
        task = task_of(m, s1, r, s)
        assert (task.train, task.upload) == ("A", "A")
        factors = {n: (a0 + torch.randn(a0.shape, generator=g, dtype=DT), b0) for n, (a0, b0) in task.init.items()}
        ups2.append(ClientUpdate(k, r, s, k + 3, factors))
    agg2 = m.aggregate([ClientUpdate(u.client_id, u.rank, u.scaling, u.num_examples,
                                     {n: (a, None) for n, (a, _) in u.factors.items()}) for u in ups2], s1)
    for name in shapes:
        assert torch.equal(agg2.state.adapter[name][1], s1.adapter[name][1])
        exact = dense_delta(ups2, name)                                       # Σ p s_k (B̄/s_k) A_k
        assert_close(agg2.state.adapter[name][1] @ agg2.state.adapter[name][0], exact, 1e-12, "A-round")
    assert agg2.metrics["noise"] == 0.0 and agg2.metrics["trained_b"] == 0


def test_rolora_partial_participation_keeps_rows_and_measures_them():
    g = gen(8)
    shapes = module_shapes(9, 7)
    m = get_method("rolora")
    ups, _ = shared_a_updates(g, shapes, (6, 2), mode="lora")
    s1 = m.aggregate(ups, GlobalState()).state
    small = ClientUpdate(1, 2, 8.0, 5, {n: (s1.adapter[n][0][:2] + 0.1, None) for n in shapes})
    agg = m.aggregate([small], s1)
    for n in shapes:
        assert torch.equal(agg.state.adapter[n][0][2:], s1.adapter[n][0][2:])   # rows no client held: kept
    assert agg.metrics["noise"] > 0


# ----------------------------------------------------------------------------------------------------
# top-R SVD through the factors: both paths agree with torch's dense SVD
# ----------------------------------------------------------------------------------------------------
def stacked(g, d_out, d_in, ranks, shared_a=False, spread=1.0):
    a0 = torch.randn(max(ranks), d_in, generator=g, dtype=DT)
    a = torch.cat([a0[:r] + (0 if shared_a else 1) * torch.randn(r, d_in, generator=g, dtype=DT) for r in ranks], 0)
    w = torch.cat([torch.full((r,), spread ** -(i % 4), dtype=DT) for i, r in enumerate(ranks)])
    b = torch.randn(d_out, sum(ranks), generator=g, dtype=DT) * w
    return b, a


@pytest.mark.parametrize("d_out,d_in,ranks,k", [(400, 300, [8] * 30, 8), (300, 420, [4, 8, 2, 16, 4] * 8, 12),
                                                (450, 350, [16, 8, 4, 4] * 12, 16)])
@pytest.mark.parametrize("shared_a", [False, True])
def test_top_svd_krylov_matches_dense(d_out, d_in, ranks, k, shared_a):
    g = gen(seed_of("top", d_out, d_in, len(ranks), k, shared_a))
    b, a = stacked(g, d_out, d_in, ranks, shared_a, spread=3.0)
    u_ref, s_ref, vh_ref = dense_svd(b @ a)
    block = k + max(k // 2, 8)
    krylov = factors._krylov_top_svd(b, a, k, block, 1e-12, 12)
    assert krylov is not None, "the Krylov path converged (no silent fallback)"
    for path, out in (("krylov", krylov), ("exact", top_svd(b, a, k, path="exact")), ("auto", top_svd(b, a, k))):
        u, s, v = out
        assert s.shape == (k,) and u.shape == (d_out, k) and v.shape == (d_in, k)
        # the Krylov path iterates in float32 and finishes in float64: values to the angle², ≪ the 1e-6 goal
        assert float(((s - s_ref[:k]).abs() / s_ref[:k]).max()) <= (1e-8 if path != "exact" else 1e-12), path
        assert_close(u.T @ u, torch.eye(k, dtype=DT), 1e-12, "U orthonormal")
        assert_close(v.T @ v, torch.eye(k, dtype=DT), 1e-12, "V orthonormal")
        assert_close(u.T @ (b @ (a @ v)), torch.diag(s), 1e-10, "UᵀMV = S")
        # Eckart–Young: the rank-k truncation's error is the energy beyond k
        # (second order in the angle; where M has rank k the residual is the vectors' accuracy: float32-level
        # on the Krylov path, which iterates in float32: ≈ eps32 · σ_1/σ_k)
        assert fro(b @ a - u @ torch.diag(s) @ v.T) == pytest.approx(float(s_ref[k:].norm()), rel=1e-8,
                                                                    abs=1e-4 * float(s_ref[0]))


def test_top_svd_chooses_exact_for_few_clients_and_krylov_for_many():
    from methods.factors import krylov_pays

    assert not krylov_pays(160, 64) and krylov_pays(800, 64) and krylov_pays(1600, 64)
    g = gen(2)
    b, a = stacked(g, 40, 30, [4, 4, 2], spread=1.0)                  # m < k: exact, everything
    u, s, v = top_svd(b, a, 64)
    assert s.numel() == 10 and torch.allclose(s, dense_svd(b @ a)[1][:10], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("m,d_out,d_in,k,path", [(1600, 4096, 4096, 64, "krylov"), (160, 4096, 4096, 64, "exact"),
                                                  (1600, 576, 576, 64, "dense"), (800, 192, 576, 8, "dense"),
                                                  (40, 300, 200, 64, "exact"), (576, 576, 1536, 8, "dense")])
def test_top_path_names_the_way_svd_factors_top_goes(m, d_out, d_in, k, path):
    """Σr ≥ the narrower width: dense; few clients or k ≥ Σr: exact; many clients: Krylov (the benchmark's records
    name the path through this one function)."""
    assert factors.top_path(m, d_out, d_in, k) == path


def test_gram_energy_and_svd_factors_top_are_exact():
    g = gen(5)
    b, a = stacked(g, 400, 300, [8, 4, 16, 2] * 8, spread=2.0)   # Σr = 240 < both widths: the Krylov path
    assert gram_energy(b, a) == pytest.approx(fro(b @ a) ** 2, rel=1e-12)
    a2, b2, ordered, energy = svd_factors_top(b, a, 6)
    assert ordered == 6 and a2.shape[0] == b.shape[1] + 12  # [top-6 | the remainder, factored: A; A_6]
    assert_close(b2 @ a2, b @ a, 1e-12, "state = ΔW exactly")
    _, s_ref, _ = dense_svd(b @ a)
    # the first 6: the best rank-6 approximation (its error, second order in the subspace angle, to 1e-9; the
    # matrix itself to the angle, ≈ √tol of top_svd's value tolerance)
    assert fro(b @ a - b2[:, :6] @ a2[:6]) == pytest.approx(float(s_ref[6:].norm()), rel=1e-9)
    assert_close(b2[:, :6] @ a2[:6], (lambda u, s, vh: u[:, :6] @ torch.diag(s[:6]) @ vh[:6])(*dense_svd(b @ a)),
                 1e-5, "first 6 vs the dense truncation")
    # ‖ΔW‖² from the float32 Grams of the factors: relative 1e-7 (the truncation-loss meter's accuracy)
    assert energy == pytest.approx(float((s_ref ** 2).sum()), rel=1e-6)


@pytest.mark.parametrize("d_out,d_in,ranks,k", [(400, 300, [8] * 30, 8), (300, 420, [4, 8, 2, 16, 4] * 8, 12)])
@pytest.mark.parametrize("shared_a", [False, True])
def test_gram_krylov_state_in_place_matches_dense_svd(d_out, d_in, ranks, k, shared_a):
    """The Gram-coefficient path on a stack with `spare` leading rows (FlexLoRA's aggregate): its top-k values
    equal the dense SVD's, its state is ΔW exactly, its slices are the best rank-r approximations (Eckart–Young),
    its energy is ‖ΔW‖²; the factors are written in place into the stack's buffers (spare rows at both ends).
    Shared A rows (a stack of rank below the Krylov block): the Gram iteration cannot orthonormalize, the
    fallback answers the same."""
    g = gen(seed_of("gram", d_out, d_in, len(ranks), k, shared_a))
    b, a = stacked(g, d_out, d_in, ranks, shared_a, spread=3.0)
    m = b.shape[1]
    assert factors.krylov_pays(m, k)
    dw = b @ a
    _, s_ref, _ = dense_svd(dw)
    bt = torch.zeros(k + m + k, d_out, dtype=DT)
    bt[k:k + m] = b.mT
    a_full = torch.cat([torch.zeros(k, d_in, dtype=DT), a, torch.zeros(k, d_in, dtype=DT)], 0)
    a2, b2, ordered, energy = svd_factors_top(bt.mT, a_full, k, spare=k)
    assert ordered == k and a2.shape[0] == m + 2 * k
    assert a2.data_ptr() == a_full.data_ptr() and b2.data_ptr() == bt.data_ptr(), "written in place"
    assert torch.equal(a2[k:k + m], a) and torch.equal(b2[:, k:k + m], b), "the stack itself is the remainder's middle"
    s = torch.linalg.vector_norm(a2[:k], dim=1) * torch.linalg.vector_norm(b2[:, :k], dim=0)
    assert float(((s - s_ref[:k]).abs() / s_ref[:k]).max()) <= 1e-10
    assert_close(b2 @ a2, dw, 1e-11, "state = ΔW")
    for r in (1, k // 2, k):  # at r = rank (shared A), the residual is the vectors' float32-level accuracy
        assert fro(dw - b2[:, :r] @ a2[:r]) == pytest.approx(float(s_ref[r:].norm()), rel=1e-9,
                                                             abs=1e-4 * float(s_ref[0]) if shared_a else 0)
    assert energy == pytest.approx(float((s_ref ** 2).sum()), rel=1e-6)
    if shared_a:
        return
    info = {}
    bt_w = b.mT.float()
    g_a, g_b = factors.gram(a.float()), factors.gram(bt_w)
    out = factors._gram_krylov(b, a, bt_w, g_b, g_a, k, factors._block(k, m), 1e-12, 12, info)
    assert out is not None, f"the Gram iteration converged (no silent fallback): {info}"
    u, _, v = out
    assert_close(u.T @ u, torch.eye(k, dtype=DT), 1e-12, "U orthonormal")
    assert_close(v.T @ v, torch.eye(k, dtype=DT), 1e-12, "V orthonormal")


@pytest.mark.parametrize("d_out,d_in,ranks", [(90, 60, [8, 4, 16, 2] * 5), (50, 70, [8] * 10), (64, 64, [16] * 4)])
def test_a_stack_wider_than_the_layer_gets_the_whole_svd_of_the_product(d_out, d_in, ranks):
    """Σr ≥ min(d_out, d_in) (many clients on a narrow model): the product is the smaller object. factored_svd
    and svd_factors_top answer with its whole SVD: min(d_out, d_in) triplets, orthonormal, equal to the dense
    SVD's; the state is ΔW exactly and every slice the best rank-r approximation; the energy is Σσ²."""
    g = gen(seed_of("wide", d_out, d_in, len(ranks)))
    b, a = stacked(g, d_out, d_in, ranks, spread=2.0)
    q = min(d_out, d_in)
    assert b.shape[1] >= q
    dw = b @ a
    _, s_ref, _ = dense_svd(dw)
    u, s, v = factored_svd(b, a)
    assert u.shape == (d_out, q) and s.shape == (q,) and v.shape == (d_in, q)
    assert_close(s, s_ref[:q], 1e-12, "σ")
    assert_close(u.T @ u, torch.eye(q, dtype=DT), 1e-12, "U orthonormal")
    assert_close(v.T @ v, torch.eye(q, dtype=DT), 1e-12, "V orthonormal")
    a2, b2, ordered, energy = svd_factors_top(b, a, max(ranks))
    assert ordered == a2.shape[0] == b2.shape[1] == q
    assert_close(b2 @ a2, dw, 1e-12, "state = ΔW")
    for r in (1, max(ranks), q):
        assert fro(dw - b2[:, :r] @ a2[:r]) == pytest.approx(float(s_ref[r:].norm()), rel=1e-9, abs=1e-12 * float(s_ref[0]))
    assert energy == pytest.approx(float((s_ref ** 2).sum()), rel=1e-12)


@pytest.mark.parametrize("tau", [0.3, 0.8, 0.95])
def test_svd_for_energy_reaches_tau_on_both_paths(tau):
    g = gen(6)
    b, a = stacked(g, 160, 100, [4, 8, 2] * 10, spread=2.0)
    _, s_ref, _ = dense_svd(b @ a)
    u, s, v, energy = svd_for_energy(b, a, tau, first=4)
    assert energy == pytest.approx(float((s_ref ** 2).sum()), rel=1e-12)
    assert float((s ** 2).sum()) >= tau * energy
    assert float(((s - s_ref[: s.numel()]).abs() / s_ref[: s.numel()]).max()) <= 1e-10


def test_flexlora_krylov_state_is_exact_and_its_slices_are_best_rank_r(monkeypatch):
    import methods.factors as factors

    monkeypatch.setattr(factors, "KRYLOV_MIN_RATIO", 1)   # force the Krylov path on small shapes
    ranks = (8, 4, 4, 2) * 6                              # Σr = 108 < both widths: the Krylov path
    ups = make_updates(gen(33), module_shapes(170, 130), ranks)
    m = get_method("flexlora")
    agg = m.aggregate(ups, GlobalState())
    assert int(agg.state.extra["ordered"]) == 8
    for name in ups[0].factors:
        a, b = agg.state.adapter[name]
        dw = dense_delta(ups, name)
        assert_close(b @ a, dw, 1e-11, "global = base + ΔW")
        u, s, vh = dense_svd(dw)
        for r in (2, 4, 8):
            assert fro(dw - b[:, :r] @ a[:r]) == pytest.approx(float(s[r:].norm()), rel=1e-9)
        # ‖ΔW‖² from the float32 Grams: relative 1e-7
        assert float(agg.state.extra[f"energy/{name}"]) == pytest.approx(float((s ** 2).sum()), rel=1e-7)
    # the truncation loss a client is told uses the whole energy, not only the ordered part
    task = task_of(m, agg.state, 4, 4.0)
    loss_ref = math.sqrt(sum(float((dense_svd(dense_delta(ups, n))[1][4:] ** 2).sum()) for n in ups[0].factors)
                         / sum(float((dense_svd(dense_delta(ups, n))[1] ** 2).sum()) for n in ups[0].factors))
    assert task.info["truncation_loss"] == pytest.approx(loss_ref, rel=1e-6)
    # a client larger than any seen gets its slice ordered on the fly
    big = task_of(m, agg.state, 12, 1.0)
    for name in ups[0].factors:
        dw = dense_delta(ups, name)
        a12, b12 = big.init[name]
        assert fro(dw - b12 @ a12) == pytest.approx(float(dense_svd(dw)[1][12:].norm()), rel=1e-8)


def test_lora_fair_frobenius_variant_lowers_the_frobenius_error():
    ups = make_updates(gen(22), module_shapes(15, 9), (4, 2, 3))
    agg = get_method("lora-fair", {"similarity": "frobenius"}).aggregate(ups, GlobalState())
    assert agg.metrics["noise"] < agg.metrics["noise_fedavg"]


@pytest.mark.parametrize("n,d,blocks", [(37, 53, 8), (64, 29, 8), (5, 40, 8), (23, 11, 1), (96, 80, 3)])
def test_gram_upper_strips_equal_the_sum_of_row_products(n, d, blocks):
    """gram() computes only the upper block triangle and mirrors it: every entry must equal Σ_k x_ik x_jk, formed
    here entry by entry (float64), for n not a multiple of the blocks, n < blocks and one block; the result is
    exactly symmetric (the mirror is a copy) and in x's dtype."""
    x = torch.randn(n, d, generator=gen(seed_of("gram-strips", n, d, blocks)), dtype=DT)
    ref = (x[:, None, :] * x[None, :, :]).sum(-1)
    g = factors.gram(x, blocks=blocks)
    assert g.dtype == DT and g.shape == (n, n)
    assert torch.equal(g, g.mT), "mirrored exactly"
    assert_close(g, ref, 1e-13, "G = x xᵀ")


@pytest.mark.parametrize("n,d,rows", [(37, 53, 8), (200, 7, 200), (9, 31, 4)])
def test_inner_is_the_float64_sum_of_entrywise_products(n, d, rows):
    g = gen(seed_of("inner", n, d, rows))
    x, y = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)   # float32 in, as the Grams
    ref = sum(float(x[i, j]) * float(y[i, j]) for i in range(n) for j in range(d))
    assert factors.inner(x, y, rows=rows) == pytest.approx(ref, rel=1e-12, abs=1e-12)
