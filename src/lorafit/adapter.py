"""Saving and loading adapters in PEFT's on-disk format, with safetensors only.

A folder holds `adapter_config.json` (PEFT's `LoraConfig` fields) and
`adapter_model.safetensors` with PEFT's key names:

    base_model.model.<module>.lora_A.weight          (r, in)
    base_model.model.<module>.lora_B.weight          (out, r)
    base_model.model.<module>.lora_magnitude_vector  (out,)   DoRA only
    base_model.model.<train module>.<param>          (PEFT's modules_to_save)

so `peft.PeftModel.from_pretrained(base, folder)` loads a lorafit adapter and
`load_adapter` loads one that PEFT saved. A PiSSA adapter is saved as the plain
rank-2r LoRA it amounts to against the original weights, so it loads on the
unmodified base model. Several named adapters are saved PEFT's way: the default in
the folder, every other one in a subfolder of its name. Pickle files are never read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from lorafit.files import atomic_write_bytes, save_safetensors_atomic  # noqa: F401 (adapters are written with them)
from lorafit.errors import AdapterError
from lorafit.lora import (
    DEFAULT_ADAPTER,
    LoRAAdapter,
    LoRAConfig,
    adapter_names,
    apply_lora,
    lora_modules,
    mark_only_lora_as_trainable,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_PREFIX = "base_model.model."


_PEFT_PARTS = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "magnitude": "lora_magnitude_vector"}


def _to_peft_key(module: str, part: str) -> str:
    """PEFT's saved key for adapter parameter `part` (lora_A, lora_B, magnitude) of `module`."""
    return f"{_PREFIX}{module}.{_PEFT_PARTS[part]}"


def _split_peft_key(key: str) -> tuple[str, str | None]:
    """(module or parameter name, adapter part or None) of a saved key."""
    name = key.removeprefix(_PREFIX)
    for part, suffix in _PEFT_PARTS.items():
        if name.endswith("." + suffix):
            return name[: -len(suffix) - 1], part
    return name, None


def save_adapter(model: nn.Module, directory: str | os.PathLike, base_model_name: str | None = None,
                 adapter_name: str | None = None, keep_modules: Sequence[str] = ()) -> Path:
    """Save adapter `adapter_name` (default: the active one) to `directory` in PEFT's format.

    `keep_modules`: frozen modules whose weights the base checkpoint lacks (a head layer left at
    its random start), saved whole beside the trained ones (PEFT's modules_to_save), so that
    PEFT, which initialises them afresh on loading the base, reads the same weights.

    Raises:
        AdapterError: `model` has no LoRA (or no such adapter), its layers are merged, or
            the adapter's layers differ in rank, alpha, scaling, dropout or DoRA.
    """
    layers = dict(lora_modules(model))
    if not layers:
        raise AdapterError("this model has no LoRA applied; call apply_lora(model, config) before save_adapter")
    if adapter_name is None:
        active = {n for layer in layers.values() for n in layer.active}
        if len(active) != 1:
            raise AdapterError(f"{len(active)} adapters are active; pass adapter_name to say which to save")
        adapter_name = active.pop()
    mine = {n: layer.adapters[adapter_name] for n, layer in layers.items() if adapter_name in layer.adapters}
    if not mine:
        raise AdapterError(f"this model has no adapter {adapter_name!r}; its adapters: "
                           f"{', '.join(adapter_names(model))}")
    if any(layer.merged for layer in layers.values()):
        raise AdapterError("the adapters are merged into the weights; call unmerge_lora(model) before saving")
    tensors: dict[str, torch.Tensor] = {}
    settings = set()
    for module, adapter in mine.items():
        a, b, r, alpha = adapter.plain_lora()
        c = adapter.config
        settings.add((r, alpha, c.scaling, c.dropout, c.use_dora))
        tensors[_to_peft_key(module, "lora_A")] = a.float()
        tensors[_to_peft_key(module, "lora_B")] = b.float()
        if c.use_dora:
            tensors[_to_peft_key(module, "magnitude")] = adapter.magnitude.detach().float()
    if len(settings) != 1:
        raise AdapterError(f"adapter {adapter_name!r} has layers with different rank, alpha, scaling, dropout or "
                           "DoRA; PEFT's format holds one setting per adapter")
    r, alpha, scaling, dropout, use_dora = settings.pop()
    train_modules = list(dict.fromkeys([*getattr(model, "lora_train_modules", []), *keep_modules]))
    for t in train_modules:
        for n, p in model.get_submodule(t).named_parameters():
            tensors[f"{_PREFIX}{t}.{n}"] = p.detach().float()
    peft_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "use_rslora": scaling == "rslora",
        "target_modules": sorted(mine),
        "modules_to_save": train_modules or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": use_dora,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors_atomic(tensors, out / WEIGHTS_NAME, metadata={"format": "pt"})
    atomic_write_bytes(out / CONFIG_NAME, (json.dumps(peft_config, indent=2) + "\n").encode())
    return out


