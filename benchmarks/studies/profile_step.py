"""Where a training step's time goes: the share per op class, for full and lora.

One training step of all-MiniLM-L6-v2 as lorafit takes it (its model set-up, its
optimizer, its precision and attention kernel as `auto` resolves them on this machine,
attention dropout 0, gradient clipping),
on a batch of `--batch-size` real reviews of the archive truncated to `--length`
tokens (every row full, so the shape is fixed), profiled with torch.profiler over
`--steps` steps after `--warmup` steps. Each op's self time goes to one class:
matmul, attention (the fused scaled-dot-product kernels), dropout, optimizer (anything
under `optimizer.step`/`zero_grad`), elementwise (activations, norms, adds, copies, ...),
other. The step's wall time without the profiler is measured too, and the model FLOP
utilisation of the unprofiled step against this CPU's matmul peak, measured first in the
same process (benchmarks/peak.py: best of trials at 2048^2 and the model's GEMM shapes).

    .venv/bin/python benchmarks/studies/profile_step.py [--strategies full,lora] [--out results/profile/profile.json]
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import defaultdict
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py, peak.py
from common import ARCHIVE, train_flops_per_token  # noqa: E402
from peak import cpu_flags, cpu_model, measure  # noqa: E402

CLASSES = [
    ("attention", re.compile(r"scaled_dot_product|flash_attention|efficient_attention|_fused_sdp")),
    ("matmul", re.compile(r"^aten::(mm|addmm|bmm|baddbmm|matmul|linear|_mkldnn|mkldnn_)")),
    # nn.Dropout's bernoulli_, and lorafit's FastDropout: its random words (randint -> random_) and mask product
    ("dropout", re.compile(r"bernoulli|dropout|random_|randint|ScaleByMask")),
    ("elementwise", re.compile(
        r"^aten::(add|mul|div|sub|gelu|tanh|relu|threshold|layer_norm|native_layer_norm|softmax|_softmax|"
        r"log_softmax|_log_softmax|copy_|_to_copy|to|clone|fill_|zero_|zeros|ones|sum|mean|where|masked|exp|log|"
        r"sqrt|pow|neg|rsub|cat|stack|embedding|nll_loss|cross_entropy|ge|lt|eq|ne|abs|clamp|norm|linalg_vector_norm|"
        r"_foreach|lerp|addcmul|addcdiv|empty|resize_)")),
]


def classify(name: str, under_optimizer: bool) -> str:
    if under_optimizer:
        return "optimizer"
    for cls, pattern in CLASSES:
        if pattern.search(name):
            return cls
    return "other"


def _under_optimizer(event) -> bool:
    e = event
    while e is not None:
        if e.name.startswith(("Optimizer.step", "Optimizer.zero_grad")):
            return True
        e = e.cpu_parent
    return False


def default_config():
    """The default model's transformers config (all-MiniLM-L6-v2 unless LORAFIT_MODEL says otherwise)."""
    from transformers import AutoConfig

    from lorafit.models import resolve_model_path

    return AutoConfig.from_pretrained(resolve_model_path(None))


