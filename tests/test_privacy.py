"""Differential privacy (bench/privacy.py): the accountant against Opacus's own analysis, per-example clipping
checked on the clipped gradients themselves, the noise's scale, the one-line refusals, and end-to-end tiny runs
whose records carry each client's spent ε per round (also the source of the privacy–utility plot test)."""
import json
import math
import re
from pathlib import Path

import opacus  # noqa: F401  (setup.sh installs the dp extra: a missing Opacus is a broken setup, not a skip)
import pytest
import torch

from bench import BenchError, privacy
from bench.cli import main as bench_main
from bench.config import build_config

EPS = (2.0, 8.0)
DELTA = 1e-5


@pytest.fixture(scope="module")
def dp_runs(tmp_path_factory, shared_data):
    """Real tiny runs through the CLI: fedit at ε = 2 and 8 (the issue's command), ffa-lora at ε = 8, and a
    non-DP fedit run (the plot's ε = ∞ reference)."""
    out = tmp_path_factory.mktemp("dp")
    results = out / "results"
    runs = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BENCH_DATA_ROOT", str(shared_data))
        mp.setenv("HF_HUB_OFFLINE", "1")
        for method, eps in (("fedit", 8.0), ("fedit", 2.0), ("ffa-lora", 8.0), ("fedit", None)):
            name = f"{method}-{eps}"
            flags = ["--dp-epsilon", str(eps), "--dp-delta", str(DELTA)] if eps else []
            rc = bench_main(["run", "--method", method, "--preset", "tiny", *flags, "--no-eval",
                             "--output-dir", str(out / name), "--results-dir", str(results)])
            assert rc == 0
            runs[name] = json.loads((out / name / "run.json").read_text())["record"]
    return {k: json.loads(open(v).read()) for k, v in runs.items()}, results


def _independent_epsilon(history, delta):
    """Opacus's RDP analysis called directly (not through bench.privacy nor an accountant object)."""
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
    from opacus.accountants.rdp import RDPAccountant

    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = sum(compute_rdp(q=q, noise_multiplier=s, steps=t, orders=orders) for s, q, t in history)
    return float(get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0])


def test_spent_epsilon_per_client_per_round_matches_opacus(dp_runs):
    from opacus.accountants.utils import get_noise_multiplier

    records, _ = dp_runs
    rec = records["fedit-8.0"]
    cfg = rec["config"]
    for k, client in enumerate(rec["clients"]):
        history = []
        for row in rec["rounds"]:
            mine = [c for c in row["clients"] if c["id"] == k]
            assert len(mine) == 1 and "dp_epsilon" in mine[0], f"round {row['round']}: no spent ε for client {k}"
            c = mine[0]
            history.append((c["dp_noise_multiplier"], c["dp_sample_rate"], c["steps"]))
            assert c["dp_epsilon"] == pytest.approx(_independent_epsilon(history, DELTA), rel=1e-9)
        n = client["num_examples"]
        q = min(1.0, cfg["batch_size"] / n)
        assert history[0][1] == q
        # σ is Opacus's calibration for the whole run: every round, every step counted
        sigma = get_noise_multiplier(target_epsilon=8.0, target_delta=DELTA, sample_rate=q,
                                     steps=cfg["local_steps"] * cfg["rounds"], accountant="rdp", epsilon_tolerance=0.01)
        assert history[0][0] == sigma
        final = rec["privacy"]["clients"][k]
        assert final["epsilon"] == rec["rounds"][-1]["clients"][k]["dp_epsilon"]
        assert 8.0 - 0.01 <= final["epsilon"] <= 8.0  # calibrated: the target is reached, never exceeded
        # spent ε grows round by round
        assert rec["rounds"][0]["clients"][k]["dp_epsilon"] < final["epsilon"]
    assert rec["privacy"]["delta"] == DELTA and rec["privacy"]["sampling"] == "poisson"
    assert "one training example" in rec["privacy"]["unit"]