def save_adapters(model: nn.Module, directory: str | os.PathLike, base_model_name: str | None = None) -> Path:
    """Save every adapter of `model` PEFT's way: `default` (or the only one) in `directory`,
    each other one in `directory/<name>/`."""
    names = adapter_names(model)
    out = Path(directory)
    for name in names:
        top = name == DEFAULT_ADAPTER or len(names) == 1
        save_adapter(model, out if top else out / name, base_model_name, adapter_name=name)
    return out


def adapter_folders(directory: str | os.PathLike) -> dict[str, Path]:
    """Adapter name -> folder for a folder saved by `save_adapters` (the top one is `default`)."""
    root = Path(directory)
    found = {DEFAULT_ADAPTER: root} if (root / CONFIG_NAME).exists() else {}
    if root.is_dir():
        found.update({p.name: p for p in sorted(root.iterdir()) if p.is_dir() and (p / CONFIG_NAME).exists()})
    return found


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
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(("pissa", "olora", "corda", "eva", "loftq")):
        raise AdapterError(f"{folder / CONFIG_NAME} was saved with init_lora_weights={init!r} and needs the base "
                           "weights that initialisation rewrote; save it from PEFT converted to plain LoRA "
                           "(save_pretrained(..., path_initial_model_for_weight_conversion=...))")
    unsupported = {
        "fan_in_fan_out": raw.get("fan_in_fan_out"),
        "lora_bias": raw.get("lora_bias"), "rank_pattern": raw.get("rank_pattern"),
        "alpha_pattern": raw.get("alpha_pattern"),
    }
    bad = [k for k, v in unsupported.items() if v]
    if raw.get("bias", "none") != "none":
        bad.append("bias")
    if bad:
        raise AdapterError(f"{folder / CONFIG_NAME} uses {', '.join(bad)}, which lorafit's LoRA does not support")
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
            train_modules=train_modules, use_dora=bool(raw.get("use_dora", False)),
        )
    except KeyError as exc:
        raise AdapterError(f"{folder / CONFIG_NAME} lacks the key {exc}; the adapter is corrupt: re-save it") from None
    except ValueError as exc:
        raise AdapterError(f"{folder / CONFIG_NAME}: {exc}") from None


@dataclass
class _AdapterFiles:
    """An adapter folder's contents, read and checked on their own."""

    config: LoRAConfig
    parts: dict[str, dict[str, torch.Tensor]]
    """Per adapted module: lora_A, lora_B (and DoRA's magnitude)."""
    train_params: dict[str, torch.Tensor]
    """Whole trained parameters (PEFT's modules_to_save), by this model's parameter name."""
    lora_names: list[str]
    train_modules: list[str]


def _read_adapter_files(folder: Path, model: nn.Module) -> _AdapterFiles:
    """Read `folder`'s config and weights; refuse what is truncated, corrupt or names modules
    and parameters `model` does not have."""
    raw = _read_config(folder)
    tensors = _read_tensors(folder / WEIGHTS_NAME)
    parts: dict[str, dict[str, torch.Tensor]] = {}  # module -> {lora_A, lora_B, magnitude}
    train_params: dict[str, torch.Tensor] = {}
    for key, v in tensors.items():
        name, part = _split_peft_key(key)
        if part is None:
            train_params[name] = v
        else:
            parts.setdefault(name, {})[part] = v
    lora_names = sorted(parts)
    if not lora_names:
        raise AdapterError(f"{folder / WEIGHTS_NAME} holds no LoRA weights (no lora_A/lora_B keys)")
    needed = ("lora_A", "lora_B", "magnitude") if raw.get("use_dora") else ("lora_A", "lora_B")
    for n in lora_names:
        for part in needed:
            if part not in parts[n]:
                raise AdapterError(f"{folder / WEIGHTS_NAME} lacks {_to_peft_key(n, part)}; "
                                   "the adapter is truncated: re-save it")
    modules = dict(model.named_modules())
    missing = [n for n in lora_names if n not in modules]
    if missing:
        raise AdapterError(
            f"the adapter in {folder} is for another architecture: this model has no module {missing[0]!r} "
            f"({len(missing)} of its {len(lora_names)} adapted modules are absent); load it into the base model "
            f"it was trained on ({raw.get('base_model_name_or_path') or 'see adapter_config.json'})"
        )
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
    bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    if bad:
        raise AdapterError(f"the adapter in {folder} holds NaN or inf in {bad[0]!r}; it is corrupt: retrain it")
    return _AdapterFiles(config=_config_from_peft(raw, folder, lora_names, train_modules), parts=parts,
                         train_params=train_params, lora_names=lora_names, train_modules=train_modules)


