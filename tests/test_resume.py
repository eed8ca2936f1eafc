"""Resume after real crashes: `bench run` subprocesses killed with SIGKILL at exact points (the engine's
BENCH_TEST_KILL_AT test hook), then `bench run --resume`, must end bit-identical to an uninterrupted
run; a real SIGTERM must checkpoint, exit 130 and say how to resume; atomic writes must survive a
crash mid-write. Tiny random Llama on real Dolly data; see docs/reliability.md."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("BENCH_DATA_ROOT") or Path(__file__).resolve().parents[2] / "shared" / "data")

# small but real: 3 rounds, every kill point reachable, ~10 s per process (mostly imports)
COMMON = ["--preset", "tiny", "--rounds", "3", "--local-steps", "1", "--batch-size", "1", "--micro-batch-size", "1",
          "--cutoff-len", "32", "--test-limit", "2", "--seed", "3"]
SETUPS = {
    # flora merges into the base every round: the checkpoint must carry the merged base weights
    "flora": ["--method", "flora"],
    # a factor-averaging method, with client sampling (2 of 3 clients per round)
    "fedavg-lora": ["--method", "fedavg-lora", "--client-fraction", "0.67"],
}
# 5 kill points per method; together they cover every hook point of a run without eval
KILLS = {
    "flora": ["round1:client2", "round2:aggregate", "round2:checkpoint-swap", "round3:checkpoint-write", "final-save"],
    # first a real SIGTERM while round 1's checkpoint is being written: it must finish, then exit 130
    "fedavg-lora": ["sigterm@round1:checkpoint-write", "round2:client{k}", "round2:metrics", "round3:aggregate",
                    "test-loss", "record"],
}
TIMING_KEYS = {"seconds", "tokens_per_s", "aggregate_seconds", "rss_mb"}


def _env(**extra) -> dict:
    if not (DATA / "dolly_fedit_10clients").is_dir():
        pytest.fail(f"the real data root is missing at {DATA}; set BENCH_DATA_ROOT")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BENCH_TEST_")}
    env.update({"BENCH_DATA_ROOT": str(DATA), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), **extra})
    return env


def _bench(args: list[str], kill_at: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = _env(**({"BENCH_TEST_KILL_AT": kill_at} if kill_at else {}))
    return subprocess.run([sys.executable, "-m", "bench.cli", "run", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _strip(rows: list[dict]) -> list[dict]:
    """Metrics rows without wall times and RSS: what must be identical after a resume."""
    out = []
    for r in rows:
        r = {k: v for k, v in r.items() if k not in TIMING_KEYS}
        r["clients"] = [{k: v for k, v in c.items() if k not in TIMING_KEYS} for c in r["clients"]]
        out.append(r)
    return out


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]


def _check_crash_state(run_dir: Path, results: Path) -> None:
    """After a kill: no results record at all (it is written last, atomically), and whatever checkpoint
    exists is complete (its checksum matches)."""
    assert not results.exists() or not list(results.glob("*.json")), list(results.iterdir())
    from bench import models

    for name in ("checkpoint", "checkpoint.old"):
        ck = run_dir / name
        if ck.is_dir() and (ck / "meta.json").is_file() and name == "checkpoint":
            assert _checkpoint_ok(ck, json.loads((ck / "meta.json").read_text()))


def _checkpoint_ok(ck: Path, meta: dict) -> bool:
    """Every file the checkpoint's meta lists is there with its checksum."""
    from bench import models

    return bool(meta.get("sha256")) and all(models.file_sha256(ck / f) == h for f, h in meta["sha256"].items())


def _reference(tmp: Path, method: str) -> dict:
    run_dir, results = tmp / f"ref-{method}", tmp / f"ref-{method}-results"
    p = _bench([*COMMON, *SETUPS[method], "--output-dir", str(run_dir), "--results-dir", str(results)])
    assert p.returncode == 0, p.stderr[-3000:]
    return {"dir": run_dir, "record": json.loads((results / f"{run_dir.name}.json").read_text())}


