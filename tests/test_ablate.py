"""`bench ablate` runs a real grid of tiny runs and never runs a finished cell twice."""
import json

from bench.cli import main


def _grid(tmp_path, shared_data, *extra):
    return ["ablate", "--preset", "tiny", "--methods", "flora,fedavg-lora", "--ranks-grid", "homo;4,2,2",
            "--seeds", "0", "--set", f"data_root={shared_data}", "--set", "rounds=1",
            "--results-dir", str(tmp_path / "results"), "--runs-dir", str(tmp_path / "runs"), *extra]


def test_grid_runs_every_cell_once_and_resumes(tmp_path, shared_data, capsys):
    assert main(_grid(tmp_path, shared_data)) == 0
    records = sorted((tmp_path / "results").glob("*.json"))
    assert len(records) == 4
    settings = {(json.loads(p.read_text())["method"], tuple(json.loads(p.read_text())["setting"]["ranks"])) for p in records}
    assert settings == {(m, r) for m in ("flora", "fedavg-lora") for r in ((8, 8, 8), (4, 2, 2))}
    capsys.readouterr()
    # second invocation: nothing left to do
    assert main(_grid(tmp_path, shared_data)) == 0
    assert "4 cells, 4 already done, 0 to run" in capsys.readouterr().out
    # a lost record means that cell (and only it) runs again
    records[0].unlink()
    assert main(_grid(tmp_path, shared_data)) == 0
    assert "1 to run" in capsys.readouterr().out
    assert len(list((tmp_path / "results").glob("*.json"))) == 4


def test_grid_refuses_bad_cell_before_running_anything(tmp_path, shared_data, capsys):
    code = main(_grid(tmp_path, shared_data, "--partitions", "iid;dirichlet:x"))
    assert code == 2
    assert "partitions:" in capsys.readouterr().err
    assert not (tmp_path / "results").exists() and not (tmp_path / "runs").exists()


def test_a_cell_another_process_runs_is_left_to_it(tmp_path, shared_data, capsys):
    """Two ablate processes on one grid (study.sh runs one per seed): a cell whose lock another process holds is
    neither run nor deleted here, and the grid is not reported complete until it has its record."""
    import subprocess
    import sys

    runs = tmp_path / "runs"
    runs.mkdir()
    one_cell = _grid(tmp_path, shared_data)
    one_cell[one_cell.index("flora,fedavg-lora")] = "flora"
    one_cell[one_cell.index("homo;4,2,2")] = "homo"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, fcntl, pathlib; from bench.app.ablate import claim; "
                               "lock = claim(pathlib.Path(sys.argv[1])); print('held' if lock else 'busy', flush=True); "
                               "sys.stdin.read()", str(runs / "flora-homo-s0")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        (runs / "flora-homo-s0").mkdir()
        (runs / "flora-homo-s0" / "partial").write_text("the other process's work")
        assert main(one_cell) == 0
        out = capsys.readouterr().out
        assert "flora-homo-s0 is being run by another process; left to it" in out and "grid complete" not in out
        assert (runs / "flora-homo-s0" / "partial").is_file()  # not deleted, not trained
        assert not list((tmp_path / "results").glob("*.json"))
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert main(one_cell) == 0  # the holder ended: its lock went with it
    out = capsys.readouterr().out
    assert "1 to run" in out and "grid complete: 1 cells" in out
    assert len(list((tmp_path / "results").glob("*.json"))) == 1


def _tuning_grid(tmp_path, shared_data, *extra):
    return ["ablate", "--preset", "tiny", "--methods", "fedit", "--references", "centralized", "--seeds", "0",
            "--set", f"data_root={shared_data}", "--set", "rounds=1", "--set", "local_steps=1",
            "--set", "eval_tasks=piqa", "--set", "eval_limit=10", "--lrs", "1e-3,5e-2",
            "--results-dir", str(tmp_path / "tune"), "--runs-dir", str(tmp_path / "runs"), *extra]