def _check_fits(model: nn.Module, folder: Path, f: _AdapterFiles, adapter_name: str) -> dict:
    """Refuse an adapter that does not fit `model` as adapter `adapter_name` (merged layers, other
    modules or rank than an adapter of that name, shapes, whole modules next to other adapters);
    returns the layers that already hold `adapter_name` (empty for a new adapter)."""
    config, use_dora = f.config, f.config.use_dora
    layers = dict(lora_modules(model))
    if any(layer.merged for layer in layers.values()):
        raise AdapterError("this model's LoRA layers are merged into their weights; call unmerge_lora(model) "
                           f"before loading the adapter in {folder}, or load it into a model without LoRA")
    others = [n for n in adapter_names(model) if n != adapter_name]
    if others and f.train_modules:
        raise AdapterError(f"the adapter in {folder} trains whole modules ({', '.join(f.train_modules)}), which "
                           f"would overwrite those the model's adapter {others[0]!r} uses; load it into a model "
                           "without adapters")
    existing = {n: layer for n, layer in layers.items() if adapter_name in layer.adapters}
    if existing:
        if sorted(existing) != f.lora_names:
            raise AdapterError(f"the adapter in {folder} adapts other modules than adapter {adapter_name!r} on this "
                               "model; load it into a model without LoRA, or under another adapter_name")
        ranks = {layer.adapters[adapter_name].config.r for layer in existing.values()}
        if ranks != {config.r}:
            raise AdapterError(f"the adapter in {folder} has rank {config.r} but this model has LoRA of rank "
                               f"{sorted(ranks)} applied; load it into a model without LoRA")
    modules = dict(model.named_modules())
    for n in f.lora_names:
        base = modules[n].base if n in layers else modules[n]
        if not isinstance(base, nn.Linear):
            raise AdapterError(f"the adapter in {folder} adapts {n!r}, which is a {type(base).__name__} here, "
                               "not an nn.Linear: it was saved for another architecture")
        a, b = f.parts[n]["lora_A"], f.parts[n]["lora_B"]
        want_a, want_b = (config.r, base.in_features), (base.out_features, config.r)
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b or (
                use_dora and tuple(f.parts[n]["magnitude"].shape) != (base.out_features,)):
            raise AdapterError(
                f"the adapter in {folder} does not fit module {n!r}: lora_A {tuple(a.shape)} and lora_B "
                f"{tuple(b.shape)}, but rank {config.r} on this ({base.out_features}x{base.in_features}) layer "
                f"needs {want_a} and {want_b}: it was saved for another model size or rank"
            )
    params = dict(model.named_parameters())
    for n, v in f.train_params.items():
        if params[n].shape != v.shape:
            raise AdapterError(f"the adapter in {folder} holds {n!r} of shape {tuple(v.shape)}, but this model's is "
                               f"{tuple(params[n].shape)}: it was saved for another model size or label count")
    return existing


def load_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str = DEFAULT_ADAPTER) -> LoRAConfig:
    """Load a PEFT-format LoRA or DoRA adapter (from lorafit or PEFT) into `model` as
    adapter `adapter_name`; returns its config.

    If `model` has no adapter of that name, it is added (LoRA is applied to the
    adapter's modules; on a model that has other adapters it joins them, inactive
    until `set_active_adapter`); if it has, the file must fit it (same modules and
    rank, not merged), and the layers take the file's alpha, scaling, dropout and DoRA.

    Raises:
        AdapterError: a missing, corrupt, truncated or pickled adapter; one saved for
            another architecture (a module it names is not in `model`), another rank,
            or other shapes; keys that are missing; merged layers; or an adapter with
            whole trained modules added next to another adapter.
    """
    folder = Path(directory)
    f = _read_adapter_files(folder, model)
    existing = _check_fits(model, folder, f, adapter_name)
    if not existing:  # a new adapter; next to others it joins them inactive
        apply_lora(model, f.config, adapter_name)
    else:  # the layers take the file's alpha, scaling, dropout and DoRA, not those they had
        for layer in existing.values():
            layer.adapters[adapter_name] = LoRAAdapter.build(layer.base, f.config)
        model.lora_train_modules = f.train_modules
    with torch.no_grad():
        for n in f.lora_names:
            adapter = model.get_submodule(n).adapters[adapter_name]
            for part, v in f.parts[n].items():
                getattr(adapter, part).copy_(v.to(torch.float32))
        params = dict(model.named_parameters())
        for n, v in f.train_params.items():
            params[n].copy_(v.to(params[n].dtype))
    config = f.config
    mark_only_lora_as_trainable(model)
    return config
