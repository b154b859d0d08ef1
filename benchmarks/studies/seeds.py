"""Test accuracy over seeds and settings on the benchmark's slice, lorafit and optionally the peer.

One benchmark row is one seed; on 1,000 test reviews one standard error is ~1.1 points,
as large as the accuracy criterion. This runs `lorafit train` (and with --peer,
benchmarks/peer.py) on the same slice as benchmarks/bench.py for each seed, each in its
own process, and adds one record per run to results/seeds/seeds.json (kept across
invocations, so the study can be extended a run at a time):

    .venv/bin/python benchmarks/studies/seeds.py --strategy lora --seeds 1,2
    .venv/bin/python benchmarks/studies/seeds.py --strategy lora --seeds 0 --extra="--attn-dropout 0.1"
    .venv/bin/python benchmarks/studies/seeds.py --strategy lora --seeds 1 --peer
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py, peak.py
from common import ARCHIVE  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--strategy", default="lora")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    ap.add_argument("--extra", default="", help="extra `lorafit train` flags, e.g. '--attn-dropout 0.1'")
    ap.add_argument("--peer", action="store_true", help="run the peer (transformers + PEFT) instead of lorafit")
    ap.add_argument("--data", default=ARCHIVE)
    ap.add_argument("--out", type=Path, default=Path("runs/seeds"))
    ap.add_argument("--results", type=Path, default=Path("results/seeds/seeds.json"))
    args = ap.parse_args()

    from lorafit.config import RunConfig
    from lorafit.strategies import learning_rate

    # The benchmark's slice and settings (benchmarks/bench.py defaults).
    common = ["--data", args.data, "--train-size", "2000", "--val-size", "200", "--test-size", "1000",
              "--max-length", "256", "--epochs", "3", "--batch-size", "16"]
    lr = learning_rate(RunConfig(strategy=args.strategy))
    records = json.loads(args.results.read_text())["runs"] if args.results.exists() else []
    for seed in (int(s) for s in args.seeds.split(",")):
        t = time.perf_counter()
        if args.peer:
            out = subprocess.run([sys.executable, str(Path(__file__).with_name("peer.py")), "--strategy",
                                  args.strategy, *common, "--lr", str(lr), "--seed", str(seed)],
                                 check=True, capture_output=True, text=True)
            acc = json.loads(out.stdout.strip().splitlines()[-1])["test_accuracy"]
        else:
            run = args.out / f"{args.strategy}-seed{seed}-{'_'.join(shlex.split(args.extra)) or 'default'}"
            subprocess.run([sys.executable, "-m", "lorafit", "train", "--strategy", args.strategy, *common,
                            "--seed", str(seed), *shlex.split(args.extra), "--out", str(run), "--overwrite",
                            "--no-progress"], check=True)
            final = json.loads((run / "final.json").read_text())
            acc = final["test_accuracy"]
        rec = {"who": "peer" if args.peer else "lorafit", "strategy": args.strategy, "seed": seed,
               "extra": args.extra, "lr": lr, "test_accuracy": acc, "seconds": round(time.perf_counter() - t, 1),
               "measured": time.strftime("%Y-%m-%d %H:%M")}
        records = [r for r in records if (r["who"], r["strategy"], r["seed"], r["extra"])
                   != (rec["who"], rec["strategy"], rec["seed"], rec["extra"])] + [rec]
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps({"slice": common, "runs": records}, indent=2) + "\n")
        print(json.dumps(rec), flush=True)

    groups: dict[tuple, list[float]] = {}
    for r in records:
        groups.setdefault((r["who"], r["strategy"], r["extra"]), []).append(r["test_accuracy"])
    for (who, strategy, extra), accs in sorted(groups.items()):
        sd = statistics.stdev(accs) if len(accs) > 1 else float("nan")
        print(f"{who:8s} {strategy:16s} {extra or '(defaults)':24s} n={len(accs)} "
              f"mean {statistics.mean(accs):.4f} sd {sd:.4f}  {accs}")


if __name__ == "__main__":
    main()
