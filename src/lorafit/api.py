"""The experiment as functions, for notebooks and scripts; the `lorafit` command is a thin
layer over them, so the same RunConfig validation and the same errors apply.

    import lorafit
    result = lorafit.train(strategy="lora", epochs=3, out="runs/lora")   # -> RunResult
    result.test_accuracy, result.history[-1]["val_accuracy"], result.paths["adapter"]
    cmp = lorafit.compare(train_size=2000, out="runs/cmp")               # -> CompareResult
    run = lorafit.load_run("runs/lora")                                  # -> Run
    run.predict(["A wonderful film.", "Dull."]), run.evaluate()

Every RunConfig field is a keyword argument (`lorafit train --help` lists them as flags);
`config=` takes a TOML/JSON file, a dict or a RunConfig, and the keywords override it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
from torch import nn

from lorafit.config import RunConfig, make_config
from lorafit.errors import ConfigError, LorafitError, RunDirError
from lorafit.machine import matmul_peak
from lorafit.strategies import STRATEGY_NAMES

PathLike = str | os.PathLike


def _read_history(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x] if path.exists() else []


@dataclass
class RunResult:
    """A finished training run: what `lorafit train` leaves, read back."""

    path: Path
    """The run folder."""
    config: RunConfig
    final: dict
    """final.json: test accuracy, F1 and loss, parameters, time, peak memory, ..."""
    history: list[dict] = field(default_factory=list)
    """metrics.jsonl: one dict per epoch (train/val loss and accuracy, seconds, samples/s, lr)."""

    @classmethod
    def read(cls, path: PathLike) -> RunResult:
        from lorafit.runs import read_run_config

        path = Path(path)
        if not (path / "final.json").exists():
            raise RunDirError(f"{path} has no final.json: the run did not finish (lorafit train --resume {path})")
        return cls(path, read_run_config(path), json.loads((path / "final.json").read_text()), _read_history(path))

    @property
    def test_accuracy(self) -> float:
        return self.final["test_accuracy"]

    @property
    def metrics(self) -> dict:
        """The test metrics and run figures (final.json)."""
        return self.final

    @property
    def paths(self) -> dict[str, Path]:
        """What the run folder holds: config, metrics, final, curves, and adapter or trained weights."""
        from lorafit.strategies import ADAPTER_DIR, TRAINED

        names = {"config": "config.json", "metrics": "metrics.jsonl", "final": "final.json", "curves": "curves.png",
                 "adapter": ADAPTER_DIR, "trained": TRAINED, "checkpoint": "checkpoint.safetensors"}
        return {k: self.path / v for k, v in names.items() if (self.path / v).exists()}

    def load(self, adapter: str | None = None) -> Run:
        """The trained model, ready to predict and evaluate."""
        return load_run(self.path, adapter=adapter)


def _config(config: PathLike | dict | RunConfig | None, settings: dict) -> RunConfig:
    unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(RunConfig)})
    if unknown:
        raise ConfigError(f"unknown setting {unknown[0]!r}; the settings are RunConfig's fields: "
                          + ", ".join(f.name for f in dataclasses.fields(RunConfig)))
    if isinstance(config, RunConfig):
        return dataclasses.replace(config, **settings)
    if isinstance(config, dict):
        return make_config(None, **{**config, **settings})
    return make_config(None if config is None else str(config), **settings)


def default_out(kind: str) -> Path:
    return Path("runs") / f"{kind}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def train(*, out: PathLike | None = None, config: PathLike | dict | RunConfig | None = None,
          overwrite: bool = False, progress: bool = True, resume: PathLike | None = None,
          **settings) -> RunResult:
    """Train one strategy (every RunConfig field as a keyword), test it, save the run folder.

    `out`: the run folder (default runs/<strategy>-<time>); `overwrite` replaces one that
    holds an earlier run; `resume=RUN_DIR` continues an interrupted run from its last
    checkpoint with its saved settings (no other settings allowed).

    Raises:
        ConfigError, DataError, ModelLoadError, RunDirError: bad settings, data, model or folder.
        Interrupted: Ctrl-C; the run was checkpointed (resume it with `resume=`).
    """
    from lorafit.runs import read_run_config, run_training

    if resume is not None:
        if settings or config is not None or out is not None:
            raise ConfigError("resume= continues a run with its saved settings; pass no other settings")
        run_dir = Path(resume)
        cfg = read_run_config(run_dir)
        final = run_training(cfg, run_dir, progress=progress, resume=True)
        if int(os.environ.get("RANK", "0")) != 0:
            return RunResult(run_dir, cfg, final)
        return RunResult.read(run_dir)
    cfg = _config(config, settings)
    run_dir = Path(out) if out is not None else default_out(cfg.strategy)
    final = run_training(cfg, run_dir, overwrite=overwrite, progress=progress)
    if int(os.environ.get("RANK", "0")) != 0:  # another rank of a torchrun job: rank 0 writes the folder
        return RunResult(run_dir, cfg, final)
    return RunResult.read(run_dir)


@dataclass
class CompareResult:
    """A finished comparison: one run per strategy and the report."""

    path: Path
    runs: dict[str, RunResult]
    """strategy -> its run."""
    report: dict
    """report.json: rows (accuracy, parameters, time, memory per strategy), wall time, command."""

    @property
    def test_accuracy(self) -> dict[str, float]:
        return {name: r.test_accuracy for name, r in self.runs.items()}


def compare(*, strategies: Sequence[str] | None = None, out: PathLike | None = None,
            config: PathLike | dict | RunConfig | None = None, overwrite: bool = False, progress: bool = True,
            resume: PathLike | None = None, nproc: int = 1, command: str | None = None,
            **settings) -> CompareResult:
    """Train every strategy (default: all) on the same data and seed, each in a process of
    its own (so each run's peak memory is its own); report them side by side.

    `resume=DIR` continues a cut-off comparison: finished strategies are kept, a cut-off
    one continues from its checkpoint. `nproc`: processes per run (torchrun).
    Writes report.md, report.json, report.png and one run folder per strategy.
    """
    from lorafit.jobs import compare_child, run_invocation, with_nproc
    from lorafit.report import write_compare_report
    from lorafit.files import write_json
    from lorafit.runs import check_out_dir, preflight, prepare_out_dir, read_run_config

    command = command or "lorafit.compare(" + ", ".join(
        f"{k}={v!r}" for k, v in {"strategies": strategies, "out": out, "resume": resume, **settings}.items()
        if v is not None) + ")"
    if resume is not None:
        if settings or config is not None or out is not None or strategies is not None:
            raise ConfigError("resume= continues a comparison with its saved settings; pass no other settings")
        folder = Path(resume)
        cfg = read_run_config(folder)
        state_path = folder / "compare_state.json"
        if not state_path.exists():
            raise RunDirError(f"{folder} is not a `lorafit compare` folder (no compare_state.json)")
        state = json.loads(state_path.read_text())
        preflight(cfg)
    else:
        cfg = _config(config, settings)
        folder = Path(out) if out is not None else default_out("compare")
        names = list(strategies) if strategies else list(STRATEGY_NAMES)
        unknown = [s for s in names if s not in STRATEGY_NAMES]
        if unknown or not names:
            raise ConfigError(f"--strategies: unknown strategy {unknown[0] if unknown else '(none)'}; "
                              f"choose from {', '.join(STRATEGY_NAMES)}")
        check_out_dir(folder, overwrite)
        preflight(cfg)  # bad data, model or targets fail now, not after the first strategy has trained
        prepare_out_dir(folder, overwrite)
        write_json(folder / "config.json", cfg.to_dict())
        state = {"command": command, "strategies": names, "invocations": []}
        state_path = folder / "compare_state.json"
    results, wall = run_invocation(folder, state, state_path, state["strategies"],
                                   lambda s: with_nproc(compare_child(folder, s, not progress), nproc),
                                   "comparison", "compare", command)
    on_cpu = all(r["final"].get("device") == "cpu" for r in results.values())  # a GPU's runs: no CPU peak
    report = write_compare_report(results, folder, state["command"], wall, invocations=len(state["invocations"]),
                                  machine=matmul_peak() if on_cpu else None)
    return CompareResult(folder, {name: RunResult.read(folder / name) for name in results}, report)


@dataclass
class SweepResult:
    """A finished sweep: one run per combination of the swept settings, and the report."""

    path: Path
    runs: dict[str, RunResult]
    """run name (the swept values) -> its run."""
    report: dict
    """report.json: a row per run (swept values, parameters, validation and test accuracy, speed,
    memory, Pareto front) and the setting chosen on validation accuracy."""


def sweep(grid: dict[str, Sequence] | None = None, *, out: PathLike | None = None,
          config: PathLike | dict | RunConfig | None = None, overwrite: bool = False, progress: bool = True,
          resume: PathLike | None = None, nproc: int = 1, command: str | None = None, **settings) -> SweepResult:
    """Train every combination of `grid`'s values (RunConfig field -> list of values; for
    `targets` each value is a target list), `settings` applying to every run, each a normal
    run in its own folder and process, on the same data split and seed; report them.

    Every combination is validated, and its data, model and targets loaded, before the first
    run starts. `resume=DIR` keeps finished runs and continues a cut-off one. The report
    chooses on validation accuracy (ties: fewer parameters); the test split never chooses.
    """
    from lorafit.files import write_json
    from lorafit.jobs import run_invocation, with_nproc
    from lorafit.runs import check_out_dir, prepare_out_dir
    from lorafit.grid import grid_points, run_name, sweep_rows, write_sweep_report

    command = command or f"lorafit.sweep({grid!r}, " + ", ".join(f"{k}={v!r}" for k, v in settings.items()) + ")"
    if resume is not None:
        if grid or settings or config is not None or out is not None:
            raise ConfigError("resume= continues a sweep with its saved settings; pass no other settings")
        folder = Path(resume)
        state_path = folder / "sweep_state.json"
        if not state_path.exists():
            raise RunDirError(f"{folder} is not a `lorafit sweep` folder (no sweep_state.json)")
        state = json.loads(state_path.read_text())
    else:
        grid = dict(grid or {})
        bad = [k for k, v in grid.items() if isinstance(v, str | bytes) or not isinstance(v, Sequence) or not v]
        if bad:
            raise ConfigError(f"sweep grid: {bad[0]!r} must be a non-empty list of values, got {grid[bad[0]]!r}")
        configs = {run_name(p): _config(config, {**settings, **p}) for p in grid_points(grid)}
        folder = Path(out) if out is not None else default_out("sweep")
        check_out_dir(folder, overwrite)
        _preflight_each(configs.values())
        prepare_out_dir(folder, overwrite)
        (folder / "grid").mkdir()
        for name, cfg in configs.items():
            write_json(folder / "grid" / f"{name}.json", cfg.to_dict())
        write_json(folder / "config.json", {"sweep": grid, "fixed": settings})
        state = {"command": command, "swept": list(grid), "runs": list(configs), "invocations": []}
        state_path = folder / "sweep_state.json"
        print(f"sweep: {len(configs)} runs ({' x '.join(f'{k} {len(v)}' for k, v in grid.items()) or 'one'}) "
              f"in {folder}", flush=True)
    def argv_for(name: str) -> list[str]:
        run = folder / name
        if (run / "checkpoint.safetensors").exists():
            child = ["train", "--resume", str(run)]
        else:
            child = ["train", "--config", str(folder / "grid" / f"{name}.json"), "--out", str(run), "--overwrite"]
        return with_nproc([sys.executable, "-m", "lorafit", *child, *([] if progress else ["--no-progress"])], nproc)

    results, wall = run_invocation(folder, state, state_path, state["runs"], argv_for, "sweep", "sweep", command)
    rows = sweep_rows(results, state["swept"])
    report = write_sweep_report(rows, state["swept"], folder, state["command"], wall, len(state["invocations"]))
    return SweepResult(folder, {name: RunResult.read(folder / name) for name in results}, report)


def _preflight_each(configs) -> None:
    """Load the data, model and targets of every distinct setting that decides them, once each."""
    from lorafit.runs import preflight

    checked = set()
    for cfg in configs:
        key = json.dumps({k: v for k, v in cfg.to_dict().items() if k in (
            "model", "pooling", "data", "targets", "train_size", "val_size", "test_size", "text_column",
            "label_column", "num_labels", "seed", "max_length", "strategy")}, sort_keys=True)
        if key not in checked:
            preflight(cfg)
            checked.add(key)


@dataclass
class Run:
    """A trained run's model (adapters merged, eval mode), ready to predict and evaluate."""

    path: Path
    config: RunConfig
    model: nn.Module
    tokenizer: object
    label_names: list[str]
    pooling: str
    precision: str | None = None
    """What the run computed in (`fp32`/`bf16`, recorded in its config.json); predict and
    evaluate use it, so they give the numbers of the run's test pass."""

    def logits(self, texts: str | Sequence[str]) -> np.ndarray:
        """(N, num_labels) float32 logits of `texts` (cleaned and truncated as in training), in order."""
        from lorafit.data.encoding import Encoded, encode_texts
        from lorafit.data.text import clean_text
        from lorafit.precision import resolve_precision
        from lorafit.training import pick_device, predict_logits

        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise LorafitError("no text to classify; pass one text or a list of texts")
        cfg = self.config
        ids, offsets = encode_texts(self.tokenizer, [clean_text(t) for t in texts], cfg.max_length)
        enc = Encoded(ids, offsets, np.zeros(len(texts), dtype=np.int64))
        device = pick_device()
        return predict_logits(self.model.to(device), enc, batch_size=cfg.eval_batch_size,
                              pad_id=self.tokenizer.pad_token_id or 0, device=device,
                              precision=self.precision or resolve_precision(cfg.precision, device))

    def predict(self, texts: str | Sequence[str]) -> list[dict]:
        """Per text: `label` (its name), `label_id`, `probability` (of that label) and
        `probabilities` (every label's), in the order given."""
        import torch

        texts = [texts] if isinstance(texts, str) else list(texts)
        probs = torch.softmax(torch.from_numpy(self.logits(texts)), dim=-1).numpy()
        out = []
        for text, p in zip(texts, probs):
            k = int(p.argmax())
            out.append({"text": text, "label": self.label_names[k], "label_id": k, "probability": float(p[k]),
                        "probabilities": {n: float(q) for n, q in zip(self.label_names, p)}})
        return out

    def evaluate(self, data: str | None = None, progress: bool = False) -> dict:
        """test_accuracy, test_f1, test_macro_f1, test_majority_share, test_per_class,
        test_confusion, test_loss, examples, data: on the run's test split, or on the test
        split of `data` (another source with the run's labels, cut as the run's config says)."""
        from lorafit import metrics
        from lorafit.data.batching import resolve_pad_multiple
        from lorafit.data.encoding import encode_split
        from lorafit.errors import DataError
        from lorafit.runs import load_data
        from lorafit.precision import resolve_precision
        from lorafit.training import pick_device, predict_logits

        cfg = self.config
        splits = load_data(cfg, data)
        if splits.label_names != self.label_names:
            raise DataError(f"{splits.source} has the labels {', '.join(splits.label_names)}, but the run was trained "
                            f"on {', '.join(self.label_names)}; evaluate it on data with the same labels")
        device = pick_device()
        precision = self.precision or resolve_precision(cfg.precision, device)
        enc = encode_split(splits.test, self.tokenizer, cfg.max_length,
                           pad_multiple=resolve_pad_multiple(cfg.pad_multiple, precision))
        logits = predict_logits(self.model.to(device), enc, batch_size=cfg.eval_batch_size,
                                pad_id=self.tokenizer.pad_token_id or 0, device=device, precision=precision,
                                progress=progress, desc="test")
        m = metrics.report(logits, enc.labels, self.label_names)
        return {"test_accuracy": m["accuracy"], "test_f1": m["f1"], "test_macro_f1": m["macro_f1"],
                "test_majority_share": m["majority_share"], "test_per_class": m["per_class"],
                "test_confusion": m["confusion"], "test_loss": m["loss"], "examples": len(enc),
                "data": splits.source}