def _sigterm_at(args: list[str], point: str) -> tuple[int, str]:
    """Run until the BENCH_TEST_PAUSE_AT point, deliver a real SIGTERM there, return (exit code, stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "bench.cli", "run", *args], env=_env(BENCH_TEST_PAUSE_AT=point),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = []
    for line in proc.stderr:  # blocks until the hook says it is paused (or the process ends)
        err.append(line)
        if f"test hook: paused at {point}" in line:
            proc.send_signal(signal.SIGTERM)
            break
    err.append(proc.stderr.read())
    proc.wait(timeout=300)
    return proc.returncode, "".join(err)


def _kill_chain(tmp: Path, method: str, steps: list[str]) -> dict:
    """Start the run, crash it at the first step, resume and crash at the next, ... then resume to the end.
    A step "sigterm@<point>" delivers a real SIGTERM at that point instead of a SIGKILL."""
    run_dir, results = tmp / f"killed-{method}", tmp / f"killed-{method}-results"
    log, term = [], None
    for i, step in enumerate(steps + [None]):
        args = ([*COMMON, *SETUPS[method], "--output-dir", str(run_dir), "--results-dir", str(results)] if i == 0
                else ["--resume", str(run_dir)])
        if step and step.startswith("sigterm@"):
            rc, err = _sigterm_at(args, step.split("@", 1)[1])
            log.append((step, rc, err[-3000:]))
            ck = run_dir / "checkpoint"
            meta = json.loads((ck / "meta.json").read_text()) if (ck / "meta.json").is_file() else None
            term = {"rc": rc, "stderr": err, "meta": meta, "dir": run_dir,
                    "record": results.exists() and bool(list(results.glob("*.json")))}
            if meta:
                term["checkpoint_ok"] = _checkpoint_ok(ck, meta)
            continue
        p = _bench(args, kill_at=step)
        log.append((step, p.returncode, p.stdout[-3000:] + p.stderr[-2000:]))
        if step is None:
            assert p.returncode == 0, log
            break
        assert p.returncode == -signal.SIGKILL, f"kill point {step} was not reached: {log}"
        _check_crash_state(run_dir, results)
    return {"dir": run_dir, "record": json.loads((results / f"{run_dir.name}.json").read_text()), "log": log, "term": term}


def _sampled(n: int, fraction: float, seed: int, rnd: int) -> list[int]:
    """The engine's client sampler: a pure function of (seed, round), nothing to checkpoint."""
    import numpy as np

    rng = np.random.default_rng([seed, rnd])
    return sorted(rng.choice(n, size=max(1, round(fraction * n)), replace=False).tolist())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    with ThreadPoolExecutor(max_workers=3) as pool:  # processes in parallel: most of their time is imports
        refs = {m: pool.submit(_reference, tmp, m) for m in SETUPS}
        flora_chain = pool.submit(_kill_chain, tmp, "flora", KILLS["flora"])
        k = _sampled(3, 0.67, seed=3, rnd=2)[-1]  # a client that round 2 really trains
        fedavg_chain = pool.submit(_kill_chain, tmp, "fedavg-lora", [p.format(k=k) for p in KILLS["fedavg-lora"]])
        assert refs["fedavg-lora"].result()["record"]["rounds"][1]["sampled"] == _sampled(3, 0.67, seed=3, rnd=2)
        return {"ref": {m: f.result() for m, f in refs.items()},
                "killed": {"flora": flora_chain.result(), "fedavg-lora": fedavg_chain.result()}}


def _assert_same_run(a: dict, b: dict) -> None:
    ta = load_file(str(a["dir"] / "global_model" / "model.safetensors"))
    tb = load_file(str(b["dir"] / "global_model" / "model.safetensors"))
    assert ta.keys() == tb.keys()
    for name in ta:
        assert torch.equal(ta[name], tb[name]), f"{name} differs"
    assert (a["dir"] / "global_model" / "model.safetensors").read_bytes() == (b["dir"] / "global_model" / "model.safetensors").read_bytes()
    assert _strip(_metrics(a["dir"])) == _strip(_metrics(b["dir"]))
    assert _strip(a["record"]["rounds"]) == _strip(b["record"]["rounds"])
    assert a["record"]["test_loss"] == b["record"]["test_loss"]
    assert a["record"]["communication"] == b["record"]["communication"]


@pytest.mark.parametrize("method", list(SETUPS))
def test_killed_and_resumed_run_is_bit_identical(runs, method):
    killed, ref = runs["killed"][method], runs["ref"][method]
    kills = [(p, rc) for p, rc, _ in killed["log"][:-1] if not p.startswith("sigterm@")]
    assert len(kills) >= 5 and all(rc == -signal.SIGKILL for _, rc in kills)
    _assert_same_run(ref, killed)
    # the merged-in-base state really travelled through the checkpoint (flora) / factors did (fedavg-lora)
    assert len(ref["record"]["rounds"]) == 3
    assert any("excluded" not in c for r in ref["record"]["rounds"] for c in r["clients"])
    assert not list(killed["dir"].glob(".checkpoint.tmp*")) and not list(killed["dir"].glob(".global_model.tmp*"))


