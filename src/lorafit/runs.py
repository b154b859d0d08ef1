"""A run end to end, and the run folder it leaves.

    runs/<name>/
      config.json       the resolved RunConfig
      metrics.jsonl     one line per epoch (train/val loss and accuracy, seconds, tokens/s)
      final.json        test accuracy and F1, parameters, time, peak memory, saved size
      adapter/          lora: the adapter in PEFT's format
      fresh_init.safetensors   lora: the frozen, freshly initialised head weights it adapts
      trained.safetensors      full / last-two-layers: the parameters that trained
      curves.png        loss and accuracy per epoch, train vs validation
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from lorafit import distributed, metrics
from lorafit.files import atomic_write_bytes, write_json
from lorafit.architectures import architecture
from lorafit.attention import resolve_attention, set_attention
from lorafit.config import DEFAULT_EPOCHS, RunConfig, config_from_mapping
from lorafit.data import load_dataset
from lorafit.data.batching import resolve_pad_multiple
from lorafit.data.encoding import encode_split
from lorafit.errors import ConfigError, Interrupted, RunDirError
from lorafit.first_token import last_layer_of, set_pruning
from lorafit.lora import count_parameters, merge_lora
from lorafit.models import LoadedModel, fresh_state, load_model
from lorafit.strategies import STRATEGIES, learning_rate
from lorafit.tracking import Tracker
from lorafit.tracking import check_available as check_trackers
from lorafit.precision import model_dims, resolve_precision
from lorafit.machine import cpu_model
from lorafit.training import TrainResult, TrainSettings, pick_device, predict_logits, train


def peak_rss_mb() -> float:
    """This process's peak resident memory, MB."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse, before any work, an output folder that would mix a new run into another."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"output path {out} is a file; pass a folder with --out")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            hint = f", --resume {out} to continue it" if (out / "checkpoint.safetensors").exists() else ""
            raise RunDirError(f"output folder {out} is not empty; pass another --out{hint}, or --overwrite to "
                              "replace it")
        if not (out / "config.json").exists() and not (out / "report.json").exists():
            raise RunDirError(f"output folder {out} is not a lorafit run; refusing to overwrite it: pass another "
                              "--out")
    parent = next((p for p in [out, *out.parents] if p.exists()), Path("."))
    if not os.access(parent, os.W_OK):
        raise RunDirError(f"cannot write to {parent}; pass a writable --out")


def prepare_out_dir(out: Path, overwrite: bool) -> None:
    """Make `out` empty and ready (after `check_out_dir`)."""
    check_out_dir(out, overwrite)
    if out.exists() and any(out.iterdir()):
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"cannot create output folder {out} ({exc.strerror}); pass a writable --out") from None


def _log(msg: str) -> None:
    if distributed.is_main():
        print(msg, flush=True)


def _encode_splits(splits, tokenizer, max_length: int, pad_multiple: int):
    encs = {}
    for name in ("train", "validation", "test"):
        encs[name] = encode_split(getattr(splits, name), tokenizer, max_length, pad_multiple=pad_multiple)
    return encs


def check_max_length(cfg: RunConfig, model: nn.Module) -> None:
    """--max-length must fit the model's position embeddings."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit:
        limit -= architecture(model).position_offset  # RoBERTa's, MPNet's positions start after the padding index
    if limit and cfg.max_length > limit:
        raise ConfigError(f"max_length (--max-length) {cfg.max_length} is above this model's {limit} positions; "
                          f"pass --max-length {limit} or less")


def _check_disk(out: Path, model: nn.Module) -> None:
    """Enough free disk for a checkpoint (weights, AdamW moments, best weights) and the saved run."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    need = trainable * 4 * 6 + 10 * 2**20  # 4 copies in the checkpoint, its temporary twin, the run's weights
    free = shutil.disk_usage(out if out.exists() else next(p for p in out.parents if p.exists())).free
    if free < need:
        raise RunDirError(f"only {free / 2**20:,.0f} MB free where {out} is; this run's checkpoints need about "
                          f"{need / 2**20:,.0f} MB: free some space or pass another --out")


