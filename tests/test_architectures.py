"""The architecture table (lorafit.architectures): every entry holds for a tiny model of its type.

Adding an architecture is one entry in the table plus its tiny config here; these tests
then check each thing the entry claims against the real transformers model."""

from __future__ import annotations

import collections
import re

import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from lorafit.architectures import ARCHITECTURES, architecture
from lorafit.feature_cache import HeadOnCache
from lorafit.first_token import last_layer_of, prune_last_layer
from lorafit.strategies import head_layers
from lorafit.targets import target_presets

_SMALL = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              max_position_embeddings=70)
TINY_CONFIGS = {
    "bert": _SMALL,
    "roberta": {**_SMALL, "pad_token_id": 1},
    "xlm-roberta": {**_SMALL, "pad_token_id": 1},
    "camembert": {**_SMALL, "pad_token_id": 1},
    "mpnet": _SMALL,
    "electra": {**_SMALL, "embedding_size": 16},
    "distilbert": dict(vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=70),
}
"""A tiny config per architecture in the table: a new entry needs one here."""


def tiny(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = AutoConfig.for_model(kind, num_labels=3, **TINY_CONFIGS[kind])
    return AutoModelForSequenceClassification.from_config(config).eval()  # sdpa where it has it


def batch(length: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 99, (3, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, length // 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_every_entry_has_a_tiny_config():
    assert sorted(TINY_CONFIGS) == sorted(ARCHITECTURES)


@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
def test_roles_name_real_modules(kind):
    """Each role of the entry's preset matches modules of the model; the classifier role is
    the Linear that outputs the logits."""
    model, arch = tiny(kind), ARCHITECTURES[kind]
    presets = target_presets(model)
    for role in arch.roles or ():
        assert presets.get(role), f"{kind}: role {role!r} matches no module"
    classifier = model.get_submodule(presets["classifier"][-1])
    assert isinstance(classifier, torch.nn.Linear) and classifier.out_features == 3
    layers = model.config.num_hidden_layers if kind != "distilbert" else model.config.n_layers
    if arch.roles:
        assert len(presets["key"]) == len(presets["value"]) == layers


@pytest.mark.parametrize("kind", sorted(k for k, a in ARCHITECTURES.items() if a.head is not None))
def test_head_is_the_models_head(kind):
    """The head the cache re-applies gives the model's logits from the first head layer's input."""
    model = tiny(kind)
    first, second = head_layers(model)
    grabbed = []
    model.get_submodule(first).register_forward_pre_hook(lambda _m, args: grabbed.append(args[0]))
    with torch.no_grad():
        want = model(**batch()).logits
        got = HeadOnCache(model, first, second).eval()(grabbed[0]).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
def test_first_token_layer_as_claimed(kind):
    """Where the entry names a first-token layer, the model gets it and its logits equal the
    whole layer's; where it names none, the model runs the whole layer."""
    model = tiny(kind)
    with torch.no_grad():
        whole = model(**batch()).logits
    claimed = ARCHITECTURES[kind].first_token is not None
    assert prune_last_layer(model) is claimed
    if not claimed:
        assert last_layer_of(model) == "full"
        return
    assert last_layer_of(model) == "first-token"
    with torch.no_grad():
        pruned = model(**batch()).logits
    torch.testing.assert_close(pruned, whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
def test_encoder_and_positions(kind):
    """The encoder sits where the entry says (mean pooling reads its output), and the longest
    input the embeddings take is max_position_embeddings less the entry's offset."""
    model, arch = tiny(kind), ARCHITECTURES[kind]
    assert isinstance(getattr(model.base_model, arch.encoder), torch.nn.Module)
    longest = model.config.max_position_embeddings - arch.position_offset
    with torch.no_grad():
        model(**batch(longest))
        if arch.position_offset:
            with pytest.raises((IndexError, RuntimeError)):
                model(**batch(longest + 1))


@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
def test_pooler_role_is_the_heads_first_layer(kind):
    """`pooler` (in lora's default targets) is, on every architecture, listed roles or not
    (ELECTRA: `_pooler_fallback`), one Linear whose output the classifier reads through the
    head's activation alone, and changing its weights changes the logits."""
    model = tiny(kind)
    presets = target_presets(model)
    (pooler,) = presets["pooler"]
    layer, classifier = model.get_submodule(pooler), model.get_submodule(presets["classifier"][-1])
    assert isinstance(layer, torch.nn.Linear) and layer.out_features == classifier.in_features
    seen = {}
    hooks = [layer.register_forward_hook(lambda _m, _a, out: seen.update(pooler=out)),
             classifier.register_forward_pre_hook(lambda _m, args: seen.update(classifier=args[0]))]
    with torch.no_grad():
        model(**batch())
    for hook in hooks:
        hook.remove()
    # the classifier reads the pooler's output through the head's activation alone (eval: no dropout)
    outs = [act(seen["pooler"]) for act in (torch.tanh, torch.relu, torch.nn.functional.gelu)]
    assert any(out.shape == seen["classifier"].shape and torch.allclose(out, seen["classifier"]) for out in outs)
    if architecture(model).head is not None:
        assert pooler == head_layers(model)[0]
    with torch.no_grad():
        before = model(**batch()).logits
        layer.weight.mul_(-1.0)
        assert not torch.allclose(model(**batch()).logits, before)


def test_pooler_fallback_names_the_layer_once_lora_wraps_it():
    """ELECTRA's head is not in the table: `pooler` is found by shape, and once LoRA wraps that
    layer the role still names the wrapper (a second adapter goes beside the first, not inside)."""
    from lorafit.lora import LoRAConfig, apply_lora

    model = tiny("electra")
    assert target_presets(model)["pooler"] == ["classifier.dense"]
    apply_lora(model, LoRAConfig(r=2, alpha=4, targets=["pooler"]))
    assert target_presets(model)["pooler"] == ["classifier.dense"]


def test_unknown_architecture_gets_the_fallbacks():
    arch = architecture("gpt2")
    assert arch.roles is None and arch.head is None and arch.first_token is None and arch.position_offset == 0
    assert architecture(tiny("bert")) is ARCHITECTURES["bert"]


@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
def test_encoder_role_is_every_linear_layer_of_the_encoder_layers(kind):
    """`encoder` (lora's default targets) holds, on every architecture, listed roles or not, the
    same Linear layers in each encoder layer, six or more per layer, none of the pooler or head;
    where the entry names the five roles it is exactly their union."""
    model, arch = tiny(kind), ARCHITECTURES[kind]
    presets = target_presets(model)
    encoder = presets["encoder"]
    assert all(isinstance(model.get_submodule(n), torch.nn.Linear) for n in encoder)
    assert not set(encoder) & (set(presets.get("head", [])) | set(presets["classifier"]) | {"bert.pooler.dense"})
    layers = model.config.num_hidden_layers if kind != "distilbert" else model.config.n_layers
    per_layer = collections.Counter(re.search(r"\.(\d+)\.", n).group(1) for n in encoder)
    assert sorted(per_layer) == [str(i) for i in range(layers)] and len(set(per_layer.values())) == 1
    assert len(encoder) >= 6 * layers
    if arch.roles:
        five = {n for role in ("query", "key", "value", "output", "ffn") for n in presets[role]}
        assert set(encoder) == five and len(encoder) == 6 * layers
