"""LoRA, written from scratch: the config, one adapter, the adapted layer and the model-level verbs.

Low-Rank Adaptation (Hu et al. 2021) freezes a pretrained weight W0 (out, in) and
learns a low-rank update:

    y = W0 x + b + s * B A dropout(x),   A: (r, in), B: (out, r), s = alpha / r

(or s = alpha / sqrt(r) with rsLoRA scaling). B starts at zero, so an adapted model
computes exactly what the base model computes until the first optimizer step.

Variants are small additions to this core:

- DoRA (Liu et al. 2024, `use_dora`): W' = m * (W0 + sBA) / ||W0 + sBA||, the norm per
  output row and detached from the graph (the paper's section 4.3); m starts at ||W0||.
- PiSSA (Meng et al. 2024, `init="pissa"`): A and B start from the top-r singular
  vectors of W0, and the base keeps the residual W0 - sBA.
- Several named adapters per layer: one or more are active, each with a weight; the
  layer adds the weighted sum of their updates.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.dropout import FastDropout
from lorafit.errors import ConfigError, TargetError
from lorafit.targets import resolve_targets

SCALINGS = ("standard", "rslora")
INITS = ("kaiming", "gaussian", "pissa")
DEFAULT_ADAPTER = "default"


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
    use_dora: bool = False
    """DoRA (`--dora`): learn a magnitude per output row next to the low-rank direction update."""
    init: str = "kaiming"
    """How A and B start (`--init`): `kaiming` (A Kaiming-uniform, B zero), `gaussian`
    (A ~ N(0, 1/r), B zero), or `pissa` (the top-r singular vectors of W0; the base keeps the residual)."""

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
        if self.init not in INITS:
            raise ConfigError(f"init (--init) must be one of {', '.join(INITS)}, got {self.init!r}")
        if not isinstance(self.use_dora, bool):
            raise ConfigError(f"use_dora (--dora) must be true or false, got {self.use_dora!r}")
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


def _fp32_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in fp32 whatever autocast says (weights are merged and normed in fp32)."""
    with torch.autocast(a.device.type, enabled=False):
        return a.float() @ b.float()


