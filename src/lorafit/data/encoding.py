"""Tokenization with the model's fast tokenizer, cached on disk.

The cache key is (tokenizer, max_length, data fingerprint), so a second run over the
same data skips tokenization. Files are `.npz` (no pickle), written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lorafit.data.splits import Split
from lorafit.machine import cache_root


@dataclass
class Encoded:
    """Token ids of a split, ragged: example i is ids[offsets[i]:offsets[i+1]]."""

    ids: np.ndarray
    """(total_tokens,) int32."""
    offsets: np.ndarray
    """(N + 1,) int64."""
    labels: np.ndarray
    """(N,) int64."""
    seconds: float = 0.0
    """Time spent tokenizing (0 when read from the cache)."""
    cached: bool = False
    pad_multiple: int = 1
    """Batches are padded to a multiple of this (see batching.padded_length)..."""
    max_padded: int | None = None
    """...but not beyond the longer of this and the batch's longest example (max_length)."""

    @property
    def lengths(self) -> np.ndarray:
        """(N,) tokens per example, special tokens included."""
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, b: np.ndarray, pad_id: int) -> dict:
        """input_ids and attention_mask (B, T) of examples `b`, padded as `pad_multiple` says."""
        from lorafit.data.batching import collate

        return collate(self.ids, self.offsets, b, pad_id, self.pad_multiple, self.max_padded)

    def padding_efficiency(self, batches: list[np.ndarray]) -> float:
        """Real / padded tokens of `batches`, padded as `batch` pads them."""
        from lorafit.data.batching import padding_efficiency

        return padding_efficiency(self.lengths, batches, multiple=self.pad_multiple, cap=self.max_padded)


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's definition (vocab, normaliser, special tokens).

    Truncation and padding settings are left out: calling the tokenizer changes them.
    """
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec.pop("truncation", None)
    spec.pop("padding", None)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def encode_texts(tokenizer, texts: list[str], max_length: int, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(ids, offsets) of `texts`, tokenized in batches and truncated to `max_length`."""
    ids: list[np.ndarray] = []
    lengths: list[int] = []
    for start in range(0, len(texts), chunk):
        out = tokenizer(texts[start:start + chunk], truncation=True, max_length=max_length, padding=False,
                        return_attention_mask=False, return_token_type_ids=False)["input_ids"]
        for seq in out:
            ids.append(np.asarray(seq, dtype=np.int32))
            lengths.append(len(seq))
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int32)
    return flat, offsets


def encode_split(split: Split, tokenizer, max_length: int, cache_dir: Path | None = None,
                 use_cache: bool = True, pad_multiple: int = 1) -> Encoded:
    """Tokenize `split` (truncating to `max_length`), reading or filling the disk cache.

    Its batches are padded to a multiple of `pad_multiple`, at most to `max_length`.
    """
    key = hashlib.sha256(
        f"{tokenizer_fingerprint(tokenizer)}|{max_length}|{split.fingerprint()}".encode()).hexdigest()[:32]
    folder = (cache_dir or cache_root()) / "tokens"
    path = folder / f"{key}.npz"
    if use_cache and path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                return Encoded(z["ids"], z["offsets"], split.labels.copy(), cached=True,
                               pad_multiple=pad_multiple, max_padded=max_length)
        except (OSError, ValueError, KeyError):
            path.unlink(missing_ok=True)  # a damaged cache entry is rebuilt
    t0 = time.perf_counter()
    ids, offsets = encode_texts(tokenizer, split.texts, max_length)
    enc = Encoded(ids, offsets, split.labels.copy(), seconds=time.perf_counter() - t0, pad_multiple=pad_multiple,
                  max_padded=max_length)
    if use_cache:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{key}.", suffix=".npz")
            try:
                with os.fdopen(fd, "wb") as f:
                    np.savez(f, ids=ids, offsets=offsets)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError:
            pass  # a read-only or full cache only costs a re-tokenization next time
    return enc
