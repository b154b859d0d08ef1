"""LoRA, written from scratch: the config, the adapted layer and the model-level verbs.

Low-Rank Adaptation (Hu et al. 2021) freezes a pretrained weight W0 (out, in) and
learns a low-rank update:

    y = W0 x + b + s * B A dropout(x),   A: (r, in), B: (out, r), s = alpha / r

(or s = alpha / sqrt(r) with rsLoRA scaling). B starts at zero, so an adapted model
computes exactly what the base model computes until the first optimizer step.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.errors import ConfigError, TargetError
from lorafit.targets import resolve_targets

SCALINGS = ("standard", "rslora")


@dataclass
class LoRAConfig:
    """How LoRA adapts a model."""

    r: int = 4
    """Rank of the update B A (`--rank`); at least 1."""
    alpha: float = 8.0
    """Scale numerator (`--alpha`); > 0. The update is multiplied by alpha / r."""
    dropout: float = 0.0
    """Dropout on the LoRA branch's input (`--lora-dropout`); in [0, 1)."""
    targets: list[str] = field(default_factory=lambda: ["key", "value", "classifier"])
    """Modules to adapt (`--targets`): roles (query, key, value, output, ffn,
    classifier, head), module-name suffixes, or regexes. The default is the seed
    experiment's: attention key and value, and the last classifier layer."""
    scaling: str = "standard"
    """`standard` (alpha / r, Hu et al. 2021) or `rslora` (alpha / sqrt(r))."""
    train_modules: list[str] = field(default_factory=list)
    """Modules trained fully next to the adapters (PEFT's `modules_to_save`),
    e.g. a fresh classification head; same syntax as `targets`."""

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        if isinstance(self.train_modules, str):
            self.train_modules = [t.strip() for t in self.train_modules.split(",") if t.strip()]
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"r (--rank) must be an integer >= 1, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0 \
                or not math.isfinite(self.alpha):
            raise ConfigError(f"alpha (--alpha) must be a finite number > 0, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout (--lora-dropout) must be in [0, 1), got {self.dropout!r}")
        if self.scaling not in SCALINGS:
            raise ConfigError(f"scaling (--scaling) must be one of {', '.join(SCALINGS)}, got {self.scaling!r}")
        if not isinstance(self.targets, list) or not self.targets \
                or not all(isinstance(t, str) and t for t in self.targets):
            raise ConfigError(f"targets (--targets) must be a non-empty list of names, got {self.targets!r}")
        if not isinstance(self.train_modules, list) or not all(isinstance(t, str) and t for t in self.train_modules):
            raise ConfigError(f"train_modules must be a list of module names, got {self.train_modules!r}")

    @property
    def scale(self) -> float:
        """The factor s in y = W0 x + s B A x."""
        return lora_scale(self.r, self.alpha, self.scaling)


