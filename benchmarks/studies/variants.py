"""LoRA variants against plain LoRA on the benchmark's slice, over seeds.

Each (variant, seed) is one `lorafit train` run in its own process and folder under
--out (2,000 training / 200 validation / 1,000 test reviews from the full archive,
max_length 256, 3 epochs, the lora defaults otherwise). The study is resumable: a
finished run is read back, a cut-off one continues from its checkpoint, so it can be
spread over several sessions:

    .venv/bin/python benchmarks/studies/variants.py                       # all variants, seeds 0,1,2
    .venv/bin/python benchmarks/studies/variants.py --variants dora --seeds 0

It writes results/variants/variants.json (one record per run, with the CPU it ran on) and
results/variants/variants.md (mean and spread of test accuracy per variant, samples/s, peak RSS).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py, peak.py
from common import ARCHIVE  # noqa: E402
from peak import cpu_model  # noqa: E402

VARIANTS = {
    "lora": [],
    "dora": ["--dora"],
    "lora+": ["--lora-plus-ratio", "16"],
    "pissa": ["--init", "pissa"],
}


def run_once(name: str, seed: int, data: str, out: Path) -> Path:
    """Train (or resume, or read back) one variant at one seed; returns its run folder."""
    run = out / f"{name}-seed{seed}"
    if (run / "final.json").exists():
        return run
    common = ["--strategy", "lora", "--data", data, "--train-size", "2000", "--val-size", "200", "--test-size",
              "1000", "--max-length", "256", "--epochs", "3", "--batch-size", "16", "--seed", str(seed),
              "--checkpoint-every", "50", *VARIANTS[name]]
    if (run / "checkpoint.safetensors").exists():
        argv = ["train", "--resume", str(run)]
    else:
        argv = ["train", *common, "--out", str(run), "--overwrite"]
    subprocess.run([sys.executable, "-m", "lorafit", *argv, "--no-progress"], check=True)
    return run


def record(name: str, seed: int, run: Path) -> dict:
    final = json.loads((run / "final.json").read_text())
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
    seen = sum(r["samples_per_s"] * r["seconds"] for r in rows)
    return {"variant": name, "flags": VARIANTS[name], "seed": seed, "test_accuracy": final["test_accuracy"],
            "test_f1": final["test_f1"], "trainable_params": final["trainable_params"],
            "samples_per_s": seen / sum(r["seconds"] for r in rows), "peak_memory_mb": final["peak_memory_mb"],
            "saved_bytes": final["saved_bytes"], "precision": final["precision"], "cpu": cpu_model(),
            "resumed": final.get("resumed", False), "run": str(run)}


def table(records: list[dict]) -> str:
    lines = ["| variant | flags | seeds | test acc mean | sd | per seed | trainable | samples/s | peak RSS | CPU |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in VARIANTS:
        rs = sorted((r for r in records if r["variant"] == name), key=lambda r: r["seed"])
        if not rs:
            continue
        accs = [r["test_accuracy"] for r in rs]
        sd = f"{statistics.stdev(accs):.4f}" if len(accs) > 1 else "-"
        lines.append(
            f"| {name} | `{' '.join(rs[0]['flags']) or '(defaults)'}` | {','.join(str(r['seed']) for r in rs)} | "
            f"{statistics.mean(accs):.4f} | {sd} | {' / '.join(f'{a:.3f}' for a in accs)} | "
            f"{rs[0]['trainable_params']:,} | {statistics.mean(r['samples_per_s'] for r in rs):.1f} | "
            f"{max(r['peak_memory_mb'] for r in rs):,.0f} MB | {'; '.join(sorted({r['cpu'] for r in rs}))} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--data", default=ARCHIVE)
    ap.add_argument("--out", type=Path, default=Path("runs/variants"))
    ap.add_argument("--results", type=Path, default=Path("results/variants/variants.json"))
    args = ap.parse_args()
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"error: unknown variant {unknown[0]}; choose from {', '.join(VARIANTS)}")
    records = json.loads(args.results.read_text())["runs"] if args.results.exists() else []
    for seed in (int(s) for s in args.seeds.split(",")):  # seed-major: every variant gets seed 0 first
        for name in names:
            t = time.perf_counter()
            rec = record(name, seed, run_once(name, seed, args.data, args.out))
            records = [r for r in records if (r["variant"], r["seed"]) != (name, seed)] + [rec]
            args.results.parent.mkdir(parents=True, exist_ok=True)
            args.results.write_text(json.dumps({"runs": records}, indent=2) + "\n")
            args.results.with_suffix(".md").write_text(table(records))
            print(f"{name} seed {seed}: test acc {rec['test_accuracy']:.4f} "
                  f"({time.perf_counter() - t:.0f}s)", flush=True)
    print(table(records))


if __name__ == "__main__":
    main()