class LoRAAdapter(nn.Module):
    """One low-rank update of one frozen Linear (out, in), with its own config.

    Parameters: A (r, in) and B (out, r), fp32 whatever the base's dtype.
    `update(x, y, base)`: what the adapter adds to the base layer's output y = base(x):
    s * B (A dropout(x)), (..., out).
    """

    def __init__(self, base: nn.Linear, config: LoRAConfig) -> None:
        super().__init__()
        self.config = LoRAConfig(r=config.r, alpha=config.alpha, dropout=config.dropout, scaling=config.scaling,
                                 use_dora=config.use_dora, init=config.init)
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(config.r, base.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, config.r, device=device, dtype=torch.float32))
        # nn.Identity returns its input as is: no copy when dropout is 0.
        self.dropout: nn.Module = FastDropout(config.dropout) if config.dropout > 0 else nn.Identity()

    @staticmethod
    def build(base: nn.Linear, config: LoRAConfig) -> "LoRAAdapter":
        """The adapter `config` describes (plain or DoRA) for `base`, uninitialised: for loading weights into."""
        return (DoRAAdapter if config.use_dora else LoRAAdapter)(base, config)

    @staticmethod
    def create(base: nn.Linear, config: LoRAConfig) -> "LoRAAdapter":
        """The adapter `config` describes, initialised on `base` (PiSSA rewrites `base.weight`)."""
        adapter = LoRAAdapter.build(base, config)
        adapter.initialise(base)
        return adapter

    @property
    def scaling(self) -> float:
        return self.config.scale

    @torch.no_grad()
    def initialise(self, base: nn.Linear) -> None:
        """Set A and B as `config.init` says; PiSSA also leaves the residual W0 - sBA in `base`."""
        init = self.config.init
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / self.config.r)
        else:  # pissa: W0 = U S V^T; s B A = U_r S_r V_r^T, the principal part
            w = base.weight
            u, sv, vh = torch.linalg.svd(w.float(), full_matrices=False)
            r = min(self.config.r, sv.numel())
            root = (sv[:r] / self.scaling).sqrt()  # (r,)
            self.lora_A.zero_()[:r] = root[:, None] * vh[:r]  # (r, in)
            self.lora_B.zero_()[:, :r] = u[:, :r] * root[None, :]  # (out, r)
            w.copy_((w.float() - self.scaling * (self.lora_B @ self.lora_A)).to(w.dtype))
            # the starting point, to express the trained adapter against the original W0 on saving
            self.register_buffer("pissa_A0", self.lora_A.detach().clone(), persistent=False)
            self.register_buffer("pissa_B0", self.lora_B.detach().clone(), persistent=False)

    def params(self) -> dict[str, nn.Parameter]:
        """The adapter's trainable parameters, by attribute name."""
        return {"lora_A": self.lora_A, "lora_B": self.lora_B}

    def low_rank(self, x: torch.Tensor) -> torch.Tensor:
        """s * B (A x): (..., in) -> (..., out), in the adapter's dtype (or autocast's)."""
        if x.dtype != self.lora_A.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.dtype)  # a bf16/fp16 base: the adapter computes in fp32
        return F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling

    def update(self, x: torch.Tensor, y: torch.Tensor, base: nn.Linear) -> torch.Tensor:
        """What this adapter adds to y = base(x): (..., out)."""
        return self.low_rank(self.dropout(x))

    def add_update_(self, out: torch.Tensor, x: torch.Tensor, y: torch.Tensor, base: nn.Linear) -> None:
        """out += update(x, y, base), in place; out (..., out) contiguous. A plain adapter
        without active dropout, all in one dtype: A x, then s B (A x) added by one addmm."""
        if (x.dtype == out.dtype == self.lora_A.dtype and (not self.training or isinstance(self.dropout, nn.Identity))
                and not torch.is_autocast_enabled(x.device.type)):
            h = F.linear(x, self.lora_A)  # (..., r)
            out.view(-1, out.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), self.lora_B.t(), alpha=self.scaling)
        else:
            out += self.update(x, y, base).to(out.dtype)

    def delta_weight(self, w0: torch.Tensor) -> torch.Tensor:
        """W' - W0 for base weight `w0`: s * B @ A, (out, in) fp32."""
        return self.scaling * _fp32_matmul(self.lora_B, self.lora_A)

    def with_update(self, w0: torch.Tensor) -> torch.Tensor:
        """W0 + s B A in one addmm, (out, in) fp32; neither w0 nor the adapter changes."""
        with torch.autocast(w0.device.type, enabled=False):
            return torch.addmm(w0.float(), self.lora_B, self.lora_A, alpha=self.scaling)

    def merged(self, w0: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
        """The base weight with this adapter's update (scaled by `weight`) merged in: (out, in) fp32."""
        return w0.float() + weight * self.delta_weight(w0)

    def unmerged(self, w: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
        """The base weight again from `merged`'s result `w`: (out, in) fp32."""
        return w.float() - weight * self.delta_weight(w)

    def plain_lora(self) -> tuple[torch.Tensor, torch.Tensor, int, float]:
        """(A, B, r, alpha) of a plain LoRA against the *original* W0 with this update.

        PiSSA moved sB0A0 out of the base, so W_res + sBA = W0 + s(BA - B0A0): a rank-2r
        LoRA with A' = [A; A0] and B' = [B, -B0] at the same scale s (PEFT converts the
        same way), which loads on the unmodified base model.
        """
        c = self.config
        if c.init != "pissa":
            return self.lora_A.detach(), self.lora_B.detach(), c.r, c.alpha
        a = torch.cat([self.lora_A.detach(), self.pissa_A0])  # (2r, in)
        b = torch.cat([self.lora_B.detach(), -self.pissa_B0], dim=1)  # (out, 2r)
        alpha = 2 * c.alpha if c.scaling == "standard" else c.alpha * math.sqrt(2)  # s unchanged at rank 2r
        return a, b, 2 * c.r, alpha


class DoRAAdapter(LoRAAdapter):
    """DoRA: W' = m * (W0 + sBA) / ||W0 + sBA||, norms per output row (detached).

    Extra parameter: the magnitude m (out,), initialised to ||W0 + sBA|| (= ||W0|| for
    B = 0), so the layer starts as the base. With y = base(x) = W0 x + b:

        W' x + b = y + (m/n - 1) W0 x + (m/n) s B A x,   n = ||W0 + sBA||.detach()
    """

    def __init__(self, base: nn.Linear, config: LoRAConfig) -> None:
        super().__init__(base, config)
        self.magnitude = nn.Parameter(torch.empty(base.out_features, device=base.weight.device, dtype=torch.float32))
        self._merge_scale: torch.Tensor | None = None
        """m/n per output row while merged (set by `merged`, read by `unmerged`)."""

    @torch.no_grad()
    def initialise(self, base: nn.Linear) -> None:
        super().initialise(base)
        self.magnitude.copy_(self.weight_norm(base.weight))

    def params(self) -> dict[str, nn.Parameter]:
        return {**super().params(), "magnitude": self.magnitude}

    def weight_norm(self, w0: torch.Tensor) -> torch.Tensor:
        """||W0 + sBA|| per output row, (out,) fp32, detached (the paper's section 4.3)."""
        with torch.no_grad():
            return torch.linalg.vector_norm(w0.float() + self.scaling * _fp32_matmul(self.lora_B, self.lora_A), dim=1)

    def update(self, x: torch.Tensor, y: torch.Tensor, base: nn.Linear) -> torch.Tensor:
        scale = self.magnitude / self.weight_norm(base.weight)  # (out,)
        dropped = self.dropout(x)
        if dropped is x:  # W0 x from the base's output: no second matmul
            w0x = y if base.bias is None else y - base.bias
        else:  # the direction update sees the dropped input, as in PEFT
            w0x = F.linear(dropped.to(base.weight.dtype) if dropped.dtype != base.weight.dtype
                           and not torch.is_autocast_enabled(x.device.type) else dropped, base.weight)
        return (scale - 1) * w0x + scale * self.low_rank(dropped)

    def delta_weight(self, w0: torch.Tensor) -> torch.Tensor:
        """m/n (W0 + sBA) - W0: (out, in) fp32."""
        w = w0.float() + super().delta_weight(w0)
        return (self.magnitude.detach() / self.weight_norm(w0))[:, None] * w - w0.float()

    def add_update_(self, out: torch.Tensor, x: torch.Tensor, y: torch.Tensor, base: nn.Linear) -> None:
        out += self.update(x, y, base).to(out.dtype)

    def with_update(self, w0: torch.Tensor) -> torch.Tensor:
        """m/n (W0 + sBA), (out, in) fp32; neither w0 nor the adapter changes."""
        return w0.float() + self.delta_weight(w0)

    def merged(self, w0: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
        """m/n (W0 + sBA), (out, in) fp32; the row scale m/n is kept for `unmerged`, since n
        cannot be recomputed from the merged weight. DoRA is never combined, so `weight` is unused."""
        self._merge_scale = self.magnitude.detach() / self.weight_norm(w0)  # (out,)
        return self._merge_scale[:, None] * (w0.float() + LoRAAdapter.delta_weight(self, w0))

    def unmerged(self, w: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
        """W0 = W' n/m - sBA, with the row scale `merged` kept: (out, in) fp32."""
        out = w.float() / self._merge_scale[:, None] - LoRAAdapter.delta_weight(self, w)
        self._merge_scale = None
        return out


MERGE_FROM_TOKENS = 512
"""A batch whose rows all name one adapter (`route_adapters`) runs a layer with that adapter
merged into a copy of its weight from this many tokens on; below, the base matmul and the
adapter's update added in place. Merging costs a pass over the weight whatever the batch, the
update a pass over the batch's outputs: on all-MiniLM-L6-v2's three layer shapes the update
was the cheaper up to 128 tokens and merging from 512 on, by 5 to 10%
(`benchmarks/one_adapter_layer.py`, results/one_adapter_layer/, docs/serve.md)."""


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus one or more named low-rank adapters.

    forward: x (..., in) -> W0 x + b + sum over active adapters of weight * update:
    (..., out). With one plain adapter that is W0 x + b + s * B (A dropout(x)).
    A (r, in) starts Kaiming-uniform(a=sqrt 5) and B (out, r) at zero (by default), so
    at initialisation the output equals the base layer's exactly. A and B stay fp32
    whatever the base dtype: with a bf16 or fp16 base (and no autocast) the adapter's
    input is cast to fp32 and its output back to the base's dtype; under
    `torch.autocast` the adapter's matmuls run in the autocast dtype. When `merged`, W0
    holds the active adapters' W' (computed in fp32, cast once) and forward is the base
    layer's single matmul.
    """

    def __init__(self, base: nn.Linear, r: int = 4, alpha: float = 8.0, dropout: float = 0.0,
                 scaling: str = "standard", *, config: LoRAConfig | None = None,
                 adapter_name: str = DEFAULT_ADAPTER) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TargetError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.adapters = nn.ModuleDict()
        self.active: dict[str, float] = {}
        """Adapter name -> weight of its update; the first adapter added is active with weight 1."""
        self.merged = False
        self.routes: dict[str, torch.Tensor | slice] | _Gathered | _Stacked | None = None
        """Mixed batches (serving): adapter name -> the batch rows it applies to, (n,) int64 or a slice;
        rows no name lists get the base layer only. None: every row gets the active adapters.
        Set by `route_adapters`."""
        self.add_adapter(adapter_name, config or LoRAConfig(r=r, alpha=alpha, dropout=dropout, scaling=scaling))
        self.train(base.training)  # wrapping a layer keeps its mode: a model in eval mode stays in eval mode

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: LoRAConfig, adapter_name: str = DEFAULT_ADAPTER) -> "LoRALinear":
        """Wrap `linear` with an adapter as `config` describes."""
        return cls(linear, config=config, adapter_name=adapter_name)

    def add_adapter(self, name: str, config: LoRAConfig) -> LoRAAdapter:
        """Add adapter `name` (initialised as `config.init` says); active if it is the first.

        Raises:
            TargetError: the name is taken, or the layer is merged.
        """
        if self.merged:
            raise TargetError("this LoRA layer is merged; call unmerge_lora(model) before adding an adapter")
        if name in self.adapters:
            raise TargetError(f"adapter {name!r} already exists on this layer; pick another adapter name")
        if config.init == "pissa" and len(self.adapters):
            raise TargetError("PiSSA rewrites the base weight, so it must be the layer's only adapter; "
                              "load other adapters into a model without PiSSA")
        adapter = LoRAAdapter.create(self.base, config)
        adapter.train(self.training)  # the layer's mode: no dropout, and one-adapter batches merged, in eval mode
        self.adapters[name] = adapter
        if not self.active:
            self.active = {name: 1.0}
        return adapter

    def set_active(self, weights: dict[str, float]) -> None:
        """Which adapters the layer applies, each scaled by its weight.

        Raises:
            TargetError: an unknown name, no name, a merged layer, or DoRA in a combination.
        """
        unknown = [n for n in weights if n not in self.adapters]
        if unknown or not weights:
            raise TargetError(f"no adapter {unknown[0] if unknown else '(none)'!r} on this layer; its adapters: "
                              f"{', '.join(self.adapters)}")
        if self.merged:
            raise TargetError("this LoRA layer is merged; call unmerge_lora(model) before switching adapters")
        if len(weights) > 1 and any(self.adapters[n].config.use_dora for n in weights):
            raise TargetError("DoRA adapters cannot be combined (their updates rescale the whole weight); "
                              "activate one DoRA adapter at a time")
        self.active = {n: float(w) for n, w in weights.items()}

    @property
    def adapter(self) -> LoRAAdapter:
        """The active adapter, when exactly one is active."""
        if len(self.active) != 1:
            raise TargetError(f"{len(self.active)} adapters are active on this layer; name one")
        return self.adapters[next(iter(self.active))]

    # The single active adapter's parameters and settings, as plain attributes.
    lora_A = property(lambda self: self.adapter.lora_A)
    lora_B = property(lambda self: self.adapter.lora_B)
    r = property(lambda self: self.adapter.config.r)
    alpha = property(lambda self: self.adapter.config.alpha)
    scaling_mode = property(lambda self: self.adapter.config.scaling)
    scaling = property(lambda self: self.adapter.scaling)
    dropout = property(lambda self: self.adapter.dropout)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def adapter_params(self, name: str | None = None) -> dict[str, nn.Parameter]:
        """Parameters of adapter `name` (default: every adapter), by name relative to this layer."""
        names = [name] if name is not None else list(self.adapters)
        return {f"adapters.{n}.{k}": p for n in names for k, p in self.adapters[n].params().items()}

    def delta_weight(self) -> torch.Tensor:
        """W' - W0 of the active adapters (weighted sum): (out, in), fp32."""
        w0 = self.base.weight
        total = torch.zeros(w0.shape, device=w0.device, dtype=torch.float32)
        for n, weight in self.active.items():
            total += weight * self.adapters[n].delta_weight(w0)
        return total

    @torch.no_grad()
    def merge(self) -> None:
        """W0 <- W0 + delta_weight() (DoRA: the rescaled weight). Idempotent."""
        if self.merged:
            return
        w = self.base.weight
        if len(self.active) == 1:  # the adapter merges itself (DoRA rescales the rows)
            (name, weight), = self.active.items()
            merged = self.adapters[name].merged(w, weight)
        else:
            merged = w.float() + self.delta_weight()
        if not torch.isfinite(merged).all():
            raise FloatingPointError(
                "NaNs or infs in the LoRA update; the adapter diverged. Retrain with a lower learning rate."
            )
        w.copy_(merged.to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the merged update back out of W0 (in fp32, cast once). Idempotent."""
        if not self.merged:
            return
        w = self.base.weight
        if len(self.active) == 1:
            (name, weight), = self.active.items()
            w.copy_(self.adapters[name].unmerged(w, weight).to(w.dtype))
        else:
            w.copy_((w.float() - self.delta_weight()).to(w.dtype))
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.routes, dict) and len(self.routes) == 1 and not self.training and not self.merged:
            (n, rows), = self.routes.items()
            if _row_count(rows) == x.shape[0]:  # every row names one adapter: one matmul with its weight
                return self._one_adapter(n, x) if n in self.adapters else self.base(x)
        y = self.base(x)  # (..., out)
        if self.merged:
            if torch.is_grad_enabled() and self.training and any(
                    p.requires_grad for p in self.adapter_params().values()):
                raise RuntimeError("LoRA weights are merged; call unmerge_lora(model) before training")
            return y
        if isinstance(self.routes, (_Gathered, _Stacked)):  # each row its own A and B: one matmul pair
            d = self.routes.update(self, x)
            return y if d is None else y + d.to(y.dtype)
        if self.routes is not None:  # each row its own adapter: (B, ..., out)
            # rows in runs (slices: views, no copies) are added in place when no gradient needs y
            in_place = not torch.is_grad_enabled() and all(isinstance(r, slice) for r in self.routes.values())
            out = y if in_place else y.clone()
            with _one_thread(in_place):
                for n, rows in self.routes.items():
                    if n not in self.adapters:  # an adapter that does not target this layer adds nothing here
                        continue
                    if isinstance(rows, slice):
                        self.adapters[n].add_update_(out[rows], x[rows], y[rows], self.base)
                    else:
                        out.index_add_(0, rows, self.adapters[n].update(x[rows], y[rows], self.base).to(y.dtype))
            return out
        out = y
        for n, weight in self.active.items():
            if weight == 0:
                continue
            d = self.adapters[n].update(x, y, self.base)
            out = out + (d if weight == 1 else d * weight).to(y.dtype)
        return out  # (..., out)

    def _one_adapter(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """x through the base layer with adapter `name` alone (the base stays as it is): from
        `MERGE_FROM_TOKENS` tokens on (or with gradients on), one matmul with the adapter merged
        into a copy of the weight; below, the base matmul with the adapter's update added in place."""
        w = self.base.weight
        if x.numel() // x.shape[-1] >= MERGE_FROM_TOKENS or torch.is_grad_enabled():
            return F.linear(x, self.adapters[name].with_update(w).to(w.dtype), self.base.bias)
        y = self.base(x)  # (..., out)
        with _one_thread(True):
            self.adapters[name].add_update_(y, x, y, self.base)
        return y

    def extra_repr(self) -> str:
        parts = [f"{n}: r={a.config.r}, alpha={a.config.alpha}, scaling={a.scaling:g}"
                 + (", dora" if a.config.use_dora else "") + (f", init={a.config.init}" if a.config.init != "kaiming"
                                                               else "") for n, a in self.adapters.items()]
        return f"{'; '.join(parts)}, active={self.active}, merged={self.merged}"


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """(dotted name, layer) for every LoRALinear in `model`, in `named_modules` order.

    The walk does not enter a LoRALinear (its adapters hold no LoRA layer): with many
    adapters loaded, their modules outnumber the model's, and a server walks the model on
    every batch (16 adapters on all-MiniLM-L6-v2's 36 layers: 1,347 modules, and
    `named_modules` about a sixth of a one-review request's time under cProfile)."""
    seen: set[int] = set()

    def walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, LoRALinear]]:
        if id(module) in seen:  # a module held twice is listed once, as named_modules does
            return
        seen.add(id(module))
        if isinstance(module, LoRALinear):
            yield prefix, module
            return
        for name, child in module.named_children():
            yield from walk(child, f"{prefix}.{name}" if prefix else name)

    yield from walk(model, "")


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters on `model`'s LoRA layers, in the order they were added."""
    seen: dict[str, None] = {}
    for _, layer in lora_modules(model):
        seen.update(dict.fromkeys(layer.adapters))
    return list(seen)


def adapter_params(model: nn.Module, adapter_name: str | None = None) -> dict[str, nn.Parameter]:
    """Full dotted name -> parameter, for adapter `adapter_name` (default: all) on every LoRA layer.

    The layers say which parameters they have (A, B, DoRA's magnitude, ...): no name matching.
    """
    out = {}
    for name, layer in lora_modules(model):
        if adapter_name is None or adapter_name in layer.adapters:
            out.update({f"{name}.{k}": p for k, p in layer.adapter_params(adapter_name).items()})
    return out


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def apply_lora(model: nn.Module, config: LoRAConfig, adapter_name: str = DEFAULT_ADAPTER) -> int:
    """Give every target `nn.Linear` of `model` adapter `adapter_name`, in place; return how many.

    Targets not yet adapted are wrapped in a LoRALinear; targets that already are get
    one more adapter (several named adapters per model; a further adapter starts
    inactive: `set_active_adapter`). Afterwards only the active adapters' parameters and
    `config.train_modules` are trainable (see `mark_only_lora_as_trainable`).

    Raises:
        TargetError: a target matches nothing (the message lists the model's Linear
            names), a matched module is not an `nn.Linear`, a module is both a target
            and in `train_modules`, or the model already has an adapter of that name.
    """
    had = adapter_names(model)
    if adapter_name in had:
        hint = "call unload_lora(model) first or start from a fresh model" if adapter_name == DEFAULT_ADAPTER \
            else "pick another adapter name"
        raise TargetError(f"this model already has LoRA applied (adapter {adapter_name!r}); {hint}")
    if had and config.train_modules:
        raise TargetError(f"adapter {adapter_name!r} would train whole modules next to adapter {had[0]!r}, which "
                          "shares them; give train_modules only to a model's first adapter")
    names = resolve_targets(model, config.targets)
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, (nn.Linear, LoRALinear)):
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
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear):
            module.add_adapter(adapter_name, config)
        else:
            _set_submodule(model, name, LoRALinear.from_linear(module, config, adapter_name))
    if had:  # a further adapter joins inactive (set_active_adapter switches to it), as in PEFT
        for _, layer in lora_modules(model):
            layer.active.pop(adapter_name, None)
    else:
        # which whole modules train next to the adapters (PEFT's modules_to_save): the one
        # model-level record, read by save_adapter and mark_only_lora_as_trainable
        model.lora_train_modules = train_names
    mark_only_lora_as_trainable(model)
    return len(names)


def mark_only_lora_as_trainable(model: nn.Module, config: LoRAConfig | None = None) -> None:
    """Freeze every parameter except the active adapters' and those of the train modules
    (`config.train_modules` if given, else those `apply_lora` recorded)."""
    if config is not None:
        train_names = resolve_targets(model, config.train_modules, what="train module") if config.train_modules else []
    else:
        train_names = getattr(model, "lora_train_modules", [])
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in lora_modules(model):
        for n in layer.active:
            for p in layer.adapter_params(n).values():
                p.requires_grad_(True)
    for name in train_names:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)


