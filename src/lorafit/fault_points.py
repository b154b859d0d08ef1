"""Named points where a crash-safety test can stop a real run, exactly there.

A kill "somewhere in epoch 2" sent from outside lands wherever the scheduler lets it;
to test that a run resumes exactly from *any* point (mid-epoch, during validation,
in the middle of a checkpoint write), the test names the point instead:

    LORAFIT_SIGNAL_AT="validation@2:KILL"        SIGKILL on the 2nd validation pass
    LORAFIT_SIGNAL_AT="step@15:INT,write:checkpoint.safetensors@3:KILL"

Each entry is `<point>@<n>:<SIGNAL>[:rank<r>]`: on the n-th time this process reaches
`point`, it sends itself SIGNAL (KILL, INT, TERM, STOP); with `:rank<r>`, only the
process of that rank in a distributed job does (`step@3:KILL:rank1`). The points
lorafit marks:

- `step`: right after an optimizer step (and its mid-epoch checkpoint, if one is due);
- `validation`: during a validation pass, after its first batch;
- `write:<file name>`: during an atomic write of that file, after the temporary file
  is complete and before it replaces the old one.

Unset (the normal case) it costs one dictionary lookup per call.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "LORAFIT_SIGNAL_AT"
_reached: Counter[str] = Counter()


def _plan() -> dict[tuple[str, int], signal.Signals]:
    spec = os.environ.get(ENV, "")
    plan = {}
    rank = "rank" + os.environ.get("RANK", "0")
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        where, _, sig = entry.rpartition(":")
        if sig.startswith("rank"):
            if sig != rank:
                continue
            where, _, sig = where.rpartition(":")
        point, _, n = where.rpartition("@")
        plan[(point, int(n))] = signal.Signals[f"SIG{sig.upper()}"]
    return plan


def reached(point: str) -> None:
    """Mark that the run is at `point`; send the planned signal, if any, to this process."""
    if ENV not in os.environ:
        return
    _reached[point] += 1
    sig = _plan().get((point, _reached[point]))
    if sig is not None:
        os.kill(os.getpid(), sig)