def test_prv_accountant_matches_opacus():
    from opacus.accountants import PRVAccountant

    history = [(0.9, 0.2, 3), (0.9, 0.2, 3), (1.3, 0.1, 5)]
    acc = PRVAccountant()
    for s, q, t in history:
        for _ in range(t):
            acc.step(noise_multiplier=s, sample_rate=q)
    assert privacy.epsilon(history, DELTA, "prv") == pytest.approx(acc.get_epsilon(delta=DELTA), rel=1e-3)
    assert privacy.epsilon(history, DELTA, "rdp") == pytest.approx(_independent_epsilon(history, DELTA), rel=1e-12)


def _tiny_lora(dtype, rank=3):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from bench.models import resolve_model

    path, _ = resolve_model("tiny-random-llama")
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    # A and B random (B = 0 would give A no gradient); up_proj has d_in != d_out
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=6, target_modules=["q_proj", "up_proj"], lora_dropout=0.0))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    model.to(dtype)
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    return model, params


def _tiny_core(dtype, rank=3):
    """_tiny_lora with every lora_A slot a Fed-SB core slot (bench/client.py CoreAfterA): R trains, A and B frozen."""
    from bench.client import CoreAfterA

    model, _ = _tiny_lora(dtype, rank)
    gen = torch.Generator().manual_seed(3)
    for mod in [m for m in model.modules() if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})]:
        a = mod.lora_A["default"]
        a.weight.requires_grad_(False)
        mod.lora_B["default"].weight.requires_grad_(False)
        mod.lora_A["default"] = CoreAfterA(a, torch.randn(rank, rank, generator=gen).to(dtype))
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    assert params and all(p.shape == (rank, rank) for p in params)
    return model, params


def _examples(n, gen):
    out = []
    for i in range(n):
        length = 6 + i % 5
        ids = torch.randint(3, 100, (length,), generator=gen).tolist()
        labels = [-100] * 3 + ids[3:]
        out.append({"input_ids": ids, "labels": labels})
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("trained", ["factors", "core"])
def test_clipping_bounds_each_example_gradient(dtype, trained):
    """Opacus's per-example gradients equal single-example autograd; each clipped one has norm ≤ C; at σ = 0 the
    gradient handed to the optimizer is Σ clip(g_i) / (q·n); some examples are clipped, some not. core: Fed-SB's
    r×r cores between frozen A and B are what Opacus sees and clips."""
    from bench.client import token_loss
    from bench.data import collate

    model, params = (_tiny_lora if trained == "factors" else _tiny_core)(dtype)
    model.train()
    examples = _examples(7, torch.Generator().manual_seed(1))
    batch = [0, 2, 3, 5, 6]
    # independent: each example's own gradient, one at a time
    singles = []
    for j in batch:
        sums, counts = token_loss(model, collate([examples[j]], 0), "cpu", per_example=True)
        singles.append(torch.autograd.grad((sums / counts).sum(), params))
    norms = torch.stack([torch.sqrt(sum((g.double() ** 2).sum() for g in gs)) for gs in singles])
    clip = float(norms.median())  # half of them clipped
    expected_batch = 2.5
    with privacy.PrivateGradient(model, params, clip, 0.0, expected_batch, seed=0, device=torch.device("cpu")) as dp:
        dp.backward(examples, batch, micro=2, pad_id=0)
        samples = [g.clone() for g in dp.opt.grad_samples]
        opacus_norms = dp.per_example_norms()
        dp.noisy_gradient()
        grads = [p.grad.clone() for p in params]
        dp.zero_grad()
    tol = dict(rtol=1e-9, atol=1e-12) if dtype == torch.float64 else dict(rtol=3e-2, atol=1e-3)
    for i in range(len(batch)):
        for p_idx in range(len(params)):
            torch.testing.assert_close(samples[p_idx][i].double(), singles[i][p_idx].double(), **tol)
    torch.testing.assert_close(opacus_norms.double(), norms, **tol)
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    assert 0 < int((factors < 1).sum()) < len(batch)
    clipped = [[s[i].double() * factors[i] for s in samples] for i in range(len(batch))]
    for per in clipped:  # the clipped per-example gradients themselves
        assert float(torch.sqrt(sum((g ** 2).sum() for g in per))) <= clip * (1 + (1e-9 if dtype == torch.float64 else 1e-2))
    for p_idx, g in enumerate(grads):
        want = sum(per[p_idx] for per in clipped) / expected_batch
        torch.testing.assert_close(g.double(), want, **tol)
    # the trained model is left as it was: no Opacus hooks or attributes
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in params)


