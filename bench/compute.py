"""The compute dtype: what local training's forward and backward run in, distinct from the storage dtype.

`compute_dtype: bfloat16` over float32 storage is mixed precision: the matmuls of the forward and backward run
in bfloat16 (torch.autocast), while the base weights (the float32 masters that receive merges), the LoRA factors,
their gradients and AdamW's state stay float32. On a CPU with AVX512-BF16 or AMX a bfloat16 matmul on the
model's shapes is several times a float32 one; elsewhere bfloat16 runs emulated and slower, so `auto` picks it
only where /proc/cpuinfo lists avx512_bf16 or amx_bf16 (on CUDA, `auto` follows the storage dtype).

Three things keep mixed precision both exact to its definition and fast (docs/precision.md):
- the frozen base Linear weights get bfloat16 views, made once and re-made only for a weight that changed (a
  merge bumps its version counter). autocast would round the same float32 weight to the same bfloat16 value on
  every forward; the view skips that copy of the whole model per micro-batch;
- attention runs in float32 (q, k, v up-cast): the CPU's bfloat16 attention backward is ~3x slower than float32;
- the output layer (tied to the input embeddings) is left to the caller, which runs it in float32 on the few
  labelled positions (bench/client.py token_loss).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from . import BenchError
from .config import COMPUTE_DTYPES, resolve_dtype as config_dtype
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
FLOAT32_ATTENTION = "sdpa_float32"   # the attention implementations registered below
FLOAT32_GQA_ATTENTION = "sdpa_float32_gqa"
# what MixedPrecision runs (its default), as the record's compute_reason states it
MIXED_PATH = ("bfloat16 autocast over float32 masters; cached bfloat16 frozen weights; "
              "float32 grouped-query attention, fused RMSNorms and uint8 dropout masks")
# RMSNorm classes whose forward is exactly weight * (x * rsqrt(mean(x²) + eps)) in float32 for float32 inputs
FUSED_RMS_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm"}
FLOAT_DROPOUT = (torch.float32, torch.float64, torch.bfloat16)  # where _MaskedDropout matches torch's CPU dropout


def cpu_bf16_flags(cpuinfo: str = "/proc/cpuinfo") -> list[str]:
    """The CPU flags that make bfloat16 matmuls fast here (empty: none, or no /proc/cpuinfo)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return []
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return [f for f in CPU_BF16_FLAGS if f in flags]


def resolve_device(cfg) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise BenchError(f"device: {cfg.device} requested but no CUDA GPU is available; use --device cpu")
    return torch.device(cfg.device)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The training weights' torch dtype on this device (config.resolve_dtype says what auto means)."""
    return getattr(torch, config_dtype(name, "training", cuda=device.type == "cuda"))


def resolve_compute_dtype(name: str, storage: torch.dtype, device: torch.device,
                          cpuinfo: str = "/proc/cpuinfo") -> tuple[torch.dtype, str]:
    """(compute dtype, why) for a requested compute dtype over the storage dtype on a device."""
    if name not in COMPUTE_DTYPES:
        raise BenchError(f"compute_dtype: unknown {name!r}; choose one of {', '.join(COMPUTE_DTYPES)}")
    if storage != torch.float32:
        if name == "bfloat16" and storage != torch.bfloat16:
            raise BenchError(f"compute_dtype: bfloat16 compute needs float32 or bfloat16 storage, got dtype "
                             f"{str(storage)[6:]}; set --dtype float32")
        return storage, f"storage dtype {str(storage)[6:]}: compute in the storage dtype"
    if name == "float32":
        return torch.float32, "requested"
    if name == "bfloat16":
        return torch.bfloat16, f"requested ({MIXED_PATH})"
    if device.type != "cpu":
        return torch.float32, f"auto on {device.type}: compute in the storage dtype (float32)"
    flags = cpu_bf16_flags(cpuinfo)
    if flags:
        return torch.bfloat16, f"auto: this CPU has {', '.join(flags)} ({MIXED_PATH})"
    return torch.float32, "auto: this CPU has neither avx512_bf16 nor amx_bf16, so bfloat16 would be slower; float32"


