"""Training and evaluation: plain functions that return histories and metrics.

AdamW with linear warm-up and decay, gradient clipping and accumulation, bf16 autocast
where it is measured faster (lorafit.precision), length-bucketed batches, evaluation on validation after
every epoch, and the last (or the best-validation) epoch's weights kept.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lorafit import distributed, fault_points
from lorafit.checkpoint import Position, TrainState, sigint_deferred
from lorafit.data.batching import bucketed_batches
from lorafit.data.encoding import Encoded
from lorafit.errors import LorafitError
from lorafit.metrics import f1_score, metrics_from_logits, weighted_cross_entropy  # noqa: F401 (f1_score: API)


class TrainingDiverged(LorafitError):
    """The loss became NaN or infinite."""


def pick_device() -> torch.device:
    """CUDA where there is a GPU (in a torchrun job: this local rank's), else the CPU."""
    if distributed.launched():
        return distributed.device()
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A batch's tensors on `device`; to CUDA through pinned memory, without waiting for the copy."""
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast, or nothing for fp32. Parameters and optimizer state stay fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def predict_logits(model: nn.Module, enc: Encoded, *, batch_size: int, pad_id: int, device: torch.device,
                   precision: str, progress: bool = False, desc: str = "eval") -> np.ndarray:
    """Logits (N, num_labels) fp32, in `enc`'s order.

    Runs the model as it is: LoRA adapters stay unmerged (merging writes to the frozen
    weights, and `(W + sBA) - sBA` is not `W` in floating point), and no parameter or
    buffer is written. The model is put in eval mode and back. In a distributed job
    each rank runs its share of the batches and every rank returns all the logits.
    """
    was_training = model.training
    model.eval()
    out = np.zeros((len(enc), model.num_labels), dtype=np.float32)  # HF classifiers and HeadOnCache have it
    try:
        batches = distributed.my_batches(bucketed_batches(enc.lengths, batch_size, seed=0, shuffle=False))
        for k, b in enumerate(tqdm(batches, desc=desc, leave=False, disable=not progress, unit="batch")):
            with autocast(device, precision):
                logits = model(**to_device(enc.batch(b, pad_id), device)).logits.float().cpu().numpy()
            out[b] = logits
            if k == 0:
                fault_points.reached(desc)
    finally:
        model.train(was_training)
    return distributed.gather_rows(out)


def evaluate(model: nn.Module, enc: Encoded, **kw) -> dict[str, float]:
    """`metrics.metrics_from_logits` of `model` on `enc` (see predict_logits for the arguments)."""
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
    epoch of best validation `select_on` (ties: the earlier epoch)."""
    select_on: str = "accuracy"
    """The validation metric that picks the best epoch: accuracy or macro_f1."""
    class_weights: list[float] | None = None
    """Loss weight per class (`metrics.class_weights`); None: the plain mean loss."""
    stop_after: int | None = None
    """Train only epochs 1..stop_after of the `epochs`-long schedule (its warm-up and decay
    unchanged; `lorafit.lr_search`'s trials); None: every epoch."""


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)
    """Per epoch: epoch, train_loss, train_accuracy, val_loss, val_accuracy, val_f1, seconds,
    tokens_per_s, samples_per_s, lr (the scheduled learning rate of the epoch's last step)."""
    best_epoch: int = 0
    """The epoch of best validation `select_on` (ties: the earlier), whichever weights are kept."""
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


def warmup_then_linear_decay(warmup: int, total: int) -> Callable[[int], float]:
    """The lr multiplier at optimizer step `step` (0-based): (step+1)/(warmup+1) while
    warming up, then linear decay from 1 towards 0 at step `total`."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))
    return factor


def make_optimizer(model: nn.Module, s: TrainSettings, steps_per_epoch: int, param_groups: list[dict] | None = None
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over `param_groups` (default: the parameters that require grad, no weight
    decay on biases and LayerNorm weights; a strategy may give its own groups and
    rates), and its warm-up-then-linear-decay schedule over all epochs, which scales
    every group's rate alike.

    The fused AdamW kernel where every parameter allows it (fp32/bf16/fp16 on CPU or
    CUDA): one pass over each tensor instead of a dozen foreach ops. On the 2-core AMD
    EPYC its step over all-MiniLM-L6-v2's parameters took 1/6.5 of the default's, and
    the weights after the same steps differed by at most 6e-8 (results/levers.json).
    """
    groups = param_groups or _param_groups(model, s.weight_decay)
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    opt = torch.optim.AdamW(groups, lr=s.lr, fused=fused or None)
    total = s.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_then_linear_decay(int(s.warmup_ratio * total), total))
    return opt, sched