def load_run(path: PathLike, adapter: str | None = None, variant: str = "fp32") -> Run:
    """A trained run folder's model, adapters merged (what its test pass ran), eval mode.
    `adapter` picks one of several adapters saved in a lora run's adapter folder.

    `path` may also be an export folder (lorafit.export): its model then runs through the
    library that loads it (transformers, sentence-transformers or ONNX Runtime) in fp32;
    `variant` `int8` picks an ONNX export's quantized graph.
    """
    from lorafit.exported import is_export, load_export
    from lorafit.runs import load_trained

    path = Path(path)
    if is_export(path):
        if adapter is not None:
            raise LorafitError(f"{path} is an export, which holds one model; --adapter applies to run folders")
        return Run(path, *load_export(path, variant), precision="fp32")
    if variant != "fp32":
        raise LorafitError(f"--{variant} applies to ONNX export folders; {path} is a run folder")
    cfg, loaded = load_trained(path, merge=True, adapter=adapter)
    final = path / "final.json"
    names = json.loads(final.read_text()).get("label_names") if final.exists() else None
    id2label = loaded.model.config.id2label
    return Run(path, cfg, loaded.model, loaded.tokenizer, names or [id2label[i] for i in sorted(id2label)],
               loaded.pooling, loaded.precision)


def cli_command() -> str:
    """This process's command line, as a user would type it."""
    return "lorafit " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def export(run: PathLike, out: PathLike, format: str = "hf", adapter: str | None = None,
           quantize: str | None = None):
    """Write the trained run folder `run` as a model folder `out` that a standard runtime
    loads without lorafit: `format` `hf` (transformers, or sentence-transformers for a
    mean-pooled run) or `onnx` (`quantize="int8"` adds an int8 graph). Returns an
    `ExportResult` (path, format, layout, files). See lorafit.exporter."""
    from lorafit.exporter import export as _export

    return _export(run, out, format=format, adapter=adapter, quantize=quantize)

