"""What the classification head reads: the first token (BERT's own head) or the mean of
the tokens (how sentence-transformers models such as all-MiniLM-L6-v2 were trained).

    auto   the model folder's sentence-transformers pooling config (1_Pooling/config.json)
           where it has one, else the architecture's own head (cls)
    cls    the first token's last hidden state, as transformers' heads read it
    mean   the attention-masked mean of the last hidden states

Mean pooling puts the masked mean where the head reads the first token, so every
architecture's own head (BERT: pooler.dense, tanh, classifier; DistilBERT:
pre_classifier, classifier; RoBERTa/MPNet: dense, out_proj) runs on it unchanged, and the
head's "two last layers" stay the same two layers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from lorafit.architectures import architecture
from lorafit.errors import ConfigError

POOLINGS = ("auto", "cls", "mean")

def _sentence_transformers_pooling(source: str) -> dict | None:
    """The pooling config of a sentence-transformers model folder or hub name, if it has one."""
    folder = Path(source)
    if folder.is_dir():
        modules = folder / "modules.json"
        sub = "1_Pooling"
        if modules.exists():
            try:
                sub = next((m["path"] for m in json.loads(modules.read_text())
                            if m.get("type", "").endswith("Pooling")), sub)
            except (json.JSONDecodeError, TypeError, KeyError):
                pass
        path = folder / sub / "config.json"
        return json.loads(path.read_text()) if path.exists() else None
    try:  # a hub name: only what is already in the local cache (no network at this point)
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(source, "1_Pooling/config.json")
        return json.loads(Path(path).read_text()) if isinstance(path, str) else None
    except Exception:  # noqa: BLE001 - no cache, no config: the architecture's own head
        return None


def resolve_pooling(pooling: str, source: str) -> str:
    """`auto` -> `mean` where the model's sentence-transformers config pools by mean, else `cls`."""
    if pooling != "auto":
        return pooling
    st = _sentence_transformers_pooling(source)
    return "mean" if st and st.get("pooling_mode_mean_tokens") else "cls"


def _encoder(model: nn.Module) -> nn.Module:
    base = model.base_model
    for name in (architecture(model).encoder, "encoder", "transformer"):  # the table's; else the usual names
        module = getattr(base, name, None)
        if isinstance(module, nn.Module):
            return module
    raise ConfigError(f"--pooling mean: lorafit does not know where this {model.config.model_type} model's encoder "
                      "ends; use --pooling cls")


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, T, H), (B, T) of 0/1 -> (B, H): the mean over the positions the mask keeps, in fp32."""
    h = hidden.float()
    if mask is None:
        return h.mean(1)
    m = mask.to(h.dtype).unsqueeze(-1)  # (B, T, 1)
    return (h * m).sum(1) / m.sum(1).clamp(min=1e-9)


class _MaskSlot:
    """The attention mask of the forward in flight, shared by a model and its encoder.

    It lives on the model (`_lorafit_mask`), so `copy.deepcopy` gives a copy its own slot
    and its own pooling state, and two copies never read each other's mask.
    """

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None


def _keep_mask(model: nn.Module, args: tuple, kwargs: dict) -> None:
    model._lorafit_mask.mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)


def _first_token_is_mean(encoder: nn.Module, _args: tuple, output):
    hidden = output[0]  # (B, T, H)
    slot = encoder._lorafit_mask
    mean = masked_mean(hidden, slot.mask).to(hidden.dtype)
    slot.mask = None  # do not keep the batch's mask alive after its forward
    pooled = torch.cat([mean.unsqueeze(1), hidden[:, 1:]], dim=1)
    if isinstance(output, tuple):
        return (pooled, *output[1:])
    output["last_hidden_state"] = pooled
    return output


def apply_pooling(model: nn.Module, pooling: str) -> None:
    """Make `model`'s head read what `pooling` (`cls` or `mean`) names; idempotent, also on
    a `copy.deepcopy` of a mean-pooled model (the copy carries its hooks and its own state).

    Raises:
        ConfigError: mean pooling on an architecture whose encoder output lorafit cannot find.
    """
    if pooling == "cls" or pooling_of(model) == "mean":
        return
    encoder = _encoder(model)
    slot = _MaskSlot()
    model._lorafit_mask = slot  # plain attributes: not parameters, not in the state dict
    encoder._lorafit_mask = slot
    model.register_forward_pre_hook(_keep_mask, with_kwargs=True)
    encoder.register_forward_hook(_first_token_is_mean)


def pooling_of(model: nn.Module) -> str:
    """`mean` or `cls`: what `model`'s head reads."""
    return "mean" if isinstance(getattr(model, "_lorafit_mask", None), _MaskSlot) else "cls"
