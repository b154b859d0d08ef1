"""`--format hf`: a folder that transformers or sentence-transformers loads as it is.

First-token pooling is what transformers' `*ForSequenceClassification` heads read, so the
merged model is saved as one. Mean pooling is not: those heads read the first token, and
transformers has no pooling option. sentence-transformers does, and all-MiniLM-L6-v2 and
its kind already ship in its layout, so a mean-pooled run becomes

    ./                Transformer: the merged encoder (config.json, model.safetensors)
    1_Pooling/        Pooling by the attention-masked mean of the tokens
    2_Dense/          the head's first Linear and its activation (BERT: pooler.dense, Tanh)
    3_Dense/          the classifier (Identity)

and `SentenceTransformer(folder).encode(texts)` returns the run's logits, (N, num_labels).
The files follow the classic layout (module types `sentence_transformers.models.*`),
which sentence-transformers 2 and later read.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from lorafit.export_layout import detach_state, head_modules


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _write_dense(folder: Path, linear: nn.Linear, activation: type[nn.Module]) -> None:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "in_features": linear.in_features, "out_features": linear.out_features, "bias": linear.bias is not None,
        "activation_function": _qualified(activation)}, indent=2))
    save_file({f"linear.{k}": v for k, v in detach_state(linear).items()}, str(folder / "model.safetensors"))


def write_sentence_transformers(model: nn.Module, max_length: int, folder: Path) -> None:
    """`model` (a mean-pooled classifier, LoRA merged) as a sentence-transformers folder."""
    first, activation, second = head_modules(model)  # before any file: an unknown head is refused
    model.base_model.save_pretrained(folder, safe_serialization=True)
    hidden = first.in_features
    modules = [("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Dense", "Dense"), ("3_Dense", "Dense")]
    (folder / "modules.json").write_text(json.dumps([
        {"idx": i, "name": str(i), "path": path, "type": f"sentence_transformers.models.{kind}"}
        for i, (path, kind) in enumerate(modules)], indent=2))
    (folder / "sentence_bert_config.json").write_text(json.dumps(
        {"max_seq_length": max_length, "do_lower_case": False}, indent=2))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": hidden, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}, indent=2))
    _write_dense(folder / "2_Dense", first, activation)
    _write_dense(folder / "3_Dense", second, nn.Identity)


def write_hf(model: nn.Module, tokenizer, pooling: str, max_length: int, folder: Path) -> str:
    """Write `model` (LoRA merged) into `folder`; returns the layout: `transformers` or
    `sentence-transformers`. The tokenizer is the caller's to save."""
    if pooling == "mean":
        write_sentence_transformers(model, max_length, folder)
        return "sentence-transformers"
    model.save_pretrained(folder, safe_serialization=True)
    return "transformers"