def test_lr_axis_tunes_and_the_main_grid_takes_each_rows_best_lr(tmp_path, shared_data, capsys):
    """A tuning grid (--lrs) runs each row at each lr; --tuned-lr gives every row of a later grid the lr whose
    record scored highest on the tuning task, records how it was chosen, and the report shows it."""
    import argparse

    from bench.app.ablate import add_arguments, plan_cells
    from bench.cli import main as cli_main

    assert cli_main(_tuning_grid(tmp_path, shared_data)) == 0
    recs = [json.loads(p.read_text()) for p in sorted((tmp_path / "tune").glob("*.json"))]
    assert sorted((r["method"], r["config"]["lr"]) for r in recs) == \
        [("centralized", 1e-3), ("centralized", 5e-2), ("fedit", 1e-3), ("fedit", 5e-2)]
    best = {}
    for r in recs:   # the rule, written out: the highest piqa score wins, a tie goes to the lower held-out loss
        score = (r["eval"]["tasks"]["piqa"]["value"], -r["test_loss"])
        if r["method"] not in best or score > best[r["method"]][1]:
            best[r["method"]] = (r["config"]["lr"], score)

    def plan(*argv):
        p = argparse.ArgumentParser()
        add_arguments(p)
        return plan_cells(p.parse_args(["--preset", "tiny", "--set", f"data_root={shared_data}",
                                        "--runs-dir", str(tmp_path / "runs"), *argv]))

    main_grid = ("--methods", "fedit", "--references", "base,centralized,local-only", "--tuned-lr", str(tmp_path / "tune"),
                 "--tuned-lr-as", "local-only=fedit", "--set", "eval_tasks=openbookqa")
    cells = dict(plan(*main_grid))
    assert cells["fedit-homo-s0"].lr == best["fedit"][0] and cells["centralized-homo-s0"].lr == best["centralized"][0]
    assert cells["local-only-homo-s0"].lr == best["fedit"][0]
    assert cells["local-only-homo-s0"].lr_tuning["borrowed_from"] == "fedit"
    assert cells["base-homo-s0"].lr_tuning is None
    t = cells["fedit-homo-s0"].lr_tuning
    assert t["task"] == "piqa" and set(t["scores"]) == {"0.001", "0.05"} and len(t["records"]) == 2
    # refusals, one line each, before anything runs
    obqa = ("--set", "eval_tasks=openbookqa")
    for argv, words in [(main_grid[:-2] + ("--set", "eval_tasks=piqa"), "a task this grid reports"),
                        (main_grid[:6] + obqa, "no scored tuning record of 'local-only'"),
                        (("--tuned-lr", str(tmp_path / "nowhere")) + obqa, "does not exist"),
                        (("--lrs", "1e-3,x"), "lrs:"),
                        (("--lrs", "1e-3", "--tuned-lr", str(tmp_path / "tune")), "exclude each other")]:
        try:
            plan(*argv)
        except Exception as exc:   # BenchError
            assert words in str(exc) and "\n" not in str(exc), str(exc)
        else:
            raise AssertionError(f"{argv} was not refused")
    # the report: a tuning grid's rows say their lr; a tuned row's choice is stated
    assert cli_main(["ablate", "--preset", "tiny", "--methods", "fedit", "--seeds", "0", "--tuned-lr",
                     str(tmp_path / "tune"), "--set", f"data_root={shared_data}", "--set", "rounds=1",
                     "--set", "local_steps=1", "--results-dir", str(tmp_path / "main"),
                     "--runs-dir", str(tmp_path / "runs")]) == 0
    capsys.readouterr()
    assert cli_main(["report", "--results", str(tmp_path / "tune"), "--out", str(tmp_path / "rt")]) == 0
    board = (tmp_path / "rt" / "LEADERBOARD.md").read_text()
    assert "fedit @ lr 0.001" in board and "fedit @ lr 0.05" in board and "| LR |" in board
    assert cli_main(["report", "--results", str(tmp_path / "main"), "--out", str(tmp_path / "rm")]) == 0
    board = (tmp_path / "rm" / "LEADERBOARD.md").read_text()
    assert f"fedit: lr {best['fedit'][0]:g}, chosen on piqa" in board and "(tuned)" in board


def test_a_base_row_scored_once_pairs_with_every_seed(tmp_path, shared_data, capsys):
    """The base model trains nothing and scores held-out examples that every seed shares: its one record pairs with
    each seed of a trained row (seed-level differences from all of them). On a source whose test split is drawn
    with the seed, it does not."""
    import csv

    from bench.cli import main as cli_main

    def grid(dataset_args, out, seeds, refs):
        args = ["ablate", "--preset", "tiny", "--methods", "fedit", "--references", refs, "--seeds", seeds,
                "--set", f"data_root={shared_data}", "--set", "rounds=1", "--set", "local_steps=1", *dataset_args,
                "--results-dir", str(tmp_path / out), "--runs-dir", str(tmp_path / ("runs-" + out))]
        assert cli_main(args) == 0

    fixed = ["--set", "dataset=dolly-heldout", "--set", "partition=predefined", "--ranks-grid", "4,4,2,2,2,2,2,2,2,2",
             "--set", "max_examples_per_client=4"]
    seeded = ["--set", "dataset=codealpaca", "--set", "test_fraction=0.01", "--set", "partition=iid", "--ranks-grid", "4,2,2"]   # no test file: split by the seed
    for dataset_args, out in ((fixed, "fixed"), (seeded, "seeded")):
        grid(dataset_args, out, "0,1", "")
        grid(dataset_args, out, "0", "base")
        base = next(json.loads(p.read_text()) for p in (tmp_path / out).glob("base-*.json"))
        assert base["test"]["split_by_seed"] is (out == "seeded")
        assert cli_main(["report", "--results", str(tmp_path / out), "--out", str(tmp_path / f"r-{out}"),
                         "--baseline", "base"]) == 0
        rows = [r for r in csv.DictReader(open(tmp_path / f"r-{out}" / "paired.csv"))
                if r["family"] == "paired" and r["method"] == "fedit" and r["metric"] == "test_loss"]
        assert len(rows) == 1
        assert rows[0]["n_seeds"] == ("2" if out == "fixed" else "1"), rows[0]
    capsys.readouterr()
