"""Running the real `lorafit` CLI: in a subprocess, as a user would, or in this process
(`lorafit_here`: the same `main`, without a process's seconds of imports) where a test
checks a refusal that comes before any training."""

from __future__ import annotations

import contextlib
import io
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


def lorafit_here(*args: str) -> subprocess.CompletedProcess:
    """`lorafit ARGS` through `lorafit.cli.main` in this process, its output captured (a
    test sets environment variables with pytest's monkeypatch).

    An exception that escapes `main` propagates (the test fails, as a traceback would);
    argparse's exit becomes the return code, as in a process."""
    from lorafit.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse: usage errors exit 2, --help exits 0
            code = exc.code if isinstance(exc.code, int) else 1
    return subprocess.CompletedProcess(["lorafit", *args], code, out.getvalue(), err.getvalue())
