"""What the benchmarks share: the full archive's path, the bench slice's flags, the check that
records read back come from this CPU, the commit recorded beside results, and the training
FLOPs a run computes.

The lasting tools (bench.py, peer.py, interleaved.py, peak.py, panel.py, panel_data.py) sit
beside this module; one-off studies whose findings are now defaults or rejections are in
studies/ and import it the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from peak import cpu_model

ARCHIVE = os.environ.get("LORAFIT_IMDB_ARCHIVE", "../shared/data/aclImdb_v1_labeled.tar.gz")
STRATEGIES = ("full", "last-two-layers", "lora")


def commit() -> str:
    """The short hash of the commit whose lorafit runs, recorded beside a benchmark's results:
    the checkout that holds the imported package (PYTHONPATH may point at another worktree
    than the current folder's), with "-dirty" where its package has uncommitted changes."""
    import lorafit

    where = str(Path(lorafit.__file__).resolve().parent)
    git = ["git", "-C", where]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--", "."], capture_output=True, text=True).stdout.strip()
    return head + ("-dirty" if head and dirty else "")


def add_slice_args(ap: argparse.ArgumentParser) -> None:
    """The bench slice's flags, shared by the benchmarks that measure on it: the archive,
    2,000 / 200 / 1,000 reviews for train / validation / test, max_length 256, batch 16."""
    ap.add_argument("--data", default=ARCHIVE,
                    help="the full IMDb archive (default: $LORAFIT_IMDB_ARCHIVE or %(default)s)")
    ap.add_argument("--train-size", type=int, default=2000)
    ap.add_argument("--val-size", type=int, default=200)
    ap.add_argument("--test-size", type=int, default=1000)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)


def same_cpu(made_on: str | None, record: Path) -> str:
    """`made_on`, the CPU a record read back was made on, where it is this machine's
    (cpu_model); else a clear exit: one benchmark's records all come from one CPU (two
    virtual machines both named "AMD EPYC" differ 2x in bf16 peak, and cpu_model tells
    them apart by family and model)."""
    here = cpu_model()
    if made_on != here:
        raise SystemExit(f"{record} was made on {made_on or 'an unrecorded CPU'}, but this machine is {here}: "
                         "a benchmark compares records of one CPU; pass a new --out (or run it on that CPU)")
    return made_on


def train_flops_per_token(strategy: str, cfg, avg_len: float, first_token: bool = False) -> float:
    """Approximate training FLOPs per token that a run computes: dense layers (6P full, 4P
    lora) plus attention. `first_token`: the last layer computes only its keys and values
    for every token (lorafit.first_token; the first token's own row is left out)."""
    h, layers, inter = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size
    full_layers = layers - 1 if first_token else layers
    dense = full_layers * (4 * h * h + 2 * h * inter) + (2 * h * h if first_token else 0)
    attention = 12 * full_layers * avg_len * h  # QK^T and AV, forward x3 for training
    return {"full": 6 * dense + attention, "lora": 4 * dense + attention}.get(strategy, 0.0)


def study_main(argv: list[str] | None, doc: str, script: str, records, what: str, line) -> int:
    """A read-back study's command line: `--runs` (a benchmarks/panel.py --out folder) and
    `--out` (the JSON file); writes {"command", "records": records(runs)} and prints
    line(record) per record; exit status 2, naming `what`, where no run was found."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--runs", type=Path, required=True, help="a benchmarks/panel.py --out folder")
    ap.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    args = ap.parse_args(argv)
    rows = records(args.runs)
    if not rows:
        print(f"no finished {what} run under {args.runs}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": f"{script} " + " ".join(argv or sys.argv[1:]),
                                    "records": rows}, indent=2) + "\n")
    for r in rows:
        print(line(r))
    return 0
