"""What an export folder holds (file names) and what exporting reads off a model (its head)."""

from __future__ import annotations

import torch
from torch import nn

from lorafit.errors import ConfigError

EXPORT_FILE = "lorafit.json"
"""What lorafit needs to evaluate an export on its run's test split: the run's config, labels, layout."""
LABELS_FILE = "labels.json"
ONNX_FILE = "model.onnx"
ONNX_INT8_FILE = "model_int8.onnx"


def head_modules(model: nn.Module) -> tuple[nn.Linear, type[nn.Module], nn.Linear]:
    """The classification head's first Linear, its activation and its second Linear.

    Raises:
        ConfigError: an architecture whose head lorafit does not know.
    """
    from lorafit.architectures import architecture
    from lorafit.strategies import head_layers

    arch = architecture(model)
    names = head_layers(model)
    if arch.head is None or len(names) != 2:
        raise ConfigError(f"lorafit does not know the classification head of {model.config.model_type} models, so it "
                          "cannot write a mean-pooled one outside lorafit; train with --pooling cls, or export "
                          "--format onnx")
    first, second = (model.get_submodule(n) for n in names)
    return first, arch.head.activation, second


def detach_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