def test_resume_after_last_round_redoes_only_the_final_steps(runs):
    # the fedavg-lora chain was killed at test-loss and at record, both after the last checkpoint
    log = runs["killed"]["fedavg-lora"]["log"]
    assert [p for p, *_ in log][-3:] == ["test-loss", "record", None]
    # the processes started after those kills resumed with nothing left to train
    assert all("resumed" in out and "all rounds done: redoing the final steps" in out for _, _, out in log[-2:])
    assert all("round 3 client" not in out for _, _, out in log[-2:])
    meta = json.loads((runs["killed"]["fedavg-lora"]["dir"] / "checkpoint" / "meta.json").read_text())
    assert meta["round"] == 3 and len(meta["rounds"]) == 3


def test_sigterm_finishes_the_checkpoint_and_exits_130_with_resume_hint(runs):
    term = runs["killed"]["fedavg-lora"]["term"]
    assert term["rc"] == 130, term["stderr"][-2000:]
    lines = [l for l in term["stderr"].splitlines() if l.startswith("interrupted:")]
    assert len(lines) == 1, term["stderr"][-2000:]
    assert "SIGTERM received; round 1 is the last checkpointed round" in lines[0]
    assert lines[0].endswith(f"Resume with: bench run --resume {term['dir']}")
    # the signal came while round 1's checkpoint was half-written: it was finished, not abandoned
    assert term["meta"] is not None and term["meta"]["round"] == 1 and term["checkpoint_ok"]
    assert not term["record"]
    # (the chain then resumed this run through 5 SIGKILLs and matched the uninterrupted run bit for bit)


def test_determinism_needs_no_rng_state(tmp_path, monkeypatch):
    """The checkpoint holds no RNG state because no draw comes from a running RNG: a run started with
    the global python/numpy/torch RNGs in different states gives the same bits."""
    import random

    import numpy as np

    from bench.config import build_config
    from bench.engine import run_federated

    monkeypatch.setenv("BENCH_DATA_ROOT", str(DATA))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = []
    for i, junk in enumerate((1, 987654)):
        random.seed(junk), np.random.seed(junk), torch.manual_seed(junk)
        random.random(), np.random.rand(7), torch.rand(5)
        cfg = build_config(preset="tiny", overrides={
            "method": "flexlora", "rounds": 2, "local_steps": 1, "batch_size": 1, "micro_batch_size": 1, "cutoff_len": 32,
            "test_limit": 2, "lora_dropout": 0.1, "output_dir": str(tmp_path / f"r{i}"), "results_dir": str(tmp_path / "res")})
        rec = run_federated(cfg, log=lambda *a: None)
        out.append((load_file(str(tmp_path / f"r{i}" / "global_model" / "model.safetensors")), rec))
    (ta, ra), (tb, rb) = out
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert _strip(ra["rounds"]) == _strip(rb["rounds"]) and ra["test_loss"] == rb["test_loss"]


def test_atomic_write_crash_keeps_old_file(tmp_path, monkeypatch):
    """A crash inside atomic_write_bytes (here: os.replace raising) leaves the old file intact and no
    temporary file behind; readers never see half a file."""
    from bench import io

    path = tmp_path / "results" / "run.json"
    io.atomic_write_json(path, {"schema_version": 1, "old": True})
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk gone")

    monkeypatch.setattr(io.os, "replace", boom)
    with pytest.raises(OSError):
        io.atomic_write_json(path, {"schema_version": 1, "new": "x" * 100000})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["run.json"]
    assert io.read_record(path)["old"] is True


def test_atomic_replace_dir_crash_between_renames_keeps_a_complete_copy(tmp_path):
    from bench import io
    from bench.checkpoint import checkpoint_dir

    run = tmp_path / "run"
    (run / "checkpoint").mkdir(parents=True)
    (run / "checkpoint" / "meta.json").write_text('{"round": 1}')
    new = run / ".checkpoint.tmp1"
    new.mkdir()
    (new / "meta.json").write_text('{"round": 2}')

    class Crash(Exception):
        pass

    def crash():
        raise Crash

    with pytest.raises(Crash):
        io.atomic_replace_dir(new, run / "checkpoint", between=crash)
    assert checkpoint_dir(run) == run / "checkpoint.old"  # the last complete round is still there
    # the next swap must not delete that only copy before the new folder is in place
    new2 = run / ".checkpoint.tmp2"
    new2.mkdir()
    (new2 / "meta.json").write_text('{"round": 2}')
    seen = []
    io.atomic_replace_dir(new2, run / "checkpoint", between=lambda: seen.append((run / "checkpoint.old").is_dir()))
    assert seen == [True]
    assert json.loads((run / "checkpoint" / "meta.json").read_text()) == {"round": 2}
    assert not (run / "checkpoint.old").exists()


