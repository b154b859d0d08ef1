"""Labelled text collections and the stratified, seeded ways to cut them."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from lorafit.errors import DataError


@dataclass
class Split:
    """A sized, iterable collection of `(text, label)` records."""

    texts: list[str]
    """Cleaned texts, one per example."""
    labels: np.ndarray
    """(N,) int64 class ids in [0, len(label_names))."""
    label_names: list[str] = field(default_factory=lambda: ["neg", "pos"])
    """Class id -> name."""

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.texts)

    def __iter__(self) -> Iterator[tuple[str, int]]:
        return zip(self.texts, (int(y) for y in self.labels))

    def __getitem__(self, i: int) -> tuple[str, int]:
        return self.texts[i], int(self.labels[i])

    def subset(self, indices: Sequence[int] | np.ndarray) -> "Split":
        """The examples at `indices`, in that order."""
        idx = np.asarray(indices, dtype=np.int64)
        return Split([self.texts[i] for i in idx], self.labels[idx], list(self.label_names))

    def class_counts(self) -> list[int]:
        """Examples per class id."""
        return np.bincount(self.labels, minlength=len(self.label_names)).tolist()

    def fingerprint(self) -> str:
        """sha256 over texts and labels: names this exact data in caches."""
        h = hashlib.sha256()
        for text, label in self:
            h.update(text.encode("utf-8"))
            h.update(b"\x00%d\x00" % label)
        return h.hexdigest()


@dataclass
class DatasetSplits:
    """train / validation / test of one dataset; test is for final evaluation only."""

    train: Split
    validation: Split
    test: Split
    source: str = "embedded IMDb sample"
    """Where the data came from, for logs and reports."""

    @property
    def label_names(self) -> list[str]:
        return self.train.label_names

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)}


def _stratified_pick(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of `n` examples drawn so each class keeps its share (largest remainders)."""
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts / counts.sum() * n
    take = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - take), kind="stable")[: n - take.sum()]:
        take[i] += 1
    picked = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]
    return np.sort(np.concatenate(picked))


def resolve_size(size: int | float | None, total: int, what: str) -> int | None:
    """A count from `size`: an int count, or a float fraction in (0, 1) of `total`."""
    if size is None:
        return None
    if isinstance(size, float) and 0 < size < 1:
        return max(1, round(size * total))
    if isinstance(size, bool) or not float(size).is_integer() or size < 1:
        raise DataError(f"{what} must be a count >= 1 or a fraction in (0, 1), got {size!r}")
    return int(size)


def stratified_subset(split: Split, n: int | None, seed: int) -> Split:
    """A stratified, seeded subset of `n` examples (all of them when n is None or >= len)."""
    if n is None or n >= len(split):
        return split
    return split.subset(_stratified_pick(split.labels, n, np.random.default_rng(seed)))


def carve_validation(train: Split, n: int, seed: int) -> tuple[Split, Split]:
    """(train minus validation, validation): `n` stratified, seeded examples carved from train."""
    if n >= len(train):
        raise DataError(f"the validation size ({n}) must be smaller than the training split ({len(train)}); "
                        "lower --val-size")
    val_idx = _stratified_pick(train.labels, n, np.random.default_rng(seed))
    mask = np.ones(len(train), dtype=bool)
    mask[val_idx] = False
    return train.subset(np.flatnonzero(mask)), train.subset(val_idx)
