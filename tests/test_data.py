"""The data layer: sources, splits, cleaning, tokenization cache, bucketing (lorafit/data/)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from data_fixtures import REVIEWS, write_imdb_dir, write_imdb_tar
from lorafit.data import load_dataset
from lorafit.data.batching import bucketed_batches, collate, padded_length, padding_efficiency, random_batches
from lorafit.data.splits import Split
from lorafit.data.text import clean_text
from lorafit.errors import DataError


def test_clean_text():
    assert clean_text("Good.<br /><br />Very &amp; <i>really</i> good &quot;ok&quot;") == \
        'Good. Very & really good "ok"'


def test_embedded_sample_sizes_and_balance():
    d = load_dataset(None)
    assert d.sizes() == {"train": 990, "validation": 110, "test": 600}
    assert d.train.class_counts() == [495, 495] and d.validation.class_counts() == [55, 55]
    assert d.test.class_counts() == [300, 300]
    assert d.label_names == ["neg", "pos"]
    assert not any("<br" in t for t in d.train.texts)
    # validation is carved from train: disjoint, and the same for the same seed
    assert not set(d.train.texts) & set(d.validation.texts)
    assert load_dataset(None).validation.texts == d.validation.texts
    assert load_dataset(None, seed=1).validation.texts != d.validation.texts


def test_caps_are_stratified_subsets():
    d = load_dataset(None, train_size=100, val_size=20, test_size=50)
    assert d.sizes() == {"train": 100, "validation": 20, "test": 50}
    assert d.train.class_counts() == [50, 50] and d.test.class_counts() == [25, 25]


@pytest.mark.parametrize("kind", ["dir", "tar"])
def test_imdb_layouts(tmp_path, kind):
    src = write_imdb_dir(tmp_path) if kind == "dir" else write_imdb_tar(tmp_path / "a.tar.gz")
    d = load_dataset(src, val_size=2)
    assert d.sizes() == {"train": 4, "validation": 2, "test": 4}
    assert sorted(d.test.texts) == sorted(clean_text(t) for k, v in REVIEWS.items() if k[0] == "test" for t in v)
    pos = [t for t, y in d.test if y == 1]
    assert sorted(pos) == sorted(REVIEWS[("test", "pos")])


def test_tar_is_read_without_extracting(tmp_path):
    archive = write_imdb_tar(tmp_path / "a.tar.gz")
    before = set(os.listdir(tmp_path))
    load_dataset(archive, val_size=2)
    assert set(os.listdir(tmp_path)) == before


@pytest.mark.parametrize("suffix", ["csv", "jsonl", "parquet"])
def test_tables_with_string_and_int_labels(tmp_path, suffix):
    rows = [{"review": f"text number {i}", "sentiment": "good" if i % 2 else "bad",
             "split": "test" if i >= 16 else "train"} for i in range(20)]
    path = tmp_path / f"d.{suffix}"
    if suffix == "csv":
        path.write_text("review,sentiment,split\n" + "".join(f"\"{r['review']}\",{r['sentiment']},{r['split']}\n"
                                                             for r in rows))
    elif suffix == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(rows), path)
    d = load_dataset(path, text_column="review", label_column="sentiment", val_size=4)
    assert d.label_names == ["bad", "good"]
    assert d.sizes() == {"train": 12, "validation": 4, "test": 4}
    # int labels, no split column: a stratified 20% test split is carved
    path2 = tmp_path / "ints.jsonl"
    path2.write_text("".join(json.dumps({"text": f"t{i}", "label": i % 2}) + "\n" for i in range(20)))
    d2 = load_dataset(path2, val_size=2)
    assert d2.label_names == ["0", "1"] and d2.test.class_counts() == [2, 2]


@pytest.mark.parametrize("suffix", ["csv", "jsonl", "parquet"])
@pytest.mark.parametrize("kind", ["str", "int"])
def test_labels_are_inferred_from_tables(tmp_path, suffix, kind):
    names = {"str": ["billing", "bug", "praise"], "int": [3, 7, 11]}[kind]
    rows = [{"text": f"ticket {i} about {names[i % 3]}", "label": names[i % 3],
             "split": "test" if i >= 30 else "train"} for i in range(39)]
    path = _write_table(tmp_path / f"t.{suffix}", rows)
    d = load_dataset(path, val_size=3)
    assert d.label_names == [str(n) for n in names]  # sorted, as strings
    assert d.train.class_counts() == [9, 9, 9] and d.test.class_counts() == [3, 3, 3]
    assert [d.label_names[y] for y in d.test.labels] == [str(r["label"]) for r in rows if r["split"] == "test"]


def _write_table(path, rows):
    if path.suffix == ".csv":
        import csv

        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_label_problems_get_one_clear_line_each(tmp_path):
    def rows(labels, splits=None, texts=None):
        return [{"text": (texts or {}).get(i, f"text {i}"), "label": lab, "split": (splits or {}).get(i, "train")}
                for i, lab in enumerate(labels)]

    one = _write_table(tmp_path / "one.csv", rows(["a"] * 20, {i: "test" for i in range(15, 20)}))
    _expect(r"the labels of .*one.csv hold one class \(a\); a classifier needs at least two: check --label-column",
            one)
    only_test = _write_table(tmp_path / "only_test.csv",
                             rows(["a", "b"] * 10 + ["c"], {**{i: "test" for i in range(15, 20)}, 20: "test"}))
    _expect(r"class\(es\) 'c' of .* appear only in the test split; add training examples of them, or drop", only_test)
    no_train = _write_table(tmp_path / "no_train.csv",
                            rows(["a", "b"] * 12 + ["c"], {i: "test" for i in range(20, 24)}))
    _expect(r"training split of .* has no example of class\(es\) 'c'; lower --val-size",
            no_train, val_size=15)  # c's one example goes to validation (the largest remainder)
    empty = _write_table(tmp_path / "empty.csv", rows(["a", "b"] * 10, {i: "test" for i in range(15, 20)},
                                                       {4: "   ", 7: "<br />"}))
    _expect(r"row 5 of column 'text' is empty \(2 empty row\(s\) in all\); fill or drop them", empty)


def _expect(match, source, **kw):
    with pytest.raises(DataError, match=match):
        load_dataset(source, **kw)


def test_a_probe_that_raises_on_corrupt_bytes_gives_a_clear_error(tmp_path, monkeypatch):
    """tarfile.is_tarfile raises EOFError on some random gzip bytes (seen in CI on Python
    3.11): a .tar.gz is read without the probe, another name's failed probe means 'not a tar'."""
    import tarfile

    def probe(path):
        raise EOFError("Compressed file ended before the end-of-stream marker was reached")

    monkeypatch.setattr(tarfile, "is_tarfile", probe)
    (tmp_path / "junk.tar.gz").write_bytes(b"\x1f\x8b" + b"\x00" * 200)
    _expect("truncated or corrupt", tmp_path / "junk.tar.gz")
    (tmp_path / "junk.bin").write_bytes(b"\x1f\x8b" + b"\x00" * 200)
    _expect("neither a folder, a tar archive nor", tmp_path / "junk.bin")


