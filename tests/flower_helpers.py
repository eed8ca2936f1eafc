"""Shared by the Flower tests: the small run they all use, in-process reference runs (computed once per
session), comparisons, and a local Flower deployment (SuperLink + SuperNodes on 127.0.0.1, TLS and
SuperNode authentication) whose every process is started in its own process group and stopped by PID."""
from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
# 3 clients with ranks 2,4,8, 2 rounds of one local step on short sequences: seconds per round
SMALL = ["--preset", "tiny", "--ranks", "2,4,8", "--local-steps", "1", "--batch-size", "1", "--micro-batch-size", "1",
         "--cutoff-len", "32", "--test-limit", "2"]


def require_flwr():
    try:
        import flwr  # noqa: F401
        import ray  # noqa: F401
    except ImportError as exc:  # a broken setup, not a reason to skip: setup.sh --with-test-deps installs it
        pytest.fail(f"flwr[simulation] is not installed ({exc}); run bash setup.sh --with-test-deps")


def flower_env(flwr_home: Path) -> dict:
    env = dict(os.environ)
    env.update({"FLWR_HOME": str(flwr_home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])})
    return env


# ---- reference runs --------------------------------------------------------------------------------

_REFERENCES: dict = {}


def reference_run(root: Path, method: str, *extra: str) -> Path:
    """The in-process run of SMALL (+extra) for this method, run once per session."""
    from bench.cli import main

    key = (method, extra)
    if key not in _REFERENCES:
        out = root / f"inprocess-{method}-{len(_REFERENCES)}"
        rc = main(["run", *SMALL, "--method", method, *extra, "--output-dir", str(out / "run"),
                   "--results-dir", str(out / "results")])
        assert rc == 0
        _REFERENCES[key] = out / "run"
    return _REFERENCES[key]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def record(run: Path) -> dict:
    return json.loads(Path(json.loads((run / "run.json").read_text())["record"]).read_text())


def assert_same_run(run: Path, ref: Path) -> None:
    """Bit-identical server state and global model, the same per-client numbers and tensor bytes."""
    for rel in ("checkpoint/server.safetensors", "global_model/model.safetensors"):
        a, b = load_file(str(run / rel)), load_file(str(ref / rel))
        assert sorted(a) == sorted(b), rel
        diff = [k for k in a if not (a[k] == b[k]).all()]
        assert not diff, f"{rel}: {diff[:3]} differ"
    for got, want in zip(metrics(run), metrics(ref), strict=True):
        assert got["round"] == want["round"] and got["sampled"] == want["sampled"]
        for g, w in zip(got["clients"], want["clients"], strict=True):
            for key in ("id", "rank", "examples", "loss", "first_loss", "last_loss", "tokens", "bytes_up", "bytes_down", "p"):
                assert g.get(key) == w.get(key), (got["round"], g["id"], key, g.get(key), w.get(key))
            assert g["wire_bytes_down"] > g["bytes_down"] and g["wire_bytes_up"] > g["bytes_up"]
    assert record(run)["communication"] == record(ref)["communication"]
    assert record(run)["test_loss"] == record(ref)["test_loss"]


