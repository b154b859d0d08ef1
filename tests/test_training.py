"""The training loop's behaviour (lorafit/train.py), with the real embedded model and data."""

from __future__ import annotations

import copy

import json

import numpy as np
import pytest
import torch

import lorafit.training as train_mod
from lorafit.config import RunConfig
from lorafit.data import load_dataset
from lorafit.data.encoding import encode_split
from lorafit.models import load_model
from lorafit.strategies import STRATEGIES
from lorafit.training import TrainSettings, f1_score, train


def _model(strategy: str):
    loaded = load_model(None, seed=0)
    torch.manual_seed(0)
    STRATEGIES[strategy].setup(loaded.model, RunConfig(strategy=strategy))
    return loaded.model


def test_overfit_drives_training_loss_down(minilm_data):
    enc, pad = minilm_data
    model = _model("full")
    s = TrainSettings(epochs=8, lr=3e-4, batch_size=8, warmup_ratio=0.0, precision="fp32")
    res = train(model, enc["train"], enc["validation"], s, pad_id=pad, device=torch.device("cpu"),
                log=lambda m: None, progress=False)
    losses = [h["train_loss"] for h in res.history]
    assert losses[-1] < 0.5 * losses[0]
    assert res.history[-1]["train_accuracy"] >= 0.9


@pytest.mark.parametrize("keep, select_on, best, kept", [("best", "accuracy", 2, 2), ("last", "accuracy", 2, 3),
                                                         ("best", "macro_f1", 1, 1)])
def test_kept_weights_are_the_chosen_epochs(minilm_data, monkeypatch, keep, select_on, best, kept):
    enc, pad = minilm_data
    model = _model("lora")
    # accuracy and macro-F1 disagree: on skewed classes the best epoch by accuracy may predict the majority
    vals = iter([(0.5, 0.6), (0.9, 0.4), (0.7, 0.5)])

    def fake_evaluate(*a, **k):
        acc, macro = next(vals)
        return {"loss": 0.1, "accuracy": acc, "f1": 0.5, "macro_f1": macro}

    monkeypatch.setattr(train_mod, "evaluate", fake_evaluate)
    snaps = []

    def on_epoch(row):
        snaps.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})

    s = TrainSettings(epochs=3, lr=5e-3, batch_size=8, precision="fp32", keep=keep, select_on=select_on)
    res = train(model, enc["train"], enc["validation"], s, pad_id=pad, device=torch.device("cpu"),
                log=lambda m: None, progress=False, on_epoch=on_epoch)
    assert res.best_epoch == best and res.kept_epoch == kept
    now = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(torch.equal(now[n], snaps[kept - 1][n]) for n in now)
    other = 3 if kept != 3 else 2
    assert not all(torch.equal(now[n], snaps[other - 1][n]) for n in now)


def test_same_seed_same_results_fp32(minilm_data):
    enc, pad = minilm_data
    runs = []
    for _ in range(2):
        model = _model("lora")
        s = TrainSettings(epochs=1, lr=1e-3, batch_size=8, precision="fp32")
        res = train(model, enc["train"], enc["validation"], s, pad_id=pad, device=torch.device("cpu"),
                    log=lambda m: None, progress=False)
        runs.append((res.history[0]["train_loss"], res.history[0]["val_loss"],
                     {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}))
    assert runs[0][:2] == runs[1][:2]
    assert all(torch.equal(runs[0][2][n], runs[1][2][n]) for n in runs[0][2])


def test_nan_loss_stops_with_advice(minilm_data):
    enc, pad = minilm_data
    model = _model("lora")
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))
    s = TrainSettings(epochs=1, lr=1e-3, batch_size=8, precision="fp32")
    with pytest.raises(train_mod.TrainingDiverged, match=r"epoch 1, step 1.*Lower the learning rate"):
        train(model, enc["train"], enc["validation"], s, pad_id=pad, device=torch.device("cpu"),
              log=lambda m: None, progress=False)


