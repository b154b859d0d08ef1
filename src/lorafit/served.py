"""Many trained runs of one base model in memory once, and a forward whose rows each use
their own run: the model side of `lorafit serve` (issue 34).

A *group* holds one copy of a base encoder. Each lora run of that base joins it as a named
adapter on the encoder's LoRA layers (lorafit.lora.route_adapters gives each row its own),
and each last-two-layers run joins it with no adapter at all: its encoder is the frozen
base. Every run keeps its own classification head (its two head layers as plain Linears,
any LoRA on them merged in; a head layer equal to the group's is shared, not copied), which
runs on its rows' features: the input of the head's first layer, which the encoder computes
once for the whole batch.

A full run, a PiSSA run (its adapter rewrites the base weights) and an export are a model of
their own: `Solo`.

    group = ServedGroup.from_run(run_a)         # or ServedGroup.for_runs([...]) by base
    group.add_run("b", run_b)
    group.logits(["a", "b", "a"], input_ids, attention_mask)   # (B, num_labels of each row's run)
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lorafit.errors import ConfigError, RunDirError


@dataclass
class Head:
    """A run's classification head: first Linear, activation, second Linear (eval: no dropout)."""

    first: nn.Linear
    activation: nn.Module
    second: nn.Linear

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        """(n, H) -> (n, num_labels)."""
        return self.second(self.activation(self.first(features)))


@dataclass
class Member:
    """One run served by a group."""

    adapter: str | None
    """The adapter its rows get on the encoder's LoRA layers; None: the frozen base."""
    head: Head
    label_names: list[str]
    max_length: int
    run: Path


def _plain(layer: nn.Module) -> nn.Linear:
    """A plain Linear copy of a head layer (a LoRA layer's active adapter merged in)."""
    from lorafit.lora import LoRALinear

    if isinstance(layer, LoRALinear):
        from lorafit.lora import unload_lora

        holder = nn.Module()
        holder.layer = copy.deepcopy(layer)
        return unload_lora(holder).layer
    return copy.deepcopy(layer)


def _same(a: nn.Linear, b: nn.Linear) -> bool:
    if a.weight.shape != b.weight.shape or not torch.equal(a.weight, b.weight):
        return False
    return (a.bias is None) == (b.bias is None) and (a.bias is None or torch.equal(a.bias, b.bias))


