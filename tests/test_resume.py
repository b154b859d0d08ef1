"""Crash safety: a run killed or interrupted anywhere resumes to the uninterrupted result, bit for bit.

The kill points are named (lorafit.fault_points: `LORAFIT_SIGNAL_AT`), so each test
stops the real CLI exactly where the bug would hide: mid-epoch 1, during validation,
mid-epoch 2 after the first validation, in the middle of a checkpoint write, and
Ctrl-C during validation or a checkpoint write.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cli_helpers import lorafit, lorafit_here
from lorafit.config import RunConfig
from lorafit.precision import cpu_has_bf16
from lorafit.strategies import learning_rate

# 48 examples / batch 8 = 6 optimizer steps per epoch, 12 in all; a checkpoint every 2 steps
BASE = ["--precision", "fp32", "--train-size", "48", "--val-size", "16", "--test-size", "16", "--max-length", "64",
        "--batch-size", "8", "--epochs", "2", "--checkpoint-every", "2", "--no-progress"]
VOLATILE = {"seconds", "tokens_per_s", "samples_per_s"}
CKPT = "checkpoint.safetensors"

# Each stage: the signal plan of one process, and the checkpoint position (epoch, step) it must leave.
KILL_STAGES = [
    ("step@5:KILL", (1, 4)),  # mid-epoch 1, one step after the last checkpoint: step 5 is redone
    ("validation@1:KILL", (1, 4)),  # during epoch 1's validation
    ("step@3:KILL", (2, 6)),  # resumed at step 4: steps 5, 6, validation, epoch-end checkpoint, killed after step 7
    (f"write:{CKPT}@2:KILL", (2, 8)),  # killed inside the write of step 10's checkpoint: step 8's stays
]
# A shorter chain for the configurations whose checkpoint code is the same as lora's (every one: lora's
# full chain covers the kills in epoch 1, in validation and inside a write): killed in epoch 2 after the
# first validation (where validation once rewrote frozen weights), then Ctrl-C in the resumed process.
SHORT_KILL_STAGES = [("step@7:KILL", (2, 6))]  # one step after epoch 1's end-of-epoch checkpoint
CTRL_C_IN_VALIDATION = ("validation@1:INT", (2, 12))  # Ctrl-C in epoch 2's validation: saved at its end
CTRL_C_IN_WRITE_SHORT = (f"write:{CKPT}@1:INT", (2, 8))  # after the short chain (at step 6): step 8's write

MATRIX = {  # name -> flags, kill stages, Ctrl-C stage
    "lora": (["--strategy", "lora"], KILL_STAGES, CTRL_C_IN_VALIDATION),
    "lora-keep-best-probe-head": (["--strategy", "lora", "--keep", "best", "--head-init", "probe"], SHORT_KILL_STAGES,
                                  CTRL_C_IN_WRITE_SHORT),
    "full-probe-head": (["--strategy", "full", "--head-init", "probe"], SHORT_KILL_STAGES, CTRL_C_IN_WRITE_SHORT),
    "last-two-layers-cache": (["--strategy", "last-two-layers", "--cache"], SHORT_KILL_STAGES, CTRL_C_IN_WRITE_SHORT),
    # last-two-layers folds standardization into the head's first layer before step 1 (--standardize, the
    # default): a resumed run must not fold it again; and without the fold
    "last-two-layers-no-standardize": (["--strategy", "last-two-layers", "--no-standardize"], SHORT_KILL_STAGES,
                                       CTRL_C_IN_VALIDATION),
    "last-two-layers-no-cache-probe-head": (["--strategy", "last-two-layers", "--no-cache", "--head-init", "probe"],
                                           SHORT_KILL_STAGES, CTRL_C_IN_VALIDATION),
}


def _metrics(run):
    return [{k: v for k, v in json.loads(x).items() if k not in VOLATILE}
            for x in (run / "metrics.jsonl").read_text().splitlines()]


def _position(run) -> tuple[int, int]:
    with safe_open(str(run / CKPT), "pt") as f:
        meta = json.loads(f.metadata()["lorafit"])
    return meta["epoch"], meta["step"]


def _signalled(*args: str, plan: str | None, env: dict | None = None) -> subprocess.CompletedProcess:
    return lorafit(*args, env={**(env or {}), **({"LORAFIT_SIGNAL_AT": plan} if plan else {})})


def _weights(run) -> dict[str, dict]:
    """Every safetensors file of a finished run (adapter, trained weights, fresh head, last checkpoint)."""
    return {str(p.relative_to(run)): load_file(p) for p in sorted(run.rglob("*.safetensors"))}


def _assert_same(run, reference):
    """Metrics, test results, kept epoch, and every saved tensor (optimizer state included) equal, bit for bit."""
    assert _metrics(run) == _metrics(reference)
    a = json.loads((run / "final.json").read_text())
    b = json.loads((reference / "final.json").read_text())
    keys = ("test_accuracy", "test_f1", "test_loss", "best_epoch", "kept_epoch")
    assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
    wa, wb = _weights(run), _weights(reference)
    assert wa.keys() == wb.keys() and wa
    for name in wa:
        assert wa[name].keys() == wb[name].keys(), name
        differ = [k for k in wa[name] if not (wa[name][k] == wb[name][k]).all()]
        assert not differ, f"{name}: {len(differ)} tensors differ from the uninterrupted run's, e.g. {differ[:3]}"


def _chain(tmp, model_dir, args, kills, ctrl_c) -> dict:
    """The uninterrupted reference, and the same run stopped at every stage and resumed."""
    common = [*args, *BASE, "--model", str(model_dir)]
    ref, run = tmp / "ref", tmp / "run"
    out = {"ref": ref, "run": run, "stages": []}
    out["ref_rc"] = lorafit("train", *common, "--out", str(ref)).returncode
    for k, (plan, _) in enumerate([*kills, ctrl_c]):
        argv = ["train", *common, "--out", str(run)] if k == 0 else ["train", "--resume", str(run), "--no-progress"]
        r = _signalled(*argv, plan=plan)
        stage = {"plan": plan, "rc": r.returncode, "stderr": r.stderr, "stdout": r.stdout,
                 "final": (run / "final.json").exists(), "position": _position(run) if (run / CKPT).exists() else None,
                 "stale_tmp": sorted(p.name for p in run.glob(f".{CKPT}.*.tmp"))}
        out["stages"].append(stage)
        if k == 0 and (run / CKPT).exists():
            # The checkpoint records the killed process's peak memory; the resumed run reports the max over all
            # its processes. Pretend the first one peaked far higher than any process here can.
            with safe_open(str(run / CKPT), "pt") as f:
                meta = json.loads(f.metadata()["lorafit"])
            stage["peak"] = meta["peak_memory_mb"]
            save_file(load_file(run / CKPT), run / CKPT,
                      metadata={"lorafit": json.dumps({**meta, "peak_memory_mb": 123_456.0})})
    r = lorafit("train", "--resume", str(run), "--no-progress")
    out["last"] = {"rc": r.returncode, "stderr": r.stderr, "stdout": r.stdout}
    return out


@pytest.fixture(scope="module")
def chains(tmp_path_factory, tiny_model_dir):
    """All configurations of the matrix, two at a time (each process is mostly Python imports)."""
    def one(name):
        return name, _chain(tmp_path_factory.mktemp(name), tiny_model_dir, *MATRIX[name])

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(one, MATRIX))


@pytest.mark.parametrize("name", list(MATRIX))
def test_stopped_anywhere_resumes_to_the_uninterrupted_run(chains, name):
    c = chains[name]
    assert c["ref_rc"] == 0
    *kills, ctrl_c = c["stages"]
    _, plans, ctrl_c_plan = MATRIX[name]
    expected = [pos for _, pos in [*plans, ctrl_c_plan]]
    for stage, want in zip(c["stages"], expected):
        assert not stage["final"], f"{stage['plan']}: the process finished; the signal never came"
        assert stage["position"] == want, f"{stage['plan']}: checkpoint at {stage['position']}, expected {want}"
    for stage in kills:
        assert stage["rc"] == -signal.SIGKILL, (stage["plan"], stage["stderr"][-2000:])
    assert kills[0]["peak"] > 100
    for stage in kills:
        if stage["plan"].startswith("write:"):
            assert stage["stale_tmp"], "the kill inside the checkpoint write left no temporary file: it came elsewhere"
    # Ctrl-C during validation or a checkpoint write: a checkpoint is saved and the resume command printed
    assert ctrl_c["rc"] == 130, ctrl_c["stderr"][-2000:]
    assert f"continue with: lorafit train --resume {c['run']}" in ctrl_c["stderr"]
    assert "Traceback" not in ctrl_c["stderr"]
    assert c["last"]["rc"] == 0, c["last"]["stderr"][-2000:]
    assert "resumed at epoch 2" in c["last"]["stdout"]
    assert not list(c["run"].glob(f".{CKPT}.*.tmp"))  # the stale temporary file was cleaned up
    _assert_same(c["run"], c["ref"])
    # the tiny BERT is read by its first token: every stage ran the first-token last layer (lorafit.first_token)
    assert json.loads((c["run"] / "config.json").read_text())["last_layer_resolved"] == "first-token"
    assert json.loads((c["run"] / "final.json").read_text())["peak_memory_mb"] == 123_456.0
    assert json.loads((c["ref"] / "final.json").read_text())["peak_memory_mb"] < 123_456.0
    # --head-init probe: fitted once, by the run's first process, and the same fit as the reference's
    probe = "--head-init" in MATRIX[name][0]
    assert ("head init:" in c["stages"][0]["stdout"]) == probe
    assert not any("head init:" in stage["stdout"] for stage in c["stages"][1:]) and "head init:" not in c["last"][
        "stdout"]
    fits = [json.loads((run / "config.json").read_text()).get("head_init_probe") for run in (c["run"], c["ref"])]
    assert (fits[0] is not None) == probe and (probe or fits == [None, None])
    if probe:
        assert fits[0]["l2"] == fits[1]["l2"] and fits[0]["val_loss"] == fits[1]["val_loss"]
    # --standardize (last-two-layers' default): folded once, by the first process, as the reference folded it;
    # the fold changes the run
    flags = MATRIX[name][0]
    folded = "last-two-layers" in flags and "--no-standardize" not in flags
    assert ("reads standardized features" in c["stages"][0]["stdout"]) == folded
    assert not any("standardized" in stage["stdout"] for stage in [*c["stages"][1:], c["last"]])
    stats = [json.loads((run / "config.json").read_text()).get("standardized") for run in (c["run"], c["ref"])]
    assert stats[0] == stats[1] and (stats[0] is not None) == folded
    if name == "last-two-layers-cache":
        plain = load_file(chains["last-two-layers-no-standardize"]["ref"] / "trained.safetensors")
        mine = load_file(c["ref"] / "trained.safetensors")
        assert plain.keys() == mine.keys() and any(not torch.equal(plain[k], mine[k]) for k in plain)


@pytest.mark.skipif(not cpu_has_bf16(), reason="--precision auto measures only on a CPU with bf16 instructions")
def test_sigkill_resume_bf16_equals_uninterrupted(tmp_path, tiny_model_dir, monkeypatch):
    """bf16 autocast: the resumed run equals the uninterrupted one too (tolerance 0: CPU kernels are deterministic).

    Under `--precision auto` and `--attention auto` the precision and the kernel are timed
    and cached per machine; a run killed in epoch 2 resumes with the precision and kernel
    it recorded, even when the cached choices have changed since (another CPU, a
    re-timing): otherwise its remaining steps run other numerics. The precision cache is
    seeded with bf16 for this run's shapes, so the test runs bf16 on any such CPU."""
    from transformers import AutoConfig

    from lorafit.measured import machine_key
    from lorafit.precision import model_dims

    cache = tmp_path / "cache"
    cache.mkdir()
    env = {"LORAFIT_CACHE": str(cache)}
    dims = model_dims(AutoConfig.from_pretrained(tiny_model_dir), 8, 64)  # BASE's batch size and max_length
    key = machine_key("linears " + "x".join(map(str, dims)))
    (cache / "precision.json").write_text(json.dumps({key: {"choice": "bf16"}}))
    args = ["train", "--strategy", "lora", *[a if a != "fp32" else "auto" for a in BASE], "--model",
            str(tiny_model_dir), "--attention", "auto"]
    reference = tmp_path / "ref"
    r = lorafit(*args, "--out", str(reference), env=env)
    assert r.returncode == 0 and "cpu bf16" in r.stdout, r.stderr[-2000:]
    chosen = json.loads((reference / "final.json").read_text())["attention"]
    run = tmp_path / "run"
    r = _signalled(*args, "--out", str(run), plan="step@8:KILL", env=env)
    assert r.returncode == -signal.SIGKILL and _position(run) == (2, 8)
    recorded = json.loads((run / "config.json").read_text())
    assert (recorded["precision_resolved"], recorded["attention_resolved"]) == ("bf16", chosen)
    timings = json.loads((cache / "attention.json").read_text())
    assert [v["choice"] for v in timings.values()] == [chosen]
    other = {"sdpa": "sdpa-fp32", "sdpa-fp32": "sdpa"}[chosen]
    (cache / "attention.json").write_text(json.dumps({k: {**v, "choice": other} for k, v in timings.items()}))
    (cache / "precision.json").write_text(json.dumps({key: {"choice": "fp32"}}))
    r = lorafit("train", "--resume", str(run), "--no-progress", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "cpu bf16" in r.stdout and f"attention {chosen}" in r.stdout
    final = json.loads((run / "final.json").read_text())
    assert (final["precision"], final["attention"]) == ("bf16", chosen)
    _assert_same(run, reference)
    # controls (in this process: what they check is the reading of the caches): a fresh run reads the flipped
    # caches (the precision one, then under bf16 the attention one)
    monkeypatch.setenv("LORAFIT_CACHE", str(cache))
    fresh = lorafit_here(*args, "--epochs", "1", "--out", str(tmp_path / "fresh"))
    assert fresh.returncode == 0 and "cpu fp32" in fresh.stdout, fresh.stderr[-2000:]
    forced = list(args)
    forced[args.index("--precision") + 1] = "bf16"
    fresh = lorafit_here(*forced, "--epochs", "1", "--out", str(tmp_path / "fresh-bf16"))
    assert fresh.returncode == 0 and f"attention {other}" in fresh.stdout, fresh.stderr[-2000:]


def test_a_run_recorded_with_the_full_last_layer_resumes_with_it(tmp_path, tiny_model_dir):
    """A run killed in epoch 2 whose config.json records the full last layer
    (`--last-layer full`), or records nothing (runs from before the first-token layer),
    resumes with the full layer, though the tiny BERT's cls head gets the first-token
    layer by default, and equals the uninterrupted full-layer run bit for bit. The
    first-token run's weights differ from that run's in their last bits, so a resume
    with the wrong layer would show here."""
    import torch

    common = ["train", "--strategy", "full", *BASE, "--model", str(tiny_model_dir)]
    reference, first = tmp_path / "ref", tmp_path / "first-token"
    with ThreadPoolExecutor(max_workers=2) as pool:
        r_ref, r_first = pool.map(lambda argv: lorafit(*argv), [
            [*common, "--last-layer", "full", "--out", str(reference)], [*common, "--out", str(first)]])
    assert r_ref.returncode == 0 and "last layer full" in r_ref.stdout, r_ref.stderr[-2000:]
    assert r_first.returncode == 0 and "last layer first-token" in r_first.stdout, r_first.stderr[-2000:]
    a, b = load_file(reference / "trained.safetensors"), load_file(first / "trained.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a), "the control cannot tell the two layers apart"
    killed = tmp_path / "run-full"
    r = _signalled(*common, "--last-layer", "full", "--out", str(killed), plan="step@9:KILL")
    assert r.returncode == -signal.SIGKILL and _position(killed) == (2, 8), r.stderr[-2000:]
    config = json.loads((killed / "config.json").read_text())
    assert (config["last_layer"], config["last_layer_resolved"]) == ("full", "full")
    unrecorded = tmp_path / "run-unrecorded"  # the same killed run, as written before --last-layer and its record
    shutil.copytree(killed, unrecorded)
    del config["last_layer"], config["last_layer_resolved"]
    (unrecorded / "config.json").write_text(json.dumps(config))
    for run in (killed, unrecorded):
        r = lorafit("train", "--resume", str(run), "--no-progress")
        assert r.returncode == 0 and "last layer full" in r.stdout, r.stderr[-2000:]
        assert json.loads((run / "final.json").read_text())["last_layer"] == "full"
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
    r = lorafit_here("train", "--resume", str(tmp_path / "nope"))
    assert r.returncode == 2 and "does not exist" in r.stderr
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"strategy": "lora"}))
    r = lorafit_here("train", "--resume", str(tmp_path / "run"))
    assert r.returncode == 2 and "no complete checkpoint to resume from" in r.stderr and "Traceback" not in r.stderr
    r = lorafit_here("train", "--resume", str(tmp_path / "run"), "--epochs", "5")
    assert r.returncode == 2 and "drop --epochs" in r.stderr


