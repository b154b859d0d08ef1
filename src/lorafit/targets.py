"""Which modules LoRA adapts: role presets per architecture and target resolution.

A target is one of
- a *role* (`query`, `key`, `value`, `output`, `ffn`, `pooler`, `classifier`, `head`),
  looked up in the architecture's preset below, or `encoder`: every `nn.Linear` inside the
  encoder's layers (the attention's projections and the feed-forward layers; not the pooler
  or the head), found by where the encoder sits rather than by name, so it holds for an
  architecture the table does not list. `pooler` is the head's first layer, between what
  the head reads and the classifier (BERT: `pooler.dense`; DistilBERT: `pre_classifier`;
  RoBERTa, MPNet: `classifier.dense`); for an architecture the table does not list, the
  last `nn.Linear` outside the encoder that feeds the classifier (`_pooler_fallback`);
- a *module-name suffix* (`key`, `attention.self.key`, `classifier`): matches a module
  whose dotted name equals it or ends with `.` + it, as PEFT matches `target_modules`;
- a *regex* (any string holding one of ``*+?[](){}|^$\\``), matched against the whole
  dotted module name with `re.fullmatch`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from lorafit.architectures import GENERIC_ROLES, architecture
from lorafit.errors import TargetError

ROLES = ("query", "key", "value", "output", "ffn", "encoder", "pooler", "classifier", "head")

_REGEX_CHARS = set("*+?[](){}|^$\\")


def linear_names(model: nn.Module) -> list[str]:
    """Dotted names of every `nn.Linear` in `model`, in module order."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and name]


def _summarise(names: Iterable[str]) -> str:
    """Collapse per-layer names (`layer.3.` -> `layer.<i>.`) so an error lists each kind once."""
    seen: dict[str, None] = {}
    for name in names:
        seen[re.sub(r"\.(\d+)\.", ".<i>.", name)] = None
    return ", ".join(seen)


def _classifier_fallback(model: nn.Module) -> list[str]:
    """The last Linear whose output size is the number of labels (generic architectures)."""
    num_labels = getattr(getattr(model, "config", None), "num_labels", None)
    candidates = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module.out_features == num_labels
    ]
    return candidates[-1:]


def _wrapper_name(name: str, modules: dict[str, nn.Module]) -> str:
    """A layer LoRA already wraps is named by its wrapper (whose `base` it is), as the roles name it."""
    parent, _, leaf = name.rpartition(".")
    return parent if leaf == "base" and hasattr(modules.get(parent), "adapters") else name


def _pooler_fallback(model: nn.Module, classifier: list[str], encoder: list[str]) -> list[str]:
    """The head's first layer of an architecture the table does not list: the last `nn.Linear`
    before the classifier, outside the encoder, whose output size is the classifier's input
    size (a pooler or a head's dense layer); [] where there is none."""
    if not classifier:
        return []
    modules = dict(model.named_modules())
    last = modules[classifier[0]]
    width = getattr(getattr(last, "base", last), "in_features", None)
    found = []
    for name, module in modules.items():
        if name == classifier[0]:
            break
        name = _wrapper_name(name, modules)
        if (name and isinstance(module, nn.Linear) and module.out_features == width and name not in encoder
                and not any(name.startswith(e + ".") for e in encoder)):
            found = [name]
    return found


def encoder_linears(model: nn.Module) -> list[str]:
    """Dotted names of every `nn.Linear` under the model's encoder (`Architecture.encoder`,
    else `encoder` or `transformer` of its base model), in module order; [] where it has none."""
    base = getattr(model, "base_model", model)
    for attr in (architecture(model).encoder, "encoder", "transformer"):
        encoder = getattr(base, attr, None)
        if isinstance(encoder, nn.Module):
            break
    else:
        return []
    inside = {id(m) for m in encoder.modules()}
    modules = dict(model.named_modules())
    out = []
    for n, m in modules.items():
        if n and isinstance(m, nn.Linear) and id(m) in inside:
            out.append(_wrapper_name(n, modules))
    return out


def target_presets(model: nn.Module) -> dict[str, list[str]]:
    """Role name -> dotted module names for `model`'s architecture.

    Architectures in lorafit.architectures (DistilBERT, BERT/MiniLM, RoBERTa, MPNet) use their presets;
    others fall back to the usual projection names, to the last Linear whose output
    size is `config.num_labels` for `classifier`, and to the Linear feeding it for `pooler`.
    Roles that match nothing are left out.
    """
    patterns = architecture(model).roles or GENERIC_ROLES
    names = [name for name, _ in model.named_modules() if name]
    presets = {role: [n for n in names if re.fullmatch(rx, n)] for role, rx in patterns.items()}
    presets["encoder"] = encoder_linears(model)
    if "classifier" not in patterns:
        presets["classifier"] = _classifier_fallback(model)
        presets["head"] = presets["classifier"]
    if "pooler" not in patterns:
        presets["pooler"] = _pooler_fallback(model, presets["classifier"], presets["encoder"])
    return {role: found for role, found in presets.items() if found}


def is_regex(target: str) -> bool:
    """True when `target` is meant as a regex (holds a regex metacharacter)."""
    return any(ch in _REGEX_CHARS for ch in target)


def _match(target: str, names: list[str], presets: dict[str, list[str]]) -> list[str]:
    if target in ROLES:
        return presets.get(target, [])
    if is_regex(target):
        try:
            rx = re.compile(target)
        except re.error as exc:
            raise TargetError(f"target {target!r} is not a valid regex ({exc}); fix the pattern") from None
        return [n for n in names if rx.fullmatch(n)]
    return [n for n in names if n == target or n.endswith("." + target)]


def resolve_targets(model: nn.Module, targets: Iterable[str], *, what: str = "LoRA target") -> list[str]:
    """Dotted names of the modules that `targets` select, in module order.

    Raises:
        TargetError: when a target matches no module; the message lists the model's
            `nn.Linear` names (per-layer names collapsed) so the user can pick one.
    """
    names = [name for name, _ in model.named_modules() if name]
    presets = target_presets(model)
    selected: set[str] = set()
    for target in targets:
        found = _match(target, names, presets)
        if not found:
            hint = ("; the default adapts the head's first layer (role pooler), which this model's head does not "
                    "have: pass --targets encoder,classifier" if target == "pooler" else "")
            raise TargetError(
                f"{what} {target!r} matches no module of this "
                f"{getattr(getattr(model, 'config', None), 'model_type', 'model')} model. "
                f"Use a role ({', '.join(r for r in ROLES if r in presets)}), a module-name suffix or a regex; "
                f"its nn.Linear modules are: {_summarise(linear_names(model))}{hint}"
            )
        selected.update(found)
    return [n for n in names if n in selected]
