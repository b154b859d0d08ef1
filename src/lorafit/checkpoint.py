"""Training checkpoints: one safetensors file, written atomically, never unpickled.

The file holds tensors (trainable weights, AdamW state, the best-validation weights,
RNG state) and, in the safetensors metadata, a JSON record of the position (epoch,
batch index, optimizer step), the running epoch totals and the metrics so far.
A crash during the write leaves the previous checkpoint in place.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from lorafit.adapter import PICKLE_SUFFIXES, save_safetensors_atomic
from lorafit.errors import RunDirError

CHECKPOINT = "checkpoint.safetensors"


def _opt_key(name: str, field: str) -> str:
    return f"opt.{field}.{name}"


def capture(model: nn.Module, opt: torch.optim.Optimizer, best_state: dict[str, torch.Tensor] | None,
            meta: dict, rng: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) describing the training state right after an optimizer step."""
    tensors: dict[str, torch.Tensor] = {}
    by_id = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            tensors[f"param.{name}"] = p.detach()
            by_id[id(p)] = name
    for p, state in opt.state.items():
        name = by_id[id(p)]
        for field, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[_opt_key(name, field)] = value.detach().reshape(-1) if value.ndim == 0 else value.detach()
    for name, v in (best_state or {}).items():
        tensors[f"best.{name}"] = v
    tensors["rng.torch"] = rng
    return tensors, meta


def save_checkpoint(run_dir: Path, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write `<run_dir>/checkpoint.safetensors` atomically (temporary file, fsync, rename)."""
    path = run_dir / CHECKPOINT
    for stale in run_dir.glob(f".{CHECKPOINT}.*.tmp"):  # left by a writer that was killed
        stale.unlink(missing_ok=True)
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


def restore(model: nn.Module, opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]
            ) -> dict[str, torch.Tensor] | None:
    """Put weights and optimizer state back; returns the best-validation weights, if any."""
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    saved = {k[len("param."):] for k in tensors if k.startswith("param.")}
    if saved != trainable:
        raise RunDirError("the checkpoint's trainable parameters do not match this run's model and strategy; "
                          "it belongs to another configuration: start again with --overwrite")
    with torch.no_grad():
        for name in saved:
            params[name].copy_(tensors[f"param.{name}"])
    for name in saved:
        p = params[name]
        state = {}
        for key, v in tensors.items():
            prefix, _, rest = key.partition(".")
            if prefix == "opt" and rest.endswith("." + name) and rest[: -len(name) - 1] in ("step", "exp_avg",
                                                                                            "exp_avg_sq"):
                field = rest[: -len(name) - 1]
                state[field] = v.reshape(()) if field == "step" else v.clone()
        if state:
            opt.state[p] = state
    best = {k[len("best."):]: v for k, v in tensors.items() if k.startswith("best.")}
    return best or None