def test_f1():
    y = np.array([1, 1, 0, 0])
    assert f1_score(y, np.array([1, 0, 0, 0]), 2) == pytest.approx(2 / 3)
    assert f1_score(y, y, 2) == 1.0


def test_full_disk_is_refused_before_training(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from lorafit.errors import RunDirError
    from lorafit.runs import run_training

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 2**20, 2**20))
    with pytest.raises(RunDirError, match="MB free where .* checkpoints need about"):
        run_training(RunConfig(strategy="full", train_size=16, val_size=4, test_size=4), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def _frozen_state(model) -> dict[str, torch.Tensor]:
    """Every parameter that does not train, and every buffer, copied."""
    out = {f"param {n}": p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    out.update({f"buffer {n}": b.detach().clone() for n, b in model.named_buffers()})
    return out


def _assert_untouched(model, before) -> None:
    after = _frozen_state(model)
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"{len(changed)} frozen tensors were written, e.g. {changed[:3]}"


@pytest.mark.parametrize("strategy", ["lora", "last-two-layers", "full"])
def test_frozen_weights_are_bit_identical_after_training_with_validation(minilm_data, strategy):
    """Validation after every epoch (and the checkpoints) never write a frozen parameter or a buffer.

    The bug this guards: validation merged the adapters into the frozen weights and
    unmerged them after; `(W + sBA) - sBA` is not W in floating point."""
    enc, pad = minilm_data
    model = _model(strategy)
    before = _frozen_state(model)
    assert before and (strategy == "full" or any(k.startswith("param") for k in before))
    saved = []
    s = TrainSettings(epochs=3, lr=5e-2, batch_size=8, precision="fp32", keep="best")
    res = train(model, enc["train"], enc["validation"], s, pad_id=pad, device=torch.device("cpu"),
                log=lambda m: None, progress=False, save_state=lambda t, m: saved.append(m["step"]),
                checkpoint_every=1)
    assert len(res.history) == 3 and saved  # validated three times, checkpointed
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained
    _assert_untouched(model, before)


def test_frozen_encoder_untouched_with_the_feature_cache(minilm_data):
    from lorafit.feature_cache import HeadOnCache, extract_features
    from lorafit.strategies import head_layers

    enc, pad = minilm_data
    model = _model("last-two-layers")
    before = _frozen_state(model)
    head = head_layers(model)
    sets = {n: extract_features(model, head[0], enc[n], batch_size=8, pad_id=pad, device=torch.device("cpu"),
                                precision="fp32") for n in ("train", "validation")}
    head_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    s = TrainSettings(epochs=2, lr=5e-2, batch_size=8, precision="fp32")
    train(HeadOnCache(model, *head), sets["train"], sets["validation"], s, pad_id=pad, device=torch.device("cpu"),
          log=lambda m: None, progress=False)
    _assert_untouched(model, before)
    assert all(not torch.equal(p, head_before[n]) for n, p in model.named_parameters() if p.requires_grad)


def test_accumulation_weights_scale_the_last_partial_group_by_its_real_size():
    assert train_mod.accumulation_weights([8, 8, 8, 3], 2) == [0.5, 0.5, 8 / 11, 3 / 11]
    assert train_mod.accumulation_weights([4, 4, 4, 4], 3) == [1 / 3, 1 / 3, 1 / 3, 1.0]
    assert train_mod.accumulation_weights([5, 2], 1) == [1.0, 1.0]


def test_two_micro_batches_of_4_give_the_gradients_of_one_batch_of_8(minilm_data):
    from lorafit.data.batching import collate

    enc, pad = minilm_data
    cpu = torch.device("cpu")
    b = np.arange(8)
    inputs = collate(enc["train"].ids, enc["train"].offsets, b, pad)  # (8, T): the halves share T
    labels = torch.from_numpy(enc["train"].labels[b])
    grads = []
    for parts in ([slice(0, 8)], [slice(0, 4), slice(4, 8)]):
        model = _model("lora").eval()  # dropout off: the two runs draw no different masks
        weights = train_mod.accumulation_weights([p.stop - p.start for p in parts], grad_accum=len(parts))
        for part, w in zip(parts, weights):
            train_mod.forward_backward(model, {k: v[part] for k, v in inputs.items()}, labels[part], w, cpu, "fp32")
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    assert any(g.abs().max() > 1e-4 for g in grads[0].values())  # the comparison is not of zeros
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-6)


def test_the_loop_weights_each_micro_batch_by_its_group(minilm_data, monkeypatch):
    enc, pad = minilm_data
    seen = []
    real = train_mod.forward_backward

    def spy(model, inputs, labels, weight, device, precision, class_weight=None):
        seen.append((len(labels), weight))
        return real(model, inputs, labels, weight, device, precision, class_weight)

    monkeypatch.setattr(train_mod, "forward_backward", spy)
    s = TrainSettings(epochs=1, lr=1e-3, batch_size=4, grad_accum=3, precision="fp32")  # 16 examples: 4 batches
    res = train(_model("lora"), enc["train"], enc["validation"], s, pad_id=pad, device=torch.device("cpu"),
                log=lambda m: None, progress=False)
    assert seen == [(4, 1 / 3)] * 3 + [(4, 1.0)]  # the last group holds one batch: its full gradient
    assert len(res.history) == 1


def test_schedule_warms_up_then_decays_and_the_logged_lr_is_the_scheduled_one(minilm_data):
    model = _model("lora")
    s = TrainSettings(epochs=2, lr=1e-3, batch_size=8, warmup_ratio=0.1, precision="fp32")
    opt, sched = train_mod.make_optimizer(model, s, steps_per_epoch=10)  # 20 steps, 2 of warm-up
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [1e-3 * f for f in (1 / 3, 2 / 3, *[(20 - k) / 18 for k in range(2, 20)])]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert max(lrs) == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-3 / 18)

    enc, pad = minilm_data  # 16 examples, batch 8: 2 steps per epoch, 4 in all, warm-up int(0.4) = 0
    s = TrainSettings(epochs=2, lr=1e-3, batch_size=8, warmup_ratio=0.1, precision="fp32")
    res = train(_model("lora"), enc["train"], enc["validation"], s, pad_id=pad, device=torch.device("cpu"),
                log=lambda m: None, progress=False)
    factor = train_mod.warmup_then_linear_decay(0, 4)
    assert [h["lr"] for h in res.history] == pytest.approx([1e-3 * factor(1), 1e-3 * factor(3)])
    assert res.history[0]["lr"] < 1e-3  # not the peak


