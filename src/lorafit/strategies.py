"""Fine-tuning strategies as data: each decides what trains, and its default learning rate.

- `full`: every parameter trains.
- `last-two-layers`: everything frozen but the two last Linear layers of the
  classification head (DistilBERT: pre_classifier, classifier; BERT/MiniLM: pooler.dense,
  classifier; RoBERTa/MPNet: classifier.dense, classifier.out_proj).
- `lora`: LoRA adapters (default r=4, alpha=8 on key, value and the last classifier
  layer); nothing else trains, unless `train_head` trains the classifier fully.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from lorafit.config import RunConfig
from lorafit.lora import LoRAConfig, apply_lora
from lorafit.targets import linear_names, target_presets


@dataclass(frozen=True)
class Strategy:
    """One way to fine-tune."""

    name: str
    default_lr: float
    """Peak learning rate when --lr is not given (chosen on the validation split; see README)."""
    setup: Callable[[nn.Module, RunConfig], None]
    """Sets requires_grad (and applies LoRA) on a freshly loaded model, in place."""
    description: str


def head_layers(model: nn.Module) -> list[str]:
    """The two last Linear layers of the classification head."""
    head = target_presets(model).get("head", [])
    return head if len(head) == 2 else linear_names(model)[-2:]


def _setup_full(model: nn.Module, cfg: RunConfig) -> None:
    for p in model.parameters():
        p.requires_grad_(True)


def _setup_last_two(model: nn.Module, cfg: RunConfig) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    for name in head_layers(model):
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)


def lora_config(cfg: RunConfig) -> LoRAConfig:
    """The LoRAConfig a run's settings describe (`train_head` moves the classifier to train_modules)."""
    targets = [t for t in cfg.targets if not (cfg.train_head and t == "classifier")]
    return LoRAConfig(r=cfg.rank, alpha=cfg.alpha, dropout=cfg.lora_dropout, targets=targets or ["key", "value"],
                      scaling=cfg.scaling, train_modules=["classifier"] if cfg.train_head else [])


def _setup_lora(model: nn.Module, cfg: RunConfig) -> None:
    apply_lora(model, lora_config(cfg))


STRATEGIES: dict[str, Strategy] = {
    s.name: s for s in [
        Strategy("full", 5e-5, _setup_full, "every parameter trains"),
        Strategy("last-two-layers", 1e-2, _setup_last_two, "only the two last layers of the head train"),
        Strategy("lora", 2e-3, _setup_lora, "LoRA adapters train; the pretrained weights stay frozen"),
    ]
}


def learning_rate(cfg: RunConfig) -> float:
    """--lr, or the strategy's default."""
    return cfg.lr if cfg.lr is not None else STRATEGIES[cfg.strategy].default_lr
