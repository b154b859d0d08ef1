"""A `lorafit serve` process whose models are one of the systems the load benchmark compares,
all behind lorafit's HTTP layer and batcher (benchmarks/serve_load.py starts it):

  lorafit   lorafit serve as users get it: the runs share one base (lorafit.served)
  peft      PEFT's LoRA with every adapter loaded into one model, mixed batches through its
            `adapter_names=` forward (lorafit's mean pooling applied to its base, as the runs trained)
  merged    one merged transformers model per adapter (lorafit.load_run of each run)
  threaded  lorafit serve with the adapters' updates on every intra-op thread
            (lorafit.lora.SERVED_UPDATES_ON_ONE_THREAD off): what that setting buys under load

    python benchmarks/serve_peer.py --system peft --port 8081 NAME=RUN ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lorafit.serve import ServeSettings, create_app  # noqa: E402
from lorafit.serve_models import Registry, Served, Solo, pad  # noqa: E402


class PeftEngine:
    """Every run's adapter in one PEFT model; a batch's rows name theirs (`adapter_names=`)."""

    def __init__(self, runs: dict[str, Path]) -> None:
        from peft import PeftModel

        from lorafit.models import load_model
        from lorafit.pooling import apply_pooling
        from lorafit.runs import read_run_config, run_num_labels
        import json

        first = next(iter(runs.values()))
        cfg = read_run_config(first)
        raw = json.loads((first / "config.json").read_text())
        loaded = load_model(cfg.model, num_labels=run_num_labels(raw), pooling="cls")
        from lorafit.first_token import set_pruning

        set_pruning(loaded.model, False)
        apply_pooling(loaded.model, raw.get("pooling_resolved", "cls"))
        names = list(runs)
        model = PeftModel.from_pretrained(loaded.model, str(runs[names[0]] / "adapter"), adapter_name=names[0])
        for n in names[1:]:
            model.load_adapter(str(runs[n] / "adapter"), adapter_name=n)
        self.model = model.eval()
        self.tokenizer = loaded.tokenizer
        self.pad_id = loaded.tokenizer.pad_token_id or 0

    @torch.no_grad()
    def forward(self, names: list[str], rows: list[list[int]]) -> list[torch.Tensor]:
        ids, mask = pad(rows, self.pad_id)
        return list(self.model(input_ids=ids, attention_mask=mask, adapter_names=names).logits.float())


def registry_for(system: str, runs: dict[str, Path]) -> Registry:
    registry = Registry()
    if system == "threaded":
        import lorafit.lora

        lorafit.lora.SERVED_UPDATES_ON_ONE_THREAD = False
    if system in ("lorafit", "threaded"):
        for n, p in runs.items():
            registry.add(n, p)
    elif system == "merged":
        for n, p in runs.items():
            solo = Solo(p)
            solo.run.precision = "fp32"
            registry.served[n] = Served(n, solo, solo.run.tokenizer, solo.run.config.max_length, solo.run.label_names,
                                        p, "model")
    else:
        engine = PeftEngine(runs)
        import lorafit

        labels = lorafit.load_run(next(iter(runs.values()))).label_names
        for n, p in runs.items():
            registry.served[n] = Served(n, engine, engine.tokenizer, 256, labels, p, "adapter")
    return registry


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--system", choices=("lorafit", "peft", "merged", "threaded"), required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("runs", nargs="+", metavar="NAME=RUN")
    args = ap.parse_args()
    import uvicorn

    runs = {spec.split("=", 1)[0]: Path(spec.split("=", 1)[1]) for spec in args.runs}
    app = create_app(registry_for(args.system, runs), ServeSettings())
    print("ready", flush=True)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
