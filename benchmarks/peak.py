"""This CPU's matmul peak, measured with care: the denominator of every MFU figure.

Best of several timed trials (each ~`seconds` after a warm-up), at 2048^2 and at the
model's own GEMM shapes (tokens x hidden x hidden, tokens x hidden x intermediate and
back), in the calling process, which should be otherwise idle: run it first, before any
model is loaded or any child process starts. The CPU model goes with the figure.

    .venv/bin/python benchmarks/peak.py            # prints JSON
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from lorafit.machine import cpu_model, gemm_flops  # one definition; the other benchmarks import them from here


def cpu_flags() -> list[str]:
    """The matmul-relevant ISA flags: AMX and AVX512 bf16/fp16."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in flags if f.startswith("amx") or f in ("avx512_bf16", "avx512_fp16", "avx512f"))


def model_shapes(tokens: int = 16 * 256, hidden: int = 384, intermediate: int = 1536) -> dict[str, tuple]:
    """The encoder's training GEMMs for a batch of `tokens` tokens (all-MiniLM-L6-v2 by default)."""
    return {"square 2048": (2048, 2048, 2048),
            f"qkvo {tokens}x{hidden}x{hidden}": (tokens, hidden, hidden),
            f"ffn up {tokens}x{hidden}x{intermediate}": (tokens, hidden, intermediate),
            f"ffn down {tokens}x{intermediate}x{hidden}": (tokens, intermediate, hidden)}


def measure(dtypes=(torch.bfloat16, torch.float32), trials: int = 5, seconds: float = 1.0, **shape_kw) -> dict:
    """{"cpu", "flags", "threads", "<dtype>": {"peak_tflops", "per_shape": {name: TFLOP/s}}}."""
    out: dict = {"cpu": cpu_model(), "flags": cpu_flags(), "threads": torch.get_num_threads(),
                 "cores": os.cpu_count(), "method": f"best of {trials} trials of ~{seconds}s each, after a warm-up"}
    for dtype in dtypes:
        per = {name: gemm_flops(*mkn, dtype, trials, seconds) / 1e12 for name, mkn in model_shapes(**shape_kw).items()}
        out[str(dtype).removeprefix("torch.")] = {"peak_tflops": max(per.values()), "per_shape": per}
    return out


if __name__ == "__main__":
    print(json.dumps(measure(), indent=2))
