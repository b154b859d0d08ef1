"""The Python API: lorafit.train / compare / load_run give what the CLI gives, with the same errors."""

from __future__ import annotations

import json

import pytest

import lorafit
from cli_helpers import lorafit as cli
from lorafit.errors import ConfigError

SMALL = dict(train_size=24, val_size=8, test_size=16, max_length=64, epochs=1)


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("api") / "run"
    return lorafit.train(strategy="lora", model=str(tiny_model_dir), out=out, progress=False, **SMALL)


def test_train_returns_the_run(trained):
    final = json.loads((trained.path / "final.json").read_text())
    assert trained.final == final and trained.test_accuracy == final["test_accuracy"]
    assert trained.history == [json.loads(x) for x in (trained.path / "metrics.jsonl").read_text().splitlines()]
    assert len(trained.history) == 1 and trained.config.rank == 4 and trained.config.train_size == 24
    assert {"config", "metrics", "final", "curves", "adapter"} <= trained.paths.keys()
    assert all(p.exists() for p in trained.paths.values())


def test_load_run_evaluates_and_predicts_as_the_cli(trained):
    run = trained.load()
    m = run.evaluate()
    assert m["test_accuracy"] == trained.test_accuracy and m["test_loss"] == pytest.approx(
        trained.final["test_loss"], abs=1e-6)
    texts = ["A wonderful, moving film.", "Dull and far too long."]
    preds = lorafit.load_run(trained.path).predict(texts)
    assert [p["text"] for p in preds] == texts
    for p in preds:
        assert p["label"] in ("neg", "pos") and p["label"] == run.label_names[p["label_id"]]
        assert sum(p["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert p["probability"] == max(p["probabilities"].values())
    r = cli("predict", str(trained.path), *texts)
    assert r.returncode == 0, r.stderr
    assert [line.split("\t")[:2] for line in r.stdout.splitlines()] == [
        [p["label"], f"{p['probability']:.4f}"] for p in preds]
    assert run.predict("one text")[0]["text"] == "one text"


def test_settings_are_validated_as_the_cli_does(tmp_path):
    with pytest.raises(ConfigError, match=r"rank \(--rank\) must be an integer >= 1, got 0"):
        lorafit.train(rank=0, out=tmp_path / "x")
    with pytest.raises(ConfigError, match="unknown setting 'learning_rate'"):
        lorafit.train(learning_rate=1e-3, out=tmp_path / "x")
    with pytest.raises(ConfigError, match="resume= continues a run with its saved settings"):
        lorafit.train(resume=tmp_path, epochs=2)
    assert not (tmp_path / "x").exists()


def test_config_as_a_dict_a_runconfig_or_a_file(tmp_path):
    from lorafit.api import _config

    base = lorafit.RunConfig(rank=8)
    assert _config(base, {"alpha": 4.0}).rank == 8 and _config(base, {"alpha": 4.0}).alpha == 4.0
    assert _config({"rank": 2}, {"epochs": 1}).rank == 2
    (tmp_path / "c.json").write_text(json.dumps({"rank": 16}))
    assert _config(tmp_path / "c.json", {}).rank == 16


def test_compare_returns_every_run_and_the_report(tiny_model_dir, tmp_path):
    result = lorafit.compare(strategies=["last-two-layers"], model=str(tiny_model_dir), out=tmp_path / "cmp",
                             progress=False, **SMALL)
    assert set(result.runs) == {"last-two-layers"}
    assert json.loads((tmp_path / "cmp" / "report.json").read_text()) == result.report
    rows = {r["strategy"]: r for r in result.report["rows"]}
    for name, run in result.runs.items():
        assert rows[name]["test_accuracy"] == run.test_accuracy == result.test_accuracy[name]
    assert result.report["command"].startswith("lorafit.compare(")



def test_a_run_pads_to_the_multiple_it_records(tiny_model_dir, tmp_path):
    """A run records the pad multiple its precision chose by default (`pad_multiple_resolved`),
    and its batches were padded to it: the padding efficiency it reports is that of its
    last epoch's batches at that multiple, not at the other precision's."""
    from lorafit.data.batching import bucketed_batches, resolve_pad_multiple
    from lorafit.data.encoding import encode_split
    from lorafit.runs import load_data

    # max_length 128 (the tiny model's most) and batches of 2: batches whose longest review is
    # shorter than that tell the multiples apart
    run = lorafit.train(strategy="lora", model=str(tiny_model_dir), out=tmp_path / "run", progress=False,
                        batch_size=2, **{**SMALL, "max_length": 128})
    config = json.loads((run.path / "config.json").read_text())
    assert config["pad_multiple"] is None
    multiple = config["pad_multiple_resolved"]
    assert multiple == resolve_pad_multiple(None, config["precision_resolved"])
    cfg = run.config
    enc = encode_split(load_data(cfg).train, run.load().tokenizer, cfg.max_length, use_cache=False)
    batches = bucketed_batches(enc.lengths, cfg.batch_size, seed=cfg.seed, epoch=cfg.epochs - 1)

    def efficiency(m: int) -> float:
        enc.pad_multiple, enc.max_padded = m, cfg.max_length
        return enc.padding_efficiency(batches)

    other = 32 if multiple == 8 else 8
    assert efficiency(other) != efficiency(multiple)  # the data tells the two multiples apart
    assert run.final["padding_efficiency"] == pytest.approx(efficiency(multiple), abs=1e-12)
