"""The global model on disk, from the server's full-precision deltas alone (no client model involved).

global model = base + Σ_rounds merges + the global adapter's B @ A, formed in float64 and added to the
base weights in float32, then cast to the export dtype. float32 is the default whatever the training
dtype: a bfloat16 weight has 8 bits of mantissa, and a round's update on a small model is often below
its rounding step (tests/test_precision.py). A bfloat16 export halves the size and rounds the update.

Methods whose global state is an adapter over the unchanged base also get `global_adapter/`, a PEFT
LoRA folder (scaling folded into B, lora_alpha = r so peft's scaling is 1) that
`PeftModel.from_pretrained(base, folder)` and vLLM's LoRA loading take as is.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from methods import Factors

from .io import atomic_replace_dir


def export_dtype(requested: str) -> torch.dtype:
    """The global model's torch dtype on disk (config.resolve_dtype says what auto means)."""
    from .config import resolve_dtype

    return getattr(torch, resolve_dtype(requested, "export", cuda=False, field="export_dtype"))


def export_global_model(model_path: str, delta: dict[str, torch.Tensor], dtype: torch.dtype, out: Path, events=None):
    """Write base + delta (module name -> float64 d_out × d_in) to `out` atomically; return the model.
    events (bench/observers.py): told point "final-save" once the model is in its temporary folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    with torch.no_grad():
        for name, d in delta.items():
            w = model.get_submodule(name).weight
            w.copy_((w.double() + d.to(w.device)).float())
    model = model.to(dtype)
    model.config.use_cache = True
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(model_path).save_pretrained(tmp)
    if events is not None:
        events.point("final-save")
    atomic_replace_dir(tmp, out)
    return model


def run_config(run_dir: Path) -> dict:
    """A run folder's config.yaml as written by the run."""
    import yaml

    from . import BenchError

    cfg_file = Path(run_dir) / "config.yaml"
    if not cfg_file.is_file():
        raise BenchError(f"run: {cfg_file} does not exist; pass a run folder written by `bench run`")
    cfg = yaml.safe_load(cfg_file.read_text()) or {}
    if not cfg.get("model"):
        raise BenchError(f"run: {cfg_file} names no model")
    return cfg


def run_base_model(run_dir: Path) -> str:
    """The local folder of a run's base model."""
    from .models import resolve_model

    return resolve_model(run_config(run_dir)["model"])[0]


def global_model_dir(run_dir: Path) -> Path:
    """<run>/global_model, written again from the run's last checkpoint if the run dropped it (keep_global_model:
    false): the same float64 delta, base and cast as the run's own export, so the same tensors (tests/test_engine.py)."""
    from . import BenchError
    from .checkpoint import checkpoint_dir, read_state
    from .server import global_delta

    run_dir = Path(run_dir)
    out = run_dir / "global_model"
    if (out / "config.json").is_file():
        return out
    ck = checkpoint_dir(run_dir)
    if not (run_dir / "run.json").is_file() or ck is None or not (run_dir / "config.yaml").is_file():
        raise BenchError(f"run: {out} is missing and {run_dir} holds no finished run to write it from "
                         "(run.json, config.yaml and checkpoint/); did the run finish?")
    state, _, _ = read_state(ck)
    dtype = export_dtype(run_config(run_dir).get("export_dtype", "auto"))
    export_global_model(run_base_model(run_dir), global_delta(state), dtype, out)
    return out


def export_global_adapter(adapter: Factors, target_modules: list[str], base_model: str, out: Path) -> bool:
    """A PEFT folder for an effective adapter (global = base + B @ A); False when there is none to write."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    pairs = {n: p for n, p in adapter.items() if p[0] is not None and p[1] is not None}
    if not pairs:
        return False
    rank = max(a.shape[0] for a, _ in pairs.values())
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=list(target_modules), task_type="CAUSAL_LM",
               base_model_name_or_path=base_model).save_pretrained(tmp)
    tensors = {}
    for name, (a, b) in pairs.items():
        a_p = torch.zeros(rank, a.shape[1], dtype=torch.float32)
        b_p = torch.zeros(b.shape[0], rank, dtype=torch.float32)
        a_p[: a.shape[0]], b_p[:, : b.shape[1]] = a, b
        tensors[f"base_model.model.{name}.lora_A.weight"] = a_p
        tensors[f"base_model.model.{name}.lora_B.weight"] = b_p
    save_file(tensors, str(tmp / "adapter_model.safetensors"))
    atomic_replace_dir(tmp, out)
    return True


def save_peft_adapter(factors: Factors, rank: int, alpha: float, use_rslora: bool, target_modules: list[str],
                      base_model: str, out: Path) -> None:
    """A client's adapter as trained (scaling not folded in) in PEFT format, atomically."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(target_modules), use_rslora=use_rslora,
               task_type="CAUSAL_LM", base_model_name_or_path=base_model).save_pretrained(tmp)
    tensors = {}
    for name, (a, b) in factors.items():
        if a is not None:
            tensors[f"base_model.model.{name}.lora_A.weight"] = a.contiguous()
        if b is not None:
            tensors[f"base_model.model.{name}.lora_B.weight"] = b.contiguous()
    save_file(tensors, str(tmp / "adapter_model.safetensors"))
    atomic_replace_dir(tmp, out)