def set_active_adapter(model: nn.Module, name: str) -> None:
    """Make adapter `name` the only active one on every layer that has it; layers
    without it run as their base. Only its parameters are trainable afterwards."""
    combine_adapters(model, {name: 1.0})


SERVED_UPDATES_ON_ONE_THREAD = True
"""In a routed forward without gradients (a server's batch), each layer's adapter updates (A x
and the in-place addmm, two small matmuls per adapter at rank 4) run on one thread. Split over
the intra-op threads, each such matmul ends in a barrier, and on a loaded machine (the HTTP
layer, tokenizers and clients sharing the cores) a barrier waits for whichever thread was
descheduled. Under `benchmarks/serve_load.py`'s load, 16 adapters served with this on ran at
1.15x / 1.03x / 1.06x the texts/s of the same server with it off, at concurrency 1 / 8 / 32
(side by side in one run, results/serve_load/, docs/serve.md)."""


@contextlib.contextmanager
def _one_thread(on: bool) -> Iterator[None]:
    """Within the block (when `on` and `SERVED_UPDATES_ON_ONE_THREAD`), torch's intra-op ops run
    on one thread; the thread count is restored after. A thread that finds one thread set
    leaves it alone, so concurrent blocks never leave the count at one."""
    n = torch.get_num_threads()
    if not on or n == 1 or not SERVED_UPDATES_ON_ONE_THREAD:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _row_count(rows: torch.Tensor | slice) -> int:
    """How many batch rows a route names (an index tensor or a slice of consecutive rows)."""
    return rows.stop - rows.start if isinstance(rows, slice) else rows.numel()


