"""What `--head-init probe` fitted on the panel's runs, and what the fit cost beside the run.

Reads every finished run under a `benchmarks/panel.py --out` folder whose config.json
records a probe-fitted head (`head_init_probe`; runs made with `--extra=--head-init=probe
--tag TAG`, at `OUT/<dataset>/seed<N>/<strategy>-<TAG>/`) and writes one record per run:
dataset, seed, folder, the L2 strength chosen, the probe's validation loss, the fit's
seconds beside the run's training seconds, the test macro-F1, and the CPU.

    .venv/bin/python benchmarks/studies/head_init.py --runs runs/headinit --out results/recipe_headinit/fits.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
from common import study_main  # noqa: E402


def records(runs: Path) -> list[dict]:
    out = []
    for final_path in sorted(runs.glob("*/seed*/*/final.json")):
        run = final_path.parent
        fit = json.loads((run / "config.json").read_text()).get("head_init_probe")
        if not fit:
            continue
        final = json.loads(final_path.read_text())
        out.append({
            "dataset": run.parent.parent.name, "seed": int(run.parent.name.removeprefix("seed")), "run": run.name,
            "l2": fit["l2"], "probe_val_loss": fit["val_loss"], "fit_seconds": fit["seconds"],
            "train_seconds": final["train_seconds"], "fit_over_train": fit["seconds"] / final["train_seconds"],
            "test_macro_f1": final["test_macro_f1"], "test_accuracy": final["test_accuracy"], "cpu": final["cpu"],
            "precision": final["precision"]})
    return out


def line(r: dict) -> str:
    return (f"{r['dataset']} seed {r['seed']} {r['run']}: l2 {r['l2']:g}, probe validation loss "
            f"{r['probe_val_loss']:.3f} | test macro-F1 {r['test_macro_f1']:.3f} | fit {r['fit_seconds']:.1f}s, "
            f"{r['fit_over_train']:.2f}x the run's training")


def main(argv: list[str] | None = None) -> int:
    return study_main(argv, __doc__, "benchmarks/studies/head_init.py", records, "--head-init probe", line)


if __name__ == "__main__":
    sys.exit(main())
