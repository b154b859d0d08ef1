"""Figures and tables from run histories; nothing here recomputes a metric."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from lorafit.files import atomic_write_bytes

COLORS = {"full": "#1f77b4", "last-two-layers": "#ff7f0e", "lora": "#2ca02c"}


def subplots(nrows: int = 1, ncols: int = 1, figsize: tuple[float, float] = (6.4, 4.8)):
    """A figure and its axes, outside pyplot: drawing a report neither needs nor changes
    the caller's matplotlib backend (a notebook keeps its inline figures)."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols)


def _save(fig: Figure, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def plot_confusion(ax, confusion: list[list[int]], label_names: list[str], title: str = "test confusion") -> None:
    """A heat-map of a (K, K) confusion matrix (rows true, columns predicted) with its counts."""
    m = np.asarray(confusion)
    ax.imshow(m / np.maximum(m.sum(axis=1, keepdims=True), 1), cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(label_names))
    ax.set_xticks(ticks, [str(n)[:12] for n in label_names], rotation=30 if len(label_names) > 3 else 0)
    ax.set_yticks(ticks, [str(n)[:12] for n in label_names])
    ax.set(xlabel="predicted", ylabel="true", title=title)
    for i in ticks:
        for j in ticks:
            share = m[i, j] / max(m[i].sum(), 1)
            ax.text(j, i, f"{m[i, j]:,}", ha="center", va="center", color="white" if share > 0.5 else "black",
                    fontsize=8 if len(label_names) > 6 else 10)


def plot_curves(history: list[dict], path: Path, title: str = "", confusion: list[list[int]] | None = None,
                label_names: list[str] | None = None) -> None:
    """Loss and accuracy per epoch, train vs validation (the seed experiment's figures),
    and the test confusion matrix beside them where given."""
    epochs = [r["epoch"] for r in history]
    if confusion is not None:
        fig, (ax1, ax2, ax3) = subplots(1, 3, figsize=(13, 3.4))
        plot_confusion(ax3, confusion, label_names or [str(i) for i in range(len(confusion))])
    else:
        fig, (ax1, ax2) = subplots(1, 2, figsize=(9, 3.4))
    ax1.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    ax1.plot(epochs, [r["val_loss"] for r in history], "s--", label="validation")
    ax1.set(xlabel="epoch", ylabel="loss", title="loss")
    ax2.plot(epochs, [r["train_accuracy"] for r in history], "o-", label="train")
    ax2.plot(epochs, [r["val_accuracy"] for r in history], "s--", label="validation")
    ax2.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (ax1, ax2):
        ax.set_xticks(epochs)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    _save(fig, path)


def compare_rows(results: dict[str, dict]) -> list[dict]:
    """One row per strategy from each run's final.json and metrics history."""
    rows = []
    for name, r in results.items():
        f = r["final"]
        kept = f.get("kept_epoch", f["best_epoch"])
        rows.append({
            "strategy": name, "test_accuracy": f["test_accuracy"], "test_f1": f["test_f1"],
            # runs from before macro-F1 was recorded: None (their f1 is of class 1 where binary)
            "test_macro_f1": f.get("test_macro_f1"), "majority_share": f.get("test_majority_share"),
            "collapse_warning": f.get("collapse_warning"),
            "best_val_accuracy": f["best_val_accuracy"], "best_epoch": f["best_epoch"],
            # the epoch whose weights were tested (runs before `--keep` kept the best-validation epoch's)
            "kept_epoch": kept, "kept_val_accuracy": r["history"][kept - 1]["val_accuracy"],
            "trainable_params": f["trainable_params"], "total_params": f["total_params"],
            "trainable_pct": f["trainable_pct"], "train_seconds": f["train_seconds"],
            "wall_seconds": f["wall_seconds"], "peak_memory_mb": f["peak_memory_mb"],
            "saved_bytes": f["saved_bytes"], "lr": f["lr"],
            # examples trained per second of training time (a feature cache's encoder pass included)
            "samples_per_s": sum(h["samples_per_s"] * h["seconds"] for h in r["history"]) / f["train_seconds"],
        })
    return rows


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} KB"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def markdown_table(rows: list[dict]) -> str:
    """The comparison table: accuracy beside macro-F1 (on skewed data accuracy alone hides a
    model that predicts the majority class) and the test F1 (binary: of the second class)."""
    head = ("| strategy | test acc | macro-F1 | test F1 | val acc (epoch tested) | trainable params | % of total | "
            "lr | train time | samples/s | peak RSS | saved |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    body = "".join(
        f"| {r['strategy']} | {r['test_accuracy']:.4f} | {_num(r.get('test_macro_f1'))} | {r['test_f1']:.4f} | "
        f"{r['kept_val_accuracy']:.4f} "
        f"({r['kept_epoch']}) | {r['trainable_params']:,} | {r['trainable_pct']:.3f}% | {r['lr']:g} | "
        f"{r['train_seconds']:.0f} s | {r['samples_per_s']:.1f} | {r['peak_memory_mb']:,.0f} MB | "
        f"{_size(r['saved_bytes'])} |\n" for r in rows)
    return head + body


