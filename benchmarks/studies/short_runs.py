"""Do short lorafit runs learn as fast as the tuned peer's? lora, 2 epochs, 600 reviews, every seed.

Each (setting, seed) is one process: lorafit (`lorafit train`) or the tuned peer
(benchmarks/peer.py --tuned), on the same 600 training / 400 test reviews of the full
archive (lorafit also carves 100 validation reviews, which the peer does not use), max_length 256,
batch 16. Resumable: a finished (setting, seed) is read back from --out, where it
was made on this CPU.

    .venv/bin/python benchmarks/studies/short_runs.py [--settings lorafit,peer-tuned] [--seeds 0,1,2,3,4]

Writes results/short_runs/short_runs.json (every run) and results/short_runs/short_runs.md (per setting: mean
and every seed's test accuracy, the training loss after epoch 1).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py, peak.py
from common import ARCHIVE, same_cpu  # noqa: E402
from peak import cpu_model  # noqa: E402

DATA = ["--train-size", "600", "--val-size", "100", "--test-size", "400", "--max-length", "256", "--epochs", "2",
        "--batch-size", "16"]
# name -> (runner, extra flags, what it is)
SETTINGS = {
    "lorafit": ("lorafit", ["--pooling", "cls"], "lorafit's defaults: lr 2e-3, 10% warm-up then linear decay; "
                "the first token's head, as the peer's"),
    "lorafit-mean": ("lorafit", ["--pooling", "mean"], "as lorafit, the head on the mean of the tokens"),
    "peer-tuned": ("peer", ["--lr", "2e-3"], "tuned peer, lorafit's recipe: lr 2e-3, 10% warm-up then linear decay"),
    "peer-tuned-constant": ("peer", ["--lr", "1e-3", "--constant-lr"], "tuned peer, constant lr 1e-3"),
}


def run(name: str, seed: int, out: Path, data: str) -> dict:
    path = out / f"{name}-seed{seed}.json"
    if path.exists():  # read back only where it was made on this CPU
        rec = json.loads(path.read_text())
        same_cpu(rec.get("cpu"), path)
        return rec
    runner, extra, _ = SETTINGS[name]
    common = ["--data", data, *DATA, "--seed", str(seed), *extra]
    if runner == "lorafit":
        run_dir = out / f"{name}-seed{seed}"
        subprocess.run([sys.executable, "-m", "lorafit", "train", "--strategy", "lora", *common, "--no-progress",
                        "--out", str(run_dir), "--overwrite"], check=True)
        final = json.loads((run_dir / "final.json").read_text())
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
        rec = {"test_accuracy": final["test_accuracy"], "train_loss": [r["train_loss"] for r in rows],
               "samples_per_s": sum(r["samples_per_s"] * r["seconds"] for r in rows) / sum(r["seconds"] for r in rows),
               "lr": final["lr"]}
    else:
        p = subprocess.run([sys.executable, str(Path(__file__).with_name("peer.py")), "--strategy", "lora", "--tuned",
                            *common], check=True, capture_output=True, text=True)
        peer = json.loads(p.stdout.strip().splitlines()[-1])
        rec = {k: peer[k] for k in ("test_accuracy", "train_loss", "samples_per_s", "lr")}
    rec.update(setting=name, seed=seed, cpu=cpu_model())
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec, indent=2) + "\n")
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--data", default=ARCHIVE)
    ap.add_argument("--out", default="runs/short_runs")
    ap.add_argument("--results", default="results/short_runs/short_runs")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    names = args.settings.split(",")
    records = []
    for seed in seeds:  # seed-major, so a cut-off study has every setting at the first seeds
        for name in names:
            records.append(run(name, seed, Path(args.out), args.data))
            print(json.dumps(records[-1]), flush=True)
    Path(args.results + ".json").write_text(json.dumps({"cpu": cpu_model(), "data": DATA, "records": records},
                                                       indent=2) + "\n")
    lines = [f"lora, 2 epochs, 600 training / 400 test reviews, max_length 256, batch 16; CPU {cpu_model()}", "",
             "| setting | what | seeds | test acc mean | per seed | train loss after epoch 1 (mean) |",
             "|---|---|---|---|---|---|"]
    for name in names:
        rs = sorted((r for r in records if r["setting"] == name), key=lambda r: r["seed"])
        accs = [r["test_accuracy"] for r in rs]
        lines.append(f"| {name} | {SETTINGS[name][2]} | {len(rs)} | {statistics.mean(accs):.4f} | "
                     f"{', '.join(f'{a:.3f}' for a in accs)} | "
                     f"{statistics.mean(r['train_loss'][0] for r in rs):.4f} |")
    Path(args.results + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
