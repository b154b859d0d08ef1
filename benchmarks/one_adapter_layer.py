"""One layer, one adapter, by tokens in the batch: merged into a copy of the weight, or added in place.

    .venv/bin/python benchmarks/one_adapter_layer.py --out results/one_adapter_layer

A batch whose rows all name one adapter (`lorafit serve`'s batch of one request) can run a
LoRA layer two ways: merge the adapter into a copy of the weight, W0 + s B A (one addmm over
the whole weight), then one matmul; or the base matmul, A x, and s B (A x) added to its output
in place (one addmm over the batch's outputs). The first costs the same whatever the batch, the
second grows with it. This times both, and the base matmul alone, on all-MiniLM-L6-v2's three
layer shapes (384x384: query, key, value, attention output; 1536x384 and 384x1536: the
feed-forward pair), rank 4, fp32, for batches of 16 to 8,192 tokens; each figure is the
median of `--repeats` timings, the three variants taking turns. `lorafit.lora.MERGE_FROM_TOKENS`
is read off this table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import commit  # noqa: E402
from lorafit.lora import MERGE_FROM_TOKENS  # noqa: E402
from lorafit.machine import cpu_model  # noqa: E402

SHAPES = ((384, 384), (1536, 384), (384, 1536))  # (out, in)
TOKENS = (16, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=31)
    ap.add_argument("--out", default="results/one_adapter_layer")
    args = ap.parse_args()
    from peak import measure

    torch.manual_seed(0)
    rows = []
    with torch.no_grad():
        for out_f, in_f in SHAPES:
            w, b = torch.randn(out_f, in_f) * 0.02, torch.zeros(out_f)
            a, bb = torch.randn(4, in_f) * 0.02, torch.randn(out_f, 4) * 0.02

            for tokens in TOKENS:
                x = torch.randn(tokens, in_f)

                def base() -> torch.Tensor:
                    return F.linear(x, w, b)

                def merged() -> torch.Tensor:
                    return F.linear(x, torch.addmm(w, bb, a, alpha=2.0), b)

                def in_place() -> torch.Tensor:
                    y = F.linear(x, w, b)
                    return y.addmm_(F.linear(x, a), bb.t(), alpha=2.0)

                torch.testing.assert_close(merged(), in_place(), atol=1e-4, rtol=0)
                runs = {"base": base, "merged": merged, "in_place": in_place}
                times: dict[str, list[float]] = {k: [] for k in runs}
                for f in runs.values():
                    f()
                for _ in range(args.repeats):
                    for k, f in runs.items():
                        start = time.perf_counter()
                        f()
                        times[k].append(time.perf_counter() - start)
                med = {k: statistics.median(v) for k, v in times.items()}
                rows.append({"out": out_f, "in": in_f, "tokens": tokens, "base_ms": med["base"] * 1e3,
                             "merged_x_base": med["merged"] / med["base"],
                             "in_place_x_base": med["in_place"] / med["base"]})
                print(f"{out_f}x{in_f} {tokens:>5} tokens: base {med['base'] * 1e3:.3f} ms, merged "
                      f"{rows[-1]['merged_x_base']:.2f}x, in place {rows[-1]['in_place_x_base']:.2f}x", flush=True)
    peak = measure(trials=3, seconds=0.5)
    record = {"command": "benchmarks/one_adapter_layer.py " + " ".join(sys.argv[1:]), "commit": commit(),
              "cpu": cpu_model(), "peak": peak, "precision": "fp32", "rank": 4, "repeats": args.repeats,
              "merge_from_tokens": MERGE_FROM_TOKENS, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "one_adapter_layer.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"# One adapter on one layer: merged into a copy, or added in place\n\n`{record['command']}` at "
             f"commit {record['commit']}\n",
             f"CPU: {record['cpu']}; matmul peak bf16 {peak['bfloat16']['peak_tflops']:.2f}, fp32 "
             f"{peak['float32']['peak_tflops']:.2f} TFLOP/s; rank 4, fp32; medians of {args.repeats}; "
             f"each variant's time over the base matmul's (lorafit merges from {MERGE_FROM_TOKENS:,} tokens on)\n",
             "| layer (out x in) | tokens | base ms | merged | in place |", "|---|---|---|---|---|"]
    lines += [f"| {r['out']}x{r['in']} | {r['tokens']:,} | {r['base_ms']:.3f} | {r['merged_x_base']:.2f}x | "
              f"{r['in_place_x_base']:.2f}x |" for r in rows]
    (out / "one_adapter_layer.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
