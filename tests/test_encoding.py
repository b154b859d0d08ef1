"""Tokenization with the real default tokenizer, and its disk cache (lorafit/data/encoding.py)."""

from __future__ import annotations

import numpy as np
from transformers import AutoTokenizer

from lorafit.data import load_dataset
from lorafit.data.encoding import encode_split
from lorafit.models import resolve_model_path


def test_encode_truncates_and_caches(tmp_path):
    tok = AutoTokenizer.from_pretrained(resolve_model_path(None))
    split = load_dataset(None, train_size=64, val_size=8).train
    first = encode_split(split, tok, max_length=128, cache_dir=tmp_path)
    assert not first.cached and len(first) == 64
    assert first.lengths.max() <= 128 and (first.lengths == 128).any()
    ids0 = first.ids[first.offsets[0]:first.offsets[1]].tolist()
    assert ids0 == tok(split.texts[0], truncation=True, max_length=128)["input_ids"]
    second = encode_split(split, tok, max_length=128, cache_dir=tmp_path)
    assert second.cached and np.array_equal(second.ids, first.ids) and np.array_equal(second.offsets, first.offsets)
    files = list((tmp_path / "tokens").iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"  # no temporary file left behind
    other = encode_split(split, tok, max_length=64, cache_dir=tmp_path)  # another key
    assert not other.cached and other.lengths.max() == 64
    files[0].write_bytes(b"garbage")  # a damaged entry is rebuilt, not trusted
    again = encode_split(split, tok, max_length=128, cache_dir=tmp_path)
    assert not again.cached and np.array_equal(again.ids, first.ids)
