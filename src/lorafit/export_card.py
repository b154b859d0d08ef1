"""The model card (README.md) of an export folder: what it is and how to load it."""

from __future__ import annotations

EXAMPLE_PATH = "PATH/TO/THIS/FOLDER"
_EXAMPLES = {
    "transformers": """from transformers import AutoModelForSequenceClassification, AutoTokenizer
tokenizer, model = AutoTokenizer.from_pretrained("{path}"), AutoModelForSequenceClassification.from_pretrained("{path}")
batch = tokenizer(["{text}"], truncation=True, padding=True, return_tensors="pt")
print(model.config.id2label[int(model(**batch).logits.argmax(-1)[0])])""",
    "sentence-transformers": """from sentence_transformers import SentenceTransformer
model = SentenceTransformer("{path}")  # encode() returns the logits, (N, {num_labels})
labels = {labels!r}
print(labels[int(model.encode(["{text}"]).argmax(-1)[0])])""",
    "onnx": """import json, onnxruntime; from transformers import AutoTokenizer
session, tokenizer = onnxruntime.InferenceSession("{path}/model.onnx"), AutoTokenizer.from_pretrained("{path}")
feed = dict(tokenizer(["{text}"], truncation=True, return_tensors="np"))  # the graph's inputs, int64
print(json.load(open("{path}/labels.json"))["id2label"][str(session.run(None, feed)[0].argmax(-1)[0])])""",
}


def _pct(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "not recorded"


def model_card(info: dict) -> str:
    """Markdown for an export described by `info` (what lorafit.json holds)."""
    cfg = info["run_config"]
    layout, labels = info["layout"], info["label_names"]
    example = _EXAMPLES[layout].format(path=EXAMPLE_PATH, text="A wonderful film.", labels=labels,
                                       num_labels=len(labels))
    loads = {"transformers": "transformers (`AutoModelForSequenceClassification`)",
             "sentence-transformers": "sentence-transformers (`SentenceTransformer`; `encode` returns the logits)",
             "onnx": "ONNX Runtime (`model.onnx`, opset {})".format(info.get("opset"))}[layout]
    lines = [
        f"# Text classifier: {cfg.get('model') or 'all-MiniLM-L6-v2'}, fine-tuned with lorafit ({cfg['strategy']})",
        "",
        f"Exported by lorafit {info['lorafit_version']} from the run `{info['run']}`; it loads with {loads}, "
        "without lorafit.",
        "",
        "| | |",
        "|---|---|",
        f"| base model | {cfg.get('model') or 'all-MiniLM-L6-v2'} |",
        f"| strategy | {cfg['strategy']}" + (f" (adapter {info['adapter']})" if info.get("adapter") else "") +
        " |",
        f"| labels | {', '.join(f'{i}: {n}' for i, n in enumerate(labels))} |",
        f"| pooling | {info['pooling']} |",
        f"| max length | {cfg.get('max_length')} tokens (longer texts are truncated) |",
        f"| the run's test accuracy | {_pct(info.get('test_accuracy'))} (macro-F1 {_pct(info.get('test_macro_f1'))}) |",
        f"| data | {cfg.get('data') or 'the IMDb sample embedded in lorafit'} |",
        "",
        "## Load it",
        "",
        "```python",
        example,
        "```",
        "",
        "lorafit cleaned each text before tokenizing it (`<br />` and a few inline HTML tags to spaces, HTML "
        "entities unescaped, runs of whitespace to one space); do the same for the run's exact numbers.",
    ]
    if "int8" in info.get("onnx_files", {}):
        lines += ["", "`model_int8.onnx` holds the same graph with ONNX Runtime's dynamic int8 weights; "
                  "`lorafit evaluate` on this folder reports its test accuracy next to the fp32 graph's."]
    return "\n".join(lines) + "\n"
