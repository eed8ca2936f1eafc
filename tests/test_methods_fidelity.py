"""What the paper-fidelity options promise, from first principles (float64, dense references): LoRA-FAIR's update
norm (the correction's shrinkage measured, and removed by preserve_norm without changing the cosine), RoLoRA's
round convention."""
from __future__ import annotations

import pytest
import torch

from methods import GlobalState, get_method
from test_methods_math import SHAPES, assert_close, gen, make_updates, module_shapes, seed_of


def dense(pair):
    a, b = pair
    return b.double() @ a.double()


def delta_w(updates, name):
    n = sum(u.num_examples for u in updates)
    return sum((u.num_examples / n) * u.scaling * dense(u.factors[name]) for u in updates)


def fro(x):
    return float(torch.linalg.matrix_norm(x))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ranks", [(4, 4, 4), (2, 4, 8)])
def test_lora_fair_norm_ratios_are_the_dense_ones(shape, ranks):
    """norm_ratio = ‖B̄'Ā‖/‖ΔW‖ and norm_ratio_fedavg = ‖B̄Ā‖/‖ΔW‖ over all modules, against dense products."""
    ups = make_updates(gen(seed_of("fair-norm", shape, ranks)), module_shapes(*shape), ranks)
    agg = get_method("lora-fair").aggregate(ups, GlobalState())
    avg = get_method("fedavg-lora").aggregate(ups, GlobalState())
    names = list(agg.state.adapter)
    target = sum(fro(delta_w(ups, n)) ** 2 for n in names) ** 0.5
    after = sum(fro(dense(agg.state.adapter[n])) ** 2 for n in names) ** 0.5
    before = sum(fro(dense(avg.state.adapter[n])) ** 2 for n in names) ** 0.5
    assert abs(agg.metrics["norm_ratio"] - after / target) <= 1e-10
    assert abs(agg.metrics["norm_ratio_fedavg"] - before / target) <= 1e-10


@pytest.mark.parametrize("shape", SHAPES)
def test_lora_fair_preserve_norm_keeps_the_direction_and_restores_the_size(shape):
    """preserve_norm: each module's corrected product is the paper-objective one times ‖ΔW‖/‖B̄'Ā‖ (same direction, so
    the same cosine), and its norm is ‖ΔW‖; the relative error to ΔW is then only the direction's."""
    ups = make_updates(gen(seed_of("fair-pn", shape)), module_shapes(*shape), (2, 4, 8))
    plain = get_method("lora-fair").aggregate(ups, GlobalState())
    kept = get_method("lora-fair", {"preserve_norm": True}).aggregate(ups, GlobalState())
    for n in plain.state.adapter:
        p, k, w = dense(plain.state.adapter[n]), dense(kept.state.adapter[n]), delta_w(ups, n)
        assert_close(k, p * (fro(w) / fro(p)), rel=1e-12, what=n)
        assert abs(fro(k) - fro(w)) <= 1e-12 * fro(w)
        assert torch.equal(kept.state.adapter[n][0], plain.state.adapter[n][0])      # Ā untouched
    assert abs(kept.metrics["cos_after"] - plain.metrics["cos_after"]) <= 1e-12
    assert abs(kept.metrics["norm_ratio"] - 1.0) <= 1e-12
    assert kept.metrics["noise"] <= plain.metrics["noise"] + 1e-12


def test_lora_fair_preserve_norm_refuses_the_frobenius_objective():
    with pytest.raises(ValueError, match="preserve_norm needs similarity=cosine"):
        get_method("lora-fair", {"preserve_norm": True, "similarity": "frobenius"})


def test_rolora_records_its_round_convention_and_iteration():
    """Two rounds are one RoLoRA iteration: rounds 1, 2 → iteration 1; 3 → 2; the convention names the half-step."""
    from test_methods_dp_era import run_rounds

    m = get_method("rolora")
    assert "half-step" in m.round_convention and "2 rounds = 1 RoLoRA iteration" in m.round_convention
    _, _, metrics = run_rounds("rolora", [4, 2, 3], module_shapes(12, 7), 5, "cpu", rounds=3)
    assert [x["iteration"] for x in metrics] == [1, 1, 2] and [x["trained_b"] for x in metrics] == [1, 0, 1]
    assert "one iteration" in get_method("fedit").round_convention


