"""The run configuration: one dataclass, from which the CLI flags are derived.

`--config FILE` (TOML or JSON) fills it, flags override the file, and the resolved
config is saved with every run as `config.json`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from lorafit.errors import ConfigError
from lorafit.lora import INITS
from lorafit.metrics import CLASS_WEIGHTS
from lorafit.attention import ATTENTIONS
from lorafit.first_token import LAST_LAYERS
from lorafit.pooling import POOLINGS
from lorafit.precision import PRECISIONS
from lorafit.tracking import TRACKERS
from lorafit.strategies import STRATEGIES, STRATEGY_NAMES

KEEPS = ("last", "best")
HEAD_INITS = ("random", "probe")
DEFAULT_EPOCHS = 3


def is_auto_lr(value: object) -> bool:
    """Whether an --lr value asks for `lorafit.lr_search`: the word auto in any case, spaces
    around it ignored, wherever it comes from (a flag, a config file, a sweep, the Python API)."""
    return isinstance(value, str) and value.strip().lower() == "auto"


def _f(default, help: str, **kw):
    """A dataclass field with its CLI help text."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class RunConfig:
    """Everything one training run needs; `lorafit train --help` lists it as flags."""

    strategy: str = _f("lora", "what trains: " + "; ".join(f"{s.name}: {s.description}" for s in STRATEGIES.values()),
                       choices=STRATEGY_NAMES)
    model: str = _f("all-MiniLM-L6-v2", "Hugging Face model name or local folder (default: the embedded "
                    "all-MiniLM-L6-v2)")
    pooling: str = _f("auto", "what the classifier head reads: cls (the first token, the architecture's own head), "
                      "mean (the attention-masked mean of the tokens), or auto (the model's sentence-transformers "
                      "pooling where its folder has one, as all-MiniLM-L6-v2's says mean; else cls)",
                      choices=POOLINGS)
    data: str | None = _f(None, "data source: an aclImdb/ folder, its .tar.gz, `imdb` (download), a "
                          ".csv/.jsonl/.parquet table (default: the embedded IMDb sample)")
    epochs: int | None = _f(None, f"training epochs (default: {DEFAULT_EPOCHS}, or more where that many give fewer "
                            "than --min-steps optimizer steps; given, exactly that many)")
    lr: float | str | None = _f(None, "peak learning rate, or auto: the strategy's default times 1/2, 1 and 2, "
                                "each tried on the run's first third of epochs and judged on validation loss "
                                "(about one more run's time; docs/recipe.md). Default: the strategy's: " + ", ".join(
                                    f"{s.name} {s.default_lr:g}" for s in STRATEGIES.values()))
    batch_size: int = _f(16, "examples per optimizer step (before accumulation)")
    grad_accum: int = _f(1, "batches per optimizer step (gradient accumulation)")
    max_length: int = _f(512, "tokens per example; longer texts are truncated (batches are padded only to their "
                         "longest text, so short texts are padded no further at a higher limit)")
    weight_decay: float = _f(0.01, "AdamW weight decay")
    warmup_ratio: float = _f(0.1, "fraction of the optimizer steps spent warming the learning rate up")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 turns clipping off)")
    rank: int = _f(4, "LoRA rank r")
    alpha: float = _f(8.0, "LoRA alpha; the update is scaled by alpha / r")
    lora_dropout: float = _f(0.0, "dropout on the LoRA branch's input")
    scaling: str = _f("standard", "LoRA scaling: standard (alpha/r) or rslora (alpha/sqrt r; without --lr, "
                      "at half lora's default rate)",
                      choices=("standard", "rslora"))
    targets: list[str] = _f(["encoder", "pooler", "classifier"],
                            "LoRA targets, comma-separated: roles (query, key, value, output, ffn, encoder: every "
                            "linear layer of the encoder, pooler: the head's first layer, classifier, head), "
                            "module-name suffixes or regexes (default: encoder, pooler and the classifier; "
                            "--train-head trains the classifier fully instead, and leaves a pooler that loading "
                            "initialised afresh frozen)")
    head_init: str = _f("random", "the classifier layer's start: random (the architecture's initialisation) or "
                        "probe (a logistic regression on the frozen model's features at that layer, fitted on "
                        "the training split, its L2 strength chosen on validation; lorafit.head_init)",
                        choices=HEAD_INITS)
    standardize: bool = _f(True, "last-two-layers: before training, fold the training split's per-feature mean and "
                           "standard deviation of the head's input into the head's first layer, so it reads "
                           "standardized features; same layers and shapes, exported unchanged (lorafit.head_init; "
                           "docs/recipe.md). --no-standardize starts from the pretrained layer as it is")
    train_head: bool = _f(True, "lora: train the classifier layer fully next to the adapters, and leave the head's "
                          "first layer (in --targets as the role pooler or by its module name) frozen at its random "
                          "start where loading initialised it afresh (DistilBERT's pre_classifier, RoBERTa's and "
                          "MPNet's classifier.dense; BERT's pretrained pooler gets an adapter); --no-train-head puts "
                          "a LoRA adapter on each instead, as the seed experiment did")
    dora: bool = _f(False, "lora: DoRA (Liu et al. 2024), a learned magnitude per output row next to the low-rank "
                    "direction update")
    init: str = _f("kaiming", "lora: how A and B start: kaiming (A Kaiming-uniform, B zero), gaussian (A ~ N(0, 1/r)), "
                   "pissa (the top-r singular vectors of each weight; the base keeps the residual)", choices=INITS)
    lora_plus_ratio: float = _f(1.0, "lora: LoRA+ (Hayou et al. 2024), B's learning rate is this times A's (1: off; "
                                "16 is the paper's suggestion); biases and LayerNorm weights keep the base rate; "
                                "without --lr, the base rate is lora's default / sqrt(ratio)")
    train_size: int | None = _f(None, "cap on training examples (stratified, seeded subset)")
    val_size: float = _f(0.1, "validation examples carved from train: a count, or a fraction of train")
    test_size: int | None = _f(None, "cap on test examples (stratified, seeded subset)")
    text_column: str = _f("text", "text column of a table source")
    label_column: str = _f("label", "label column of a table source")
    num_labels: int | None = _f(None, "number of classes (default: as many as the data's labels; another number is "
                                "an error)")
    class_weights: str = _f("auto", "loss weight per class: balanced (n / (K n_k): every class pulls alike), none "
                            "(the plain mean), or auto (balanced where the largest training class has over 1.5x "
                            "the examples of the smallest, else none)", choices=CLASS_WEIGHTS)
    min_steps: int = _f(150, "where --epochs is not given, train at least this many optimizer steps: a small "
                        f"dataset trains more than {DEFAULT_EPOCHS} epochs to reach them (0: {DEFAULT_EPOCHS} epochs)")
    seed: int = _f(0, "seed of data cuts, initialisation, dropout and batch order")
    precision: str = _f("auto", "fp32, bf16 (autocast), or auto (bf16 on CUDA where supported; on a CPU with "
                        "AMX/AVX512-BF16, bf16 only where the run's linear layers, timed once per CPU and shape, "
                        "are at least 1.1x as fast in it; else fp32)",
                        choices=PRECISIONS)
    attention: str = _f("auto", "attention kernel: sdpa (in the dtype autocast gives it), sdpa-fp32 (attention in "
                        "fp32 under bf16 autocast; faster on some CPUs, and more precise), or auto (on CPU under "
                        "bf16, both timed once per CPU and shape and the faster kept; else sdpa)",
                        choices=ATTENTIONS)
    last_layer: str = _f("auto", "the last encoder layer: auto (where the head reads only the first token, "
                         "--pooling cls, that layer computes only the first token's row, with the same logits "
                         "to float rounding; lorafit.first_token) or full (every token, as transformers "
                         "computes it)", choices=LAST_LAYERS)
    eval_batch_size: int = _f(16, "examples per evaluation and feature-extraction batch (larger batches use more "
                              "memory; docs/performance.md)")
    pad_multiple: int | None = _f(None, "pad each batch to a multiple of this many tokens (at most max_length); "
                                  "1 pads to the longest example. Default: 32 where the run computes in bf16 "
                                  "(oneDNN keeps kernels and buffers per shape, so fewer shapes use less memory), "
                                  "8 in fp32 (fewer padded tokens)")
    cache: bool = _f(True, "when only the head trains (last-two-layers): run the frozen encoder once and train the "
                     "head on its cached features (--no-cache: the plain path, dropout active in the encoder)")
    keep: str = _f("last", "which weights the run keeps, tests and saves: last (the final epoch's) or best (the "
                   "epoch with the best validation accuracy, or macro-F1 where the training classes are skewed as "
                   "--class-weights auto defines it; on a small validation split that choice is noisy)",
                   choices=KEEPS)
    checkpoint_every: int = _f(0, "optimizer steps between checkpoints (0: only at the end of each epoch)")
    report_to: list[str] = _f([], "experiment trackers, comma-separated: tensorboard (event files in the run "
                              "folder), mlflow (MLFLOW_TRACKING_URI, else ./mlruns); default none. Needs "
                              "pip install 'lorafit[tracking]'")
    attn_dropout: float | None = _f(0.0, "attention-probability dropout while training (None in a config file: "
                                    "the model's own, 0.1 for BERT). 0 lets attention run as one fused kernel")

    def __post_init__(self) -> None:
        if is_auto_lr(self.lr):
            self.lr = "auto"
        if isinstance(self.targets, str):
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        if isinstance(self.report_to, str):
            self.report_to = [t.strip() for t in self.report_to.split(",") if t.strip()]
        if self.report_to == ["none"]:
            self.report_to = []
        checks = [
            (self.strategy in STRATEGY_NAMES, "strategy", f"one of {', '.join(STRATEGY_NAMES)}"),
            (self.precision in PRECISIONS, "precision", f"one of {', '.join(PRECISIONS)}"),
            (self.pooling in POOLINGS, "pooling", f"one of {', '.join(POOLINGS)}"),
            (self.attention in ATTENTIONS, "attention", f"one of {', '.join(ATTENTIONS)}"),
            (self.last_layer in LAST_LAYERS, "last_layer", f"one of {', '.join(LAST_LAYERS)}"),
            (self.keep in KEEPS, "keep", f"one of {', '.join(KEEPS)}"),
            (self.head_init in HEAD_INITS, "head_init", f"one of {', '.join(HEAD_INITS)}"),
            (self.scaling in ("standard", "rslora"), "scaling", "standard or rslora"),
            (self.init in INITS, "init", f"one of {', '.join(INITS)}"),
            (math.isfinite(self.lora_plus_ratio) and self.lora_plus_ratio > 0, "lora_plus_ratio", "a number > 0"),
            (self.epochs is None or self.epochs >= 1, "epochs", "an integer >= 1"),
            (self.lr is None or self.lr == "auto" or (isinstance(self.lr, (int, float)) and not isinstance(
                self.lr, bool) and math.isfinite(self.lr) and 0 < self.lr <= 1), "lr", "a number in (0, 1] or auto"),
            (self.batch_size >= 1, "batch_size", "an integer >= 1"),
            (self.eval_batch_size >= 1, "eval_batch_size", "an integer >= 1"),
            (self.pad_multiple is None or self.pad_multiple >= 1, "pad_multiple", "an integer >= 1"),
            (self.grad_accum >= 1, "grad_accum", "an integer >= 1"),
            (8 <= self.max_length <= 100_000, "max_length", "an integer in [8, the model's max positions]"),
            (0 <= self.weight_decay < 1, "weight_decay", "a number in [0, 1)"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio", "a number in [0, 1)"),
            (self.max_grad_norm >= 0, "max_grad_norm", "a number >= 0"),
            (self.rank >= 1, "rank", "an integer >= 1"),
            (math.isfinite(self.alpha) and self.alpha > 0, "alpha", "a number > 0"),
            (0 <= self.lora_dropout < 1, "lora_dropout", "a number in [0, 1)"),
            (bool(self.targets), "targets", "a non-empty list of names"),
            (self.train_size is None or self.train_size >= 2, "train_size", "an integer >= 2"),
            (self.test_size is None or self.test_size >= 1, "test_size", "an integer >= 1"),
            (self.val_size > 0 and (self.val_size < 1 or float(self.val_size).is_integer()), "val_size",
             "a count >= 1 or a fraction in (0, 1)"),
            (self.num_labels is None or self.num_labels >= 2, "num_labels", "an integer >= 2"),
            (self.class_weights in CLASS_WEIGHTS, "class_weights", f"one of {', '.join(CLASS_WEIGHTS)}"),
            (self.min_steps >= 0, "min_steps", "an integer >= 0"),
            (self.checkpoint_every >= 0, "checkpoint_every", "an integer >= 0"),
            (self.attn_dropout is None or 0 <= self.attn_dropout < 1, "attn_dropout", "a number in [0, 1)"),
            (all(t in TRACKERS for t in self.report_to), "report_to",
             f"a comma list of {', '.join(TRACKERS)} (or none)"),
        ]
        for ok, name, allowed in checks:
            if not ok:
                raise ConfigError(f"{name} (--{name.replace('_', '-')}) must be {allowed}, "
                                  f"got {getattr(self, name)!r}")
        if self.head_init == "probe" and self.strategy == "lora" and not self.train_head:
            raise ConfigError("--head-init probe fits the classifier layer, which --no-train-head leaves frozen "
                              "under a LoRA adapter: give --train-head (the default), or --head-init random")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def field_types() -> dict[str, tuple[type, bool]]:
    """Field name -> (base type, optional) of RunConfig, read from its annotations."""
    hints = typing.get_type_hints(RunConfig)
    out = {}
    for f in dataclasses.fields(RunConfig):
        tp = hints[f.name]
        optional = False
        if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            optional, tp = True, args[0]
        if typing.get_origin(tp) is list:
            tp = list
        out[f.name] = (tp, optional)
    return out


def _coerce(name: str, value, tp: type, optional: bool, where: str):
    if value is None and optional:
        return None
    if name == "lr" and is_auto_lr(value):
        return "auto"
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value) if name != "val_size" or not float(value).is_integer() else value
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is list:
        if isinstance(value, str):
            return [t.strip() for t in value.split(",") if t.strip()]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
    raise ConfigError(f"{where}: key {name!r} must be {'a list of strings' if tp is list else tp.__name__}"
                      f"{' or null' if optional else ''}, got {type(value).__name__} {value!r}")


