"""Facts about the machine a run computes on: the CPU's name (by family and model), whether
it has bf16 matmul instructions, and where lorafit keeps its caches.

Measurements and the choices made from them (lorafit.measured, lorafit.precision,
lorafit.attention) are keyed by these facts, and every run records its CPU in final.json.
"""

from __future__ import annotations

import os
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