def test_the_optimizer_is_fused_adamw_and_steps_as_the_default_does():
    """make_optimizer takes the fused kernel; after the same steps from the same state its
    weights match the default (foreach) AdamW's within fp32 rounding."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    twin, start = copy.deepcopy(model), copy.deepcopy(model)
    s = TrainSettings(epochs=1, lr=1e-2, batch_size=4, weight_decay=0.01, warmup_ratio=0.0)
    opt, _ = train_mod.make_optimizer(model, s, steps_per_epoch=5)
    assert all(g["fused"] for g in opt.param_groups)
    ref = torch.optim.AdamW(train_mod._param_groups(twin, 0.01), lr=1e-2)
    x, y = torch.randn(32, 16), torch.randint(0, 2, (32,))
    for m, o in ((model, opt), (twin, ref)):
        for _ in range(5):
            torch.nn.functional.cross_entropy(m(x), y).backward()
            o.step()
            o.zero_grad()
    for a, b, a0 in zip(model.parameters(), twin.parameters(), start.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        assert (a - a0).abs().max() > 1e-3  # the steps moved every tensor


@pytest.mark.parametrize("max_norm", [0.5, 0.0])
def test_gradients_are_clipped_before_the_step(max_norm):
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 4)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    (model(torch.randn(8, 16)).pow(2).sum() * 100).backward()
    raw = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    assert raw > 10
    at_step = []
    real_step = opt.step
    opt.step = lambda: (at_step.append(torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(p.grad) for p in params])).item()), real_step())
    lr = train_mod.clip_and_step(params, opt, sched, max_norm)
    assert lr == 1e-3 and all(p.grad is None for p in params)
    if max_norm:
        assert at_step[0] == pytest.approx(max_norm, rel=1e-5)
    else:
        assert at_step[0] == pytest.approx(raw.item(), rel=1e-6)


def _chance_threshold(n: int, p_value: float) -> float:
    """The smallest accuracy on n balanced examples that guessing reaches with probability < p_value."""
    from math import comb

    tail = 0.0
    for k in range(n, -1, -1):
        tail += comb(n, k) / 2**n
        if tail >= p_value:
            return (k + 1) / n
    return 0.0


def test_lora_learns_on_a_real_slice():
    """384 real reviews, 3 epochs: the training loss falls and validation accuracy on 300
    held-out reviews rises above what guessing reaches with probability 1e-4 (0.61)."""
    from lorafit.precision import resolve_precision
    from lorafit.training import pick_device

    loaded = load_model(None, seed=0)
    d = load_dataset(None, train_size=384, val_size=300, test_size=8)
    enc = {n: encode_split(getattr(d, n), loaded.tokenizer, 64) for n in ("train", "validation")}
    torch.manual_seed(0)
    STRATEGIES["lora"].setup(loaded.model, RunConfig())
    cpu = torch.device("cpu")
    s = TrainSettings(epochs=3, lr=5e-3, batch_size=16, precision=resolve_precision("auto", cpu))
    res = train(loaded.model, enc["train"], enc["validation"], s, pad_id=loaded.tokenizer.pad_token_id,
                device=pick_device(), log=lambda m: None, progress=False)
    losses = [h["train_loss"] for h in res.history]
    assert losses[-1] < 0.85 * losses[0], losses
    bar = _chance_threshold(300, 1e-4)
    assert 0.6 < bar < 0.62
    assert res.history[-1]["val_accuracy"] >= bar, [h["val_accuracy"] for h in res.history]


def test_checkpoint_state_goes_through_state_dicts_and_follows_the_parameters():
    """The optimizer's state is restored by `load_state_dict`, so it lands on the parameters'
    device and dtype (here: a float64 model reading a checkpoint of a float32 one), and the
    scheduler resumes at its step, not by replaying steps."""
    from lorafit import checkpoint as ckpt

    def setup(dtype):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3)).to(dtype)
        s = TrainSettings(epochs=2, lr=1e-2, batch_size=8, warmup_ratio=0.25)
        return (model, *train_mod.make_optimizer(model, s, steps_per_epoch=4))

    model, opt, sched = setup(torch.float32)
    for _ in range(3):
        model(torch.randn(2, 4)).sum().backward()
        train_mod.clip_and_step(list(model.parameters()), opt, sched, 1.0)
    tensors, meta = ckpt.capture(model, opt, sched, None, {"step": 3}, ckpt.rng_state(torch.device("cpu")))
    meta = json.loads(json.dumps(meta))  # as the checkpoint file stores it
    other, opt2, sched2 = setup(torch.float64)
    ckpt.restore(other, opt2, sched2, tensors, meta)
    assert sched2.last_epoch == 3 and opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
    for p in other.parameters():
        assert opt2.state[p]["exp_avg"].dtype == torch.float64 and opt2.state[p]["exp_avg"].device == p.device
    for p, q in zip(model.parameters(), other.parameters()):
        torch.testing.assert_close(opt2.state[q]["exp_avg_sq"].float(), opt.state[p]["exp_avg_sq"])
