"""Saving and loading adapters in PEFT's on-disk format, with safetensors only.

A folder holds `adapter_config.json` (PEFT's `LoraConfig` fields) and
`adapter_model.safetensors` with PEFT's key names:

    base_model.model.<module>.lora_A.weight   (r, in)
    base_model.model.<module>.lora_B.weight   (out, r)
    base_model.model.<train module>.<param>   (PEFT's modules_to_save)

so `peft.PeftModel.from_pretrained(base, folder)` loads a lorafit adapter and
`load_adapter` loads one that PEFT saved. Pickle files are never read.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lorafit import fault_points
from lorafit.errors import AdapterError
from lorafit.lora import LoRAConfig, apply_lora, lora_modules, lora_state_dict

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_PREFIX = "base_model.model."


def _to_peft_key(name: str) -> str:
    if name.endswith(".lora_A") or name.endswith(".lora_B"):
        return f"{_PREFIX}{name}.weight"
    return _PREFIX + name


def _from_peft_key(key: str) -> str:
    name = key.removeprefix(_PREFIX)
    return name.removesuffix(".weight") if re.search(r"\.lora_[AB]\.weight$", name) else name


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _remove_stale_temporaries(path: Path) -> None:
    """Temporary twins of `path` left by a writer that was killed before its rename."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
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
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: Path,
                            metadata: dict[str, str] | None = None) -> None:
    """safetensors serialisation of `tensors`, written atomically (temporary file, fsync, rename).

    `save_file` writes straight from the tensors' memory, so a checkpoint of the full
    model (weights, AdamW state, best weights) costs no second in-memory copy.
    """
    _remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        fault_points.reached(f"write:{path.name}")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_adapter(model: nn.Module, directory: str | os.PathLike, base_model_name: str | None = None) -> Path:
    """Save `model`'s adapter to `directory` in PEFT's format; returns the folder.

    Raises:
        AdapterError: `model` has no LoRA applied.
    """
    config: LoRAConfig | None = getattr(model, "lora_config", None)
    layers = dict(lora_modules(model))
    if config is None or not layers:
        raise AdapterError("this model has no LoRA applied; call apply_lora(model, config) before save_adapter")
    if any(layer.merged for layer in layers.values()):
        raise AdapterError("the adapters are merged into the weights; call unmerge_lora(model) before saving")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {_to_peft_key(k): v.float() for k, v in lora_state_dict(model).items()}
    peft_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.scaling == "rslora",
        "target_modules": sorted(layers),
        "modules_to_save": list(getattr(model, "lora_train_modules", [])) or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    save_safetensors_atomic(tensors, out / WEIGHTS_NAME, metadata={"format": "pt"})
    atomic_write_bytes(out / CONFIG_NAME, (json.dumps(peft_config, indent=2) + "\n").encode())
    return out


def _read_config(folder: Path) -> dict:
    if not folder.exists():
        raise AdapterError(f"adapter folder {folder} does not exist; pass the folder that save_adapter wrote")
    if folder.is_file():
        if folder.suffix in PICKLE_SUFFIXES:
            raise AdapterError(
                f"{folder} is a pickle file; lorafit loads safetensors only, since unpickling can run "
                "arbitrary code. Re-save the adapter with safetensors (PEFT: save_pretrained(..., "
                "safe_serialization=True))"
            )
        raise AdapterError(f"{folder} is a file; pass the adapter folder holding {CONFIG_NAME} and {WEIGHTS_NAME}")
    if not (folder / WEIGHTS_NAME).exists():
        pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise AdapterError(
                f"{folder} holds only pickle weights ({', '.join(pickles)}); lorafit loads safetensors only, "
                "since unpickling can run arbitrary code. Re-save it with safetensors (PEFT: "
                "save_pretrained(..., safe_serialization=True))"
            )
        raise AdapterError(f"{folder} has no {WEIGHTS_NAME}; it is not an adapter folder (or it is incomplete)")
    try:
        raw = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterError(f"{folder} has no {CONFIG_NAME}; it is not an adapter folder (or it is incomplete)") \
            from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{folder / CONFIG_NAME} is not valid JSON ({exc}); the adapter is corrupt: re-save it") \
            from None
    if not isinstance(raw, dict) or raw.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{folder / CONFIG_NAME} is not a LoRA adapter config (peft_type must be LORA)")
    unsupported = {
        "use_dora": raw.get("use_dora"), "fan_in_fan_out": raw.get("fan_in_fan_out"),
        "lora_bias": raw.get("lora_bias"), "rank_pattern": raw.get("rank_pattern"),
        "alpha_pattern": raw.get("alpha_pattern"),
    }
    bad = [k for k, v in unsupported.items() if v]
    if raw.get("bias", "none") != "none":
        bad.append("bias")
    if bad:
        raise AdapterError(f"{folder / CONFIG_NAME} uses {', '.join(bad)}, which lorafit's plain LoRA does not support")
    return raw


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterError(f"{path} is not a readable safetensors file ({exc}); the adapter is corrupt or truncated: "
                           "re-save it") from None


