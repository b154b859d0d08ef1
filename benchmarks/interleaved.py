"""lorafit, the tuned peer and the typical peer, training steps interleaved in one process.

benchmarks/bench.py runs the three systems one after another, each for 5-19 minutes, so
the machine's drift between them goes into its ratios. Here one process builds all three
for a strategy and takes their steps in rounds, one step each per round on the same 16
reviews, in each of the six orders in turn: a slowdown of the machine, and whatever one
step leaves behind for the next (freed memory, caches), falls on all three alike. Only
the training step is timed (forward, backward, clipping, AdamW, schedule); the data
pipeline, the test pass and the process's start are bench.py's to measure.

Each system pads the round's reviews its own way and computes in its own setup, as in
bench.py:
- lorafit: its model as `lorafit train --pooling cls` sets it up (the first-token last
  layer, FastDropout, attention dropout 0, the attention kernel and the precision `auto`
  resolves here), its AdamW groups, padding to the multiple `--pad-multiple`'s default picks for that
  precision (32 in bf16, 8 in fp32);
- tuned peer (benchmarks/peer.py --tuned): transformers + PEFT, attention dropout 0,
  fused AdamW, lorafit's precision, padding to the longest review;
- typical peer (peer.py): the model's attention dropout 0.1, AdamW's default, fp32,
  padding to max_length.

The rounds' reviews are lorafit's length-bucketed training batches of the bench slice
(2,000 training reviews of the full archive, max_length 256, seed 0), the first
--rounds of its first epoch after --warmup rounds that are not timed. Reported per
system: samples/s over the timed rounds, the median step; and the ratios lorafit over
each peer (of the total times, and the median of the per-round ratios). The matmul peak
is measured first, in this process (benchmarks/peak.py), with the CPU model.

    .venv/bin/python benchmarks/interleaved.py [--strategies full,lora] [--rounds 24] [--warmup 2]

writes results/interleaved/interleaved.json (rows of strategies not run are kept).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import torch

from common import add_slice_args
from peak import cpu_flags, cpu_model, measure

SYSTEMS = ("lorafit", "tuned", "typical")


def step_in_rounds(steps: dict, batches: dict, warmup: int, on_round=None) -> dict[str, list[float]]:
    """Seconds of each system's step, round by round: round r steps every system once on
    its own `batches[name][r]`, in the r-th of all orders of the systems, cycled (each
    system follows each other one equally often, so what a step leaves behind, freed
    memory or caches, falls on all alike). The first `warmup` rounds are not kept.

    steps: name -> step(batch); batches: name -> one batch per round (all the same count).
    Returns name -> [seconds of rounds warmup.., in order]; `on_round(r, times)` is called
    after each kept round."""
    names = list(steps)
    orders = list(itertools.permutations(names))
    n = {len(b) for b in batches.values()}
    if len(n) != 1 or set(batches) != set(names):
        raise ValueError(f"every system needs one batch per round: {({k: len(b) for k, b in batches.items()})}")
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(n.pop()):
        for name in orders[r % len(orders)]:
            t = time.perf_counter()
            steps[name](batches[name][r])
            dt = time.perf_counter() - t
            if r >= warmup:
                times[name].append(dt)
        if r >= warmup and on_round is not None:
            on_round(r - warmup, times)
    return times


def lorafit_system(strategy: str, splits, max_length: int, batch_size: int, total: int):
    """lorafit's model, step and batch maker for `strategy`, set up as `lorafit train --pooling cls`."""
    from lorafit.attention import resolve_attention, set_attention
    from lorafit.config import RunConfig
    from lorafit.data.batching import resolve_pad_multiple
    from lorafit.data.encoding import encode_split
    from lorafit.first_token import last_layer_of
    from lorafit.models import load_model
    from lorafit.precision import model_dims, resolve_precision
    from lorafit.strategies import STRATEGIES, learning_rate
    from lorafit.training import TrainSettings, clip_and_step, forward_backward, make_optimizer

    cfg = RunConfig(strategy=strategy, pooling="cls", max_length=max_length, batch_size=batch_size)
    device = torch.device("cpu")
    loaded = load_model(None, num_labels=2, seed=0, attn_dropout=cfg.attn_dropout, pooling="cls")
    model = loaded.model
    STRATEGIES[strategy].setup(model, cfg)
    precision = resolve_precision(cfg.precision, device, model_dims(model.config, batch_size, max_length))
    c = model.config
    attention = set_attention(model, resolve_attention(
        cfg.attention, device, precision, (batch_size, c.num_attention_heads, max_length,
                                           c.hidden_size // c.num_attention_heads)))
    lr = learning_rate(cfg)
    s = TrainSettings(epochs=1, lr=lr, batch_size=batch_size, weight_decay=cfg.weight_decay,
                      warmup_ratio=cfg.warmup_ratio, max_grad_norm=cfg.max_grad_norm, precision=precision)
    opt, sched = make_optimizer(model, s, total, STRATEGIES[strategy].param_groups(model, cfg, lr))
    params = [p for p in model.parameters() if p.requires_grad]
    pad_multiple = resolve_pad_multiple(cfg.pad_multiple, precision)
    enc = encode_split(splits.train, loaded.tokenizer, max_length, pad_multiple=pad_multiple)
    pad_id = loaded.tokenizer.pad_token_id or 0
    model.train()

    def make_batch(rows):
        return {**enc.batch(rows, pad_id), "labels": torch.as_tensor(enc.labels[rows])}

    def step(batch):
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        forward_backward(model, inputs, batch["labels"], 1.0, device, precision)
        clip_and_step(params, opt, sched, cfg.max_grad_norm)

    setup = {"precision": precision, "attention": attention, "last_layer": last_layer_of(model), "lr": lr,
             "pad_multiple": pad_multiple, "attn_dropout": cfg.attn_dropout}
    return enc, make_batch, step, setup


def peer_system(strategy: str, tuned: bool, precision: str, texts: list[str], labels, max_length: int, lr: float,
                total: int):
    """A peer's step over review indices, as benchmarks/peer.py trains (typical or tuned)."""
    from peer import make_model, make_optimizer, train_step
    from transformers import AutoConfig

    from lorafit.models import resolve_model_path

    torch.manual_seed(0)
    model, tok = make_model(strategy, tuned, 0.0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = make_optimizer(params, lr, tuned, total)
    bf16 = tuned and precision == "bf16"
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    padding = "longest" if tuned else "max_length"
    model.train()

    def make_batch(rows):
        enc = tok([texts[i] for i in rows], truncation=True, max_length=max_length, padding=padding,
                  return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "labels": torch.as_tensor(labels[rows])}

    def step(batch):
        train_step(model, params, opt, sched, batch, autocast)

    dropout = 0.0 if tuned else float(AutoConfig.from_pretrained(resolve_model_path(None)).attention_probs_dropout_prob)
    setup = {"bf16": bf16, "padding": padding, "fused_adamw": tuned, "attn_dropout": dropout, "lr": lr}
    return make_batch, step, setup


def run_strategy(strategy: str, args) -> dict:
    from lorafit.data import load_dataset
    from lorafit.data.batching import bucketed_batches

    splits = load_dataset(args.data, train_size=args.train_size, val_size=args.val_size, test_size=args.test_size,
                          seed=0)
    total = args.warmup + args.rounds
    enc, ours_batch, ours, ours_setup = lorafit_system(strategy, splits, args.max_length, args.batch_size, total)
    rounds = bucketed_batches(enc.lengths, args.batch_size, seed=0, epoch=0)[:total]
    texts, labels = list(splits.train.texts), enc.labels
    makers, steps, setups = {"lorafit": ours_batch}, {"lorafit": ours}, {"lorafit": ours_setup}
    for kind, tuned in (("tuned", True), ("typical", False)):
        makers[kind], steps[kind], setups[kind] = peer_system(strategy, tuned, ours_setup["precision"], texts, labels,
                                                              args.max_length, ours_setup["lr"], total)
    # every system's batches padded and tensored before any step: only the steps are timed
    batches = {k: [makers[k](rows) for rows in rounds] for k in SYSTEMS}
    lengths = {k: [int(b["input_ids"].shape[1]) for b in batches[k][args.warmup:]] for k in SYSTEMS}

    def report(r, times):
        print(f"{strategy} round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {times[k][-1]:.2f}s" for k in SYSTEMS),
              flush=True)

    times = step_in_rounds(steps, batches, args.warmup, report)
    samples = sum(len(rows) for rows in rounds[args.warmup:])
    row = {"strategy": strategy, "rounds": args.rounds, "warmup_rounds": args.warmup, "samples": samples,
           "real_tokens_per_sample": float(sum(int(enc.lengths[rows].sum()) for rows in rounds[args.warmup:])
                                           / samples)}
    for kind in SYSTEMS:
        row[kind] = {"samples_per_s": samples / sum(times[kind]), "median_step_seconds": statistics.median(times[kind]),
                     "mean_padded_length": statistics.mean(lengths[kind]), "step_seconds": times[kind],
                     **setups[kind]}
    for kind in ("tuned", "typical"):
        row[f"over_{kind}"] = {
            "samples_per_s": row["lorafit"]["samples_per_s"] / row[kind]["samples_per_s"],
            "median_of_round_ratios": statistics.median(p / o for p, o in zip(times[kind], times["lorafit"])),
        }
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_slice_args(ap)
    ap.add_argument("--strategies", default="full,lora")
    ap.add_argument("--rounds", type=int, default=24)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("results/interleaved/interleaved.json"))
    args = ap.parse_args()
    if args.rounds < 1 or args.warmup < 0:
        ap.error("--rounds must be >= 1 and --warmup >= 0")
    if args.rounds + args.warmup > args.train_size // args.batch_size:
        ap.error(f"--rounds + --warmup ({args.rounds + args.warmup}) must fit in one epoch of the training slice "
                 f"({args.train_size // args.batch_size} batches of {args.batch_size})")
    if not Path(args.data).exists():
        raise SystemExit(f"{args.data}: no such archive; pass --data PATH or set LORAFIT_IMDB_ARCHIVE")

    peak = measure(trials=5, seconds=1.0)  # first, in an otherwise idle process
    print(f"{peak['cpu']}: matmul peak fp32 {peak['float32']['peak_tflops']:.2f}, bf16 "
          f"{peak['bfloat16']['peak_tflops']:.2f} TFLOP/s", flush=True)
    old = json.loads(args.out.read_text()) if args.out.exists() else {}
    rows = {r["strategy"]: r for r in old.get("rows", [])}
    for strategy in args.strategies.split(","):
        rows[strategy] = {**run_strategy(strategy, args), "matmul_peak": peak, "cpu": cpu_model(),
                          "flags": cpu_flags(), "torch": torch.__version__,
                          "measured": time.strftime("%Y-%m-%d %H:%M")}
        r = rows[strategy]
        print(f"{strategy}: lorafit {r['lorafit']['samples_per_s']:.2f}, tuned {r['tuned']['samples_per_s']:.2f}, "
              f"typical {r['typical']['samples_per_s']:.2f} samples/s; {r['over_tuned']['samples_per_s']:.2f}x the "
              f"tuned peer, {r['over_typical']['samples_per_s']:.2f}x the typical", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"command": "python benchmarks/interleaved.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in (("strategies", args.strategies), ("rounds", args.rounds),
                                                     ("warmup", args.warmup))),
        "rows": [rows[k] for k in sorted(rows)]}, indent=2) + "\n")
    tmp.replace(args.out)


if __name__ == "__main__":
    main()