def config_from_mapping(values: dict, where: str = "config") -> dict:
    """Validated field values from a mapping (a parsed config file); unknown keys are errors."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must hold a table of settings (key = value), got {type(values).__name__}")
    types_ = field_types()
    out = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in types_:
            raise ConfigError(f"{where}: unknown key {key!r}; known keys: {', '.join(types_)}")
        tp, optional = types_[name]
        out[name] = _coerce(name, value, tp, optional, where)
    return out


def read_config_file(path: str | Path) -> dict:
    """Settings from a TOML or JSON file (by suffix; JSON otherwise tried first).

    Raises:
        ConfigError: the file is missing, unparsable, or holds an unknown key or a
            value of the wrong type (the message names the key).
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist; pass a .toml or .json file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {p} is not UTF-8 text; pass a .toml or .json file") from None
    try:
        data = tomllib.loads(text) if p.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        kind = "TOML" if p.suffix == ".toml" else "JSON"
        raise ConfigError(f"config file {p} is not valid {kind} ({exc})") from None
    return config_from_mapping(data, where=f"config file {p}")


def make_config(file: str | Path | None = None, **overrides) -> RunConfig:
    """RunConfig from an optional file, then `overrides` (flags) on top."""
    values = read_config_file(file) if file else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return RunConfig(**values)
    except TypeError as exc:  # a comparison on a value of the wrong type
        raise ConfigError(f"invalid configuration: {exc}") from None