def _config_from_peft(raw: dict, folder: Path, lora_names: list[str], train_modules: list[str]) -> LoRAConfig:
    try:
        return LoRAConfig(
            r=raw["r"], alpha=raw["lora_alpha"], dropout=raw.get("lora_dropout", 0.0) or 0.0,
            targets=lora_names, scaling="rslora" if raw.get("use_rslora") else "standard",
            train_modules=train_modules,
        )
    except KeyError as exc:
        raise AdapterError(f"{folder / CONFIG_NAME} lacks the key {exc}; the adapter is corrupt: re-save it") from None
    except ValueError as exc:
        raise AdapterError(f"{folder / CONFIG_NAME}: {exc}") from None


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> LoRAConfig:
    """Load a PEFT-format LoRA adapter (from lorafit or PEFT) into `model`; returns its config.

    If `model` has no LoRA yet, it is applied for the adapter's modules first; if it
    has, the adapter must fit the LoRA already there (same modules and rank, not
    merged), and its layers take the file's alpha, scaling and dropout.

    Raises:
        AdapterError: a missing, corrupt, truncated or pickled adapter; one saved for
            another architecture (a module it names is not in `model`), another rank,
            or other shapes; or keys that are missing.
    """
    folder = Path(directory)
    raw = _read_config(folder)
    tensors = _read_tensors(folder / WEIGHTS_NAME)
    by_name = {_from_peft_key(k): v for k, v in tensors.items()}
    lora_names = sorted({n.rsplit(".", 1)[0] for n in by_name if n.endswith((".lora_A", ".lora_B"))})
    if not lora_names:
        raise AdapterError(f"{folder / WEIGHTS_NAME} holds no LoRA weights (no lora_A/lora_B keys)")
    for n in lora_names:
        for part in ("lora_A", "lora_B"):
            if f"{n}.{part}" not in by_name:
                raise AdapterError(f"{folder / WEIGHTS_NAME} lacks {_to_peft_key(f'{n}.{part}')}; "
                                   "the adapter is truncated: re-save it")
    modules = dict(model.named_modules())
    missing = [n for n in lora_names if n not in modules]
    if missing:
        raise AdapterError(
            f"the adapter in {folder} is for another architecture: this model has no module {missing[0]!r} "
            f"({len(missing)} of its {len(lora_names)} adapted modules are absent); load it into the base model "
            f"it was trained on ({raw.get('base_model_name_or_path') or 'see adapter_config.json'})"
        )
    train_params = {n: v for n, v in by_name.items() if not n.endswith((".lora_A", ".lora_B"))}
    params = dict(model.named_parameters())
    # Parameters under a LoRALinear are named `<module>.base.weight`; plain ones `<module>.weight`.
    absent = [n for n in train_params if n not in params]
    if absent:
        raise AdapterError(f"the adapter in {folder} trains {absent[0]!r}, which this model does not have; "
                           "it was saved for another architecture")
    train_modules = sorted({n.rsplit(".", 1)[0] for n in train_params})
    for m in raw.get("modules_to_save") or []:
        if not any(t == m or t.endswith("." + m) or t.startswith(m + ".") for t in train_modules):
            raise AdapterError(f"{folder / WEIGHTS_NAME} lacks the weights of module {m!r} named in modules_to_save; "
                               "the adapter is truncated: re-save it")
    bad = [n for n, v in by_name.items() if not torch.isfinite(v).all()]
    if bad:
        raise AdapterError(f"the adapter in {folder} holds NaN or inf in {bad[0]!r}; it is corrupt: retrain it")
    config = _config_from_peft(raw, folder, lora_names, train_modules)

    existing = dict(lora_modules(model))
    if any(layer.merged for layer in existing.values()):
        raise AdapterError("this model's LoRA layers are merged into their weights; call unmerge_lora(model) "
                           f"before loading the adapter in {folder}, or load it into a model without LoRA")
    if existing:
        if sorted(existing) != lora_names:
            raise AdapterError(f"the adapter in {folder} adapts other modules than the LoRA already on this model; "
                               "load it into a model without LoRA")
        ranks = {layer.r for layer in existing.values()}
        if ranks != {config.r}:
            raise AdapterError(f"the adapter in {folder} has rank {config.r} but this model has LoRA of rank "
                               f"{sorted(ranks)} applied; load it into a model without LoRA")
    for n in lora_names:
        base = modules[n].base if n in existing else modules[n]
        if not isinstance(base, nn.Linear):
            raise AdapterError(f"the adapter in {folder} adapts {n!r}, which is a {type(base).__name__} here, "
                               "not an nn.Linear: it was saved for another architecture")
        a, b = by_name[f"{n}.lora_A"], by_name[f"{n}.lora_B"]
        want_a, want_b = (config.r, base.in_features), (base.out_features, config.r)
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            raise AdapterError(
                f"the adapter in {folder} does not fit module {n!r}: lora_A {tuple(a.shape)} and lora_B "
                f"{tuple(b.shape)}, but rank {config.r} on this ({base.out_features}x{base.in_features}) layer "
                f"needs {want_a} and {want_b}: it was saved for another model size or rank"
            )
    for n, v in train_params.items():
        if params[n].shape != v.shape:
            raise AdapterError(f"the adapter in {folder} holds {n!r} of shape {tuple(v.shape)}, but this model's is "
                               f"{tuple(params[n].shape)}: it was saved for another model size or label count")
    if not existing:
        apply_lora(model, config)
    else:  # the layers take the file's alpha, scaling and dropout, not those they had
        for n in lora_names:
            existing[n].reconfigure(config.alpha, config.scaling, config.dropout)
        model.lora_config = config
        model.lora_train_modules = train_modules
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, v in by_name.items():
            params[n].copy_(v.to(params[n].dtype))
    return config
