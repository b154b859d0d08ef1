"""Exporting a trained run as a model that a standard runtime loads without lorafit.

    hf    first-token pooling: a transformers `*ForSequenceClassification` folder, LoRA merged;
          mean pooling: a sentence-transformers folder (Transformer, Pooling by mean, then the
          head's two Linear layers as Dense modules) whose `encode` returns the logits
    onnx  one graph from input_ids, attention_mask (and token_type_ids where the tokenizer
          makes them) to logits, pooling and head inside, LoRA merged, dynamic batch and
          sequence axes; `quantize="int8"` adds ONNX Runtime's dynamic int8 weights beside it

Every export folder also holds the tokenizer, `labels.json`, a model card (README.md) and
`lorafit.json` (what lorafit needs to evaluate the export on the run's test split). It is
written to a temporary folder and renamed at the end, so a failure leaves nothing behind;
the finished folder carries the user's umask.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lorafit.errors import ConfigError, RunDirError
from lorafit.export_layout import EXPORT_FILE, LABELS_FILE
from lorafit.files import umask_mode, write_json

FORMATS = ("hf", "onnx")
QUANTIZATIONS = ("int8",)


@dataclass
class ExportResult:
    """Where an export went and what it holds."""

    path: Path
    format: str
    """`hf` or `onnx`."""
    layout: str
    """`transformers`, `sentence-transformers` or `onnx`: which library loads it."""
    files: list[str]
    """The folder's files, relative to it."""


def _check_request(run_dir: Path, out: Path, fmt: str, quantize: str | None) -> dict:
    """Refuse what cannot be exported before any work; return the run's final.json."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if quantize is not None and (fmt != "onnx" or quantize not in QUANTIZATIONS):
        raise ConfigError(f"--quantize {quantize} applies to --format onnx only, with one of: "
                          f"{', '.join(QUANTIZATIONS)}")
    if out.is_file() or (out.is_dir() and any(out.iterdir())):
        raise RunDirError(f"{out} exists and is not empty; pass a new folder for the export")
    if not run_dir.is_dir():
        raise RunDirError(f"run folder {run_dir} does not exist; pass a folder written by `lorafit train`")
    if (run_dir / EXPORT_FILE).exists():
        raise RunDirError(f"{run_dir} is an export already; export the run folder it came from")
    final = run_dir / "final.json"
    if not final.exists():
        raise RunDirError(f"{run_dir} has no final.json: the run is still training or was interrupted; finish it "
                          f"(lorafit train --resume {run_dir}) and export it then")
    try:
        return json.loads(final.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunDirError(f"{final} is corrupt ({exc}); the run cannot be exported") from None


def export(run_dir: str | os.PathLike, out: str | os.PathLike, format: str = "hf", adapter: str | None = None,
           quantize: str | None = None) -> ExportResult:
    """Write the trained run at `run_dir` as a standalone model folder `out` (see the module).

    Raises:
        ConfigError: an unknown format or quantization, a pooling or architecture the format
            cannot express, or an architecture the ONNX exporter cannot trace.
        RunDirError: the run folder is missing, unfinished or incomplete, or `out` is not empty.
    """
    from lorafit.lora import unload_lora
    from lorafit.runs import load_trained, read_run_config

    run_dir, out = Path(run_dir), Path(out)
    final = _check_request(run_dir, out, format, quantize)
    cfg = read_run_config(run_dir)
    _, loaded = load_trained(run_dir, adapter=adapter)
    model = unload_lora(loaded.model).eval()
    loaded.tokenizer.model_max_length = cfg.max_length  # a plain tokenizer call truncates as the run did
    label_names = final.get("label_names") or [model.config.id2label[i] for i in sorted(model.config.id2label)]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        if format == "hf":
            from lorafit.export_hf import write_hf

            layout, extra = write_hf(model, loaded.tokenizer, loaded.pooling, cfg.max_length, tmp), {}
        else:
            from lorafit.export_onnx import write_onnx

            layout, extra = "onnx", write_onnx(model, loaded.tokenizer, tmp, quantize)
        loaded.tokenizer.save_pretrained(tmp)
        _write_metadata(tmp, run_dir, final, label_names, format, layout, loaded.pooling, adapter, extra)
        _finish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    return ExportResult(out, format, layout, files)


def _write_metadata(folder: Path, run_dir: Path, final: dict, label_names: list[str], fmt: str, layout: str,
                    pooling: str, adapter: str | None, extra: dict) -> None:
    from lorafit import __version__
    from lorafit.export_card import model_card

    raw = json.loads((run_dir / "config.json").read_text())
    info = {"format": fmt, "layout": layout, "pooling": pooling, "adapter": adapter, "label_names": label_names,
            "lorafit_version": __version__, "run": str(run_dir.resolve()), "run_config": raw,
            "test_accuracy": final.get("test_accuracy"), "test_macro_f1": final.get("test_macro_f1"), **extra}
    write_json(folder / EXPORT_FILE, info)
    write_json(folder / LABELS_FILE, {"id2label": {str(i): n for i, n in enumerate(label_names)},
                                      "label2id": {n: i for i, n in enumerate(label_names)}})
    (folder / "README.md").write_text(model_card(info))


def _finish(tmp: Path, out: Path) -> None:
    """Give the folders the user's umask (mkdtemp makes 0700) and rename `tmp` to `out`."""
    dir_mode = umask_mode() | ((umask_mode() & 0o444) >> 2)  # x where r: 0644 -> 0755
    for d in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
        os.chmod(d, dir_mode)
    for f in (p for p in tmp.rglob("*") if p.is_file()):
        os.chmod(f, umask_mode())
    if out.is_dir():
        out.rmdir()  # empty: checked before the work
    os.replace(tmp, out)
