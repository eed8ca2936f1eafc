"""FedSVD and Fed-SB from first principles (float64, d_in ≠ d_out, dense references formed independently of
methods/factors.py), and every registered method's server step on every device there is (CUDA when present):
the same rounds on the CPU and on the device give the same global update, and the device's tensors stay there."""
from __future__ import annotations

import pytest
import torch

from methods import METHODS, ClientSpec, ClientUpdate, GlobalState, get_method
from test_methods_math import DT, RANK_MIXES, SHAPES, assert_close, gen, module_shapes, scaling_of, seed_of

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def dense(pair) -> torch.Tensor:
    a, b = pair
    return b.double().cpu() @ a.double().cpu()


def on(factors: dict, device) -> dict:
    return {n: tuple(None if t is None else t.to(device) for t in p) for n, p in factors.items()}


def simulate_round(m, state, ranks, shapes, g, rnd, device, examples=None):
    """One round as clients would play it, from the method's own tasks: the starting factors as sent (fresh rows:
    one shared draw of the round, B fresh at 0), random changes to what the task trains (a core task: its core),
    the method's client_finish, then only what the task uploads. Returns the updates on `device`."""
    top = max(ranks)
    shared = {n: torch.randn(top, d_in, generator=g, dtype=DT) for n, (_, d_in) in shapes.items()}
    updates = []
    for k, r in enumerate(ranks):
        s = scaling_of(r, 16.0, "lora")
        task = m.configure(state, ClientSpec(k, r, s, rnd))
        factors, core = {}, {}
        for n, (d_out, d_in) in shapes.items():
            a, b = shared[n][:r].clone(), torch.zeros(d_out, r, dtype=DT)
            a0, b0 = (task.init or {}).get(n, (None, None))
            if a0 is not None:
                a[: a0.shape[0]] = a0.cpu()
            if b0 is not None:
                b[:, : b0.shape[1]] = b0.cpu()
            if "B" in task.keep:
                b = torch.randn(d_out, r, generator=g, dtype=DT)
            if "A" in task.train:
                a = a + 0.3 * torch.randn(r, d_in, generator=g, dtype=DT)
            if "B" in task.train:
                b = b + 0.3 * torch.randn(d_out, r, generator=g, dtype=DT)
            if task.train == "R":
                core[n] = task.core[n].cpu() + 0.3 * torch.randn(r, r, generator=g, dtype=DT)
            factors[n] = (a, b)
        sent = m.client_finish(on(factors, device), task)
        rank = next(iter(sent.values()))[0].shape[0]
        if task.upload == "R":
            up = {n: (c.to(device), None) for n, c in core.items()}
        else:
            up = {n: (a if "A" in task.upload else None, b if "B" in task.upload else None) for n, (a, b) in sent.items()}
        n_k = examples[k] if examples else int(torch.randint(1, 50, (1,), generator=g))
        updates.append(ClientUpdate(k, rank, s, n_k, up))
    return updates


def run_rounds(name, ranks, shapes, seed, device, rounds=3, options=None):
    m = get_method(name, options)
    g = gen(seed)
    state, merges, metrics = GlobalState(), [], []
    for rnd in range(1, rounds + 1):
        agg = m.aggregate(simulate_round(m, state, ranks, shapes, g, rnd, device), state)
        state = agg.state
        merges.append(agg.merge)
        metrics.append(agg.metrics)
    return state, merges, metrics


def global_delta(state, merges) -> dict[str, torch.Tensor]:
    out = {}
    for part in [m for m in merges if m] + [state.adapter]:
        for n, (a, b) in part.items():
            if a is not None and b is not None:
                out[n] = out.get(n, 0) + dense((a, b))
    return out


# ----------------------------------------------------------------------------------------------------
# every method, every device
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_aggregate_is_device_agnostic(name, device):
    """Three rounds with every tensor on `device` give the CPU's global update (products: SVD signs may differ),
    the same noise, and the state and merges stay on the device (a cpu/cuda mix raises on CUDA)."""
    shapes = module_shapes(12, 7) | {"v": (5, 9)}
    ranks = [3, 3, 3] if not METHODS[name].heterogeneous_ranks else [4, 2, 3]
    seed = seed_of("device", name)
    ref_state, ref_merges, ref_metrics = run_rounds(name, ranks, shapes, seed, "cpu")
    state, merges, metrics = run_rounds(name, ranks, shapes, seed, device)
    want, got = global_delta(ref_state, ref_merges), global_delta(state, merges)
    assert set(want) == set(got)
    for n in want:
        assert_close(got[n], want[n], rel=1e-9, what=f"{name} {n} on {device}")
    for mt, rt in zip(metrics, ref_metrics):
        if "noise" in rt:
            assert abs(mt["noise"] - rt["noise"]) <= 1e-9
    dev = torch.device(device).type
    for part in [state.adapter] + [m for m in merges if m]:
        for pair in part.values():
            assert all(t.device.type == dev for t in pair if t is not None), name


