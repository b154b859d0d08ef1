"""The reference for last-two-layers: a logistic-regression probe on the frozen model's
pooled embeddings.

The frozen all-MiniLM-L6-v2 runs once over the training and test splits (eval mode,
bf16 autocast where the CPU has it, max_length 256) and keeps both pooled embeddings of
each text from that one pass: `mean`, the attention-masked mean of the last hidden
states (how the model was trained, sentence-transformers), and `cls`, the first token
(what BERT's head reads). The probe (scikit-learn's LogisticRegression, its C chosen on
a validation split carved from train) is fit on the training embeddings and tested once
on the test split. The embeddings are kept in --out, so a second run skips the encoder.

    .venv/bin/python benchmarks/studies/probe.py                    # full archive: 25,000 / 25,000, both poolings
    .venv/bin/python benchmarks/studies/probe.py --pooling mean

Writes results/probe/probe_<pooling>.json.
"""

from __future__ import annotations

import argparse
import json
import time
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py, peak.py
from common import ARCHIVE  # noqa: E402
from peak import cpu_model  # noqa: E402


def embed(split, model, tokenizer, max_length: int, batch_size: int = 32,
          precision: str = "auto") -> dict[str, np.ndarray]:
    """{"mean": (N, H), "cls": (N, H)} fp32 pooled last hidden states of each text, one encoder pass."""
    from lorafit.data.batching import bucketed_batches
    from lorafit.data.encoding import encode_split
    from lorafit.pooling import masked_mean
    from lorafit.precision import resolve_precision
    from lorafit.training import autocast, pick_device, to_device

    device = pick_device()
    precision = resolve_precision(precision, device)
    enc = encode_split(split, tokenizer, max_length, pad_multiple=32)
    encoder = model.base_model.to(device).eval()
    hidden = encoder.config.hidden_size
    out = {k: np.zeros((len(enc), hidden), dtype=np.float32) for k in ("mean", "cls")}
    pad_id = tokenizer.pad_token_id or 0
    with torch.inference_mode():
        for b in bucketed_batches(enc.lengths, batch_size, seed=0, shuffle=False):
            batch = to_device(enc.batch(b, pad_id), device)
            with autocast(device, precision):
                h = encoder(**batch).last_hidden_state.float()  # (B, T, H)
            out["mean"][b] = masked_mean(h, batch["attention_mask"]).cpu().numpy()
            out["cls"][b] = h[:, 0].cpu().numpy()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=ARCHIVE)
    ap.add_argument("--pooling", default="mean,cls", help="mean, cls or both (comma-separated; one encoder pass)")
    ap.add_argument("--train-size", type=int, default=None)
    ap.add_argument("--test-size", type=int, default=None)
    ap.add_argument("--val-size", type=int, default=2500)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--out", default="runs/probe")
    ap.add_argument("--results", default="results/probe")
    args = ap.parse_args()
    from sklearn.linear_model import LogisticRegression

    from lorafit.data import load_dataset
    from lorafit.models import load_model

    poolings = [p.strip() for p in args.pooling.split(",") if p.strip()]
    if not poolings or set(poolings) - {"mean", "cls"}:
        ap.error(f"--pooling {args.pooling!r}: give mean, cls or mean,cls")
    torch.manual_seed(0)
    splits = load_dataset(args.data, train_size=args.train_size, val_size=args.val_size, test_size=args.test_size,
                          seed=0)
    cache = Path(args.out) / f"embeddings_{len(splits.train)}_{len(splits.validation)}_{len(splits.test)}.npz"
    names = ("train", "validation", "test")
    t0 = time.perf_counter()
    if cache.exists():
        with np.load(cache) as z:
            x = {p: {k: z[f"{p}_{k}"] for k in names} for p in ("mean", "cls")}
    else:
        loaded = load_model(None, num_labels=2, seed=0, pooling="cls")  # the encoder only; pooling is done here
        per_split = {k: embed(getattr(splits, k), loaded.model, loaded.tokenizer, args.max_length) for k in names}
        x = {p: {k: per_split[k][p] for k in names} for p in ("mean", "cls")}
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".part.npz")
        np.savez(tmp, **{f"{p}_{k}": x[p][k] for p in x for k in names})
        tmp.replace(cache)
    encode_seconds = time.perf_counter() - t0
    y = {k: getattr(splits, k).labels for k in names}
    Path(args.results).mkdir(parents=True, exist_ok=True)
    for pooling in poolings:
        xp = x[pooling]
        scores = {}
        for c in (0.01, 0.1, 1.0, 10.0, 100.0):  # chosen on validation; the test split is read once, below
            clf = LogisticRegression(C=c, max_iter=2000).fit(xp["train"], y["train"])
            scores[c] = float(clf.score(xp["validation"], y["validation"]))
        best = max(scores, key=lambda c: (scores[c], -c))
        clf = LogisticRegression(C=best, max_iter=2000).fit(np.concatenate([xp["train"], xp["validation"]]),
                                                            np.concatenate([y["train"], y["validation"]]))
        result = {"pooling": pooling, "data": splits.source, "sizes": splits.sizes(), "max_length": args.max_length,
                  "validation_accuracy_by_C": scores, "C": best,
                  "test_accuracy": float(clf.score(xp["test"], y["test"])),
                  "encode_seconds_both_poolings": encode_seconds, "cpu": cpu_model(),
                  "command": f"python benchmarks/studies/probe.py --pooling {args.pooling}"}
        (Path(args.results) / f"probe_{pooling}.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
