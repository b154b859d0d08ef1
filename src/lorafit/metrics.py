"""Classification metrics that tell the truth on skewed data, and the class-balance rules.

Everything here reads predictions and labels; nothing runs a model. The per-class
numbers follow scikit-learn's definitions (`precision_recall_fscore_support`,
`confusion_matrix`; a class never predicted has precision 0), which the tests check.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

SKEW_RATIO = 1.5
"""Classes are skewed when the largest training class holds more than this many times
the examples of the smallest (IMDb's 50/50 is not; 64/27/9 and 85/15 are)."""

COLLAPSE_SHARE = 0.95
"""A model has collapsed when it gives one class to at least this share of the texts..."""
COLLAPSE_TRUE_SHARE = 0.90
"""...while that class is less than this share of their true labels."""

CLASS_WEIGHTS = ("auto", "balanced", "none")


def is_skewed(counts: list[int] | np.ndarray) -> bool:
    """Whether class counts (K,) are skewed (see SKEW_RATIO)."""
    c = np.asarray(counts, dtype=float)
    return bool(c.min() == 0 or c.max() / c.min() > SKEW_RATIO)


def class_weights(counts: list[int] | np.ndarray, mode: str) -> list[float] | None:
    """Loss weight per class (K,), or None for the plain mean loss.

    `balanced`: n / (K · n_k), scikit-learn's rule, so every class carries the same
    total weight and the mean weight over the training examples is 1 (the learning
    rate keeps its meaning). `auto`: balanced where the counts are skewed, else none.
    """
    if mode == "none" or (mode == "auto" and not is_skewed(counts)):
        return None
    c = np.asarray(counts, dtype=float)
    return (c.sum() / (len(c) * np.maximum(c, 1))).tolist()


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean over the batch of w[y_i] · CE_i; logits (B, K), labels (B,), weight (K,) or None.

    Unlike `F.cross_entropy(weight=...)`, which divides by the batch's summed weights, this
    divides by B, so a batch without minority examples does not count as much as one
    with them: over an epoch each class pulls with the same total weight.
    """
    if weight is None:
        return F.cross_entropy(logits, labels)
    return (F.cross_entropy(logits, labels, reduction="none") * weight[labels]).mean()


def f1_score(labels: np.ndarray, preds: np.ndarray, num_labels: int) -> float:
    """Binary: F1 of class 1; more classes: macro F1."""
    f1 = per_class(labels, preds, num_labels)["f1"]
    return float(f1[1]) if num_labels == 2 else float(f1.mean())


def confusion(labels: np.ndarray, preds: np.ndarray, num_labels: int) -> np.ndarray:
    """(K, K) counts: row = true class, column = predicted class."""
    m = np.zeros((num_labels, num_labels), dtype=np.int64)
    np.add.at(m, (labels, preds), 1)
    return m


def per_class(labels: np.ndarray, preds: np.ndarray, num_labels: int) -> dict[str, np.ndarray]:
    """precision, recall, f1, support per class (each (K,)); 0 where undefined."""
    return _per_class_of(confusion(labels, preds, num_labels))


def _per_class_of(m: np.ndarray) -> dict[str, np.ndarray]:
    """`per_class` from a (K, K) confusion matrix."""
    tp = np.diag(m).astype(float)
    predicted, support = m.sum(axis=0).astype(float), m.sum(axis=1).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(predicted + support > 0, 2 * tp / (predicted + support), 0.0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support.astype(np.int64)}


def metrics_from_logits(logits: np.ndarray, labels: np.ndarray) -> dict:
    """Loss, accuracy, f1 (binary: of class 1; else macro), macro_f1, the majority class's
    share of `labels`, and the share of the most predicted class; logits (N, K), labels (N,)."""
    return _summary(logits, labels)[0]


def _summary(logits: np.ndarray, labels: np.ndarray) -> tuple[dict, np.ndarray]:
    """`metrics_from_logits`, and the (K, K) confusion matrix it was computed from."""
    k = logits.shape[1]
    preds = logits.argmax(axis=1)
    m = confusion(labels, preds, k)
    if not len(labels):
        return {"loss": float("nan"), "accuracy": float("nan"), "f1": 0.0, "macro_f1": 0.0,
                "majority_share": float("nan"), "top_predicted_share": float("nan")}, m
    pc = _per_class_of(m)
    return {"loss": F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)).item(),
            "accuracy": float(np.mean(preds == labels)),
            "f1": float(pc["f1"][1]) if k == 2 else float(pc["f1"].mean()),
            "macro_f1": float(pc["f1"].mean()),
            "majority_share": float(np.bincount(labels, minlength=k).max() / len(labels)),
            "top_predicted_share": float(np.bincount(preds, minlength=k).max() / len(preds))}, m


def report(logits: np.ndarray, labels: np.ndarray, label_names: list[str]) -> dict:
    """`metrics_from_logits` plus per class (name, precision, recall, f1, support) and the
    confusion matrix (rows true, columns predicted, in `label_names` order)."""
    out, m = _summary(logits, labels)
    pc = _per_class_of(m)
    out["per_class"] = [{"label": name, "precision": float(pc["precision"][i]), "recall": float(pc["recall"][i]),
                         "f1": float(pc["f1"][i]), "support": int(pc["support"][i])}
                        for i, name in enumerate(label_names)]
    out["confusion"] = m.tolist()
    return out


def collapse_warning(confusion_matrix: list[list[int]], label_names: list[str]) -> str | None:
    """One line when the model gives one class to nearly every text (COLLAPSE_SHARE) that
    is mostly not of that class (COLLAPSE_TRUE_SHARE), with what to try; else None."""
    m = np.asarray(confusion_matrix)
    n = m.sum()
    if n == 0:
        return None
    predicted, true = m.sum(axis=0) / n, m.sum(axis=1) / n
    top = int(predicted.argmax())
    if predicted[top] < COLLAPSE_SHARE or true[top] >= COLLAPSE_TRUE_SHARE:
        return None
    return (f"warning: the model predicts {label_names[top]!r} for {100 * predicted[top]:.0f}% of the test texts, "
            f"which are {100 * true[top]:.0f}% {label_names[top]!r}: it has collapsed to one class. Try "
            "--class-weights balanced, more epochs (--epochs), another learning rate (--lr), or more training data")


def selection_metric(train_counts: list[int]) -> str:
    """What `--keep best` compares across epochs: validation macro-F1 where the training
    classes are skewed (accuracy rewards predicting the majority), else accuracy."""
    return "macro_f1" if is_skewed(train_counts) else "accuracy"