def test_kill_during_evaluation_then_resume_matches(tmp_path):
    """SIGKILL while lm-eval scores the global model; the resumed run (all rounds checkpointed) redoes the
    final steps and ends with the same weights, metrics and scores as an uninterrupted run."""
    extra = ["--method", "flexlora", "--eval-tasks", "openbookqa", "--eval-limit", "2"]

    def run(name, kill_at=None, resume=False):
        run_dir, results = tmp_path / name, tmp_path / f"{name}-results"
        args = ["--resume", str(run_dir)] if resume else \
            [*COMMON, *extra, "--output-dir", str(run_dir), "--results-dir", str(results)]
        return _bench(args, kill_at=kill_at), run_dir, results

    p, ref_dir, ref_results = run("ref")
    assert p.returncode == 0, p.stderr[-3000:]
    p, dir_, results = run("killed", kill_at="eval")
    assert p.returncode == -signal.SIGKILL, "the eval kill point was not reached"
    _check_crash_state(dir_, results)
    p, _, _ = run("killed", resume=True)
    assert p.returncode == 0, p.stderr[-3000:]
    ref = {"dir": ref_dir, "record": json.loads((ref_results / "ref.json").read_text())}
    killed = {"dir": dir_, "record": json.loads((results / "killed.json").read_text())}
    _assert_same_run(ref, killed)
    assert ref["record"]["eval"]["tasks"]["openbookqa"]["value"] == killed["record"]["eval"]["tasks"]["openbookqa"]["value"]


def test_evaluation_killed_mid_scoring_resumes_from_the_request_cache(tmp_path):
    """SIGKILL after 7 answered requests of a `bench eval`; scoring again into the same folder reuses those
    answers (lm-eval's CachingLM, committed per request), computes only the rest, and ends with the same
    scores and per-sample log-likelihoods as an uninterrupted evaluation."""
    import sqlite3

    from conftest import require_data_root

    data_root = str(require_data_root())

    def bench_eval(name, kill_at=None):
        env = dict(os.environ, BENCH_DATA_ROOT=data_root)
        env.pop("BENCH_TEST_KILL_AT", None)
        if kill_at:
            env["BENCH_TEST_KILL_AT"] = kill_at
        return subprocess.run([sys.executable, "-m", "bench.cli", "eval", "--model", "tiny-random-llama",
                               "--tasks", "openbookqa,arc_easy", "--limit", "6", "--output-dir", str(tmp_path / name),
                               "--results-dir", str(tmp_path / f"{name}-results")],
                              env=env, capture_output=True, text=True, timeout=600)

    def record(name):
        (path,) = (tmp_path / f"{name}-results").glob("*.json")
        return json.loads(path.read_text())["eval"]

    def loglikelihoods(name, task):
        rows = [json.loads(x) for x in (tmp_path / name / "eval" / f"{task}.jsonl").read_text().splitlines()]
        return [r["resps"] for r in sorted(rows, key=lambda r: r["doc_id"])]

    p = bench_eval("ref")
    assert p.returncode == 0, p.stderr[-3000:]
    p = bench_eval("killed", kill_at="eval-request:7")
    assert p.returncode == -signal.SIGKILL, "the eval-request kill point was not reached:\n" + p.stderr[-2000:]
    assert not (tmp_path / "killed-results").exists() or not list((tmp_path / "killed-results").glob("*.json"))
    (db,) = (tmp_path / "killed" / "eval" / "request-cache").glob("*.sqlite")
    with sqlite3.connect(db) as con:  # intact and holding the committed answers
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert con.execute("SELECT COUNT(*) FROM unnamed").fetchone()[0] == 7
    p = bench_eval("killed")
    assert p.returncode == 0, p.stderr[-3000:]
    ref, resumed = record("ref"), record("killed")
    assert ref["request_cache"]["answered_from_cache"] == 0
    assert resumed["request_cache"]["answered_from_cache"] == 7
    assert resumed["request_cache"]["requests"] == ref["request_cache"]["requests"] > 7
    for task in ("openbookqa", "arc_easy"):
        assert resumed["tasks"][task]["value"] == ref["tasks"][task]["value"]
        assert resumed["tasks"][task]["n"] == ref["tasks"][task]["n"] == 6
        got, want = loglikelihoods("killed", task), loglikelihoods("ref", task)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert [float(x[0][0]) for x in g] == pytest.approx([float(x[0][0]) for x in w], abs=1e-4)
