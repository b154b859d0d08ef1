"""Writing files all or nothing: a temporary twin beside the target, fsync, then rename.

Every file lorafit writes that a crash must not leave half-written goes through here:
run configs and results, metrics, adapters, checkpoints, reports. A finished file gets
the user's umask like any other output (a temporary file starts at 0600).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from lorafit import fault_points


def umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _remove_stale_temporaries(path: Path) -> None:
    """Temporary twins of `path` (files, or the folders safetensors writes in) left by a writer
    that was killed before its rename."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary file, fsync and rename: all or nothing."""
    _remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: Path,
                            metadata: dict[str, str] | None = None) -> None:
    """safetensors serialisation of `tensors`, written atomically (temporary file, fsync, rename).

    `save_file` writes straight from the tensors' memory, so a checkpoint of the full
    model (weights, AdamW state, best weights) costs no second in-memory copy. It writes
    through a temporary file of its own (`.tmpXXXXXX`) beside its target, so the target is
    inside a temporary folder named for `path`: a writer killed at any moment leaves only
    that folder, which the next write of `path` removes.
    """
    _remove_stale_temporaries(path)
    folder = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    tmp = folder / path.name
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, umask_mode())
        fault_points.reached(f"write:{path.name}")
        os.replace(tmp, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def write_json(path: Path, data: dict) -> None:
    """`data` as indented JSON, written atomically."""
    atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())
