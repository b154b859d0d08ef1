"""What `--lr auto` chose on the panel's runs, and what the search cost beside the run.

Reads every finished `--lr auto` run under a `benchmarks/panel.py --out` folder (runs made
with `--extra="... --lr auto" --tag TAG`, at `OUT/<dataset>/seed<N>/lora-<TAG>/`) and
writes one record per run: dataset, seed, tag, the rate chosen, each trial's rate,
validation loss and macro-F1, the search's seconds beside the run's training seconds, the
test macro-F1, and the CPU.

    .venv/bin/python benchmarks/studies/lr_auto.py --runs runs/lrauto --out results/recipe_lrauto/chosen.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
from common import study_main  # noqa: E402


def records(runs: Path) -> list[dict]:
    out = []
    for final_path in sorted(runs.glob("*/seed*/lora-*/final.json")):
        final = json.loads(final_path.read_text())
        search = final.get("lr_search")
        if not search:
            continue
        run = final_path.parent
        out.append({
            "dataset": run.parent.parent.name, "seed": int(run.parent.name.removeprefix("seed")),
            "tag": run.name.removeprefix("lora-"), "lr_chosen": final["lr"], "trials": search["trials"],
            "search_seconds": search["seconds"], "train_seconds": final["train_seconds"],
            "search_over_train": search["seconds"] / final["train_seconds"],
            "test_macro_f1": final["test_macro_f1"], "test_accuracy": final["test_accuracy"], "cpu": final["cpu"],
            "precision": final["precision"]})
    return out


def line(r: dict) -> str:
    trials = ", ".join(f"{t['lr']:g}: {t['val_loss'] if t['val_loss'] is None else round(t['val_loss'], 4)}"
                       for t in r["trials"])
    return (f"{r['dataset']} seed {r['seed']} {r['tag']}: lr {r['lr_chosen']:g} ({trials}) | test macro-F1 "
            f"{r['test_macro_f1']:.3f} | search {r['search_seconds']:.0f}s, {r['search_over_train']:.2f}x the "
            "run's training")


def main(argv: list[str] | None = None) -> int:
    return study_main(argv, __doc__, "benchmarks/studies/lr_auto.py", records, "--lr auto", line)


if __name__ == "__main__":
    sys.exit(main())
