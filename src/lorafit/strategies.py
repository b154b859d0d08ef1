"""Fine-tuning strategies: one object each, in one registry.

A strategy owns everything that differs between strategies: which parameters train
(set-up), the optimizer's parameter groups, how its weights are saved beside a run and
loaded back, and what the training loop runs on (the model, or the frozen-prefix
feature cache when only the head trains). The training loop and the run folder code
ask the strategy; they never test its name. Strategy names, default learning rates
and the CLI's help text come from `STRATEGIES`.

- `full`: every parameter trains.
- `last-two-layers`: everything frozen but the two last Linear layers of the
  classification head (DistilBERT: pre_classifier, classifier; BERT/MiniLM: pooler.dense,
  classifier; RoBERTa/MPNet: classifier.dense, classifier.out_proj).
- `lora`: LoRA adapters (default r=4, alpha=8 on every linear layer of the encoder:
  query, key, value, the attention output and both feed-forward layers, and on the head's
  first layer, role `pooler`, where the checkpoint holds it: BERT's pretrained pooler) and
  the last classifier layer, which starts from random weights, trained fully (`train_head`;
  a head's first layer that loading initialised afresh, such as DistilBERT's
  `pre_classifier`, then stays frozen at its random start; off, each gets an adapter like
  the rest, as in the seed experiment); nothing else trains. Its
  variants (DoRA, PiSSA, LoRA+) are settings of this one strategy.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from lorafit.adapter import PICKLE_SUFFIXES, adapter_folders, load_adapter, save_adapter
from lorafit.files import save_safetensors_atomic
from lorafit.errors import RunDirError
from lorafit.feature_cache import HeadOnCache, cacheable_head, extract_features
from lorafit.lora import LoRAConfig, adapter_params, apply_lora, lora_modules, set_active_adapter
from lorafit.targets import linear_names, resolve_targets, target_presets



class StrategySettings(Protocol):
    """The settings a strategy reads: `lorafit.config.RunConfig` has them all, and a
    strategy needs no more (so strategies do not depend on the config module)."""

    strategy: str
    model: str
    lr: float | str | None
    weight_decay: float
    eval_batch_size: int
    cache: bool
    rank: int
    alpha: float
    lora_dropout: float
    scaling: str
    targets: list[str]
    train_head: bool
    dora: bool
    init: str
    lora_plus_ratio: float

FRESH_INIT = "fresh_init.safetensors"
TRAINED = "trained.safetensors"
ADAPTER_DIR = "adapter"


def head_layers(model: nn.Module) -> list[str]:
    """The two last Linear layers of the classification head."""
    head = target_presets(model).get("head", [])
    return head if len(head) == 2 else linear_names(model)[-2:]


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file of a run folder (never a pickle)."""
    if path.suffix in PICKLE_SUFFIXES:
        raise RunDirError(f"{path} is a pickle file; lorafit loads safetensors only")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise RunDirError(f"{path} is not a readable safetensors file ({exc}); the run is corrupt") from None


def _copy_into(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path, cfg: StrategySettings,
               where: dict[str, torch.Tensor]) -> None:
    for k, v in tensors.items():
        if k not in where or where[k].shape != v.shape:
            raise RunDirError(f"{path} does not fit model {cfg.model} ({k}); the run is for another model")
        where[k].copy_(v)


