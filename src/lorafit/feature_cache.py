"""Frozen-prefix caching: when only the classification head trains, run the frozen
encoder once per example and train the head on the cached features for every epoch.

The features are the input of the head's first Linear (the [CLS] / first-token hidden
state), computed in eval mode, so the frozen encoder runs without dropout; the head
keeps its own dropout. `HeadOnCache` applies the head exactly as the model does, sharing
the model's Linear modules, so training it trains the model's head.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from lorafit import distributed
from lorafit.architectures import architecture
from lorafit.data.batching import bucketed_batches, padding_efficiency
from lorafit.data.encoding import Encoded
from lorafit.dropout import FastDropout
from lorafit.lora import LoRALinear

def _dropout_p(config, keys: tuple[str, ...]) -> float:
    for k in keys:
        v = getattr(config, k, None)
        if v is not None:
            return float(v)
    return 0.0


class HeadOnCache(nn.Module):
    """The model's two-layer head applied to cached features: (B, H) -> logits (B, num_labels)."""

    def __init__(self, model: nn.Module, first: str, second: str) -> None:
        super().__init__()
        head = architecture(model).head
        p = _dropout_p(model.config, head.dropout_keys)
        self.first = model.get_submodule(first)  # shared with the model: training this trains it
        self.second = model.get_submodule(second)
        self.num_labels = model.num_labels
        self.act = head.activation()
        self.drop_in = FastDropout(p) if head.dropout_before else nn.Identity()
        self.drop_mid = FastDropout(p)

    def forward(self, features: torch.Tensor) -> SequenceClassifierOutput:
        h = self.act(self.first(self.drop_in(features)))  # (B, H)
        return SequenceClassifierOutput(logits=self.second(self.drop_mid(h)))  # (B, num_labels)


def cacheable_head(model: nn.Module, head: list[str]) -> bool:
    """True when every trainable parameter sits in the two head layers of a known architecture."""
    if architecture(model).head is None or len(head) != 2:
        return False
    inside = {id(p) for name in head for p in model.get_submodule(name).parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    return bool(trainable) and all(id(p) in inside for p in trainable)


@dataclass
class FeatureSet:
    """Cached head inputs of a split; quacks like `Encoded` for the training loop."""

    features: torch.Tensor
    """(N, H) fp32."""
    labels: np.ndarray
    """(N,) int64."""
    lengths: np.ndarray
    """(N,) token counts of the original examples (for tokens/s)."""
    cached: bool = True

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, b: np.ndarray, pad_id: int) -> dict[str, torch.Tensor]:
        return {"features": self.features[torch.from_numpy(b)]}

    def padding_efficiency(self, batches: list[np.ndarray]) -> float:
        """Of the original examples' tokens, padded to each batch's longest (as the encoder would see them)."""
        return padding_efficiency(self.lengths, batches)


@torch.no_grad()
def extract_features(model: nn.Module, first: str, enc: Encoded, *, batch_size: int, pad_id: int,
                     device: torch.device, precision: str) -> FeatureSet:
    """Run the frozen encoder once (eval mode) and keep the input of head layer `first`."""
    from lorafit.training import autocast, to_device

    layer = model.get_submodule(first)
    if isinstance(layer, LoRALinear):
        layer = layer.base
    grabbed: list[torch.Tensor] = []

    def hook(_module, args):
        grabbed.append(args[0].detach().float())

    was_training = model.training
    model.eval()
    handle = layer.register_forward_pre_hook(hook)
    out = np.zeros((len(enc), layer.in_features), dtype=np.float32)  # (N, H)
    try:  # in a distributed job each rank runs its share of the batches; the rows are gathered below
        for b in distributed.my_batches(bucketed_batches(enc.lengths, batch_size, seed=0, shuffle=False)):
            grabbed.clear()
            with autocast(device, precision):
                model(**to_device(enc.batch(b, pad_id), device))
            out[b] = grabbed[0].cpu().numpy()  # (B, H)
    finally:
        handle.remove()
        model.train(was_training)
    return FeatureSet(torch.from_numpy(distributed.gather_rows(out)), enc.labels.copy(), enc.lengths.copy())
