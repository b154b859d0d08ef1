"""Mixed-adapter forwards: grouped against gathered rows, beside one merged adapter.

    .venv/bin/python benchmarks/routing_speed.py --out results/routing_speed

all-MiniLM-L6-v2 (mean pooling, as lorafit trains it) with `--adapters` plain LoRA adapters
(rank 4 on lorafit's default targets, every linear layer of the encoder, or `--targets`; B
drawn at random so every update is real), a batch of `--batch` IMDb reviews (the embedded
sample's test split, max_length 256) whose rows name the adapters in turn. Systems, each one
forward of the batch in eval mode:

  merged     one adapter merged into the weights: the base model's forward (the ceiling)
  grouped    route_adapters(mode="grouped"): the base matmul once, then each adapter on its rows
  sorted     the same with the batch's rows sorted by adapter, as `lorafit serve` sorts them: each
             adapter's rows a view of the batch, its update added in place (no copies)
  gathered   route_adapters(mode="gathered"): every row's A and B gathered, two batched matmuls
  stacked    route_adapters(mode="stacked"): the named adapters' A and B stacked, two dense matmuls, a row mask
  peft       the same adapters saved by lorafit and loaded into one PEFT model (the peer of
             `lorafit serve`'s load benchmark), its mixed-batch `adapter_names=` forward
  one-merged    every row naming one adapter (a server's batch of one request), that adapter
                merged into a copy of each weight, then one matmul
  one-unmerged  the same batch the other way: each layer's base matmul, A x, and the update
                added in place by one addmm (lorafit takes this path below MERGE_FROM_TOKENS
                tokens, the merged one from there on)

They take turns in each of `--rounds` rounds; each figure is the median texts/s, with the
CPU, its matmul peak measured in the same process, and the precision (fp32, as `lorafit
serve` computes).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import commit  # noqa: E402
from lorafit.data import load_dataset  # noqa: E402
from lorafit.config import RunConfig  # noqa: E402
from lorafit.lora import (  # noqa: E402
    LoRAConfig, apply_lora, merge_lora, route_adapters, set_active_adapter)
from lorafit.strategies import lora_config  # noqa: E402
from lorafit.machine import cpu_model  # noqa: E402
from lorafit.models import load_model  # noqa: E402


def peft_with(base: torch.nn.Module, model: torch.nn.Module, names: list[str]) -> torch.nn.Module:
    """A PEFT model over `base` holding `model`'s adapters `names`, each saved by lorafit in
    PEFT's format and loaded by PEFT (their logits are checked against lorafit's routing)."""
    import tempfile

    from peft import PeftModel

    from lorafit.adapter import save_adapter

    with tempfile.TemporaryDirectory() as tmp:
        for n in names:
            save_adapter(model, Path(tmp) / n, adapter_name=n)
        peft_model = PeftModel.from_pretrained(base, str(Path(tmp) / names[0]), adapter_name=names[0])
        for n in names[1:]:
            peft_model.load_adapter(str(Path(tmp) / n), adapter_name=n)
    return peft_model.eval()


@contextlib.contextmanager
def _merge_from(tokens: int):
    """Within the block, a one-adapter batch merges from `tokens` tokens on (0: always; a number
    no batch reaches: never, the update added in place), whatever lorafit's threshold."""
    import lorafit.lora

    saved = lorafit.lora.MERGE_FROM_TOKENS
    lorafit.lora.MERGE_FROM_TOKENS = tokens
    try:
        yield
    finally:
        lorafit.lora.MERGE_FROM_TOKENS = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=16)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--targets", default=None,
                    help="comma-separated LoRA targets (default: lorafit's default, every linear layer of the encoder)")
    ap.add_argument("--out", default="results/routing_speed")
    args = ap.parse_args()
    from peak import measure

    loaded = load_model(None, pooling="mean")
    model = loaded.model.eval()
    base_copy = copy.deepcopy(model)  # PEFT's model wraps its own copy of the base
    torch.manual_seed(0)
    names = [f"a{i}" for i in range(args.adapters)]
    targets = args.targets.split(",") if args.targets else lora_config(RunConfig()).targets
    for n in names:
        apply_lora(model, LoRAConfig(r=4, alpha=8, targets=targets), adapter_name=n)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_B" in pname:
                p.normal_(0, 0.02)
    merged = copy.deepcopy(model)
    set_active_adapter(merged, names[0])
    merge_lora(merged)
    peft_model = peft_with(base_copy, model, names)
    texts = load_dataset(None).test.texts[:args.batch]
    batch = loaded.tokenizer(texts, truncation=True, max_length=256, padding=True, return_tensors="pt")
    rows = [names[i % len(names)] for i in range(len(texts))]
    alone = [names[0]] * len(texts)  # a batch whose rows all name one adapter (a request's batch)
    order = sorted(range(len(rows)), key=lambda i: names.index(rows[i]))  # the rows sorted by adapter
    by_adapter = {k: v[order] for k, v in batch.items()}

    with torch.no_grad():  # every system computes the same logits before any is timed
        with route_adapters(model, rows):
            want = model(**batch).logits
        for mode in ("gathered", "stacked"):
            with route_adapters(model, rows, mode=mode):
                torch.testing.assert_close(model(**batch).logits, want, atol=1e-4, rtol=0)
        torch.testing.assert_close(peft_model(**batch, adapter_names=rows).logits, want, atol=1e-4, rtol=0)
        with route_adapters(model, [rows[i] for i in order]):
            torch.testing.assert_close(model(**by_adapter).logits, want[order], atol=1e-4, rtol=0)
        for tokens in (0, 10**12):
            with route_adapters(model, alone), _merge_from(tokens):
                torch.testing.assert_close(model(**batch).logits, merged(**batch).logits, atol=1e-4, rtol=0)

    @torch.no_grad()
    def run(system: str) -> float:
        start = time.perf_counter()
        if system == "merged":
            merged(**batch)
        elif system == "peft":
            peft_model(**batch, adapter_names=rows)
        elif system == "sorted":  # the sort itself is part of what the server does per batch
            order_now = sorted(range(len(rows)), key=lambda i: names.index(rows[i]))
            with route_adapters(model, [rows[i] for i in order_now]):
                model(**{k: v[order_now] for k, v in batch.items()})
        elif system == "one-merged":
            with route_adapters(model, alone), _merge_from(0):
                model(**batch)
        elif system == "one-unmerged":
            with route_adapters(model, alone), _merge_from(10**12):
                model(**batch)
        else:
            with route_adapters(model, rows, mode=system):
                model(**batch)
        return len(texts) / (time.perf_counter() - start)

    systems = ["merged", "grouped", "sorted", "gathered", "stacked", "peft", "one-merged", "one-unmerged"]
    for s in systems:  # warm-up
        run(s)
    rates: dict[str, list[float]] = {s: [] for s in systems}
    for r in range(args.rounds):
        for s in systems[r % len(systems):] + systems[:r % len(systems)]:
            rates[s].append(run(s))
        print(f"round {r + 1}: " + ", ".join(f"{s} {v[-1]:.1f}/s" for s, v in rates.items()), flush=True)
    peak = measure(trials=3, seconds=0.5)
    med = {s: statistics.median(v) for s, v in rates.items()}
    record = {"command": "benchmarks/routing_speed.py " + " ".join(sys.argv[1:]),
              "commit": commit(),
              "cpu": cpu_model(), "peak": peak, "adapters": args.adapters, "batch": len(texts),
              "padded_tokens": int(batch["input_ids"].numel()), "precision": "fp32", "rounds": rates,
              "median_texts_per_s": med, "ratio_to_merged": {s: med[s] / med["merged"] for s in med}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "routing_speed.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"# Mixed-adapter forwards\n\n`{record['command']}` at commit {record['commit']}\n",
             f"CPU: {record['cpu']}; matmul peak bf16 {peak['bfloat16']['peak_tflops']:.2f}, fp32 "
             f"{peak['float32']['peak_tflops']:.2f} TFLOP/s; {args.adapters} adapters, a batch of {len(texts)} "
             f"reviews ({record['padded_tokens']:,} padded tokens), fp32\n",
             "| system | texts/s (median) | x merged |", "|---|---|---|"]
    lines += [f"| {s} | {med[s]:.1f} | {med[s] / med['merged']:.2f} |" for s in systems]
    (out / "routing_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
