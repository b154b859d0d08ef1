"""The levers the step profile points to, each timed side by side against what lorafit does now.

1. AdamW: the default (foreach) step against `fused=True`, over all-MiniLM-L6-v2's
   parameters (full fine-tuning's optimizer), fp32, gradients drawn once.
2. Attention: scaled-dot-product attention forward + backward at the model's shape
   (batch x 12 heads x length x 32, in the precision `--precision auto` picks here) with
   the backend PyTorch picks on CPU (the fused flash kernel) against the plain math
   backend; then a whole training step (full and lora) under each.
3. Dropout (p=0.1): nn.Dropout's per-element Bernoulli draw against lorafit's FastDropout
   (16-bit lanes of int64 random words), one call at the model's activation shape, then
   whole training steps (full and lora) with every dropout of the model one or the other.
4. Attention in fp32 under bf16 autocast (--attention sdpa-fp32) against SDPA on the bf16
   tensors autocast gives it: the kernel forward + backward, then whole training steps.
5. Precision: bf16 autocast (what `--precision auto` chose by the CPU's flags alone, with
   the attention kernel `--attention auto` picks under bf16) against fp32: the linear
   layers' timing that `auto` now makes (lorafit.precision), then whole training steps.
6. First token: the last layer computed for the first token only, as a cls-pooled head
   reads it (lorafit.first_token), against the full last layer transformers computes:
   eval forwards (their logits compared), then whole training steps.
7. Dropout's mask applied: FastDropout's mask and scale applied as lorafit does,
   by `aten.native_dropout_backward`, against `where(keep, x, 0) *= scale`, forward +
   backward of one call at the model's activation shape in the precision `auto` picks,
   then whole training steps (a candidate, measured and not adopted: README).
8. fp16: fp16 autocast with a gradient scaler (torch.amp.GradScaler, as fp16 training
   needs) against fp32, on a CPU with AVX512-FP16: the matmul peak per shape in fp16
   beside the fp32 one, then whole training steps of full and lora (a candidate,
   measured and not adopted: README).

Each pair alternates A B A B over --trials trials (this machine's speed drifts), and
reports the best and the median time of each and their ratio; the numbers the fused
optimizer and the math backend give are compared with the default's too.

    .venv/bin/python benchmarks/studies/levers.py [--trials 7] [--levers LIST]
    (LIST: adamw,attention,dropout,attention-fp32,precision,first-token,dropout-apply,fp16;
     default all)

writes results/levers/levers.json (entries of levers not chosen are kept).
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
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py, peak.py
from peak import cpu_flags, cpu_model, measure  # noqa: E402


def alternate(a, b, trials: int) -> dict:
    """Time callables a and b alternately; best and median seconds of each, ratio a/b of medians."""
    ta, tb = [], []
    a(), b()  # warm-up
    for _ in range(trials):
        for f, out in ((a, ta), (b, tb)):
            t = time.perf_counter()
            f()
            out.append(time.perf_counter() - t)
    return {"a_best": min(ta), "a_median": statistics.median(ta), "b_best": min(tb), "b_median": statistics.median(tb),
            "speedup_b_over_a": statistics.median(ta) / statistics.median(tb)}


def adamw(trials: int) -> dict:
    from lorafit.models import load_model

    model = load_model(None, seed=0).model
    params = [p for p in model.parameters()]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    twins = [p.detach().clone().requires_grad_() for p in params]
    for p, q in zip(params, twins):
        q.grad = p.grad.clone()
    foreach = torch.optim.AdamW(params, lr=5e-5, weight_decay=0.01)
    fused = torch.optim.AdamW(twins, lr=5e-5, weight_decay=0.01, fused=True)
    out = alternate(foreach.step, fused.step, trials)
    # the same number of steps on each: how far apart the weights are
    out["max_abs_weight_difference"] = max(float((p - q).abs().max()) for p, q in zip(params, twins))
    out["params"] = sum(p.numel() for p in params)
    out["a"], out["b"] = "AdamW (foreach, the default)", "AdamW fused=True"
    return out


def attention(trials: int, batch: int, length: int, dtype: torch.dtype) -> dict:
    from profile_step import model_shapes

    shape = model_shapes(batch, length)["attention"]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*shape, generator=g, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(*shape, generator=g, dtype=dtype)

    def run(backend):
        def f():
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(q, k, v)
                out.backward(grad)
            for t in (q, k, v):
                t.grad = None
        return f

    out = alternate(run(SDPBackend.FLASH_ATTENTION), run(SDPBackend.MATH), trials)
    with torch.no_grad(), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        flash = F.scaled_dot_product_attention(q, k, v).float()
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        math_ = F.scaled_dot_product_attention(q, k, v).float()
    out["max_abs_output_difference"] = float((flash - math_).abs().max())
    out["shape"] = list(shape)
    out["dtype"] = str(dtype)
    out["a"], out["b"] = "SDPA flash (PyTorch's CPU choice)", "SDPA math"
    return out


def steps_side_by_side(configure, a, b, trials: int, batch: int, length: int, data: str) -> dict:
    """Whole training steps of full and lora (batch x length, precision auto), each timed
    right after `configure(model, a)` or `configure(model, b)`, alternated."""
    from profile_step import build, step

    from lorafit.precision import resolve_precision

    precision = resolve_precision("auto", torch.device("cpu"))
    out = {"precision": precision}
    for strategy in ("full", "lora"):
        model, opt, sched, inputs, labels = build(strategy, batch, length, data)
        model.train()

        def run(setting):
            def f():
                configure(model, setting)
                step(model, opt, sched, inputs, labels, precision)
            return f

        out[f"{strategy}_step"] = alternate(run(a), run(b), max(3, trials // 2))
    return out


def _swap_dropouts(model, cls) -> None:
    """Make every dropout module of `model` a `cls` of the same p, in training mode
    (those already `cls` are kept)."""
    from torch import nn

    for module in model.modules():
        for name, child in module.named_children():
            if isinstance(child, nn.Dropout) and type(child) is not cls:
                setattr(module, name, cls(child.p).train())


def dropout(trials: int, batch: int, length: int, dtype: torch.dtype, data: str) -> dict:
    """Dropout p=0.1: one call on a (batch, length, hidden) activation, then whole training
    steps (full and lora, every dropout of the model one kind or the other), nn.Dropout (A)
    against lorafit's FastDropout (B)."""
    from profile_step import model_shapes
    from torch import nn

    from lorafit.dropout import FastDropout

    shape = model_shapes(batch, length)["activation"]
    x = torch.randn(*shape, dtype=dtype)
    plain, fast = nn.Dropout(0.1).train(), FastDropout(0.1).train()
    out = {"call": alternate(lambda: plain(x), lambda: fast(x), trials * 3), "shape": list(shape),
           "dtype": str(dtype), "a": "nn.Dropout (bernoulli_)", "b": "lorafit FastDropout (int64 words, 16-bit lanes)"}

    return {**out, **steps_side_by_side(_swap_dropouts, nn.Dropout, FastDropout, trials, batch, length, data)}