def lora_scale(r: int, alpha: float, scaling: str = "standard") -> float:
    """alpha / r (standard) or alpha / sqrt(r) (rsLoRA)."""
    return alpha / math.sqrt(r) if scaling == "rslora" else alpha / r


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update.

    forward: x (..., in) -> W0 x + b + s * B (A dropout(x)): (..., out).
    A (r, in) is Kaiming-uniform(a=sqrt 5), B (out, r) is zero, so at initialisation
    the output equals the base layer's exactly. A and B stay fp32 whatever the base
    dtype: with a bf16 or fp16 base (and no autocast) the adapter's input is cast to
    fp32 and its output back to the base's dtype; under `torch.autocast` the adapter's
    matmuls run in the autocast dtype. When `merged`, W0 holds W0 + s B A (computed in
    fp32, cast once) and forward is the base layer's single matmul.
    """

    def __init__(self, base: nn.Linear, r: int = 4, alpha: float = 8.0, dropout: float = 0.0,
                 scaling: str = "standard") -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TargetError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.r = r
        self.alpha = alpha
        self.scaling_mode = scaling
        self.scaling = lora_scale(r, alpha, scaling)
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        # nn.Identity returns its input as is: no copy when dropout is 0.
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def reconfigure(self, alpha: float, scaling: str, dropout: float) -> None:
        """Take another adapter's alpha, scaling mode and dropout (same rank), e.g. when
        `load_adapter` loads a file into this layer.

        Raises:
            RuntimeError: the layer is merged (its W0 holds the old scaling's update).
        """
        if self.merged:
            raise RuntimeError("the LoRA layer is merged; call unmerge_lora(model) before changing its scaling")
        self.alpha, self.scaling_mode = alpha, scaling
        self.scaling = lora_scale(self.r, alpha, scaling)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: LoRAConfig) -> "LoRALinear":
        """Wrap `linear` with the rank, alpha, dropout and scaling of `config`."""
        return cls(linear, r=config.r, alpha=config.alpha, dropout=config.dropout, scaling=config.scaling)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta_weight(self) -> torch.Tensor:
        """s * B @ A: (out, in), fp32."""
        return self.scaling * (self.lora_B @ self.lora_A)

    @torch.no_grad()
    def merge(self) -> None:
        """W0 <- W0 + s B A. Idempotent: merging a merged layer changes nothing."""
        if self.merged:
            return
        delta = self.delta_weight()
        if not torch.isfinite(delta).all():
            raise FloatingPointError(
                "NaNs or infs in the LoRA update; the adapter diverged. Retrain with a lower learning rate."
            )
        w = self.base.weight
        w.copy_((w.float() + delta).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W0 <- W0 - s B A. Idempotent: unmerging an unmerged layer changes nothing."""
        if not self.merged:
            return
        w = self.base.weight
        w.copy_((w.float() - self.delta_weight()).to(w.dtype))
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (..., out)
        if self.merged:
            if torch.is_grad_enabled() and self.lora_A.requires_grad and self.training:
                raise RuntimeError("LoRA weights are merged; call unmerge_lora(model) before training")
            return y
        x = self.dropout(x)
        if x.dtype != self.lora_A.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.dtype)  # a bf16/fp16 base: the adapter computes in fp32
        h = F.linear(x, self.lora_A)  # (..., r)
        return y + (F.linear(h, self.lora_B) * self.scaling).to(y.dtype)  # (..., out)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """(dotted name, layer) for every LoRALinear in `model`."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def apply_lora(model: nn.Module, config: LoRAConfig) -> int:
    """Wrap every target `nn.Linear` of `model` in a LoRALinear, in place; return how many.

    Afterwards only the LoRA parameters and `config.train_modules` are trainable
    (see `mark_only_lora_as_trainable`).

    Raises:
        TargetError: a target matches nothing (the message lists the model's Linear
            names), a matched module is not an `nn.Linear`, a module is both a target
            and in `train_modules`, or the model already has LoRA applied.
    """
    if any(True for _ in lora_modules(model)):
        raise TargetError(
            "this model already has LoRA applied; call unload_lora(model) first or start from a fresh model"
        )
    names = resolve_targets(model, config.targets)
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise TargetError(
                f"LoRA target {name!r} is a {type(module).__name__}, not an nn.Linear; "
                "LoRA adapts Linear layers only: name a Linear inside it instead"
            )
    train_names = resolve_targets(model, config.train_modules, what="train module") if config.train_modules else []
    for t in train_names:
        clash = [n for n in names if n == t or n.startswith(t + ".")]
        if clash:
            raise TargetError(
                f"{clash[0]!r} is both a LoRA target and inside train module {t!r}; "
                "a module either gets an adapter or trains fully: remove it from one of the two"
            )
    for name in names:
        _set_submodule(model, name, LoRALinear.from_linear(model.get_submodule(name), config))
    model.lora_config = config  # read by save_adapter and mark_only_lora_as_trainable
    model.lora_train_modules = train_names
    mark_only_lora_as_trainable(model, config)
    return len(names)


def mark_only_lora_as_trainable(model: nn.Module, config: LoRAConfig | None = None) -> None:
    """Freeze every parameter except LoRA's A and B and those of `config.train_modules`."""
    config = config or getattr(model, "lora_config", None)
    train_names = resolve_targets(model, config.train_modules, what="train module") \
        if config is not None and config.train_modules else []
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in lora_modules(model):
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
    for name in train_names:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) parameters count once."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def merge_lora(model: nn.Module) -> None:
    """Merge every adapter into its base weight (idempotent)."""
    for _, layer in lora_modules(model):
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Take every merged adapter back out of its base weight (idempotent)."""
    for _, layer in lora_modules(model):
        layer.unmerge()


def unload_lora(model: nn.Module) -> nn.Module:
    """Merge the adapters and put the plain `nn.Linear`s back; returns `model`.

    The result has no LoRA module left, so inference costs exactly the base model's.
    """
    for name, layer in list(lora_modules(model)):
        layer.merge()
        _set_submodule(model, name, layer.base)
    for attr in ("lora_config", "lora_train_modules"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What an adapter holds: every LoRA A and B and the parameters of the train modules.

    Keys are `model.named_parameters()` names (`...key.lora_A`, `classifier.weight`).
    """
    train_names = getattr(model, "lora_train_modules", [])
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        is_lora = name.endswith(".lora_A") or name.endswith(".lora_B")
        in_train = any(name.startswith(t + ".") for t in train_names)
        if is_lora or in_train:
            out[name] = p.detach()
    return out
