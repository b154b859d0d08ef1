"""--report-to tensorboard,mlflow: the logged values, read back, are the run's own."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cli_helpers import TINY, lorafit, lorafit_here

pytest.importorskip("tensorboard", reason="the tracking extra is not installed (pip install 'lorafit[tracking]')")
pytest.importorskip("mlflow", reason="the tracking extra is not installed (pip install 'lorafit[tracking]')")


def test_tensorboard_and_mlflow_hold_the_runs_values(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # to read the local file store back
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    args = ["train", "--model", str(tiny_model_dir), *TINY, "--epochs", "2", "--batch-size", "8",
            "--report-to", "tensorboard,mlflow", "--out", str(run)]
    r = lorafit(*args, cwd=tmp_path, env={"MLFLOW_TRACKING_URI": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    final = json.loads((run / "final.json").read_text())
    steps = 2 * 3  # 24 reviews / batch 8, 2 epochs

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, steps + 1))
    assert [e.step for e in acc.Scalars("epoch/val_accuracy")] == [1, 2]
    assert [e.value for e in acc.Scalars("epoch/val_accuracy")] == pytest.approx([x["val_accuracy"] for x in rows])
    assert [e.value for e in acc.Scalars("epoch/train_loss")] == pytest.approx([x["train_loss"] for x in rows])
    # the steps' losses, weighted by their examples, average to the epoch's training loss
    assert sum(e.value for e in loss[:3]) / 3 == pytest.approx(rows[0]["train_loss"], rel=1e-5)
    assert acc.Scalars("train/lr")[-1].value == pytest.approx(rows[-1]["lr"])
    assert acc.Scalars("test/accuracy")[0].value == pytest.approx(final["test_accuracy"])
    assert "curves" in acc.Tags()["images"]

    state = json.loads((run / "tracking.json").read_text())
    assert state["mlflow_tracking_uri"] == f"file:{tmp_path / 'mlruns'}"
    client = MlflowClient(state["mlflow_tracking_uri"])
    mlrun = client.get_run(state["mlflow_run_id"])
    assert mlrun.info.status == "FINISHED" and mlrun.info.run_name == "run"
    assert mlrun.data.params["rank"] == "4" and mlrun.data.params["pooling_resolved"] == "cls"
    history = client.get_metric_history(mlrun.info.run_id, "epoch/val_accuracy")
    assert [m.step for m in history] == [x["epoch"] for x in rows]
    assert [m.value for m in history] == pytest.approx([x["val_accuracy"] for x in rows])
    assert len(client.get_metric_history(mlrun.info.run_id, "train/loss")) == steps
    assert mlrun.data.metrics["test/accuracy"] == pytest.approx(final["test_accuracy"])
    assert [a.path for a in client.list_artifacts(mlrun.info.run_id)] == ["curves.png"]


def test_a_missing_tracker_fails_before_training(tiny_model_dir, tmp_path):
    """Asked for and not installed: a clear error naming the extra, and no run folder."""
    code = ("import sys; sys.modules['mlflow'] = None; import importlib.util as u; "
            "real = u.find_spec; u.find_spec = lambda n, *a: None if n == 'mlflow' else real(n, *a); "
            "from lorafit.cli import main; sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, "train", "--model", str(tiny_model_dir), *TINY, "--report-to",
                        "mlflow", "--out", str(tmp_path / "run")], capture_output=True, text=True)
    assert r.returncode == 2
    assert "--report-to mlflow needs the mlflow package, which is not installed: pip install 'lorafit[tracking]'" \
        in r.stderr
    assert not (tmp_path / "run").exists()


def test_unknown_tracker_is_a_config_error(tmp_path):
    r = lorafit_here("train", "--report-to", "wandb", "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and "report_to (--report-to) must be a comma list of tensorboard, mlflow" in r.stderr


def test_a_resumed_run_continues_its_mlflow_run(tiny_model_dir, tmp_path, monkeypatch):
    """Killed mid-epoch 2 and resumed: one MLflow run, FINISHED, with every epoch's metrics."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    run = tmp_path / "run"
    args = ["train", "--model", str(tiny_model_dir), *TINY, "--epochs", "2", "--batch-size", "8",
            "--checkpoint-every", "1", "--report-to", "mlflow", "--out", str(run)]
    r = lorafit(*args, cwd=tmp_path, env={"MLFLOW_TRACKING_URI": "", "LORAFIT_SIGNAL_AT": "step@4:KILL"})
    assert r.returncode != 0 and not (run / "final.json").exists()
    first = json.loads((run / "tracking.json").read_text())["mlflow_run_id"]
    r = lorafit("train", "--resume", str(run), "--no-progress", cwd=tmp_path, env={"MLFLOW_TRACKING_URI": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    state = json.loads((run / "tracking.json").read_text())
    assert state["mlflow_run_id"] == first
    client = MlflowClient(state["mlflow_tracking_uri"])
    exp = client.get_experiment_by_name("lorafit")
    assert [x.info.run_id for x in client.search_runs([exp.experiment_id])] == [first]
    assert client.get_run(first).info.status == "FINISHED"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    history = client.get_metric_history(first, "epoch/val_accuracy")
    assert [m.step for m in history] == [1, 2]
    assert [m.value for m in history] == pytest.approx([x["val_accuracy"] for x in rows])
    assert {m.step for m in client.get_metric_history(first, "train/loss")} == set(range(1, 7))
