"""What lorafit knows about each transformers architecture, in one table.

One `Architecture` per `config.model_type`: the LoRA target presets (role -> regex over
dotted module names), the classification head as the frozen-prefix cache re-applies it,
which first-token last layer applies, where the encoder sits for mean pooling, and the
positions a model reserves before the first token. targets, feature_cache, first_token,
pooling and runs read it; an architecture not listed gets the fallbacks (`GENERIC_ROLES`,
no cache, the whole last layer). Adding one is an entry here plus a tiny-config case in
tests/test_architectures.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

_LAYER = r"(?:.*\.)?"  # any prefix ending in a dot, or none


@dataclass(frozen=True)
class Head:
    """The two-layer classification head: first Linear, activation, second Linear."""

    activation: type[nn.Module]
    dropout_before: bool
    """Dropout on the head's input as well as between its layers (RoBERTa's head)."""
    dropout_keys: tuple[str, ...]
    """Config attributes giving the head's dropout probability; the first not None wins."""


@dataclass(frozen=True)
class Architecture:
    roles: dict[str, str] | None
    """LoRA target role -> regex (fullmatch on dotted module names); None: `GENERIC_ROLES`.
    `pooler` is the head's first layer (what the head reads -> the classifier's input)."""
    head: Head | None = None
    """None: the frozen-prefix cache does not know this head, and the plain path trains it."""
    first_token: str | None = None
    """The first-token last layer lorafit has for it: `bert`, `distilbert`, or None (the whole layer)."""
    encoder: str = "encoder"
    """The attribute of `model.base_model` holding the encoder, whose output mean pooling reads."""
    position_offset: int = 0
    """Positions the embeddings reserve before the first token (RoBERTa, MPNet: the padding index and one)."""


_BERT_ROLES = {
    "query": _LAYER + r"attention\.self\.query",
    "key": _LAYER + r"attention\.self\.key",
    "value": _LAYER + r"attention\.self\.value",
    "output": _LAYER + r"attention\.output\.dense",
    "ffn": _LAYER + r"layer\.\d+\.(?:intermediate|output)\.dense",
}
_TANH = Head(nn.Tanh, dropout_before=False, dropout_keys=("classifier_dropout", "hidden_dropout_prob"))
_ROBERTA = Architecture(
    roles={**_BERT_ROLES, "pooler": r"classifier\.dense", "classifier": r"classifier\.out_proj",
           "head": r"classifier\.(?:dense|out_proj)"},
    head=Head(nn.Tanh, dropout_before=True, dropout_keys=("classifier_dropout", "hidden_dropout_prob")),
    first_token="bert", position_offset=2)

ARCHITECTURES: dict[str, Architecture] = {
    "bert": Architecture(
        roles={**_BERT_ROLES, "pooler": _LAYER + r"pooler\.dense", "classifier": r"classifier",
               "head": _LAYER + r"pooler\.dense|classifier"},
        head=_TANH, first_token="bert"),
    "distilbert": Architecture(
        roles={
            "query": _LAYER + r"attention\.q_lin",
            "key": _LAYER + r"attention\.k_lin",
            "value": _LAYER + r"attention\.v_lin",
            "output": _LAYER + r"attention\.out_lin",
            "ffn": _LAYER + r"ffn\.lin[12]",
            "pooler": r"pre_classifier",
            "classifier": r"classifier",
            "head": r"pre_classifier|classifier",
        },
        head=Head(nn.ReLU, dropout_before=False, dropout_keys=("seq_classif_dropout",)),
        first_token="distilbert", encoder="transformer"),
    "roberta": _ROBERTA,
    "xlm-roberta": _ROBERTA,
    "camembert": _ROBERTA,
    "mpnet": Architecture(  # its attention takes a relative position bias: no first-token layer
        roles={
            "query": _LAYER + r"attention\.attn\.q",
            "key": _LAYER + r"attention\.attn\.k",
            "value": _LAYER + r"attention\.attn\.v",
            "output": _LAYER + r"attention\.attn\.o",
            "ffn": _LAYER + r"layer\.\d+\.(?:intermediate|output)\.dense",
            "pooler": r"classifier\.dense",
            "classifier": r"classifier\.out_proj",
            "head": r"classifier\.(?:dense|out_proj)",
        },
        head=Head(nn.Tanh, dropout_before=True, dropout_keys=("hidden_dropout_prob",)), position_offset=2),
    "electra": Architecture(roles=None, first_token="bert"),  # its BERT layers, its own GELU head
}

GENERIC_ROLES = {
    "query": _LAYER + r"(?:q_proj|query|q_lin|q)",
    "key": _LAYER + r"(?:k_proj|key|k_lin|k)",
    "value": _LAYER + r"(?:v_proj|value|v_lin|v)",
    "output": _LAYER + r"(?:o_proj|out_proj|out_lin|attention\.output\.dense)",
}
"""Roles for an architecture not in the table: the usual projection names (the classifier
is then found by its output size, `targets._classifier_fallback`)."""

_UNKNOWN = Architecture(roles=None)


def architecture(model_or_type: nn.Module | str | None) -> Architecture:
    """The table's entry for a model (its `config.model_type`) or a model type; the fallbacks
    for one it does not hold."""
    kind = model_or_type if isinstance(model_or_type, str) or model_or_type is None else getattr(
        getattr(model_or_type, "config", None), "model_type", None)
    return ARCHITECTURES.get(kind, _UNKNOWN)
