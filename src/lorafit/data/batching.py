"""Length-bucketed batches with dynamic padding.

Training batches: shuffle, cut into mega-batches of `mega` batches, sort each by length,
cut into batches, shuffle the batches. Similar lengths share a batch, so little is
padded, and the order stays random. Deterministic by (seed, epoch); every example
appears exactly once per epoch.
"""

from __future__ import annotations

import numpy as np
import torch


def bucketed_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int = 0,
                     mega: int = 50, shuffle: bool = True) -> list[np.ndarray]:
    """Index batches over `lengths` (N,). Without `shuffle`: sorted by length (evaluation)."""
    n = len(lengths)
    if not shuffle:
        order = np.argsort(lengths, kind="stable")
        return [order[i:i + batch_size] for i in range(0, n, batch_size)]
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(n)
    span = batch_size * mega
    batches: list[np.ndarray] = []
    for start in range(0, n, span):
        chunk = perm[start:start + span]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def random_batches(n: int, batch_size: int, seed: int, epoch: int = 0) -> list[np.ndarray]:
    """Plain shuffled batches (the baseline bucketing is measured against)."""
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return [perm[i:i + batch_size] for i in range(0, n, batch_size)]


def padded_length(longest: int, multiple: int = 1, cap: int | None = None) -> int:
    """`longest` rounded up to a multiple of `multiple`, but not beyond max(longest, cap).

    Few distinct shapes let oneDNN reuse its kernels: in bf16, batches padded to a
    multiple of 32 ran faster and with a third of the memory of exact padding
    (benchmarks/studies/padding.py); see `resolve_pad_multiple` for the defaults.
    """
    t = -(-longest // multiple) * multiple
    return t if cap is None else min(t, max(longest, cap))


PAD_MULTIPLE_BF16 = 32
"""bf16 runs: oneDNN builds kernels and keeps buffers per shape; 32 leaves at most 8 shapes
at max_length 256, with 35-53% less peak memory than exact padding (results/padding.json)."""
PAD_MULTIPLE_FP32 = 8
"""fp32 runs (MKL's sgemm keeps nothing per shape): 8 pads 3% fewer tokens than 32, and
its steps ran 1.020x (full) and 1.041x (lora) as fast, interleaved on an Intel Xeon
(results/padding_interleaved.json)."""


def resolve_pad_multiple(pad_multiple: int | None, precision: str) -> int:
    """`pad_multiple` as given; None: PAD_MULTIPLE_BF16 for a bf16 run, else PAD_MULTIPLE_FP32."""
    if pad_multiple is not None:
        return pad_multiple
    return PAD_MULTIPLE_BF16 if precision == "bf16" else PAD_MULTIPLE_FP32


def padding_efficiency(lengths: np.ndarray, batches: list[np.ndarray], pad_to: int | None = None,
                       multiple: int = 1, cap: int | None = None) -> float:
    """Real tokens / padded tokens over `batches` (pad_to: pad every batch to that length)."""
    real = sum(int(lengths[b].sum()) for b in batches)
    padded = sum(len(b) * (pad_to or padded_length(int(lengths[b].max()), multiple, cap)) for b in batches)
    return real / padded if padded else 1.0


def collate(ids: np.ndarray, offsets: np.ndarray, batch: np.ndarray, pad_id: int, multiple: int = 1,
            cap: int | None = None) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask (B, T): T the batch's longest example, see `padded_length`."""
    lens = offsets[batch + 1] - offsets[batch]
    t = padded_length(int(lens.max()), multiple, cap)
    input_ids = np.full((len(batch), t), pad_id, dtype=np.int64)
    mask = np.zeros((len(batch), t), dtype=np.int64)
    for row, (i, n) in enumerate(zip(batch, lens)):
        input_ids[row, :n] = ids[offsets[i]:offsets[i] + n]
        mask[row, :n] = 1
    return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask)}