def test_noise_has_the_calibrated_scale():
    """p.grad − Σ clip(g_i)/(q·n) is N(0, (σC/(q·n))²) per coordinate."""
    model, params = _tiny_lora(torch.float64, rank=8)
    model.train()
    examples = _examples(6, torch.Generator().manual_seed(2))
    sigma, clip, expected_batch = 1.7, 0.05, 3.0
    out = {}
    for s in (0.0, sigma):
        with privacy.PrivateGradient(model, params, clip, s, expected_batch, seed=5, device=torch.device("cpu")) as dp:
            dp.backward(examples, [0, 1, 4], micro=3, pad_id=0)
            dp.noisy_gradient()
            out[s] = torch.cat([p.grad.flatten().clone() for p in params])
            dp.zero_grad()
    noise = (out[sigma] - out[0.0]) * expected_batch
    assert noise.numel() > 2000
    assert float(noise.std()) == pytest.approx(sigma * clip, rel=0.05)
    assert abs(float(noise.mean())) < 4 * sigma * clip / math.sqrt(noise.numel())


def test_refusals_are_one_line_before_any_work(tmp_path, capsys, offline_data_env):
    from methods import METHODS, AggregationMethod

    class NoDP(AggregationMethod):
        description = "a method whose clients would send a non-private statistic"
        supports_dp = False
        dp_refusal = "its clients send their data's label counts"

    METHODS["no-dp-example"] = NoDP
    NoDP.name = "no-dp-example"
    try:
        out = tmp_path / "run"
        cases = [
            (["--method", "no-dp-example", "--dp-epsilon", "8", "--dp-delta", "1e-5"], "dp_epsilon: no-dp-example does not support"),
            (["--method", "fedit", "--dp-epsilon", "8", "--dp-noise-multiplier", "1", "--dp-delta", "1e-5"], "dp_epsilon: give either"),
            (["--method", "fedit", "--dp-epsilon", "8"], "dp_delta: DP needs a δ"),
            (["--method", "fedit", "--dp-delta", "1e-5"], "dp_delta: given without"),
            (["--method", "fedit", "--dp-epsilon", "8", "--dp-delta", "1e-5", "--dp-accountant", "gdp"], "dp_accountant: unknown"),
            (["--method", "fedit", "--dp-epsilon", "8", "--dp-delta", "0.2"], "dp_delta: 0.2 is not below 1/n"),
            (["--method", "fedit", "--dp-epsilon", "1e-4", "--dp-delta", "1e-5"], "dp_epsilon: 0.0001 cannot be reached"),
        ]
        for flags, start in cases:
            rc = bench_main(["run", "--preset", "tiny", *flags, "--output-dir", str(out), "--results-dir", str(tmp_path / "r")])
            err = capsys.readouterr().err.strip().splitlines()
            assert rc == 2 and err[-1].startswith("error: " + start), (flags, err)
            assert not out.exists() and not (tmp_path / "r").exists()
    finally:
        del METHODS["no-dp-example"]


def test_every_registered_method_declares_dp_support():
    from methods import METHODS

    for name, cls in METHODS.items():
        assert isinstance(cls.supports_dp, bool)
        assert cls.supports_dp or cls.dp_refusal, f"{name}: a method without DP says why (dp_refusal)"
        overrides = {"method": name, "dp_epsilon": 8, "dp_delta": 1e-5}
        if cls.supports_dp:
            assert privacy.enabled(build_config(preset="tiny", overrides=overrides))
        else:  # refused in one line, before any work, with the method's reason
            with pytest.raises(BenchError, match=re.escape(cls.dp_refusal[:40])):
                build_config(preset="tiny", overrides=overrides)


