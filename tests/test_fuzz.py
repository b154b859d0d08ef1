"""Property tests: random bytes and random structures into the loaders give only lorafit's errors."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import tiny_model
from lorafit import load_adapter
from lorafit.config import read_config_file
from lorafit.data import load_dataset
from lorafit.errors import LorafitError

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12)
config_keys = st.sampled_from(["epochs", "lr", "rank", "alpha", "targets", "strategy", "max_length", "val_size",
                               "precision", "train_head", "seed", "batch_size", "attn_dropout", "bogus"])


def _ok_or_lorafit_error(fn) -> None:
    try:
        fn()
    except LorafitError:
        pass


@FAST
@given(st.binary(max_size=300), st.sampled_from([".json", ".toml"]))
def test_config_loader_random_bytes(data, suffix):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / f"c{suffix}"
        p.write_bytes(data)
        _ok_or_lorafit_error(lambda: read_config_file(p))


@FAST
@given(st.dictionaries(config_keys, json_values, max_size=5))
def test_config_loader_random_structures(values):
    from lorafit.config import make_config

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "c.json"
        p.write_text(json.dumps(values))
        _ok_or_lorafit_error(lambda: make_config(p))


@FAST
@given(st.binary(max_size=400), json_values)
def test_adapter_loader_random_input(weights, config):
    model = tiny_model("bert")
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        (folder / "adapter_model.safetensors").write_bytes(weights)
        (folder / "adapter_config.json").write_text(json.dumps(config))
        _ok_or_lorafit_error(lambda: load_adapter(model, folder))


@FAST
@given(st.binary(max_size=400), st.sampled_from([".csv", ".jsonl", ".parquet", ".tar.gz", ".tsv"]))
def test_data_loader_random_bytes(data, suffix):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / f"data{suffix}"
        p.write_bytes(data)
        _ok_or_lorafit_error(lambda: load_dataset(p, val_size=1))


@FAST
@given(st.lists(st.fixed_dictionaries({"text": json_values, "label": json_values}), max_size=8))
def test_data_loader_random_tables(rows):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "data.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        _ok_or_lorafit_error(lambda: load_dataset(p, val_size=1))
