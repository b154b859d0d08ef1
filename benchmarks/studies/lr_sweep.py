"""Choose each strategy's default learning rate on the validation split.

Trains every (strategy, lr) pair with the default settings (3 epochs, max_length 256,
batch 16) on as many training reviews as the embedded sample has (990), drawn from the
full archive's train split, and selects on 500 validation reviews carved from that train
split (the sample's own 110 are too few to tell learning rates apart). The test split
is not looked at (--test-size 2 keeps its evaluation trivial). Writes
results/lr_sweep/lr_sweep.json.

    .venv/bin/python benchmarks/studies/lr_sweep.py [--epochs 3] [--out runs/lr-sweep]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

GRID = {"full": [5e-5, 1e-4, 2e-4], "last-two-layers": [2e-3, 5e-3, 1e-2], "lora": [1e-3, 2e-3, 5e-3]}
ARCHIVE = os.environ.get("LORAFIT_IMDB_ARCHIVE", "../shared/data/aclImdb_v1_labeled.tar.gz")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--data", default=ARCHIVE)
    ap.add_argument("--out", type=Path, default=Path("runs/lr-sweep"))
    ap.add_argument("--results", type=Path, default=Path("results/lr_sweep/lr_sweep.json"))
    args = ap.parse_args()
    rows = []
    for strategy, lrs in GRID.items():
        for lr in lrs:
            run = args.out / f"{strategy}-{lr:g}"
            if not (run / "final.json").exists():
                subprocess.run([sys.executable, "-m", "lorafit", "train", "--strategy", strategy, "--lr", str(lr),
                                "--epochs", str(args.epochs), "--data", args.data, "--train-size", "990",
                                "--val-size", "500", "--test-size", "2", "--out", str(run), "--overwrite",
                                "--no-progress"], check=True)
            final = json.loads((run / "final.json").read_text())
            hist = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
            rows.append({"strategy": strategy, "lr": lr, "best_val_accuracy": final["best_val_accuracy"],
                         "best_epoch": final["best_epoch"], "val_accuracy": [h["val_accuracy"] for h in hist]})
            print(f"{strategy:16s} lr {lr:<8g} best val acc {final['best_val_accuracy']:.4f} "
                  f"(epoch {final['best_epoch']})", flush=True)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(rows, indent=2) + "\n")
    for strategy in GRID:
        best = max((r for r in rows if r["strategy"] == strategy), key=lambda r: r["best_val_accuracy"])
        print(f"best lr for {strategy}: {best['lr']:g} (val acc {best['best_val_accuracy']:.4f})")


if __name__ == "__main__":
    main()