class _Gathered:
    """Per-row adapters as gathered weights: row i's A and B (zero for a row without an
    adapter on the layer) stacked, so a layer's update is two batched matmuls."""

    def __init__(self, row_adapters: Sequence[str | None]) -> None:
        self.names = list(row_adapters)

    def update(self, layer: "LoRALinear", x: torch.Tensor) -> torch.Tensor:
        """(B, ..., in) -> (B, ..., out): s_i B_i A_i x_i for each row i."""
        rank = max(a.config.r for a in layer.adapters.values())
        a_rows = torch.zeros(len(self.names), rank, layer.in_features, device=x.device)
        b_rows = torch.zeros(len(self.names), layer.out_features, rank, device=x.device)
        for i, n in enumerate(self.names):
            if n is not None and n in layer.adapters:
                ad = layer.adapters[n]
                a_rows[i, :ad.config.r] = ad.lora_A
                b_rows[i, :, :ad.config.r] = ad.lora_B * ad.scaling
        flat = x.reshape(x.shape[0], -1, x.shape[-1]).to(a_rows.dtype)  # (B, T, in)
        out = torch.bmm(torch.bmm(flat, a_rows.transpose(1, 2)), b_rows.transpose(1, 2))  # (B, T, out)
        return out.reshape(*x.shape[:-1], layer.out_features)


