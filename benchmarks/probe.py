"""The reference for last-two-layers: a logistic-regression probe on the frozen model's
pooled embeddings.

The frozen all-MiniLM-L6-v2 runs once over the training and test splits (eval mode,
bf16 autocast where the CPU has it, max_length 256); the probe (scikit-learn's
LogisticRegression, its C chosen on a validation split carved from train) is fit on the
training embeddings and tested once on the test split. `--pooling mean` is how the model
was trained (sentence-transformers); `cls` is the first token, what BERT's head reads.
The embeddings are kept in --out, so a second run (another pooling reads other ones)
skips the encoder pass.

    .venv/bin/python benchmarks/probe.py --pooling mean      # full archive: 25,000 / 25,000
    .venv/bin/python benchmarks/probe.py --pooling cls

Writes results/probe_<pooling>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from bench import ARCHIVE
from peak import cpu_model


def embed(split, loaded, pooling: str, max_length: int, batch_size: int = 32) -> np.ndarray:
    """(N, H) fp32: the input of the head's first layer (pooler.dense) for each text."""
    from lorafit.data.encoding import encode_split
    from lorafit.feature_cache import extract_features
    from lorafit.training import pick_device, resolve_precision

    device = pick_device()
    enc = encode_split(split, loaded.tokenizer, max_length, pad_multiple=32)
    feats = extract_features(loaded.model.to(device), "bert.pooler.dense", enc, batch_size=batch_size,
                             pad_id=loaded.tokenizer.pad_token_id or 0, device=device,
                             precision=resolve_precision("auto", device))
    return feats.features.numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=ARCHIVE)
    ap.add_argument("--pooling", choices=("mean", "cls"), default="mean")
    ap.add_argument("--train-size", type=int, default=None)
    ap.add_argument("--test-size", type=int, default=None)
    ap.add_argument("--val-size", type=int, default=2500)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--out", default="runs/probe")
    ap.add_argument("--results", default="results")
    args = ap.parse_args()
    from sklearn.linear_model import LogisticRegression

    from lorafit.data import load_dataset
    from lorafit.models import load_model

    torch.manual_seed(0)
    splits = load_dataset(args.data, train_size=args.train_size, val_size=args.val_size, test_size=args.test_size,
                          seed=0)
    loaded = load_model(None, num_labels=2, seed=0, pooling=args.pooling)
    cache = Path(args.out) / f"embeddings_{args.pooling}_{len(splits.train)}_{len(splits.test)}.npz"
    t0 = time.perf_counter()
    if cache.exists():
        with np.load(cache) as z:
            x = {k: z[k] for k in ("train", "validation", "test")}
    else:
        x = {k: embed(getattr(splits, k), loaded, args.pooling, args.max_length)
             for k in ("train", "validation", "test")}
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, **x)
    encode_seconds = time.perf_counter() - t0
    y = {k: getattr(splits, k).labels for k in x}
    scores = {}
    for c in (0.01, 0.1, 1.0, 10.0, 100.0):  # chosen on validation; the test split is read once, below
        clf = LogisticRegression(C=c, max_iter=2000).fit(x["train"], y["train"])
        scores[c] = float(clf.score(x["validation"], y["validation"]))
    best = max(scores, key=lambda c: (scores[c], -c))
    clf = LogisticRegression(C=best, max_iter=2000).fit(np.concatenate([x["train"], x["validation"]]),
                                                        np.concatenate([y["train"], y["validation"]]))
    result = {"pooling": args.pooling, "data": splits.source, "sizes": splits.sizes(), "max_length": args.max_length,
              "validation_accuracy_by_C": scores, "C": best, "test_accuracy": float(clf.score(x["test"], y["test"])),
              "encode_seconds": encode_seconds, "cpu": cpu_model(),
              "command": f"python benchmarks/probe.py --pooling {args.pooling}"}
    Path(args.results).mkdir(exist_ok=True)
    (Path(args.results) / f"probe_{args.pooling}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
