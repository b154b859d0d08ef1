"""`--format onnx`: one graph from token ids to logits, pooling and head inside.

The graph is traced by torch's ONNX exporter (`torch.onnx.export(dynamo=True)`, opset
`OPSET`) from the merged model as lorafit runs it, so mean pooling and the first-token
last layer are in it. Inputs: `input_ids` and `attention_mask` (int64, (batch, sequence)),
and `token_type_ids` where the model's tokenizer makes them (lorafit feeds zeros, as in
training); output: `logits` (float32, (batch, num_labels)). Both axes are dynamic. The
export is checked in ONNX Runtime against the torch model before it is kept.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from lorafit.errors import ConfigError, LorafitError

OPSET = 18
CHECK_ATOL = 1e-4
_EXTRA = "ONNX export needs the onnx extra: pip install 'lorafit[onnx]' (onnx, onnxscript, onnxruntime)"


def require_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise LorafitError(_EXTRA.replace("ONNX export", "running an ONNX export")) from None
    return onnxruntime


class _Logits(nn.Module):
    """The classifier as a function of its inputs to its logits tensor."""

    def __init__(self, model: nn.Module, inputs: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.inputs = inputs

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        kw = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kw["token_type_ids"] = token_type_ids
        return self.model(**kw).logits.float()


def input_names(tokenizer) -> tuple[str, ...]:
    """The graph's inputs: ids and mask, and token type ids where the tokenizer makes them."""
    names = ("input_ids", "attention_mask")
    return names + (("token_type_ids",) if "token_type_ids" in getattr(tokenizer, "model_input_names", ()) else ())


def _example(tokenizer, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    texts = ["A short text.", "A somewhat longer text, so that the batch holds padding and two lengths."]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    return {n: (enc[n] if n in enc else torch.zeros_like(enc["input_ids"])).long() for n in names}


@contextlib.contextmanager
def _quiet():
    """The exporter's and the quantizer's progress lines and warnings, kept off the user's terminal."""
    loggers = [logging.getLogger(), logging.getLogger("torch.onnx"), logging.getLogger("torch")]
    levels = [lg.level for lg in loggers]
    sink = io.StringIO()
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _export(model: nn.Module, names: tuple[str, ...], example: dict, path: Path) -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise LorafitError(_EXTRA) from None
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    shapes = {n: {0: batch, 1: seq} for n in names}
    try:
        with _quiet():
            program = torch.onnx.export(_Logits(model, names).eval(), (), str(path), kwargs=example, dynamo=True,
                                        input_names=list(names), output_names=["logits"], opset_version=OPSET,
                                        dynamic_shapes=shapes, external_data=False)
    except Exception as exc:  # noqa: BLE001 - the exporter's failures are many kinds; one line for the user
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise ConfigError(f"the ONNX exporter cannot trace this {model.config.model_type} model ({first[:300]}); "
                          "export it with --format hf instead") from None
    if program is not None and not path.exists():
        program.save(str(path))


def _check(model: nn.Module, names: tuple[str, ...], tokenizer, path: Path) -> float:
    """Largest |ONNX - torch| logit on a batch of other shapes than the traced one."""
    ort = require_onnxruntime()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    texts = ["One.", "Three texts of other lengths than the traced batch.", "A third, in between."]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    feed = {n: (enc[n] if n in enc else torch.zeros_like(enc["input_ids"])).long() for n in names}
    with torch.no_grad():
        want = _Logits(model, names)(**feed).numpy()
    got = session.run(["logits"], {n: t.numpy() for n, t in feed.items()})[0]
    return float(abs(got - want).max())


def quantize_int8(source: Path, target: Path) -> None:
    """ONNX Runtime's dynamic quantization: int8 weights, activations quantized per batch.

    Per output channel and on the MatMuls only: its defaults (one scale per weight tensor,
    the embedding table's Gather quantized too) cost the default run 0.83 points of test
    accuracy; these settings none (docs/export.md).
    """
    require_onnxruntime()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet():
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul"])


def write_onnx(model: nn.Module, tokenizer, folder: Path, quantize: str | None) -> dict:
    """`model` (LoRA merged, fp32) as `folder`/model.onnx (and model_int8.onnx); returns what
    lorafit.json records: the opset, the inputs, the check's largest difference, the files."""
    from lorafit.export_layout import ONNX_FILE, ONNX_INT8_FILE

    names = input_names(tokenizer)
    model = model.float().eval()
    path = folder / ONNX_FILE
    with torch.no_grad():
        _export(model, names, _example(tokenizer, names), path)
    diff = _check(model, names, tokenizer, path)
    if not diff <= CHECK_ATOL:
        raise ConfigError(f"the ONNX graph's logits differ from the model's by {diff:.2e} (more than {CHECK_ATOL}); "
                          "the exporter mistranslated this architecture: export it with --format hf instead")
    files = {"fp32": ONNX_FILE}
    if quantize == "int8":
        quantize_int8(path, folder / ONNX_INT8_FILE)
        files["int8"] = ONNX_INT8_FILE
    return {"opset": OPSET, "inputs": list(names), "outputs": ["logits"], "onnx_files": files,
            "check_max_abs_diff": diff}
