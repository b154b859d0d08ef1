"""The last layer on the first token only (lorafit.first_token): the same logits and
gradients as the full layer, the pruned path really taken, and never outside the
classifier's own forward."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (AutoModelForSequenceClassification, BertConfig, DistilBertConfig, ElectraConfig,
                          MPNetConfig, RobertaConfig, XLMRobertaConfig)

from lorafit.attention import set_attention
from lorafit.first_token import prune_last_layer, pruned, set_pruning
from lorafit.models import load_model

TINY = {
    "bert": lambda: BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=64),
    "roberta": lambda: RobertaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=70, pad_token_id=1),
    "xlm-roberta": lambda: XLMRobertaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            intermediate_size=64, max_position_embeddings=70, pad_token_id=1),
    "electra": lambda: ElectraConfig(vocab_size=99, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=64),
    "distilbert": lambda: DistilBertConfig(vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                           max_position_embeddings=64),
}


def tiny(kind: str, attn: str = "sdpa") -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(TINY[kind](), attn_implementation=attn).eval()


def batch(lengths=(12, 5, 9), vocab: int = 99) -> dict[str, torch.Tensor]:
    """Right-padded ids (B, T) and their 0/1 mask: rows of different lengths, as real batches."""
    g = torch.Generator().manual_seed(1)
    t = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), t), generator=g)
    mask = (torch.arange(t)[None] < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": ids * mask + (1 - mask), "attention_mask": mask}


def last_ffn(model: torch.nn.Module) -> torch.nn.Module:
    layer = (model.distilbert.transformer.layer[-1].ffn.lin1 if model.config.model_type == "distilbert"
             else model.base_model.encoder.layer[-1].intermediate.dense)
    return layer


def rows_through_last_ffn(model: torch.nn.Module, inputs: dict) -> int:
    """How many token rows the last layer's feed-forward block computed in one forward."""
    seen = []
    handle = last_ffn(model).register_forward_hook(lambda _m, args, _o: seen.append(args[0].shape[1]))
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("kind", sorted(TINY))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_logits_and_gradients_match_the_full_layer(kind, attn):
    model = tiny(kind, attn)
    inputs = batch()
    assert prune_last_layer(model) and pruned(model)

    def run(on: bool):
        set_pruning(model, on)
        model.zero_grad()
        logits = model(**inputs).logits  # (B, C)
        logits.square().sum().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    full_logits, full_grads = run(False)
    logits, grads = run(True)
    torch.testing.assert_close(logits, full_logits, rtol=1e-5, atol=1e-6)
    assert grads.keys() == full_grads.keys()  # every parameter still gets its gradient (DDP needs that)
    for name in grads:
        torch.testing.assert_close(grads[name], full_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    t = inputs["input_ids"].shape[1]
    assert rows_through_last_ffn(model, inputs) == 1
    set_pruning(model, False)
    assert rows_through_last_ffn(model, inputs) == t


def test_the_default_model_under_lora_and_sdpa_fp32():
    """all-MiniLM-L6-v2 read by its first token, LoRA on key and value (the last layer's
    too), fp32 attention under bf16 autocast: the pruned path gives the full layer's logits
    and the LoRA factors' gradients."""
    from lorafit.config import RunConfig
    from lorafit.strategies import STRATEGIES

    loaded = load_model(None, seed=0, pooling="cls", attn_dropout=0.0)
    model = loaded.model
    assert pruned(model)
    STRATEGIES["lora"].setup(model, RunConfig(strategy="lora"))
    for p in model.parameters():  # B starts at zero: move it, so the adapters take part
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    texts = ["A slow start, then a film I could not stop watching. " * 6, "Dull.", "Fine acting, thin plot."]
    inputs = dict(loaded.tokenizer(texts, padding=True, return_tensors="pt"))
    inputs.pop("token_type_ids", None)

    def run(on: bool, attention: str, dtype=None):
        set_pruning(model, on)
        set_attention(model, attention)
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            logits = model(**inputs).logits.float()
        logits.square().sum().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    full, full_grads = run(False, "sdpa")
    logits, grads = run(True, "sdpa")
    torch.testing.assert_close(logits, full, rtol=1e-4, atol=1e-5)
    assert any("layer.5.attention.self.key" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], full_grads[name], rtol=1e-3, atol=1e-6, msg=name)
    bf16_full, _ = run(False, "sdpa-fp32", torch.bfloat16)
    bf16, _ = run(True, "sdpa-fp32", torch.bfloat16)
    torch.testing.assert_close(bf16, bf16_full, rtol=0.05, atol=0.02)  # bf16 matmuls round at other row counts
    assert rows_through_last_ffn(model, inputs) == 1


