"""Training checkpoints: one safetensors file, written atomically, never unpickled.

The file holds tensors (trainable weights, the optimizer's state, the best-validation
weights, RNG states) and, in the safetensors metadata, a JSON record of the position
(epoch, batch index, optimizer step), the running epoch totals, the metrics so far,
the optimizer's param groups and the scheduler's state_dict.
A crash during the write leaves the previous checkpoint in place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from lorafit.adapter import PICKLE_SUFFIXES
from lorafit.files import save_safetensors_atomic
from lorafit.errors import Interrupted, RunDirError

CHECKPOINT = "checkpoint.safetensors"


def _opt_key(name: str, field: str) -> str:
    return f"opt.{field}.{name}"


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The generators dropout draws from: the CPU's, and every CUDA device's where `device` is CUDA."""
    out = {"rng.torch": torch.get_rng_state()}
    if device.type == "cuda":
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = state
    return out


def set_rng_state(tensors: dict[str, torch.Tensor]) -> None:
    """Put back what `rng_state` captured (CUDA states only where CUDA is present)."""
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")),
                                       key=lambda k: int(k.rsplit(".", 1)[1]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


def _optimizer_order(model: nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's order (the indices of its state_dict)."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for g in opt.param_groups for p in g["params"]]


def capture(model: nn.Module, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler,
            best_state: dict[str, torch.Tensor] | None, meta: dict, rng: dict[str, torch.Tensor]
            ) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) describing the training state right after an optimizer step.

    Tensors: `param.<name>` (trainable weights), `opt.<field>.<name>` (the optimizer's
    state_dict, keyed by parameter name rather than index), `best.<name>`, `rng.*`.
    Meta gains the optimizer's param groups (hyperparameters, scheduled lr, parameter
    names) and the scheduler's state_dict, both plain JSON.
    """
    tensors: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            tensors[f"param.{name}"] = p.detach()
    order = _optimizer_order(model, opt)
    sd = opt.state_dict()
    for idx, state in sd["state"].items():
        for field, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[_opt_key(order[idx], field)] = value.detach()
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [order[i] for i in g["params"]]}
              for g in sd["param_groups"]]
    for name, v in (best_state or {}).items():
        tensors[f"best.{name}"] = v
    tensors.update(rng)
    return tensors, {**meta, "optimizer_groups": groups, "scheduler": sched.state_dict()}


def save_checkpoint(run_dir: Path, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write `<run_dir>/checkpoint.safetensors` atomically (temporary file, fsync, rename)."""
    path = run_dir / CHECKPOINT
    save_safetensors_atomic(tensors, path, metadata={"lorafit": json.dumps(meta)})
    return path


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) of a checkpoint file.

    Raises:
        RunDirError: the file is missing, a pickle, corrupt, or not a lorafit checkpoint.
    """
    if path.suffix in PICKLE_SUFFIXES:
        raise RunDirError(f"{path} is a pickle file; lorafit loads safetensors checkpoints only, since "
                          "unpickling can run arbitrary code")
    if not path.exists():
        raise RunDirError(f"{path} does not exist: the run has no complete checkpoint to resume from; "
                          "start it again with --overwrite")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta_raw = (f.metadata() or {}).get("lorafit")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise RunDirError(f"{path} is not a readable checkpoint ({exc}); it is corrupt: start the run again "
                          "with --overwrite") from None
    try:
        meta = json.loads(meta_raw) if meta_raw else None
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict) or "epoch" not in meta:
        raise RunDirError(f"{path} is not a lorafit checkpoint (no training position in it)")
    return tensors, meta


def restore(model: nn.Module, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler,
            tensors: dict[str, torch.Tensor], meta: dict) -> dict[str, torch.Tensor] | None:
    """Put weights, optimizer and scheduler state back; returns the best-validation weights, if any.

    The optimizer state goes through `opt.load_state_dict`, so it lands on the
    parameters' device and dtype whatever device wrote the checkpoint.

    Raises:
        RunDirError: the checkpoint's trainable parameters are not this model's.
    """
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    saved = {k[len("param."):] for k in tensors if k.startswith("param.")}
    if saved != trainable:
        raise RunDirError("the checkpoint's trainable parameters do not match this run's model and strategy; "
                          "it belongs to another configuration: start again with --overwrite")
    with torch.no_grad():
        for name in saved:
            params[name].copy_(tensors[f"param.{name}"])
    order = _optimizer_order(model, opt)
    index = {name: i for i, name in enumerate(order)}
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, field, name = key.split(".", 2)
            state.setdefault(index[name], {})[field] = v.reshape(()) if field == "step" else v
    current = opt.state_dict()["param_groups"]
    groups = meta.get("optimizer_groups")
    if groups is None:  # a checkpoint of lorafit <= 0.1.0: the hyperparameters are this run's
        groups = current
    else:
        groups = [{**g, "params": [index[n] for n in g["params"]]} for g in groups]
        for g in groups:
            if isinstance(g.get("betas"), list):  # JSON made the tuple a list
                g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})
    if "scheduler" in meta:
        sched.load_state_dict(meta["scheduler"])
    else:  # older checkpoints: step the schedule to where it was
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(meta["step"]):
                sched.step()
    best = {k[len("best."):]: v for k, v in tensors.items() if k.startswith("best.")}
    return best or None


@contextlib.contextmanager
def sigint_deferred(reraise: bool = True):
    """Hold Ctrl-C back while the block runs (an optimizer step with its bookkeeping, a
    checkpoint write), so that an interrupt never separates weights from their recorded
    position; at the block's end a held Ctrl-C raises KeyboardInterrupt (if `reraise`)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if held and reraise and previous not in (signal.SIG_IGN, None):
        raise KeyboardInterrupt