class Strategy:
    """One way to fine-tune. The base class trains chosen whole parameters and saves them."""

    name: str = ""
    default_lr: float = 0.0
    """Peak learning rate when --lr is not given (chosen on the validation split; see README)."""
    description: str = ""

    def setup(self, model: nn.Module, cfg: StrategySettings, fresh_keys: Collection[str] = ()) -> None:
        """Set requires_grad (and apply adapters) on a freshly loaded model, in place; `fresh_keys`:
        the state-dict keys loading initialised afresh (`LoadedModel.fresh_keys`)."""
        raise NotImplementedError

    def param_groups(self, model: nn.Module, cfg: StrategySettings, lr: float) -> list[dict]:
        """AdamW groups at peak rate `lr`: weight decay on matrices, none on biases and LayerNorm weights."""
        decay, no_decay = [], []
        for p in model.parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
        return [{"params": decay, "weight_decay": cfg.weight_decay, "lr": lr},
                {"params": no_decay, "weight_decay": 0.0, "lr": lr}]

    def training_view(self, model: nn.Module, encs: dict, cfg: StrategySettings, *, pad_id: int, device: torch.device,
                      precision: str, log: Callable[[str], None]) -> tuple[nn.Module, dict, float]:
        """(what the loop trains, the splits it reads, seconds spent preparing them).

        When every trainable parameter sits in the head's two layers (and `cfg.cache`),
        the frozen encoder runs once per example and the head trains on its cached
        features; otherwise the model trains on the token ids.
        """
        head = head_layers(model)
        if not (cfg.cache and cacheable_head(model, head)):
            return model, encs, 0.0
        t0 = time.perf_counter()
        sets = {n: extract_features(model, head[0], e, batch_size=cfg.eval_batch_size, pad_id=pad_id,
                                    device=device, precision=precision) for n, e in encs.items()}
        seconds = time.perf_counter() - t0
        log(f"frozen-prefix cache: the frozen encoder ran once over {sum(len(e) for e in encs.values()):,} "
            f"examples in {seconds:.1f}s; the head ({', '.join(head)}) trains on its cached features")
        return HeadOnCache(model, head[0], head[1]).to(device), sets, seconds

    def save(self, model: nn.Module, cfg: StrategySettings, out: Path, fresh: dict[str, torch.Tensor]) -> int:
        """Save what the run changed into run folder `out`; returns bytes on disk."""
        tensors = {n: p for n, p in model.named_parameters() if p.requires_grad}
        save_safetensors_atomic(tensors, out / TRAINED, metadata={"strategy": self.name})
        return (out / TRAINED).stat().st_size

    def load(self, model: nn.Module, cfg: StrategySettings, run_dir: Path, adapter: str | None = None) -> None:
        """Put a saved run's weights into a freshly loaded `model`."""
        if adapter is not None:
            raise RunDirError(f"--adapter applies to lora runs; {run_dir} is a {self.name} run")
        path = run_dir / TRAINED
        if not path.exists():
            raise RunDirError(f"{run_dir} has no {TRAINED}; the run did not finish")
        with torch.no_grad():
            _copy_into(model, read_tensors(path), path, cfg, dict(model.named_parameters()))


class Full(Strategy):
    name, default_lr, description = "full", 5e-5, "every parameter trains"

    def setup(self, model: nn.Module, cfg: StrategySettings, fresh_keys: Collection[str] = ()) -> None:
        for p in model.parameters():
            p.requires_grad_(True)


class LastTwoLayers(Strategy):
    name, default_lr, description = "last-two-layers", 3e-3, "only the two last layers of the head train"

    def setup(self, model: nn.Module, cfg: StrategySettings, fresh_keys: Collection[str] = ()) -> None:
        for p in model.parameters():
            p.requires_grad_(False)
        for name in head_layers(model):
            for p in model.get_submodule(name).parameters():
                p.requires_grad_(True)


def fresh_pooler(model: nn.Module, fresh_keys: Collection[str]) -> bool:
    """Whether the head's first layer (role `pooler`) was initialised afresh at loading, not read
    from the checkpoint: `fresh_keys` are `LoadedModel.fresh_keys` (DistilBERT's `pre_classifier`,
    RoBERTa's and MPNet's `classifier.dense`; not BERT's pretrained `pooler.dense`)."""
    names = target_presets(model).get("pooler", [])
    return bool(names) and all(f"{n}.weight" in fresh_keys for n in names)


def lora_config(cfg: StrategySettings, model: nn.Module | None = None, fresh_keys: Collection[str] = ()
                ) -> LoRAConfig:
    """The LoRAConfig a run's settings describe on `model` (None: on any model, taking the head's
    first layer as pretrained). `train_head` moves the classifier from an adapter to
    train_modules, and where loading initialised the head's first layer afresh (`fresh_pooler`
    of `model` and its `fresh_keys`) leaves that layer frozen at its random start: no target
    keeps it, whether it names the role `pooler` or the layer's module, and nothing trains it
    fully (trained fully, it overfit on MPNet; docs/recipe.md)."""
    targets = [t for t in cfg.targets if not (cfg.train_head and t == "classifier")]
    if cfg.train_head and model is not None and fresh_pooler(model, fresh_keys):
        pooler = target_presets(model)["pooler"]
        targets = [t for t in targets if t != "pooler" and resolve_targets(model, [t]) != pooler]
    return LoRAConfig(r=cfg.rank, alpha=cfg.alpha, dropout=cfg.lora_dropout, targets=targets or ["encoder"],
                      scaling=cfg.scaling, train_modules=["classifier"] if cfg.train_head else [],
                      use_dora=cfg.dora, init=cfg.init)


