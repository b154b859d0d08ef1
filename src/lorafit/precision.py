"""Which precision a run computes in: bf16 autocast or fp32, measured on CPUs that have both.

A CPU with AVX512-BF16 or AMX runs bf16 matmuls, but that does not make them faster
than fp32 everywhere. Measured on this project's machines (benchmarks/peak.py,
results/levers.json): an AMD EPYC with AVX512-BF16 multiplies bf16 at 0.43 TFLOP/s
against 0.18 in fp32, while an Intel Xeon whose hypervisor exposes AVX512-BF16 but no
AMX runs oneDNN's bf16 kernel at 0.17 TFLOP/s against MKL's fp32 at 0.33, and there a
whole training step is about 1.5x faster in fp32. So a flag is not enough:

    fp32   no autocast
    bf16   bf16 autocast (parameters, gradients and optimizer state stay fp32)
    auto   on CUDA: bf16 where the GPU supports it. On a CPU without AVX512-BF16/AMX:
           fp32. On one with them: the run's linear layers are timed once, forward and
           backward at its shapes (tokens x hidden -> hidden, -> intermediate, and
           back), under bf16 autocast and in fp32, alternated, best of a few trials;
           bf16 only where it is at least 10% faster (`BF16_MARGIN`; on a near tie fp32
           wins: it is the more precise and skips autocast's casts). The decision is
           cached per CPU model, torch version, threads and shapes in
           $LORAFIT_CACHE/precision.json (delete it to decide again; --precision
           overrides).

A run records what it used (`precision_resolved` in config.json); resuming, evaluating
and predicting use the recorded precision, so a re-timing in between cannot change a
run's numerics.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from lorafit.machine import cpu_has_bf16

PRECISIONS = ("auto", "fp32", "bf16")
BF16_MARGIN = 1.10
"""bf16 is chosen when fp32's time is at least this multiple of bf16's."""
DEFAULT_DIMS = (4096, 384, 1536)
"""(tokens, hidden, intermediate) when no model is given: all-MiniLM-L6-v2 at 16 x 256."""


def time_linears(tokens: int, hidden: int, intermediate: int, trials: int = 3) -> dict[str, float]:
    """Best seconds, per precision, of forward + backward through three linear layers of
    an encoder block's shapes: (tokens, hidden) @ (hidden, hidden), (tokens, hidden) @
    (hidden, intermediate) and (tokens, intermediate) @ (intermediate, hidden), fp32
    weights and inputs as in a model; `bf16` runs them under bf16 autocast (its casts
    included), `fp32` without. The two alternate, trial by trial."""
    g = torch.Generator().manual_seed(0)
    layers = [(torch.randn(tokens, i, generator=g), (torch.randn(o, i, generator=g) / i ** 0.5).requires_grad_(),
               torch.randn(tokens, o, generator=g)) for i, o in ((hidden, hidden), (hidden, intermediate),
                                                                (intermediate, hidden))]

    def run(bf16: bool) -> float:
        t = time.perf_counter()
        for x, w, grad in layers:
            x = x.clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                y = F.linear(x, w)
            y.backward(grad.to(y.dtype))
            w.grad = None
        return time.perf_counter() - t

    from lorafit.measured import best_of_alternated

    return best_of_alternated({"bf16": lambda: run(True), "fp32": lambda: run(False)}, trials)


def model_dims(config, batch_size: int, max_length: int) -> tuple[int, int, int]:
    """(tokens, hidden, intermediate) of one process's batches for a transformers config;
    tokens capped at 4096 (the timing's cost grows with them, the ratio hardly does)."""
    hidden = getattr(config, "hidden_size", None) or getattr(config, "dim", None) or DEFAULT_DIMS[1]
    inter = getattr(config, "intermediate_size", None) or getattr(config, "hidden_dim", None) or 4 * hidden
    return min(batch_size * max_length, 4096), int(hidden), int(inter)


def resolve_precision(precision: str, device: torch.device, dims: tuple[int, int, int] | None = None) -> str:
    """`auto` -> `bf16` or `fp32` (see the module docstring); other choices as given.

    `dims` is (tokens, hidden, intermediate) of the run (`model_dims`); without it the
    default model's. On a CPU with bf16 instructions the first call per machine and dims
    times both (about 3 s at the default model's dims here) and caches the decision.
    """
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if not cpu_has_bf16():
        return "fp32"
    from lorafit.measured import cached_choice, machine_key

    dims = tuple(int(d) for d in (dims or DEFAULT_DIMS))

    def measure() -> dict:
        seconds = time_linears(*dims)
        return {"choice": "bf16" if seconds["fp32"] >= BF16_MARGIN * seconds["bf16"] else "fp32",
                "seconds": seconds, "margin": BF16_MARGIN}

    return cached_choice("precision", machine_key("linears " + "x".join(map(str, dims))), measure)