def load_data(cfg: RunConfig, source: str | None = None):
    """The DatasetSplits `cfg` describes (`source` overrides `cfg.data`)."""
    return load_dataset(source if source is not None else cfg.data, val_size=cfg.val_size,
                        train_size=cfg.train_size, test_size=cfg.test_size, seed=cfg.seed,
                        text_column=cfg.text_column, label_column=cfg.label_column, num_labels=cfg.num_labels)


def preflight(cfg: RunConfig) -> None:
    """Check data, model, max_length and LoRA targets cheaply, before a long job starts.

    Raises:
        LorafitError: whatever `run_training` would raise on these at its start.
    """
    splits = load_data(cfg)
    loaded = load_model(cfg.model, num_labels=len(splits.label_names), seed=cfg.seed, attn_dropout=cfg.attn_dropout,
                        pooling=cfg.pooling)
    check_max_length(cfg, loaded.model)
    STRATEGIES["lora"].setup(loaded.model, cfg, loaded.fresh_keys)
    check_trackers(cfg.report_to)


def run_training(cfg: RunConfig, out: Path, *, overwrite: bool = False, progress: bool = True,
                 resume: bool = False) -> dict:
    """Train `cfg.strategy`, test the kept weights (`cfg.keep`), save the run; returns final.json.

    With `resume`, `out` is an existing run folder: training continues from its last
    complete checkpoint. Started by torchrun as one of several processes, it trains data-
    parallel (`lorafit.distributed`); rank 0 alone writes the run folder and prints.
    """
    distributed.init()
    device = pick_device()
    try:
        return _run_training(cfg, out, device, overwrite=overwrite, progress=progress and distributed.is_main(),
                             resume=resume)
    finally:
        distributed.shutdown()


@dataclass
class RunSettings:
    """What a run's `auto` settings resolved to on this machine (a resumed run: what it
    recorded), as config.json stores them."""

    precision: str
    attention: str
    last_layer: str
    pad_multiple: int
    pooling: str

    def as_config(self) -> dict:
        return {"precision_resolved": self.precision, "pooling_resolved": self.pooling,
                "attention_resolved": self.attention, "last_layer_resolved": self.last_layer,
                "pad_multiple_resolved": self.pad_multiple}


def resolve_settings(cfg: RunConfig, loaded: LoadedModel, device: torch.device, recorded: dict | None
                     ) -> RunSettings:
    """Resolve precision, attention kernel, last layer and pad multiple for `loaded.model`
    (setting the kernel and last layer on it), in that order: each may depend on the one before."""
    precision = _pick_precision(cfg, loaded.model, device, recorded)
    attention = _pick_attention(cfg, loaded.model, device, precision, recorded)
    last_layer = _pick_last_layer(cfg, loaded.model, recorded)
    return RunSettings(precision=precision, attention=attention, last_layer=last_layer,
                       pad_multiple=_pick_pad_multiple(cfg, precision, recorded), pooling=loaded.pooling)


@dataclass
class _Prepared:
    """A run set up to train: its model with the strategy applied, data, settings and recipe."""

    loaded: LoadedModel
    strategy: object
    fresh: dict
    splits: object
    settings: RunSettings
    recipe: dict
    config: dict
    """config.json's record: the RunConfig's fields and what resolved."""
    lr: float
    trainable: int
    total: int


def _run_training(cfg: RunConfig, out: Path, device: torch.device, *, overwrite: bool, progress: bool,
                  resume: bool) -> dict:
    from lorafit.checkpoint import CHECKPOINT, load_checkpoint

    state = load_checkpoint(out / CHECKPOINT) if resume else None
    earlier_peak = float(state[1].get("peak_memory_mb", 0.0)) if state else 0.0
    if not resume:
        check_out_dir(out, overwrite)
    check_trackers(cfg.report_to)
    t_start = time.perf_counter()
    run = _prepare(cfg, out, device, overwrite=overwrite, resume=resume)
    trained = _train_run(run, cfg, out, device, state, progress, earlier_peak, resume=resume)
    return _test_and_record(run, trained, cfg, out, device, progress, earlier_peak=earlier_peak, t_start=t_start,
                            resume=resume)


