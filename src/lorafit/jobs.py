"""Runs of `lorafit train` in child processes, one after another, resumable: what
`compare` and `sweep` are made of. Each run gets a process of its own, so its peak
memory is its own and no state leaks from one run into the next.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from lorafit.errors import Interrupted, LorafitError
from lorafit.files import write_json


def compare_child(out: Path, strategy: str, no_progress: bool) -> list[str]:
    """The `lorafit train` command line for one strategy of a comparison in `out`."""
    run = out / strategy
    if (run / "checkpoint.safetensors").exists():
        child = ["train", "--resume", str(run)]
    else:  # not started, or stopped before its first checkpoint: (re)start it
        child = ["train", "--config", str(out / "config.json"), "--strategy", strategy, "--out", str(run),
                 "--overwrite"]
    return [sys.executable, "-m", "lorafit", *child, *(["--no-progress"] if no_progress else [])]


def with_nproc(argv: list[str], nproc: int) -> list[str]:
    return [*argv, "--nproc", str(nproc)] if nproc > 1 else argv


def run_child(argv: list[str], tick, every: float = 60.0) -> int:
    """Run a training child, calling `tick()` every `every` seconds while it runs (so a
    comparison killed abruptly still has its time on record); a SIGINT to us is passed
    on, and we wait while the child saves its checkpoint."""
    child = subprocess.Popen(argv)
    previous = signal.signal(signal.SIGINT, lambda *_: child.send_signal(signal.SIGINT))
    try:
        while True:
            try:
                return child.wait(timeout=every)
            except subprocess.TimeoutExpired:
                tick()
    finally:
        signal.signal(signal.SIGINT, previous)


def run_all(out: Path, names: list[str], argv_for, save_state, what: str, command: str) -> dict[str, dict]:
    """Run every not yet finished run `out/<name>` in its own process (its own peak-memory
    figure and a clean state), in order; returns each run's final.json, history and config."""
    results = {}
    for name in names:
        run = out / name
        if not (run / "final.json").exists():
            print(f"\n=== {name} ===", flush=True)
            save_state()
            rc = run_child(argv_for(name), save_state)
            if rc == 130:
                raise Interrupted(f"the {what} stopped during {name}; continue with: lorafit {command} --resume {out}")
            if rc != 0:
                raise LorafitError(f"the {name} run failed (exit status {rc}); see its output above; "
                                   f"after fixing the cause, continue with: lorafit {command} --resume {out}")
        results[name] = {
            "final": json.loads((run / "final.json").read_text()),
            "history": [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line],
            "config": json.loads((run / "config.json").read_text()),
        }
    return results


def run_invocation(out: Path, state: dict, state_path: Path, names: list[str], argv_for, what: str, command: str,
                   invocation: str) -> tuple[dict[str, dict], float]:
    """One invocation (`invocation`, its command line) of a comparison or sweep: recorded in
    `state`, which is saved to `state_path` with the invocation's running seconds as it goes,
    while `run_all` runs what is unfinished. Returns the results and the wall seconds of every
    invocation so far."""
    state["invocations"].append({"command": invocation, "seconds": 0.0})
    t0 = time.perf_counter()

    def save_state() -> None:
        state["invocations"][-1]["seconds"] = time.perf_counter() - t0
        write_json(state_path, state)

    try:
        results = run_all(out, names, argv_for, save_state, what, command)
    finally:
        save_state()
    return results, sum(i["seconds"] for i in state["invocations"])