class _WhereApply(torch.autograd.Function):
    """The candidate: FastDropout's mask and scale applied as where(keep, x, 0) *= scale."""

    @staticmethod
    def forward(ctx, x, keep, scale):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.where(keep, x, 0.0).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad, 0.0).mul_(ctx.scale), None, None


def dropout_apply(trials: int, batch: int, length: int, data: str) -> dict:
    """lorafit's FastDropout (A, its mask applied by native_dropout_backward) against the
    same mask applied by where-and-scale (B): one forward + backward at the activation
    shape, their outputs and gradients compared, then whole training steps."""
    from profile_step import model_shapes

    from lorafit.dropout import FastDropout, keep_mask
    from lorafit.precision import resolve_precision

    class WhereApplyDropout(FastDropout):
        def forward(self, x):
            if not self.training or x.device.type != "cpu" or not 0 < self.p < 1:
                return super().forward(x)  # FastDropout's own rule: nn.Dropout off CPU
            keep, scale = keep_mask(x.shape, self.p)
            return _WhereApply.apply(x, keep, scale)

    precision = resolve_precision("auto", torch.device("cpu"))
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    shape = model_shapes(batch, length)["activation"]
    x = torch.randn(*shape, dtype=dtype)
    g = torch.randn_like(x)

    def call(cls, seed=None):
        drop = cls(0.1).train()

        def f():
            if seed is not None:
                torch.manual_seed(seed)
            leaf = x.clone().requires_grad_()
            y = drop(leaf)
            y.backward(g)
            return y.detach(), leaf.grad
        return f

    (ya, ga), (yb, gb) = call(FastDropout, 0)(), call(WhereApplyDropout, 0)()

    out = {"call": alternate(call(FastDropout), call(WhereApplyDropout), trials * 3), "shape": list(shape),
           "dtype": str(dtype), "bitwise_equal": bool(torch.equal(ya, yb) and torch.equal(ga, gb)),
           "a": "FastDropout, mask applied by aten.native_dropout_backward (lorafit)",
           "b": "FastDropout mask, where(keep, x, 0).mul_(scale) (candidate)"}
    return {**out, **steps_side_by_side(_swap_dropouts, FastDropout, WhereApplyDropout, trials, batch, length, data)}