def _prepare(cfg: RunConfig, out: Path, device: torch.device, *, overwrite: bool, resume: bool) -> _Prepared:
    """Load data and model, apply the strategy, resolve the settings and the recipe, say
    so, and (a new run, rank 0) empty the folder and write config.json."""
    splits = load_data(cfg)
    label_names = splits.label_names
    loaded = load_model(cfg.model, num_labels=len(label_names), seed=cfg.seed, attn_dropout=cfg.attn_dropout,
                        pooling=cfg.pooling)
    model = loaded.model
    name_labels(model, label_names)
    check_max_length(cfg, model)
    fresh = fresh_state(loaded)
    torch.manual_seed(cfg.seed)
    strategy = STRATEGIES[cfg.strategy]
    strategy.setup(model, cfg, loaded.fresh_keys)
    model.to(device)
    recorded = read_config_json(out) if resume else None  # a resumed run keeps what it resolved
    settings = resolve_settings(cfg, loaded, device, recorded)
    _check_disk(out, model)
    distributed.barrier()  # every rank has checked the folder before rank 0 empties it
    if not resume and distributed.is_main():
        prepare_out_dir(out, overwrite)
    trainable, total = count_parameters(model)
    lr = learning_rate(cfg)  # with --lr auto: the rate the search tries around, or what a resumed run chose
    if cfg.lr == "auto" and recorded is not None:
        lr = recorded["lr_resolved"]
    world = distributed.world_size()
    lr_text = f"auto (search around {lr:g})" if cfg.lr == "auto" and not resume else f"{lr:g}"
    _log(f"lorafit train | strategy {cfg.strategy} | model {cfg.model} | {loaded.pooling} pooling | "
         f"{device.type} {settings.precision} | attention {settings.attention} | last layer {settings.last_layer} | "
         f"lr {lr_text}" + (f" | {world} processes (global batch {cfg.batch_size} shared out)" if world > 1 else ""))
    _log(f"trainable params: {trainable:,} / {total:,} ({100 * trainable / total:.3f}%)")
    _log(f"data: {splits.source} | train {len(splits.train):,} | validation {len(splits.validation):,} | "
         f"test {len(splits.test):,}")
    recipe = resolve_recipe(cfg, splits.train.class_counts(), recorded)
    if recipe["epochs_resolved"] > (cfg.epochs or DEFAULT_EPOCHS):
        _log(f"epochs: {recipe['epochs_resolved']} instead of {DEFAULT_EPOCHS}, to reach --min-steps {cfg.min_steps} "
             f"optimizer steps ({recipe['steps_per_epoch']} per epoch; --epochs N sets exactly N)")
    if recipe["class_weights_resolved"] is not None:
        _log("class weights (skewed classes, --class-weights " + cfg.class_weights + "): " + ", ".join(
            f"{n} {w:.2f}" for n, w in zip(label_names, recipe["class_weights_resolved"])))
    searching = cfg.lr == "auto" and not resume  # the rate is recorded once chosen (_search_lr)
    config = {**cfg.to_dict(), "lr_resolved": None if searching else lr, **settings.as_config(),
              "label_names": label_names, **{k: v for k, v in recipe.items() if k != "steps_per_epoch"}}
    if not resume and distributed.is_main():
        write_json(out / "config.json", config)
    return _Prepared(loaded=loaded, strategy=strategy, fresh=fresh, splits=splits, settings=settings, recipe=recipe,
                     config=config, lr=lr, trainable=trainable, total=total)


@dataclass
class _Trained:
    """A finished training: its result, the model it trained (a strategy's view: the model, or
    its head on cached features), the encoded sets that view reads, and the run's tracker."""

    result: TrainResult
    model: nn.Module
    sets: dict
    cache_seconds: float
    tracker: Tracker