def test_records_written_before_dp_keep_their_config_hash():
    """The DP fields at their defaults leave the hash alone: the stored study records still match their configs
    (bench ablate skips what is done by this hash), and a DP run hashes differently."""
    import dataclasses
    import glob

    from bench.config import RunConfig

    stored = sorted(glob.glob(str(Path(__file__).resolve().parents[1] / "results" / "v1-commonsense" / "*.json")))
    assert stored, "results/v1-commonsense/ holds the v1 study's records"
    checked = 0
    for path in stored[::8]:
        rec = json.loads(Path(path).read_text())
        if rec.get("kind") != "run":
            continue
        checked += 1
        cfg = RunConfig(**rec["config"])
        assert cfg.config_hash() == rec["config_hash"], path
        assert dataclasses.replace(cfg, dp_epsilon=8.0, dp_delta=1e-5).config_hash() != rec["config_hash"]
    assert checked >= 10
    with pytest.raises(BenchError):
        build_config(preset="tiny", overrides={"method": "fedit", "dp_noise_multiplier": 0})


def test_privacy_utility_plot_renders_from_real_records(dp_runs, tmp_path):
    pytest.importorskip("matplotlib")
    from reports import build_report
    from reports.leaderboard import build_rows, report_metrics, task_metrics
    from reports.paired import analyse
    from reports.plots import privacy_metric, privacy_points
    from reports.records import load_records

    records, results = dp_runs
    summary = build_report([str(results)], str(tmp_path), plots=True)
    assert summary["records"] == 4 and summary["rows"] == 4  # a DP run is a row of its own, never a seed of another
    drawn = {Path(f).name for f in summary["files"]}
    assert {"privacy_utility.png", "privacy_utility.svg"} <= drawn, summary["plots_skipped"]
    assert (tmp_path / "plots" / "privacy_utility.png").stat().st_size > 5000
    again = build_report([str(results)], str(tmp_path / "again"), plots=True)
    for name in ("privacy_utility.png", "privacy_utility.svg"):  # deterministic, as every report file
        assert (tmp_path / "plots" / name).read_bytes() == (tmp_path / "again" / "plots" / name).read_bytes()
    assert len(again["files"]) == len(summary["files"])
    # what the plot shows: per method, the spent ε of its DP rows against the test loss, and the non-DP level
    recs, _ = load_records([str(results)])
    notes = []
    rows = build_rows(recs, notes)
    metrics = report_metrics(rows, task_metrics(recs, notes), notes)
    analyse(rows, metrics, None, notes)
    m = privacy_metric(metrics, metrics["test_loss"])
    assert m.name == "test_loss"  # no task scores in these records
    (ctx, series), = privacy_points(rows, m).items()
    fedit = series[("fedit", False)]
    (variant, pts), = fedit["dp"].items()
    assert variant == (DELTA, 1.0, "rdp")
    spent = {eps: records[f"fedit-{eps}"]["privacy"]["epsilon_max"] for eps in EPS}
    assert [p[0] for p in pts] == [spent[2.0], spent[8.0]]
    assert [p[1].mean for p in pts] == pytest.approx([records[f"fedit-{eps}"]["test_loss"] for eps in EPS], rel=1e-9)
    assert fedit["no_dp"].mean == pytest.approx(records["fedit-None"]["test_loss"], rel=1e-9)
    assert [p[0] for p in series[("ffa-lora", False)]["dp"][variant]] == [records["ffa-lora-8.0"]["privacy"]["epsilon_max"]]


