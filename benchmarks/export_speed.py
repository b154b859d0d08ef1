"""Inference speed and test accuracy of a run and of its exports, side by side in one process.

    .venv/bin/python benchmarks/export_speed.py --run runs/default-lora --out results/export_speed

Systems, each from texts to logits (tokenizing included), on the run's test reviews:
  torch eager        lorafit's own path (lorafit.load_run(run).logits), in the precision the run recorded
  torch eager fp32   the same path forced to fp32, the precision every export computes in
  hf export          the `--format hf` folder in its library (sentence-transformers' encode, or transformers)
  onnx fp32 / int8   the `--format onnx --quantize int8` folder in ONNX Runtime (CPU provider, its default threads)

Batch 1 runs `--texts-b1` texts one by one; batch 32 runs `--texts-b32` texts in consecutive
chunks of 32 (lorafit's eval batch set to 32, so one chunk is one forward). The systems take
turns within each of `--rounds` rounds, and each figure is the median over rounds; the CPU's
bf16 and fp32 matmul peaks are measured in the same process. Test accuracy is each system's
on the whole test split (lorafit evaluate RUN or EXPORT; int8 through the same command).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import commit  # noqa: E402
import lorafit  # noqa: E402
from lorafit.data.text import clean_text  # noqa: E402
from lorafit.machine import cpu_model  # noqa: E402
from lorafit.runs import load_data  # noqa: E402


def systems(run_dir: Path, hf: Path, onnx: Path) -> dict:
    """name -> function(texts) -> logits (N, num_labels)."""
    import onnxruntime
    from transformers import AutoTokenizer

    eager = lorafit.load_run(run_dir)
    eager32 = lorafit.load_run(run_dir)
    eager32.precision = "fp32"
    for run in (eager, eager32):  # one chunk of 32 texts is one forward
        run.config = dataclasses.replace(run.config, eval_batch_size=32)
    hf_run = lorafit.load_run(hf)  # only for its layout's library object
    out = {f"torch eager ({eager.precision})": eager, "torch eager fp32": eager32}
    model = hf_run.model
    if hasattr(model, "st"):
        out["hf export (sentence-transformers)"] = lambda texts: model.st.encode(texts, batch_size=len(texts))
    else:
        tok_hf = AutoTokenizer.from_pretrained(hf)
        import torch

        def run_hf(texts):
            with torch.no_grad():
                return model(**tok_hf(texts, truncation=True, padding=True, return_tensors="pt")).logits.numpy()
        out["hf export (transformers)"] = run_hf
    tok = AutoTokenizer.from_pretrained(onnx)
    info = json.loads((onnx / "lorafit.json").read_text())
    for variant, file in info["onnx_files"].items():
        session = onnxruntime.InferenceSession(str(onnx / file), providers=["CPUExecutionProvider"])

        def run_onnx(texts, session=session):
            b = tok(texts, truncation=True, padding=True, return_tensors="np")
            feed = {n: (b[n] if n in b else np.zeros_like(b["input_ids"])).astype(np.int64) for n in info["inputs"]}
            return session.run(["logits"], feed)[0]
        out[f"onnx {variant}"] = run_onnx
    return {k: (v.logits if isinstance(v, lorafit.Run) else v) for k, v in out.items()}, eager


def texts_per_second(fn, texts: list[str], batch: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(texts), batch):
        fn(texts[i:i + batch])
    return len(texts) / (time.perf_counter() - start)


def accuracy(folder: Path) -> dict:
    r = subprocess.run([sys.executable, "-m", "lorafit", "evaluate", str(folder), "--no-progress"],
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a trained run folder (the default comparison's lora run)")
    ap.add_argument("--out", default="results/export_speed")
    ap.add_argument("--texts-b1", type=int, default=32)
    ap.add_argument("--texts-b32", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    from peak import measure

    run_dir = Path(args.run)
    work = Path(tempfile.mkdtemp(prefix="export-speed-"))
    t0 = time.perf_counter()
    hf = lorafit.export(run_dir, work / "hf").path
    onnx = lorafit.export(run_dir, work / "onnx", format="onnx", quantize="int8").path
    export_seconds = time.perf_counter() - t0
    fns, eager = systems(run_dir, hf, onnx)
    texts = [clean_text(t) for t in load_data(eager.config).test.texts]
    b1, b32 = texts[:args.texts_b1], texts[:args.texts_b32]
    for fn in fns.values():  # warm-up: first calls allocate and pick kernels
        fn(b1[:2])
        fn(b32[:32])
    rounds: dict[str, dict[str, list[float]]] = {k: {"batch1": [], "batch32": []} for k in fns}
    names = list(fns)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            rounds[name]["batch1"].append(texts_per_second(fns[name], b1, 1))
            rounds[name]["batch32"].append(texts_per_second(fns[name], b32, 32))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v['batch32'][-1]:.1f}/s" for k, v in rounds.items()), flush=True)
    peak = measure(trials=3, seconds=0.5)
    acc = {"torch eager": json.loads((run_dir / "final.json").read_text())["test_accuracy"]}
    hf_eval, onnx_eval = accuracy(hf), accuracy(onnx)
    acc.update({"hf export": hf_eval["test_accuracy"], "onnx fp32": onnx_eval["test_accuracy"],
                "onnx int8": onnx_eval["int8"]["test_accuracy"]})
    base = names[0]
    med = {k: {b: statistics.median(v[b]) for b in v} for k, v in rounds.items()}
    record = {
        "command": "benchmarks/export_speed.py " + " ".join(sys.argv[1:]),
        "commit": commit(),
        "cpu": cpu_model(), "peak": peak, "run": str(run_dir), "test_examples": hf_eval["examples"],
        "export_seconds": export_seconds, "texts_b1": len(b1), "texts_b32": len(b32), "rounds": rounds,
        "median_texts_per_s": med, "ratio_to_" + base.replace(" ", "_"): {
            k: {b: med[k][b] / med[base][b] for b in med[k]} for k in med},
        "test_accuracy": acc}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "export_speed.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"# Inference speed of a run and its exports\n\n`{record['command']}` at commit {record['commit']}\n",
             f"CPU: {record['cpu']}; matmul peak bf16 {peak['bfloat16']['peak_tflops']:.2f}, fp32 "
             f"{peak['float32']['peak_tflops']:.2f} TFLOP/s ({peak['threads']} threads)\n",
             f"| system | texts/s, batch 1 | texts/s, batch 32 | x {base}, batch 1 | x {base}, batch 32 |",
             "|---|---|---|---|---|"]
    for k in med:
        lines.append(f"| {k} | {med[k]['batch1']:.1f} | {med[k]['batch32']:.1f} | "
                     f"{med[k]['batch1'] / med[base]['batch1']:.2f} | {med[k]['batch32'] / med[base]['batch32']:.2f} |")
    lines += ["", f"Test accuracy on the run's {hf_eval['examples']} test reviews: " +
              ", ".join(f"{k} {v:.4f}" for k, v in acc.items())]
    (out / "export_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
