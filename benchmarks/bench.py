"""lorafit against two peers (transformers + PEFT), side by side, on one data slice.

For each strategy and seed: lorafit (`lorafit train`, in the precision `--precision
auto` measures faster on this CPU, length buckets, frozen-prefix cache), the **typical**
peer as its users write it (benchmarks/peer.py: padding to max_length, fp32, the model's
attention dropout 0.1) and the **tuned** peer (peer.py --tuned: the precision lorafit's
run used, length-grouped batches padded to their longest, lorafit's attention dropout 0,
fused AdamW), each in its own process, on the same data, model, max_length, epochs,
batch size, learning rate, schedule and clipping. Prints and writes (results/bench/bench.json,
results/bench/bench.md) training samples/s and tokens/s, wall time, peak memory and test
accuracy with the ratios against each peer; this CPU's matmul peak measured first, in
this process, with care (benchmarks/peak.py); the model FLOP utilisation of lorafit and
the tuned peer against it; and the inference throughput of a merged LoRA model against
the base model. Speed is from the first seed's runs; accuracy is the mean over --seeds
(the typical peer's over its first --typical-seeds, as its accuracy is context only).
Resumable: a finished lorafit run or peer record in --out is read back (each records its
CPU model, by family and model; one made on another CPU stops the run), and so are the
matmul peak and the merged-inference timing (matmul_peak.json, merged.json: measured
once, by the invocation that began the records). The tuned peer computes in the
precision lorafit's run used (`--precision auto` measures it per CPU). `--records-only`
runs only the records (accuracy seeds, e.g. two processes side by side:
`OMP_NUM_THREADS=1 ... --seeds 1 --records-only --typical-seeds 0`). lorafit runs on its
defaults, as a user gets it: `--pooling auto`, which is mean pooling for the default model
(all-MiniLM-L6-v2 was trained for it), while the peers' transformers heads read the first
token; `--pooling cls` gives both sides the first token's head (and lorafit its first-token
last layer). Each system's whole process (start, imports, model and data loading,
tokenizing, training, test) is timed from outside, next to the training loop's rate.

    .venv/bin/python benchmarks/bench.py [--train-size 2000 --test-size 1000 --epochs 3 --seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import ARCHIVE, STRATEGIES, add_slice_args, same_cpu, train_flops_per_token  # noqa: F401
from peak import cpu_model, measure

def merged_vs_base(run: Path, data_args: dict, max_length: int, passes: int = 3) -> dict:
    """Inference samples/s of the trained LoRA model in three forms, and of the base model.

    `unloaded`: adapters merged and the plain `nn.Linear`s put back (`unload_lora`);
    `merged`: adapters merged in place, LoRA layers kept (what `lorafit evaluate` runs);
    `unmerged`: the adapter branch computed on every forward; `base`: the pretrained model.
    This machine's speed drifts by tens of percent within a minute, so the four are timed
    batch by batch (batches of 64 of the test slice, bf16 where available), in an order
    that rotates from one batch to the next, over `passes` passes; each rate is all
    samples over the summed forward times.
    """
    from lorafit.data import load_dataset
    from lorafit.data.batching import bucketed_batches
    from lorafit.data.encoding import encode_split
    from lorafit.lora import merge_lora, unload_lora
    from lorafit.models import load_model
    from lorafit.runs import load_trained
    from lorafit.precision import resolve_precision
    from lorafit.training import autocast

    _, loaded = load_trained(run)  # read once; the other forms are copies
    pooling = json.loads((run / "final.json").read_text()).get("pooling", "cls")
    merged = copy.deepcopy(loaded.model)
    merge_lora(merged)
    models = {"unloaded": unload_lora(copy.deepcopy(loaded.model)), "merged": merged, "unmerged": loaded.model,
              # the base model read as the run reads it (its pooling; cls turns on the first-token last layer)
              "base": load_model(None, pooling=pooling).model}
    for m in models.values():
        m.eval()
    tok = loaded.tokenizer
    enc = encode_split(load_dataset(**data_args).test, tok, max_length)
    device = torch.device("cpu")
    precision = resolve_precision("auto", device)
    batches = bucketed_batches(enc.lengths, 64, seed=0, shuffle=False)
    names = list(models)
    seconds = dict.fromkeys(names, 0.0)
    with torch.no_grad():
        for m in models.values():  # warm-up
            with autocast(device, precision):
                m(**enc.batch(batches[0], tok.pad_token_id))
        for p in range(passes):
            for i, b in enumerate(batches):
                inputs = enc.batch(b, tok.pad_token_id)
                k0 = (i + p) % len(names)
                for name in names[k0:] + names[:k0]:
                    t = time.perf_counter()
                    with autocast(device, precision):
                        models[name](**inputs)
                    seconds[name] += time.perf_counter() - t
    rate = {k: passes * len(enc) / s for k, s in seconds.items()}
    return {"merged_samples_per_s": rate["merged"], "unloaded_samples_per_s": rate["unloaded"],
            "unmerged_samples_per_s": rate["unmerged"], "base_samples_per_s": rate["base"],
            "ratio": rate["merged"] / rate["base"], "unloaded_ratio": rate["unloaded"] / rate["base"],
            "unmerged_ratio": rate["unmerged"] / rate["base"], "passes": passes, "batches": len(batches),
            "method": "interleaved per batch", "measured": time.strftime("%Y-%m-%d %H:%M")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_slice_args(ap)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seeds", default="0", help="comma list; speed from the first, accuracy averaged over all")
    ap.add_argument("--typical-seeds", type=int, default=None,
                    help="run the typical peer on only the first N seeds (its speed needs one; default: all)")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--out", type=Path, default=Path("runs/bench"))
    ap.add_argument("--results", type=Path, default=Path("results/bench"))
    ap.add_argument("--pooling", choices=("auto", "cls", "mean"), default=None,
                    help="lorafit's --pooling (default: lorafit's own default, auto)")
    ap.add_argument("--peers", default="tuned,typical",
                    help="comma list of the peers to run (tuned, typical); a peer left out keeps the row of an "
                         "earlier run only in git history, and its columns read '-'")
    ap.add_argument("--fresh", action="store_true", help="drop rows kept from earlier runs in results/bench.json")
    ap.add_argument("--records-only", action="store_true",
                    help="only run (or read back) the runs' records in --out, e.g. accuracy-only seeds in parallel "
                         "processes; no peak, no results written")
    ap.add_argument("--merged-only", action="store_true",
                    help="only measure merged-LoRA vs base inference on the lora run already in --out")
    args = ap.parse_args()
    if args.typical_seeds is not None and args.typical_seeds < (0 if args.records_only else 1):
        ap.error("--typical-seeds must be at least 1: the typical peer's first seed gives its speed "
                 "(0 only with --records-only: records of the accuracy seeds)")
    data_args = dict(source=args.data, train_size=args.train_size, val_size=args.val_size, test_size=args.test_size)
    if args.merged_only:
        merged = merged_vs_base(args.out / f"lora-seed{args.seeds.split(',')[0]}", data_args, args.max_length)
        print(write_results(args, {}, [], merged))
        return

    from transformers import AutoConfig

    from lorafit.config import RunConfig
    from lorafit.models import resolve_model_path
    from lorafit.strategies import learning_rate

    if args.records_only:  # accuracy runs beside others: no peak, no results, only the records in --out
        measured_peak = {"bfloat16": {"peak_tflops": float("nan")}, "float32": {"peak_tflops": float("nan")},
                         "cpu": cpu_model(), "method": "not measured (--records-only)"}
    else:
        measured_peak = _matmul_peak(args.out)
    peaks = {"bf16_tflops": measured_peak["bfloat16"]["peak_tflops"],
             "fp32_tflops": measured_peak["float32"]["peak_tflops"], "cpu": measured_peak["cpu"],
             "detail": measured_peak}
    print(f"{peaks['cpu']}: matmul peak bf16 {peaks['bf16_tflops']:.2f} TFLOP/s, fp32 {peaks['fp32_tflops']:.2f} "
          f"TFLOP/s ({measured_peak['method']})", flush=True)
    model_cfg = AutoConfig.from_pretrained(resolve_model_path(None))
    data = ["--data", args.data, "--train-size", str(args.train_size), "--val-size", str(args.val_size),
            "--test-size", str(args.test_size)]
    common = [*data, "--max-length", str(args.max_length), "--epochs", str(args.epochs),
              "--batch-size", str(args.batch_size)]
    seeds = [int(x) for x in args.seeds.split(",")]
    rows = []
    for strategy in args.strategies.split(","):
        lr = learning_rate(RunConfig(strategy=strategy))
        per_seed = []
        for seed in seeds:
            run = args.out / f"{strategy}-seed{seed}"
            timed = args.out / f"{strategy}-seed{seed}.process.json"
            if not (run / "final.json").exists() or not timed.exists():  # resumable: a finished run is read back
                pooling = ["--pooling", args.pooling] if args.pooling else []
                start = time.perf_counter()
                subprocess.run([sys.executable, "-m", "lorafit", "train", "--strategy", strategy, *common, "--seed",
                                str(seed), *pooling, "--out", str(run), "--overwrite", "--no-progress"], check=True)
                timed.write_text(json.dumps({"process_seconds": time.perf_counter() - start}) + "\n")
            final = json.loads((run / "final.json").read_text())
            hist = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
            tokens = sum(h["tokens_per_s"] * h["seconds"] for h in hist)
            samples = sum(h["samples_per_s"] * h["seconds"] for h in hist)
            ours = {"samples_per_s": samples / final["train_seconds"], "tokens_per_s": tokens / final["train_seconds"],
                    "train_seconds": final["train_seconds"], "test_seconds": final["test_seconds"],
                    "wall_seconds": final["wall_seconds"], "peak_memory_mb": final["peak_memory_mb"],
                    "test_accuracy": final["test_accuracy"], "precision": final["precision"],
                    "pooling": final.get("pooling", "cls"), "attention": final.get("attention"),
                    "process_seconds": json.loads(timed.read_text())["process_seconds"],
                    "cpu": same_cpu(final.get("cpu"), run)}
            # the fastest epoch's rate, where the epochs are the training (a cached head's leave out its features)
            if sum(h["seconds"] for h in hist) >= 0.9 * final["train_seconds"]:
                ours["best_epoch_samples_per_s"] = max(h["samples_per_s"] for h in hist)
            peak = peaks["bf16_tflops"] if final["precision"] == "bf16" else peaks["fp32_tflops"]
            # MFU counts the FLOPs each side computes: lorafit's last layer may compute one row (first_token)
            pruned = final.get("last_layer") == "first-token"
            ours["last_layer"] = final.get("last_layer", "full")
            ours_flops = train_flops_per_token(strategy, model_cfg, tokens / samples, first_token=pruned)
            flops_per_token = train_flops_per_token(strategy, model_cfg, tokens / samples)
            ours["mfu"] = ours_flops * ours["tokens_per_s"] / (peak * 1e12) if ours_flops else None
            peers = {}
            # the tuned peer computes in the precision lorafit's run used (measured faster on this CPU)
            for kind, flags in (("tuned", ["--tuned", "--precision", final["precision"]]), ("typical", [])):
                if kind not in args.peers.split(","):
                    continue
                if kind == "typical" and args.typical_seeds is not None and seed not in seeds[:args.typical_seeds]:
                    continue
                saved = args.out / f"peer-{kind}-{strategy}-seed{seed}.json"
                if saved.exists() and "process_seconds" in json.loads(saved.read_text()):
                    peer = json.loads(saved.read_text())
                    same_cpu(peer.get("cpu"), saved)
                else:
                    start = time.perf_counter()
                    out = subprocess.run([sys.executable, str(Path(__file__).with_name("peer.py")), "--strategy",
                                          strategy, *common, "--lr", str(lr), "--seed", str(seed), *flags],
                                         check=True, capture_output=True, text=True)
                    peer = {**json.loads(out.stdout.strip().splitlines()[-1]), "cpu": cpu_model(),
                            "process_seconds": time.perf_counter() - start}
                    saved.parent.mkdir(parents=True, exist_ok=True)
                    saved.write_text(json.dumps(peer, indent=2) + "\n")
                peer_peak = peaks["bf16_tflops"] if peer.get("bf16") else peaks["fp32_tflops"]
                peer["mfu"] = flops_per_token * peer["tokens_per_s"] / (peer_peak * 1e12) if flops_per_token else None
                if peer.get("epoch_seconds"):  # records from before peer.py timed its epochs have none
                    peer["best_epoch_samples_per_s"] = max(n / t for n, t in zip(peer["epoch_samples"],
                                                                                peer["epoch_seconds"]))
                peers[kind] = peer
            per_seed.append({"seed": seed, "lorafit": ours, **{f"peer_{k}": v for k, v in peers.items()}})
            print(json.dumps(per_seed[-1]), flush=True)
        if args.records_only:
            continue
        first = per_seed[0]
        ours, ratios = first["lorafit"], {}
        for kind in ("tuned", "typical"):
            if f"peer_{kind}" not in first:  # left out by --peers
                continue
            peer = first[f"peer_{kind}"]
            ratios[kind] = {
                "samples_per_s": ours["samples_per_s"] / peer["samples_per_s"],
                "tokens_per_s": ours["tokens_per_s"] / peer["tokens_per_s"],
                "train_plus_test_time_peer_over_lorafit":
                    (peer["train_seconds"] + peer["test_seconds"]) / (ours["train_seconds"] + ours["test_seconds"]),
                "whole_process_time_peer_over_lorafit": peer["process_seconds"] / ours["process_seconds"],
                "peak_memory": ours["peak_memory_mb"] / peer["peak_memory_mb"],
            }
            if "best_epoch_samples_per_s" in peer and "best_epoch_samples_per_s" in ours:
                # each side's fastest epoch: less exposed to the machine's drift between the processes
                ratios[kind]["best_epoch_samples_per_s"] = (ours["best_epoch_samples_per_s"]
                                                            / peer["best_epoch_samples_per_s"])
        accuracy = {who: [r[who]["test_accuracy"] for r in per_seed if who in r]
                    for who in ("lorafit", "peer_tuned", "peer_typical")}
        # when the first seed's records (the speed) were made, not when this invocation read them back
        made = max(p.stat().st_mtime for p in [args.out / f"{strategy}-seed{seeds[0]}" / "final.json",
                                                *args.out.glob(f"peer-*-{strategy}-seed{seeds[0]}.json")])
        row = {"strategy": strategy, "lr": lr, "matmul_peak": peaks, "measured": time.strftime("%Y-%m-%d %H:%M",
                                                                                             time.localtime(made)),
               "lorafit": ours, "peer": first.get("peer_typical"), "peer_tuned": first["peer_tuned"], "ratios": ratios,
               "seeds": seeds, "test_accuracy_per_seed": accuracy, "per_seed": per_seed}
        rows.append(row)
        write_results(args, peaks, rows, None)  # after each strategy: a cut-off run keeps what it measured
    if args.records_only:
        return
    merged = None
    if "lora" in args.strategies:
        merged = _merged(args, data_args)
    print(write_results(args, peaks, rows, merged))
    if merged:
        print(json.dumps(merged))


def _merged(args, data_args: dict) -> dict:
    """merged_vs_base of the first seed's lora run, measured once and kept in --out
    (merged.json), so completing the records later does not re-time it beside other work."""
    path = args.out / "merged.json"
    if path.exists():
        return json.loads(path.read_text())
    merged = merged_vs_base(args.out / f"lora-seed{args.seeds.split(',')[0]}", data_args, args.max_length)
    path.write_text(json.dumps(merged, indent=2) + "\n")
    return merged


def _matmul_peak(out: Path) -> dict:
    """This CPU's matmul peak (peak.measure), measured first while this process is the only
    one working, and kept in `out`/matmul_peak.json: a later invocation that completes the
    same records on the same CPU model reuses the peak of the one that began them."""
    path = out / "matmul_peak.json"
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("cpu") == cpu_model():
            return saved
    peak = measure()
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**peak, "measured": time.strftime("%Y-%m-%d %H:%M")}, indent=2) + "\n")
    return peak


def _seeds_note(row: dict) -> str:
    """"3 seeds", or "3 seeds; typical peer 1" where the typical peer ran fewer."""
    n, typical = len(row["seeds"]), len(row["test_accuracy_per_seed"]["peer_typical"])
    return f"{n} seed{'s' * (n > 1)}" + (f"; typical peer {typical or 'not run'}" if typical != n else "")


def write_results(args, peaks: dict, rows: list[dict], merged: dict | None) -> str:
    """results/bench.json and results/bench.md; returns the markdown table.

    Rows of strategies this run did not measure are kept from an earlier run on the same
    slice (unless --fresh), each with the matmul peak of its own run, so the benchmark
    can be completed a strategy at a time; each row's lorafit/peer pair is side by side.
    """
    path = args.results / "bench.json"
    slice_args = {k: str(getattr(args, k)) for k in ("data", "train_size", "val_size", "test_size", "max_length",
                                                     "epochs", "batch_size", "seeds", "pooling")}
    old = json.loads(path.read_text()) if path.exists() and not args.fresh else {}
    old_slice = old.get("slice") or {k: old.get("args", {}).get(k) for k in slice_args}  # older files: "args"
    if old_slice == slice_args:
        mine = {r["strategy"] for r in rows}
        kept = [{"matmul_peak": old.get("matmul_peak"), **r} for r in old.get("rows", []) if r["strategy"] not in mine]
        rows = sorted(kept + rows, key=lambda r: STRATEGIES.index(r["strategy"]))
        merged = merged or old.get("merged_lora_inference")
    report = {"slice": slice_args, "rows": rows}
    if merged:
        report["merged_lora_inference"] = merged
    args.results.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    lines = ["| strategy | loop samples/s lorafit / tuned peer / typical peer | loop ratio vs tuned / typical | "
             "whole process s lorafit / tuned / typical | whole-process ratio vs tuned / typical | "
             "peak RSS MB lorafit / tuned / typical | "
             "test acc (mean over seeds) lorafit / tuned / typical | MFU lorafit / tuned |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "peer_tuned" not in r:  # a row of the older, one-peer benchmark
            continue
        o, t, p, q = r["lorafit"], r["peer_tuned"], r["peer"] or {}, r["ratios"]
        acc = {k: statistics.mean(v) if v else None for k, v in r["test_accuracy_per_seed"].items()}
        mfu = " / ".join(f"{100 * x['mfu']:.1f}%" if x.get("mfu") else "-" for x in (o, t))
        if "process_seconds" not in o:  # a row from before the whole process was timed
            continue

        def cells(fmt: str, key: str, *who: dict) -> str:
            return " / ".join(format(x[key], fmt) if key in x else "-" for x in who)

        def ratio(key: str) -> str:
            return " / ".join(f"{q[k][key]:.2f}x" if k in q else "-" for k in ("tuned", "typical"))

        lines.append(f"| {r['strategy']} | {cells('.1f', 'samples_per_s', o, t, p)} | {ratio('samples_per_s')} | "
                     f"{cells('.0f', 'process_seconds', o, t, p)} | {ratio('whole_process_time_peer_over_lorafit')} | "
                     f"{cells(',.0f', 'peak_memory_mb', o, t, p)} | "
                     + " / ".join(f"{acc[k]:.4f}" if acc[k] is not None else "-"
                                  for k in ("lorafit", "peer_tuned", "peer_typical"))
                     + f" ({_seeds_note(r)}) | {mfu} |")
    table = "\n".join(lines) + "\n"
    if merged:
        table += (f"\nInference on the test slice ({merged.get('measured', '?')}): merged LoRA model "
                  f"{merged['merged_samples_per_s']:.1f}, base model {merged['base_samples_per_s']:.1f} samples/s "
                  f"({merged['ratio']:.3f}x)")
        if "unloaded_samples_per_s" in merged:
            table += (f"; merged and unloaded {merged['unloaded_samples_per_s']:.1f} samples/s "
                      f"({merged['unloaded_ratio']:.3f}x)")
        if "unmerged_samples_per_s" in merged:
            table += (f"; adapters unmerged {merged['unmerged_samples_per_s']:.1f} samples/s "
                      f"({merged['unmerged_ratio']:.3f}x)")
        table += ".\n"
    for r in rows:
        q = r.get("ratios", {})
        if all("best_epoch_samples_per_s" in q.get(k, {}) for k in ("tuned", "typical")):
            o, t, p = (r[k]["best_epoch_samples_per_s"] for k in ("lorafit", "peer_tuned", "peer"))
            table += (f"\n{r['strategy']}, each side's fastest epoch: {o:.1f} / {t:.1f} / {p:.1f} samples/s, "
                      f"{q['tuned']['best_epoch_samples_per_s']:.2f}x the tuned peer, "
                      f"{q['typical']['best_epoch_samples_per_s']:.2f}x the typical.")
    for r in rows:
        pk = r["matmul_peak"]
        table += (f"\n{r['strategy']}: measured {r.get('measured', '?')} on {pk.get('cpu', '?')}; matmul peak in "
                  f"that run: bf16 {pk['bf16_tflops']:.2f} TFLOP/s, fp32 {pk['fp32_tflops']:.2f} TFLOP/s (MFU is "
                  "against the peak of the precision the run used).")
    table += "\n"
    (args.results / "bench.md").write_text(table)
    return table


if __name__ == "__main__":
    main()