def test_bad_sources(tmp_path):
    _expect("does not exist", tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    _expect(r"no reviews in the official IMDb layout; expected aclImdb/\{train,test\}", tmp_path / "empty")
    one_class = {k: v for k, v in REVIEWS.items() if k[1] == "pos"}
    write_imdb_dir(tmp_path / "oc", one_class)
    _expect("has no reviews under train/neg, test/neg", tmp_path / "oc")
    good = write_imdb_tar(tmp_path / "good.tar.gz").read_bytes()
    (tmp_path / "trunc.tar.gz").write_bytes(good[: len(good) // 2])
    _expect("truncated or corrupt", tmp_path / "trunc.tar.gz")
    (tmp_path / "junk.tar.gz").write_bytes(b"\x1f\x8b" + os.urandom(200))
    _expect("truncated or corrupt", tmp_path / "junk.tar.gz")
    write_imdb_tar(tmp_path / "latin.tar.gz", extra={"aclImdb/train/pos/99_9.txt": "caf\xe9".encode("latin-1")})
    _expect(r"latin.tar.gz:aclImdb/train/pos/99_9.txt is not valid UTF-8", tmp_path / "latin.tar.gz")
    (tmp_path / "x.csv").write_text("body,label\nhello,1\n")
    _expect(r"has no text column 'text' \(its columns: body, label\); name it with --text-column", tmp_path / "x.csv")
    three = tmp_path / "three.jsonl"
    three.write_text("".join(json.dumps({"text": f"t{i}", "label": i % 3}) + "\n" for i in range(30)))
    _expect("has 3 label classes .* but --num-labels is 2; leave --num-labels out", three, num_labels=2)
    assert len(load_dataset(three, num_labels=3).label_names) == 3
    assert load_dataset(three).label_names == ["0", "1", "2"]  # the classes come from the data
    nested = tmp_path / "nested.jsonl"  # found by tests/test_fuzz.py: pyarrow raised SystemError reading it
    nested.write_text(json.dumps({"text": None, "label": [None, "0"]}) + "\n")
    _expect(r"the label column 'label' holds list<item: string> values; it must hold one integer or string label",
            nested)
    nested.write_text(json.dumps({"text": {"a": 1}, "label": 1}) + "\n")
    _expect(r"the text column 'text' holds struct<a: int64> values; it must hold one string per row", nested)
    (tmp_path / "data.txt").write_text("hello")
    _expect("neither a folder, a tar archive nor", tmp_path / "data.txt")
    _expect("validation size .* must be smaller", None, val_size=5000)
    _expect(r"val_size \(--val-size\) must be a count", None, val_size=-3)


def _lengths(n=2000, seed=0):
    return np.random.default_rng(seed).integers(10, 512, n)


def test_bucketing_invariants():
    lengths = _lengths()
    for epoch in range(3):
        batches = bucketed_batches(lengths, 32, seed=7, epoch=epoch)
        flat = np.concatenate(batches)
        assert sorted(flat.tolist()) == list(range(len(lengths)))  # each example exactly once
        again = bucketed_batches(lengths, 32, seed=7, epoch=epoch)
        assert all(np.array_equal(a, b) for a, b in zip(batches, again))  # same seed, same batches
    e0, e1 = bucketed_batches(lengths, 32, 7, 0), bucketed_batches(lengths, 32, 7, 1)
    assert not all(np.array_equal(a, b) for a, b in zip(e0, e1))  # new order each epoch
    bucketed = padding_efficiency(lengths, e0)
    rand = padding_efficiency(lengths, random_batches(len(lengths), 32, 7))
    assert bucketed > 0.95 and bucketed > rand + 0.3
    assert padding_efficiency(lengths, e0, pad_to=512) < bucketed
    evals = bucketed_batches(lengths, 32, 0, shuffle=False)
    assert sorted(np.concatenate(evals).tolist()) == list(range(len(lengths)))


def test_collate_pads_dynamically():
    ids = np.arange(1, 11, dtype=np.int32)
    offsets = np.array([0, 3, 10])
    out = collate(ids, offsets, np.array([0, 1]), pad_id=0)
    assert out["input_ids"].shape == (2, 7)
    assert out["input_ids"][0].tolist() == [1, 2, 3, 0, 0, 0, 0]
    assert out["attention_mask"].sum().item() == 10


@given(st.integers(1, 600), st.integers(1, 64), st.one_of(st.none(), st.integers(1, 600)))
def test_padded_length_invariants(longest, multiple, cap):
    t = padded_length(longest, multiple, cap)
    assert longest <= t < longest + multiple  # never truncates, pads less than one multiple
    if cap is None:
        assert t % multiple == 0
    else:  # a multiple, unless that would pass the cap (max_length)
        assert t <= max(longest, cap) and (t % multiple == 0 or t == max(longest, cap))


def test_collate_pads_to_a_multiple_within_max_length():
    ids = np.arange(1, 41, dtype=np.int32)
    offsets = np.array([0, 3, 10, 40])
    out = collate(ids, offsets, np.array([0, 1]), pad_id=0, multiple=8, cap=32)
    assert out["input_ids"].shape == (2, 8) and out["attention_mask"].sum().item() == 10
    assert out["input_ids"][1].tolist() == [4, 5, 6, 7, 8, 9, 10, 0]
    assert collate(ids, offsets, np.array([2]), pad_id=0, multiple=8, cap=32)["input_ids"].shape == (1, 32)
    assert collate(ids, offsets, np.array([2]), pad_id=0, multiple=16, cap=31)["input_ids"].shape == (1, 31)
    lengths = _lengths()
    batches = bucketed_batches(lengths, 32, seed=7)
    exact, rounded = padding_efficiency(lengths, batches), padding_efficiency(lengths, batches, multiple=32)
    assert 0.8 < rounded < exact


def test_split_iterates_records():
    s = Split(["a", "b"], [0, 1], ["neg", "pos"])
    assert list(s) == [("a", 0), ("b", 1)] and len(s) == 2 and s[1] == ("b", 1)


FULL = os.environ.get("LORAFIT_IMDB_ARCHIVE")


@pytest.mark.skipif(not FULL or not os.path.exists(FULL),
                    reason="set LORAFIT_IMDB_ARCHIVE to the full aclImdb_v1 archive (.ci/run does) to run this")
def test_full_archive_counts():
    d = load_dataset(FULL, val_size=2500)
    assert len(d.train) + len(d.validation) == 25_000 and len(d.test) == 25_000
    assert [a + b for a, b in zip(d.train.class_counts(), d.validation.class_counts())] == [12_500, 12_500]
    assert d.test.class_counts() == [12_500, 12_500]


def test_non_utf8_table(tmp_path):
    (tmp_path / "bad.csv").write_bytes(b"text,label\n\x80abc,1\n")
    _expect(r"bad.csv: row 1 of column .text. is not valid UTF-8; re-encode", tmp_path / "bad.csv")
    (tmp_path / "bad2.csv").write_bytes(b"\x80\n")
    _expect(r"bad2.csv (is not valid UTF-8|cannot be read)", tmp_path / "bad2.csv")


def test_pad_multiple_default_follows_the_precision_and_a_given_one_is_kept():
    """By default a bf16 run pads to multiples of 32 (oneDNN's per-shape kernels), an fp32
    run to 8; a multiple the user gives is kept whatever the precision; a resumed run keeps
    the multiple its config.json records, so it resumes on the same shapes."""
    from lorafit.config import RunConfig
    from lorafit.data.batching import resolve_pad_multiple
    from lorafit.errors import ConfigError
    from lorafit.runs import _pick_pad_multiple

    assert (resolve_pad_multiple(None, "bf16"), resolve_pad_multiple(None, "fp32")) == (32, 8)
    assert [resolve_pad_multiple(m, p) for m in (1, 32) for p in ("bf16", "fp32")] == [1, 1, 32, 32]
    assert RunConfig().pad_multiple is None
    with pytest.raises(ConfigError, match=r"pad_multiple \(--pad-multiple\) must be an integer >= 1, got 0"):
        RunConfig(pad_multiple=0)
    default, given = RunConfig(), RunConfig(pad_multiple=16)
    assert _pick_pad_multiple(default, "fp32", None) == 8
    assert _pick_pad_multiple(default, "fp32", {"pad_multiple_resolved": 32}) == 32  # the record wins
    assert _pick_pad_multiple(given, "bf16", {"pad_multiple_resolved": 16}) == 16
    # runs from before the record: config.json holds the multiple they used (32, then the default)
    assert _pick_pad_multiple(RunConfig(pad_multiple=32), "fp32", {"precision_resolved": "fp32"}) == 32
