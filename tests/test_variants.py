"""The LoRA variants on the extensible core: DoRA, PiSSA, LoRA+, several named adapters."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from conftest import ARCHS, tiny_model
from lorafit import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    combine_adapters,
    count_parameters,
    load_adapter,
    merge_lora,
    save_adapter,
    set_active_adapter,
    unmerge_lora,
)
from lorafit.config import RunConfig
from lorafit.errors import AdapterError, ConfigError, TargetError
from lorafit.lora import DoRAAdapter, adapter_params
from lorafit.strategies import STRATEGIES

VARIANTS = {
    "lora": {},
    "gaussian": {"init": "gaussian"},
    "dora": {"use_dora": True},
    "pissa": {"init": "pissa"},
    "dora+pissa": {"use_dora": True, "init": "pissa"},
}


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _train_a_little(model, batch, steps: int = 3, adapter: str | None = None) -> None:
    """A few AdamW steps on every trainable parameter: B leaves zero, DoRA's magnitude moves."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    labels = torch.tensor([0, 1, 1])
    for _ in range(steps):
        nn.functional.cross_entropy(model(**batch).logits, labels).backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("arch", ARCHS)
def test_variant_invariants(arch, variant, batch):
    """At init the logits are the base model's (PiSSA: within fp32 rounding of its
    residual); merged == unmerged; merging twice changes nothing; only the variant's
    parameters train."""
    model = tiny_model(arch)
    base = _logits(model, batch)
    apply_lora(model, LoRAConfig(**VARIANTS[variant]))
    if "pissa" in variant:
        torch.testing.assert_close(_logits(model, batch), base, atol=1e-5, rtol=0)
    else:
        assert torch.equal(_logits(model, batch), base)
    names = set(adapter_params(model))
    expected_parts = {"lora_A", "lora_B", "magnitude"} if "dora" in variant else {"lora_A", "lora_B"}
    assert {n.rsplit(".", 1)[1] for n in names} == expected_parts
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train_a_little(model, batch)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= names  # nothing frozen moved
    assert any(n.endswith("lora_B") for n in changed)
    if "dora" in variant:
        assert any(n.endswith("magnitude") for n in changed)
    unmerged = _logits(model, batch)
    assert not torch.allclose(unmerged, base, atol=1e-4)
    merge_lora(model)
    merged = _logits(model, batch)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    w = {n: p.detach().clone() for n, p in model.named_parameters()}
    merge_lora(model)
    assert all(torch.equal(p, w[n]) for n, p in model.named_parameters())
    unmerge_lora(model)
    torch.testing.assert_close(_logits(model, batch), unmerged, atol=1e-5, rtol=0)


def test_dora_layer_is_the_papers_formula_with_the_norm_detached():
    torch.manual_seed(0)
    base = nn.Linear(12, 6)
    layer = LoRALinear.from_linear(base, LoRAConfig(r=2, alpha=4, use_dora=True))
    adapter = layer.adapter
    assert isinstance(adapter, DoRAAdapter)
    torch.testing.assert_close(adapter.magnitude, torch.linalg.vector_norm(base.weight, dim=1))  # m = ||W0||
    with torch.no_grad():
        adapter.lora_B.normal_()
        adapter.magnitude.mul_(1.5)
    x = torch.randn(4, 12)
    layer(x).pow(2).sum().backward()
    got = {k: p.grad.clone() for k, p in adapter.params().items()}

    a = adapter.lora_A.detach().clone().requires_grad_()
    b = adapter.lora_B.detach().clone().requires_grad_()
    m = adapter.magnitude.detach().clone().requires_grad_()
    v = base.weight + 2.0 * b @ a  # W0 + sBA, s = 4 / 2
    w = m[:, None] * v / torch.linalg.vector_norm(v, dim=1).detach()[:, None]  # section 4.3: norm is a constant
    (x @ w.T + base.bias).pow(2).sum().backward()
    torch.testing.assert_close(layer(x), x @ w.T + base.bias, atol=1e-5, rtol=1e-5)
    for k, ref in {"lora_A": a.grad, "lora_B": b.grad, "magnitude": m.grad}.items():
        torch.testing.assert_close(got[k], ref, atol=1e-4, rtol=1e-4)


def test_pissa_starts_from_the_principal_singular_vectors():
    torch.manual_seed(0)
    base = nn.Linear(16, 10)
    w0 = base.weight.detach().clone()
    layer = LoRALinear.from_linear(base, LoRAConfig(r=3, alpha=6, init="pissa"))
    u, s, vh = torch.linalg.svd(w0)
    principal = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]
    torch.testing.assert_close(layer.scaling * layer.lora_B @ layer.lora_A, principal, atol=1e-5, rtol=0)
    torch.testing.assert_close(base.weight, w0 - principal, atol=1e-5, rtol=0)  # the base keeps the residual


