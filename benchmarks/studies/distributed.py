"""2 processes x 1 thread (`lorafit train --nproc 2`, gloo) against 1 process x 2 threads.

The same lora run (bench slice cut to --train-size reviews, max_length 256, global
batch 16, seed 0) in both layouts, alternated --repeats times so that drift in the
machine's speed falls on both alike. Writes results/distributed/distributed.json and .md: training
samples/s (from metrics.jsonl), wall time, test accuracy, the CPU model.

    .venv/bin/python benchmarks/studies/distributed.py [--train-size 1000 --epochs 1 --repeats 2]
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py, peak.py
from common import ARCHIVE  # noqa: E402
from peak import cpu_model, measure  # noqa: E402

LAYOUTS = {"1 process x 2 threads": ([], {"OMP_NUM_THREADS": "2"}),
           "2 processes x 1 thread": (["--nproc", "2"], {})}  # torchrun sets OMP_NUM_THREADS=1 per rank


def run(layout: str, k: int, args, out: Path) -> dict:
    flags, env = LAYOUTS[layout]
    run_dir = out / f"{'nproc2' if flags else 'nproc1'}-{k}"
    cmd = [sys.executable, "-m", "lorafit", "train", "--strategy", "lora", "--data", args.data, "--train-size",
           str(args.train_size), "--val-size", "100", "--test-size", str(args.test_size), "--max-length", "256",
           "--batch-size", "16", "--epochs", str(args.epochs), "--seed", "0", "--no-progress", "--out", str(run_dir),
           "--overwrite", *flags]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, **env})
    wall = time.perf_counter() - t0
    final = json.loads((run_dir / "final.json").read_text())
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    seen = sum(r["samples_per_s"] * r["seconds"] for r in rows)
    return {"layout": layout, "repeat": k, "samples_per_s": seen / sum(r["seconds"] for r in rows),
            "train_seconds": final["train_seconds"], "wall_seconds": wall, "test_accuracy": final["test_accuracy"],
            "test_loss": final["test_loss"], "train_loss": [r["train_loss"] for r in rows],
            "processes": final["processes"], "precision": final["precision"], "peak_memory_mb": final["peak_memory_mb"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=ARCHIVE)
    p.add_argument("--train-size", type=int, default=1000)
    p.add_argument("--test-size", type=int, default=500)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default="runs/distributed_bench")
    p.add_argument("--results", default="results/distributed/distributed")
    args = p.parse_args()
    out = Path(args.out)
    peak = measure()  # first, while this process is the only one working: the CPU this ran on, at its matmul peak
    records = [run(layout, k, args, out) for k in range(args.repeats) for layout in LAYOUTS]
    summary = {}
    for layout in LAYOUTS:
        rs = [r for r in records if r["layout"] == layout]
        summary[layout] = {"samples_per_s": statistics.mean(r["samples_per_s"] for r in rs),
                           "test_accuracy": [r["test_accuracy"] for r in rs],
                           "peak_memory_mb": max(r["peak_memory_mb"] for r in rs)}
    one, two = (summary[k]["samples_per_s"] for k in LAYOUTS)
    result = {"cpu": cpu_model(), "cores": os.cpu_count(), "train_size": args.train_size, "test_size": args.test_size,
              "epochs": args.epochs, "command": "python " + " ".join(sys.argv), "records": records,
              "summary": summary, "ratio_2proc_over_1proc": two / one, "matmul_peak": peak}
    Path(args.results + ".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"CPU: {result['cpu']} ({result['cores']} cores); lora, {args.train_size} training reviews, "
             f"max_length 256, global batch 16, {args.epochs} epoch(s), {records[0]['precision']}; "
             f"{args.repeats} alternated repeats; matmul peak measured first in this run: bf16 "
             f"{peak['bfloat16']['peak_tflops']:.2f}, fp32 {peak['float32']['peak_tflops']:.2f} TFLOP/s", "",
             "| layout | training samples/s (mean) | test accuracy per repeat | peak RSS per process |",
             "|---|---|---|---|"]
    for layout, s in summary.items():
        lines.append(f"| {layout} | {s['samples_per_s']:.1f} | {', '.join(f'{a:.4f}' for a in s['test_accuracy'])} "
                     f"| {s['peak_memory_mb']:,.0f} MB |")
    lines += ["", f"2 processes / 1 process: {two / one:.2f}x samples/s", ""]
    Path(args.results + ".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
