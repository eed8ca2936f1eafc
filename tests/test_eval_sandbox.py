"""The HumanEval sandbox against hostile completions, for real (no mocks).

Each attack is written so that the program would EXIT 0 ONLY IF THE ATTACK SUCCEEDED; the sandbox must report
it as failed, and the test also checks the side effect did not happen. Most attacks run twice: with the
interpreter guard (what scoring uses) and without it (guard=False), which proves the kernel layers
(namespaces, uid drop, rlimits, timeout) hold on their own.
"""
from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from evaluators import sandbox
from evaluators.sandbox import check_completion, run_program
from evaluators.tasks.loaders import humaneval_path

GUARDS = [pytest.param(True, id="guard"), pytest.param(False, id="kernel-only")]


def _sandbox_processes() -> list[str]:
    """Processes still alive that belong to a sandbox (their command line names a fedlora-sbx- folder)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"fedlora-sbx-" in cmd:
            found.append(pid)
    return found


def _wait_no_sandbox_processes(seconds: float = 3.0) -> list[str]:
    deadline = time.monotonic() + seconds
    while (left := _sandbox_processes()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


@pytest.fixture(scope="module")
def problems() -> list[dict]:
    with gzip.open(humaneval_path(), "rt") as f:
        return [json.loads(line) for line in f]


def test_benign_program_passes_and_reports_layers():
    r = run_program("import math\nprint(math.factorial(5))")
    assert r.passed, r.status
    assert r.stdout.strip() == "120"
    for layer in ("RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_NPROC"):
        assert layer in r.layers


def test_failing_program_fails():
    r = run_program("assert 1 + 1 == 3")
    assert not r.passed and r.status.startswith("failed: AssertionError")


@pytest.mark.parametrize("guard", GUARDS)
def test_fork_bomb(guard):
    bomb = ("import os\n"
            "while True:\n"
            "    try:\n"
            "        os.fork()\n"
            "    except OSError:\n"
            "        pass\n")
    start = time.monotonic()
    r = run_program(bomb, timeout=3, guard=guard)
    assert not r.passed
    assert time.monotonic() - start - r.boot_seconds < 10
    assert _wait_no_sandbox_processes() == [], "fork bomb processes survived the sandbox"
    # this process can still start processes
    assert subprocess.run(["true"]).returncode == 0


@pytest.mark.parametrize("guard", GUARDS)
def test_memory_bomb(guard):
    start = time.monotonic()
    r = run_program("x = []\nwhile True:\n    x.append(bytearray(64 << 20))\n", timeout=20, memory_mb=512, guard=guard)
    assert not r.passed
    assert "MemoryError" in r.status
    assert time.monotonic() - start - r.boot_seconds < 15  # stopped by RLIMIT_AS, not by the wall clock
    r = run_program("x = bytearray(8 << 30)\n", guard=guard)
    assert not r.passed and "MemoryError" in r.status


def test_infinite_loop_times_out():
    start = time.monotonic()
    r = run_program("while True:\n    pass\n", timeout=2)
    assert not r.passed and r.status.startswith("timed out")
    assert time.monotonic() - start - r.boot_seconds < 6  # the 2 s count from the program's start
    assert _wait_no_sandbox_processes() == []


def test_the_wall_clock_counts_from_the_program_start(tmp_path):
    """An interpreter that takes 3 s to start (a loaded machine: its ~60 imports took over 6 s here) does not time
    out a 1-second program before it runs; a program that sleeps past its 1 s still times out."""
    import sys

    slow = tmp_path / "slow-python"
    slow.write_text(f"#!/bin/sh\nsleep 3\nexec {sys.executable} \"$@\"\n")
    slow.chmod(0o755)
    ok = run_program("print('ran')", timeout=1, python=str(slow))
    assert ok.passed and ok.stdout.strip() == "ran" and ok.boot_seconds > 3, ok
    start = time.monotonic()
    late = run_program("import time\ntime.sleep(30)", timeout=1, python=str(slow))
    assert late.status == "timed out after 1s" and time.monotonic() - start - late.boot_seconds < 5, late


def test_cpu_limit_stops_a_busy_loop_without_the_wall_clock():
    start = time.monotonic()
    r = run_program("while True:\n    pass\n", timeout=60, cpu_s=1)
    assert not r.passed and not r.status.startswith("timed out"), r.status
    assert time.monotonic() - start - r.boot_seconds < 20


@pytest.fixture
def victim(tmp_path):
    """A file outside the sandbox, readable by everyone, writable by its owner only."""
    d = tmp_path / "outside"
    d.mkdir()
    f = d / "precious.txt"
    f.write_text("keep me")
    os.chmod(tmp_path, 0o755)
    os.chmod(d, 0o755)
    os.chmod(f, 0o644)
    return f


@pytest.mark.parametrize("guard", GUARDS)
def test_deleting_files_outside_its_directory(victim, guard):
    attacks = [
        f"import os\nos.remove({str(victim)!r})\nassert not os.path.exists({str(victim)!r})",
        f"import shutil, os\nshutil.rmtree({str(victim.parent)!r})\nassert not os.path.exists({str(victim)!r})",
        f"open({str(victim)!r}, 'w').write('gone')\nassert open({str(victim)!r}).read() == 'gone'",
        f"import os\nos.rename({str(victim)!r}, {str(victim)!r} + '.x')\nassert not os.path.exists({str(victim)!r})",
    ]
    for code in attacks:
        r = run_program(code, guard=guard)
        assert not r.passed, code
        assert victim.read_text() == "keep me"
    # its own working directory is writable
    assert run_program("open('scratch.txt', 'w').write('ok')\nassert open('scratch.txt').read() == 'ok'",
                       guard=guard).passed


@pytest.mark.parametrize("guard", GUARDS)
def test_opening_sockets(guard):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(5)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    got = []
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                got.append(conn.recv(100))
                conn.close()
            except OSError:
                pass

    th = threading.Thread(target=accept, daemon=True)
    th.start()
    try:
        code = (f"import socket\n"
                f"s = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                f"s.sendall(b'exfiltrated')\n"
                f"s.close()\n")
        r = run_program(code, guard=guard)
        assert not r.passed
        r = run_program("import socket\ns = socket.socket()\ns.settimeout(2)\ns.connect(('1.1.1.1', 80))\n",
                        guard=guard)
        assert not r.passed
        time.sleep(0.3)
        assert got == [], "a sandboxed program reached a socket server"
        # the harness itself can still connect: the attack failed because of the sandbox
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(b"harness")
        time.sleep(0.5)
        assert got == [b"harness"]
    finally:
        stop.set()
        th.join(2)
        server.close()


@pytest.mark.parametrize("guard", GUARDS)
def test_reading_environment_secrets(monkeypatch, guard):
    secret = "s3cr3t-token-4242"
    monkeypatch.setenv("FEDLORA_SANDBOX_TEST_SECRET", secret)
    monkeypatch.setenv("HF_TOKEN", secret)
    code = ("import os\n"
            "found = [v for v in os.environ.values() if 's3cr3t' in v]\n"
            "for pid in os.listdir('/proc'):\n"
            "    try:\n"
            "        data = open('/proc/%s/environ' % pid, 'rb').read()\n"
            "    except Exception:\n"
            "        continue\n"
            "    if b's3cr3t' in data:\n"
            "        found.append(data)\n"
            "print(found)\n"
            "assert found\n")
    r = run_program(code, guard=guard)
    assert not r.passed
    assert secret not in r.stdout and secret not in r.stderr


@pytest.mark.parametrize("guard", GUARDS)
def test_os_system_and_subprocess(tmp_path, guard):
    os.chmod(tmp_path, 0o755)  # readable by everyone, writable by its owner only
    marker = tmp_path / "pwned"
    attacks = [
        f"import os\nassert os.system('touch {marker}') == 0\nassert os.path.exists({str(marker)!r})",
        f"import subprocess\nsubprocess.run(['touch', {str(marker)!r}], check=True)",
        f"import os\nos.execv('/bin/touch', ['touch', {str(marker)!r}])",
    ]
    for code in attacks:
        r = run_program(code, guard=guard)
        assert not r.passed, code
        assert not marker.exists()
    assert _wait_no_sandbox_processes() == []


def test_output_flood_is_capped():
    r = run_program("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n", timeout=10, fsize_mb=1)
    assert not r.passed
    assert len(r.stdout) <= 4000  # the harness keeps only a tail; the file itself stops at RLIMIT_FSIZE


def test_the_run_goes_on_after_hostile_samples(problems, victim):
    p = problems[0]
    hostile = ["import os\nwhile True: os.fork()", "x = bytearray(8 << 30)", "while True: pass",
               f"import os\nos.remove({str(victim)!r})", "import socket\nsocket.create_connection(('1.1.1.1', 80))",
               "import os\nos.system('echo pwned')"]
    cwd, env = os.getcwd(), dict(os.environ)
    for code in hostile:
        assert not check_completion(p["prompt"] + "    " + code.replace("\n", "\n    ") + "\n", p["test"],
                                    p["entry_point"], timeout=2).passed
    assert check_completion(p["prompt"] + p["canonical_solution"], p["test"], p["entry_point"]).passed
    assert os.getcwd() == cwd and dict(os.environ) == env and victim.read_text() == "keep me"


def test_canonical_solutions_pass_and_wrong_ones_fail(problems):
    # every 8th problem (21 of 164) keeps this quick; all 164 pass in ~30 s (see docs/evaluation.md)
    for p in problems[::8]:
        ok = check_completion(p["prompt"] + p["canonical_solution"], p["test"], p["entry_point"])
        assert ok.passed, (p["task_id"], ok.status)
        wrong = check_completion(p["prompt"] + "    return None\n", p["test"], p["entry_point"])
        assert not wrong.passed, p["task_id"]


def test_isolation_summary_names_the_layers():
    layers = sandbox.isolation()
    assert "RLIMIT_NPROC" in layers and "RLIMIT_AS" in layers
    if os.geteuid() == 0:
        assert "netns" in layers and "pidns" in layers and "uid=65534" in layers


@pytest.mark.skipif(os.geteuid() != 0, reason="the control needs the uid layer to be the only file protection")
def test_control_the_attacks_work_without_the_layers(victim, tmp_path):
    """The attack programs above are real: with the guard, namespaces and uid drop all off they succeed."""
    off = dict(guard=False, namespaces=False, drop_uid=False)
    assert run_program(f"import os\nos.remove({str(victim)!r})\nassert not os.path.exists({str(victim)!r})", **off).passed
    assert not victim.exists()
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        assert run_program(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).close()",
                           **off).passed
    finally:
        server.close()
