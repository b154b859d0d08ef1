"""Crash safety: SIGKILL or Ctrl-C mid-epoch, resume, and get the uninterrupted result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cli_helpers import lorafit

ARGS = ["--strategy", "lora", "--precision", "fp32", "--train-size", "96", "--val-size", "8", "--test-size", "16",
        "--max-length", "64", "--batch-size", "8", "--epochs", "2", "--checkpoint-every", "1", "--no-progress"]
VOLATILE = {"seconds", "tokens_per_s", "samples_per_s"}


def _metrics(run):
    return [{k: v for k, v in json.loads(x).items() if k not in VOLATILE}
            for x in (run / "metrics.jsonl").read_text().splitlines()]


def _step(run) -> tuple[int, int]:
    try:
        with safe_open(str(run / "checkpoint.safetensors"), "pt") as f:
            meta = json.loads(f.metadata()["lorafit"])
        return meta["epoch"], meta["step"]
    except Exception:
        return 0, 0


def _start(run, args=ARGS):
    return subprocess.Popen([sys.executable, "-m", "lorafit", "train", *args, "--out", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _wait_mid_epoch(proc, run, min_step=3):
    deadline = time.time() + 300
    while time.time() < deadline:
        epoch, step = _step(run)
        if epoch == 1 and step >= min_step:
            return step
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.01)
    raise AssertionError("training never reached the middle of epoch 1")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("ref") / "run"
    r = lorafit("train", *ARGS, "--out", str(run))
    assert r.returncode == 0, r.stderr[-2000:]
    return run


def _assert_same(run, reference):
    assert _metrics(run) == _metrics(reference)
    a = json.loads((run / "final.json").read_text())
    b = json.loads((reference / "final.json").read_text())
    assert (a["test_accuracy"], a["test_loss"], a["best_epoch"]) == (b["test_accuracy"], b["test_loss"],
                                                                     b["best_epoch"])
    wa = load_file(run / "adapter" / "adapter_model.safetensors")
    wb = load_file(reference / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(reference, tmp_path):
    run = tmp_path / "run"
    proc = _start(run)
    step = _wait_mid_epoch(proc, run)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "final.json").exists()
    assert step < 12  # 96 examples / batch 8 = 12 steps in epoch 1: killed inside it
    # The checkpoint records the killed process's peak memory; the resumed run reports the max over both
    # processes. Pretend the first one peaked far higher than any process here can.
    ckpt = run / "checkpoint.safetensors"
    with safe_open(str(ckpt), "pt") as f:
        meta = json.loads(f.metadata()["lorafit"])
    assert meta["peak_memory_mb"] > 100
    save_file(load_file(ckpt), ckpt, metadata={"lorafit": json.dumps({**meta, "peak_memory_mb": 123_456.0})})
    r = lorafit("train", "--resume", str(run), "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed at epoch 1" in r.stdout
    _assert_same(run, reference)
    assert json.loads((run / "final.json").read_text())["peak_memory_mb"] == 123_456.0
    assert json.loads((reference / "final.json").read_text())["peak_memory_mb"] < 123_456.0


def test_sigkill_resume_bf16_equals_uninterrupted(tmp_path):
    """bf16 autocast: the resumed run equals the uninterrupted one too (tolerance 0: CPU kernels are deterministic)."""
    args = [a if a != "fp32" else "bf16" for a in ARGS]
    reference = tmp_path / "ref"
    r = lorafit("train", *args, "--out", str(reference))
    assert r.returncode == 0, r.stderr[-2000:]
    run = tmp_path / "run"
    proc = _start(run, args)
    _wait_mid_epoch(proc, run)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    r = lorafit("train", "--resume", str(run), "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    _assert_same(run, reference)


def test_ctrl_c_saves_checkpoint_and_says_how_to_resume(reference, tmp_path):
    run = tmp_path / "run"
    proc = _start(run)
    _wait_mid_epoch(proc, run, min_step=2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert f"continue with: lorafit train --resume {run}" in err and "Traceback" not in err
    r = lorafit("train", "--resume", str(run), "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    _assert_same(run, reference)


def test_sigkill_during_checkpoint_write_keeps_previous(tmp_path):
    """A writer killed at random moments while rewriting a large checkpoint never leaves a broken one."""
    script = (
        "import sys, torch\n"
        "from pathlib import Path\n"
        "from lorafit.checkpoint import save_checkpoint\n"
        "run = Path(sys.argv[1])\n"
        "i = 0\n"
        "while True:\n"
        "    save_checkpoint(run, {'param.w': torch.full((4_000_000,), float(i))}, {'epoch': 1, 'step': i})\n"
        "    print(i, flush=True)\n"
        "    i += 1\n")
    from lorafit.checkpoint import load_checkpoint

    for delay in (0.35, 0.5, 0.65):
        proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # one complete checkpoint exists
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        tensors, meta = load_checkpoint(tmp_path / "checkpoint.safetensors")
        assert (tensors["param.w"] == meta["step"]).all()


def test_resume_errors(tmp_path):
    r = lorafit("train", "--resume", str(tmp_path / "nope"))
    assert r.returncode == 2 and "does not exist" in r.stderr
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"strategy": "lora"}))
    r = lorafit("train", "--resume", str(tmp_path / "run"))
    assert r.returncode == 2 and "no complete checkpoint to resume from" in r.stderr and "Traceback" not in r.stderr
    r = lorafit("train", "--resume", str(tmp_path / "run"), "--epochs", "5")
    assert r.returncode == 2 and "drop --epochs" in r.stderr


def test_compare_killed_mid_strategy_resumes_and_keeps_finished_runs(reference, tmp_path):
    out = tmp_path / "cmp"
    args = [a for a in ARGS if a not in ("--strategy", "lora")]
    proc = subprocess.Popen([sys.executable, "-m", "lorafit", "compare", *args, "--strategies", "last-two-layers,lora",
                             "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, start_new_session=True)
    _wait_mid_epoch(proc, out / "lora")
    os.killpg(proc.pid, signal.SIGKILL)  # the session ends abruptly: parent and child die together
    proc.wait()
    done = (out / "last-two-layers" / "final.json").read_bytes()
    assert not (out / "lora" / "final.json").exists() and not (out / "report.json").exists()

    r = lorafit("compare", "--resume", str(out), "--epochs", "3")
    assert r.returncode == 2 and "drop --epochs" in r.stderr
    r = lorafit("compare", "--resume", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "=== last-two-layers ===" not in r.stdout and "=== lora ===" in r.stdout
    assert (out / "last-two-layers" / "final.json").read_bytes() == done  # finished strategy kept as it was
    _assert_same(out / "lora", reference)
    report = json.loads((out / "report.json").read_text())
    assert [row["strategy"] for row in report["rows"]] == ["last-two-layers", "lora"]
    assert report["invocations"] == 2 and report["command"].startswith("lorafit compare ")


def test_compare_rejects_unknown_strategy_and_non_compare_resume(tmp_path):
    r = lorafit("compare", "--strategies", "lora,everything", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "unknown strategy everything" in r.stderr and not (tmp_path / "x").exists()
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "config.json").write_text("{}")
    r = lorafit("compare", "--resume", str(tmp_path / "y"))
    assert r.returncode == 2 and "not a `lorafit compare` folder" in r.stderr
