"""The sweep grid (`lorafit sweep`, `lorafit.sweep`): every combination of the listed settings, one
normal run each, their run names, and the Pareto report.

A flag given several times, or with a comma-separated list, is swept; a flag given once
applies to every run. For list-valued settings (`--targets`) each occurrence of the
flag is one value (its comma list is the list). Every run is a plain `lorafit train`
run in its own folder under the sweep's folder, on the same data split and seed. The
report marks the Pareto front of validation accuracy against trainable parameters and
chooses the best setting on validation accuracy; its test accuracy is reported beside
it, and the test split never chooses.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

from lorafit.config import field_types, is_auto_lr
from lorafit.errors import ConfigError

_TRUE, _FALSE = {"true", "yes", "1", "on"}, {"false", "no", "0", "off"}


def _convert(name: str, text: str, tp: type, optional: bool):
    """One flag value, as the field's type; a clear error naming the flag otherwise."""
    flag = "--" + name.replace("_", "-")
    if optional and text.lower() in ("none", "null"):
        return None
    try:
        if tp is bool:
            if text.lower() in _TRUE | _FALSE:
                return text.lower() in _TRUE
            raise ValueError
        if tp is int:
            return int(text)
        if tp is float:
            return "auto" if name == "lr" and is_auto_lr(text) else float(text)
    except ValueError:
        kind = "true or false" if tp is bool else f"a {'whole ' if tp is int else ''}number"
        raise ConfigError(f"{flag}: {text!r} is not {kind}; give one value or a comma-separated list") from None
    if tp is list:
        return [t.strip() for t in text.split(",") if t.strip()]
    return text


def parse_grid(raw: dict[str, list[str]]) -> tuple[dict[str, object], dict[str, list]]:
    """(fixed settings, swept settings) from each flag's occurrences as given on the command line."""
    types_ = field_types()
    fixed, swept = {}, {}
    for name, occurrences in raw.items():
        tp, optional = types_[name]
        texts = occurrences if tp is list else [t for occ in occurrences for t in occ.split(",") if t.strip()]
        values = []
        for text in texts:
            v = _convert(name, text.strip() if isinstance(text, str) else text, tp, optional)
            if v not in values:
                values.append(v)
        if not values:
            raise ConfigError(f"--{name.replace('_', '-')}: no value given")
        if len(values) == 1:
            fixed[name] = values[0]
        else:
            swept[name] = values
    return fixed, swept


def grid_points(swept: dict[str, list]) -> list[dict]:
    """Every combination of the swept values (the first flag varies slowest)."""
    names = list(swept)
    return [dict(zip(names, combo)) for combo in itertools.product(*(swept[n] for n in names))]


def run_name(point: dict) -> str:
    """A folder name for one combination, e.g. `rank=4,targets=key+value+classifier`."""
    if not point:
        return "run"
    parts = []
    for k, v in point.items():
        text = "+".join(v) if isinstance(v, list) else f"{v:g}" if isinstance(v, float) else str(v)
        parts.append(f"{k}={text}")
    return re.sub(r"[^A-Za-z0-9=+,._-]", "_", ",".join(parts))[:200]


def pareto_front(rows: list[dict]) -> list[bool]:
    """For each row: no other row has at least its validation accuracy with at most its
    trainable parameters, and is better in one of the two."""
    def dominates(a: dict, b: dict) -> bool:
        return (a["val_accuracy"] >= b["val_accuracy"] and a["trainable_params"] <= b["trainable_params"]
                and (a["val_accuracy"] > b["val_accuracy"] or a["trainable_params"] < b["trainable_params"]))
    return [not any(dominates(o, r) for o in rows if o is not r) for r in rows]


def sweep_rows(results: dict[str, dict], swept: list[str]) -> list[dict]:
    """One row per run, in grid order, from its config, final.json and metrics history."""
    rows = []
    for name, r in results.items():
        f, hist = r["final"], r["history"]
        kept = f.get("kept_epoch", f["best_epoch"])
        train_seconds = sum(h["seconds"] for h in hist)
        rows.append({
            "run": name, **{k: r["config"][k] for k in swept},
            "trainable_params": f["trainable_params"], "val_accuracy": hist[kept - 1]["val_accuracy"],
            "test_accuracy": f["test_accuracy"],
            "samples_per_s": sum(h["samples_per_s"] * h["seconds"] for h in hist) / train_seconds,
            "peak_memory_mb": f["peak_memory_mb"], "saved_bytes": f["saved_bytes"],
        })
    for row, front in zip(rows, pareto_front(rows)):
        row["pareto"] = front
    if rows:  # chosen on validation accuracy; ties: fewer trainable parameters, then grid order
        best = max(rows, key=lambda r: (r["val_accuracy"], -r["trainable_params"]))
        for row in rows:
            row["best"] = row is best
    return rows


def _fmt(v) -> str:
    return ",".join(v) if isinstance(v, list) else f"{v:g}" if isinstance(v, float) else str(v)


def write_sweep_report(rows: list[dict], swept: list[str], out: Path, command: str, wall_seconds: float,
                       invocations: int) -> dict:
    """report.md, report.json, report.png for a sweep; returns the report."""
    from lorafit.files import atomic_write_bytes
    from lorafit.report import _save, _size, subplots

    best = next((r for r in rows if r.get("best")), None)
    report = {"command": command, "swept": swept, "wall_seconds": wall_seconds, "invocations": invocations,
              "rows": rows, "best": best}
    head = "| " + " | ".join([*swept, "trainable params", "val acc", "test acc", "samples/s", "peak RSS",
                              "adapter", "Pareto", "chosen"]) + " |\n"
    head += "|" + "---|" * (len(swept) + 8) + "\n"
    body = "".join(
        "| " + " | ".join([*(f"`{_fmt(r[k])}`" for k in swept), f"{r['trainable_params']:,}",
                           f"{r['val_accuracy']:.4f}", f"{r['test_accuracy']:.4f}", f"{r['samples_per_s']:.1f}",
                           f"{r['peak_memory_mb']:,.0f} MB", _size(r["saved_bytes"]), "yes" if r["pareto"] else "",
                           "**best**" if r.get("best") else ""]) + " |\n" for r in rows)
    chosen = (f"Chosen on validation accuracy: `{best['run']}` (validation {best['val_accuracy']:.4f}; its test "
              f"accuracy {best['test_accuracy']:.4f} is reported, not used to choose).") if best else ""
    md = (f"# lorafit sweep\n\n`{command}`\n\n{len(rows)} runs, wall time {wall_seconds / 60:.1f} min over "
          f"{invocations} invocation(s).\n\n{head}{body}\n{chosen}\n\n![report](report.png)\n")
    fig, ax = subplots(figsize=(6.5, 4))
    ax.scatter([r["trainable_params"] for r in rows], [r["val_accuracy"] for r in rows], s=40, color="#999",
               label="run", zorder=2)
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["trainable_params"])
    ax.plot([r["trainable_params"] for r in front], [r["val_accuracy"] for r in front], "o-", color="#2ca02c",
            label="Pareto front", zorder=3)
    if best:
        ax.scatter([best["trainable_params"]], [best["val_accuracy"]], s=160, facecolors="none",
                   edgecolors="#d62728", linewidths=2, label="chosen (validation)", zorder=4)
    ax.set_xscale("log")
    ax.set(xlabel="trainable parameters (log)", ylabel="validation accuracy",
           title="validation accuracy vs trainable parameters")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, out / "report.png")
    atomic_write_bytes(out / "report.md", md.encode())
    atomic_write_bytes(out / "report.json", (json.dumps(report, indent=2) + "\n").encode())
    return report
