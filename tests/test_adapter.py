"""Adapters on disk: PEFT's format, safetensors only, interop both ways (lorafit/adapter.py)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ARCHS, tiny_model
from lorafit import LoRAConfig, LoRALinear, apply_lora, load_adapter, save_adapter
from lorafit.errors import AdapterError
from test_lora import _perturb

peft = pytest.importorskip("peft")


def _adapted(arch: str, **cfg) -> torch.nn.Module:
    model = tiny_model(arch)
    apply_lora(model, LoRAConfig(**cfg))
    _perturb(model)
    return model


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_saved_keys_and_config(tmp_path):
    model = _adapted("distilbert", train_modules=["pre_classifier"])
    save_adapter(model, tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    expected = {f"base_model.model.distilbert.transformer.layer.{i}.attention.{m}.lora_{ab}.weight"
                for i in (0, 1) for m in ("k_lin", "v_lin") for ab in "AB"}
    expected |= {"base_model.model.classifier.lora_A.weight", "base_model.model.classifier.lora_B.weight",
                 "base_model.model.pre_classifier.weight", "base_model.model.pre_classifier.bias"}
    assert keys == expected
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert cfg["modules_to_save"] == ["pre_classifier"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.parametrize("arch", ARCHS)
def test_roundtrip_gives_equal_logits(arch, tmp_path, batch):
    model = _adapted(arch, scaling="rslora", r=2, alpha=4)
    save_adapter(model, tmp_path)
    fresh = tiny_model(arch)
    config = load_adapter(fresh, tmp_path)
    assert config.r == 2 and config.scaling == "rslora"
    assert torch.equal(_logits(fresh, batch), _logits(model, batch))
    # loading again into the model that now has the same LoRA works too
    load_adapter(fresh, tmp_path)
    assert torch.equal(_logits(fresh, batch), _logits(model, batch))


@pytest.mark.parametrize("arch", ["distilbert", "bert", "roberta"])
def test_peft_loads_lorafit_adapter(arch, tmp_path, batch):
    train = {"distilbert": ["pre_classifier"], "bert": ["pooler.dense"], "roberta": []}[arch]
    model = _adapted(arch, train_modules=train)
    with torch.no_grad():  # make the train module differ from the base so the check means something
        for name in train:
            model.get_submodule(name if arch != "bert" else "bert." + name).weight.mul_(1.5)
    save_adapter(model, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(tiny_model(arch), tmp_path).eval()
    torch.testing.assert_close(_logits(peft_model, batch), _logits(model, batch), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_loads_the_default_runs_adapter(arch, tmp_path, batch):
    """lora's default (the CLI's `encoder,pooler,classifier` with the classifier trained fully and the
    head's first layer, where loading initialised it afresh as it does for DistilBERT, RoBERTa and
    MPNet, frozen and saved whole as the run saves it; BERT's pooler is pretrained and gets an
    adapter). On RoBERTa and MPNet both head layers sit in one `classifier` module, which PEFT must
    not take whole; on DistilBERT PEFT's suffix match takes `pre_classifier` for `classifier` and
    needs its weights."""
    from lorafit.config import RunConfig
    from lorafit.strategies import lora_config
    from lorafit.targets import target_presets

    model = tiny_model(arch)
    fresh = {f"{n}.weight" for n in target_presets(model)["pooler"]} if arch != "bert" else set()
    apply_lora(model, lora_config(RunConfig(), model, fresh))
    _perturb(model)
    presets = target_presets(model)
    assert isinstance(model.get_submodule(presets["pooler"][0]), LoRALinear) is (arch == "bert")
    with torch.no_grad():  # the fully trained layers differ from the base
        for name in model.lora_train_modules:
            model.get_submodule(name).weight.mul_(1.5)
    save_adapter(model, tmp_path, keep_modules=presets["pooler"] if arch != "bert" else ())
    base = tiny_model(arch)
    if arch != "bert":  # loading the pretrained folder initialises the fresh layer afresh: other weights
        torch.nn.init.normal_(base.get_submodule(presets["pooler"][0]).weight, std=0.5)
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    torch.testing.assert_close(_logits(peft_model, batch), _logits(model, batch), atol=1e-5, rtol=0)
    assert not torch.allclose(_logits(tiny_model(arch), batch), _logits(model, batch), atol=1e-3)


@pytest.mark.parametrize("arch", ["distilbert", "bert", "roberta"])
def test_lorafit_loads_peft_adapter(arch, tmp_path, batch):
    train = {"distilbert": ["pre_classifier"], "bert": ["pooler.dense"], "roberta": []}[arch]
    targets = {"distilbert": ["k_lin", "v_lin", "classifier"], "bert": ["key", "value", "classifier"],
               "roberta": ["key", "value", "out_proj"]}[arch]
    peft_model = peft.get_peft_model(
        tiny_model(arch), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, modules_to_save=train or None))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.1)
    peft_model.eval()
    peft_model.save_pretrained(tmp_path)
    model = tiny_model(arch)
    config = load_adapter(model, tmp_path)
    assert config.r == 4 and len([m for m in model.modules() if isinstance(m, LoRALinear)]) == 5
    torch.testing.assert_close(_logits(model, batch), _logits(peft_model, batch), atol=1e-5, rtol=0)


def test_load_errors(tmp_path, batch):
    model = _adapted("bert")
    good = save_adapter(model, tmp_path / "good")

    with pytest.raises(AdapterError, match="does not exist"):
        load_adapter(tiny_model("bert"), tmp_path / "missing")

    with pytest.raises(AdapterError, match="another architecture: this model has no module"):
        load_adapter(tiny_model("distilbert"), good)

    other_rank = save_adapter(_adapted("bert", r=8, alpha=16), tmp_path / "r8")
    target = tiny_model("bert")
    apply_lora(target, LoRAConfig(r=4))
    with pytest.raises(AdapterError, match="rank 8 but this model has LoRA of rank"):
        load_adapter(target, other_rank)

    from transformers import BertConfig, BertForSequenceClassification
    wider = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=48, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=64))
    with pytest.raises(AdapterError, match="does not fit module .*another model size or rank"):
        load_adapter(wider, good)

    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    data = (good / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError, match="not a readable safetensors file .*corrupt or truncated"):
        load_adapter(tiny_model("bert"), truncated)

    missing_key = tmp_path / "missing_key"
    missing_key.mkdir()
    (missing_key / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    sd = load_file(good / "adapter_model.safetensors")
    sd.pop("base_model.model.classifier.lora_B.weight")
    save_file(sd, missing_key / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="lacks base_model.model.classifier.lora_B.weight"):
        load_adapter(tiny_model("bert"), missing_key)

    bad_json = tmp_path / "bad_json"
    bad_json.mkdir()
    (bad_json / "adapter_config.json").write_text("{not json")
    (bad_json / "adapter_model.safetensors").write_bytes((good / "adapter_model.safetensors").read_bytes())
    with pytest.raises(AdapterError, match="not valid JSON"):
        load_adapter(tiny_model("bert"), bad_json)

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(AdapterError, match="pickle weights .*safetensors only"):
        load_adapter(tiny_model("bert"), pickled)
    with pytest.raises(AdapterError, match="pickle file; lorafit loads safetensors only"):
        load_adapter(tiny_model("bert"), pickled / "adapter_model.bin")


def test_save_errors(tmp_path):
    with pytest.raises(AdapterError, match="no LoRA applied; call apply_lora"):
        save_adapter(tiny_model("bert"), tmp_path)


def test_load_into_existing_lora_takes_the_files_alpha_scaling_and_dropout(tmp_path, batch):
    saved = _adapted("bert", r=4, alpha=32, scaling="rslora", dropout=0.2)
    save_adapter(saved, tmp_path)
    model = tiny_model("bert")
    apply_lora(model, LoRAConfig(r=4, alpha=8))  # same modules and rank, other alpha, scaling and dropout
    load_adapter(model, tmp_path)
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert {(m.alpha, m.scaling, m.scaling_mode) for m in layers} == {(32, 32 / 2, "rslora")}
    assert {type(m.dropout).__name__ for m in layers} == {"FastDropout"} and layers[0].dropout.p == 0.2
    torch.testing.assert_close(_logits(model.eval(), batch), _logits(saved.eval(), batch), atol=0, rtol=0)


def test_load_into_merged_lora_is_refused(tmp_path):
    save_adapter(_adapted("bert"), tmp_path)
    model = _adapted("bert")
    from lorafit import merge_lora

    merge_lora(model)
    w = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(AdapterError, match=r"merged into their weights; call unmerge_lora\(model\)"):
        load_adapter(model, tmp_path)
    assert all(torch.equal(p, w[n]) for n, p in model.named_parameters())  # nothing half-loaded


def _perturb_all(model, seed=0) -> None:
    """Every adapter parameter moved off its initial value (B off zero, DoRA's magnitude off ||W0||)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                for a in m.adapters.values():
                    a.lora_B.add_(torch.randn(a.lora_B.shape, generator=g) * 0.1)
                    if hasattr(a, "magnitude"):
                        a.magnitude.mul_(1 + 0.2 * torch.rand(a.magnitude.shape, generator=g))


@pytest.mark.parametrize("arch", ["distilbert", "bert", "roberta"])
def test_peft_loads_lorafit_dora_adapter(arch, tmp_path, batch):
    model = tiny_model(arch)
    apply_lora(model, LoRAConfig(use_dora=True))
    _perturb_all(model)
    save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True
    assert any(k.endswith(".lora_magnitude_vector") for k in load_file(tmp_path / "adapter_model.safetensors"))
    peft_model = peft.PeftModel.from_pretrained(tiny_model(arch), tmp_path).eval()
    torch.testing.assert_close(_logits(peft_model, batch), _logits(model.eval(), batch), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["distilbert", "bert", "roberta"])
def test_lorafit_loads_peft_dora_adapter(arch, tmp_path, batch):
    targets = {"distilbert": ["k_lin", "v_lin"], "bert": ["key", "value"], "roberta": ["key", "value"]}[arch]
    peft_model = peft.get_peft_model(tiny_model(arch), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                       use_dora=True))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_magnitude" in name:
                p.add_(torch.rand_like(p) * 0.1)
    peft_model.eval()
    peft_model.save_pretrained(tmp_path)
    model = tiny_model(arch)
    config = load_adapter(model, tmp_path)
    assert config.use_dora and all(
        type(m.adapter).__name__ == "DoRAAdapter" for m in model.modules() if isinstance(m, LoRALinear))
    torch.testing.assert_close(_logits(model, batch), _logits(peft_model, batch), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dora", [False, True])
def test_peft_loads_lorafit_pissa_adapter_on_the_unmodified_base(dora, tmp_path, batch):
    model = tiny_model("bert")
    apply_lora(model, LoRAConfig(init="pissa", use_dora=dora))
    _perturb_all(model)  # as if trained: B and A away from their SVD start
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.adapter.lora_A.mul_(1.1)
    save_adapter(model, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(tiny_model("bert"), tmp_path).eval()
    torch.testing.assert_close(_logits(peft_model, batch), _logits(model.eval(), batch), atol=1e-5, rtol=0)


def test_peft_pissa_adapter_saved_unconverted_is_refused(tmp_path):
    peft_model = peft.get_peft_model(tiny_model("bert"), peft.LoraConfig(r=2, target_modules=["key"],
                                                                         init_lora_weights="pissa"))
    peft_model.save_pretrained(tmp_path)
    with pytest.raises(AdapterError, match="init_lora_weights='pissa' and needs the base weights"):
        load_adapter(tiny_model("bert"), tmp_path)