def test_only_inside_the_classifiers_own_forward():
    model = tiny("bert")
    prune_last_layer(model)
    inputs = batch()
    t = inputs["input_ids"].shape[1]
    with torch.no_grad():
        assert model.bert(**inputs).last_hidden_state.shape[1] == t  # the encoder called directly
        out = model(**inputs, output_hidden_states=True)
        assert out.hidden_states[-1].shape[1] == t  # asked for every token's states: the full layer
        with pytest.raises(Exception):
            model(input_ids=inputs["input_ids"][:, :0].float())  # a forward that fails half-way
        assert not model._lorafit_arm.armed  # ... leaves the layer disarmed
        assert model.bert(**inputs).last_hidden_state.shape[1] == t


def test_copies_are_independent_and_state_dict_unchanged():
    model = tiny("distilbert")
    keys = set(model.state_dict())
    prune_last_layer(model)
    assert prune_last_layer(model)  # idempotent
    assert set(model.state_dict()) == keys  # nothing added to what is saved
    twin = copy.deepcopy(model)
    inputs = batch()
    set_pruning(twin, False)
    assert rows_through_last_ffn(twin, inputs) == inputs["input_ids"].shape[1]
    assert rows_through_last_ffn(model, inputs) == 1


def test_mean_pooling_and_unknown_layers_keep_the_full_layer():
    assert not pruned(load_model(None, pooling="mean").model)  # the head reads every token
    assert pruned(load_model(None, pooling="cls").model)
    torch.manual_seed(0)
    mpnet = AutoModelForSequenceClassification.from_config(
        MPNetConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64))
    assert not prune_last_layer(mpnet) and not pruned(mpnet)  # relative position bias: not handled
    set_pruning(mpnet, False)  # a no-op there


def test_a_run_records_its_last_layer_and_loading_it_uses_the_record(tiny_model_dir, tmp_path):
    """A cls-pooled run trains and tests with the first-token last layer and records it;
    `lorafit evaluate` gives its exact test numbers; a run whose record says `full` (or
    that has no record: runs from before the first-token layer) loads with the full layer."""
    import json

    from cli_helpers import TINY as TINY_RUN
    from cli_helpers import lorafit, lorafit_here

    from lorafit.api import load_run
    from lorafit.first_token import last_layer_of

    run = tmp_path / "run"
    r = lorafit("train", "--model", str(tiny_model_dir), *TINY_RUN, "--pooling", "cls", "--out", str(run))
    assert r.returncode == 0 and "last layer first-token" in r.stdout, r.stderr[-2000:]
    final = json.loads((run / "final.json").read_text())
    config = json.loads((run / "config.json").read_text())
    assert config["last_layer_resolved"] == final["last_layer"] == "first-token"
    r = lorafit_here("evaluate", str(run), "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout)
    assert (got["test_accuracy"], got["test_loss"]) == (final["test_accuracy"], final["test_loss"])
    model = load_run(run).model
    assert last_layer_of(model) == "first-token"
    inputs = batch(vocab=1000)
    assert rows_through_last_ffn(model, inputs) == 1
    for record in ("full", None):
        if record is None:
            config.pop("last_layer_resolved")
        else:
            config["last_layer_resolved"] = record
        (run / "config.json").write_text(json.dumps(config))
        model = load_run(run).model
        assert last_layer_of(model) == "full"
        assert rows_through_last_ffn(model, inputs) == inputs["input_ids"].shape[1]


def test_last_layer_full_is_a_setting_and_bad_values_are_named():
    """`--last-layer` takes auto or full; anything else is refused, naming the setting and the choices."""
    from lorafit.config import RunConfig
    from lorafit.errors import ConfigError

    assert RunConfig().last_layer == "auto" and RunConfig(last_layer="full").last_layer == "full"
    with pytest.raises(ConfigError, match=r"last_layer \(--last-layer\) must be one of auto, full, got 'first'"):
        RunConfig(last_layer="first")
