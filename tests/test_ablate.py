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
    holder = subprocess.Popen([sys.executable, "-c", "import sys, fcntl, pathlib; from bench.ablate import claim; "
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
