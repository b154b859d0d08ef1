"""The attention kernel: SDPA in fp32 under bf16 autocast, chosen per machine and recorded."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import lorafit.attention as attention_mod
from cli_helpers import TINY, lorafit, lorafit_here
from conftest import ARCHS, tiny_model
from lorafit.attention import _sdpa_fp32, attention_of, resolve_attention, set_attention
from lorafit.runs import load_trained


@pytest.mark.parametrize("arch", ARCHS)
def test_sdpa_fp32_runs_the_attention_in_fp32_only(arch, batch, monkeypatch):
    """In fp32 the logits are those of plain SDPA, bit for bit; under bf16 autocast the
    attention calls go through lorafit's function (once per layer) and the logits stay
    within bf16 rounding of the fp32 model's. An architecture without transformers' SDPA
    interface keeps its own kernel and says so."""
    calls = []
    monkeypatch.setattr(attention_mod, "_sdpa_fp32", lambda *a, **k: calls.append(1) or _sdpa_fp32(*a, **k))
    monkeypatch.setattr(attention_mod, "_registered", False)
    model = tiny_model(arch)
    if model.config._attn_implementation != "sdpa":
        assert set_attention(model, "sdpa-fp32") == model.config._attn_implementation
        return
    with torch.no_grad():
        plain = model(**batch).logits
        assert set_attention(model, "sdpa-fp32") == "sdpa-fp32" == attention_of(model)
        fp32 = model(**batch).logits
        assert torch.equal(plain, fp32)
        assert len(calls) == model.config.num_hidden_layers
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(**batch).logits
    torch.testing.assert_close(mixed.float(), fp32, atol=0.05, rtol=0.05)
    assert set_attention(model, "sdpa") == "sdpa" == attention_of(model)


def test_sdpa_fp32_gradients_are_closer_to_fp32_than_bf16_sdpa():
    """Forward and backward on bf16 q, k, v with a padding mask: the fp32 kernel's output
    and gradients are closer, on average, to an all-fp32 reference than bf16 SDPA's (both
    end in bf16, so their largest errors, one bf16 rounding, are alike)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 2, 64, 16, generator=g) for _ in range(3))
    mask = (torch.arange(64)[None] < torch.tensor([64, 50, 33, 64])[:, None])[:, None, None]
    grad = torch.randn(4, 2, 64, 16, generator=g)

    class Module(torch.nn.Module):
        is_causal = False

    def run(fn, dtype):
        a, b, c = (x.detach().to(dtype).clone().requires_grad_() for x in (q, k, v))
        out = fn(a, b, c)
        out.backward(grad.to(out.dtype))
        return [t.float() for t in (out, a.grad, b.grad, c.grad)]

    ref = run(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=mask), torch.float32)
    bf16 = run(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=mask), torch.bfloat16)
    ours = run(lambda a, b, c: _sdpa_fp32(Module(), a, b, c, mask)[0].transpose(1, 2), torch.bfloat16)
    assert ours[0].shape == ours[1].shape == q.shape
    for r, b, o in zip(ref, bf16, ours):
        assert (o - r).abs().mean() < (b - r).abs().mean()


def test_auto_decides_once_per_machine_and_shape(tmp_path, monkeypatch):
    """auto: sdpa on CUDA and in fp32 without timing; on CPU under bf16 the timing decides,
    is cached, and is not repeated; sdpa-fp32 only when clearly (3%) faster."""
    monkeypatch.setenv("LORAFIT_CACHE", str(tmp_path))
    timed = []
    times = {"sdpa": 1.0, "sdpa-fp32": 0.8}
    monkeypatch.setattr(attention_mod, "time_both", lambda *shape: timed.append(shape) or dict(times))
    cpu, shape = torch.device("cpu"), (16, 12, 256, 32)
    assert resolve_attention("auto", torch.device("cuda"), "bf16", shape) == "sdpa"
    assert resolve_attention("auto", cpu, "fp32", shape) == "sdpa"
    assert resolve_attention("sdpa-fp32", cpu, "fp32", shape) == "sdpa-fp32"
    assert not timed
    assert resolve_attention("auto", cpu, "bf16", shape) == "sdpa-fp32"
    assert resolve_attention("auto", cpu, "bf16", shape) == "sdpa-fp32"
    assert timed == [shape]
    cache = json.loads((tmp_path / "attention.json").read_text())
    assert [v["choice"] for v in cache.values()] == ["sdpa-fp32"]
    times["sdpa-fp32"] = 0.99  # within noise: keep what autocast gives
    assert resolve_attention("auto", cpu, "bf16", (8, 12, 256, 32)) == "sdpa"
    assert len(timed) == 2


def test_a_run_records_its_attention_and_loading_it_uses_the_same(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    r = lorafit("train", "--model", str(tiny_model_dir), "--attention", "sdpa-fp32", *TINY, "--out", str(run))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "attention sdpa-fp32" in r.stdout
    assert json.loads((run / "config.json").read_text())["attention_resolved"] == "sdpa-fp32"
    assert json.loads((run / "final.json").read_text())["attention"] == "sdpa-fp32"
    _, loaded = load_trained(run)
    assert attention_of(loaded.model) == "sdpa-fp32"
    bad = lorafit_here("train", "--model", str(tiny_model_dir), "--attention", "flash", *TINY,
                       "--out", str(tmp_path / "x"))
    assert bad.returncode != 0 and "attention" in bad.stderr and "Traceback" not in bad.stderr