class ServedGroup:
    """One base encoder, the adapters of its lora runs, and every run's own head."""

    def __init__(self, base, source: str, pooling: str) -> None:
        """`base`: a LoadedModel of the pretrained model (lorafit.models.load_model), eval mode."""
        from lorafit.architectures import architecture
        from lorafit.first_token import set_pruning
        from lorafit.strategies import head_layers

        self.model = base.model.eval()
        set_pruning(self.model, False)  # rows of several runs: the whole last layer, as transformers computes it
        self.tokenizer = base.tokenizer
        self.source, self.pooling = source, pooling
        arch = architecture(self.model)
        names = head_layers(self.model)
        if arch.head is None or len(names) != 2:
            raise ConfigError(f"lorafit does not know the head of {self.model.config.model_type} models, so it cannot "
                              "serve several runs on one copy of it; serve each run on its own")
        self.activation = arch.head.activation()
        self.head_names = names
        self.members: dict[str, Member] = {}
        self._layers: list | None = None
        """The model's LoRA layers, walked once after each change (`_lora_layers`)."""

    @staticmethod
    def key(run_dir: Path) -> tuple[str, str]:
        """What runs must share to join one group: the base model's source and the pooling."""
        from lorafit.models import resolve_model_path
        from lorafit.runs import read_config_json, config_of, run_pooling

        raw = read_config_json(run_dir)
        return resolve_model_path(config_of(raw, run_dir / "config.json").model), run_pooling(raw)

    @classmethod
    def for_run(cls, run_dir: Path) -> "ServedGroup":
        """An empty group for runs of `run_dir`'s base model and pooling."""
        from lorafit.models import load_model

        source, pooling = cls.key(run_dir)
        return cls(load_model(source, pooling=pooling), source, pooling)

    def add_run(self, name: str, run_dir: str | Path, adapter: str | None = None) -> Member:
        """Serve the lora or last-two-layers run at `run_dir` as `name` (`adapter`: one of
        several adapters in its adapter folder).

        Raises:
            ConfigError: a full or PiSSA run, or one of another base model or pooling.
            RunDirError: an unfinished or incomplete run folder.
        """
        from lorafit.lora import lora_modules
        from lorafit.runs import load_trained

        run_dir = Path(run_dir)
        if name in self.members:
            raise ConfigError(f"a run named {name!r} is served already; pick another name")
        if self.key(run_dir) != (self.source, self.pooling):
            raise ConfigError(f"{run_dir} was trained on another base model or pooling than this group's "
                              f"({self.source}, {self.pooling} pooling)")
        cfg, loaded = load_trained(run_dir, adapter=adapter)
        if cfg.strategy == "full":
            raise ConfigError(f"{run_dir} is a full run: every weight is its own, so it is served as a model of "
                              "its own")
        if cfg.init == "pissa" and cfg.strategy == "lora":
            raise ConfigError(f"{run_dir} is a PiSSA run, whose adapter rewrote the base weights: it is served as a "
                              "model of its own")
        head = self._head_of(loaded.model)
        adapter_name = None
        layers = {n: layer for n, layer in lora_modules(loaded.model) if n not in self.head_names}
        if layers:
            adapter_name = name
            self._unmerge()  # a merged base takes no further adapter
            self._join_adapter(name, layers)
        labels = list(loaded.model.config.id2label[i] for i in sorted(loaded.model.config.id2label))
        member = Member(adapter_name, head, labels, cfg.max_length, run_dir)
        self.members[name] = member
        return member

    def _head_of(self, model: nn.Module) -> Head:
        first, second = (_plain(model.get_submodule(n)) for n in self.head_names)
        mine = [_plain(self.model.get_submodule(n)) for n in self.head_names]
        # a head layer the run did not change is the group's own: shared, not copied
        for member in self.members.values():
            if _same(member.head.first, first):
                first = member.head.first
        if _same(mine[0], first):
            first = self._shared_first()
        return Head(first.eval(), self.activation, second.eval())

    def _shared_first(self) -> nn.Linear:
        if not hasattr(self, "_first"):
            self._first = _plain(self.model.get_submodule(self.head_names[0])).eval()
        return self._first

    def _lora_layers(self) -> list:
        """The model's LoRALinear layers: walked once after adapters join or leave, not per batch."""
        from lorafit.lora import lora_modules

        if self._layers is None:
            self._layers = [layer for _, layer in lora_modules(self.model)]
        return self._layers

    def _join_adapter(self, name: str, layers: dict) -> None:
        """The run's encoder adapters onto the group's model as adapter `name`."""
        from lorafit.lora import LoRALinear, _set_submodule

        self._layers = None
        for path, layer in layers.items():
            target = self.model.get_submodule(path)
            if not isinstance(target, LoRALinear):
                wrapped = LoRALinear(target, config=layer.adapter.config, adapter_name=name)
                _set_submodule(self.model, path, wrapped)
                target = wrapped
            else:
                target.add_adapter(name, layer.adapter.config)
            with torch.no_grad():
                for key, value in layer.adapter.state_dict().items():
                    target.adapters[name].state_dict()[key].copy_(value)
            for p in target.parameters():
                p.requires_grad_(False)

    def remove(self, name: str) -> None:
        """Stop serving `name`; its adapter leaves the encoder's layers."""
        from lorafit.lora import _set_submodule, lora_modules

        member = self.members.pop(name, None)
        if member is None:
            raise ConfigError(f"no run named {name!r} is served")
        if member.adapter is None:
            return
        self._unmerge()
        self._layers = None
        for path, layer in list(lora_modules(self.model)):
            if member.adapter in layer.adapters:
                del layer.adapters[member.adapter]
                layer.active.pop(member.adapter, None)
                if not layer.adapters:
                    _set_submodule(self.model, path, layer.base)
                elif not layer.active:
                    layer.active = {next(iter(layer.adapters)): 1.0}

    def _merge_if_alone(self) -> bool:
        """With one member, and that one with an adapter, its weights merged into the base
        (True); else unmerged, for routing (False)."""
        from lorafit.lora import merge_lora, set_active_adapter, unmerge_lora

        layers = self._lora_layers()
        alone = len(self.members) == 1 and next(iter(self.members.values())).adapter is not None
        merged = any(layer.merged for layer in layers)
        if alone and not merged:
            set_active_adapter(self.model, next(iter(self.members.values())).adapter)
            merge_lora(self.model)
        elif not alone and merged:
            unmerge_lora(self.model)
        return alone

    def _unmerge(self) -> None:
        from lorafit.lora import unmerge_lora

        if any(layer.merged for layer in self._lora_layers()):
            unmerge_lora(self.model)

    @torch.no_grad()
    def logits(self, names: list[str], input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """Row i's logits under run `names[i]`: a list of (num_labels_i,) fp32 tensors.

        input_ids, attention_mask: (B, T), padded; one encoder forward for the whole batch.
        """
        from lorafit.lora import route_adapters

        unknown = [n for n in names if n not in self.members]
        if unknown:
            raise ConfigError(f"no run named {unknown[0]!r} is served")
        first = self.model.get_submodule(self.head_names[0])
        grabbed: list[torch.Tensor] = []
        handle = first.register_forward_pre_hook(lambda _m, args: grabbed.append(args[0].float()))
        # the rows sorted by run, so each adapter's rows are consecutive: views of the batch, no copies
        rank = {n: k for k, n in enumerate(dict.fromkeys(names))}
        order = sorted(range(len(names)), key=lambda i: rank[names[i]])
        input_ids, attention_mask = input_ids[order], attention_mask[order]
        routes = [self.members[names[i]].adapter for i in order]
        try:
            if self._merge_if_alone():  # one adapter: merged, the forward is the base model's
                self.model(input_ids=input_ids, attention_mask=attention_mask)
            elif self._lora_layers():
                # grouped on the sorted rows: each adapter's A x and one addmm on a view of its rows, the
                # fastest routing measured at batches of 8 and 32 (docs/serve.md); DoRA adapters too
                with route_adapters(self.model, routes):
                    self.model(input_ids=input_ids, attention_mask=attention_mask)
            else:
                self.model(input_ids=input_ids, attention_mask=attention_mask)
        finally:
            handle.remove()
        features = grabbed[0]  # (B, H), rows sorted by run: each run's head reads a slice of them
        out: list[torch.Tensor | None] = [None] * len(names)
        start = 0
        for name, run in itertools.groupby(order, key=names.__getitem__):  # the sorted order's runs, in turn
            rows = list(run)  # their positions in the request
            logits = self.members[name].head(features[start:start + len(rows)])  # (n, num_labels)
            for i, row in zip(rows, logits):
                out[i] = row
            start += len(rows)
        return out  # type: ignore[return-value]


def require_same_base(run_dirs: list[Path]) -> None:
    """Refuse runs that cannot share a group, naming the first that differs."""
    keys = [ServedGroup.key(Path(r)) for r in run_dirs]
    for r, k in zip(run_dirs, keys):
        if k != keys[0]:
            raise RunDirError(f"{r} has another base model or pooling than {run_dirs[0]}")