def test_dp_run_killed_and_resumed_reaches_the_same_numbers(tmp_path, shared_data):
    """SIGKILL in round 2 after client 1's first DP step, then --resume: the rows (spent ε included), the privacy
    section and the test loss equal an uninterrupted run's (seeded Poisson draws and noise)."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    args = ["--method", "fedavg-lora", "--preset", "tiny", "--dp-epsilon", "4", "--dp-delta", "1e-5", "--seed", "2"]

    def bench(out, kill_at=None, resume=False):
        env = {k: v for k, v in os.environ.items() if not k.startswith("BENCH_TEST_")}
        env.update({"BENCH_DATA_ROOT": str(shared_data), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(repo),
                    **({"BENCH_TEST_KILL_AT": kill_at} if kill_at else {})})
        cmd = (["--resume", str(out)] if resume else [*args, "--output-dir", str(out)]) + ["--results-dir", str(tmp_path / "r")]
        return subprocess.run([sys.executable, "-m", "bench.cli", "run", *cmd], env=env, capture_output=True,
                              text=True, timeout=600)

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert bench(whole).returncode == 0
    assert bench(cut, kill_at="round2:client1").returncode == -9
    done = bench(cut, resume=True)
    assert done.returncode == 0, done.stderr[-2000:]
    timing = {"seconds", "tokens_per_s", "aggregate_seconds", "rss_mb"}

    def result(run):
        rec = json.loads(Path(json.loads((run / "run.json").read_text())["record"]).read_text())
        rows = [{**{k: v for k, v in r.items() if k not in timing},
                 "clients": [{k: v for k, v in c.items() if k not in timing} for c in r["clients"]]} for r in rec["rounds"]]
        return rows, rec["privacy"], rec["test_loss"]

    a, b = result(whole), result(cut)
    assert a == b
    assert all("dp_epsilon" in c for r in a[0] for c in r["clients"])


def test_two_exchanges_a_round_are_accounted_and_calibrated(tmp_path, shared_data):
    """RoLoRA's schedule=paper trains every client twice a round: σ is calibrated for local_steps × 2 × rounds
    steps, each exchange's (σ, q, steps) enters the client's history, and the spent ε reaches the target, never more."""
    from opacus.accountants.utils import get_noise_multiplier

    from bench.engine import run_federated

    cfg = build_config(preset="tiny", overrides={
        "method": "rolora", "method_options": {"schedule": "paper"}, "dp_epsilon": 8.0, "dp_delta": DELTA,
        "local_steps": 1, "data_root": str(shared_data), "output_dir": str(tmp_path / "run"),
        "results_dir": str(tmp_path / "results")})
    rec = run_federated(cfg, log=lambda *a: None)
    for k, client in enumerate(rec["clients"]):
        history = [(c["dp_noise_multiplier"], c["dp_sample_rate"], c["steps"])
                   for row in rec["rounds"] for c in row["clients"] if c["id"] == k]
        assert len(history) == 2 * cfg.rounds and all(t == cfg.local_steps for _, _, t in history)
        q = min(1.0, cfg.batch_size / client["num_examples"])
        assert history[0][0] == get_noise_multiplier(target_epsilon=8.0, target_delta=DELTA, sample_rate=q,
                                                     steps=cfg.local_steps * 2 * cfg.rounds, accountant="rdp",
                                                     epsilon_tolerance=0.01)
        final = rec["privacy"]["clients"][k]
        assert final["epsilon"] == pytest.approx(_independent_epsilon(history, DELTA), rel=1e-9)
        assert 8.0 - 0.01 <= final["epsilon"] <= 8.0


def test_fed_sb_under_dp_accounts_as_opacus_and_uploads_only_cores(tmp_path, shared_data):
    """Fed-SB with DP-SGD on the tiny model: each client's spent ε per round equals Opacus's own analysis of its
    recorded (σ, q, steps), σ is Opacus's calibration for the run, and from round 2 each client uploads its r×r cores
    alone (4 modules × r² float32), which the DP mechanism trained."""
    from opacus.accountants.utils import get_noise_multiplier

    from bench.engine import run_federated

    cfg = build_config(preset="tiny", overrides={
        "method": "fed-sb", "dp_epsilon": 8.0, "dp_delta": DELTA, "data_root": str(shared_data),
        "output_dir": str(tmp_path / "run"), "results_dir": str(tmp_path / "results")})
    rec = run_federated(cfg, log=lambda *a: None)
    for k, client in enumerate(rec["clients"]):
        history = []
        for row in rec["rounds"]:
            (c,) = [c for c in row["clients"] if c["id"] == k]
            history.append((c["dp_noise_multiplier"], c["dp_sample_rate"], c["steps"]))
            assert c["dp_epsilon"] == pytest.approx(_independent_epsilon(history, DELTA), rel=1e-9)
            if row["round"] > 1:
                assert c["bytes_up"] == 4 * c["rank"] ** 2 * 4
        q = min(1.0, cfg.batch_size / client["num_examples"])
        assert history[0][0] == get_noise_multiplier(target_epsilon=8.0, target_delta=DELTA, sample_rate=q,
                                                     steps=cfg.local_steps * cfg.rounds, accountant="rdp",
                                                     epsilon_tolerance=0.01)
        assert 8.0 - 0.01 <= rec["privacy"]["clients"][k]["epsilon"] <= 8.0
    assert rec["rounds"][-1]["noise"] == 0.0  # the core rounds stay exact under DP