@dataclass
class Position:
    """Where training stands as of the last optimizer step, with the epoch's running totals
    (summed over ranks): what a checkpoint records and a resumed run starts from."""

    epoch: int = 1
    batch_index: int = 0
    """The next batch of `epoch`'s order to run."""
    step: int = 0
    """Optimizer steps taken since the run began."""
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    tokens: int = 0
    epoch_seconds: float = 0.0
    lr: float = 0.0
    """The scheduled learning rate of the last step."""

    def next_epoch(self) -> Position:
        """The position at the start of the following epoch, totals cleared."""
        return Position(epoch=self.epoch + 1, step=self.step, lr=self.lr)


class TrainState:
    """What a checkpoint holds besides the model's frozen weights, and its writes: the
    position as of the last optimizer step, the metrics so far, the best-validation
    weights, and the RNG states drawn at that step. `train` commits to it after each
    optimizer step and each epoch; a checkpoint writes what was last committed, so weights
    and their recorded position never part, Ctrl-C included."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer,
                 sched: torch.optim.lr_scheduler.LRScheduler, device: torch.device, result,
                 save: Callable[[dict[str, torch.Tensor], dict], None] | None, lr: float):
        self.model, self.opt, self.sched, self.device = model, opt, sched, device
        self.result = result  # training.TrainResult: history, best_epoch, train_seconds, padding_efficiency
        self._save = save
        self.pos = Position(lr=lr)
        self.best_score, self.best_state = -1.0, None
        self.rng = rng_state(device)

    def resume(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Put a checkpoint's weights, optimizer, scheduler, metrics and RNG states back."""
        self.best_state = restore(self.model, self.opt, self.sched, tensors, meta)
        names = {f.name for f in dataclasses.fields(Position)}
        self.pos = dataclasses.replace(self.pos, **{k: v for k, v in meta.items() if k in names})
        r = self.result
        r.history, r.best_epoch, self.best_score = meta["history"], meta["best_epoch"], meta["best_acc"]
        r.train_seconds, r.padding_efficiency = meta["train_seconds"], meta["padding_efficiency"]
        set_rng_state(tensors)
        self.rng = rng_state(self.device)

    def commit(self, pos: Position) -> None:
        """Record `pos` as reached, with the RNG states as they are now."""
        self.rng = rng_state(self.device)
        self.pos = dataclasses.replace(pos)

    def consider(self, score: float, epoch: int, keep_best: bool) -> None:
        """Note an epoch's validation score; keep its weights where it is the best so far."""
        if score > self.best_score:
            self.best_score, self.result.best_epoch = score, epoch
            if keep_best:
                self.best_state = {n: p.detach().clone() for n, p in self.model.named_parameters()
                                   if p.requires_grad}

    def save(self) -> None:
        """Checkpoint the committed state (nothing without a `save` callback)."""
        if self._save is None:
            return
        r = self.result
        meta = {**dataclasses.asdict(self.pos), "history": r.history, "best_epoch": r.best_epoch,
                "best_acc": self.best_score, "train_seconds": r.train_seconds,
                "padding_efficiency": r.padding_efficiency}
        self._save(*capture(self.model, self.opt, self.sched, self.best_state, meta, self.rng))

    def interrupted(self) -> Interrupted:
        """Save the committed state (a second Ctrl-C does not cut it short); the error to raise."""
        with sigint_deferred(reraise=False):
            self.save()
        return Interrupted(f"interrupted at epoch {self.pos.epoch}, step {self.pos.step}"
                           + ("; a checkpoint was saved" if self._save else ""))

    def restore_best(self, keep_best: bool) -> int | None:
        """Copy the best-validation weights back into the model (with `keep_best`); their epoch."""
        if not keep_best or self.best_state is None:
            return None
        with torch.no_grad():
            named = dict(self.model.named_parameters())
            for n, v in self.best_state.items():
                named[n].copy_(v)
        return self.result.best_epoch