@pytest.mark.parametrize("variant", ["pissa", "dora+pissa"])
def test_pissa_saves_a_plain_rank_2r_adapter_for_the_unmodified_base(variant, tmp_path, batch):
    model = tiny_model("bert")
    apply_lora(model, LoRAConfig(r=2, alpha=4, **VARIANTS[variant]))
    _train_a_little(model, batch)
    trained = _logits(model, batch)
    save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["init_lora_weights"] is True
    fresh = tiny_model("bert")  # the original, unmodified base weights
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(_logits(fresh, batch), trained, atol=1e-5, rtol=0)


def test_lora_plus_gives_b_its_rate_and_keeps_biases_at_the_base_rate():
    model = tiny_model("bert")
    cfg = RunConfig(lora_plus_ratio=16.0, train_head=True, dora=True)
    STRATEGIES["lora"].setup(model, cfg)
    groups = STRATEGIES["lora"].param_groups(model, cfg, lr=1e-3)
    rate = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert set(rate) == {id(p) for p in named.values() if p.requires_grad}  # every trainable one, once
    for n, p in named.items():
        if not p.requires_grad:
            continue
        want = 16e-3 if n.endswith("lora_B") else 1e-3  # A, magnitudes, the head's weight and bias: base rate
        assert rate[id(p)] == pytest.approx(want), n
    assert any(n.startswith("classifier.") and n.endswith("bias") for n in named if named[n].requires_grad)
    from lorafit.training import TrainSettings, make_optimizer

    opt, sched = make_optimizer(model, TrainSettings(epochs=1, lr=1e-3, batch_size=8, warmup_ratio=0.5), 4, groups)
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3 * 2 / 3, 16e-3 * 2 / 3, 1e-3 * 2 / 3])
    assert len(STRATEGIES["lora"].param_groups(model, RunConfig(), lr=1e-3)) == 2  # ratio 1: LoRA+ off


def test_variant_default_rates_and_an_explicit_lr_wins():
    """LoRA+ at lora's rate over sqrt(ratio), rsLoRA at half of it (its scale at rank 4 is
    twice the standard one), both rules together; --lr as given; other strategies untouched."""
    from lorafit.strategies import learning_rate

    assert learning_rate(RunConfig()) == pytest.approx(1e-3)
    assert learning_rate(RunConfig(lora_plus_ratio=16.0)) == pytest.approx(2.5e-4)  # B at 4e-3
    assert learning_rate(RunConfig(scaling="rslora")) == pytest.approx(5e-4)
    assert learning_rate(RunConfig(scaling="rslora", rank=16)) == pytest.approx(5e-4)
    assert learning_rate(RunConfig(scaling="rslora", lora_plus_ratio=4.0)) == pytest.approx(2.5e-4)
    for flags in ({"lora_plus_ratio": 16.0}, {"scaling": "rslora"}):
        assert learning_rate(RunConfig(lr=1e-3, **flags)) == 1e-3
        assert learning_rate(RunConfig(strategy="full", **flags)) == pytest.approx(5e-5)


def test_variant_config_errors_name_the_flag():
    with pytest.raises(ConfigError, match=r"init \(--init\) must be one of kaiming, gaussian, pissa"):
        LoRAConfig(init="svd")
    with pytest.raises(ConfigError, match=r"lora_plus_ratio \(--lora-plus-ratio\) must be a number > 0"):
        RunConfig(lora_plus_ratio=0.0)


def _two_adapters(arch="bert"):
    """A base model, and copies of it holding adapter `a` only, `b` only, and both."""
    models = {}
    for which in ("a", "b"):
        m = tiny_model(arch)
        apply_lora(m, LoRAConfig(r=2, alpha=4, targets=["key", "value"]), adapter_name=which)
        g = torch.Generator().manual_seed(ord(which))
        with torch.no_grad():
            for p in adapter_params(m).values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        models[which] = m
    return models


