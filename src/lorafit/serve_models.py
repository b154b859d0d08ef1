"""What `lorafit serve` serves: named models, each run by an engine that takes a batch of
token ids and gives each row its model's logits.

Runs of one base model that can share it (lora, last-two-layers) are members of one
`ServedGroup` (lorafit.served), so a batch mixing them runs the encoder once; a full run, a
PiSSA run and an export folder are each an engine of their own (`Solo`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lorafit.errors import ConfigError
from lorafit.served import ServedGroup


def pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> input_ids, attention_mask: (B, T) int64, padded to the longest."""
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask


class GroupEngine:
    """A ServedGroup: rows name their member."""

    def __init__(self, group: ServedGroup) -> None:
        self.group = group
        self.pad_id = group.tokenizer.pad_token_id or 0

    def forward(self, names: list[str], rows: list[list[int]]) -> list[torch.Tensor]:
        ids, mask = pad(rows, self.pad_id)
        return self.group.logits(names, ids, mask)


class Solo:
    """One model of its own (a full or PiSSA run, or an export), through lorafit.load_run."""

    def __init__(self, path: Path) -> None:
        import lorafit

        self.run = lorafit.load_run(path)
        self.pad_id = self.run.tokenizer.pad_token_id or 0

    @torch.no_grad()
    def forward(self, names: list[str], rows: list[list[int]]) -> list[torch.Tensor]:
        from lorafit.training import autocast

        ids, mask = pad(rows, self.pad_id)
        with autocast(torch.device("cpu"), self.run.precision or "fp32"):
            logits = self.run.model(input_ids=ids, attention_mask=mask).logits.float()
        return list(logits)


@dataclass
class Served:
    """A name the server answers to."""

    name: str
    engine: object
    """GroupEngine or Solo: `forward(names, rows) -> logits per row`."""
    tokenizer: object
    max_length: int
    label_names: list[str]
    path: Path
    kind: str
    """`adapter` (a member of a shared base) or `model` (a model of its own)."""


def _shares_a_base(path: Path) -> bool:
    """A lora (not PiSSA) or last-two-layers run folder: it can join a group."""
    from lorafit.exported import is_export
    from lorafit.runs import read_run_config

    if is_export(path):
        return False
    cfg = read_run_config(path)
    return cfg.strategy == "last-two-layers" or (cfg.strategy == "lora" and cfg.init != "pissa")


class Registry:
    """Every served name, its engine, and the groups that share a base model."""

    def __init__(self) -> None:
        self.served: dict[str, Served] = {}
        self.groups: dict[tuple[str, str], GroupEngine] = {}

    def add(self, name: str, path: str | Path) -> Served:
        """Serve the run or export folder at `path` as `name`.

        Raises:
            ConfigError: the name is taken; RunDirError and others from loading the folder.
        """
        path = Path(path)
        if name in self.served:
            raise ConfigError(f"the name {name!r} is served already; pick another")
        if _shares_a_base(path):
            key = ServedGroup.key(path)
            if key not in self.groups:
                self.groups[key] = GroupEngine(ServedGroup.for_run(path))
            engine = self.groups[key]
            member = engine.group.add_run(name, path)
            served = Served(name, engine, engine.group.tokenizer, member.max_length, member.label_names, path,
                            "adapter")
        else:
            solo = Solo(path)
            served = Served(name, solo, solo.run.tokenizer, solo.run.config.max_length, solo.run.label_names, path,
                            "model")
        self.served[name] = served
        return served

    def remove(self, name: str) -> None:
        served = self.served.pop(name, None)
        if served is None:
            raise ConfigError(f"no model or adapter named {name!r} is served")
        if isinstance(served.engine, GroupEngine):
            served.engine.group.remove(name)

    def tokenize(self, name: str, texts: list[str]) -> tuple[list[list[int]], list[bool]]:
        """Token ids of `texts` as `name`'s run saw them (cleaned, truncated to its max_length),
        and which were truncated."""
        from lorafit.data.text import clean_text

        s = self.served[name]
        cleaned = [clean_text(t) for t in texts]
        rows = [list(r) for r in s.tokenizer(cleaned, truncation=False)["input_ids"]]
        long = [i for i, r in enumerate(rows) if len(r) > s.max_length]
        if long:  # only the texts past max_length are tokenized again, truncated as in training
            cut = s.tokenizer([cleaned[i] for i in long], truncation=True, max_length=s.max_length)["input_ids"]
            for i, r in zip(long, cut):
                rows[i] = list(r)
        truncated = set(long)
        return rows, [i in truncated for i in range(len(rows))]
