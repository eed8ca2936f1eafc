"""RunConfig: every knob of a federated run, loaded from a preset, a YAML file and CLI flags, and
validated before any work starts.

Precedence (lowest first): field defaults < the method's recipe < preset < --config file < CLI flags.
Every refusal is a BenchError with one line naming the field and the fix.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import BenchError

PRESETS_DIR = Path(__file__).parent / "presets"
PARTITIONS = ("iid", "dirichlet", "shards", "predefined")
RANK_DISTRIBUTIONS = ("homo", "uniform", "heavy-tail-light", "heavy-tail-strong", "normal", "explicit")
PROMPT_TEMPLATES = ("alpaca", "chat")
DTYPES = ("auto", "float32", "bfloat16", "float16")
# What "auto" means for each dtype a run or an evaluation picks, on a CUDA GPU and on a CPU (docs/precision.md):
# training storage and scoring take bfloat16 on a GPU (its fast matmul type) and float32 on a CPU (the reference
# precision); the exported global model is float32 everywhere, since it holds every round's update.
AUTO_DTYPES = {"training": {"cuda": "bfloat16", "cpu": "float32"},
               "export": {"cuda": "float32", "cpu": "float32"},
               "eval": {"cuda": "bfloat16", "cpu": "float32"}}
COMPUTE_DTYPES = ("auto", "float32", "bfloat16")   # bench/compute.py resolves them
ALPHA_POLICIES = ("shared", "proportional")
REFERENCES = ("base", "centralized", "local-only")


@dataclass
class RunConfig:
    # what
    method: str = "flora"
    preset: str | None = None
    model: str = "default"
    dataset: str = "dolly"
    data_root: str | None = None
    field_map: dict[str, str] = field(default_factory=dict)
    test_fraction: float = 0.05          # held-out share for sources without a test split
    test_limit: int | None = None        # cap on held-out examples for the test loss (seeded subset)
    heldout_split: str = "test"          # the held-out split the test loss reads: test, or validation (for tuning;
    #                                      sources with a held-out draw, e.g. dolly-heldout)
    client_test_fraction: float = 0.0    # each client's own held-out split, taken from its shard (0: none)
    # clients and data partition
    num_clients: int = 10
    client_fraction: float = 1.0
    partition: str = "dirichlet"
    dirichlet_alpha: float = 0.5
    label_field: str = "label"
    min_examples_per_client: int = 1
    shards_per_client: int = 2
    max_examples_per_client: int | None = None
    # local training
    rounds: int = 3
    local_steps: int | None = None
    local_epochs: float | None = 1.0
    lr: float = 3e-4
    # where lr came from when a tuning grid chose it (bench ablate --tuned-lr): the validation task and metric, each
    # candidate lr's score and the records scored; None when lr was simply given
    lr_tuning: dict[str, Any] | None = None
    batch_size: int = 4
    micro_batch_size: int = 4
    cutoff_len: int = 256
    prompt_template: str = "alpaca"
    train_on_inputs: bool = False
    # each step's examples go into micro-batches grouped by length (≤ micro_batch_size each), so that no micro-batch
    # computes much padding; the step's examples, its loss and its normalisation are the same either way
    length_buckets: bool = True
    # LoRA
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    use_rslora: bool = False
    # shared: every client's lora_alpha is lora_alpha (s_k = α/r_k; peft's and FlexLoRA's convention);
    # proportional: α_k = alpha_ratio · r_k, so every client's s_k = alpha_ratio (FLoRA's heterogeneous runs: 2·r_k)
    alpha_policy: str = "shared"
    alpha_ratio: float = 2.0
    rank: int = 8
    ranks: list[int] | None = None
    rank_distribution: str = "homo"
    rank_set: list[int] = field(default_factory=lambda: [4, 8, 16, 32])
    method_options: dict[str, Any] = field(default_factory=dict)   # the method's own options (bench methods lists them)
    # robustness
    max_update_norm: float | None = None   # a client update with ‖s·B·A‖_F above this is excluded
    # differential privacy (bench/privacy.py): DP-SGD on every client's local training, record-level
    dp_epsilon: float | None = None          # target ε per client over the whole run (σ calibrated to it)
    dp_delta: float | None = None
    dp_noise_multiplier: float | None = None  # σ itself, instead of dp_epsilon
    dp_clip_norm: float = 1.0                # C: each example's gradient (all trained factors) clipped to this L2 norm
    dp_accountant: str = "rdp"               # rdp | prv (Opacus's accountants)
    # evaluation
    eval_tasks: list[str] = field(default_factory=list)
    eval_limit: int | None = None
    eval_backend: str | None = None
    eval_num_fewshot: int | None = None
    eval_dtype: str = "auto"
    eval_seed: int = 0                   # picks --eval-limit subsets; fixed across training seeds, so scores pair by example
    eval_allow_code_execution: bool = False   # consent for code tasks (humaneval): model-written code in the sandbox
    eval_humaneval_form: str = "auto"    # humaneval as lm-eval's completion or instruct task; auto: by chat template
    # reference rows (instead of a federated method): base (no training), centralized (one client with the
    # pooled data, the largest rank, the same total steps), local-only (each client trains alone, nothing shared)
    reference: str | None = None
    # run
    seed: int = 0
    dtype: str = "auto"          # training dtype (auto: bfloat16 on CUDA, float32 on CPU)
    # what local training's matmuls run in over float32 storage: float32, or bfloat16 autocast with float32 masters,
    # factors and optimizer state; auto: bfloat16 on CPUs with avx512_bf16/amx_bf16 (bench/compute.py)
    compute_dtype: str = "float32"
    export_dtype: str = "auto"   # the global model's dtype on disk (auto: float32, which holds every round's update)
    device: str = "auto"
    engine: str = "inprocess"
    client_batching: str = "auto"  # on | off | auto (on with CUDA): a round's clients in one forward/backward
    output_dir: str | None = None
    results_dir: str = "results"
    save_client_adapters: bool = False   # each client's trained adapter (PEFT), its upload and what it received, every round (audit trail)
    keep_round_states: bool = False      # the server state after every round, not only the last checkpoint
    keep_global_model: bool = True       # false: <run>/global_model is deleted once the run is scored; a grid's cells
    #                                      then cost their checkpoint (MBs), not a model (0.5 GB for the default)

    # ---- derived -------------------------------------------------------------------------
    def client_ranks(self) -> list[int]:
        """Each client's LoRA rank: the explicit list, or a seeded draw from the distribution."""
        import numpy as np

        from .seeds import seed_stream

        if self.ranks:
            return list(self.ranks)
        if self.rank_distribution == "homo":
            return [self.rank] * self.num_clients
        rank_set = sorted(self.rank_set)
        n = len(rank_set)
        idx = np.arange(n, dtype=float)
        probs = {
            "uniform": np.ones(n),
            "heavy-tail-light": 0.5 ** idx,            # most clients small
            "heavy-tail-strong": 0.5 ** (n - 1 - idx),  # most clients large
            "normal": np.exp(-0.5 * ((idx - (n - 1) / 2) / max(n / 4, 0.5)) ** 2),
        }[self.rank_distribution]
        rng = seed_stream("client_ranks", self.seed)
        return [int(r) for r in rng.choice(rank_set, size=self.num_clients, p=probs / probs.sum())]

    def alpha_for(self, rank: int) -> float:
        """lora_alpha of a rank-`rank` client under the alpha policy."""
        return self.alpha_ratio * rank if self.alpha_policy == "proportional" else self.lora_alpha

    def scaling(self, rank: int) -> float:
        return self.alpha_for(rank) / (rank ** 0.5 if self.use_rslora else rank)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def config_hash(self) -> str:
        """Hash of what determines the experiment (not the seed, not where outputs go)."""
        d = self.to_dict()
        # engine: where the clients run, not what they compute (the Flower engines reproduce in-process runs)
        for k in ("seed", "output_dir", "results_dir", "save_client_adapters", "keep_round_states", "keep_global_model", "preset",
                  "engine", "client_batching"):
            d.pop(k, None)
        for k, default in HASH_NEUTRAL_DEFAULTS.items():  # at these values a field leaves the hash alone
            if d.get(k) == default:
                d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


