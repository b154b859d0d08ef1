"""Loading an export folder (lorafit.export) back, so `lorafit predict` and `evaluate`
check the exported artifact itself, through the library that serves it: transformers,
sentence-transformers or ONNX Runtime. Each is wrapped as a module that takes a padded
batch (input_ids, attention_mask: (B, T)) and returns its logits (B, num_labels), which
is what lorafit's own prediction loop feeds a run's model.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from lorafit.errors import LorafitError, RunDirError
from lorafit.export_layout import EXPORT_FILE


def is_export(path: str | Path) -> bool:
    """True for a folder written by lorafit.export."""
    return (Path(path) / EXPORT_FILE).is_file()


def read_export_info(path: Path) -> dict:
    try:
        return json.loads((path / EXPORT_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunDirError(f"{path / EXPORT_FILE} is corrupt ({exc}); export the run again") from None


class _SentenceTransformersLogits(nn.Module):
    def __init__(self, folder: Path, num_labels: int) -> None:
        super().__init__()
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise LorafitError(f"{folder} is a sentence-transformers folder; reading it needs that library: "
                               "pip install 'lorafit[sentence-transformers]'") from None
        self.st = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
        self.num_labels = num_labels

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_) -> SimpleNamespace:
        features = {"input_ids": input_ids, "attention_mask": attention_mask,
                    "token_type_ids": torch.zeros_like(input_ids)}
        return SimpleNamespace(logits=self.st(features)["sentence_embedding"])


class _OnnxLogits(nn.Module):
    def __init__(self, path: Path, inputs: list[str], num_labels: int) -> None:
        super().__init__()
        from lorafit.export_onnx import require_onnxruntime

        ort = require_onnxruntime()
        if not path.is_file():
            raise RunDirError(f"{path} is missing; export the run again")
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.inputs = inputs
        self.num_labels = num_labels

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_) -> SimpleNamespace:
        given = {"input_ids": input_ids, "attention_mask": attention_mask,
                 "token_type_ids": torch.zeros_like(input_ids)}
        feed = {n: given[n].cpu().long().numpy() for n in self.inputs}
        return SimpleNamespace(logits=torch.from_numpy(self.session.run(["logits"], feed)[0]))


def export_model(path: Path, info: dict, variant: str = "fp32") -> nn.Module:
    """The export's classifier through its own library, as a logits module (eval mode)."""
    num_labels = len(info["label_names"])
    if info["layout"] == "onnx":
        files = info.get("onnx_files", {})
        if variant not in files:
            raise RunDirError(f"{path} has no {variant} graph (it holds: {', '.join(files)}); export it again with "
                              "--quantize int8")
        return _OnnxLogits(path / files[variant], info["inputs"], num_labels).eval()
    if variant != "fp32":
        raise LorafitError(f"--{variant} applies to ONNX exports; {path} is a {info['layout']} folder")
    if info["layout"] == "sentence-transformers":
        return _SentenceTransformersLogits(path, num_labels).eval()
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True).eval()


def load_export(path: Path, variant: str = "fp32") -> tuple:
    """(config, logits module, tokenizer, label names, pooling) of an export folder, its model
    computing in fp32 through the export's library; `variant` `int8` picks an ONNX export's
    quantized graph. lorafit.load_run makes a `Run` of them."""
    from transformers import AutoTokenizer

    from lorafit.runs import config_of

    info = read_export_info(path)
    cfg = config_of(info["run_config"], path / EXPORT_FILE)
    tokenizer = AutoTokenizer.from_pretrained(path, use_fast=True, local_files_only=True)
    return cfg, export_model(path, info, variant), tokenizer, list(info["label_names"]), info["pooling"]
