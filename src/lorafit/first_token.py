"""The last encoder layer computes only the first token when the head reads only that.

A classifier whose head reads the first token (`--pooling cls`: BERT's pooler,
DistilBERT's pre_classifier, RoBERTa's dense) uses one row of the last layer's output.
In that layer every other row's query, attention, output projection and feed-forward
block is computed and thrown away; only the keys and values need every token. So in the
classifier's own forward the last layer runs

    q = W_q h[:, :1]          (B, 1, H)      k, v = W_k h, W_v h     (B, T, H)
    x = LayerNorm(W_o attend(q, k, v) + h[:, :1])                    (B, 1, H)
    out = LayerNorm(FFN(x) + x)                                      (B, 1, H)

and the encoder's last hidden state is (B, 1, H) instead of (B, T, H). This is the same
arithmetic per row as the full layer (each row's query, projections, LayerNorm and
feed-forward block depend on that row alone), so the logits agree to float rounding; it
saves about 14% of a 6-layer encoder's FLOPs at 256 tokens (the last layer's work less
its key and value projections), in training and in inference.

It is armed only inside the classification model's own forward, and not when that
forward is asked for hidden states or attentions, so calling the encoder directly
(`model.bert(...)`) still gives every token. Architectures: BERT-style layers (BERT,
MiniLM, RoBERTa, XLM-RoBERTa, CamemBERT, ELECTRA) and DistilBERT; others (MPNet, whose
attention takes a relative position bias, and any unknown layer) run the full layer.
The attention goes through the model's attention interface (sdpa, eager, or lorafit's
sdpa-fp32), with its dropout; other interfaces (flash, flex) run the full layer.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable

import torch
from torch import nn

from lorafit.architectures import architecture

_ENCODER_DECODER = ("cache", "encoder_hidden_states", "encoder_attention_mask")  # None here, not for attention
_INTERFACES = ("sdpa", "eager", "lorafit_sdpa_fp32")  # the last: lorafit.attention's sdpa-fp32
LAST_LAYERS = ("auto", "full")
"""`--last-layer`: auto (first-token where the model and head allow it) or full."""


class _Arm:
    """Whether the classifier's forward in flight may prune its last layer; shared by the
    model (whose hooks set it) and the layer (which reads it), and copied with them."""

    def __init__(self) -> None:
        self.armed = False
        self.enabled = True


def _attend(attn: nn.Module, q_lin: nn.Module, k_lin: nn.Module, v_lin: nn.Module, hidden: torch.Tensor,
            mask: torch.Tensor | None, kwargs: dict) -> torch.Tensor:
    """The first token's attention over every token: hidden (B, T, H) -> (B, 1, H).

    `mask` is the encoder's prepared mask: None, or (B, 1, T or 1, T) (bool or additive);
    its query dimension is cut to the first row."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    b, t, _ = hidden.shape
    d = attn.attention_head_size
    q = q_lin(hidden[:, :1]).view(b, 1, -1, d).transpose(1, 2)  # (B, heads, 1, d)
    k = k_lin(hidden).view(b, t, -1, d).transpose(1, 2)  # (B, heads, T, d)
    v = v_lin(hidden).view(b, t, -1, d).transpose(1, 2)
    if mask is not None and mask.dim() == 4 and mask.shape[-2] > 1:
        mask = mask[:, :, :1]  # (B, 1, 1, T)
    eager = sys.modules[type(attn).__module__].eager_attention_forward
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager)
    out, _ = interface(attn, q, k, v, mask, dropout=attn.dropout.p if attn.training else 0.0,
                       scaling=attn.scaling, **kwargs)  # (B, 1, heads, d)
    return out.reshape(b, 1, -1)


def _bert_layer(layer: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None, kwargs: dict) -> torch.Tensor:
    """BertLayer (and its copies) on the first token: (B, T, H) -> (B, 1, H)."""
    s = layer.attention.self
    x = layer.attention.output(_attend(s, s.query, s.key, s.value, hidden, mask, kwargs), hidden[:, :1])
    return layer.output(layer.intermediate(x), x)