def plot_compare(results: dict[str, dict], path: Path) -> None:
    """Test accuracy vs trainable parameters (log x), validation accuracy per epoch, training
    time; below them each strategy's test confusion matrix (runs that recorded one)."""
    rows = compare_rows(results)
    confusions = [(r["strategy"], results[r["strategy"]]["final"]) for r in rows
                  if results[r["strategy"]]["final"].get("test_confusion")]
    fig = Figure(figsize=(14, 7.6 if confusions else 3.8))
    grid = fig.add_gridspec(2 if confusions else 1, max(3, len(confusions)))
    ax1, ax2, ax3 = (fig.add_subplot(grid[0, i]) for i in range(3))
    for r in rows:
        c = COLORS.get(r["strategy"])
        ax1.scatter(r["trainable_params"], r["test_accuracy"], s=80, color=c, label=r["strategy"], zorder=3)
        ax1.annotate(f"{r['test_accuracy']:.3f}", (r["trainable_params"], r["test_accuracy"]),
                     textcoords="offset points", xytext=(6, 6))
        hist = results[r["strategy"]]["history"]
        ax2.plot([h["epoch"] for h in hist], [h["val_accuracy"] for h in hist], "o-", color=c, label=r["strategy"])
    ax1.set_xscale("log")
    ax1.set(xlabel="trainable parameters (log)", ylabel="test accuracy", title="accuracy vs trainable parameters")
    ax2.set(xlabel="epoch", ylabel="validation accuracy", title="validation accuracy per epoch")
    ax2.set_xticks([h["epoch"] for h in next(iter(results.values()))["history"]])
    names = [r["strategy"] for r in rows]
    ax3.bar(names, [r["train_seconds"] for r in rows], color=[COLORS.get(n) for n in names])
    ax3.set(ylabel="seconds", title="training time")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    for i, (name, final) in enumerate(confusions):
        k = len(final["test_confusion"])
        plot_confusion(fig.add_subplot(grid[1, i]), final["test_confusion"],
                       final.get("label_names") or [str(j) for j in range(k)],
                       title=f"{name}: test confusion (macro-F1 {final.get('test_macro_f1', 0):.3f})")
    fig.tight_layout()
    _save(fig, path)


def write_compare_report(results: dict[str, dict], out: Path, command: str, wall_seconds: float,
                         invocations: int = 1, machine: dict | None = None) -> dict:
    """report.md, report.json and report.png for a `compare` run; returns the report.

    `wall_seconds` sums the `invocations` (the first run and each `--resume`); `machine`:
    `lorafit.machine.matmul_peak()` measured by this invocation, which puts the times in context.
    """
    rows = compare_rows(results)
    report = {"command": command, "wall_seconds": wall_seconds, "invocations": invocations, "rows": rows,
              "config": next(iter(results.values()))["config"]}
    if machine:
        report["machine"] = machine
    precisions = sorted({r["final"].get("precision") for r in results.values()} - {None})
    plot_compare(results, out / "report.png")
    cfg = report["config"]
    kept = "final epoch's" if cfg.get("keep", "best") == "last" else "best-validation epoch's"
    resumed = (f" over {invocations} invocations (resumed with `lorafit compare --resume`; work redone after an "
               "interruption is counted, time between invocations is not)") if invocations > 1 else ""
    majority = rows[0].get("majority_share")
    warnings = "".join(f"\n- {r['strategy']}: {r['collapse_warning']}" for r in rows if r.get("collapse_warning"))
    labels = cfg.get("label_names")
    epochs = cfg.get("epochs_resolved") or cfg["epochs"]
    md = (f"# lorafit compare\n\n`{command}`\n\nModel `{cfg['model']}`, data "
          f"{next(iter(results.values()))['final']['data']}, {epochs} epochs, max_length "
          f"{cfg['max_length']}, batch size {cfg['batch_size']}, seed {cfg['seed']}. Test accuracy is that of the "
          f"{kept} weights. Wall time of the whole comparison: {wall_seconds / 60:.1f} min"
          f"{resumed}."
          + (f" CPU: {machine['cpu']}, {machine['threads']} threads, runs in {' and '.join(precisions) or '?'}; "
             f"its matmul peak, measured after the runs: bf16 {machine['bf16_tflops']:.2f} TFLOP/s, fp32 "
             f"{machine['fp32_tflops']:.2f} TFLOP/s ({machine['method']})." if machine else "")
          + (f" Classes: {', '.join(labels)}." if labels else "")
          + (f" The majority class is {100 * majority:.1f}% of the test texts: the accuracy of always predicting "
             "it." if majority is not None else "")
          + f"\n\n{markdown_table(rows)}" + (f"\n**Collapsed models**:{warnings}\n" if warnings else "")
          + "\n![report](report.png)\n")
    atomic_write_bytes(out / "report.md", md.encode())
    atomic_write_bytes(out / "report.json", (json.dumps(report, indent=2) + "\n").encode())
    return report