def test_several_adapters_switch_and_combine(tmp_path, batch):
    single = _two_adapters()
    save_adapter(single["a"], tmp_path / "a")
    save_adapter(single["b"], tmp_path / "b")
    both = tiny_model("bert")
    load_adapter(both, tmp_path / "a", adapter_name="a")
    load_adapter(both, tmp_path / "b", adapter_name="b")
    layers = [m for m in both.modules() if isinstance(m, LoRALinear)]
    assert all(set(layer.adapters) == {"a", "b"} and layer.active == {"a": 1.0} for layer in layers)
    assert torch.equal(_logits(both, batch), _logits(single["a"], batch))  # the first stays active
    set_active_adapter(both, "b")
    assert torch.equal(_logits(both, batch), _logits(single["b"], batch))
    assert count_parameters(both)[0] == count_parameters(single["b"])[0]  # only the active adapter trains
    combine_adapters(both, {"a": 1.0, "b": 0.0})
    assert torch.equal(_logits(both, batch), _logits(single["a"], batch))
    combine_adapters(both, {"a": 0.5, "b": 0.5})
    mean = tiny_model("bert")  # the model whose delta is the mean of the two deltas
    with torch.no_grad():
        for name, layer in [(n, m) for n, m in both.named_modules() if isinstance(m, LoRALinear)]:
            w = mean.get_submodule(name).weight
            w += layer.delta_weight()
    torch.testing.assert_close(_logits(both, batch), _logits(mean, batch), atol=1e-5, rtol=0)
    merge_lora(both)  # merging a combination merges its weighted sum
    torch.testing.assert_close(_logits(both, batch), _logits(mean, batch), atol=1e-5, rtol=0)
    with pytest.raises(TargetError, match="merged; call unmerge_lora"):
        set_active_adapter(both, "a")
    unmerge_lora(both)
    with pytest.raises(TargetError, match="no adapter 'c'"):
        set_active_adapter(both, "c")
    with pytest.raises(AdapterError, match="pass adapter_name"):
        save_adapter(both, tmp_path / "x")


def test_dora_adapters_are_not_combined():
    model = tiny_model("bert")
    apply_lora(model, LoRAConfig(use_dora=True), adapter_name="a")
    apply_lora(model, LoRAConfig(), adapter_name="b")
    with pytest.raises(TargetError, match="DoRA adapters cannot be combined"):
        combine_adapters(model, {"a": 0.5, "b": 0.5})
    with pytest.raises(TargetError, match="would train whole modules"):
        apply_lora(model, LoRAConfig(targets=["key"], train_modules=["pooler.dense"]), adapter_name="c")


def test_variants_through_the_cli_and_a_run_folder_with_several_adapters(tiny_model_dir, tmp_path, batch):
    """`--dora --init pissa --lora-plus-ratio 16` trains end to end; a second adapter placed
    in the run's adapter folder is picked by `--adapter NAME` in evaluate, predict and merge."""
    import shutil

    from cli_helpers import lorafit, lorafit_here
    from lorafit.runs import load_trained

    args = ["--model", str(tiny_model_dir), "--train-size", "32", "--val-size", "8", "--test-size", "16",
            "--max-length", "32", "--epochs", "1", "--batch-size", "8", "--precision", "fp32", "--no-progress"]
    r = lorafit("train", *args, "--dora", "--init", "pissa", "--lora-plus-ratio", "16", "--out", str(tmp_path / "v"))
    assert r.returncode == 0, r.stderr[-2000:]
    saved = json.loads((tmp_path / "v" / "config.json").read_text())
    assert saved["dora"] and saved["init"] == "pissa" and saved["lora_plus_ratio"] == 16
    adapter_cfg = json.loads((tmp_path / "v" / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["use_dora"] and adapter_cfg["r"] == 8  # PiSSA saved as the plain rank-2r LoRA
    final = json.loads((tmp_path / "v" / "final.json").read_text())
    r = lorafit_here("evaluate", str(tmp_path / "v"), "--no-progress")
    assert r.returncode == 0 and json.loads(r.stdout)["test_accuracy"] == final["test_accuracy"]

    r = lorafit_here("train", *args, "--out", str(tmp_path / "plain"))  # same seed: the same fresh head
    assert r.returncode == 0, r.stderr[-2000:]
    shutil.copytree(tmp_path / "plain" / "adapter", tmp_path / "v" / "adapter" / "plain")
    r = lorafit_here("evaluate", str(tmp_path / "v"), "--adapter", "plain", "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    plain_final = json.loads((tmp_path / "plain" / "final.json").read_text())
    assert (json.loads(r.stdout)["test_accuracy"], json.loads(r.stdout)["test_loss"]) == (
        plain_final["test_accuracy"], plain_final["test_loss"])
    r = lorafit_here("predict", str(tmp_path / "v"), "A film.", "--adapter", "nope")
    assert r.returncode == 2 and "has no adapter 'nope'; it holds: default, plain" in r.stderr
    r = lorafit_here("merge", str(tmp_path / "v"), str(tmp_path / "merged"), "--adapter", "plain")
    assert r.returncode == 0, r.stderr[-2000:]
    from transformers import AutoModelForSequenceClassification

    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    _, plain = load_trained(tmp_path / "plain")
    ids = {"input_ids": torch.tensor([[101, 2023, 2143, 2001, 2307, 102]]), "attention_mask": torch.ones(1, 6).long()}
    torch.testing.assert_close(_logits(merged, ids), _logits(plain.model.eval(), ids), atol=1e-5, rtol=0)