def _train_run(run: _Prepared, cfg: RunConfig, out: Path, device: torch.device, state, progress: bool,
               earlier_peak: float, *, resume: bool) -> _Trained:
    """Tokenize, then train (`lorafit.training.train`), writing metrics.jsonl, checkpoints and
    the trackers as it goes."""
    from lorafit.checkpoint import save_checkpoint

    main, world, precision = distributed.is_main(), distributed.world_size(), run.settings.precision
    t_tok = time.perf_counter()
    encs = _encode_splits(run.splits, run.loaded.tokenizer, cfg.max_length, run.settings.pad_multiple)
    _log(f"tokenized in {time.perf_counter() - t_tok:.1f}s "
         f"({'cached' if all(e.cached for e in encs.values()) else 'fresh'})")
    pad_id = run.loaded.tokenizer.pad_token_id or 0
    settings = TrainSettings(epochs=run.recipe["epochs_resolved"], lr=run.lr, batch_size=cfg.batch_size,
                             grad_accum=cfg.grad_accum, weight_decay=cfg.weight_decay, warmup_ratio=cfg.warmup_ratio,
                             max_grad_norm=cfg.max_grad_norm, seed=cfg.seed, precision=precision,
                             eval_batch_size=cfg.eval_batch_size, keep=cfg.keep, select_on=run.recipe["select_on"],
                             class_weights=run.recipe["class_weights_resolved"])
    metrics_path = out / "metrics.jsonl"
    train_model, sets, cache_seconds = run.strategy.training_view(run.loaded.model, encs, cfg, pad_id=pad_id,
                                                                  device=device, precision=precision, log=_log)
    if cfg.standardize and cfg.strategy == "last-two-layers" and not resume:
        _standardize_head(run, cfg, out, train_model, sets, pad_id, device)
    if cfg.head_init == "probe" and not resume:
        _init_head(run, cfg, out, train_model, sets, pad_id, device)
    if cfg.lr == "auto" and not resume:
        settings = _search_lr(run, cfg, out, settings, train_model, sets, pad_id, device)
    if main:  # on resume, metrics.jsonl holds exactly the epochs the checkpoint has finished
        history = state[1]["history"] if state else []
        atomic_write_bytes(metrics_path, "".join(json.dumps(row) + "\n" for row in history).encode())
    tracker = Tracker(cfg.report_to if main else [], out, run.config, out.name, resume=resume)

    def on_epoch(row: dict) -> None:
        if main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            tracker.epoch(row)

    def save_state(tensors: dict, meta: dict) -> None:
        save_checkpoint(out, tensors, {**meta, "peak_memory_mb": max(peak_rss_mb(), earlier_peak), "processes": world})

    torch.manual_seed(cfg.seed)
    try:
        result = train(train_model, sets["train"], sets["validation"], settings, pad_id=pad_id, device=device,
                       param_groups=run.strategy.param_groups(train_model, cfg, run.lr), log=_log, progress=progress,
                       on_epoch=on_epoch, save_state=save_state if main else None,
                       checkpoint_every=cfg.checkpoint_every, resume=state,
                       on_step=tracker.step if cfg.report_to and main else None)
    except Interrupted as exc:
        tracker.close("KILLED")
        raise Interrupted(f"{exc}; continue with: lorafit train --resume {out}") from None
    except BaseException:
        tracker.close("FAILED")
        raise
    _log(f"padding efficiency (real / padded tokens, bucketed batches): {result.padding_efficiency:.3f}")
    return _Trained(result=result, model=train_model, sets=sets, cache_seconds=cache_seconds, tracker=tracker)


