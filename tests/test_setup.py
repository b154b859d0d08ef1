"""scripts/setup.sh refuses a Python older than 3.11 with a clear message, before touching anything."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_setup_refuses_an_old_python(tmp_path):
    fake = tmp_path / "python3.10"
    fake.write_text('#!/bin/sh\n[ "$1" = "--version" ] && echo "Python 3.10.12" && exit 0\nexit 1\n')
    fake.chmod(0o755)
    r = subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh")], capture_output=True, text=True,
                       env={**os.environ, "PYTHON": str(fake)}, timeout=60)
    assert r.returncode == 1
    assert f"lorafit needs Python 3.11 or newer; {fake} is Python 3.10.12" in r.stderr
    assert "PYTHON=/path/to/python3.11 bash scripts/setup.sh" in r.stderr
    assert r.stdout == ""  # nothing was installed