# A config holding one of these fields at its value hashes as a config without the field, so records written
# without it (and `bench ablate`'s skip-what-is-done) match the same experiment.
HASH_NEUTRAL_DEFAULTS = {"eval_dtype": "auto", "eval_seed": 0, "client_test_fraction": 0.0, "reference": None, "alpha_policy": "shared", "alpha_ratio": 2.0, "method_options": {},
                         "export_dtype": "auto", "engine": "inprocess", "heldout_split": "test", "dp_epsilon": None,
                         "dp_delta": None, "dp_noise_multiplier": None, "dp_clip_norm": 1.0, "dp_accountant": "rdp",
                         "compute_dtype": "float32", "length_buckets": True,
                         "eval_allow_code_execution": False, "eval_humaneval_form": "auto",
                         "lr_tuning": None}

FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}


def _did_you_mean(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def resolve_dtype(name: str | None, use: str, *, cuda: bool, field: str = "dtype") -> str:
    """The dtype `name` (one of DTYPES; None is auto) stands for when used for `use` (a key of AUTO_DTYPES) on a
    CUDA GPU or on a CPU: the one place that decides what auto means."""
    name = name or "auto"
    if name not in DTYPES:
        raise BenchError(f"{field}: unknown {name!r}; choose one of {', '.join(DTYPES)}")
    return AUTO_DTYPES[use]["cuda" if cuda else "cpu"] if name == "auto" else name


def coerce_field(name: str, value: Any) -> Any:
    """Type-check one field (YAML and CLI values alike); error names the field and the expected type."""
    f = FIELDS[name]
    typ = str(f.type)
    if value is None:
        if "None" in typ:
            return None
        raise BenchError(f"{name}: must not be empty; give a value or drop the key")
    try:
        if typ.startswith("list[int]"):
            if isinstance(value, str):
                value = [v for v in value.replace(" ", "").split(",") if v]
            if not isinstance(value, (list, tuple)):
                raise TypeError
            out = []
            for v in value:
                if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
                    raise TypeError
                out.append(int(v))
            return out
        if typ.startswith("list[str]"):
            if isinstance(value, str):
                value = [v for v in value.replace(" ", "").split(",") if v]
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise TypeError
            return list(value)
        if typ.startswith("dict"):
            if isinstance(value, str):  # "instruction=question,output=answer"
                pairs = [p for p in value.split(",") if p]
                if any("=" not in p for p in pairs):
                    raise TypeError
                value = dict(p.split("=", 1) for p in pairs)
                if typ.startswith("dict[str, Any]"):  # typed values: "tau=0.9,split=official"
                    value = {k: yaml.safe_load(v) for k, v in value.items()}
            if not isinstance(value, dict):
                raise TypeError
            if typ.startswith("dict[str, Any]"):
                return {str(k): v for k, v in value.items()}
            return {str(k): str(v) for k, v in value.items()}
        if typ.startswith("bool"):
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            if not isinstance(value, bool):
                raise TypeError
            return value
        if typ.startswith("int"):
            if isinstance(value, bool):
                raise TypeError
            if isinstance(value, float) and not value.is_integer():
                raise TypeError
            return int(value)
        if typ.startswith("float"):
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if typ.startswith("str"):
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise TypeError
            return str(value)
    except (TypeError, ValueError):
        expected = typ.replace(" | None", "").replace("|None", "")
        raise BenchError(f"{name}: expected {expected}, got {value!r}; fix the value in the config or flag") from None
    return value


def load_yaml(path: str | os.PathLike, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"{what}: file {path} does not exist; pass an existing YAML file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise BenchError(f"{what}: {path} is not valid YAML{where}; fix the syntax") from None
    if not isinstance(data, dict):
        raise BenchError(f"{what}: {path} must hold a mapping of config keys, not a {type(data).__name__}")
    return data


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_preset(name: str) -> dict:
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise BenchError(f"preset: unknown preset {name!r}{_did_you_mean(name, preset_names())}; "
                         f"available: {', '.join(preset_names())}")
    data = load_yaml(path, "preset")
    if "include" in data:  # a variant of another preset: its values, then this one's
        data = {**load_preset(data.pop("include")), **data}
    return data


def build_config(preset: str | None = None, config_file: str | None = None,
                 overrides: dict[str, Any] | None = None) -> RunConfig:
    """Merge the layers and validate. `overrides` are the CLI flags the user actually gave."""
    overrides = dict(overrides or {})  # an explicit None unsets a preset value (ablate: ranks=None)
    layers: list[tuple[str, dict]] = []
    file_data = load_yaml(config_file, "config") if config_file else {}
    preset = overrides.get("preset") or file_data.get("preset") or preset
    preset_data = load_preset(preset) if preset else {}
    method = overrides.get("method") or file_data.get("method") or preset_data.get("method") or RunConfig.method
    from methods import METHODS  # the recipe belongs to the method

    if method not in METHODS:
        raise BenchError(f"method: unknown method {method!r}{_did_you_mean(method, METHODS)}; "
                         f"registered: {', '.join(sorted(METHODS))}")
    layers = [("recipe of " + method, dict(METHODS[method].recipe)), (f"preset {preset}", preset_data),
              (f"config {config_file}", file_data), ("flags", overrides)]
    values: dict[str, Any] = {}
    for where, layer in layers:
        for key, value in layer.items():
            key = key.replace("-", "_")
            if key not in FIELDS:
                raise BenchError(f"{key}: unknown config key in {where}{_did_you_mean(key, FIELDS)}; "
                                 "remove it or fix the spelling")
            values[key] = coerce_field(key, value)
        # How ranks are chosen is one decision per layer: a later layer that names a distribution drops an
        # earlier rank list (--rank-distribution homo over a preset's 16,8,4,4), one that gives a list is explicit
        named = {k.replace("-", "_") for k in layer}
        dist, ranks = values.get("rank_distribution"), values.get("ranks")
        if "rank_distribution" in named and dist != "explicit":
            if "ranks" in named and ranks:
                raise BenchError(f"ranks: {where} gives both a rank list and rank_distribution {dist!r}; "
                                 "keep one (a list means rank_distribution explicit)")
            values["ranks"] = None
        elif "ranks" in named and ranks:
            values["rank_distribution"] = "explicit"
    values["preset"] = preset
    values["method"] = method
    if "local_steps" in values and values["local_steps"] is not None and "local_epochs" not in overrides:
        values["local_epochs"] = None  # steps given: epochs off unless the flags asked for both
    if values.get("data_root") is None and os.environ.get("BENCH_DATA_ROOT"):
        values["data_root"] = os.environ["BENCH_DATA_ROOT"]
    cfg = RunConfig(**values)
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Checks that need no model and no data (those come in engine.preflight)."""
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise BenchError(msg)

    need(cfg.num_clients >= 1, f"num_clients: must be ≥ 1, got {cfg.num_clients}")
    need(0 < cfg.client_fraction <= 1, f"client_fraction: must be in (0, 1], got {cfg.client_fraction}")
    need(cfg.rounds >= 1, f"rounds: must be ≥ 1, got {cfg.rounds}")
    need(cfg.partition in PARTITIONS, f"partition: unknown partition {cfg.partition!r}"
         f"{_did_you_mean(cfg.partition, PARTITIONS)}; choose one of {', '.join(PARTITIONS)}")
    need(cfg.dirichlet_alpha > 0, f"dirichlet_alpha: must be > 0, got {cfg.dirichlet_alpha}; use e.g. 0.1 (skewed) to 100 (near iid)")
    need(cfg.shards_per_client >= 1, f"shards_per_client: must be ≥ 1, got {cfg.shards_per_client}")
    need(cfg.min_examples_per_client >= 1, f"min_examples_per_client: must be ≥ 1, got {cfg.min_examples_per_client}")
    need(cfg.max_examples_per_client is None or cfg.max_examples_per_client >= 1,
         f"max_examples_per_client: must be ≥ 1, got {cfg.max_examples_per_client}")
    need(cfg.local_steps is not None or cfg.local_epochs is not None,
         "local_steps: set local_steps or local_epochs")
    need(cfg.local_steps is None or cfg.local_steps >= 1, f"local_steps: must be ≥ 1, got {cfg.local_steps}")
    need(cfg.local_epochs is None or cfg.local_epochs > 0, f"local_epochs: must be > 0, got {cfg.local_epochs}")
    need(cfg.lr > 0, f"lr: must be > 0, got {cfg.lr}")
    need(cfg.batch_size >= 1, f"batch_size: must be ≥ 1, got {cfg.batch_size}")
    need(1 <= cfg.micro_batch_size <= cfg.batch_size and cfg.batch_size % cfg.micro_batch_size == 0,
         f"micro_batch_size: must divide batch_size ({cfg.batch_size}), got {cfg.micro_batch_size}")
    need(cfg.cutoff_len >= 8, f"cutoff_len: must be ≥ 8 tokens, got {cfg.cutoff_len}")
    need(cfg.prompt_template in PROMPT_TEMPLATES, f"prompt_template: unknown {cfg.prompt_template!r}; choose one of {', '.join(PROMPT_TEMPLATES)}")
    need(cfg.lora_alpha > 0, f"lora_alpha: must be > 0, got {cfg.lora_alpha}")
    need(0 <= cfg.lora_dropout < 1, f"lora_dropout: must be in [0, 1), got {cfg.lora_dropout}")
    need(bool(cfg.target_modules), "target_modules: must name at least one module, e.g. q_proj,v_proj")
    need(cfg.rank >= 1, f"rank: must be ≥ 1, got {cfg.rank}")
    need(cfg.rank_distribution in RANK_DISTRIBUTIONS, f"rank_distribution: unknown {cfg.rank_distribution!r}"
         f"{_did_you_mean(cfg.rank_distribution, RANK_DISTRIBUTIONS)}; choose one of {', '.join(RANK_DISTRIBUTIONS)}")
    need(bool(cfg.rank_set) and all(r >= 1 for r in cfg.rank_set), f"rank_set: ranks must be ≥ 1, got {cfg.rank_set}")
    if cfg.ranks is not None:
        need(len(cfg.ranks) == cfg.num_clients,
             f"ranks: {len(cfg.ranks)} ranks given for {cfg.num_clients} clients; give one rank per client or set num_clients={len(cfg.ranks)}")
        need(all(r >= 1 for r in cfg.ranks), f"ranks: every rank must be ≥ 1, got {cfg.ranks}")
    else:
        need(cfg.rank_distribution != "explicit", "ranks: rank_distribution 'explicit' needs a ranks list, e.g. --ranks 16,8,4,4")
    need(0 < cfg.test_fraction < 1, f"test_fraction: must be in (0, 1), got {cfg.test_fraction}")
    need(cfg.test_limit is None or cfg.test_limit >= 1, f"test_limit: must be ≥ 1, got {cfg.test_limit}")
    need(cfg.heldout_split in ("test", "validation"), f"heldout_split: must be test or validation, got {cfg.heldout_split!r}")
    need(0 <= cfg.client_test_fraction < 1, f"client_test_fraction: must be in [0, 1), got {cfg.client_test_fraction}")
    need(cfg.reference is None or cfg.reference in REFERENCES, f"reference: unknown {cfg.reference!r}"
         f"{_did_you_mean(str(cfg.reference), REFERENCES)}; choose one of {', '.join(REFERENCES)}")
    need(cfg.max_update_norm is None or cfg.max_update_norm > 0, f"max_update_norm: must be > 0, got {cfg.max_update_norm}")
    need(cfg.eval_limit is None or cfg.eval_limit >= 1, f"eval_limit: must be ≥ 1, got {cfg.eval_limit}")
    need(cfg.eval_dtype in DTYPES, f"eval_dtype: unknown {cfg.eval_dtype!r}; choose one of {', '.join(DTYPES)}")
    need(cfg.eval_humaneval_form in ("auto", "completion", "instruct"),
         f"eval_humaneval_form: unknown {cfg.eval_humaneval_form!r}; choose one of auto, completion, instruct")
    need(cfg.dtype in DTYPES, f"dtype: unknown {cfg.dtype!r}; choose one of {', '.join(DTYPES)}")
    need(cfg.compute_dtype in COMPUTE_DTYPES, f"compute_dtype: unknown {cfg.compute_dtype!r}; choose one of {', '.join(COMPUTE_DTYPES)}")
    need(cfg.compute_dtype != "bfloat16" or cfg.dtype in ("auto", "float32", "bfloat16"),
         f"compute_dtype: bfloat16 compute needs float32 or bfloat16 storage, got dtype {cfg.dtype}; set --dtype float32")
    need(cfg.export_dtype in DTYPES, f"export_dtype: unknown {cfg.export_dtype!r}; choose one of {', '.join(DTYPES)}")
    need(cfg.alpha_policy in ALPHA_POLICIES, f"alpha_policy: unknown {cfg.alpha_policy!r}; choose one of {', '.join(ALPHA_POLICIES)}")
    need(cfg.alpha_ratio > 0, f"alpha_ratio: must be > 0, got {cfg.alpha_ratio}")
    from .transports import transport_names  # the engines are the registered transports

    need(cfg.engine in transport_names(), f"engine: unknown {cfg.engine!r}; choose one of {', '.join(transport_names())}")
    need(cfg.client_batching in ("auto", "on", "off"),
         f"client_batching: unknown {cfg.client_batching!r}; choose auto, on or off")
    from methods import get_method

    try:
        m = get_method(cfg.method, cfg.method_options)
    except ValueError as exc:
        raise BenchError(str(exc)) from None
    from .privacy import validate as validate_privacy

    validate_privacy(cfg, m)
    need(cfg.device in ("auto", "cpu") or cfg.device.startswith("cuda"), f"device: unknown {cfg.device!r}; use auto, cpu or cuda[:N]")
    need(cfg.seed >= 0, f"seed: must be ≥ 0, got {cfg.seed}")
    need(cfg.eval_seed >= 0, f"eval_seed: must be ≥ 0, got {cfg.eval_seed}")


def save_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    from .io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
