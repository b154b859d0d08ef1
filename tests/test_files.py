"""All-or-nothing writes: whatever moment a writer dies, the target is the old file or the new
one, and what the dead writer left is removed by the next write of that file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from lorafit.files import atomic_write_bytes, save_safetensors_atomic

KILLED_WRITER = """
import sys, torch
from pathlib import Path
from lorafit.files import save_safetensors_atomic
save_safetensors_atomic({"w": torch.ones(96_000_000)}, Path(sys.argv[1]))
"""


def test_a_write_leaves_only_its_target(tmp_path):
    target = tmp_path / "x.safetensors"
    save_safetensors_atomic({"a": torch.arange(6.0).reshape(2, 3)}, target, metadata={"k": "v"})
    assert os.listdir(tmp_path) == ["x.safetensors"]
    assert torch.equal(load_file(target)["a"], torch.arange(6.0).reshape(2, 3))
    atomic_write_bytes(tmp_path / "y.json", b"{}")
    assert sorted(os.listdir(tmp_path)) == ["x.safetensors", "y.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    target = tmp_path / "x.safetensors"
    save_safetensors_atomic({"a": torch.zeros(2)}, target)
    with pytest.raises(Exception):
        save_safetensors_atomic({"a": "not a tensor"}, target)
    assert os.listdir(tmp_path) == ["x.safetensors"] and torch.equal(load_file(target)["a"], torch.zeros(2))


def test_the_next_write_removes_what_killed_writers_left(tmp_path):
    """A folder a safetensors write was killed in (with safetensors' own `.tmpXXXXXX` inside),
    and a killed byte writer's twin, both named for the target: gone after the next write.
    Other hidden files of the folder are not the writer's and stay."""
    target = tmp_path / "x.safetensors"
    folder = tmp_path / ".x.safetensors.k2j4l1.tmp"
    folder.mkdir()
    (folder / ".tmpAb3dEf").write_bytes(b"partial")
    (tmp_path / ".x.safetensors.q9w8e7.tmp").write_bytes(b"partial")
    (tmp_path / ".keep").write_bytes(b"user")
    save_safetensors_atomic({"a": torch.ones(3)}, target)
    assert sorted(os.listdir(tmp_path)) == [".keep", "x.safetensors"]


def test_a_writer_killed_inside_safetensors_leaves_only_a_folder_named_for_its_target(tmp_path):
    """SIGKILL while safetensors writes its own temporary file (the moment a checkpoint write
    spends most of its time in): nothing but `.<name>.*.tmp` is left, and the next write
    removes it. (safetensors 0.8 writes `.tmpXXXXXX` beside its target and renames it.)"""
    target = tmp_path / "ckpt.safetensors"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target)])
    deadline = time.time() + 120
    inner = []
    while not inner:
        assert proc.poll() is None and time.time() < deadline, "the writer finished before it could be killed"
        inner = [p for d in tmp_path.glob(".ckpt.safetensors.*.tmp") if d.is_dir() for p in d.iterdir()]
        time.sleep(0.001)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    left = os.listdir(tmp_path)
    assert left and all(n.startswith(".ckpt.safetensors.") and n.endswith(".tmp") for n in left), left
    save_safetensors_atomic({"a": torch.ones(3)}, target)
    assert os.listdir(tmp_path) == ["ckpt.safetensors"]
