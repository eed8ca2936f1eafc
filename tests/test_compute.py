"""Local training's speed paths: bfloat16 mixed precision over float32 masters, and length-bucketed
micro-batches. Bucketing must leave the objective alone (the same labelled tokens, the same normalisation, so the
same gradient); mixed precision must keep the masters, factors and optimizer in float32 and stay close to float32."""
import contextlib
import dataclasses
import itertools

import pytest
import torch

from bench import BenchError
from bench.client import ClientRuntime, ModelSpec, accumulate_step, local_train, token_loss
from bench.compute import MixedPrecision, _uint8_mask_dropout, cpu_bf16_flags, resolve_compute_dtype
from bench.config import build_config
from bench.data import collate, length_buckets
from bench.models import resolve_model

CPU = torch.device("cpu")


def _padded_cost(groups, lengths, overhead):
    return sum(len(g) * max(lengths[i] for i in g) + overhead for g in groups)


def _set_partitions(items):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _set_partitions(rest):
        for i in range(len(part)):
            yield part[:i] + [[first] + part[i]] + part[i + 1:]
        yield [[first]] + part


@pytest.mark.parametrize("seed", range(6))
def test_length_buckets_is_the_cheapest_grouping_of_all(seed):
    """Exhaustive over every set partition (not only runs of the sorted order): nothing computes less padding."""
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 7, (1,), generator=g))
    max_size = int(torch.randint(1, n + 1, (1,), generator=g))
    lengths = torch.randint(5, 120, (n,), generator=g).tolist()
    groups = length_buckets(lengths, max_size, overhead=16)
    assert sorted(i for grp in groups for i in grp) == list(range(n))
    assert all(1 <= len(grp) <= max_size and grp == sorted(grp) for grp in groups)
    best = min(_padded_cost(p, lengths, 16) for p in _set_partitions(list(range(n))) if all(len(q) <= max_size for q in p))
    assert _padded_cost(groups, lengths, 16) == best


def test_length_buckets_keeps_a_step_whose_best_grouping_is_one_micro_batch():
    assert length_buckets([96, 95, 96, 94], 4) == [[0, 1, 2, 3]]
    assert length_buckets([96, 30, 96, 96], 4) == [[0, 2, 3], [1]]


@pytest.fixture(scope="module")
def tiny_lora():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(resolve_model("tiny-random-llama")[0], dtype=torch.float64)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM"))
    for name, p in model.named_parameters():  # non-zero B: gradients reach A too
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


def _examples(n, seed, vocab=1000):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(6, 40, (1,), generator=g))
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        prompt = int(torch.randint(1, length - 1, (1,), generator=g))
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def test_bucketed_per_example_losses_equal_the_unpadded_computation(tiny_lora):
    """Each example's summed token loss and labelled count in its padded, bucketed micro-batch equal the example
    computed alone without padding (a float64 model; the cross-entropy runs on float32 logits)."""
    tiny_lora.eval()
    batch = _examples(7, seed=1)
    for group in length_buckets([len(e["input_ids"]) for e in batch], 4, overhead=0):
        sums, counts = token_loss(tiny_lora, collate([batch[i] for i in group], 0), CPU, per_example=True)
        for i, s, c in zip(group, sums, counts):
            alone, n_alone = token_loss(tiny_lora, collate([batch[i]], 0), CPU, per_example=True)
            assert int(c) == int(n_alone[0]) == sum(t != -100 for t in batch[i]["labels"][1:])
            assert torch.allclose(s, alone[0], rtol=1e-6, atol=1e-9)


