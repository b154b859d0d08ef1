"""Padding each batch to a multiple of N tokens: speed and peak memory, side by side.

Runs `lorafit train` once per (strategy, --pad-multiple), each in its own process, on the
same slice of the full archive, and prints training samples/s, test seconds, peak RSS
and test accuracy. Writes `--results`/`--name` (default results/padding/padding.json).

    .venv/bin/python benchmarks/studies/padding.py [--multiples 1,8,32 --strategies lora,last-two-layers]
        [--pooling cls] [--results DIR] [--name FILE]

With `--interleaved ROUNDS` it instead builds one lorafit model per multiple in one
process (as `lorafit train --pooling cls` sets it up: benchmarks/interleaved.py) and steps
them in rounds on the same 16 reviews (the slice's length-bucketed batches), in every
order in turn, timing only the steps: the speed ratio without the drift between
processes. The matmul peak is measured first, with the CPU model.

    .venv/bin/python benchmarks/studies/padding.py --interleaved 40 --multiples 32,8 --strategies full,lora
        --name padding_interleaved.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py, peak.py
from common import add_slice_args  # noqa: E402


def interleaved(strategy: str, multiples: list[int], rounds: int, args, warmup: int = 2) -> dict:
    """Steps of lorafit at each multiple on the slice `args` names, in rounds on the same
    reviews, every order of the multiples in turn (interleaved.step_in_rounds)."""
    from interleaved import lorafit_system, step_in_rounds

    from lorafit.data import load_dataset
    from lorafit.data.batching import bucketed_batches

    splits = load_dataset(args.data, train_size=args.train_size, val_size=args.val_size, test_size=args.test_size,
                          seed=0)
    makers, steps = {}, {}
    for m in multiples:
        enc, makers[str(m)], steps[str(m)], setup = lorafit_system(strategy, splits, args.max_length,
                                                                   args.batch_size, rounds + warmup)
        enc.pad_multiple = m  # the encoding is the same; only the padding of its batches changes
    chosen = bucketed_batches(enc.lengths, args.batch_size, seed=0, epoch=0)[:rounds + warmup]
    batches = {k: [make(rows) for rows in chosen] for k, make in makers.items()}
    times = step_in_rounds(steps, batches, warmup)
    base = str(multiples[0])
    return {"strategy": strategy, "rounds": rounds, "warmup_rounds": warmup, "precision": setup["precision"],
            "per_multiple": {k: {"step_seconds": times[k], "total_seconds": sum(times[k]),
                                 "mean_padded_length": statistics.mean(
                                     int(b["input_ids"].shape[1]) for b in batches[k][warmup:])}
                             for k in times},
            "speedup_over_first": {k: {"of_totals": sum(times[base]) / sum(times[k]),
                                       "median_of_rounds": statistics.median(
                                           a / b for a, b in zip(times[base], times[k]))}
                                   for k in times if k != base}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_slice_args(ap)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--multiples", default="1,8,32")
    ap.add_argument("--strategies", default="lora,last-two-layers,full")
    ap.add_argument("--pooling", default="auto", help="passed to lorafit train (bench.py trains with cls)")
    ap.add_argument("--interleaved", type=int, default=0, metavar="ROUNDS",
                    help="step each multiple's model in turn in one process for ROUNDS rounds instead")
    ap.add_argument("--out", type=Path, default=Path("runs/padding"))
    ap.add_argument("--results", type=Path, default=Path("results/padding"))
    ap.add_argument("--name", default="padding.json")
    args = ap.parse_args()
    command = "python benchmarks/studies/padding.py " + " ".join(sys.argv[1:])
    if args.interleaved:
        from peak import cpu_flags, cpu_model, measure

        peak = measure(trials=5, seconds=1.0)  # first, in an otherwise idle process
        multiples = [int(m) for m in args.multiples.split(",")]
        if len(set(multiples)) != len(multiples):
            ap.error(f"--multiples {args.multiples}: each multiple once")
        rows = [interleaved(s, multiples, args.interleaved, args) for s in args.strategies.split(",")]
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
                            "--train-size", str(args.train_size), "--val-size", str(args.val_size), "--test-size",
                            str(args.test_size), "--max-length", str(args.max_length), "--batch-size",
                            str(args.batch_size), "--epochs", str(args.epochs), "--pad-multiple", m,
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