# ----------------------------------------------------------------------------------------------------
# FedSVD
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ranks", RANK_MIXES)
def test_fedsvd_refactorization_is_exact_and_a_orthonormal(device, shape, ranks):
    """Each round: B'A' = Σ p_k s_k B_k A_old[:r_k] (dense, from the raw uploads), A' has orthonormal rows, and the
    singular values of B'A' are B'’s column norms in descending order; the next round's clients train from A'."""
    m = get_method("fedsvd")
    shapes = module_shapes(*shape)
    g = gen(seed_of("fedsvd", device, shape, ranks))
    state = GlobalState()
    for rnd in (1, 2, 3):
        a_old = {n: (state.adapter[n][0].cpu() if state.adapter else None) for n in shapes}
        ups = simulate_round(m, state, list(ranks), shapes, g, rnd, device)
        n_tot = sum(u.num_examples for u in ups)
        agg = m.aggregate(ups, state)
        for n in shapes:
            want = 0
            for u in ups:
                a_k = u.factors[n][0].cpu() if u.factors[n][0] is not None else a_old[n][: u.rank]
                want = want + (u.num_examples / n_tot) * u.scaling * u.factors[n][1].double().cpu() @ a_k.double()
            a, b = agg.state.adapter[n]
            assert a.device.type == torch.device(device).type
            assert_close(dense((a, b)), want, rel=1e-11, what=f"round {rnd} {n}")
            q = min(a.shape[0], *shape)
            a64 = a.double().cpu()[:q]
            assert_close(a64 @ a64.mT, torch.eye(q, dtype=DT), rel=1e-12, what="A A^T = I")
            cols = torch.linalg.vector_norm(b.double().cpu()[:, :q], dim=0)
            assert torch.all(cols[:-1] >= cols[1:] - 1e-12)
            sv = torch.linalg.svdvals(want)[: cols.shape[0]]
            assert_close(cols, sv, rel=1e-10, what="column norms of B' = singular values")
        assert agg.metrics["noise"] == 0.0 and agg.metrics["a_mismatch"] == 0.0
        state = agg.state
    task = m.configure(state, ClientSpec(0, ranks[0], 2.0, 4))
    assert task.train == "B" and task.upload == "B"                       # A frozen, only B travels up


def test_fedsvd_without_refactorization_is_ffa_lora():
    """svd_every=2: the odd rounds' state is FFA-LoRA's (A the shared draw, B̄ = Σ p_k s_k pad(B_k)), tensor for tensor."""
    shapes = module_shapes(12, 7)
    ups = simulate_round(get_method("ffa-lora"), GlobalState(), [4, 2, 3], shapes, gen(3), 1, "cpu")
    got = get_method("fedsvd", {"svd_every": 2}).aggregate(ups, GlobalState())
    want = get_method("ffa-lora").aggregate(ups, GlobalState())
    for n in shapes:
        assert all(torch.equal(x, y) for x, y in zip(got.state.adapter[n], want.state.adapter[n]))
    assert got.metrics["refactorized"] == 0