def _rolora_exchange(m, state, ranks, shapes, g, h):
    """One exchange as clients play it from the method's tasks (fresh rows: one shared draw, B fresh at 0; the trained
    factor moved at random): the updates as uploaded, and each client's whole adapter (A_k, B_k) with its scaling and
    weight, for the exact sum Σ p_k s_k B_k A_k."""
    from methods import ClientSpec, ClientUpdate

    shared = {n: torch.randn(max(ranks), d_in, generator=g, dtype=torch.float64) for n, (_, d_in) in shapes.items()}
    ups, whole = [], []
    for k, r in enumerate(ranks):
        s = 16.0 / r
        task = m.configure(state, ClientSpec(k, r, s, h))
        factors = {}
        for n, (d_out, d_in) in shapes.items():
            a, b = shared[n][:r].clone(), torch.zeros(d_out, r, dtype=torch.float64)
            a0, b0 = (task.init or {}).get(n, (None, None))
            if a0 is not None:
                a[: a0.shape[0]] = a0
            if b0 is not None:
                b[:, : b0.shape[1]] = b0
            if "A" in task.train:
                a = a + 0.3 * torch.randn(r, d_in, generator=g, dtype=torch.float64)
            if "B" in task.train:
                b = b + 0.3 * torch.randn(d_out, r, generator=g, dtype=torch.float64)
            factors[n] = (a, b)
        n_k = k + 3
        ups.append(ClientUpdate(k, r, s, n_k, {n: (a if "A" in task.upload else None, b if "B" in task.upload else None)
                                               for n, (a, b) in factors.items()}))
        whole.append((s, n_k, factors))
    return ups, whole


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ranks", [(4, 4, 4), (2, 4, 8)])
def test_rolora_paper_schedule_trains_both_factors_a_round_each_aggregation_exact(shape, ranks):
    """schedule=paper: a round is two exchanges (B-step, then A-step with the new B̄); after every exchange the global
    product is exactly Σ p_k s_k B_k A_k of that exchange's clients (the other factor is shared, as the paper says),
    both factors differ from the round before, and the exchanges are schedule=alternate's rounds, bit for bit."""
    shapes = module_shapes(*shape)
    paper, alternate = get_method("rolora", {"schedule": "paper"}), get_method("rolora")
    assert paper.exchanges_per_round == 2 and alternate.exchanges_per_round == 1
    assert "one iteration" in paper.round_convention and "half-step" in alternate.round_convention
    g, g_alt = gen(seed_of("rolora-paper", shape, ranks)), gen(seed_of("rolora-paper", shape, ranks))
    state, alt = GlobalState(), GlobalState()
    for rnd in (1, 2, 3):
        before = state
        for h, factor in ((2 * rnd - 1, "B"), (2 * rnd, "A")):
            ups, whole = _rolora_exchange(paper, state, ranks, shapes, g, h)
            agg = paper.aggregate(ups, state)
            state = agg.state
            assert agg.metrics["trained_b"] == int(factor == "B") and agg.metrics["iteration"] == rnd
            assert agg.metrics["noise"] == 0.0 and agg.metrics["frozen_mismatch"] == 0.0
            total = sum(n_k for _, n_k, _ in whole)
            for n in shapes:
                exact = sum((n_k / total) * s * f[n][1] @ f[n][0] for s, n_k, f in whole)
                assert_close(dense(state.adapter[n]), exact, rel=1e-12, what=f"round {rnd} {factor}-step {n}")
            alt_ups, _ = _rolora_exchange(alternate, alt, ranks, shapes, g_alt, h)
            alt = alternate.aggregate(alt_ups, alt).state
            for n in shapes:
                assert all(torch.equal(x, y) for x, y in zip(state.adapter[n], alt.adapter[n]))
        assert state.round == 2 * rnd
        if rnd > 1:  # both factors moved within the round
            for n in shapes:
                assert not torch.equal(state.adapter[n][0], before.adapter[n][0])
                assert not torch.equal(state.adapter[n][1], before.adapter[n][1])


def test_rolora_schedule_is_checked():
    with pytest.raises(ValueError, match="schedule must be 'alternate' or 'paper'"):
        get_method("rolora", {"schedule": "both"})
