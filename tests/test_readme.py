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
