"""lorafit: LoRA from scratch for pretrained transformer encoders, and a tool that
trains and compares fine-tuning strategies on text classification.

    lorafit.train(strategy="lora", out="runs/lora") -> RunResult; lorafit.compare(...); lorafit.sweep(...);
    lorafit.load_run(path).predict(texts); lorafit.export(run, out, format="onnx");
    LoRALinear, apply_lora, merge_lora, ...

The public API is what this module exports; everything else is private.
"""

from lorafit.adapter import load_adapter, save_adapter, save_adapters
from lorafit.api import CompareResult, Run, RunResult, SweepResult, compare, export, load_run, sweep, train
from lorafit.config import RunConfig
from lorafit.errors import LorafitError
from lorafit.lora import (
    LoRAConfig,
    LoRALinear,
    adapter_names,
    apply_lora,
    combine_adapters,
    count_parameters,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge_lora,
    route_adapters,
    set_active_adapter,
    unload_lora,
    unmerge_lora,
)
from lorafit.targets import target_presets

__version__ = "0.1.0"

__all__ = [
    "CompareResult",
    "LoRAConfig",
    "LoRALinear",
    "LorafitError",
    "Run",
    "RunConfig",
    "RunResult",
    "SweepResult",
    "adapter_names",
    "apply_lora",
    "combine_adapters",
    "compare",
    "export",
    "count_parameters",
    "load_adapter",
    "load_run",
    "lora_state_dict",
    "mark_only_lora_as_trainable",
    "merge_lora",
    "route_adapters",
    "save_adapter",
    "save_adapters",
    "set_active_adapter",
    "sweep",
    "target_presets",
    "train",
    "unload_lora",
    "unmerge_lora",
]
