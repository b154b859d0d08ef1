"""Documentation consistency: the tables in docs/ are the committed result files, row for row."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_recipe_panel_table_is_the_committed_panel():
    doc = (ROOT / "docs" / "recipe.md").read_text()
    panel = (ROOT / "results" / "panel" / "panel.md").read_text()
    rows = [line for line in panel.splitlines() if re.match(r"\| \w+ \| [\w-]+ \|", line)]
    assert len(rows) >= 12  # at least two datasets with six methods each
    for row in rows:
        assert row in doc, f"docs/recipe.md lacks results/panel/panel.md row: {row}"
