"""`--precision auto`: bf16 only where this CPU's linear layers are measured faster in it."""

from __future__ import annotations

import json
import math

import pytest
import torch

import lorafit.precision as precision_mod
from cli_helpers import TINY, lorafit, lorafit_here
from lorafit.measured import machine_key
from lorafit.precision import BF16_MARGIN, cpu_has_bf16, model_dims, resolve_precision, time_linears

CPU = torch.device("cpu")


@pytest.fixture
def stubbed(tmp_path, monkeypatch):
    """A CPU with bf16 instructions whose timing returns `times` (and logs each call)."""
    monkeypatch.setenv("LORAFIT_CACHE", str(tmp_path))
    monkeypatch.setattr(precision_mod, "cpu_has_bf16", lambda: True)
    state = {"times": {"bf16": 1.0, "fp32": 2.0}, "timed": []}
    monkeypatch.setattr(precision_mod, "time_linears",
                        lambda *dims: state["timed"].append(dims) or dict(state["times"]))
    return state


def test_auto_decides_once_per_machine_and_dims(stubbed, tmp_path):
    dims = (4096, 384, 1536)
    assert resolve_precision("fp32", CPU, dims) == "fp32" and resolve_precision("bf16", CPU, dims) == "bf16"
    assert not stubbed["timed"]  # an explicit choice is not timed
    assert resolve_precision("auto", CPU, dims) == "bf16"
    stubbed["times"] = {"bf16": 1.0, "fp32": 0.5}  # a re-timing would now say fp32; the cache answers
    assert resolve_precision("auto", CPU, dims) == "bf16"
    assert stubbed["timed"] == [dims]
    cache = json.loads((tmp_path / "precision.json").read_text())
    assert list(cache) == [machine_key("linears 4096x384x1536")] and cache[machine_key("linears 4096x384x1536")][
        "choice"] == "bf16"
    assert resolve_precision("auto", CPU, (512, 32, 64)) == "fp32"  # other dims: timed again
    assert resolve_precision("auto", CPU) == "bf16"  # no dims: the default model's, already cached
    assert stubbed["timed"] == [dims, (512, 32, 64)]


@pytest.mark.parametrize("fp32_seconds, expected", [(BF16_MARGIN * 1.0 - 0.01, "fp32"), (BF16_MARGIN * 1.0, "bf16"),
                                                    (1.0, "fp32"), (0.5, "fp32")])
def test_bf16_needs_a_clear_win(stubbed, fp32_seconds, expected):
    """On a near tie fp32 wins: it is the more precise, and skips autocast's casts."""
    stubbed["times"] = {"bf16": 1.0, "fp32": fp32_seconds}
    assert resolve_precision("auto", CPU, (64, 8, 8)) == expected


def test_a_cpu_without_bf16_instructions_runs_fp32_untimed(stubbed, monkeypatch, tmp_path):
    monkeypatch.setattr(precision_mod, "cpu_has_bf16", lambda: False)
    assert resolve_precision("auto", CPU, (4096, 384, 1536)) == "fp32"
    assert not stubbed["timed"] and not (tmp_path / "precision.json").exists()


def test_a_corrupt_cache_is_measured_again_and_rewritten(stubbed, tmp_path):
    (tmp_path / "precision.json").write_text("{not json")
    assert resolve_precision("auto", CPU, (64, 8, 8)) == "bf16"
    assert len(stubbed["timed"]) == 1
    assert json.loads((tmp_path / "precision.json").read_text())[machine_key("linears 64x8x8")]["choice"] == "bf16"


def test_the_timing_runs_both_precisions():
    seconds = time_linears(256, 32, 64, trials=2)
    assert set(seconds) == {"bf16", "fp32"}
    assert all(math.isfinite(s) and s > 0 for s in seconds.values())


def test_model_dims_read_bert_and_distilbert_configs():
    from transformers import BertConfig, DistilBertConfig

    assert model_dims(BertConfig(hidden_size=384, intermediate_size=1536), 16, 256) == (4096, 384, 1536)
    assert model_dims(DistilBertConfig(dim=768, hidden_dim=3072), 8, 64) == (512, 768, 3072)
    assert model_dims(BertConfig(), 32, 512)[0] == 4096  # tokens capped


