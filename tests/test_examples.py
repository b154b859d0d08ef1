"""The example notebooks run, top to bottom, on the library's API (a tiny slice here).

They are stored without outputs; examples/build_notebooks.py writes them. Their cells
assert the invariants they show (the adapted layer equals the base at initialisation,
merged == unmerged, the frozen weights stay frozen), so a run that completes checks them.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(name: str, cwd: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(EXAMPLES / name, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def _text(nb) -> str:
    return "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


@pytest.mark.parametrize("name", ["lora_from_scratch.ipynb", "compare_strategies.ipynb"])
def test_stored_without_outputs(name):
    nb = nbformat.read(EXAMPLES / name, as_version=4)
    nbformat.validate(nb)
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")


def test_lora_from_scratch_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFIT_EXAMPLE_STEPS", "2")
    text = _text(_run("lora_from_scratch.ipynb", tmp_path))
    assert "trainable 3,072 of 150,912" in text  # 384 x 4 + 4 x 384 next to the 384 x 384 + 384 frozen layer
    assert "13 layers adapted; trainable 38,408 of 22,752,394" in text
    assert "step 1: loss" in text and "merged logits equal the unmerged ones" in text


def test_compare_strategies_runs(tmp_path, monkeypatch):
    for key, value in {"TRAIN": "24", "VAL": "8", "TEST": "16", "MAX_LENGTH": "64", "EPOCHS": "1"}.items():
        monkeypatch.setenv(f"LORAFIT_EXAMPLE_{key}", value)
    monkeypatch.setenv("LORAFIT_EXAMPLE_OUT", str(tmp_path / "cmp"))
    monkeypatch.setenv("LORAFIT_EXAMPLE_STRATEGIES", "last-two-layers,lora")  # full's run adds time, not coverage
    nb = _run("compare_strategies.ipynb", tmp_path)
    text = _text(nb)
    for name in ("last-two-layers", "lora"):
        assert f"{name:16s} test accuracy" in text
    assert (tmp_path / "cmp" / "report.json").exists()
    figures = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
               if "image/png" in o.get("data", {})]
    assert len(figures) == 2