def accumulation_weights(batch_sizes: list[int], grad_accum: int) -> list[float]:
    """Loss weight of each micro-batch: its share of its accumulation group's examples.

    Micro-batches i*grad_accum .. (i+1)*grad_accum-1 form a group (the last group of an
    epoch may be shorter); weighting each batch's mean loss by len(batch) / len(group)
    makes the accumulated gradient that of one batch holding the whole group.
    """
    out = []
    for g in range(0, len(batch_sizes), grad_accum):
        group = batch_sizes[g:g + grad_accum]
        out.extend(n / sum(group) for n in group)
    return out


def forward_backward(model: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor, weight: float,
                     device: torch.device, precision: str, class_weight: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """One micro-batch: logits (B, C), mean cross-entropy (a scalar; with `class_weight` (C,)
    each example's term weighted by its class's, `metrics.weighted_cross_entropy`);
    backward of `weight * loss` adds this batch's share to the accumulated gradients."""
    with autocast(device, precision):
        logits = model(**inputs).logits
    loss = weighted_cross_entropy(logits.float(), labels, class_weight)
    (loss * weight).backward()  # a non-finite loss is caught at the optimizer step, before it steps
    return logits, loss


def clip_and_step(params: list[torch.Tensor], opt: torch.optim.Optimizer,
                  sched: torch.optim.lr_scheduler.LRScheduler, max_grad_norm: float) -> float:
    """Clip the gradients to `max_grad_norm` (0: no clipping), step the optimizer and the
    schedule, clear the gradients; returns the learning rate this step used."""
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    lr = opt.param_groups[0]["lr"]
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return lr


def train(model: nn.Module, train_enc: Encoded, val_enc: Encoded, s: TrainSettings, *, pad_id: int,
          device: torch.device, log: Callable[[str], None] = print, progress: bool = True,
          param_groups: list[dict] | None = None, on_epoch: Callable[[dict], None] | None = None,
          save_state: Callable[[dict[str, torch.Tensor], dict], None] | None = None,
          on_step: Callable[[int, float, float], None] | None = None,
          checkpoint_every: int = 0,
          resume: tuple[dict[str, torch.Tensor], dict] | None = None) -> TrainResult:
    """Train the parameters of `model` that require grad; nothing else is written.

    On return, `model` holds the final epoch's weights (`s.keep == "last"`) or those of
    the epoch with the best validation accuracy (`"best"`; ties: the earlier epoch).
    Validation runs the model as it is (adapters unmerged), so frozen parameters stay
    bit for bit what they were. With `save_state`, the training state is checkpointed
    after every epoch, every `checkpoint_every` optimizer steps, and on Ctrl-C (also
    during validation or a checkpoint write); `resume` (from
    `checkpoint.load_checkpoint`) continues from such a state and gives, bit for bit,
    the weights and metrics of an uninterrupted run. `param_groups`: the optimizer's
    groups (a strategy's; default: see `make_optimizer`).

    In a torchrun job (see `lorafit.distributed`) every rank calls this with the same
    arguments: each global batch is shared out across ranks, gradients are all-reduced
    (DistributedDataParallel, skipped on non-final micro-batches of an accumulation
    group), metrics are summed over ranks, and only the caller on rank 0 should pass
    `save_state`. Dropout then draws from a generator seeded per (seed, step, rank).
    `on_step(step, loss, lr)`: after each optimizer step, its mean training loss and rate.

    Raises:
        TrainingDiverged: the loss became NaN or inf (the message names the step).
        Interrupted: Ctrl-C; the state at the last optimizer step was checkpointed.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise LorafitError("no parameter is trainable; check the strategy and its targets")
    n_batches = math.ceil(len(train_enc) / s.batch_size)
    opt, sched = make_optimizer(model, s, math.ceil(n_batches / s.grad_accum), param_groups)
    result = TrainResult()
    state = TrainState(model, opt, sched, device, result, save_state, lr=s.lr)
    if resume is not None:
        state.resume(*resume)
        log(f"resumed at epoch {state.pos.epoch}, batch {state.pos.batch_index}, step {state.pos.step}")
    fwd = model
    if distributed.world_size() > 1:  # gradients all-reduced (fp32) in backward; buffers are not trained
        from torch.nn.parallel import DistributedDataParallel
        fwd = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      forward_sync_buffers=False)
    loop = _Loop(fwd, params, opt, sched, train_enc, s, pad_id, device, state, progress, on_step, checkpoint_every)
    eval_kw = dict(batch_size=s.eval_batch_size, pad_id=pad_id, device=device, precision=s.precision)
    last = min(s.stop_after or s.epochs, s.epochs)
    for epoch in range(state.pos.epoch, last + 1):
        try:
            run, seconds = loop.epoch(epoch)
            val = evaluate(model, val_enc, **eval_kw, progress=progress, desc="validation")
            with sigint_deferred():  # the epoch's record, its best weights and its checkpoint move together
                row = _epoch_row(epoch, run, seconds, val)
                result.history.append(row)
                result.train_seconds += seconds
                state.consider(val[s.select_on], epoch, s.keep == "best")
                log(f"epoch {epoch}/{s.epochs} | train loss {row['train_loss']:.4f} acc "
                    f"{row['train_accuracy']:.4f} | val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.4f} | "
                    f"{seconds:.1f}s {row['samples_per_s']:.1f} samples/s {row['tokens_per_s']:,.0f} tok/s")
                if on_epoch:
                    on_epoch(row)
                state.commit(run.next_epoch())
                state.save()
        except KeyboardInterrupt:
            raise state.interrupted() from None
    result.kept_epoch = state.restore_best(s.keep == "best") or last
    return result


def _epoch_row(epoch: int, run: Position, seconds: float, val: dict) -> dict:
    """metrics.jsonl's record of an epoch: its training totals and its validation metrics."""
    return {"epoch": epoch, "train_loss": run.loss_sum / run.seen, "train_accuracy": run.correct / run.seen,
            "val_loss": val["loss"], "val_accuracy": val["accuracy"], "val_f1": val["f1"],
            "val_macro_f1": val["macro_f1"], "seconds": seconds, "tokens_per_s": run.tokens / seconds,
            "samples_per_s": run.seen / seconds, "lr": run.lr}


@dataclass
class _Loop:
    """One epoch's optimizer steps over the length-bucketed batches: each global batch shared
    out across ranks, micro-batches accumulated, totals summed over ranks once per step, and
    the position committed to `state` with every step (a checkpoint every `checkpoint_every`)."""

    fwd: nn.Module
    params: list[torch.Tensor]
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    enc: Encoded
    s: TrainSettings
    pad_id: int
    device: torch.device
    state: TrainState
    progress: bool
    on_step: Callable[[int, float, float], None] | None
    checkpoint_every: int

    def __post_init__(self) -> None:
        self.labels = torch.from_numpy(self.enc.labels)
        self.class_weight = (None if self.s.class_weights is None
                             else torch.tensor(self.s.class_weights, dtype=torch.float32, device=self.device))
        self.world = distributed.world_size()

    def epoch(self, epoch: int) -> tuple[Position, float]:
        """Run `epoch` from the committed position; its final totals and its seconds of training."""
        s, state = self.s, self.state
        self.fwd.train()
        batches = bucketed_batches(self.enc.lengths, s.batch_size, seed=s.seed, epoch=epoch)
        weights = accumulation_weights([len(b) for b in batches], s.grad_accum)
        if epoch == 1:
            state.result.padding_efficiency = self.enc.padding_efficiency(batches)
        start = state.pos.batch_index if epoch == state.pos.epoch else 0
        if start == 0:
            state.pos = dataclasses.replace(state.pos, loss_sum=0.0, correct=0, seen=0, tokens=0, epoch_seconds=0.0)
        run = dataclasses.replace(state.pos)  # the running totals, updated at each optimizer step
        t0 = time.perf_counter() - run.epoch_seconds
        bar = tqdm(batches, desc=f"epoch {epoch}/{s.epochs}", leave=False, disable=not self.progress,
                   unit="batch", initial=start)
        # this step's loss sum, correct, examples, tokens: on the device, read once per optimizer step
        totals = torch.zeros(4, dtype=torch.float64, device=self.device)
        try:
            for i in range(start, len(batches)):
                if self.world > 1 and i % s.grad_accum == 0:  # dropout per (seed, step, rank)
                    torch.manual_seed(distributed.dropout_seed(s.seed, run.step))
                last = (i + 1) % s.grad_accum == 0 or i + 1 == len(batches)
                self._micro_batch(batches[i], weights[i], last, totals)
                if last:
                    self._step(epoch, i, len(batches), run, totals, t0)
                bar.update(1)
                if last and run.seen:
                    bar.set_postfix(loss=f"{run.loss_sum / run.seen:.4f}", acc=f"{run.correct / run.seen:.3f}")
        finally:
            bar.close()
        return run, time.perf_counter() - t0

    def _micro_batch(self, b: np.ndarray, weight: float, last: bool, totals: torch.Tensor) -> None:
        """Forward and backward of this rank's share of one batch; its totals added to `totals`."""
        part = distributed.share(b)  # this rank's examples of the global batch
        n = len(part)
        # the share of the group's gradient; DDP averages over ranks, hence `world`
        weight = weight * self.world * n / len(b)
        if n == 0:  # fewer examples than ranks: run one with weight 0, to join the all-reduce
            part, weight = b[:1], 0.0
        labels = self.labels[part].to(self.device, non_blocking=True)
        with contextlib.nullcontext() if last or self.world == 1 else self.fwd.no_sync():
            logits, loss = forward_backward(self.fwd, to_device(self.enc.batch(part, self.pad_id), self.device),
                                            labels, weight, self.device, self.s.precision, self.class_weight)
        if n:
            totals[0] += loss.detach().double() * n
            totals[1] += (logits.detach().argmax(-1) == labels).sum()
            totals[2] += n
            totals[3] += int(self.enc.lengths[part].sum())

    def _step(self, epoch: int, i: int, n_batches: int, run: Position, totals: torch.Tensor, t0: float) -> None:
        """The optimizer step closing an accumulation group, with its bookkeeping and commit."""
        loss_sum, correct, seen, tokens = distributed.sum_(totals).tolist()
        totals.zero_()
        if not math.isfinite(loss_sum):  # every rank sees it, so every rank stops here
            raise TrainingDiverged(
                f"the training loss became {loss_sum / max(seen, 1)} at epoch {epoch}, step {run.step + 1}; "
                f"the run diverged. Lower the learning rate (now {self.s.lr:g}, try --lr {self.s.lr / 10:g})")
        with sigint_deferred():  # weights, position and checkpoint move together
            run.loss_sum += loss_sum
            run.correct += int(correct)
            run.seen += int(seen)
            run.tokens += int(tokens)
            run.lr = clip_and_step(self.params, self.opt, self.sched, self.s.max_grad_norm)
            run.step += 1
            run.batch_index, run.epoch_seconds = i + 1, time.perf_counter() - t0
            self.state.commit(run)
            if self.checkpoint_every and run.step % self.checkpoint_every == 0 and i + 1 < n_batches:
                self.state.save()
        if self.on_step is not None:
            self.on_step(run.step, loss_sum / max(seen, 1), run.lr)
        fault_points.reached("step")
