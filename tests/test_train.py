"""The training loop's behaviour (lorafit/train.py), with the real embedded model and data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lorafit.train as train_mod
from lorafit.config import RunConfig
from lorafit.data import load_dataset
from lorafit.data.encoding import encode_split
from lorafit.models import load_model
from lorafit.strategies import STRATEGIES
from lorafit.train import TrainSettings, f1_score, train


@pytest.fixture(scope="module")
def minilm_data(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    loaded = load_model(None, seed=0)
    d = load_dataset(None, train_size=16, val_size=8, test_size=8)
    enc = {n: encode_split(getattr(d, n), loaded.tokenizer, 64, cache_dir=cache)
           for n in ("train", "validation", "test")}
    return enc, loaded.tokenizer.pad_token_id


def _model(strategy: str):
    loaded = load_model(None, seed=0)
    torch.manual_seed(0)
    STRATEGIES[strategy].setup(loaded.model, RunConfig(strategy=strategy))
    return loaded.model


def test_overfit_drives_training_loss_down(minilm_data):
    enc, pad = minilm_data
    model = _model("full")
    s = TrainSettings(epochs=8, lr=3e-4, batch_size=8, warmup_ratio=0.0, precision="fp32")
    res = train(model, enc["train"], enc["validation"], s, pad_id=pad, device=torch.device("cpu"),
                log=lambda m: None, progress=False)
    losses = [h["train_loss"] for h in res.history]
    assert losses[-1] < 0.5 * losses[0]
    assert res.history[-1]["train_accuracy"] >= 0.9


@pytest.mark.parametrize("keep, kept", [("best", 2), ("last", 3)])
def test_kept_weights_are_the_chosen_epochs(minilm_data, monkeypatch, keep, kept):
    enc, pad = minilm_data
    model = _model("lora")
    accs = iter([0.5, 0.9, 0.7])
    monkeypatch.setattr(train_mod, "evaluate", lambda *a, **k: {"loss": 0.1, "accuracy": next(accs), "f1": 0.5})
    snaps = []

    def on_epoch(row):
        snaps.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})

    s = TrainSettings(epochs=3, lr=5e-3, batch_size=8, precision="fp32", keep=keep)
    res = train(model, enc["train"], enc["validation"], s, pad_id=pad, device=torch.device("cpu"),
                log=lambda m: None, progress=False, on_epoch=on_epoch)
    assert res.best_epoch == 2 and res.kept_epoch == kept
    now = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(torch.equal(now[n], snaps[kept - 1][n]) for n in now)
    other = 3 if kept == 2 else 2
    assert not all(torch.equal(now[n], snaps[other - 1][n]) for n in now)


def test_same_seed_same_results_fp32(minilm_data):
    enc, pad = minilm_data
    runs = []
    for _ in range(2):
        model = _model("lora")
        s = TrainSettings(epochs=1, lr=1e-3, batch_size=8, precision="fp32")
        res = train(model, enc["train"], enc["validation"], s, pad_id=pad, device=torch.device("cpu"),
                    log=lambda m: None, progress=False)
        runs.append((res.history[0]["train_loss"], res.history[0]["val_loss"],
                     {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}))
    assert runs[0][:2] == runs[1][:2]
    assert all(torch.equal(runs[0][2][n], runs[1][2][n]) for n in runs[0][2])


def test_nan_loss_stops_with_advice(minilm_data):
    enc, pad = minilm_data
    model = _model("lora")
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))
    s = TrainSettings(epochs=1, lr=1e-3, batch_size=8, precision="fp32")
    with pytest.raises(train_mod.TrainingDiverged, match=r"epoch 1, step 1.*Lower the learning rate"):
        train(model, enc["train"], enc["validation"], s, pad_id=pad, device=torch.device("cpu"),
              log=lambda m: None, progress=False)


def test_f1():
    y = np.array([1, 1, 0, 0])
    assert f1_score(y, np.array([1, 0, 0, 0]), 2) == pytest.approx(2 / 3)
    assert f1_score(y, y, 2) == 1.0


def test_full_disk_is_refused_before_training(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from lorafit.errors import RunDirError
    from lorafit.runs import run_training

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 2**20, 2**20))
    with pytest.raises(RunDirError, match="MB free where .* checkpoints need about"):
        run_training(RunConfig(strategy="full", train_size=16, val_size=4, test_size=4), tmp_path / "run")
    assert not (tmp_path / "run").exists()