def _distilbert_layer(layer: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None,
                      kwargs: dict) -> torch.Tensor:
    """DistilBERT's TransformerBlock on the first token: (B, T, H) -> (B, 1, H)."""
    a = layer.attention
    x = layer.sa_layer_norm(a.out_lin(_attend(a, a.q_lin, a.k_lin, a.v_lin, hidden, mask, kwargs)) + hidden[:, :1])
    return layer.output_layer_norm(layer.ffn(x) + x)


def _last_layer(model: nn.Module) -> tuple[nn.Module, Callable] | None:
    """The last encoder layer and its first-token forward, or None where lorafit has none."""
    kind = architecture(model).first_token
    base = model.base_model
    if kind == "bert":
        if getattr(model.config, "is_decoder", False) or getattr(model.config, "add_cross_attention", False):
            return None
        if getattr(model.config, "position_embedding_type", "absolute") not in (None, "absolute"):
            return None
        layers, forward = getattr(getattr(base, "encoder", None), "layer", None), _bert_layer
        needs = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output",
                 "intermediate", "output")
    elif kind == "distilbert":
        layers, forward = getattr(getattr(base, "transformer", None), "layer", None), _distilbert_layer
        needs = ("attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin", "sa_layer_norm", "ffn",
                 "output_layer_norm")
    else:
        return None
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        return None
    layer = layers[-1]
    try:
        for name in needs:
            layer.get_submodule(name)
    except AttributeError:
        return None
    return layer, forward


def _attention_of(layer: nn.Module) -> nn.Module:
    """The layer's self-attention module (the one handed to the attention interface)."""
    return layer.attention.self if hasattr(layer.attention, "self") else layer.attention


def _layer_forward(self: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   *args, **kwargs) -> torch.Tensor:
    """The patched last layer: the first token only while armed, else the layer's own forward."""
    if (self._lorafit_arm.armed and all(a is None for a in args)  # BERT passes encoder_hidden_states=None
            and kwargs.get("cache") is None and kwargs.get("encoder_hidden_states") is None
            and not getattr(self, "gradient_checkpointing", False)
            and _attention_of(self).config._attn_implementation in _INTERFACES):
        rest = {k: v for k, v in kwargs.items() if k not in _ENCODER_DECODER}
        return self._lorafit_first_token(self, hidden_states, attention_mask, rest)
    return type(self).forward(self, hidden_states, attention_mask, *args, **kwargs)


def _arm(model: nn.Module, _args: tuple, kwargs: dict) -> None:
    config = model.config
    wants_all = (kwargs.get("output_hidden_states") or kwargs.get("output_attentions")
                 or getattr(config, "output_hidden_states", False) or getattr(config, "output_attentions", False))
    model._lorafit_arm.armed = model._lorafit_arm.enabled and not wants_all


def _disarm(model: nn.Module, _args: tuple, _kwargs: dict, _output) -> None:
    model._lorafit_arm.armed = False


def prune_last_layer(model: nn.Module) -> bool:
    """Make `model` (a first-token `*ForSequenceClassification`) compute its last layer
    for the first token only, inside its own forward; idempotent. Returns whether it did
    (False: an architecture lorafit has no first-token layer for, left unchanged)."""
    if pruned(model):
        return True
    found = _last_layer(model)
    if found is None:
        return False
    layer, forward = found
    arm = _Arm()
    model._lorafit_arm = arm  # plain attributes: not parameters, not in the state dict
    layer._lorafit_arm = arm
    layer._lorafit_first_token = forward
    layer.forward = types.MethodType(_layer_forward, layer)
    model.register_forward_pre_hook(_arm, with_kwargs=True)
    model.register_forward_hook(_disarm, with_kwargs=True, always_call=True)
    return True


def pruned(model: nn.Module) -> bool:
    """True when `model`'s last layer computes the first token only in its forward."""
    return isinstance(getattr(model, "_lorafit_arm", None), _Arm)


def set_pruning(model: nn.Module, on: bool) -> None:
    """Switch a pruned model's first-token last layer on or off (off: the full layer, as
    transformers computes it); a no-op on a model `prune_last_layer` left unchanged."""
    if pruned(model):
        model._lorafit_arm.enabled = bool(on)


def last_layer_of(model: nn.Module) -> str:
    """`first-token` where `model`'s forward computes its last layer for the first token
    only, else `full`: what a run records as `last_layer_resolved`."""
    return "first-token" if pruned(model) and model._lorafit_arm.enabled else "full"
