"""How a head starts. `--head-init probe`: the new classifier layer from a logistic regression
on the frozen model's features, then fine-tune (linear probing, then fine-tuning; Kumar et
al. 2022, "Fine-Tuning can Distort Pretrained Features"). `--standardize` (last-two-layers):
the head's first layer folded so that it reads standardized features (`fold_standardization`).

A random classifier sends random gradients into the layers below it for the first steps;
a classifier fitted on the features those layers already give starts the run at the
probe's loss, so the first steps refine the features instead of undoing them.

The fit: multinomial logistic regression on the classifier layer's input over the
training split (the model in eval mode, so no dropout), loss `weighted_cross_entropy`
with the run's class weights plus `l2 / 2 · ||W||²`, solved by L-BFGS. The strength `l2`
is chosen on the validation split's (weighted) loss from `L2_GRID`; a tie goes to the
stronger one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lorafit.feature_cache import FeatureSet, HeadOnCache, extract_features
from lorafit.metrics import weighted_cross_entropy

L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)


@dataclass
class ProbeFit:
    """One fitted classifier: weight (K, H), bias (K,), its strength and validation loss."""

    weight: torch.Tensor
    bias: torch.Tensor
    l2: float
    val_loss: float


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_labels: int, l2: float,
                 class_weights: torch.Tensor | None, *, max_iter: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight (K, H) and bias (K,) minimising weighted CE + l2/2 ||W||² on x (N, H), y (N,)."""
    w = torch.zeros(num_labels, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_labels, dtype=torch.float64, requires_grad=True)
    x64, cw = x.double(), None if class_weights is None else class_weights.double()
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = weighted_cross_entropy(x64 @ w.T + b, y, cw) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().float(), b.detach().float()


def fit_probe(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor], num_labels: int,
              class_weights: list[float] | None) -> ProbeFit:
    """The L2_GRID fit with the lowest validation loss; features (N, H), labels (N,)."""
    cw = None if class_weights is None else torch.tensor(class_weights, dtype=torch.float64)
    best = None
    for l2 in sorted(L2_GRID, reverse=True):  # strongest first: a tie keeps it
        w, b = fit_logistic(*train, num_labels, l2, cw)
        with torch.no_grad():
            loss = float(weighted_cross_entropy(val[0].double() @ w.T.double() + b.double(), val[1], cw))
        if best is None or loss < best.val_loss - 1e-9:
            best = ProbeFit(w, b, l2, loss)
    return best


def init_head_from_probe(classifier: nn.Linear, features: Callable[[str], tuple[torch.Tensor, torch.Tensor]],
                         class_weights: list[float] | None) -> ProbeFit:
    """Fit on features("train"), choose on features("validation"), copy into `classifier`."""
    fit = fit_probe(features("train"), features("validation"), classifier.out_features, class_weights)
    with torch.no_grad():
        classifier.weight.copy_(fit.weight.to(classifier.weight.dtype))
        classifier.bias.copy_(fit.bias.to(classifier.bias.dtype))
    return fit


STD_FLOOR = 1e-6
"""A feature whose standard deviation over the training split is below this is centred, not scaled."""


def fold_standardization(layer: nn.Linear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewrite `layer` in place so that it computes, on raw input, what it computed on the
    standardized input: layer'(x) = layer((x - mean) / std), with the per-feature mean (H,)
    and standard deviation (H,) of x (N, H); returns them, the standard deviation as measured
    (a feature under STD_FLOOR, such as the few all-MiniLM-L6-v2 keeps at zero, is divided by 1).

    W' = W / std (each input column scaled), b' = b - W' mean. A linear probe reads
    standardized features; a head on raw mean-pooled features reads features whose spreads
    differ severalfold (all-MiniLM-L6-v2 on IMDb: 0.036 to 0.098) and trains at one rate on all."""
    x = x.double()
    mean, measured = x.mean(0), x.std(0)
    std = torch.where(measured < STD_FLOOR, torch.ones_like(measured), measured)
    with torch.no_grad():
        w = layer.weight.double() / std  # (out, H) / (H,)
        layer.bias.copy_((layer.bias.double() - w @ mean).to(layer.bias.dtype))
        layer.weight.copy_(w.to(layer.weight.dtype))
    return mean.float(), measured.float()


def classifier_inputs(model: nn.Module, name: str, train_model: nn.Module, split, *, batch_size: int, pad_id: int,
                      device: torch.device, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, H) inputs of the classifier layer `name` in eval mode, and (N,) labels, of one split.

    `train_model` is the strategy's training view: the model itself, with `split` an
    `Encoded`, or a `HeadOnCache` on the encoder's cached output, with `split` its
    `FeatureSet`; then only the head's first layer and activation run."""
    if isinstance(train_model, HeadOnCache):
        assert isinstance(split, FeatureSet)
        with torch.no_grad():
            x = train_model.act(train_model.first(split.features.to(device))).float().cpu()  # (N, H)
        return x, torch.as_tensor(split.labels)
    fs = extract_features(model, name, split, batch_size=batch_size, pad_id=pad_id, device=device,
                          precision=precision)
    return fs.features, torch.as_tensor(fs.labels)