# ----------------------------------------------------------------------------------------------------
# Fed-SB
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rank", [1, 3, 4])
def test_fed_sb_first_round_is_the_best_rank_r_approximation(device, shape, rank):
    """Round 1 (plain LoRA): global = the rank-r truncated SVD of ΔW = Σ p_k s_k B_k A_k (dense reference),
    B with orthonormal columns, A with orthonormal rows, R diagonal; noise = the energy beyond r."""
    m = get_method("fed-sb")
    shapes = module_shapes(*shape)
    ups = simulate_round(m, GlobalState(), [rank] * 3, shapes, gen(seed_of("sb1", shape, rank)), 1, device)
    n_tot = sum(u.num_examples for u in ups)
    agg = m.aggregate(ups, GlobalState())
    energy = lost = 0.0
    for n in shapes:
        dw = sum((u.num_examples / n_tot) * u.scaling * dense(u.factors[n]) for u in ups)
        u_, s_, vh = torch.linalg.svd(dw, full_matrices=False)
        k = min(rank, s_.shape[0])
        assert_close(dense(agg.state.adapter[n]), u_[:, :k] * s_[:k] @ vh[:k], rel=1e-10, what="truncation")
        a0, core, b0 = (agg.state.extra[f"A/{n}"].cpu(), agg.state.extra[f"R/{n}"].cpu(), agg.state.adapter[n][1].cpu())
        assert_close(a0[:k] @ a0[:k].mT, torch.eye(k, dtype=DT), rel=1e-12)
        assert_close(b0[:, :k].mT @ b0[:, :k], torch.eye(k, dtype=DT), rel=1e-12)
        assert torch.equal(core, torch.diag(core.diagonal()))
        energy, lost = energy + float((s_ ** 2).sum()), lost + float((s_[k:] ** 2).sum())
    assert abs(agg.metrics["noise"] - (lost / energy) ** 0.5) <= 1e-10


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
def test_fed_sb_core_rounds_are_exact_and_upload_only_the_core(device, shape):
    """From round 2: every client trains from (A, B) fixed and the core R̄ / s_k; the new global is
    B (Σ p_k s_k R_k) A = Σ p_k (s_k B R_k A), the average of the clients' models, exactly; A and B never change;
    the upload is r × r per module, independent of the number of clients."""
    m = get_method("fed-sb")
    shapes = module_shapes(*shape)
    g = gen(seed_of("sb2", device, shape))
    state = m.aggregate(simulate_round(m, GlobalState(), [4] * 3, shapes, g, 1, device), GlobalState()).state
    for rnd, clients in ((2, 3), (3, 7)):
        before = {n: (state.extra[f"A/{n}"].clone(), state.adapter[n][1].clone()) for n in shapes}
        for k in range(clients):
            task = m.configure(state, ClientSpec(k, 4, 2.0, rnd))
            assert task.train == "R" and task.upload == "R"
            for n in shapes:
                assert torch.equal(task.init[n][0], before[n][0]) and torch.equal(task.init[n][1], before[n][1])
                assert_close(2.0 * task.core[n].cpu(), state.extra[f"R/{n}"].cpu(), rel=1e-15)
        ups = simulate_round(m, state, [4] * clients, shapes, g, rnd, device)
        assert all(u.factors[n][0].shape == (4, 4) and u.factors[n][1] is None for u in ups for n in shapes)
        n_tot = sum(u.num_examples for u in ups)
        agg = m.aggregate(ups, state)
        for n in shapes:
            a0, b0 = before[n]
            want = sum((u.num_examples / n_tot) * u.scaling * b0.double().cpu() @ u.factors[n][0].double().cpu()
                       @ a0.double().cpu() for u in ups)
            assert_close(dense(agg.state.adapter[n]), want, rel=1e-12, what=f"round {rnd} {n}")
            assert torch.equal(agg.state.extra[f"A/{n}"], a0) and torch.equal(agg.state.adapter[n][1], b0)
        assert agg.metrics["noise"] == 0.0
        state = agg.state


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ranks", [(4, 2, 2), (1, 3, 4, 2)])
def test_fed_sb_mixed_ranks_average_the_clients_models_exactly(device, shape, ranks):
    """Mixed ranks: R is round 1's largest rank; client k starts from A[:r_k], B[:, :r_k] and the top-left block of
    R̄ / s_k, and the new global B R̄ A is Σ p_k s_k B[:, :r_k] R_k A[:r_k] exactly; a client above R trains zeros there."""
    m = get_method("fed-sb")
    shapes = module_shapes(*shape)
    g = gen(seed_of("sb-mixed", device, shape, ranks))
    state = m.aggregate(simulate_round(m, GlobalState(), list(ranks), shapes, g, 1, device), GlobalState()).state
    top = max(ranks)
    for n in shapes:
        assert state.extra[f"R/{n}"].shape == (top, top)
    task = m.configure(state, ClientSpec(9, top + 2, 1.5, 2))          # a larger client: zero rows/columns there
    for n in shapes:
        a, b = task.init[n]
        assert a.shape[0] == b.shape[1] == top + 2 and not a[top:].any() and not b[:, top:].any()
        assert not task.core[n][top:].any() and not task.core[n][:, top:].any()
    ups = simulate_round(m, state, list(ranks), shapes, g, 2, device)
    n_tot = sum(u.num_examples for u in ups)
    agg = m.aggregate(ups, state)
    for n in shapes:
        a0, b0 = state.extra[f"A/{n}"].double().cpu(), state.adapter[n][1].double().cpu()
        want = sum((u.num_examples / n_tot) * u.scaling * b0[:, : u.rank] @ u.factors[n][0].double().cpu() @ a0[: u.rank]
                   for u in ups)
        assert_close(dense(agg.state.adapter[n]), want, rel=1e-12, what=n)


def test_reply_filter_checks_a_core_reply_against_its_task():
    """A core task's reply: R of shape rank × rank in A's slot and nothing else passes; a d_in-wide A, a sent B, or a
    core whose update s · B R A is over max_update_norm is refused, naming the reason."""
    from bench.guard import ReplyFilter
    from bench.messages import Reply, TaskMessage
    from methods import ClientTask

    shapes = {"q": (6, 5)}
    g = gen(11)
    a0, b0 = torch.randn(3, 5, generator=g), torch.randn(6, 3, generator=g)
    task = ClientTask(init={"q": (a0, b0)}, train="R", upload="R", core={"q": torch.eye(3)})
    msg = TaskMessage(2, 0, 3, 2.0, task, {}, 1, 2, "fed-sb", {})
    guard = ReplyFilter(None, shapes, max_update_norm=10.0)
    core = 0.1 * torch.randn(3, 3, generator=g)

    def reply(factors):
        return Reply(2, 0, 3, 5, factors)

    assert guard.check(msg, reply({"q": (core, None)})) is None
    assert "shape (3, 5), expected (3, 3)" in guard.check(msg, reply({"q": (a0, None)}))
    assert "q.B: sent" in guard.check(msg, reply({"q": (core, b0)}))
    big = 100.0 * torch.eye(3)
    norm = 2.0 * float(torch.linalg.matrix_norm(b0.double() @ big.double() @ a0.double()))
    assert guard.check(msg, reply({"q": (big, None)})) == f"update norm {norm:.3g} > max_update_norm 10"
