"""Data-layer measurements on the full IMDb archive: tokenization throughput (first run and
cached) and padding efficiency with length-bucketed batches against padding to max_length.

    .venv/bin/python benchmarks/studies/data_stats.py [ARCHIVE]
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from lorafit.data import load_dataset
from lorafit.data.batching import bucketed_batches, padding_efficiency, random_batches
from lorafit.data.encoding import encode_split
from lorafit.models import load_model


def main() -> None:
    archive = sys.argv[1] if len(sys.argv) > 1 else os.environ.get(
        "LORAFIT_IMDB_ARCHIVE", "../shared/data/aclImdb_v1_labeled.tar.gz")
    t0 = time.perf_counter()
    d = load_dataset(archive, val_size=2500)
    read_s = time.perf_counter() - t0
    train = d.train
    tok = load_model(None).tokenizer
    out = {"archive": archive, "read_seconds": read_s, "train_reviews": len(train)}
    with tempfile.TemporaryDirectory() as cache:
        for max_length in (256, 512):
            t = time.perf_counter()
            first = encode_split(train, tok, max_length, cache_dir=Path(cache))
            first_s = time.perf_counter() - t
            t = time.perf_counter()
            second = encode_split(train, tok, max_length, cache_dir=Path(cache))
            second_s = time.perf_counter() - t
            assert second.cached and not first.cached
            lengths = first.lengths
            bucketed = bucketed_batches(lengths, 16, seed=0)
            out[f"max_length_{max_length}"] = {
                "tokenize_seconds_first": first_s, "reviews_per_s_first": len(train) / first_s,
                "tokens_per_s_first": int(lengths.sum()) / first_s,
                "cached_seconds": second_s, "reviews_per_s_cached": len(train) / second_s,
                "padding_efficiency_bucketed": padding_efficiency(lengths, bucketed),
                "padding_efficiency_random_batches": padding_efficiency(lengths, random_batches(len(lengths), 16, 0)),
                "padding_efficiency_pad_to_max_length": padding_efficiency(lengths, bucketed, pad_to=max_length),
            }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