def _register_float32_attention() -> bool:
    """Register FLOAT32_ATTENTION and FLOAT32_GQA_ATTENTION with transformers: sdpa with q, k, v in float32, the
    second reading grouped-query key/value heads in place (False: not supported here)."""
    try:
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        return False

    def attention(module, query, key, value, attention_mask, **kwargs):
        with torch.autocast(query.device.type, enabled=False):  # autocast would cast sdpa's inputs back down
            out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(),
                                                  attention_mask, **kwargs)
        return out.to(query.dtype), weights

    def grouped_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                          **kwargs):
        if kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None or query.shape[2] == 1:
            return attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                             is_causal=is_causal, **kwargs)
        # transformers copies the shared key/value heads (repeat_kv) whenever there is a mask; sdpa's enable_gqa
        # reads them in place: 1.5x faster fwd + bwd on SmolLM2's shapes
        causal = (attention_mask is None and query.shape[2] > 1
                  and (is_causal if is_causal is not None else getattr(module, "is_causal", True)))
        with torch.autocast(query.device.type, enabled=False):
            out = torch.nn.functional.scaled_dot_product_attention(
                query.float(), key.float(), value.float(), attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
                is_causal=causal, enable_gqa=key.shape[1] != query.shape[1])
        return out.transpose(1, 2).contiguous().to(query.dtype), None

    for name, fn in ((FLOAT32_ATTENTION, attention), (FLOAT32_GQA_ATTENTION, grouped_attention)):
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, sdpa_mask)
    return True


def _fused_rms_norm(norm):
    """A forward for `norm` through torch's fused rms_norm (one kernel each way instead of six elementwise ops;
    the same float32 arithmetic), or its own forward where the inputs are not float32."""
    own = type(norm).forward.__get__(norm)

    def forward(hidden):
        w = norm.weight
        if hidden.dtype != torch.float32 or w.dtype != torch.float32:
            return own(hidden)
        with torch.autocast(hidden.device.type, enabled=False):
            return torch.nn.functional.rms_norm(hidden, w.shape, w, norm.variance_epsilon)
    return forward