class _Stacked:
    """Per-row adapters as one stacked pair: the A rows of every adapter the batch names
    stacked into (R, in), their scaled B columns into (out, R), and a (B, R) mask that keeps
    each row's own columns, so a layer's update is two dense matmuls whatever the number
    of adapters (R = the sum of their ranks)."""

    def __init__(self, row_adapters: Sequence[str | None]) -> None:
        self.names = list(row_adapters)
        self._masks: dict[tuple[str, ...], torch.Tensor] = {}
        """The (B, R) row mask per tuple of adapters a layer holds, built once per batch."""

    def update(self, layer: "LoRALinear", x: torch.Tensor) -> torch.Tensor | None:
        """(B, ..., in) -> (B, ..., out): s_i B_i A_i x_i for each row i (None: no row's
        adapter is on this layer)."""
        here = tuple(n for n in dict.fromkeys(self.names) if n is not None and n in layer.adapters)
        if not here:
            return None
        a = torch.cat([layer.adapters[n].lora_A for n in here])  # (R, in)
        b = torch.cat([layer.adapters[n].lora_B * layer.adapters[n].scaling for n in here], dim=1)  # (out, R)
        if here not in self._masks:
            cols, start = {}, 0
            for n in here:
                cols[n] = (start, start + layer.adapters[n].config.r)
                start += layer.adapters[n].config.r
            mask = torch.zeros(len(self.names), start, device=x.device)
            for i, n in enumerate(self.names):
                if n in cols:
                    mask[i, cols[n][0]:cols[n][1]] = 1
            self._masks[here] = mask
        mask = self._masks[here].to(a.dtype)
        h = F.linear(x.to(a.dtype), a)  # (B, ..., R)
        h = h * mask.view(mask.shape[0], *([1] * (x.dim() - 2)), mask.shape[1])
        return F.linear(h, b)  # (B, ..., out)


