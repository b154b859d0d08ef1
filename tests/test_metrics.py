"""lorafit.metrics: the per-class numbers equal scikit-learn's; the collapse warning and the
class-balance rules fire where they should and nowhere else."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lorafit import metrics

sk = pytest.importorskip("sklearn.metrics")


def _logits(preds: np.ndarray, k: int) -> np.ndarray:
    return np.eye(k, dtype=np.float32)[preds] * 3.0


@pytest.mark.parametrize("seed, k", [(0, 2), (1, 3), (2, 5), (3, 3)])
def test_per_class_metrics_and_confusion_equal_scikit_learns(seed, k):
    rng = np.random.default_rng(seed)
    labels = rng.choice(k, 200, p=np.r_[0.6, np.full(k - 1, 0.4 / (k - 1))])
    preds = np.where(rng.random(200) < 0.7, labels, rng.integers(0, k, 200))
    if seed == 3:
        preds[preds == 2] = 0  # a class never predicted: precision 0, as scikit-learn's zero_division=0
    names = [f"c{i}" for i in range(k)]
    r = metrics.report(_logits(preds, k), labels, names)
    p, rec, f1, support = sk.precision_recall_fscore_support(labels, preds, labels=range(k), zero_division=0)
    assert [c["precision"] for c in r["per_class"]] == pytest.approx(p)
    assert [c["recall"] for c in r["per_class"]] == pytest.approx(rec)
    assert [c["f1"] for c in r["per_class"]] == pytest.approx(f1)
    assert [c["support"] for c in r["per_class"]] == support.tolist()
    assert [c["label"] for c in r["per_class"]] == names
    assert r["confusion"] == sk.confusion_matrix(labels, preds, labels=range(k)).tolist()
    assert r["macro_f1"] == pytest.approx(sk.f1_score(labels, preds, average="macro", zero_division=0))
    assert r["accuracy"] == pytest.approx(sk.accuracy_score(labels, preds))
    binary_or_macro = sk.f1_score(labels, preds, average="binary" if k == 2 else "macro", zero_division=0)
    assert r["f1"] == pytest.approx(binary_or_macro)
    assert r["majority_share"] == pytest.approx(np.bincount(labels).max() / len(labels))


def test_collapse_warning_fires_on_a_collapsed_model_and_not_on_a_healthy_one():
    labels = np.array([0] * 85 + [1] * 15)
    collapsed = metrics.report(_logits(np.zeros(100, dtype=int), 2), labels, ["ham", "spam"])
    line = metrics.collapse_warning(collapsed["confusion"], ["ham", "spam"])
    assert line is not None and "'ham' for 100% of the test texts" in line and "--class-weights balanced" in line
    healthy = labels.copy()
    healthy[[0, 1, 90]] = 1 - healthy[[0, 1, 90]]  # three mistakes, both classes predicted
    ok = metrics.report(_logits(healthy, 2), labels, ["ham", "spam"])
    assert metrics.collapse_warning(ok["confusion"], ["ham", "spam"]) is None
    # one class for nearly all texts is no collapse where nearly all texts are of it
    skewed = np.array([0] * 97 + [1] * 3)
    mostly = metrics.report(_logits(np.r_[np.zeros(99, dtype=int), [1]], 2), skewed, ["a", "b"])
    assert metrics.collapse_warning(mostly["confusion"], ["a", "b"]) is None
    # three classes, 96% given to the majority of 64%
    three = np.array([0] * 64 + [1] * 27 + [2] * 9)
    preds = np.zeros(100, dtype=int)
    preds[[70, 71, 72, 95]] = [1, 1, 2, 2]
    assert metrics.collapse_warning(metrics.report(_logits(preds, 3), three, list("abc"))["confusion"], list("abc"))


def test_balanced_class_weights_are_scikit_learns_and_auto_follows_the_skew():
    from sklearn.utils.class_weight import compute_class_weight

    labels = np.array([0] * 385 + [1] * 161 + [2] * 54)
    counts = np.bincount(labels).tolist()
    assert metrics.class_weights(counts, "balanced") == pytest.approx(
        compute_class_weight("balanced", classes=np.arange(3), y=labels))
    assert metrics.class_weights(counts, "auto") == metrics.class_weights(counts, "balanced")
    assert metrics.class_weights(counts, "none") is None
    assert metrics.class_weights([495, 495], "auto") is None  # IMDb: balanced, the plain loss
    assert metrics.class_weights([500, 400], "auto") is None  # within 1.5x
    assert metrics.class_weights([500, 300], "auto") is not None
    assert metrics.selection_metric([495, 495]) == "accuracy" and metrics.selection_metric(counts) == "macro_f1"
    # the mean weight over the training examples is 1: the learning rate keeps its meaning
    w = np.array(metrics.class_weights(counts, "balanced"))
    assert w[labels].mean() == pytest.approx(1.0)


def test_weighted_cross_entropy_is_the_per_example_weighted_mean():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(8, 3, generator=g), torch.tensor([0, 0, 0, 0, 0, 1, 1, 2])
    w = torch.tensor([0.5, 1.0, 4.0])
    per = F.cross_entropy(logits, labels, reduction="none")
    assert metrics.weighted_cross_entropy(logits, labels, w).item() == pytest.approx((per * w[labels]).mean().item())
    assert metrics.weighted_cross_entropy(logits, labels, None).item() == pytest.approx(per.mean().item())
    # a batch of majority examples only is weighted down, not renormalised to a full-size step
    only0 = labels == 0
    assert metrics.weighted_cross_entropy(logits[only0], labels[only0], w).item() == pytest.approx(
        0.5 * per[only0].mean().item())
