"""The README's library example runs as written and its stated numbers hold."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch):
    block = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert (scope["trainable"], scope["total"]) == (38_408, 22_752_394)
    assert "38,408 of 22,752,394 (0.17%)" in block
    assert sorted(p.name for p in (tmp_path / "my-adapter").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"]
    assert not any(type(m).__name__ == "LoRALinear" for m in scope["plain"].modules())


def test_readme_padding_table_matches_results():
    """Each row of the README's pad-multiple table is the measurement in results/padding.json."""
    import json

    runs = json.loads((README.parent / "results" / "padding.json").read_text())["runs"]
    measured = {(r["strategy"], r["pad_multiple"]): r for run in runs for r in run["rows"]}
    rows = re.findall(r"^\| (full|lora|last-two-layers) \| \**(\d+)\** \| \**([\d.]+)\** \| \**([\d,]+) MB\** \|"
                      r" ([\d.-]+) \| ([\d.]+) \|$", README.read_text(), re.M)
    assert len(rows) == 8
    for strategy, mult, speed, mem, eff, acc in rows:
        r = measured[(strategy, int(mult))]
        assert speed == f"{r['train_samples_per_s']:.1f}" and mem == f"{r['peak_memory_mb']:,.0f}"
        assert acc == f"{r['test_accuracy']:.3f}" and eff in ("-", f"{r['padding_efficiency']:.3f}")


def test_readme_benchmark_table_matches_results():
    """Each row of the README's first table against transformers + PEFT is the measurement in results/bench_v1.json."""
    import json

    rows = {r["strategy"]: r for r in json.loads((README.parent / "results" / "bench_v1.json").read_text())["rows"]}
    found = re.findall(r"^\| (full|lora|last-two-layers) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+)x \| (\d+) / (\d+) \|"
                       r" ([\d,]+) / ([\d,]+) MB \| ([\d.]+) / ([\d.]+) \|", README.read_text(), re.M)
    assert sorted(f[0] for f in found) == sorted(rows)
    for strategy, ours, peer, ratio, wall_o, wall_p, mem_o, mem_p, acc_o, acc_p in found:
        o, p, q = rows[strategy]["lorafit"], rows[strategy]["peer"], rows[strategy]["ratios"]
        assert (ours, peer) == (f"{o['samples_per_s']:.1f}", f"{p['samples_per_s']:.1f}")
        assert abs(float(ratio) - q["samples_per_s"]) < 0.051
        assert (int(wall_o), int(wall_p)) == (round(o["train_seconds"] + o["test_seconds"]),
                                              round(p["train_seconds"] + p["test_seconds"]))
        assert (mem_o, mem_p) == (f"{o['peak_memory_mb']:,.0f}", f"{p['peak_memory_mb']:,.0f}")
        assert abs(float(acc_o) - o["test_accuracy"]) < 5e-4 and abs(float(acc_p) - p["test_accuracy"]) < 5e-4


TUNED_PEER_ROW = re.compile(r"^\| (full|lora|last-two-layers) \| ([\d.]+) / ([\d.]+) / ([\d.]+) \| ([\d.]+)x \| "
                            r"([\d.]+)x \| (\d+) / (\d+) / (\d+) \| ([\d,]+) / ([\d,]+) / ([\d,]+) \| "
                            r"([\d.]+) / ([\d.]+) / ([\d.]+) \((\d) seeds?(?:; typical peer (\d))?\)", re.M)
TUNED_PEER_TABLES = {"**Against both peers, all three strategies**": "bench.json",
                     "**On an AMD EPYC": "bench_amd/bench.json",
                     "**Issue 17's acceptance, in one run on one machine**": "bench_zen5/bench.json"}
"""Where each README table against both peers begins, and the results file it is."""


