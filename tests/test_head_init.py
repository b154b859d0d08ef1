"""--head-init probe: the classifier starts as a logistic regression on its frozen inputs."""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from cli_helpers import lorafit
from lorafit.head_init import L2_GRID, fit_logistic, fit_probe, init_head_from_probe
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


def test_a_run_starts_from_the_probe_records_it_and_resumes_to_the_same_weights(tmp_path, tiny_model_dir):
    """The real CLI: config.json records the fit; a run killed in epoch 2 resumes (without
    fitting again) to the uninterrupted run's weights, bit for bit; --no-train-head is a
    clear error."""
    args = ["train", "--model", str(tiny_model_dir), "--precision", "fp32", "--train-size", "48", "--val-size", "16",
            "--test-size", "16", "--max-length", "64", "--batch-size", "8", "--epochs", "2", "--no-progress",
            "--strategy", "lora", "--head-init", "probe"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    r = lorafit(*args, "--out", str(ref))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "head init: logistic regression on classifier's frozen inputs" in r.stdout
    rec = json.loads((ref / "config.json").read_text())
    assert rec["head_init"] == "probe" and rec["head_init_probe"]["l2"] in L2_GRID
    assert 0 < rec["head_init_probe"]["val_loss"] < 10
    killed = lorafit(*args, "--out", str(run), env={"LORAFIT_SIGNAL_AT": "step@8:KILL"})
    assert killed.returncode == -signal.SIGKILL and not (run / "final.json").exists()
    resumed = lorafit("train", "--resume", str(run), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed at epoch 2" in resumed.stdout and "head init" not in resumed.stdout
    for path in sorted(ref.rglob("*.safetensors")):
        a, b = load_file(path), load_file(run / path.relative_to(ref))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), path.name
    fitted = json.loads((run / "config.json").read_text())["head_init_probe"]
    assert {k: fitted[k] for k in ("l2", "val_loss")} == {k: rec["head_init_probe"][k] for k in ("l2", "val_loss")}
    bad = lorafit(*args, "--no-train-head", "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "needs it to train" in bad.stderr and "Traceback" not in bad.stderr
