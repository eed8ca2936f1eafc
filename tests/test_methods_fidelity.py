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