def table_after(text: str, marker: str) -> str:
    """The first markdown table after `marker` in `text` (its lines, joined)."""
    assert text.count(marker) == 1, marker
    lines = text[text.index(marker):].splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(first, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join(lines[first:end])


def test_readme_tuned_peer_tables_match_results():
    """Each row of each README table against both peers is the measurement in its results file, and
    every such row in the README is in one of those tables."""
    import json

    readme = README.read_text()
    assert len(TUNED_PEER_ROW.findall(readme)) == sum(
        len(TUNED_PEER_ROW.findall(table_after(readme, m))) for m in TUNED_PEER_TABLES)
    for marker, name in TUNED_PEER_TABLES.items():
        rows = {r["strategy"]: r for r in json.loads((README.parent / "results" / name).read_text())["rows"]}
        found = TUNED_PEER_ROW.findall(table_after(readme, marker))
        assert found and sorted(f[0] for f in found) == sorted(rows), name
        for strategy, *cells in found:
            r = rows[strategy]
            who = (r["lorafit"], r["peer_tuned"], r["peer"])
            assert cells[0:3] == [f"{x['samples_per_s']:.1f}" for x in who]
            assert abs(float(cells[3]) - r["ratios"]["tuned"]["samples_per_s"]) < 0.0051
            assert abs(float(cells[4]) - r["ratios"]["typical"]["samples_per_s"]) < 0.0051
            assert [int(c) for c in cells[5:8]] == [round(x["train_seconds"] + x["test_seconds"]) for x in who]
            assert cells[8:11] == [f"{x['peak_memory_mb']:,.0f}" for x in who]
            acc = r["test_accuracy_per_seed"]
            means = [sum(acc[k]) / len(acc[k]) for k in ("lorafit", "peer_tuned", "peer_typical")]
            assert all(abs(float(c) - m) < 5e-5 for c, m in zip(cells[11:14], means))
            assert int(cells[14]) == len(r["seeds"]) == len(acc["lorafit"]) == len(acc["peer_tuned"])
            assert int(cells[15] or cells[14]) == len(acc["peer_typical"])


def test_readme_compare_tables_are_the_committed_reports():
    """The README's default and full-scale comparison tables are the committed compare reports, row for row."""
    readme = README.read_text()
    for name, n in (("default_compare", 3), ("full_scale", 3), ("full_scale_mean", 2)):
        report = (README.parent / "results" / name / "report.md").read_text()
        rows = [line for line in report.splitlines() if re.match(r"\| (full|lora|last-two-layers) \|", line)]
        assert len(rows) == n, name
        for row in rows:
            assert row in readme, f"README lacks results/{name}/report.md row: {row}"


def test_readme_probe_accuracies_are_the_committed_probes():
    """The probe's test accuracies in the README are results/probe_mean.json and probe_cls.json."""
    import json

    readme = README.read_text()
    for pooling in ("mean", "cls"):
        probe = json.loads((README.parent / "results" / f"probe_{pooling}.json").read_text())
        assert probe["sizes"] == {"train": 22500, "validation": 2500, "test": 25000}
        assert f"probe, {pooling}: {probe['test_accuracy']:.4f}" in readme, pooling


def test_readme_sweep_table_is_the_committed_sweep_report():
    """The README's sweep table is results/sweep/report.md, row for row, and its figure is there."""
    readme = README.read_text()
    report = (README.parent / "results" / "sweep" / "report.md").read_text()
    rows = [line for line in report.splitlines() if re.match(r"\| `\d+` \|", line)]
    assert len(rows) == 10
    for row in rows:
        assert row in readme, f"README lacks results/sweep/report.md row: {row}"
    assert (README.parent / "results" / "sweep" / "report.png").stat().st_size > 10_000
    assert "(results/sweep/report.png)" in readme


def test_readme_interleaved_table_matches_results():
    """Each row of the README's interleaved-steps table is the measurement in results/interleaved.json."""
    import json

    rows = {r["strategy"]: r for r in json.loads((README.parent / "results" / "interleaved.json").read_text())["rows"]}
    found = re.findall(r"^\| (full|lora) \| ([\d.]+) / ([\d.]+) / ([\d.]+) \| ([\d.]+)x; ([\d.]+)x \| "
                       r"([\d.]+)x; ([\d.]+)x \|$", README.read_text(), re.M)
    assert found and sorted(f[0] for f in found) == sorted(rows)
    for strategy, *cells in found:
        r = rows[strategy]
        assert cells[0:3] == [f"{r[k]['samples_per_s']:.2f}" for k in ("lorafit", "tuned", "typical")]
        for i, kind in ((3, "over_tuned"), (5, "over_typical")):
            assert cells[i:i + 2] == [f"{r[kind]['samples_per_s']:.2f}", f"{r[kind]['median_of_round_ratios']:.2f}"]
        assert len(r["lorafit"]["step_seconds"]) == r["rounds"]  # every timed round is in the record


def test_readme_fp32_padding_tables_match_results():
    """The README's fp32 pad-multiple table is results/padding_fp32.json, and its interleaved
    steps table is results/padding_interleaved.json."""
    import json

    runs = json.loads((README.parent / "results" / "padding_fp32.json").read_text())["rows"]
    text = README.read_text()
    found = re.findall(r"^\| (full|lora) \| (\d+) \| ([\d.]+) \| ([\d,]+) \| ([\d.]+) \| ([\d.]+) \|$", text, re.M)
    assert [(f[0], int(f[1])) for f in found] == [(r["strategy"], r["pad_multiple"]) for r in runs]
    for (_, _, speed, mem, eff, acc), r in zip(found, runs):
        assert (speed, mem, eff, acc) == (f"{r['train_samples_per_s']:.1f}", f"{r['peak_memory_mb']:,.0f}",
                                          f"{r['padding_efficiency']:.3f}", f"{r['test_accuracy']:.3f}")
    inter = json.loads((README.parent / "results" / "padding_interleaved.json").read_text())["rows"]
    found = re.findall(r"^\| (full|lora) \| (\d+) / (\d+) \| ([\d.]+) / ([\d.]+) \| ([\d.]+)x; ([\d.]+)x \|$",
                       text, re.M)
    assert [f[0] for f in found] == [r["strategy"] for r in inter]
    for (_, a, b, la, lb, tot, med), r in zip(found, inter):
        per, ratio = r["per_multiple"], r["speedup_over_first"][b]
        assert list(per) == [a, b]  # the first multiple is the base of the ratio
        assert (la, lb) == tuple(f"{per[m]['mean_padded_length']:.1f}" for m in (a, b))
        assert (tot, med) == (f"{ratio['of_totals']:.3f}", f"{ratio['median_of_rounds']:.3f}")
        assert all(len(per[m]["step_seconds"]) == r["rounds"] for m in (a, b))