def _standardize_head(run: _Prepared, cfg: RunConfig, out: Path, train_model: nn.Module, sets: dict, pad_id: int,
                      device: torch.device) -> None:
    """--standardize (last-two-layers): fold the training split's per-feature mean and standard
    deviation of the head's input into its first layer (`lorafit.head_init.fold_standardization`),
    before any step (and before --head-init probe and --lr auto's trials); recorded in config.json."""
    from lorafit.feature_cache import HeadOnCache, extract_features
    from lorafit.head_init import STD_FLOOR, fold_standardization
    from lorafit.strategies import head_layers

    model = run.loaded.model
    name = head_layers(model)[0]
    layer = model.get_submodule(name)
    if not isinstance(layer, nn.Linear) or layer.bias is None:
        raise ConfigError(f"--standardize folds the input statistics into the head's first layer ({name}), which "
                          "needs to be a Linear layer with a bias; pass --no-standardize")
    t0 = time.perf_counter()
    if isinstance(train_model, HeadOnCache):  # the cached features (N, H) are that layer's input
        x = sets["train"].features
    else:  # --no-cache: the training split's token ids; one frozen pass gives the same features
        x = extract_features(model, name, sets["train"], batch_size=cfg.eval_batch_size, pad_id=pad_id,
                             device=device, precision=run.settings.precision).features
    _, std = fold_standardization(layer, x)
    seconds = time.perf_counter() - t0
    scaled = std[std >= STD_FLOOR]
    record = {"layer": name, "std_min": float(scaled.min()) if len(scaled) else None,
              "std_max": float(scaled.max()) if len(scaled) else None, "constant": len(std) - len(scaled)}
    _log(f"head: {name} reads standardized features (the training split's mean and standard deviation per "
         f"feature: std {record['std_min']:.3g} to {record['std_max']:.3g}, {record['constant']} constant; "
         f"{seconds:.1f}s)" if len(scaled) else f"head: {name} reads centred features (every one constant)")
    run.config.update(standardized=record)
    if distributed.is_main():
        write_json(out / "config.json", run.config)