def test_compare_killed_mid_strategy_resumes_and_keeps_finished_runs(chains, tiny_model_dir, tmp_path):
    out = tmp_path / "cmp"
    # lora's child stops itself (SIGSTOP) inside its adapter write; then the whole session dies at once
    proc = subprocess.Popen([sys.executable, "-m", "lorafit", "compare", *BASE, "--model", str(tiny_model_dir),
                             "--strategies", "last-two-layers,lora", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1",
                                 "LORAFIT_SIGNAL_AT": "write:adapter_model.safetensors@1:STOP"})
    deadline = time.time() + 300
    while not list((out / "lora" / "adapter").glob(".adapter_model.safetensors.*.tmp")):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the session ends abruptly: parent and child die together
    proc.wait()
    done = (out / "last-two-layers" / "final.json").read_bytes()
    assert not (out / "lora" / "final.json").exists() and not (out / "report.json").exists()

    r = lorafit_here("compare", "--resume", str(out), "--epochs", "3")
    assert r.returncode == 2 and "drop --epochs" in r.stderr
    r = lorafit("compare", "--resume", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "=== last-two-layers ===" not in r.stdout and "=== lora ===" in r.stdout
    assert (out / "last-two-layers" / "final.json").read_bytes() == done  # finished strategy kept as it was
    assert sorted(p.name for p in (out / "lora" / "adapter").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"]  # the killed writer's temporary file is gone
    _assert_same(out / "lora", chains["lora"]["ref"])
    _assert_same(out / "last-two-layers", chains["last-two-layers-cache"]["ref"])
    report = json.loads((out / "report.json").read_text())
    assert [row["strategy"] for row in report["rows"]] == ["last-two-layers", "lora"]
    assert report["invocations"] == 2 and report["command"].startswith("lorafit compare ")


def test_compare_rejects_unknown_strategy_and_non_compare_resume(tmp_path):
    r = lorafit_here("compare", "--strategies", "lora,everything", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "unknown strategy everything" in r.stderr and not (tmp_path / "x").exists()
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "config.json").write_text("{}")
    r = lorafit_here("compare", "--resume", str(tmp_path / "y"))
    assert r.returncode == 2 and "not a `lorafit compare` folder" in r.stderr


def test_skewed_run_killed_in_a_later_epoch_resumes_with_its_recorded_recipe(tmp_path, tiny_model_dir):
    """Small skewed data: the recipe raises the epochs (--min-steps) and weights the classes.
    Killed in epoch 3 of 4, with config.json's own settings then changed so that resolving
    them again would give 3 epochs and no weights, the run resumes with what it recorded and
    equals the uninterrupted run bit for bit."""
    import csv
    import random

    rng = random.Random(0)
    words = "film plot acting dull bright slow warm cold long short loud quiet fine poor".split()
    data = tmp_path / "skewed.csv"
    with open(data, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label", "split"])
        for i in range(64):
            label = "spam" if i % 5 == 0 else "ham"  # 20% spam: skewed, so class weights apply
            w.writerow([" ".join(rng.choices(words, k=rng.randint(3, 30))), label, "test" if i % 4 == 0 else "train"])
    common = ["--strategy", "lora", "--data", str(data), "--model", str(tiny_model_dir), "--precision", "fp32",
              "--max-length", "64", "--batch-size", "8", "--val-size", "8", "--min-steps", "16",
              "--checkpoint-every", "2", "--no-progress"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    r = lorafit("train", *common, "--out", str(ref))
    assert r.returncode == 0 and "epochs: 4 instead of 3" in r.stdout, r.stderr[-2000:]
    recorded = json.loads((ref / "config.json").read_text())
    assert recorded["epochs_resolved"] == 4 and recorded["class_weights_resolved"] is not None
    r = _signalled("train", *common, "--out", str(run), plan="step@11:KILL")  # 5 steps an epoch: in epoch 3
    assert r.returncode == -signal.SIGKILL and _position(run) == (3, 10), r.stderr[-2000:]
    config = json.loads((run / "config.json").read_text())
    assert {k: config[k] for k in ("epochs_resolved", "class_weights_resolved", "select_on")} == {
        k: recorded[k] for k in ("epochs_resolved", "class_weights_resolved", "select_on")}
    config.update(min_steps=0, class_weights="none")  # resolved again, these would give 3 epochs and no weights
    (run / "config.json").write_text(json.dumps(config))
    r = lorafit("train", "--resume", str(run), "--no-progress")
    assert r.returncode == 0 and "resumed at epoch 3" in r.stdout, r.stderr[-2000:]
    assert json.loads((run / "final.json").read_text())["epochs"] == 4
    _assert_same(run, ref)


def test_lr_auto_run_killed_after_its_search_resumes_without_searching_again(tmp_path, tiny_model_dir):
    """`--lr auto`: a run killed in epoch 2 of its training (after the three trials) resumes
    with the rate it recorded, runs no trial again, and equals the uninterrupted run bit for
    bit; Ctrl-C inside the search says that nothing is saved, and a resume of that run says
    there is no checkpoint to resume from."""
    common = ["--strategy", "lora", "--model", str(tiny_model_dir), "--lr", "auto", "--checkpoint-every", "2",
              "--train-size", "40", "--val-size", "8", "--test-size", "8", "--max-length", "64", "--batch-size", "8",
              "--epochs", "3", "--precision", "fp32", "--no-progress"]
    ref, run, early = tmp_path / "ref", tmp_path / "run", tmp_path / "early"
    r = lorafit("train", *common, "--out", str(ref))
    assert r.returncode == 0 and r.stdout.count("lr auto: trial") == 3, r.stderr[-2000:]
    recorded = json.loads((ref / "config.json").read_text())
    assert len(recorded["lr_search"]["trials"]) == 3 and recorded["lr"] == "auto"
    # 5 steps an epoch; each trial trains 1 of the 3 epochs: 15 trial steps, then the run's own (a checkpoint every 2)
    r = _signalled("train", *common, "--out", str(run), plan="step@22:KILL")
    assert r.returncode == -signal.SIGKILL and _position(run) == (2, 6), r.stderr[-2000:]  # step 7: kept 6
    r = lorafit("train", "--resume", str(run), "--no-progress")
    assert r.returncode == 0 and "resumed at epoch 2" in r.stdout and "lr auto: trial" not in r.stdout, r.stderr[-2000:]
    assert json.loads((run / "config.json").read_text())["lr_resolved"] == recorded["lr_resolved"]
    _assert_same(run, ref)
    r = _signalled("train", *common, "--out", str(early), plan="step@12:INT")  # Ctrl-C in trial 3
    assert r.returncode == 130 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert json.loads((early / "config.json").read_text())["lr_resolved"] is None
    top = 2 * learning_rate(RunConfig())  # trial 3 tries twice lora's default rate
    assert f"interrupted in --lr auto's trial 3 of 3 (lr {top:g}), before the run's own training" in r.stderr
    r = lorafit_here("train", "--resume", str(early), "--no-progress")
    assert r.returncode == 2 and "no complete checkpoint to resume from; start it again with --overwrite" in r.stderr
    assert "Traceback" not in r.stderr
