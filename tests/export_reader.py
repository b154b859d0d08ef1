"""Read lorafit exports with their own libraries, in a process that never imports lorafit.

    python export_reader.py SPEC.json OUT.json

SPEC: {"texts": [...], "exports": [{"name", "path", "layout", "file"}]}; OUT: name -> logits
(N, num_labels), plus "lorafit_imported": whether anything imported lorafit.
"""

from __future__ import annotations

import json
import sys

import numpy as np


def read(export: dict, texts: list[str]) -> np.ndarray:
    path, layout = export["path"], export["layout"]
    if layout == "sentence-transformers":
        from sentence_transformers import SentenceTransformer

        return SentenceTransformer(path, device="cpu").encode(texts, batch_size=8, convert_to_numpy=True)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    out = []
    if layout == "transformers":
        import torch
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        for i in range(0, len(texts), 8):
            batch = tok(texts[i:i + 8], truncation=True, padding=True, return_tensors="pt")
            with torch.no_grad():
                out.append(model(**batch).logits.numpy())
        return np.concatenate(out)
    import onnxruntime

    session = onnxruntime.InferenceSession(f"{path}/{export['file']}", providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    for i in range(0, len(texts), 8):
        batch = tok(texts[i:i + 8], truncation=True, padding=True, return_tensors="np")
        feed = {n: batch[n].astype(np.int64) if n in batch else np.zeros_like(batch["input_ids"], dtype=np.int64)
                for n in names}
        out.append(session.run(["logits"], feed)[0])
    return np.concatenate(out)


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    result = {e["name"]: read(e, spec["texts"]).tolist() for e in spec["exports"]}
    result["lorafit_imported"] = any(m == "lorafit" or m.startswith("lorafit.") for m in sys.modules)
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