def model_shapes(batch: int, length: int) -> dict:
    """The default model's shapes at (batch, length): the linear layers' (tokens, hidden,
    intermediate) as `--precision auto` times them, attention's (batch, heads, length, head
    dim) as `--attention auto` times it, and one activation's (batch, length, hidden)."""
    from lorafit.precision import model_dims

    config = default_config()
    linears = model_dims(config, batch, length)
    heads = int(config.num_attention_heads)
    return {"linears": linears, "attention": (batch, heads, length, linears[1] // heads),
            "activation": (batch, length, linears[1])}


def build(strategy: str, batch_size: int, length: int, data: str):
    from lorafit.config import RunConfig
    from lorafit.data import load_dataset
    from lorafit.models import load_model
    from lorafit.strategies import STRATEGIES, learning_rate
    from lorafit.training import TrainSettings, make_optimizer

    cfg = RunConfig(strategy=strategy)
    loaded = load_model(None, num_labels=2, seed=0, attn_dropout=0.0)
    model = loaded.model
    STRATEGIES[strategy].setup(model, cfg)
    splits = load_dataset(data, train_size=4 * batch_size, val_size=16, test_size=16, seed=0)
    enc = loaded.tokenizer(list(splits.train.texts), truncation=True, max_length=length, padding="max_length",
                           return_tensors="pt")
    keep = enc["attention_mask"].sum(1) == length  # reviews that fill every position
    inputs = {k: v[keep][:batch_size] for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    labels = torch.as_tensor(splits.train.labels)[keep][:batch_size]
    lr = learning_rate(cfg)
    s = TrainSettings(epochs=1, lr=lr, batch_size=batch_size)
    opt, sched = make_optimizer(model, s, 100, STRATEGIES[strategy].param_groups(model, cfg, lr))
    return model, opt, sched, inputs, labels


def step(model, opt, sched, inputs, labels, precision: str) -> None:
    from lorafit.training import clip_and_step, forward_backward

    device = torch.device("cpu")
    forward_backward(model, inputs, labels, 1.0, device, precision)
    clip_and_step([p for p in model.parameters() if p.requires_grad], opt, sched, 1.0)


def profile_strategy(strategy: str, args) -> dict:
    from lorafit.precision import resolve_precision

    from lorafit.attention import resolve_attention, set_attention

    cpu = torch.device("cpu")
    shapes = model_shapes(args.batch_size, args.length)
    precision = resolve_precision("auto", cpu, shapes["linears"])
    model, opt, sched, inputs, labels = build(strategy, args.batch_size, args.length, args.data)
    attention = set_attention(model, resolve_attention("auto", cpu, precision, shapes["attention"]))
    model.train()
    for _ in range(args.warmup):
        step(model, opt, sched, inputs, labels, precision)
    t = time.perf_counter()
    for _ in range(args.steps):
        step(model, opt, sched, inputs, labels, precision)
    wall = (time.perf_counter() - t) / args.steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for _ in range(args.steps):
            step(model, opt, sched, inputs, labels, precision)
        profiled_wall = (time.perf_counter() - t) / args.steps
    per_class: dict[str, float] = defaultdict(float)
    per_op: dict[str, float] = defaultdict(float)
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CPU:
            continue
        us = e.self_cpu_time_total
        per_class[classify(e.name, _under_optimizer(e))] += us
        per_op[e.name] += us
    total = sum(per_class.values())
    from lorafit.first_token import last_layer_of

    return {"strategy": strategy, "precision": precision, "attention": attention, "last_layer": last_layer_of(model),
            "step_seconds": wall,
            "step_seconds_profiled": profiled_wall,
            "share": {k: per_class.get(k, 0.0) / total for k in
                      ("matmul", "attention", "dropout", "optimizer", "elementwise", "other")},
            "seconds_per_step": {k: v / 1e6 / args.steps for k, v in per_class.items()},
            "top_ops": {k: v / 1e6 / args.steps for k, v in sorted(per_op.items(), key=lambda kv: -kv[1])[:20]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--strategies", default="full,lora")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--data", default=ARCHIVE)
    ap.add_argument("--out", default="results/profile/profile.json")
    args = ap.parse_args()
    peak = measure()  # first, before any model is loaded
    print(f"matmul peak: bf16 {peak['bfloat16']['peak_tflops']:.3f}, fp32 {peak['float32']['peak_tflops']:.3f} "
          "TFLOP/s", flush=True)
    result = {"cpu": cpu_model(), "flags": cpu_flags(), "threads": torch.get_num_threads(), "matmul_peak": peak,
              "torch": torch.__version__, "batch": [args.batch_size, args.length], "steps": args.steps,
              "command": "python benchmarks/studies/profile_step.py", "rows": []}
    for strategy in args.strategies.split(","):
        row = profile_strategy(strategy, args)
        flops = train_flops_per_token(strategy, default_config(), args.length,
                                      first_token=row["last_layer"] == "first-token")  # the FLOPs it computes
        tflops = flops * args.batch_size * args.length / row["step_seconds"] / 1e12
        dtype = "bfloat16" if row["precision"] == "bf16" else "float32"
        row["model_tflops"], row["mfu"] = tflops, tflops / peak[dtype]["peak_tflops"]
        result["rows"].append(row)
        print(f"{strategy}: {row['step_seconds']:.3f} s/step ({row['precision']}), MFU {100 * row['mfu']:.1f}%; "
              + ", ".join(f"{k} {100 * v:.1f}%" for k, v in row["share"].items()), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