def _init_head(run: _Prepared, cfg: RunConfig, out: Path, train_model: nn.Module, sets: dict, pad_id: int,
               device: torch.device) -> None:
    """--head-init probe: the classifier layer starts as a logistic regression on its frozen
    inputs (`lorafit.head_init`), fitted before any training step (and before --lr auto's
    trials, which start from it); what was fitted is recorded in config.json."""
    from lorafit.head_init import classifier_inputs, init_head_from_probe
    from lorafit.strategies import head_layers

    model = run.loaded.model
    name = head_layers(model)[1]
    layer = model.get_submodule(name)
    if not isinstance(layer, nn.Linear) or not layer.weight.requires_grad:
        raise ConfigError(f"--head-init probe fits the classifier layer ({name}) and needs it to train; "
                          "use --head-init random")
    t0 = time.perf_counter()

    def features(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        return classifier_inputs(model, name, train_model, sets[split], batch_size=cfg.eval_batch_size,
                                 pad_id=pad_id, device=device, precision=run.settings.precision)

    fit = init_head_from_probe(layer, features, run.recipe["class_weights_resolved"])
    seconds = time.perf_counter() - t0
    _log(f"head init: logistic regression on {name}'s frozen inputs, l2 {fit.l2:g}, validation loss "
         f"{fit.val_loss:.4f} ({seconds:.1f}s)")
    run.config.update(head_init_probe={"l2": fit.l2, "val_loss": fit.val_loss, "seconds": seconds})
    if distributed.is_main():
        write_json(out / "config.json", run.config)


def _search_lr(run: _Prepared, cfg: RunConfig, out: Path, settings: TrainSettings, train_model: nn.Module,
               sets: dict, pad_id: int, device: torch.device) -> TrainSettings:
    """--lr auto: choose the rate (`lorafit.lr_search`), record it and its trials in `run` and
    config.json; returns `settings` at that rate."""
    from lorafit.lr_search import search_lr

    chosen, trials, seconds = search_lr(
        train_model, sets["train"], sets["validation"], settings, run.lr,
        lambda lr: run.strategy.param_groups(train_model, cfg, lr), pad_id=pad_id, device=device, log=_log)
    _log(f"lr auto: {chosen:g}, the lowest validation loss of {len(trials)} trials ({seconds:.1f}s)")
    run.lr = chosen
    run.config.update(lr_resolved=chosen, lr_search={
        "trials": [t.as_record() for t in trials], "seconds": seconds,
        "rule": "the strategy's default times 1/2, 1, 2; each trains the run's first third of epochs; "
                "lowest validation loss (class-weighted where the run weights classes) wins"})
    if distributed.is_main():
        write_json(out / "config.json", run.config)
    return replace(settings, lr=chosen)


def _test_and_record(run: _Prepared, trained: _Trained, cfg: RunConfig, out: Path, device: torch.device,
                     progress: bool, *, earlier_peak: float, t_start: float, resume: bool) -> dict:
    """Save the trained weights, test them as `lorafit evaluate` would (adapters merged), and
    write final.json and the curves; returns final.json's record."""
    from lorafit.report import plot_curves

    main, label_names, s = distributed.is_main(), run.splits.label_names, run.settings
    model, result, sets = run.loaded.model, trained.result, trained.sets
    saved = run.strategy.save(model, cfg, out, run.fresh) if main else 0  # from the model itself, not a DDP wrapper
    # Training is over: the test pass runs the model as `lorafit evaluate` runs the saved
    # run, adapters merged (one matmul per layer), so the two give the same numbers.
    merge_lora(model)
    t_test = time.perf_counter()
    test_logits = predict_logits(trained.model, sets["test"], batch_size=cfg.eval_batch_size,
                                 pad_id=run.loaded.tokenizer.pad_token_id or 0, device=device, precision=s.precision,
                                 progress=progress, desc="test")
    test = metrics.report(test_logits, sets["test"].labels, label_names)
    test_seconds = time.perf_counter() - t_test
    peak = distributed.max_(max(peak_rss_mb(), earlier_peak))
    if not main:
        return {"test_accuracy": test["accuracy"], "rank": distributed.rank()}
    plot_curves(result.history, out / "curves.png", title=f"{cfg.strategy} · {cfg.model}",
                confusion=test["confusion"], label_names=label_names)
    collapse = metrics.collapse_warning(test["confusion"], label_names)
    final = {
        "strategy": cfg.strategy, "model": cfg.model, "data": run.splits.source,
        "test_accuracy": test["accuracy"], "test_f1": test["f1"], "test_macro_f1": test["macro_f1"],
        "test_loss": test["loss"], "test_majority_share": test["majority_share"],
        "test_top_predicted_share": test["top_predicted_share"], "test_per_class": test["per_class"],
        "test_confusion": test["confusion"], "collapse_warning": collapse,
        "kept_epoch": result.kept_epoch, "best_epoch": result.best_epoch, "selected_on": run.recipe["select_on"],
        "epochs": run.recipe["epochs_resolved"],
        "best_val_accuracy": result.history[result.best_epoch - 1]["val_accuracy"],
        "trainable_params": run.trainable, "total_params": run.total,
        "trainable_pct": 100 * run.trainable / run.total,
        "train_seconds": result.train_seconds + trained.cache_seconds, "cache_seconds": trained.cache_seconds,
        "test_seconds": test_seconds, "wall_seconds": time.perf_counter() - t_start, "peak_memory_mb": peak,
        "peak_cuda_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
        "saved_bytes": saved, "padding_efficiency": result.padding_efficiency,
        "precision": s.precision, "device": device.type, "cpu": cpu_model(), "processes": distributed.world_size(),
        "lr": run.lr, "lr_search": run.config.get("lr_search"),
        "pooling": s.pooling, "attention": s.attention, "last_layer": s.last_layer,
        "sizes": run.splits.sizes(), "label_names": label_names, "resumed": resume,
    }
    write_json(out / "final.json", final)
    trained.tracker.finish(final, out / "curves.png")
    per_class = ", ".join(f"{c['label']} {c['f1']:.3f}" for c in test["per_class"])
    _log(f"test accuracy {test['accuracy']:.4f} (majority class {test['majority_share']:.4f}) | macro-F1 "
         f"{test['macro_f1']:.4f} | F1 per class: {per_class}")
    if collapse:
        _log(collapse)
    _log(f"weights of epoch {result.kept_epoch} ({cfg.keep}) | "
         f"train {final['train_seconds']:.1f}s | peak memory {final['peak_memory_mb']:,.0f} MB | saved "
         f"{saved / 1e3:,.1f} KB | {out}")
    return final


def read_config_json(run_dir: Path) -> dict:
    """`run_dir`/config.json as saved: the RunConfig's fields and what resolved (RESOLVED)."""
    path = run_dir / "config.json"
    if not run_dir.is_dir():
        raise RunDirError(f"run folder {run_dir} does not exist; pass a folder written by `lorafit train`")
    if not path.exists():
        raise RunDirError(f"{run_dir} has no config.json; it is not a lorafit run folder (or the run never started)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunDirError(f"{path} is corrupt ({exc}); the run cannot be reloaded") from None
    return raw


def config_of(raw: dict, where: Path) -> RunConfig:
    """The RunConfig of a run's saved config (`raw`, read from the file `where`)."""
    fields = {k: v for k, v in raw.items() if k not in RESOLVED}
    fields.setdefault("pooling", "cls")  # runs from before --pooling read the first token
    return RunConfig(**config_from_mapping(fields, where=str(where)))


def read_run_config(run_dir: Path) -> RunConfig:
    """The RunConfig saved in `run_dir`/config.json."""
    return config_of(read_config_json(run_dir), run_dir / "config.json")


RESOLVED = ("lr_resolved", "precision_resolved", "pooling_resolved", "attention_resolved", "last_layer_resolved",
            "pad_multiple_resolved", "label_names", "num_labels_resolved", "class_weights_resolved", "epochs_resolved",
            "select_on", "lr_search", "head_init_probe", "standardized")
"""What config.json records beside the RunConfig: how `auto` and defaults resolved."""


def resolve_recipe(cfg: RunConfig, train_counts: list[int], recorded: dict | None) -> dict:
    """What the run's recipe resolves to on this data: the number of classes, the class
    weights (`metrics.class_weights`), the epochs (`cfg.epochs` where given, else
    DEFAULT_EPOCHS raised to reach `cfg.min_steps` optimizer steps), the metric
    `--keep best` compares; a resumed run keeps what it recorded."""
    steps = math.ceil(math.ceil(sum(train_counts) / cfg.batch_size) / cfg.grad_accum)
    out = {"num_labels_resolved": len(train_counts),
           "class_weights_resolved": metrics.class_weights(train_counts, cfg.class_weights),
           "epochs_resolved": cfg.epochs or max(DEFAULT_EPOCHS, math.ceil(cfg.min_steps / steps)),
           "select_on": metrics.selection_metric(train_counts), "steps_per_epoch": steps}
    if recorded is not None:
        out.update({k: recorded[k] for k in out if k in recorded})
    return out


def name_labels(model: nn.Module, label_names: list[str]) -> None:
    """The data's label names into the model's config (id2label, label2id), so a merged
    or exported model carries them."""
    model.config.id2label = dict(enumerate(label_names))
    model.config.label2id = {n: i for i, n in enumerate(label_names)}


def _pick_precision(cfg: RunConfig, model, device: torch.device, recorded: dict | None) -> str:
    """The precision this run computes in (lorafit.precision): a resumed run's, from its
    config.json (`recorded`); else `cfg.precision` resolved by rank 0 at this run's shapes
    and shared, so every rank agrees."""
    if recorded is not None and recorded.get("precision_resolved") in ("fp32", "bf16"):
        return recorded["precision_resolved"]
    dims = model_dims(model.config, -(-cfg.batch_size // distributed.world_size()), cfg.max_length)
    choice = resolve_precision(cfg.precision, device, dims) if distributed.is_main() else "fp32"
    return ("fp32", "bf16")[int(distributed.max_(float(choice == "bf16")))]


def _pick_attention(cfg: RunConfig, model, device: torch.device, precision: str, recorded: dict | None) -> str:
    """The attention kernel this run uses (lorafit.attention), set on `model`: a resumed run's
    recorded one; else `cfg.attention` resolved by rank 0 and shared, so every rank agrees."""
    if recorded is not None:  # what it recorded (older runs: sdpa); set_attention keeps a model's own kernel
        return set_attention(model, recorded.get("attention_resolved", "sdpa"))
    c = model.config
    heads, hidden = getattr(c, "num_attention_heads", None), getattr(c, "hidden_size", None)
    if c._attn_implementation != "sdpa" or not heads or not hidden:  # its own kernel: nothing to choose
        return set_attention(model, "sdpa")
    shape = (-(-cfg.batch_size // distributed.world_size()), heads, cfg.max_length, hidden // heads)
    choice = resolve_attention(cfg.attention, device, precision, shape) if distributed.is_main() else "sdpa"
    choice = ("sdpa", "sdpa-fp32")[int(distributed.max_(float(choice == "sdpa-fp32")))]
    return set_attention(model, choice)


def _pick_pad_multiple(cfg: RunConfig, precision: str, recorded: dict | None) -> int:
    """The multiple this run pads its batches to: a resumed run's recorded one, so it resumes
    on the same shapes; else `cfg.pad_multiple`, by default chosen by `precision`
    (lorafit.data.batching.resolve_pad_multiple)."""
    if recorded is not None and isinstance(recorded.get("pad_multiple_resolved"), int):
        return recorded["pad_multiple_resolved"]
    return resolve_pad_multiple(cfg.pad_multiple, precision)


def _pick_last_layer(cfg: RunConfig, model, recorded: dict | None) -> str:
    """`first-token` where the model's last layer computes only what a cls head reads
    (lorafit.first_token) and `cfg.last_layer` is auto, else `full`; a resumed run keeps
    what it recorded (older runs, from before the first-token layer: full), so it resumes
    to the same weights."""
    if recorded is not None:
        set_pruning(model, recorded.get("last_layer_resolved", "full") == "first-token")
    elif cfg.last_layer == "full":
        set_pruning(model, False)
    return last_layer_of(model)


def run_pooling(raw: dict) -> str:
    """The pooling a run trained with, from its config.json: `pooling_resolved` (older
    runs: their `pooling`, and cls before the field existed)."""
    return raw.get("pooling_resolved", raw.get("pooling", "cls"))


def run_num_labels(raw: dict) -> int:
    """The number of classes a run trained with, from its config.json (older runs: `num_labels`)."""
    return raw.get("num_labels_resolved") or raw.get("num_labels") or 2


def load_trained(run_dir: str | os.PathLike, merge: bool = False, adapter: str | None = None
             ) -> tuple[RunConfig, LoadedModel]:
    """Rebuild a trained run's model (eval mode) from its folder; LoRA unmerged, or
    merged into the weights with `merge` (for inference: what the run's test pass ran).
    `adapter` picks one of several adapters saved in a lora run's adapter folder."""
    run_dir = Path(run_dir)
    raw = read_config_json(run_dir)
    cfg = config_of(raw, run_dir / "config.json")
    loaded = load_model(cfg.model, num_labels=run_num_labels(raw), pooling=run_pooling(raw))
    if raw.get("label_names"):
        name_labels(loaded.model, raw["label_names"])
    set_attention(loaded.model, raw.get("attention_resolved", "sdpa"))  # as the run tested (older runs: sdpa)
    loaded.precision = raw.get("precision_resolved")  # as the run tested
    set_pruning(loaded.model, raw.get("last_layer_resolved", "full") == "first-token")  # likewise
    STRATEGIES[cfg.strategy].load(loaded.model, cfg, run_dir, adapter)
    if merge:
        merge_lora(loaded.model)
    return cfg, loaded
