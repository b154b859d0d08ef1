"""Experiment tracking: a run's config, per-step loss and learning rate, per-epoch metrics,
test results and curves figure, sent to TensorBoard and/or MLflow (`--report-to`).

- tensorboard: event files in the run folder (`<run>/tensorboard/`): scalars
  `train/loss`, `train/lr` per optimizer step, `epoch/<metric>` per epoch, `test/<metric>`,
  the config as hyperparameters and text, the curves figure as an image.
- mlflow: a run in experiment `lorafit` of the store `MLFLOW_TRACKING_URI` names, else a
  local file store `./mlruns` (MLflow 3 keeps that store in maintenance mode; set
  `MLFLOW_TRACKING_URI=sqlite:///mlflow.db` for its database store): params (the config),
  the same metric names as TensorBoard's, the curves figure as an artifact. A resumed
  lorafit run continues the same MLflow run (`<run>/tracking.json`).

Both are optional: `pip install 'lorafit[tracking]'`. Asked for and not installed, the
run stops before training with a message saying so.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lorafit.errors import ConfigError

TRACKERS = ("tensorboard", "mlflow")
_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow"}


def check_available(names: list[str]) -> None:
    """Raises ConfigError naming the package to install for each tracker that is missing."""
    import importlib.util

    for name in names:
        if importlib.util.find_spec(_PACKAGES[name]) is None:
            raise ConfigError(f"--report-to {name} needs the {_PACKAGES[name]} package, which is not installed: "
                              f"pip install 'lorafit[tracking]' (or pip install {_PACKAGES[name]}), or drop "
                              f"{name} from --report-to")


def _hparam(v):
    return v if isinstance(v, (int, float, str, bool)) else json.dumps(v)


class Tracker:
    """Sends one run's records to the trackers named; every method is a no-op without any."""

    def __init__(self, names: list[str], run_dir: Path, config: dict, run_name: str, resume: bool = False) -> None:
        check_available(names)
        self.tb = self.mlflow = self.run_id = None
        state_path = run_dir / "tracking.json"
        state = json.loads(state_path.read_text()) if resume and state_path.exists() else {}
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
            if not resume:
                self.tb.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```")
        if "mlflow" in names:
            from mlflow.tracking import MlflowClient

            uri = os.environ.get("MLFLOW_TRACKING_URI")
            if not uri:  # a local file store, as MLflow 2 made by default
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
                uri = "file:" + str(Path("mlruns").resolve())
            self.mlflow = MlflowClient(uri)
            self.run_id = state.get("mlflow_run_id")
            if self.run_id is None:
                exp = self.mlflow.get_experiment_by_name("lorafit")
                exp_id = exp.experiment_id if exp else self.mlflow.create_experiment("lorafit")
                self.run_id = self.mlflow.create_run(exp_id, run_name=run_name).info.run_id
                for k, v in config.items():
                    self.mlflow.log_param(self.run_id, k, _hparam(v))
            else:
                self.mlflow.update_run(self.run_id, status="RUNNING")
            state = {"mlflow_tracking_uri": uri, "mlflow_run_id": self.run_id}
            from lorafit.files import atomic_write_bytes

            atomic_write_bytes(state_path, (json.dumps(state, indent=2) + "\n").encode())
        self.config = config

    def step(self, step: int, loss: float, lr: float) -> None:
        """After optimizer step `step` (1-based): its mean training loss and learning rate."""
        if self.tb:
            self.tb.add_scalar("train/loss", loss, step)
            self.tb.add_scalar("train/lr", lr, step)
        if self.mlflow:
            self.mlflow.log_metric(self.run_id, "train/loss", loss, step=step)
            self.mlflow.log_metric(self.run_id, "train/lr", lr, step=step)

    def epoch(self, row: dict) -> None:
        """One metrics.jsonl row."""
        for k, v in row.items():
            if k == "epoch" or not isinstance(v, (int, float)):
                continue
            if self.tb:
                self.tb.add_scalar(f"epoch/{k}", v, row["epoch"])
            if self.mlflow:
                self.mlflow.log_metric(self.run_id, f"epoch/{k}", v, step=row["epoch"])
        if self.tb:
            self.tb.flush()

    def finish(self, final: dict, curves: Path | None) -> None:
        """The test results and the curves figure; closes the trackers."""
        test = {k: v for k, v in final.items() if k.startswith("test_") and isinstance(v, (int, float))}
        if self.tb:
            for k, v in test.items():
                self.tb.add_scalar(f"test/{k.removeprefix('test_')}", v, 0)
            self.tb.add_hparams({k: _hparam(v) for k, v in self.config.items() if v is not None}, test, run_name=".")
            if curves is not None and curves.exists():
                import matplotlib.image

                self.tb.add_image("curves", matplotlib.image.imread(str(curves))[..., :3], 0, dataformats="HWC")
        if self.mlflow:
            for k, v in test.items():
                self.mlflow.log_metric(self.run_id, f"test/{k.removeprefix('test_')}", v)
            if curves is not None and curves.exists():
                self.mlflow.log_artifact(self.run_id, str(curves))
        self.close("FINISHED")

    def close(self, status: str = "FAILED") -> None:
        if self.tb:
            self.tb.close()
            self.tb = None
        if self.mlflow:
            self.mlflow.set_terminated(self.run_id, status=status)
            self.mlflow = None
