"""Padding each batch to a multiple of N tokens: speed and peak memory, side by side.

Runs `lorafit train` once per (strategy, --pad-multiple), each in its own process, on the
same slice of the full archive, and prints training samples/s, test seconds, peak RSS
and test accuracy. Writes `--results`/`--name` (default results/padding.json).

    .venv/bin/python benchmarks/padding.py [--multiples 1,8,32 --strategies lora,last-two-layers]
        [--pooling cls] [--results DIR] [--name FILE]

With `--interleaved ROUNDS` it instead builds one lorafit model per multiple in one
process (as `lorafit train --pooling cls` sets it up: benchmarks/interleaved.py) and steps
them in rounds on the same 16 reviews (the bench slice's length-bucketed batches), the
order alternated, timing only the steps: the speed ratio without the drift between
processes. The matmul peak is measured first, with the CPU model.

    .venv/bin/python benchmarks/padding.py --interleaved 40 --multiples 32,8 --strategies full,lora
        --name padding_interleaved.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ARCHIVE = os.environ.get("LORAFIT_IMDB_ARCHIVE", "../shared/data/aclImdb_v1_labeled.tar.gz")


def interleaved(strategy: str, multiples: list[int], rounds: int, data: str, warmup: int = 2) -> dict:
    """Steps of lorafit at each multiple, alternated round by round on the same reviews."""
    from interleaved import lorafit_system

    from lorafit.data import load_dataset
    from lorafit.data.batching import bucketed_batches

    splits = load_dataset(data, train_size=2000, val_size=200, test_size=1000, seed=0)
    systems = []
    for m in multiples:
        enc, make_batch, step, setup = lorafit_system(strategy, splits, 256, 16, rounds + warmup)
        enc.pad_multiple = m  # the encoding is the same; only the padding of its batches changes
        systems.append((m, make_batch, step))
    chosen = bucketed_batches(enc.lengths, 16, seed=0, epoch=0)[:rounds + warmup]
    batches = {m: [make(rows) for rows in chosen] for m, make, _ in systems}
    times: dict[int, list[float]] = {m: [] for m in multiples}
    for r in range(len(chosen)):
        for m, _, step in systems[r % len(systems):] + systems[:r % len(systems)]:
            t = time.perf_counter()
            step(batches[m][r])
            if r >= warmup:
                times[m].append(time.perf_counter() - t)
    base = multiples[0]
    return {"strategy": strategy, "rounds": rounds, "warmup_rounds": warmup, "precision": setup["precision"],
            "per_multiple": {str(m): {"step_seconds": times[m], "total_seconds": sum(times[m]),
                                      "mean_padded_length": statistics.mean(
                                          int(b["input_ids"].shape[1]) for b in batches[m][warmup:])}
                             for m in multiples},
            "speedup_over_first": {str(m): {"of_totals": sum(times[base]) / sum(times[m]),
                                            "median_of_rounds": statistics.median(
                                                a / b for a, b in zip(times[base], times[m]))}
                                   for m in multiples[1:]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=ARCHIVE)
    ap.add_argument("--train-size", type=int, default=2000)
    ap.add_argument("--test-size", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--multiples", default="1,8,32")
    ap.add_argument("--strategies", default="lora,last-two-layers,full")
    ap.add_argument("--pooling", default="auto", help="passed to lorafit train (bench.py trains with cls)")
    ap.add_argument("--interleaved", type=int, default=0, metavar="ROUNDS",
                    help="step each multiple's model in turn in one process for ROUNDS rounds instead")
    ap.add_argument("--out", type=Path, default=Path("runs/padding"))
    ap.add_argument("--results", type=Path, default=Path("results"))
    ap.add_argument("--name", default="padding.json")
    args = ap.parse_args()
    command = "python benchmarks/padding.py " + " ".join(sys.argv[1:])
    if args.interleaved:
        from peak import cpu_flags, cpu_model, measure

        peak = measure(trials=5, seconds=1.0)  # first, in an otherwise idle process
        rows = [interleaved(s, [int(m) for m in args.multiples.split(",")], args.interleaved, args.data)
                for s in args.strategies.split(",")]
        for r in rows:
            print(r["strategy"], r["precision"], json.dumps(r["speedup_over_first"]), flush=True)
        out = {"command": command, "cpu": cpu_model(), "flags": cpu_flags(), "matmul_peak": peak,
               "measured": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / args.name).write_text(json.dumps(out, indent=2) + "\n")
        return
    from peak import cpu_model

    rows = []
    for strategy in args.strategies.split(","):
        for m in args.multiples.split(","):
            run = args.out / f"{strategy}-{m}"
            subprocess.run([sys.executable, "-m", "lorafit", "train", "--strategy", strategy, "--data", args.data,
                            "--train-size", str(args.train_size), "--val-size", "200", "--test-size",
                            str(args.test_size), "--epochs", str(args.epochs), "--pad-multiple", m,
                            "--pooling", args.pooling, "--out", str(run), "--overwrite", "--no-progress"],
                           check=True, stdout=subprocess.DEVNULL)
            f = json.loads((run / "final.json").read_text())
            hist = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
            row = {"strategy": strategy, "pad_multiple": int(m),
                   "train_samples_per_s": sum(h["samples_per_s"] * h["seconds"] for h in hist) / f["train_seconds"],
                   "train_seconds": f["train_seconds"], "test_seconds": f["test_seconds"],
                   "peak_memory_mb": f["peak_memory_mb"], "padding_efficiency": f["padding_efficiency"],
                   "test_accuracy": f["test_accuracy"], "precision": f.get("precision")}
            rows.append(row)
            print(json.dumps(row), flush=True)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / args.name).write_text(json.dumps({"command": command, "cpu": cpu_model(),
                                                      "args": {k: str(v) for k, v in vars(args).items()},
                                                      "rows": rows}, indent=2) + "\n")
    print("| strategy | pad multiple | train samples/s | test s | peak RSS MB | padding eff. | test acc |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['strategy']} | {r['pad_multiple']} | {r['train_samples_per_s']:.1f} | {r['test_seconds']:.1f} | "
              f"{r['peak_memory_mb']:,.0f} | {r['padding_efficiency']:.3f} | {r['test_accuracy']:.4f} |")


if __name__ == "__main__":
    main()
