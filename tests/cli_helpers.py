"""Running the real `lorafit` CLI in a subprocess, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys

TINY = ["--train-size", "24", "--val-size", "8", "--test-size", "16", "--max-length", "64", "--epochs", "1",
        "--no-progress"]


def lorafit(*args: str, cwd=None, stdin: str | None = None, env: dict | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "lorafit", *args], cwd=cwd, input=stdin, text=True,
                          capture_output=True, env=full_env, timeout=timeout)
