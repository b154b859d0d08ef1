"""Training and evaluation: plain functions that return histories and metrics.

AdamW with linear warm-up and decay, gradient clipping and accumulation, bf16 autocast
where the hardware has it, length-bucketed batches, evaluation on validation after
every epoch, and the last (or the best-validation) epoch's weights kept.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lorafit.data.batching import bucketed_batches
from lorafit.data.encoding import Encoded
from lorafit.errors import Interrupted, LorafitError
from lorafit.lora import lora_modules, merge_lora, unmerge_lora


class TrainingDiverged(LorafitError):
    """The loss became NaN or infinite."""


@lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """True when the CPU has AMX-BF16 or AVX512-BF16 (bf16 matmuls run fast)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` -> bf16 on CUDA with bf16 support or on a CPU with AMX/AVX512-BF16, else fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_bf16() else "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast, or nothing for fp32. Parameters and optimizer state stay fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def f1_score(labels: np.ndarray, preds: np.ndarray, num_labels: int) -> float:
    """Binary: F1 of class 1; more classes: macro F1."""
    classes = [1] if num_labels == 2 else range(num_labels)
    scores = []
    for c in classes:
        tp = np.sum((preds == c) & (labels == c))
        fp = np.sum((preds == c) & (labels != c))
        fn = np.sum((preds != c) & (labels == c))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return float(np.mean(scores))


@torch.no_grad()
def predict_logits(model: nn.Module, enc: Encoded, *, batch_size: int, pad_id: int, device: torch.device,
                   precision: str, progress: bool = False, desc: str = "eval") -> np.ndarray:
    """Logits (N, num_labels) fp32, in `enc`'s order. LoRA adapters are merged while it runs."""
    was_training = model.training
    model.eval()
    has_lora = any(True for _ in lora_modules(model))
    if has_lora:
        merge_lora(model)  # one matmul per adapted layer
    out: np.ndarray | None = None
    try:
        batches = bucketed_batches(enc.lengths, batch_size, seed=0, shuffle=False)
        for b in tqdm(batches, desc=desc, leave=False, disable=not progress, unit="batch"):
            inputs = {k: v.to(device) for k, v in enc.batch(b, pad_id).items()}
            with autocast(device, precision):
                logits = model(**inputs).logits.float().cpu().numpy()
            if out is None:
                out = np.zeros((len(enc), logits.shape[1]), dtype=np.float32)
            out[b] = logits
    finally:
        if has_lora:
            unmerge_lora(model)
        model.train(was_training)
    return out if out is not None else np.zeros((0, 2), dtype=np.float32)


def metrics_from_logits(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """loss (mean cross-entropy), accuracy, f1."""
    t = torch.from_numpy(logits)
    loss = F.cross_entropy(t, torch.from_numpy(labels)).item() if len(labels) else float("nan")
    preds = logits.argmax(axis=1)
    return {"loss": loss, "accuracy": float(np.mean(preds == labels)) if len(labels) else float("nan"),
            "f1": f1_score(labels, preds, logits.shape[1])}


def evaluate(model: nn.Module, enc: Encoded, **kw) -> dict[str, float]:
    """loss, accuracy and f1 of `model` on `enc` (see predict_logits for the arguments)."""
    return metrics_from_logits(predict_logits(model, enc, **kw), enc.labels)


@dataclass
class TrainSettings:
    """What the loop needs from a run's config."""

    epochs: int
    lr: float
    batch_size: int
    grad_accum: int = 1
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    seed: int = 0
    precision: str = "fp32"
    eval_batch_size: int = 16
    keep: str = "last"
    """"last": the model ends with the final epoch's weights; "best": with those of the
    epoch of best validation accuracy (ties: the earlier epoch)."""


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)
    """Per epoch: epoch, train_loss, train_accuracy, val_loss, val_accuracy, val_f1, seconds,
    tokens_per_s, samples_per_s, lr."""
    best_epoch: int = 0
    """The epoch of best validation accuracy (ties: the earlier), whichever weights are kept."""
    kept_epoch: int = 0
    """The epoch whose weights the model holds on return."""
    train_seconds: float = 0.0
    padding_efficiency: float = 1.0


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def train(model: nn.Module, train_enc: Encoded, val_enc: Encoded, s: TrainSettings, *, pad_id: int,
          device: torch.device, log: Callable[[str], None] = print, progress: bool = True,
          on_epoch: Callable[[dict], None] | None = None,
          save_state: Callable[[dict[str, torch.Tensor], dict], None] | None = None,
          checkpoint_every: int = 0,
          resume: tuple[dict[str, torch.Tensor], dict] | None = None) -> TrainResult:
    """Train the parameters of `model` that require grad.

    On return, `model` holds the final epoch's weights (`s.keep == "last"`) or those of
    the epoch with the best validation accuracy (`"best"`; ties: the earlier epoch). With
    `save_state`, the training state is checkpointed after every epoch and every
    `checkpoint_every` optimizer steps, and on Ctrl-C; `resume` (from
    `checkpoint.load_checkpoint`) continues from such a state and gives the same result
    as an uninterrupted run.

    Raises:
        TrainingDiverged: the loss became NaN or inf (the message names the step).
        Interrupted: Ctrl-C; the state at the last optimizer step was checkpointed.
    """
    from lorafit import checkpoint as ckpt

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise LorafitError("no parameter is trainable; check the strategy and its targets")
    opt = torch.optim.AdamW(_param_groups(model, s.weight_decay), lr=s.lr)
    n_batches = math.ceil(len(train_enc) / s.batch_size)
    steps_per_epoch = math.ceil(n_batches / s.grad_accum)
    total = s.epochs * steps_per_epoch
    warmup = int(s.warmup_ratio * total)

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    result = TrainResult()
    best_acc, best_state = -1.0, None
    # position and running totals of the epoch, as of the last optimizer step
    pos = {"epoch": 1, "batch_index": 0, "step": 0, "loss_sum": 0.0, "correct": 0, "seen": 0, "tokens": 0,
           "epoch_seconds": 0.0}
    if resume is not None:
        tensors, meta = resume
        best_state = ckpt.restore(model, opt, tensors)
        pos = {k: meta[k] for k in pos}
        result.history = meta["history"]
        result.best_epoch, best_acc = meta["best_epoch"], meta["best_acc"]
        result.train_seconds, result.padding_efficiency = meta["train_seconds"], meta["padding_efficiency"]
        with warnings.catch_warnings():  # stepping the schedule to where it was, without optimizer steps
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(pos["step"]):
                sched.step()
        torch.set_rng_state(tensors["rng.torch"])
        log(f"resumed at epoch {pos['epoch']}, batch {pos['batch_index']}, step {pos['step']}")
    step = pos["step"]
    rng_at_step = torch.get_rng_state()

    def checkpoint(p: dict) -> None:
        if save_state is None:
            return
        meta = {**p, "history": result.history, "best_epoch": result.best_epoch, "best_acc": best_acc,
                "train_seconds": result.train_seconds, "padding_efficiency": result.padding_efficiency}
        save_state(*ckpt.capture(model, opt, best_state, meta, rng_at_step))

    eval_kw = dict(batch_size=s.eval_batch_size, pad_id=pad_id, device=device, precision=s.precision)
    labels_all = torch.from_numpy(train_enc.labels)
    for epoch in range(pos["epoch"], s.epochs + 1):
        model.train()
        batches = bucketed_batches(train_enc.lengths, s.batch_size, seed=s.seed, epoch=epoch)
        if epoch == 1:
            result.padding_efficiency = train_enc.padding_efficiency(batches)
        start = pos["batch_index"] if epoch == pos["epoch"] else 0
        if start == 0:
            pos.update(loss_sum=0.0, correct=0, seen=0, tokens=0, epoch_seconds=0.0)
        run = dict(pos)  # totals including batches after the last optimizer step
        t0 = time.perf_counter() - pos["epoch_seconds"]
        bar = tqdm(batches, desc=f"epoch {epoch}/{s.epochs}", leave=False, disable=not progress, unit="batch",
                   initial=start)
        try:
            for i in range(start, len(batches)):
                b = batches[i]
                inputs = {k: v.to(device) for k, v in train_enc.batch(b, pad_id).items()}
                labels = labels_all[b].to(device)
                with autocast(device, s.precision):
                    logits = model(**inputs).logits
                loss = F.cross_entropy(logits.float(), labels)
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"the loss became {loss.item()} at epoch {epoch}, step {step + 1}; the run diverged. "
                        f"Lower the learning rate (now {s.lr:g}, try --lr {s.lr / 10:g})")
                (loss / s.grad_accum).backward()
                run["loss_sum"] += loss.item() * len(b)
                run["correct"] += int((logits.argmax(-1) == labels).sum())
                run["seen"] += len(b)
                run["tokens"] += int(train_enc.lengths[b].sum())
                if (i + 1) % s.grad_accum == 0 or i + 1 == len(batches):
                    if s.max_grad_norm > 0:
                        torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
                    opt.step()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
                    step += 1
                    rng_at_step = torch.get_rng_state()
                    run.update(batch_index=i + 1, step=step, epoch_seconds=time.perf_counter() - t0)
                    pos = dict(run)
                    if checkpoint_every and step % checkpoint_every == 0 and i + 1 < len(batches):
                        checkpoint(pos)
                bar.update(1)
                bar.set_postfix(loss=f"{run['loss_sum'] / run['seen']:.4f}", acc=f"{run['correct'] / run['seen']:.3f}")
        except KeyboardInterrupt:
            bar.close()
            checkpoint(pos)
            raise Interrupted(f"interrupted at epoch {epoch}, step {pos['step']}"
                              + ("; a checkpoint was saved" if save_state else "")) from None
        bar.close()
        seconds = time.perf_counter() - t0
        seen = run["seen"]
        val = evaluate(model, val_enc, **eval_kw, progress=progress, desc="validation")
        row = {"epoch": epoch, "train_loss": run["loss_sum"] / seen, "train_accuracy": run["correct"] / seen,
               "val_loss": val["loss"], "val_accuracy": val["accuracy"], "val_f1": val["f1"],
               "seconds": seconds, "tokens_per_s": run["tokens"] / seconds, "samples_per_s": seen / seconds,
               "lr": s.lr}
        result.history.append(row)
        result.train_seconds += seconds
        if val["accuracy"] > best_acc:
            best_acc, result.best_epoch = val["accuracy"], epoch
            if s.keep == "best":
                best_state = _snapshot(model)
        log(f"epoch {epoch}/{s.epochs} | train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f} | "
            f"val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.4f} | {seconds:.1f}s "
            f"{row['samples_per_s']:.1f} samples/s {row['tokens_per_s']:,.0f} tok/s")
        if on_epoch:
            on_epoch(row)
        rng_at_step = torch.get_rng_state()
        pos = {"epoch": epoch + 1, "batch_index": 0, "step": step, "loss_sum": 0.0, "correct": 0, "seen": 0,
               "tokens": 0, "epoch_seconds": 0.0}
        checkpoint(pos)
    result.kept_epoch = s.epochs
    if s.keep == "best" and best_state is not None:
        result.kept_epoch = result.best_epoch
        with torch.no_grad():
            named = dict(model.named_parameters())
            for n, v in best_state.items():
                named[n].copy_(v)
    return result
