"""Real PEFT LoRA adapters on the default model for the adapter and server tests, saved with peft itself, plus the
merged model each one equals (the reference the unmerged scores must agree with)."""
from __future__ import annotations

from pathlib import Path

# (rank, target modules): two shapes of adapter, so one engine serves different ranks and module sets
SHAPES = {"client_0": (8, ["q_proj", "v_proj"]), "client_1": (4, ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"])}
B_SCALE = 0.3  # peft's random B (init_lora_weights=False) scaled so the model changes but still answers sensibly


def make_adapters(model_path: str, out: Path, merged: tuple[str, ...] = ("client_0",)) -> dict[str, str]:
    """{name: adapter folder} for SHAPES, and {name + "_merged": HF folder} for the names in `merged`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    paths = {}
    for seed, (name, (rank, targets)) in enumerate(SHAPES.items()):
        base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        torch.manual_seed(seed)
        model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=16, target_modules=targets,
                                                init_lora_weights=False))
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "lora_B" in pname:
                    p.mul_(B_SCALE)
        paths[name] = str(out / name)
        model.save_pretrained(paths[name])
        if name in merged:
            paths[f"{name}_merged"] = str(out / f"{name}_merged")
            model.merge_and_unload().save_pretrained(paths[f"{name}_merged"])
            AutoTokenizer.from_pretrained(model_path).save_pretrained(paths[f"{name}_merged"])
    return paths