# ---- a local deployment --------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_certs(out: Path, nodes: int) -> None:
    """A CA, the SuperLink's certificate for 127.0.0.1 (signed by it), and an EC key pair per SuperNode."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedlora-bench test CA")])
    valid = dict(not_valid_before=now - datetime.timedelta(minutes=5), not_valid_after=now + datetime.timedelta(days=1))

    def build(subject, key, **ext):
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name).public_key(key.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(valid["not_valid_before"])
             .not_valid_after(valid["not_valid_after"]))
        for e, critical in ext.values():
            b = b.add_extension(e, critical=critical)
        return b.sign(ca_key, hashes.SHA256())

    ca = build(ca_name, ca_key, bc=(x509.BasicConstraints(ca=True, path_length=None), True))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = build(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]), key,
                 san=(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                   x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False))
    pem = serialization.Encoding.PEM
    (out / "ca.crt").write_bytes(ca.public_bytes(pem))
    (out / "server.pem").write_bytes(cert.public_bytes(pem))
    (out / "server.key").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    for i in range(nodes):
        k = ec.generate_private_key(ec.SECP384R1())
        (out / f"node{i}").write_bytes(k.private_bytes(pem, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
        (out / f"node{i}.pub").write_bytes(k.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                      serialization.PublicFormat.OpenSSH))


class Deployment:
    """One SuperLink (TLS, SuperNode authentication) and one SuperNode per partition, on 127.0.0.1.

    Every process is started with start_new_session=True (its own process group, which its children
    such as flower-superexec and flwr-clientapp inherit) and stopped with os.killpg on that group."""

    def __init__(self, root: Path, nodes: int = 3):
        self.root, self.n = root, nodes
        self.certs, self.home, self.logs = root / "certs", root / "flwr_home", root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        make_certs(self.certs, nodes + 1)  # node<n>: a key the SuperLink never registers
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = flower_env(self.home)
        self.procs: dict[str, subprocess.Popen] = {}
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "local"\n[superlink.local]\naddress = "{self.address}"\n'
            f'root-certificates = "{self.certs / "ca.crt"}"\n')

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "ab")
        p = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                             cwd=self.root)
        self.procs[name] = p
        return p

    def stop(self, name: str, sig=signal.SIGTERM) -> None:
        p = self.procs.pop(name, None)
        if p is None:
            return
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=20)
        _reap_group(p.pid)

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([_exe("flwr"), *args], env=self.env, capture_output=True, text=True, timeout=timeout, cwd=self.root)

    def up(self) -> "Deployment":
        c = self.certs
        self.start("superlink", [_exe("flower-superlink"), "--ssl-ca-certfile", str(c / "ca.crt"), "--ssl-certfile",
                                 str(c / "server.pem"), "--ssl-keyfile", str(c / "server.key"), "--enable-supernode-auth",
                                 "--host", "127.0.0.1", "--port", str(self.port), "--disable-runtime-dependency-installation"])
        deadline = time.time() + 90
        while True:  # the Control API answers once the SuperLink is up
            r = self.flwr("supernode", "ls", "local", "--format", "json", timeout=60)
            if r.returncode == 0 and "{" in r.stdout and json.loads(r.stdout[r.stdout.index("{"):]).get("success"):
                break
            assert self.procs["superlink"].poll() is None, self.log("superlink")
            assert time.time() < deadline, f"SuperLink did not come up: {r.stdout[-500:]} {r.stderr[-500:]}"
            time.sleep(1)
        for i in range(self.n):
            r = self.flwr("supernode", "register", str(c / f"node{i}.pub"), "local")
            assert r.returncode == 0, r.stdout + r.stderr
            self.start_node(i)
        self.wait_nodes(self.n)
        return self

    def start_node(self, i: int, key: str | None = None, name: str | None = None) -> subprocess.Popen:
        c = self.certs
        return self.start(name or f"node{i}", [
            _exe("flower-supernode"), "--root-certificates", str(c / "ca.crt"), "--superlink", self.address,
            "--auth-supernode-private-key", str(c / (key or f"node{i}")), "--host", "127.0.0.1", "--port", str(free_port()),
            "--node-config", f"partition-id={i} num-partitions={self.n}"])

    def online(self) -> list[int]:
        r = self.flwr("supernode", "ls", "local", "--format", "json", timeout=60)
        try:
            nodes = json.loads(r.stdout[r.stdout.index("{"):])["nodes"]
        except (ValueError, KeyError):
            return []
        return [int(n["node-id"]) for n in nodes if n.get("status") == "online"]

    def wait_nodes(self, n: int, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while len(self.online()) < n:
            assert time.time() < deadline, f"only {len(self.online())} of {n} SuperNodes online; " + self.log("node0")
            time.sleep(1)

    def ensure_nodes(self) -> None:
        """Restart any SuperNode that is not running (a test killed it)."""
        for i in range(self.n):
            p = self.procs.get(f"node{i}")
            if p is None or p.poll() is not None:
                self.stop(f"node{i}")
                self.start_node(i)

    def log(self, name: str, tail: int = 3000) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-tail:] if path.exists() else ""

    def down(self) -> None:
        """SIGTERM every group at once (SuperNodes first), then wait; SIGKILL what is left after 20 s."""
        names = [n for n in self.procs if n != "superlink"] + [n for n in self.procs if n == "superlink"]
        for name in names:
            try:
                os.killpg(self.procs[name].pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for name in names:
            self.stop(name)

    def run_args(self) -> list[str]:
        return ["--engine", "flower", "--superlink", self.address, "--root-certificates", str(self.certs / "ca.crt")]


def _exe(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _reap_group(pgid: int) -> None:
    """Wait (≤ 20 s) until no process of this group is left (children exit after their parent)."""
    import psutil

    deadline = time.time() + 20
    while time.time() < deadline:
        left = [p for p in psutil.process_iter(["pid"]) if _pgid(p.pid) == pgid]
        if not left:
            return
        time.sleep(0.5)
    for p in [p for p in psutil.process_iter(["pid"]) if _pgid(p.pid) == pgid]:
        try:
            os.kill(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None