@contextlib.contextmanager
def route_adapters(model: nn.Module, row_adapters: Sequence[str | None], mode: str = "grouped"
                   ) -> Iterator[None]:
    """Within the block, row i of a batch (dim 0 of every LoRA layer's input, B rows) gets
    adapter `row_adapters[i]` alone (None: the base model), all in one forward. For a
    server holding many adapters of one base model; each layer runs its base matmul once
    for the batch, then each adapter on its own rows. Where every row names the same
    adapter (a server's batch of one request), each layer runs that adapter alone, merged
    into a copy of its weight from `MERGE_FROM_TOKENS` tokens on and added in place below:
    about the base model's cost (eval mode; the model is not changed).

    `mode`: `grouped` (each adapter's matmuls on its own rows; where an adapter's rows are
    consecutive, as in a batch sorted by adapter, on a view of them, added in place), `gathered` (every row's A
    and B gathered into two batched matmuls) or `stacked` (the A and B of every adapter the
    batch names stacked into two dense matmuls, each row masked to its own columns); the
    last two for plain LoRA only, no dropout: DoRA rescales the whole weight per adapter.

    Raises:
        TargetError: a name no layer has, merged layers, a model without LoRA layers, or
            DoRA adapters with mode `gathered` or `stacked`.
    """
    if mode not in ("grouped", "gathered", "stacked"):
        raise ConfigError(f"mode must be grouped, gathered or stacked, got {mode!r}")
    layers = [layer for _, layer in lora_modules(model)]
    if not layers:
        raise TargetError("this model has no LoRA layers; apply_lora or load_adapter first")
    if any(layer.merged for layer in layers):
        raise TargetError("the adapters are merged into the weights; call unmerge_lora(model) to route rows to them")
    known = {n for layer in layers for n in layer.adapters}
    unknown = sorted({n for n in row_adapters if n is not None and n not in known})
    if unknown:
        raise TargetError(f"no adapter {unknown[0]!r} in this model; its adapters: {', '.join(sorted(known))}")
    device = next(layers[0].base.parameters()).device
    if mode in ("gathered", "stacked"):
        used = {n for n in row_adapters if n is not None}
        if any(a.config.use_dora for layer in layers for n, a in layer.adapters.items() if n in used):
            raise TargetError("DoRA adapters rescale the whole weight; route them with mode='grouped'")
    # every row naming one adapter takes each layer's one-matmul path (LoRALinear.forward) in any mode
    one_adapter = len(set(row_adapters)) == 1 and row_adapters[0] is not None
    if mode != "grouped" and not one_adapter:
        gathered = (_Gathered if mode == "gathered" else _Stacked)(row_adapters)
        try:
            for layer in layers:
                layer.routes = gathered
            yield
        finally:
            for layer in layers:
                layer.routes = None
        return
    groups: dict[str, list[int]] = {}
    for i, n in enumerate(row_adapters):
        if n is not None:
            groups.setdefault(n, []).append(i)
    # an adapter's rows in one run (a server sorts its batch by adapter) are a slice: a view of x, no copy
    routes = {n: slice(rows[0], rows[-1] + 1) if rows[-1] - rows[0] == len(rows) - 1
              else torch.tensor(rows, dtype=torch.long, device=device) for n, rows in groups.items()}
    try:
        for layer in layers:
            layer.routes = routes
        yield
    finally:
        for layer in layers:
            layer.routes = None


