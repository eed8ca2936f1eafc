"""One resolver says what a dtype of "auto" means (bench/config.py AUTO_DTYPES): training storage and scoring take
bfloat16 on a CUDA GPU and float32 on a CPU; the exported global model is float32 on both. The engine, the export
and every evaluation backend read it there."""
from __future__ import annotations

import pytest
import torch

from bench import BenchError
from bench.config import AUTO_DTYPES, DTYPES, resolve_dtype


@pytest.mark.parametrize("use,cuda,want", [("training", True, "bfloat16"), ("training", False, "float32"),
                                           ("export", True, "float32"), ("export", False, "float32"),
                                           ("eval", True, "bfloat16"), ("eval", False, "float32")])
def test_auto_per_use_and_device(use, cuda, want):
    assert resolve_dtype("auto", use, cuda=cuda) == want
    assert resolve_dtype(None, use, cuda=cuda) == want


def test_a_named_dtype_is_itself_and_an_unknown_one_is_refused():
    for use in AUTO_DTYPES:
        for name in DTYPES[1:]:
            assert resolve_dtype(name, use, cuda=True) == resolve_dtype(name, use, cuda=False) == name
    with pytest.raises(BenchError, match=r"^export_dtype: unknown 'fp8'; choose one of auto, float32"):
        resolve_dtype("fp8", "export", cuda=False, field="export_dtype")


def test_the_engine_the_export_and_the_backends_use_it(monkeypatch):
    from bench.engine import resolve_dtype as training_dtype
    from bench.export import export_dtype
    from evaluators.backends import get_backend
    from evaluators.core import cuda_here

    assert training_dtype("auto", torch.device("cpu")) == torch.float32
    assert training_dtype("auto", torch.device("cuda")) == torch.bfloat16   # a device object; no GPU needed
    assert training_dtype("float16", torch.device("cpu")) == torch.float16
    assert export_dtype("auto") == torch.float32 and export_dtype("bfloat16") == torch.bfloat16
    want = "bfloat16" if cuda_here() else "float32"
    monkeypatch.delenv("FEDLORA_VLLM_DTYPE", raising=False)
    assert get_backend("hf").resolve_dtype("auto") == get_backend("vllm").resolve_dtype(None) == want
    monkeypatch.setenv("FEDLORA_VLLM_DTYPE", "bfloat16")   # vLLM-CPU's bfloat16 is chosen this way
    assert get_backend("vllm").resolve_dtype("auto") == "bfloat16"
    assert get_backend("vllm").resolve_dtype("float32") == "float32" and get_backend("hf").resolve_dtype("auto") == want
    with pytest.raises(BenchError, match=r"^dtype: unknown 'fp8'"):
        get_backend("vllm").resolve_dtype("fp8")
