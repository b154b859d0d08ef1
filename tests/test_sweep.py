"""`lorafit sweep`: the grid, resumability, the Pareto report (lorafit/grid.py, api.sweep, cli.py)."""

from __future__ import annotations

import json

import pytest

from cli_helpers import lorafit, lorafit_here
from lorafit.errors import ConfigError
from lorafit.grid import grid_points, pareto_front, parse_grid, run_name

RUNS = ["epochs=1,rank=1", "epochs=1,rank=2", "epochs=2,rank=1", "epochs=2,rank=2"]


def test_grid_from_flags():
    fixed, swept = parse_grid({"rank": ["1,2", "4"], "alpha": ["8"], "targets": ["key,value", "query,value"],
                               "dora": ["true"], "lr": ["none"]})
    assert fixed == {"alpha": 8.0, "dora": True, "lr": None}
    assert swept == {"rank": [1, 2, 4], "targets": [["key", "value"], ["query", "value"]]}
    points = grid_points(swept)
    assert len(points) == 6 and points[1] == {"rank": 1, "targets": ["query", "value"]}
    assert run_name(points[1]) == "rank=1,targets=query+value"
    with pytest.raises(ConfigError, match=r"--rank: 'two' is not a whole number"):
        parse_grid({"rank": ["two"]})
    with pytest.raises(ConfigError, match=r"--dora: 'maybe' is not true or false"):
        parse_grid({"dora": ["maybe"]})


def test_pareto_front():
    rows = [{"val_accuracy": a, "trainable_params": p} for a, p in [(0.80, 100), (0.85, 200), (0.84, 300),
                                                                   (0.85, 400), (0.70, 50)]]
    assert pareto_front(rows) == [True, True, False, False, True]


@pytest.fixture(scope="module")
def swept(tmp_path_factory, tiny_model_dir):
    """A 2 x 2 sweep killed (SIGKILL) in the third run's second validation, then resumed."""
    out = tmp_path_factory.mktemp("sweep") / "s"
    args = ["sweep", "--model", str(tiny_model_dir), "--train-size", "24", "--val-size", "8", "--test-size", "16",
            "--max-length", "32", "--batch-size", "8", "--precision", "fp32", "--epochs", "1,2", "--rank", "1",
            "--rank", "2", "--no-progress", "--out", str(out)]
    first = lorafit(*args, env={"LORAFIT_SIGNAL_AT": "validation@2:KILL"})  # only 2-epoch runs validate twice
    done = {n: (out / n / "final.json").read_bytes() for n in RUNS[:2] if (out / n / "final.json").exists()}
    second = lorafit("sweep", "--resume", str(out), "--no-progress")
    return out, first, done, second


def test_killed_sweep_resumes_without_retraining_finished_runs(swept):
    out, first, done, second = swept
    assert first.returncode == 2 and "the epochs=2,rank=1 run failed" in first.stderr
    assert f"continue with: lorafit sweep --resume {out}" in first.stderr
    assert sorted(done) == RUNS[:2]
    assert second.returncode == 0, second.stderr[-2000:]
    assert "=== epochs=1,rank=1 ===" not in second.stdout and "=== epochs=1,rank=2 ===" not in second.stdout
    assert "resumed at epoch 2" in second.stdout  # the killed run continued from its checkpoint
    assert all((out / n / "final.json").read_bytes() == b for n, b in done.items())
    state = json.loads((out / "sweep_state.json").read_text())
    assert state["runs"] == RUNS and len(state["invocations"]) == 2


def test_every_run_is_a_normal_run_and_the_report_matches_them(swept):
    out = swept[0]
    report = json.loads((out / "report.json").read_text())
    assert [r["run"] for r in report["rows"]] == RUNS and report["swept"] == ["epochs", "rank"]
    for row in report["rows"]:
        run = out / row["run"]
        cfg = json.loads((run / "config.json").read_text())
        final = json.loads((run / "final.json").read_text())
        history = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert (cfg["epochs"], cfg["rank"]) == (row["epochs"], row["rank"]) and len(history) == cfg["epochs"]
        assert cfg["seed"] == 0 and cfg["train_size"] == 24  # the same split and seed for every run
        assert final["sizes"] == {"train": 24, "validation": 8, "test": 16}
        assert (run / "adapter" / "adapter_model.safetensors").exists()
        assert row["test_accuracy"] == final["test_accuracy"]
        assert row["trainable_params"] == final["trainable_params"]
        assert row["val_accuracy"] == history[final["kept_epoch"] - 1]["val_accuracy"]
    rows = report["rows"]
    assert rows[0]["trainable_params"] < rows[1]["trainable_params"]  # rank 1 < rank 2
    best = [r for r in rows if r["best"]]
    assert len(best) == 1 and best[0]["val_accuracy"] == max(r["val_accuracy"] for r in rows)
    assert report["best"]["run"] == best[0]["run"] and best[0]["pareto"]
    md = (out / "report.md").read_text()
    assert "Chosen on validation accuracy" in md and md.count("**best**") == 1
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("grid, message", [
    (["--rank", "0,2"], r"rank (--rank) must be an integer >= 1, got 0"),
    (["--targets", "key,value", "--targets", "nope"], "'nope' matches no module"),
    (["--rank", "two"], "--rank: 'two' is not a whole number"),
])
def test_a_bad_value_in_the_grid_fails_before_any_run(grid, message, tiny_model_dir, tmp_path):
    r = lorafit_here("sweep", "--model", str(tiny_model_dir), "--train-size", "24", "--val-size", "8", "--epochs", "1",
                "--max-length", "32", *grid, "--out", str(tmp_path / "s"))
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "s").exists()


def test_sweep_from_python_equals_the_cli_runs(swept, tiny_model_dir, tmp_path):
    """lorafit.sweep (the CLI is a thin layer over it) trains the same runs from a grid of
    Python values: the two rank-1 and rank-2 one-epoch runs give the CLI sweep's results."""
    import lorafit

    result = lorafit.sweep({"rank": [1, 2]}, model=str(tiny_model_dir), train_size=24, val_size=8, test_size=16,
                           max_length=32, batch_size=8, precision="fp32", epochs=1, progress=False,
                           out=tmp_path / "py")
    assert isinstance(result, lorafit.SweepResult) and sorted(result.runs) == ["rank=1", "rank=2"]
    for rank in (1, 2):
        mine = json.loads((tmp_path / "py" / f"rank={rank}" / "final.json").read_text())
        cli = json.loads((swept[0] / f"epochs=1,rank={rank}" / "final.json").read_text())
        assert mine["test_accuracy"] == cli["test_accuracy"] and mine["trainable_params"] == cli["trainable_params"]
        assert result.runs[f"rank={rank}"].test_accuracy == mine["test_accuracy"]
    assert [r["run"] for r in result.report["rows"]] == ["rank=1", "rank=2"]


@pytest.mark.parametrize("grid", [{"rank": 4}, {"rank": []}, {"rank": "1,2"}])
def test_sweep_from_python_refuses_a_grid_that_is_not_lists(grid, tmp_path):
    import lorafit

    with pytest.raises(ConfigError, match="must be a non-empty list of values"):
        lorafit.sweep(grid, out=tmp_path / "s")
    assert not (tmp_path / "s").exists()