def combine_adapters(model: nn.Module, weights: dict[str, float]) -> None:
    """Activate several adapters at once: each layer adds sum_i weights[i] * update_i.

    For plain LoRA adapters that is the model whose delta is the weighted sum of their
    deltas; (1, 0) is the first adapter alone.

    Raises:
        TargetError: an adapter name the model does not have, merged layers, or DoRA
            adapters combined with others.
    """
    known = adapter_names(model)
    unknown = [n for n in weights if n not in known]
    if unknown or not weights:
        raise TargetError(f"this model has no adapter {unknown[0] if unknown else '(none)'!r}; its adapters: "
                          f"{', '.join(known) or 'none'}")
    for _, layer in lora_modules(model):
        here = {n: w for n, w in weights.items() if n in layer.adapters}
        if here:
            layer.set_active(here)
        else:  # a layer none of them adapts runs as its base
            if layer.merged:
                raise TargetError("this LoRA layer is merged; call unmerge_lora(model) before switching adapters")
            layer.active = {}
    mark_only_lora_as_trainable(model)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) parameters count once."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def merge_lora(model: nn.Module) -> None:
    """Merge every layer's active adapters into its base weight (idempotent)."""
    for _, layer in lora_modules(model):
        if layer.active:
            layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Take every merged update back out of its base weight (idempotent)."""
    for _, layer in lora_modules(model):
        layer.unmerge()


def unload_lora(model: nn.Module) -> nn.Module:
    """Merge the active adapters and put the plain `nn.Linear`s back; returns `model`.

    The result has no LoRA module left, so inference costs exactly the base model's.
    """
    for name, layer in list(lora_modules(model)):
        if layer.active:
            layer.merge()
        _set_submodule(model, name, layer.base)
    if hasattr(model, "lora_train_modules"):
        delattr(model, "lora_train_modules")
    return model


def lora_state_dict(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """What an adapter holds: the adapter's parameters on every layer (as the layers
    report them) and the parameters of the train modules.

    Keys are `model.named_parameters()` names (`...key.adapters.default.lora_A`, `classifier.weight`).
    """
    out = {n: p.detach() for n, p in adapter_params(model, adapter_name).items()}
    for t in getattr(model, "lora_train_modules", []):
        for n, p in model.get_submodule(t).named_parameters():
            out[f"{t}.{n}"] = p.detach()
    return out