def test_a_bucketed_step_has_the_padded_steps_gradient(tiny_lora):
    """Same step, same examples: the gradient with length buckets equals today's draw-order padded micro-batches."""
    tiny_lora.train()
    cfg = build_config(preset="tiny", overrides={"batch_size": 6, "micro_batch_size": 3})
    batch = _examples(6, seed=2)
    params = [p for p in tiny_lora.parameters() if p.requires_grad]
    grads, sums = {}, {}
    for buckets in (False, True):
        for p in params:
            p.grad = None
        loss, n_tok, _ = accumulate_step(tiny_lora, batch, dataclasses.replace(cfg, length_buckets=buckets), CPU, 0)
        grads[buckets], sums[buckets] = [p.grad.clone() for p in params], (loss, n_tok)
    assert sums[True][1] == sums[False][1]
    # token_loss takes the logits to float32 (the cross-entropy's dtype): float32 tolerance, not float64's
    assert sums[True][0] == pytest.approx(sums[False][0], rel=1e-6)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-9) for a, b in zip(grads[True], grads[False]))
    assert any(float(g.abs().max()) > 0 for g in grads[True])


def test_resolve_compute_dtype(tmp_path):
    amx, plain = tmp_path / "amx", tmp_path / "plain"
    amx.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_tile amx_bf16\n")
    plain.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f\n")
    assert cpu_bf16_flags(str(amx)) == ["avx512_bf16", "amx_bf16"] and cpu_bf16_flags(str(plain)) == []
    f32, bf16 = torch.float32, torch.bfloat16
    assert resolve_compute_dtype("auto", f32, CPU, str(amx))[0] == bf16
    dt, why = resolve_compute_dtype("auto", f32, CPU, str(plain))
    assert dt == f32 and "neither avx512_bf16 nor amx_bf16" in why
    assert resolve_compute_dtype("float32", f32, CPU, str(amx))[0] == f32
    assert resolve_compute_dtype("bfloat16", f32, CPU, str(plain))[0] == bf16   # asked for: honoured anywhere
    assert resolve_compute_dtype("auto", f32, torch.device("cuda"), str(amx))[0] == f32
    assert resolve_compute_dtype("float32", bf16, CPU, str(amx))[0] == bf16     # bf16 storage computes in bf16
    with pytest.raises(BenchError, match="compute_dtype"):
        resolve_compute_dtype("bfloat16", torch.float16, CPU)


def test_bad_compute_dtype_is_refused_before_work():
    with pytest.raises(BenchError, match=r"^compute_dtype: unknown 'fp8'"):
        build_config(preset="tiny", overrides={"compute_dtype": "fp8"})
    with pytest.raises(BenchError, match=r"^compute_dtype: bfloat16 compute needs float32"):
        build_config(preset="tiny", overrides={"compute_dtype": "bfloat16", "dtype": "float16"})


@pytest.fixture(scope="module")
def runtime(shared_data):
    cfg = build_config(preset="tiny", overrides={"data_root": str(shared_data), "compute_dtype": "bfloat16",
                                                 "lora_dropout": 0.0})
    path = resolve_model("tiny-random-llama")[0]
    examples = {0: _examples(8, seed=3, vocab=256)}
    return ClientRuntime(cfg, ModelSpec(path, CPU, torch.float32), [4], examples)


def test_mixed_precision_trains_float32_factors_and_leaves_the_masters(runtime):
    rt = runtime
    assert rt.compute_dtype == torch.bfloat16 and rt.precision is not None
    masters = {n: p.detach().clone() for n, p in rt.model.named_parameters() if not p.requires_grad}
    seen = {}

    def spy(step):  # inside training: the frozen projections are bf16 views, the factors float32
        layer = next(iter(rt.layers.values()))
        seen["base"], seen["A"] = layer.base_layer.weight.dtype, layer.lora_A["r4"].weight.dtype

    rt._load("r4", 4, None, init_seed=0)
    params = [p for l in rt.layers.values() for p in (l.lora_A["r4"].weight, l.lora_B["r4"].weight)]
    stats = local_train(rt.model, rt.examples[0], rt.cfg, 0, CPU, 0, params, on_step=spy, precision=rt.precision)
    assert seen == {"base": torch.bfloat16, "A": torch.float32}
    assert all(p.dtype == torch.float32 for p in params) and torch.isfinite(torch.tensor(stats["loss"]))
    after = dict(rt.model.named_parameters())
    assert all(after[n].dtype == torch.float32 and torch.equal(after[n], m) for n, m in masters.items())


