"""Decisions a machine measures once: a small JSON cache in $LORAFIT_CACHE.

lorafit picks some settings by timing both candidates on the machine at hand (the
attention kernel, the CPU precision). A decision is kept per key (CPU model, torch
version, threads, shape) in `$LORAFIT_CACHE/<name>.json`, so a machine decides once;
delete the file to decide again.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path


def cache_path(name: str) -> Path:
    """$LORAFIT_CACHE/<name>.json (see lorafit.machine.cache_root)."""
    from lorafit.machine import cache_root

    return cache_root() / f"{name}.json"


def machine_key(*parts: object) -> str:
    """`<CPU model> | torch <version> | <threads> threads | <parts joined by ' | '>`."""
    import torch

    from lorafit.machine import cpu_model

    return " | ".join([cpu_model(), f"torch {torch.__version__}", f"{torch.get_num_threads()} threads",
                       *map(str, parts)])


def best_of_alternated(runs: dict[str, Callable[[], float]], trials: int) -> dict[str, float]:
    """Best seconds of each candidate: `runs[name]()` times one go and returns its seconds;
    after one warm-up go each, the candidates alternate, trial by trial (a machine's speed
    drifts, so side by side is the only fair timing)."""
    for run in runs.values():
        run()
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(trials):
        for name, run in runs.items():
            best[name] = min(best[name], run())
    return best


def cached_choice(name: str, key: str, measure: Callable[[], dict]) -> str:
    """The cached `choice` for `key` in `<name>.json`; else `measure()` (a dict with a
    `choice` and whatever it timed), stored with the time it was measured, then returned.
    A cache that cannot be read is measured afresh; one that cannot be written is skipped
    (the machine decides again next time)."""
    path = cache_path(name)
    try:
        cache = json.loads(path.read_text())
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        cache = {}
    entry = cache.get(key)
    if not isinstance(entry, dict) or "choice" not in entry:
        entry = {**measure(), "measured": time.strftime("%Y-%m-%d %H:%M")}
        cache[key] = entry
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache, indent=2) + "\n")
            tmp.replace(path)
        except OSError:
            pass
    return entry["choice"]
