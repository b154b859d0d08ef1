"""torch.compile and thread count on this CPU: training steps per second, side by side.

For `full` and `lora` on all-MiniLM-L6-v2 (bf16 autocast where available), times
training steps (forward, backward, AdamW) on real IMDb batches of 16 padded to 128 and
256 tokens, for: eager with 1 thread, eager with all threads, and torch.compile
(inductor) with all threads, whose compile time is reported apart. Writes
results/compile_threads/compile_threads.json.

    .venv/bin/python benchmarks/studies/compile_threads.py [--steps 8] [--strategies lora,full] [--lengths 128,256]
        [--name compile_threads.json]

The matmul peak is measured first and written beside the rows, with the CPU model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ARCHIVE = os.environ.get("LORAFIT_IMDB_ARCHIVE", "../shared/data/aclImdb_v1_labeled.tar.gz")


def batches(tokenizer, lengths=(128, 256), batch_size=16):
    from lorafit.data import load_dataset

    texts = load_dataset(ARCHIVE, train_size=200, val_size=0.1, test_size=10).train.texts[:batch_size]
    out = []
    for t in lengths:
        enc = tokenizer(texts, truncation=True, max_length=t, padding="max_length", return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                    "labels": torch.arange(batch_size) % 2})
    return out


def make(strategy: str):
    from lorafit.config import RunConfig
    from lorafit.models import load_model
    from lorafit.strategies import STRATEGIES

    loaded = load_model(None, attn_dropout=0.0)
    STRATEGIES[strategy].setup(loaded.model, RunConfig(strategy=strategy))
    loaded.model.train()
    return loaded


def time_steps(model, data, steps: int, precision: str) -> tuple[float, float]:
    """(seconds of the first step per shape, i.e. warm-up/compile; steps/s after it)."""
    from lorafit.training import autocast

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step(b):
        with autocast(torch.device("cpu"), precision):
            loss = model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t = time.perf_counter()
    for b in data:
        step(b)
    warm = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(steps):
        step(data[i % len(data)])
    return warm, steps / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--strategies", default="lora,full")
    ap.add_argument("--lengths", default="128,256", help="padded lengths of the timed batches")
    ap.add_argument("--results", type=Path, default=Path("results/compile_threads"))
    ap.add_argument("--name", default="compile_threads.json", help="file name under --results")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/
    from peak import cpu_flags, cpu_model, measure

    peak = measure()  # first, while this process is the only one working
    from lorafit.precision import resolve_precision

    precision = resolve_precision("auto", torch.device("cpu"))
    threads = torch.get_num_threads()
    lengths = tuple(int(x) for x in args.lengths.split(","))
    rows, data = [], None
    for strategy in args.strategies.split(","):
        for variant in ("eager-1-thread", f"eager-{threads}-threads", f"compile-{threads}-threads"):
            torch.set_num_threads(1 if variant == "eager-1-thread" else threads)
            torch.manual_seed(0)
            loaded = make(strategy)
            model = torch.compile(loaded.model) if variant.startswith("compile") else loaded.model
            if data is None:  # the same reviews and tokenizer for every variant: read and tokenize once
                data = batches(loaded.tokenizer, lengths)
            warm, rate = time_steps(model, data, args.steps, precision)
            row = {"strategy": strategy, "variant": variant, "precision": precision, "first_steps_seconds": warm,
                   "steps_per_s": rate}
            rows.append(row)
            print(json.dumps(row), flush=True)
            torch._dynamo.reset()
    args.results.mkdir(parents=True, exist_ok=True)
    context = {"cpu": cpu_model(), "flags": cpu_flags(), "threads": threads, "matmul_peak": peak,
               "torch": torch.__version__, "command": "python " + " ".join(sys.argv),
               "measured": time.strftime("%Y-%m-%d %H:%M")}
    (args.results / args.name).write_text(json.dumps({"rows": rows, "context": context}, indent=2) + "\n")
    for r in rows:
        base = next(x for x in rows if x["strategy"] == r["strategy"] and x["variant"].startswith("eager-") and
                    not x["variant"].endswith("1-thread"))
        print(f"{r['strategy']:5s} {r['variant']:20s} {r['steps_per_s']:.2f} steps/s "
              f"({r['steps_per_s'] / base['steps_per_s']:.2f}x), first steps {r['first_steps_seconds']:.1f}s")


if __name__ == "__main__":
    main()