def test_mixed_precision_gradient_is_close_to_float32(runtime):
    rt = runtime
    rt._load("r4", 4, None, init_seed=0)
    for l in rt.layers.values():
        torch.nn.init.normal_(l.lora_B["r4"].weight, std=0.05)
    params = [p for l in rt.layers.values() for p in (l.lora_A["r4"].weight, l.lora_B["r4"].weight)]
    batch = rt.examples[0][:4]
    grads = {}
    for mixed in (False, True):
        for p in params:
            p.grad = None
        if mixed:
            with rt.precision.views():
                accumulate_step(rt.model, batch, rt.cfg, CPU, 0, lambda: rt.precision.autocast("cpu"))
        else:
            accumulate_step(rt.model, batch, rt.cfg, CPU, 0)
        grads[mixed] = torch.cat([p.grad.flatten() for p in params])
    assert grads[True].dtype == torch.float32
    rel = float((grads[True] - grads[False]).norm() / grads[False].norm())
    assert 0 < rel < 0.05, rel   # bf16 rounding, not another objective


def test_mixed_precision_kernels_are_the_models_float32_arithmetic(runtime, monkeypatch):
    """Float32 attention over grouped-query heads without copies and fused RMSNorms: per-example losses and the
    LoRA gradients equal the model's own float32 computation (padded batches, so the attention mask is used)."""
    rt = runtime
    base = rt.model.get_base_model()
    assert base.config.num_key_value_heads < base.config.num_attention_heads and rt.precision.norms
    rt._load("r4", 4, None, init_seed=0)
    for l in rt.layers.values():
        torch.nn.init.normal_(l.lora_B["r4"].weight, std=0.05)
    params = [p for l in rt.layers.values() for p in (l.lora_A["r4"].weight, l.lora_B["r4"].weight)]
    batch = collate(rt.examples[0][:4], 0)
    used = {"rms_norm": 0, "enable_gqa": 0}
    rms_norm, sdpa = torch.nn.functional.rms_norm, torch.nn.functional.scaled_dot_product_attention

    def spy_rms_norm(*a, **k):
        used["rms_norm"] += 1
        return rms_norm(*a, **k)

    def spy_sdpa(*a, **k):
        used["enable_gqa"] += bool(k.get("enable_gqa"))
        return sdpa(*a, **k)

    monkeypatch.setattr(torch.nn.functional, "rms_norm", spy_rms_norm)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy_sdpa)
    out = {}
    for fused in (False, True):
        for p in params:
            p.grad = None
        with rt.precision.kernels() if fused else contextlib.nullcontext():
            sums, counts = token_loss(rt.model, batch, CPU, per_example=True)
        sums.sum().backward()
        out[fused] = sums.detach(), torch.cat([p.grad.flatten() for p in params])
    layers = base.config.num_hidden_layers
    assert used == {"rms_norm": 2 * layers + 1, "enable_gqa": layers}   # every norm and attention, in the fused pass
    assert base.config._attn_implementation == "sdpa"
    assert not any("forward" in m.__dict__ for m in rt.precision.norms)
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[True][1], out[False][1], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_uint8_mask_dropout_is_torchs_dropout_bit_for_bit(dtype):
    """The same seed draws the same mask, the forward and the backward are the same numbers to the bit, and the
    generator ends in the same state (later draws of the step are unchanged); evaluation and p = 0 or 1 are torch's."""
    g = torch.Generator().manual_seed(7)
    for p in (0.05, 0.1, 0.5, 0.9):
        shape = tuple(int(x) for x in torch.randint(1, 70, (3,), generator=g))
        x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(dtype)
        x[0, 0, 0] = -0.0
        up = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
        out = {}
        for ours in (False, True):
            drop = torch.nn.Dropout(p)
            fwd = _uint8_mask_dropout(drop) if ours else drop
            xi = x.clone().requires_grad_(True)
            torch.manual_seed(11)
            y = fwd(xi)
            (y * up).sum().backward()
            out[ours] = y.detach(), xi.grad, torch.get_rng_state()
        for a, b in zip(out[False], out[True]):
            assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8)), (dtype, p)
        assert 0 < int((out[True][0] == 0).sum()) < x.numel() or p < 0.1
    x = torch.randn(4, 5, dtype=dtype)
    for p, training in ((0.1, False), (0.0, True), (1.0, True)):
        drop = torch.nn.Dropout(p).train(training)
        torch.manual_seed(3)
        ref = drop(x)
        torch.manual_seed(3)
        assert torch.equal(_uint8_mask_dropout(drop)(x), ref)


