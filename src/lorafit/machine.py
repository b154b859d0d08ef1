"""Facts about the machine a run computes on: the CPU's name (by family and model), whether
it has bf16 matmul instructions, its measured matmul peak, and where lorafit keeps its caches.

Measurements and the choices made from them (lorafit.measured, lorafit.precision,
lorafit.attention) are keyed by these facts, and every run records its CPU in final.json.
"""

from __future__ import annotations

import os
import time
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` says; see `describe_cpu`."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            described = describe_cpu(f.read())
        if described:
            return described
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def describe_cpu(cpuinfo: str) -> str | None:
    """`<model name> (family F, model M)` from the first processor of a /proc/cpuinfo text,
    or None without a model name. A virtual machine often shows a generic name ("AMD EPYC"
    for both Zen 4 and Zen 5, whose bf16 matmul peaks differ about 2x), so the family and
    model numbers go with it: measurements made on different CPUs never share a key."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor's block is enough
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name")
    if not name:
        return None
    if fields.get("cpu family") and fields.get("model"):
        return f"{name} (family {fields['cpu family']}, model {fields['model']})"
    return name


@lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """True when the CPU has AMX-BF16 or AVX512-BF16 (bf16 matmul instructions)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def cache_root() -> Path:
    """$LORAFIT_CACHE, else $XDG_CACHE_HOME/lorafit, else ~/.cache/lorafit."""
    if os.environ.get("LORAFIT_CACHE"):
        return Path(os.environ["LORAFIT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lorafit"


def gemm_flops(m: int, k: int, n: int, dtype, trials: int = 5, seconds: float = 1.0) -> float:
    """Best FLOP/s over `trials` of (m x k) @ (k x n) in `dtype` (a torch dtype), each trial
    about `seconds` long (at least one product), after a warm-up of three products."""
    import torch

    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    c = torch.empty(m, n, dtype=dtype)
    for _ in range(3):
        torch.matmul(a, b, out=c)
    best = 0.0
    for _ in range(trials):
        reps, t = 0, time.perf_counter()
        while reps == 0 or time.perf_counter() - t < seconds:
            torch.matmul(a, b, out=c)
            reps += 1
        best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t))
    return best


PEAK_SIZE, PEAK_TRIALS, PEAK_SECONDS = 1536, 3, 0.2
"""The quick peak's square product and its trials: about 1.4 s for both dtypes on AMX, within 10% of
`benchmarks/peak.py`'s longer 2048 x 2048 measurement there (results/quick_peak/)."""


def matmul_peak() -> dict:
    """This CPU's matmul peak as a comparison measures it beside its times (a second or two):
    {"cpu", "threads", "bf16_tflops", "fp32_tflops", "method"}. A time means little without the
    CPU and what it multiplies at (bf16 is emulated, and slower than fp32, where the CPU has no
    bf16 instructions); `benchmarks/peak.py` measures longer and at the model's own shapes."""
    import torch

    n = PEAK_SIZE
    return {"cpu": cpu_model(), "threads": torch.get_num_threads(),
            "bf16_tflops": _quick_flops(n, torch.bfloat16) / 1e12, "fp32_tflops": _quick_flops(n, torch.float32) / 1e12,
            "method": f"{n}x{n}x{n} product, best of {PEAK_TRIALS} trials of ~{PEAK_SECONDS} s after a warm-up "
                      f"(one timed product where one takes longer than {PEAK_SECONDS} s)"}


def _quick_flops(n: int, dtype) -> float:
    """FLOP/s of an n-square product in `dtype`; where one product takes longer than a trial (an
    emulated dtype), the second product's rate, so the measurement stays within a few seconds."""
    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    t = time.perf_counter()
    torch.matmul(a, b)
    if time.perf_counter() - t < PEAK_SECONDS:
        return gemm_flops(n, n, n, dtype, PEAK_TRIALS, PEAK_SECONDS)
    t = time.perf_counter()
    torch.matmul(a, b)
    return 2 * n**3 / (time.perf_counter() - t)