def attention_fp32(trials: int, batch: int, length: int, data: str) -> dict:
    """Attention in fp32 under bf16 autocast (lorafit --attention sdpa-fp32) against SDPA as
    autocast gives it (bf16): SDPA forward + backward at the model's shape, then whole
    training steps (full and lora) with the model's attention one or the other."""

    from profile_step import model_shapes

    from lorafit.attention import set_attention

    shape = model_shapes(batch, length)["attention"]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*shape, generator=g, dtype=torch.bfloat16) for _ in range(3))
    grad = torch.randn(*shape, generator=g, dtype=torch.bfloat16)

    def kernel(fp32: bool):
        def f():
            a, b, c = ((x.float() if fp32 else x).requires_grad_() for x in (q.clone(), k.clone(), v.clone()))
            F.scaled_dot_product_attention(a, b, c).backward(grad.float() if fp32 else grad)
        return f

    out = {"kernel": alternate(kernel(False), kernel(True), trials), "shape": list(shape),
           "a": "SDPA on bf16 q, k, v (what autocast gives)", "b": "SDPA on fp32 q, k, v (--attention sdpa-fp32)"}
    return {**out, **steps_side_by_side(set_attention, "sdpa", "sdpa-fp32", trials, batch, length, data)}


def precision(trials: int, batch: int, length: int, data: str) -> dict:
    """bf16 autocast (A) against fp32 (B): lorafit.precision's timing of the linear layers
    (forward + backward at the model's shapes), then whole training steps of full and lora,
    bf16 with the attention kernel `--attention auto` picks under bf16, fp32 with SDPA."""
    from profile_step import build, model_shapes, step

    from lorafit.attention import resolve_attention, set_attention
    from lorafit.precision import BF16_MARGIN, time_linears

    cpu = torch.device("cpu")
    shapes = model_shapes(batch, length)
    linears = time_linears(*shapes["linears"], trials=trials)
    attn_bf16 = resolve_attention("auto", cpu, "bf16", shapes["attention"])
    out = {"linears": {**linears, "speedup_fp32_over_bf16": linears["bf16"] / linears["fp32"],
                       "auto_would_choose": "bf16" if linears["fp32"] >= BF16_MARGIN * linears["bf16"] else "fp32"},
           "bf16_attention": attn_bf16, "a": f"bf16 autocast (attention {attn_bf16})", "b": "fp32 (attention sdpa)",
           "batch": [batch, length]}
    for strategy in ("full", "lora"):
        model, opt, sched, inputs, labels = build(strategy, batch, length, data)
        model.train()

        def run(p: str):
            def f():
                set_attention(model, attn_bf16 if p == "bf16" else "sdpa")
                step(model, opt, sched, inputs, labels, p)
            return f

        out[f"{strategy}_step"] = alternate(run("bf16"), run("fp32"), max(3, trials // 2))
    return out


def first_token(trials: int, batch: int, length: int, data: str) -> dict:
    """The last layer on the first token only (lorafit.first_token, B) against the full
    last layer (A): eval forwards of a cls-pooled model (their logits compared), then whole
    training steps of full and lora."""
    from profile_step import build

    from lorafit.first_token import set_pruning

    model, _, _, inputs, _ = build("full", batch, length, data)
    model.eval()

    def forward(on: bool):
        def f():
            set_pruning(model, on)
            with torch.no_grad():
                return model(**inputs).logits
        return f

    out = {"eval_forward": alternate(forward(False), forward(True), trials),
           "max_abs_logit_difference": float((forward(False)() - forward(True)()).abs().max()),
           "a": "the full last layer (transformers)", "b": "the last layer on the first token (lorafit)",
           "batch": [batch, length]}
    return {**out, **steps_side_by_side(set_pruning, False, True, trials, batch, length, data)}


def fp16(trials: int, batch: int, length: int, data: str) -> dict:
    """fp32 (A) against fp16 autocast with a gradient scaler (B): fp16's matmul peak at
    the model's shapes (fp32's is the run's `matmul_peak`), then whole training steps of
    full and lora, SDPA attention in both, the scaler's unscale and finite check included."""
    from profile_step import build, step

    from lorafit.attention import set_attention

    out = {"fp16_matmul": measure(dtypes=(torch.float16,))["float16"], "batch": [batch, length],
           "a": "fp32 (attention sdpa)", "b": "fp16 autocast + GradScaler (attention sdpa)"}
    for strategy in ("full", "lora"):
        model, opt, sched, inputs, labels = build(strategy, batch, length, data)
        set_attention(model, "sdpa")
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        scaler = torch.amp.GradScaler("cpu")

        def half():
            with torch.autocast("cpu", dtype=torch.float16):
                logits = model(**inputs).logits
            scaler.scale(F.cross_entropy(logits.float(), labels)).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            scaler.step(opt)
            scaler.update()
            sched.step()
            opt.zero_grad(set_to_none=True)

        out[f"{strategy}_step"] = alternate(lambda: step(model, opt, sched, inputs, labels, "fp32"), half,
                                            max(3, trials // 2))
    return out


def training_step(strategy: str, trials: int, batch: int, length: int, data: str) -> dict:
    from profile_step import build, step

    from lorafit.precision import resolve_precision

    precision = resolve_precision("auto", torch.device("cpu"))
    model, opt, sched, inputs, labels = build(strategy, batch, length, data)
    model.train()

    def run(backend):
        def f():
            with sdpa_kernel(backend):
                step(model, opt, sched, inputs, labels, precision)
        return f

    out = alternate(run(SDPBackend.FLASH_ATTENTION), run(SDPBackend.MATH), trials)
    out["a"], out["b"] = f"{strategy} step, SDPA flash", f"{strategy} step, SDPA math"
    out["batch"], out["precision"] = [batch, length], precision
    return out


def main() -> None:
    from common import ARCHIVE
    from lorafit.precision import resolve_precision

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=7)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--data", default=ARCHIVE)
    ap.add_argument("--out", default="results/levers/levers.json")
    ap.add_argument("--levers",
                    default="adamw,attention,dropout,attention-fp32,precision,first-token,dropout-apply,fp16",
                    help="comma list; the others' entries already in --out are kept")
    args = ap.parse_args()
    chosen = args.levers.split(",")
    peak = measure()  # first, while this process is the only one working
    # the kernels are timed in the precision lorafit's runs compute in here (`--precision auto`)
    dtype = torch.bfloat16 if resolve_precision("auto", torch.device("cpu")) == "bf16" else torch.float32
    context = {"matmul_peak": peak, "cpu": cpu_model(), "flags": cpu_flags(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "command": "python " + " ".join(sys.argv), "trials": args.trials,
               "measured": time.strftime("%Y-%m-%d %H:%M")}
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    if "adamw" in chosen:
        result["adamw"] = {**adamw(args.trials), "context": context}
        print(json.dumps(result["adamw"]), flush=True)
    if "attention" in chosen:
        result["attention"] = {f"{length}": attention(args.trials, args.batch, length, dtype) for length in (128, 256)}
        result["step"] = {s: training_step(s, max(3, args.trials // 2), args.batch, args.length, args.data)
                          for s in ("full", "lora")}
        result["attention"]["context"] = result["step"]["context"] = context
        print(json.dumps([result["attention"], result["step"]]), flush=True)
    if "dropout" in chosen:
        result["dropout"] = {**dropout(args.trials, args.batch, args.length, dtype, args.data), "context": context}
        print(json.dumps(result["dropout"]), flush=True)
    if "attention-fp32" in chosen:
        result["attention_fp32"] = {**attention_fp32(args.trials, args.batch, args.length, args.data),
                                    "context": context}
        print(json.dumps(result["attention_fp32"]), flush=True)
    if "precision" in chosen:
        result["precision"] = {**precision(args.trials, args.batch, args.length, args.data), "context": context}
        print(json.dumps(result["precision"]), flush=True)
    if "first-token" in chosen:
        result["first_token"] = {**first_token(args.trials, args.batch, args.length, args.data), "context": context}
        print(json.dumps(result["first_token"]), flush=True)
    if "dropout-apply" in chosen:
        result["dropout_apply"] = {**dropout_apply(args.trials, args.batch, args.length, args.data),
                                   "context": context}
        print(json.dumps(result["dropout_apply"]), flush=True)
    if "fp16" in chosen:
        result["fp16"] = {**fp16(args.trials, args.batch, args.length, args.data), "context": context}
        print(json.dumps(result["fp16"]), flush=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
