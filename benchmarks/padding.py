"""Padding each batch to a multiple of N tokens: speed and peak memory, side by side.

Runs `lorafit train` once per (strategy, --pad-multiple), each in its own process, on the
same slice of the full archive, and prints training samples/s, test seconds, peak RSS
and test accuracy. Writes results/padding.json.

    .venv/bin/python benchmarks/padding.py [--multiples 1,8,32 --strategies lora,last-two-layers]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ARCHIVE = os.environ.get("LORAFIT_IMDB_ARCHIVE", "../shared/data/aclImdb_v1_labeled.tar.gz")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=ARCHIVE)
    ap.add_argument("--train-size", type=int, default=2000)
    ap.add_argument("--test-size", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--multiples", default="1,8,32")
    ap.add_argument("--strategies", default="lora,last-two-layers,full")
    ap.add_argument("--out", type=Path, default=Path("runs/padding"))
    ap.add_argument("--results", type=Path, default=Path("results"))
    args = ap.parse_args()
    rows = []
    for strategy in args.strategies.split(","):
        for m in args.multiples.split(","):
            run = args.out / f"{strategy}-{m}"
            subprocess.run([sys.executable, "-m", "lorafit", "train", "--strategy", strategy, "--data", args.data,
                            "--train-size", str(args.train_size), "--val-size", "200", "--test-size",
                            str(args.test_size), "--epochs", str(args.epochs), "--pad-multiple", m,
                            "--out", str(run), "--overwrite", "--no-progress"], check=True, stdout=subprocess.DEVNULL)
            f = json.loads((run / "final.json").read_text())
            hist = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
            row = {"strategy": strategy, "pad_multiple": int(m),
                   "train_samples_per_s": sum(h["samples_per_s"] * h["seconds"] for h in hist) / f["train_seconds"],
                   "train_seconds": f["train_seconds"], "test_seconds": f["test_seconds"],
                   "peak_memory_mb": f["peak_memory_mb"], "padding_efficiency": f["padding_efficiency"],
                   "test_accuracy": f["test_accuracy"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "padding.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                           "rows": rows}, indent=2) + "\n")
    print("| strategy | pad multiple | train samples/s | test s | peak RSS MB | padding eff. | test acc |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['strategy']} | {r['pad_multiple']} | {r['train_samples_per_s']:.1f} | {r['test_seconds']:.1f} | "
              f"{r['peak_memory_mb']:,.0f} | {r['padding_efficiency']:.3f} | {r['test_accuracy']:.4f} |")


if __name__ == "__main__":
    main()
