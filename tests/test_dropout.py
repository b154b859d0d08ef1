"""FastDropout: cheaper masks, the same distribution and gradients as dropout."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import ARCHS, tiny_model
from lorafit.dropout import FastDropout, keep_mask, use_fast_dropout


def test_the_mask_keeps_each_element_with_probability_one_minus_p():
    """Over 4M draws the dropped fraction is p within 5 standard errors, in each of the
    four 16-bit lanes of a random word (a biased lane would show here), and the scale is
    the inverse of the keep probability used."""
    torch.manual_seed(0)
    for p in (0.1, 0.5, 0.9):
        keep, scale = keep_mask((1024, 4096), p)
        dropped = round(p * 65536) / 65536
        assert scale == pytest.approx(1 / (1 - dropped))
        se = (dropped * (1 - dropped) / (keep.numel() / 4)) ** 0.5
        lanes = (~keep).reshape(-1, 4).float().mean(0)
        assert torch.all((lanes - dropped).abs() < 5 * se), (p, lanes)


def test_forward_and_backward_are_mask_times_scale():
    """y = x * keep / P(keep), dy/dx the same mask; the expectation of y is x."""
    torch.manual_seed(1)
    x = torch.randn(64, 128, 96, requires_grad=True)
    drop = FastDropout(0.1).train()
    y = drop(x)
    keep = y != 0
    scale = 1 / (1 - round(0.1 * 65536) / 65536)
    torch.testing.assert_close(y, x.detach() * keep * scale)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g * keep * scale)
    ones = torch.ones(256, 256, 64)
    assert drop(ones).mean().item() == pytest.approx(1.0, abs=0.005)


def test_seeded_like_dropout_and_the_identity_in_eval():
    """The same seed draws the same mask (resume relies on the generator state); other
    seeds differ; eval mode, p = 0 and bf16 behave as nn.Dropout does."""
    x = torch.randn(8, 32, 16)
    drop = FastDropout(0.3).train()
    torch.manual_seed(5)
    a = drop(x)
    torch.manual_seed(5)
    b = drop(x)
    torch.manual_seed(6)
    c = drop(x)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(drop.eval()(x), x)
    assert torch.equal(FastDropout(0.0).train()(x), x)
    y = FastDropout(0.3).train()(x.bfloat16())
    assert y.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="0 < p < 1"):
        keep_mask((3,), 0.0)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_dropout_of_a_model_is_swapped_keeping_p(arch):
    model = tiny_model(arch)
    before = {n: m.p for n, m in model.named_modules() if type(m) is nn.Dropout}
    assert before
    assert use_fast_dropout(model) == len(before)
    after = {n: m.p for n, m in model.named_modules() if isinstance(m, FastDropout)}
    assert after == before
    assert use_fast_dropout(model) == 0  # idempotent


def test_loaded_models_and_lora_layers_draw_fast_masks(tiny_model_dir):
    """load_model swaps the model's dropouts; a LoRA layer's own dropout is a FastDropout."""
    from lorafit.lora import LoRAConfig, apply_lora
    from lorafit.models import load_model

    model = load_model(str(tiny_model_dir), seed=0).model
    assert not [n for n, m in model.named_modules() if type(m) is nn.Dropout]
    apply_lora(model, LoRAConfig(r=2, alpha=4, dropout=0.1, targets=["key"]))
    assert any(isinstance(m, FastDropout) and m.p == 0.1 for n, m in model.named_modules() if "key" in n)