class LoRA(Strategy):
    name, default_lr = "lora", 1e-3
    description = "LoRA adapters train; the pretrained weights stay frozen"

    def setup(self, model: nn.Module, cfg: StrategySettings, fresh_keys: Collection[str] = ()) -> None:
        apply_lora(model, lora_config(cfg, model, fresh_keys))

    def param_groups(self, model: nn.Module, cfg: StrategySettings, lr: float) -> list[dict]:
        """LoRA+ (Hayou et al. 2024): every B at `lora_plus_ratio` times the rate of A;
        biases, LayerNorm weights and DoRA magnitudes keep the base rate."""
        groups = super().param_groups(model, cfg, lr)
        if cfg.lora_plus_ratio == 1:
            return groups
        b_ids = {id(a.lora_B) for _, layer in lora_modules(model) for a in layer.adapters.values()}
        decay = groups[0]["params"]
        groups[0]["params"] = [p for p in decay if id(p) not in b_ids]
        fast = [p for p in decay if id(p) in b_ids]
        return [groups[0], {"params": fast, "weight_decay": cfg.weight_decay, "lr": lr * cfg.lora_plus_ratio},
                groups[1]]

    def save(self, model: nn.Module, cfg: StrategySettings, out: Path, fresh: dict[str, torch.Tensor]) -> int:
        """The adapter in PEFT's format (`adapter/`), and the frozen fresh head weights it sits on:
        in `fresh_init.safetensors`, and a frozen fresh layer no adapter wraps (DistilBERT's
        `pre_classifier`) also whole in the adapter, so that PEFT loads the same model."""
        trained = set(adapter_params(model)) | {n for n, p in model.named_parameters() if p.requires_grad}
        # the LoRA'd classifier's base weights are random (a fresh head) and frozen: keep them
        keep = {k: v for k, v in fresh.items() if k not in trained}
        modules, wrapped = dict(model.named_modules()), set(dict(lora_modules(model)))
        frozen = sorted(m for m in {k.rsplit(".", 1)[0] for k in keep} - wrapped
                        if isinstance(modules.get(m), nn.Linear))  # a head layer, not a buffer's owner
        save_adapter(model, out / ADAPTER_DIR, base_model_name=cfg.model, keep_modules=frozen)
        size = dir_size(out / ADAPTER_DIR)
        if keep:
            save_safetensors_atomic(keep, out / FRESH_INIT)
            size += (out / FRESH_INIT).stat().st_size
        return size

    def load(self, model: nn.Module, cfg: StrategySettings, run_dir: Path, adapter: str | None = None) -> None:
        """The run's adapter (`adapter`: one of several saved in its adapter folder) onto `model`."""
        if (run_dir / FRESH_INIT).exists():
            path = run_dir / FRESH_INIT
            with torch.no_grad():
                _copy_into(model, read_tensors(path), path, cfg, model.state_dict())
        folders = adapter_folders(run_dir / ADAPTER_DIR)
        if not folders:
            raise RunDirError(f"{run_dir} has no adapter/ folder; the run did not finish")
        if adapter is None:
            if "default" not in folders:
                raise RunDirError(f"{run_dir / ADAPTER_DIR} holds adapters {', '.join(folders)}; pick one with "
                                  "--adapter NAME")
            adapter = "default"
        if adapter not in folders:
            raise RunDirError(f"{run_dir / ADAPTER_DIR} has no adapter {adapter!r}; it holds: {', '.join(folders)}")
        load_adapter(model, folders[adapter], adapter_name=adapter)
        set_active_adapter(model, adapter)


STRATEGIES: dict[str, Strategy] = {s.name: s for s in (Full(), LastTwoLayers(), LoRA())}
STRATEGY_NAMES: tuple[str, ...] = tuple(STRATEGIES)


RSLORA_RATE_DIVISOR = 2.0
"""rsLoRA's scale over the standard one at the default rank 4: sqrt(4)."""


def learning_rate(cfg: StrategySettings) -> float:
    """--lr, or the strategy's default, with two rules for lora's variants (docs/recipe.md):

    - LoRA+ (`lora_plus_ratio` > 1): the default divided by sqrt(ratio), so B's rate (ratio
      times A's) grows with sqrt(ratio) rather than ratio: at ratio 16, A 2.5e-4 and B 4e-3;
    - rsLoRA (`scaling` rslora): the default halved, since at the default rank 4 its scale
      alpha / sqrt(r) is twice the standard alpha / r; at higher ranks its larger steps, the
      point of rsLoRA, remain.

    With `--lr auto`, this default is the rate `lorafit.lr_search` tries around."""
    if cfg.lr is not None and cfg.lr != "auto":
        return cfg.lr
    lr = STRATEGIES[cfg.strategy].default_lr
    if cfg.strategy == "lora" and cfg.lora_plus_ratio > 1:
        lr /= cfg.lora_plus_ratio ** 0.5
    if cfg.strategy == "lora" and cfg.scaling == "rslora":
        lr /= RSLORA_RATE_DIVISOR
    return lr