@pytest.mark.skipif(not cpu_has_bf16(), reason="--precision auto measures only on a CPU with bf16 instructions")
def test_a_run_records_its_precision_and_evaluating_it_uses_the_same(tiny_model_dir, tmp_path, monkeypatch):
    """The cache says bf16 for the run's shapes: the run trains and tests in bf16 and records
    it; after the cache flips to fp32, `lorafit evaluate` still computes in bf16 and gives
    the run's test numbers exactly (fp32 would not), while a new run's resolution, for the
    same shapes, reads the flip."""
    from transformers import AutoConfig

    from lorafit.api import load_run

    cache = tmp_path / "cache"
    cache.mkdir()
    env = {"LORAFIT_CACHE": str(cache)}
    dims = model_dims(AutoConfig.from_pretrained(tiny_model_dir), 16, 64)  # the run's batch size and max_length
    key = machine_key("linears " + "x".join(map(str, dims)))
    (cache / "precision.json").write_text(json.dumps({key: {"choice": "bf16"}}))
    run = tmp_path / "run"
    r = lorafit("train", "--model", str(tiny_model_dir), *TINY, "--out", str(run), env=env)
    assert r.returncode == 0 and "cpu bf16" in r.stdout, r.stderr[-2000:]
    final = json.loads((run / "final.json").read_text())
    assert json.loads((run / "config.json").read_text())["precision_resolved"] == final["precision"] == "bf16"
    (cache / "precision.json").write_text(json.dumps({key: {"choice": "fp32"}}))
    monkeypatch.setenv("LORAFIT_CACHE", str(cache))  # for the in-process evaluate and what follows
    r = lorafit_here("evaluate", str(run), "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout)
    assert (got["test_accuracy"], got["test_loss"]) == (final["test_accuracy"], final["test_loss"])
    assert load_run(run).precision == "bf16"
    fp32 = load_run(run)
    fp32.precision = "fp32"  # the control: in the flipped cache's precision the numbers differ
    assert fp32.evaluate()["test_loss"] != final["test_loss"]
    assert resolve_precision("auto", CPU, dims) == "fp32"


ZEN4 = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\n\n"
ZEN5 = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: AMD EPYC\n\n"


def test_cpu_description_tells_apart_cpus_with_the_same_generic_name():
    """Two virtual machines both named 'AMD EPYC' (Zen 4, Zen 5: bf16 peaks 0.41 and 0.90 TFLOP/s)
    must not share a measured decision or a benchmark's saved peak."""
    from lorafit.machine import describe_cpu

    assert describe_cpu(ZEN4) == "AMD EPYC (family 25, model 17)"
    assert describe_cpu(ZEN5) == "AMD EPYC (family 26, model 2)"
    assert describe_cpu(ZEN4 + ZEN5.replace("processor\t: 0", "processor\t: 1")) == describe_cpu(ZEN4)
    assert describe_cpu("model name\t: Some CPU\n") == "Some CPU"  # no family/model lines: the name alone
    assert describe_cpu("processor\t: 0\nflags\t: fpu\n") is None


def test_the_quick_matmul_peak_times_one_product_where_one_is_slower_than_a_trial(monkeypatch):
    """A comparison's peak stays a few seconds long where a dtype is emulated: a product slower
    than a trial is timed once (the second, warm one) instead of filling the trials; a fast one
    fills them. Here a trial of 1 ns makes every product 'slow'."""
    import lorafit.machine as machine

    calls = []
    real = machine.gemm_flops
    monkeypatch.setattr(machine, "gemm_flops", lambda *a, **k: calls.append(a) or real(*a, **k))
    monkeypatch.setattr(machine, "PEAK_SIZE", 256)
    fast = machine.matmul_peak()
    assert len(calls) == 2 and fast["bf16_tflops"] > 0 and fast["fp32_tflops"] > 0
    monkeypatch.setattr(machine, "PEAK_SECONDS", 1e-9)
    slow = machine.matmul_peak()
    assert len(calls) == 2 and slow["bf16_tflops"] > 0 and slow["fp32_tflops"] > 0  # no trials: one product each
    assert "256x256x256 product" in slow["method"]
