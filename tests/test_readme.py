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
