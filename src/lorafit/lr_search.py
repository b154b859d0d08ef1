"""`--lr auto`: a run's peak learning rate chosen on its own held-out data.

Each candidate rate (the strategy's default times 1/2, 1 and 2) trains the run's own
schedule (its epochs, warm-up and decay, seed and batch order) from the run's initial
weights through the first third of its epochs (at least one), and is judged on the
validation split's cross-entropy, class-weighted where the run weights its classes
(`metrics.weighted_cross_entropy`): the same loss the run minimises, on examples it does
not train on. The lowest wins (a tie: the candidate nearer the default); a candidate
whose loss diverges loses. The model is put back to its initial weights after each
trial, so the run then starts exactly as a run with `--lr <chosen>` would.

It costs about one more run's training (three trials of a third each); docs/recipe.md
says what it bought on the panel.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable

import torch
from torch import nn

from lorafit.data.encoding import Encoded
from lorafit.errors import Interrupted
from lorafit.metrics import metrics_from_logits, weighted_cross_entropy
from lorafit.training import TrainingDiverged, TrainSettings, predict_logits, train

MULTIPLIERS = (0.5, 1.0, 2.0)
"""Candidate rates, as multiples of the strategy's default."""


@dataclass
class LrTrial:
    """One candidate's short run: its peak rate, the epochs it trained of the run's
    schedule, and its validation loss (inf where it diverged) and macro-F1."""

    lr: float
    epochs: int
    val_loss: float
    val_macro_f1: float

    def as_record(self) -> dict:
        d = asdict(self)
        if not math.isfinite(d["val_loss"]):
            d["val_loss"] = None  # JSON has no inf
        return d


def trial_epochs(epochs: int) -> int:
    """Epochs a trial trains of an `epochs`-long schedule: the first third, at least one."""
    return max(1, math.ceil(epochs / 3))


def pick(trials: list[LrTrial], base_lr: float) -> float:
    """The rate of the trial with the lowest validation loss; ties go to the rate nearer
    `base_lr` (in ratio). Where every trial diverged, the lowest rate."""
    finite = [t for t in trials if math.isfinite(t.val_loss)]
    if not finite:
        return min(t.lr for t in trials)
    return min(finite, key=lambda t: (t.val_loss, abs(math.log(t.lr / base_lr)))).lr


def search_lr(model: nn.Module, train_enc: Encoded, val_enc: Encoded, settings: TrainSettings, base_lr: float,
              groups_at: Callable[[float], list[dict]], *, pad_id: int, device: torch.device,
              log: Callable[[str], None] = print) -> tuple[float, list[LrTrial], float]:
    """Try `base_lr` times each of MULTIPLIERS on `model` (see the module docstring);
    returns (the chosen rate, the trials, seconds spent). `groups_at(lr)`: the optimizer's
    parameter groups at peak rate `lr` (the strategy's). On return the trainable
    parameters hold, bit for bit, the values they had on entry."""
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    weight = torch.tensor(settings.class_weights) if settings.class_weights is not None else None
    labels = torch.from_numpy(val_enc.labels).long()
    epochs = trial_epochs(settings.epochs)
    t0 = time.perf_counter()
    trials = []
    try:
        for m in MULTIPLIERS:
            lr = base_lr * m
            torch.manual_seed(settings.seed)
            s = replace(settings, lr=lr, stop_after=epochs, keep="last")
            try:
                train(model, train_enc, val_enc, s, pad_id=pad_id, device=device, param_groups=groups_at(lr),
                      log=lambda _msg: None, progress=False)
                logits = torch.from_numpy(predict_logits(model, val_enc, batch_size=s.eval_batch_size, pad_id=pad_id,
                                                         device=device, precision=s.precision))
                loss = weighted_cross_entropy(logits, labels, weight).item()
                f1 = metrics_from_logits(logits.numpy(), val_enc.labels)["macro_f1"]
            except TrainingDiverged:
                loss, f1 = math.inf, 0.0
            except Interrupted:  # Ctrl-C: a trial saves nothing, so there is nothing to resume
                raise Interrupted(f"interrupted in --lr auto's trial {len(trials) + 1} of {len(MULTIPLIERS)} "
                                  f"(lr {lr:g}), before the run's own training: nothing to resume; start the run "
                                  "again (--overwrite)") from None
            trials.append(LrTrial(lr=lr, epochs=epochs, val_loss=loss if math.isfinite(loss) else math.inf,
                                  val_macro_f1=f1))
            log(f"lr auto: trial {len(trials)}/{len(MULTIPLIERS)} | lr {lr:g} | {epochs} of {settings.epochs} "
                f"epochs | val loss {loss:.4f} | val macro-F1 {f1:.4f}")
            _restore(params, start)
    finally:
        _restore(params, start)
    chosen = pick(trials, base_lr)
    return chosen, trials, time.perf_counter() - t0


def _restore(params: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)
