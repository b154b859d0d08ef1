"""`--lr auto` (lorafit.lr_search): what a trial is, what wins, that the search leaves the
model as it found it, and that the run then trains as `--lr <chosen>` would."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lorafit.lr_search as search_mod
from lorafit.config import RunConfig
from lorafit.errors import ConfigError
from lorafit.lr_search import LrTrial, pick, search_lr, trial_epochs
from lorafit.models import load_model
from lorafit.runs import run_training
from lorafit.strategies import STRATEGIES, learning_rate
from lorafit.training import TrainingDiverged, TrainSettings, train
from safetensors.torch import load_file

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parent.parent


def _lora_model():
    loaded = load_model(None, seed=0)
    torch.manual_seed(0)
    cfg = RunConfig()
    STRATEGIES["lora"].setup(loaded.model, cfg)
    return loaded.model, cfg


def test_a_trial_trains_the_first_third_of_the_schedule():
    assert [trial_epochs(e) for e in (1, 2, 3, 4, 5, 7, 9)] == [1, 1, 1, 2, 2, 3, 3]


def test_the_lowest_validation_loss_wins_and_ties_go_to_the_default():
    t = [LrTrial(1e-3, 1, 0.70, 0.5), LrTrial(2e-3, 1, 0.60, 0.6), LrTrial(4e-3, 1, 0.65, 0.7)]
    assert pick(t, 2e-3) == 2e-3
    assert pick([LrTrial(1e-3, 1, 0.5, 0), LrTrial(2e-3, 1, 0.6, 0), LrTrial(4e-3, 1, 0.5, 0)], 2e-3) == 1e-3
    tie = [LrTrial(1e-3, 1, 0.6, 0), LrTrial(2e-3, 1, 0.6, 0), LrTrial(4e-3, 1, 0.6, 0)]
    assert pick(tie, 2e-3) == 2e-3
    diverged = [LrTrial(1e-3, 1, 0.9, 0), LrTrial(2e-3, 1, math.inf, 0), LrTrial(4e-3, 1, math.inf, 0)]
    assert pick(diverged, 2e-3) == 1e-3
    assert pick([LrTrial(1e-3, 1, math.inf, 0), LrTrial(2e-3, 1, math.inf, 0)], 2e-3) == 1e-3
    assert LrTrial(2e-3, 1, math.inf, 0.0).as_record()["val_loss"] is None


def test_stop_after_trains_the_first_epochs_of_the_long_schedule(minilm_data):
    enc, pad = minilm_data
    runs = {}
    for stop in (None, 1):
        model, _ = _lora_model()
        s = TrainSettings(epochs=3, lr=2e-3, batch_size=8, precision="fp32", stop_after=stop)
        torch.manual_seed(0)
        res = train(model, enc["train"], enc["validation"], s, pad_id=pad, device=CPU, log=lambda m: None,
                    progress=False)
        runs[stop] = res
    assert len(runs[1].history) == 1 and runs[1].kept_epoch == 1 and len(runs[None].history) == 3
    assert runs[1].history[0] == {**runs[None].history[0], "seconds": runs[1].history[0]["seconds"],
                                  "tokens_per_s": runs[1].history[0]["tokens_per_s"],
                                  "samples_per_s": runs[1].history[0]["samples_per_s"]}
    # the rate at the end of epoch 1 is the 3-epoch schedule's, not a 1-epoch schedule decayed to zero
    assert runs[1].history[0]["lr"] > 0.5 * 2e-3


def test_search_tries_three_rates_and_leaves_the_model_as_it_found_it(minilm_data):
    enc, pad = minilm_data
    model, cfg = _lora_model()
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    s = TrainSettings(epochs=3, lr=2e-3, batch_size=8, precision="fp32", class_weights=[1.5, 0.75])
    lines = []
    chosen, trials, seconds = search_lr(model, enc["train"], enc["validation"], s, 2e-3,
                                        lambda lr: STRATEGIES["lora"].param_groups(model, cfg, lr), pad_id=pad,
                                        device=CPU, log=lines.append)
    assert [t.lr for t in trials] == pytest.approx([1e-3, 2e-3, 4e-3]) and seconds > 0
    assert chosen == min(trials, key=lambda t: t.val_loss).lr
    assert all(t.epochs == 1 and math.isfinite(t.val_loss) for t in trials) and len(lines) == 3
    assert len({round(t.val_loss, 6) for t in trials}) == 3  # the rates trained differently
    after = model.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before)
    # a trial is the run's own first epoch at that rate: a fresh model trained so gives its loss
    fresh, _ = _lora_model()
    torch.manual_seed(0)
    from dataclasses import replace
    train(fresh, enc["train"], enc["validation"], replace(s, lr=4e-3, stop_after=1), pad_id=pad, device=CPU,
          param_groups=STRATEGIES["lora"].param_groups(fresh, cfg, 4e-3), log=lambda m: None, progress=False)
    from lorafit.metrics import weighted_cross_entropy
    from lorafit.training import predict_logits
    logits = torch.from_numpy(predict_logits(fresh, enc["validation"], batch_size=16, pad_id=pad, device=CPU,
                                             precision="fp32"))
    loss = weighted_cross_entropy(logits, torch.from_numpy(enc["validation"].labels).long(),
                                  torch.tensor([1.5, 0.75])).item()
    assert trials[2].val_loss == pytest.approx(loss, abs=1e-6)


def test_a_diverging_trial_loses(minilm_data, monkeypatch):
    enc, pad = minilm_data
    model, cfg = _lora_model()
    real = search_mod.train

    def train_or_diverge(model, *a, **k):
        if a[2].lr > 3e-3:
            raise TrainingDiverged("loss became nan")
        return real(model, *a, **k)

    monkeypatch.setattr(search_mod, "train", train_or_diverge)
    s = TrainSettings(epochs=1, lr=2e-3, batch_size=8, precision="fp32")
    chosen, trials, _ = search_lr(model, enc["train"], enc["validation"], s, 2e-3,
                                  lambda lr: STRATEGIES["lora"].param_groups(model, cfg, lr), pad_id=pad,
                                  device=CPU, log=lambda m: None)
    assert trials[2].val_loss == math.inf and chosen in (1e-3, 2e-3)


def test_lr_auto_is_a_setting_and_other_words_are_errors(tmp_path):
    """auto in any case, spaces around it ignored, from the API, a config file, a flag or a sweep."""
    from lorafit.cli import _lr_value
    from lorafit.grid import parse_grid

    for text in ("auto", " Auto ", "AUTO"):
        assert RunConfig(lr=text).lr == "auto"
        assert _lr_value(text) == "auto"
        assert parse_grid({"lr": [f"{text},1e-3"]})[1] == {"lr": ["auto", 1e-3]}
    with pytest.raises(ConfigError, match="--lr"):
        RunConfig(lr="fast")
    from lorafit.config import read_config_file
    f = tmp_path / "c.toml"
    f.write_text('lr = " Auto"\n')
    assert read_config_file(f)["lr"] == "auto"
    f.write_text('lr = "quick"\n')
    with pytest.raises(ConfigError, match="lr"):
        read_config_file(f)


def test_a_run_with_lr_auto_records_its_trials_and_trains_as_the_chosen_rate_would(tmp_path):
    common = dict(train_size=24, val_size=8, test_size=8, max_length=64, epochs=1, precision="fp32")
    auto_dir = tmp_path / "panel" / "imdb" / "seed0" / "lora-lrauto"  # as benchmarks/panel.py lays runs out
    auto = run_training(RunConfig(lr="auto", **common), auto_dir, progress=False)
    config = json.loads((auto_dir / "config.json").read_text())
    trials = config["lr_search"]["trials"]
    default = learning_rate(RunConfig())  # lora's: the search tries half, it and twice it
    assert [t["lr"] for t in trials] == pytest.approx([default / 2, default, 2 * default])
    chosen = config["lr_resolved"]
    assert chosen == min(trials, key=lambda t: t["val_loss"])["lr"] and auto["lr"] == chosen
    assert auto["lr_search"] == config["lr_search"]
    fixed = run_training(RunConfig(lr=chosen, **common), tmp_path / "fixed", progress=False)
    assert fixed["test_accuracy"] == auto["test_accuracy"]
    a = load_file(auto_dir / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "fixed" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # benchmarks/studies/lr_auto.py gathers what the search chose from such a folder
    out = tmp_path / "chosen.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "studies" / "lr_auto.py"), "--runs",
                        str(tmp_path / "panel"), "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    (rec,) = json.loads(out.read_text())["records"]
    assert (rec["dataset"], rec["seed"], rec["tag"], rec["lr_chosen"]) == ("imdb", 0, "lrauto", chosen)
    assert rec["trials"] == trials and rec["test_macro_f1"] == auto["test_macro_f1"]
    assert rec["search_over_train"] == pytest.approx(config["lr_search"]["seconds"] / auto["train_seconds"])