def test_kernels_swap_lora_dropout_and_put_it_back():
    """kernels() runs every peft LoRA dropout through the uint8 mask and restores torch's on exit: a bfloat16-free
    float32 loss and its LoRA gradients come out bit for bit the same (the masks are the same draws)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(resolve_model("tiny-random-llama")[0], dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    precision = MixedPrecision(model)
    layers = base.config.num_hidden_layers
    assert len(precision.dropouts) == 2 * layers
    params = [p for p in model.parameters() if p.requires_grad]
    batch = collate(_examples(3, seed=5, vocab=256), 0)
    model.train()
    out, calls = {}, []

    def counted(d):
        fwd = _uint8_mask_dropout(d)
        return lambda x: calls.append(1) or fwd(x)

    for ours in (False, True):
        for p in params:
            p.grad = None
        torch.manual_seed(5)
        with contextlib.ExitStack() as stack:
            if ours:   # only the dropouts: the rest of kernels() is float tolerance, not bits
                for d in precision.dropouts:
                    d.forward = counted(d)
                stack.callback(lambda: [d.__dict__.pop("forward") for d in precision.dropouts])
            loss, _ = token_loss(model, batch, CPU)
            loss.backward()
        out[ours] = loss.detach(), torch.cat([p.grad.flatten() for p in params])
    assert len(calls) == 2 * layers
    assert torch.equal(out[True][0], out[False][0]) and torch.equal(out[True][1], out[False][1])
    assert float(out[True][1].abs().sum()) > 0
    with precision.kernels():
        assert all("forward" in d.__dict__ for d in precision.dropouts)
    assert not any("forward" in d.__dict__ for d in precision.dropouts)


def test_views_follow_a_merge(runtime):
    """A merge writes the float32 master; the next training call sees its bf16 rounding, not a stale view."""
    rt = runtime
    name, layer = next(iter(rt.layers.items()))
    w = layer.base_layer.weight
    with rt.precision.views():
        before = layer.base_layer.weight.clone()
        ptr = layer.base_layer.weight.data_ptr()
    with rt.precision.views():  # nothing written: the same view, not a new copy
        assert layer.base_layer.weight.data_ptr() == ptr
    assert layer.base_layer.weight.dtype == torch.float32
    a, b = torch.randn(2, w.shape[1]) * 0.1, torch.randn(w.shape[0], 2) * 0.1
    rt.apply_merges({rt.base_round + 1: {name: (a, b)}})
    with rt.precision.views():
        now = layer.base_layer.weight.clone()
    assert torch.equal(now, w.detach().to(torch.bfloat16)) and not torch.equal(now, before)


def test_a_mixed_precision_run_records_its_compute_dtype(tmp_path, shared_data):
    from bench.engine import run_federated

    recs = {}
    for compute in ("float32", "bfloat16"):
        cfg = build_config(preset="tiny", overrides={"method": "fedit", "data_root": str(shared_data), "compute_dtype": compute,
                                                     "output_dir": str(tmp_path / compute), "results_dir": str(tmp_path / "r")})
        recs[compute] = run_federated(cfg, log=lambda *a: None)
    d = recs["bfloat16"]["dtypes"]
    assert (d["training"], d["compute"], d["master"], d["export"]) == ("float32", "bfloat16", "float32", "float32")
    assert d["compute_reason"].startswith("requested") and recs["float32"]["dtypes"]["compute"] == "float32"
    assert recs["bfloat16"]["config_hash"] != recs["float32"]["config_hash"]
    assert abs(recs["bfloat16"]["test_loss"] - recs["float32"]["test_loss"]) < 0.05
