"""--head-init probe: the classifier starts as a logistic regression on its frozen inputs."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from torch import nn

from conftest import ARCHS, tiny_model
from lorafit.head_init import (L2_GRID, STD_FLOOR, classifier_inputs, fit_logistic, fit_probe,
                               fold_standardization, init_head_from_probe)
from lorafit.metrics import weighted_cross_entropy


def _blobs(n: int, seed: int, k: int = 3, h: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, H) features around K class centres, (N,) labels; class 0 has most examples."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, h, generator=g) * 1.5
    y = torch.cat([torch.zeros(n // 2, dtype=torch.long), torch.randint(1, k, (n - n // 2,), generator=g)])
    return centres[y] + torch.randn(n, h, generator=g), y


@pytest.mark.parametrize("weighted", [False, True])
def test_fit_equals_scikit_learns_logistic_regression(weighted):
    """The same objective as scikit-learn's multinomial LogisticRegression with C = 1 / (n l2),
    class_weight = the run's weights, and an unpenalised intercept."""
    from sklearn.linear_model import LogisticRegression

    x, y = _blobs(300, seed=1)
    cw = [0.5, 2.0, 3.0] if weighted else None
    l2 = 1e-2
    w, b = fit_logistic(x, y, 3, l2, None if cw is None else torch.tensor(cw, dtype=torch.float64))
    ref = LogisticRegression(C=1 / (len(y) * l2), class_weight=None if cw is None else dict(enumerate(cw)),
                             tol=1e-10, max_iter=10_000).fit(x.numpy(), y.numpy())
    cwt = None if cw is None else torch.tensor(cw, dtype=torch.float64)

    def objective(w, b) -> float:
        w, b = torch.as_tensor(w, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
        return float(weighted_cross_entropy(x.double() @ w.T + b, y, cwt) + 0.5 * l2 * (w * w).sum())

    # at least as low on the shared objective (scikit-learn's L-BFGS stops a little earlier), and the same
    # minimum: softmax is unchanged by a constant added to every class's logit, so compare centred
    assert objective(w, b) <= objective(ref.coef_, ref.intercept_) + 1e-9
    np.testing.assert_allclose(w.numpy() - w.numpy().mean(0), ref.coef_ - ref.coef_.mean(0), atol=2e-3)
    np.testing.assert_allclose(b.numpy() - b.numpy().mean(), ref.intercept_ - ref.intercept_.mean(), atol=2e-3)


def test_the_strength_is_chosen_on_validation_and_stronger_wins_a_tie():
    x, y = _blobs(400, seed=2)
    train, val = (x[:300], y[:300]), (x[300:], y[300:])
    fit = fit_probe(train, val, 3, None)
    losses = {}
    for l2 in L2_GRID:
        w, b = fit_logistic(*train, 3, l2, None)
        losses[l2] = float(weighted_cross_entropy(val[0] @ w.T + b, val[1], None))
    assert fit.l2 == min(losses, key=lambda k: (round(losses[k], 9), -k))
    assert fit.val_loss == pytest.approx(losses[fit.l2], abs=1e-6)
    # identical train and validation features with uninformative labels: every strength ties near ln 3
    flat = (torch.zeros(30, 4), torch.arange(30) % 3)
    assert fit_probe(flat, flat, 3, None).l2 == max(L2_GRID)


def test_the_fitted_head_beats_chance_and_lands_in_the_layer():
    x, y = _blobs(400, seed=3)
    layer = nn.Linear(8, 3)
    fit = init_head_from_probe(layer, lambda split: (x[:300], y[:300]) if split == "train" else (x[300:], y[300:]),
                               None)
    assert torch.equal(layer.weight.detach(), fit.weight) and torch.equal(layer.bias.detach(), fit.bias)
    with torch.no_grad():
        acc = (layer(x[300:]).argmax(1) == y[300:]).float().mean()
    assert acc > 0.8 and fit.val_loss < np.log(3) - 0.3


def test_head_init_settings_are_checked_before_anything_loads():
    from lorafit.config import RunConfig
    from lorafit.errors import ConfigError

    assert RunConfig(head_init="probe").head_init == "probe"
    with pytest.raises(ConfigError, match=r"head_init \(--head-init\) must be one of random, probe"):
        RunConfig(head_init="zeros")
    with pytest.raises(ConfigError, match="give --train-head"):
        RunConfig(head_init="probe", train_head=False)
    RunConfig(head_init="probe", train_head=False, strategy="full")  # full trains its classifier anyway


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_and_plain_views_give_the_classifier_the_same_inputs(arch):
    """last-two-layers with --cache computes the classifier's inputs from the cached encoder
    output (only the head's first layer and activation run); the plain view runs the whole
    model and grabs them: the two agree, on every architecture's head."""
    from lorafit.config import RunConfig
    from lorafit.feature_cache import HeadOnCache, extract_features
    from lorafit.strategies import STRATEGIES, head_layers
    from test_feature_cache import _encoded

    model = tiny_model(arch)
    STRATEGIES["last-two-layers"].setup(model, RunConfig(strategy="last-two-layers"))
    head = head_layers(model)
    enc = _encoded(n=12)
    kw = dict(batch_size=4, pad_id=0, device=torch.device("cpu"), precision="fp32")
    cached = extract_features(model, head[0], enc, **kw)
    x_plain, y_plain = classifier_inputs(model, head[1], model, enc, **kw)
    x_cached, y_cached = classifier_inputs(model, head[1], HeadOnCache(model, *head), cached, **kw)
    assert x_plain.shape == (12, model.get_submodule(head[1]).in_features)
    torch.testing.assert_close(x_cached, x_plain, atol=1e-6, rtol=0)
    assert torch.equal(y_cached, y_plain) and torch.equal(y_plain, torch.as_tensor(enc.labels))
    assert x_plain.std(0).max() > 1e-3  # the texts give different inputs


def test_the_study_script_reads_back_what_each_run_fitted(tmp_path):
    """benchmarks/studies/head_init.py: one record per finished run whose config.json records a
    fit, laid out as benchmarks/panel.py lays runs out; runs without one, or unfinished, are
    left out; nothing found is exit status 2."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "studies"))
    from head_init import main, records

    def run(path, fit, final=True):
        path.mkdir(parents=True)
        (path / "config.json").write_text(json.dumps({"head_init_probe": fit} if fit else {}))
        if final:
            (path / "final.json").write_text(json.dumps({"train_seconds": 40.0, "test_macro_f1": 0.5,
                                                         "test_accuracy": 0.6, "cpu": "x", "precision": "fp32"}))

    fit = {"l2": 0.01, "val_loss": 0.9, "seconds": 4.0}
    run(tmp_path / "drugs" / "seed2" / "lora-headinit", fit)
    run(tmp_path / "drugs" / "seed0" / "lora", None)  # a default run: no fit
    run(tmp_path / "rt" / "seed1" / "lora-headinit", fit, final=False)  # unfinished
    assert [(r["dataset"], r["seed"], r["run"], r["l2"], r["fit_over_train"]) for r in records(tmp_path)] == [
        ("drugs", 2, "lora-headinit", 0.01, 0.1)]
    assert main(["--runs", str(tmp_path), "--out", str(tmp_path / "fits.json")]) == 0
    assert len(json.loads((tmp_path / "fits.json").read_text())["records"]) == 1
    assert main(["--runs", str(tmp_path / "drugs" / "seed0"), "--out", str(tmp_path / "none.json")]) == 2


def test_the_folded_layer_computes_the_original_on_standardized_input():
    """fold_standardization: layer'(x) = layer((x - mean) / std) for any x, with the mean and
    standard deviation of the features it was given; a constant feature is centred, not scaled;
    what the folded layer gives the training features has mean b and the original's spread."""
    g = torch.Generator().manual_seed(3)
    scales = torch.logspace(-3, 1, 8)  # features hundreds of times apart, as mean-pooled ones are
    x = torch.randn(200, 8, generator=g) * scales + torch.randn(8, generator=g)
    x[:, 5] = 0.25  # constant over the training split
    layer = nn.Linear(8, 6)
    torch.nn.init.normal_(layer.weight, generator=g)
    original = nn.Linear(8, 6)
    original.load_state_dict(layer.state_dict())
    mean, std = fold_standardization(layer, x)
    torch.testing.assert_close(mean, x.double().mean(0).float())
    torch.testing.assert_close(std, x.double().std(0).float())  # as measured; the constant feature's is 0
    assert std[5] < STD_FLOOR and (std[torch.arange(8) != 5] > STD_FLOOR).all()
    divisor = torch.where(std < STD_FLOOR, torch.ones_like(std), std)  # the constant one is centred, not scaled
    fresh = torch.randn(50, 8, generator=g) * scales  # not the training features: the identity holds for any input
    with torch.no_grad():
        torch.testing.assert_close(layer(fresh), original((fresh - mean) / divisor), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(layer(x).mean(0), original.bias, rtol=1e-4, atol=1e-4)
