"""Role presets per architecture and target resolution (lorafit/targets.py)."""

from __future__ import annotations

import pytest

from conftest import ARCHS, tiny_model
from lorafit import target_presets
from lorafit.errors import TargetError
from lorafit.targets import resolve_targets

EXPECTED = {
    "distilbert": dict(
        query="distilbert.transformer.layer.0.attention.q_lin", key="distilbert.transformer.layer.0.attention.k_lin",
        value="distilbert.transformer.layer.0.attention.v_lin",
        output="distilbert.transformer.layer.0.attention.out_lin",
        classifier=["classifier"], head=["pre_classifier", "classifier"]),
    "bert": dict(
        query="bert.encoder.layer.0.attention.self.query", key="bert.encoder.layer.0.attention.self.key",
        value="bert.encoder.layer.0.attention.self.value", output="bert.encoder.layer.0.attention.output.dense",
        classifier=["classifier"], head=["bert.pooler.dense", "classifier"]),
    "roberta": dict(
        query="roberta.encoder.layer.0.attention.self.query", key="roberta.encoder.layer.0.attention.self.key",
        value="roberta.encoder.layer.0.attention.self.value",
        output="roberta.encoder.layer.0.attention.output.dense",
        classifier=["classifier.out_proj"], head=["classifier.dense", "classifier.out_proj"]),
    "mpnet": dict(
        query="mpnet.encoder.layer.0.attention.attn.q", key="mpnet.encoder.layer.0.attention.attn.k",
        value="mpnet.encoder.layer.0.attention.attn.v", output="mpnet.encoder.layer.0.attention.attn.o",
        classifier=["classifier.out_proj"], head=["classifier.dense", "classifier.out_proj"]),
}


@pytest.mark.parametrize("arch", ARCHS)
def test_presets(arch):
    presets = target_presets(tiny_model(arch))
    want = EXPECTED[arch]
    for role in ("query", "key", "value", "output"):
        assert presets[role] == [want[role], want[role].replace("layer.0", "layer.1")]
    assert presets["classifier"] == want["classifier"]
    assert presets["head"] == want["head"]
    assert presets["pooler"] == want["head"][:1]  # the head's first layer
    assert len(presets["ffn"]) == 4  # two feed-forward Linears in each of 2 layers
    assert not set(presets["ffn"]) & set(presets["output"])


@pytest.mark.parametrize("arch", ARCHS)
def test_seed_targets_resolve(arch):
    names = resolve_targets(tiny_model(arch), ["key", "value", "classifier"])
    assert len(names) == 5


def test_suffix_and_regex_targets():
    model = tiny_model("bert")
    assert resolve_targets(model, ["attention.self.query"]) == [
        "bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.attention.self.query"]
    assert resolve_targets(model, [r"bert\.encoder\.layer\.1\..*\.(key|value)"]) == [
        "bert.encoder.layer.1.attention.self.key", "bert.encoder.layer.1.attention.self.value"]
    with pytest.raises(TargetError, match="not a valid regex"):
        resolve_targets(model, ["(unclosed"])


def test_error_lists_linear_names_collapsed():
    with pytest.raises(TargetError) as info:
        resolve_targets(tiny_model("distilbert"), ["query_proj"])
    msg = str(info.value)
    assert "distilbert.transformer.layer.<i>.attention.q_lin" in msg and "pre_classifier" in msg
    assert "layer.0" not in msg


@pytest.mark.parametrize("arch", ARCHS)
def test_encoder_role_names_the_same_layers_once_lora_wraps_them(arch):
    """A second adapter on `encoder` (lora's default) goes on the layers the first one wraps,
    side by side, never inside the wrapper: the role names a wrapped layer by its wrapper."""
    from lorafit.lora import LoRAConfig, LoRALinear, apply_lora, lora_modules

    model = tiny_model(arch)
    before = resolve_targets(model, ["encoder"])
    assert len(before) == 12  # six Linear layers in each of 2 layers
    apply_lora(model, LoRAConfig(r=2, alpha=4, targets=["encoder"]), adapter_name="a")
    assert resolve_targets(model, ["encoder"]) == before
    apply_lora(model, LoRAConfig(r=2, alpha=4, targets=["encoder"]), adapter_name="b")
    layers = dict(lora_modules(model))
    assert sorted(layers) == sorted(before)
    assert all(set(layer.adapters) == {"a", "b"} and not isinstance(layer.base, LoRALinear)
               for layer in layers.values())


def test_pooler_role_without_one_names_the_way_out():
    """A head with no layer before the classifier: `pooler` (in lora's default targets) stops with
    a line that says so and what to pass instead."""
    import torch

    class Bare(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("Config", (), {"num_labels": 2, "model_type": "bare"})()
            self.classifier = torch.nn.Linear(8, 2)

    with pytest.raises(TargetError, match=r"pooler.*pass --targets encoder,classifier"):
        resolve_targets(Bare(), ["pooler"])


@pytest.mark.parametrize("arch", ARCHS)
def test_pooler_role_names_the_layer_once_lora_wraps_it(arch):
    """The default targets on a model that already holds the default adapter name the same
    layers: the pooler by its wrapper, not the Linear inside it."""
    from lorafit.lora import LoRAConfig, apply_lora, lora_modules

    model = tiny_model(arch)
    before = resolve_targets(model, ["encoder", "pooler"])
    apply_lora(model, LoRAConfig(r=2, alpha=4, targets=["encoder", "pooler"]), adapter_name="a")
    assert resolve_targets(model, ["encoder", "pooler"]) == before == sorted(dict(lora_modules(model)),
                                                                         key=before.index)


POOLER = {"distilbert": "pre_classifier", "bert": "bert.pooler.dense", "roberta": "classifier.dense",
          "mpnet": "classifier.dense"}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fresh", [True, False])
def test_the_head_first_layer_named_by_module_is_treated_as_the_role(arch, fresh):
    """`--targets encoder,pre_classifier` (the module's name) sets up what `encoder,pooler` does:
    with `--train-head`, a first layer that loading initialised afresh is neither adapted nor
    trained (it stays at its random start), a pretrained one gets an adapter."""
    from lorafit.config import RunConfig
    from lorafit.lora import lora_modules
    from lorafit.strategies import STRATEGIES

    name = POOLER[arch]
    fresh_keys = {f"{name}.weight", f"{name}.bias"} if fresh else set()
    setups = {}
    for targets in (["encoder", "pooler", "classifier"], ["encoder", name, "classifier"]):
        model = tiny_model(arch)
        STRATEGIES["lora"].setup(model, RunConfig(targets=targets), fresh_keys)
        setups[targets[1]] = (sorted(dict(lora_modules(model))),
                              sorted(n for n, p in model.named_parameters() if p.requires_grad))
    adapted, trained = setups[name]
    assert setups["pooler"] == setups[name]
    assert (name in adapted) is not fresh
    assert not any(n.startswith(f"{name}.") for n in trained if "lora_" not in n)
