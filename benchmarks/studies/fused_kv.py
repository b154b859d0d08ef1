"""What fusing the key and value adapters' A matmuls would buy: training steps/s, side by side.

Key and value read the same hidden states x (B, T, H). Unfused, each LoRA branch
computes its own x A^T (B, T, r) (and, under bf16 autocast, its own bf16 copy of x);
fused, one matmul with [A_k; A_v] (2r, H) gives both, and the backward pass likewise
does one matmul for both gradients. This script patches that fusion into the
attention layers of a `lora` model (the library is not changed), checks that it
computes the same logits, and times training steps (forward, backward, AdamW) on real
IMDb batches of 16, alternating unfused and fused step by step so that both see the
same machine. Writes results/fused_kv/fused_kv.json.

    .venv/bin/python benchmarks/studies/fused_kv.py [--steps 6 --repeats 4 --lengths 128,224]
"""

from __future__ import annotations

import argparse
import json
import time
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py, peak.py
from compile_threads import batches, make  # noqa: E402


class FusedKV:
    """Switchable fusion of one attention layer's key/value LoRA A matmuls.

    key.forward computes h = x [A_k; A_v]^T (..., 2r) once, uses h[..., :r] and leaves
    h[..., r:] for value, which takes it when it is called on the same tensor x.
    """

    def __init__(self, key, value) -> None:
        self.key, self.value, self.on = key, value, False
        self.stash: tuple[torch.Tensor, torch.Tensor] | None = None
        self.fused_calls = 0
        self.key_forward, self.value_forward = key.forward, value.forward
        key.forward, value.forward = self._key, self._value

    def _key(self, x):
        if not self.on:
            return self.key_forward(x)
        r = self.key.r
        h = F.linear(x, torch.cat([self.key.lora_A, self.value.lora_A]))  # (..., 2r)
        self.stash = (x, h[..., r:])
        return self.key.base(x) + F.linear(h[..., :r], self.key.lora_B) * self.key.scaling

    def _value(self, x):
        stash, self.stash = self.stash, None
        if not self.on or stash is None or stash[0] is not x:
            return self.value_forward(x)
        self.fused_calls += 1
        return self.value.base(x) + F.linear(stash[1], self.value.lora_B) * self.value.scaling


def fuse(model) -> list[FusedKV]:
    from lorafit.lora import LoRALinear

    pairs = []
    for _, m in model.named_modules():
        k, v = getattr(m, "key", None), getattr(m, "value", None)
        if isinstance(k, LoRALinear) and isinstance(v, LoRALinear):
            pairs.append(FusedKV(k, v))
    return pairs


def set_fused(pairs: list[FusedKV], on: bool) -> None:
    for p in pairs:
        p.on = on


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6, help="training steps per repeat, per variant")
    ap.add_argument("--repeats", type=int, default=4, help="repeats")
    ap.add_argument("--lengths", default="128,224", help="padded lengths of the batches (224: the bench slice's "
                                                         "typical bucket at max_length 256)")
    ap.add_argument("--results", type=Path, default=Path("results/fused_kv"))
    args = ap.parse_args()
    from lorafit.precision import resolve_precision
    from lorafit.training import autocast

    device = torch.device("cpu")
    precision = resolve_precision("auto", device)
    torch.manual_seed(0)
    loaded = make("lora")
    model = loaded.model
    pairs = fuse(model)
    if not pairs:
        raise SystemExit("no attention layer with LoRA on both key and value")
    data = batches(loaded.tokenizer, tuple(int(x) for x in args.lengths.split(",")))

    # The fusion computes the same function (fp32, eval; B is made non-zero first).
    with torch.no_grad():
        for p in pairs:
            p.key.lora_B.normal_(0, 0.02)
            p.value.lora_B.normal_(0, 0.02)
    model.eval()
    with torch.no_grad():
        ref = model(**{k: v for k, v in data[0].items() if k != "labels"}).logits
        set_fused(pairs, True)
        got = model(**{k: v for k, v in data[0].items() if k != "labels"}).logits
        set_fused(pairs, False)
    max_diff = (ref - got).abs().max().item()
    assert max_diff < 1e-4, f"fused logits differ from unfused by {max_diff}"
    assert all(p.fused_calls == 1 for p in pairs), "the fused path did not run in every layer"
    model.train()

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step(batch) -> float:
        t = time.perf_counter()
        with autocast(device, precision):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    variants = (("unfused", False), ("fused", True))
    for _, on in variants:  # warm-up, both paths, every shape
        set_fused(pairs, on)
        for b in data:
            step(b)
    # This machine's speed drifts within a minute: alternate the two step by step, in an
    # order that flips each time, and compare the summed times.
    seconds = {"unfused": 0.0, "fused": 0.0}
    n = args.steps * args.repeats
    for i in range(n):
        for name, on in (variants if i % 2 == 0 else variants[::-1]):
            set_fused(pairs, on)
            seconds[name] += step(data[(i // 2) % len(data)])
    rate = {k: n / v for k, v in seconds.items()}
    out = {"precision": precision, "threads": torch.get_num_threads(), "batch_size": 16,
           "lengths": args.lengths, "steps_each": n, "max_abs_logit_diff_fp32": max_diff,
           "steps_per_s": rate, "fused_over_unfused": rate["fused"] / rate["unfused"],
           "method": "alternated step by step", "measured": time.strftime("%Y-%m-%d %H:%M")}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "fused_kv.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