class _MaskedDropout(torch.autograd.Function):
    """Dropout with its keep-mask drawn as uint8: the same draws as torch's CPU dropout (bernoulli_ draws one value
    per element from the generator whatever the tensor's dtype, so a seed gives the same mask) and the same products
    (x · 1 · (1 / (1 − p)) = x · (1 / (1 − p)), the factor computed as torch computes it, in x's dtype), forward and
    backward. What it saves: the float32 mask (4 bytes an element, drawn, divided and kept for the backward) becomes
    one byte; on the v2 preset LoRA dropout's Bernoulli draws were ≈ 4% of a bfloat16 step."""

    @staticmethod
    def forward(ctx, x, p):
        keep = torch.empty(x.shape, dtype=torch.uint8, device=x.device).bernoulli_(1 - p)
        scale = torch.ones((), dtype=x.dtype, device=x.device).div_(1 - p)
        ctx.save_for_backward(keep, scale)
        return torch.mul(x, keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        keep, scale = ctx.saved_tensors
        return torch.mul(grad, keep).mul_(scale), None


def _uint8_mask_dropout(dropout):
    """A forward for a torch.nn.Dropout that draws its mask as uint8 (_MaskedDropout), or its own forward where
    torch's is not `x · mask / (1 − p)` with a float mask: evaluation, p of 0 or 1, in-place, or a non-float input."""
    own = type(dropout).forward.__get__(dropout)

    def forward(x):
        if (not dropout.training or dropout.inplace or not 0 < dropout.p < 1 or x.dtype not in FLOAT_DROPOUT
                or x.device.type != "cpu"):
            return own(x)
        return _MaskedDropout.apply(x, dropout.p)
    return forward


class MixedPrecision:
    """bfloat16 autocast for a model's training calls, with cached bfloat16 views of its frozen Linear weights.

    Build it once per model, after peft has frozen the base (the LoRA factors are never viewed). Inside
    `views()` the bfloat16 views stand in for the float32 weights, which come back when it exits: there the
    model's forward runs only under `autocast()` (the backward after it, outside), and nothing writes the base.
    """

    def __init__(self, model, dtype: torch.dtype = torch.bfloat16, fused_kernels: bool = True):
        self.dtype = dtype
        self.fused_kernels = fused_kernels  # kernels(): off only to measure what they save (bench perf)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.config = base.config
        # the embeddings are a lookup (no autocast) and the output layer runs in float32 (token_loss)
        tied = {id(m.weight) for m in (base.get_input_embeddings(), base.get_output_embeddings()) if m is not None}
        self.modules = [m for name, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear) and "lora_" not in name
                        and not m.weight.requires_grad and id(m.weight) not in tied]
        self._views: dict[int, tuple[tuple, torch.Tensor]] = {}  # id(module) -> (the master's stamp, its view)
        self.float32_attention = (getattr(self.config, "_attn_implementation", None) == "sdpa"
                                  and _register_float32_attention())
        self.norms = [m for m in model.modules() if type(m).__name__ in FUSED_RMS_NORMS]
        self.dropouts = [m for name, m in model.named_modules()
                         if type(m) is torch.nn.Dropout and "lora_dropout" in name]  # peft's, one per adapted layer

    def _view(self, module) -> torch.Tensor:
        """The weight's bfloat16 view, re-made when the weight was written (a merge bumps its version) or moved."""
        w = module.weight
        stamp = (w._version, w.data_ptr(), w.device)
        seen, view = self._views.get(id(module), (None, None))
        if seen != stamp:
            view = w.detach().to(self.dtype)
            self._views[id(module)] = (stamp, view)
        return view

    def autocast(self, device_type: str):
        return torch.autocast(device_type, dtype=self.dtype)

    @contextlib.contextmanager
    def views(self):
        """The bfloat16 weight views in place of the masters, float32 attention, and `kernels()`."""
        masters = [m.weight.data for m in self.modules]
        attn = self.config._attn_implementation
        try:
            for m in self.modules:
                m.weight.data = self._view(m)
            if self.float32_attention:
                self.config._attn_implementation = FLOAT32_ATTENTION
            with self.kernels():
                yield
        finally:
            for m, w in zip(self.modules, masters):
                m.weight.data = w
            self.config._attn_implementation = attn

    @contextlib.contextmanager
    def kernels(self):
        """Float32 attention with grouped-query heads read in place, fused RMSNorms, and LoRA dropout with uint8 masks:
        the model's own arithmetic in float32 (per-example losses and gradients equal to float tolerance; the dropout
        bit for bit; tests/test_compute.py), fewer ops and bytes."""
        if not self.fused_kernels:
            yield
            return
        attn = self.config._attn_implementation
        try:
            if self.float32_attention:
                self.config._attn_implementation = FLOAT32_GQA_ATTENTION
            for m in self.norms:
                m.forward = _fused_rms_norm(m)
            for m in self.dropouts:
                m.forward = _uint8_mask_dropout(m)
            yield
        finally:
            self.config._attn_implementation = attn
            for m in self.norms + self.dropouts:
                m.__dict__.pop("forward", None)

    def note(self) -> str:
        return (f"{len(self.modules)} frozen Linear weights as cached {str(self.dtype)[6:]} views; attention in "
                f"{'float32' if self.float32_attention else str(self.dtype)[6:]}"
                f"{' (grouped-query heads without copies)' if self.float32_attention and self.fused_kernels else ''}; "
                f"{len(self.norms) if self.fused_kernels else 0} RMSNorms fused; "
                f"{len(self.dropouts) if self.fused_kernels else 0} LoRA dropouts with uint8 masks; output layer float32")
