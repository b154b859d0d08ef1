"""Many runs of one base model served from one copy of it (lorafit.served): a batch whose rows
name different runs gives each row its run's own logits, as `lorafit predict` computes them."""

from __future__ import annotations

import pytest
import torch

import lorafit
from lorafit.errors import ConfigError
from lorafit.lora import lora_modules
from lorafit.served import ServedGroup

SMALL = dict(train_size=24, val_size=8, test_size=16, max_length=64, epochs=1, precision="fp32", progress=False,
             pooling="mean")
TEXTS = ["A wonderful, moving film.", "Dull and far too long; I left early.", "ok", "The plot made no sense at all.",
         "Superb acting, a script that sings, and an ending I did not see coming.", "meh"]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    model = str(tiny_model_dir)
    return {
        "a": lorafit.train(strategy="lora", model=model, seed=0, out=root / "a", **SMALL).path,
        "b": lorafit.train(strategy="lora", model=model, seed=1, dora=True, targets=["query", "value"],
                           out=root / "b", **SMALL).path,
        "c": lorafit.train(strategy="lora", model=model, seed=2, train_head=False, out=root / "c", **SMALL).path,
        "d": lorafit.train(strategy="last-two-layers", model=model, seed=3, out=root / "d", **SMALL).path,
        "full": lorafit.train(strategy="full", model=model, seed=4, out=root / "full", **SMALL).path,
        "e": lorafit.train(strategy="lora", model=model, seed=5, lora_dropout=0.3, out=root / "e", **SMALL).path,
    }


def test_a_mixed_batch_gives_each_row_its_runs_logits(runs):
    group = ServedGroup.for_run(runs["a"])
    for name in "abcd":
        group.add_run(name, runs[name])
    assert group.members["d"].adapter is None and group.members["a"].adapter == "a"
    # the pooler is the group's own, shared by a run that left it frozen (b: adapters on query and value);
    # a run whose adapter sits on it (a and c, lora's default targets) or that trained it (d) has its own
    heads = {n: group.members[n].head.first for n in "abcd"}
    assert heads["b"] is group._shared_first()
    assert len({id(h) for h in heads.values()}) == 4
    names = ["a", "b", "c", "d", "a", "c"]
    enc = group.tokenizer(TEXTS, truncation=True, max_length=64, padding=True, return_tensors="pt")
    got = torch.stack(group.logits(names, enc["input_ids"], enc["attention_mask"]))
    want = torch.stack([torch.from_numpy(lorafit.load_run(runs[n]).logits([t])[0]) for n, t in zip(names, TEXTS)])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert len({tuple(r.round(decimals=4).tolist()) for r in (got[0], got[1], got[2], got[3])}) == 4


def test_removing_a_run_leaves_the_others_unchanged(runs):
    group = ServedGroup.for_run(runs["a"])
    for name in "abd":
        group.add_run(name, runs[name])
    enc = group.tokenizer(TEXTS[:3], truncation=True, max_length=64, padding=True, return_tensors="pt")
    before = torch.stack(group.logits(["a", "d", "a"], enc["input_ids"], enc["attention_mask"]))
    group.remove("b")
    after = torch.stack(group.logits(["a", "d", "a"], enc["input_ids"], enc["attention_mask"]))
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match="no run named 'b' is served"):
        group.logits(["b"], enc["input_ids"][:1], enc["attention_mask"][:1])


def test_the_groups_lora_layers_follow_runs_that_join_and_leave(runs):
    # the group walks its model for LoRA layers once per change, not per batch: a stale list would
    # route rows to layers that are gone, or miss the ones a new run adds
    group = ServedGroup.for_run(runs["a"])
    group.add_run("d", runs["d"])
    enc = group.tokenizer(TEXTS[:2], truncation=True, max_length=64, padding=True, return_tensors="pt")
    alone = torch.stack(group.logits(["d", "d"], enc["input_ids"], enc["attention_mask"]))
    for _ in range(2):
        group.add_run("a", runs["a"])
        got = torch.stack(group.logits(["a", "d"], enc["input_ids"], enc["attention_mask"]))
        want = torch.from_numpy(lorafit.load_run(runs["a"]).logits(TEXTS[:1]))[0]
        torch.testing.assert_close(got[0], want, atol=1e-5, rtol=0)
        group.remove("a")  # its adapter was the only one: the layers go back to plain Linears
        assert not any(True for _ in lora_modules(group.model))
        torch.testing.assert_close(torch.stack(group.logits(["d", "d"], enc["input_ids"], enc["attention_mask"])),
                                   alone, atol=1e-6, rtol=0)


def test_runs_that_cannot_share_the_base_are_refused(runs):
    group = ServedGroup.for_run(runs["a"])
    with pytest.raises(ConfigError, match="is a full run"):
        group.add_run("full", runs["full"])
    group.add_run("a", runs["a"])
    with pytest.raises(ConfigError, match="is served already"):
        group.add_run("a", runs["b"])


def test_one_adapter_alone_is_merged_and_routing_resumes_when_another_joins(runs):

    group = ServedGroup.for_run(runs["a"])
    group.add_run("a", runs["a"])
    enc = group.tokenizer(TEXTS, truncation=True, max_length=64, padding=True, return_tensors="pt")
    alone = torch.stack(group.logits(["a"] * len(TEXTS), enc["input_ids"], enc["attention_mask"]))
    assert all(layer.merged for _, layer in lora_modules(group.model))  # the base model's forward
    group.add_run("b", runs["b"])
    mixed = torch.stack(group.logits(["a", "b"] * 3, enc["input_ids"], enc["attention_mask"]))
    assert not any(layer.merged for _, layer in lora_modules(group.model))
    torch.testing.assert_close(mixed[0::2], alone[0::2], atol=1e-5, rtol=0)
    want = torch.stack([torch.from_numpy(lorafit.load_run(runs["a"]).logits([t])[0]) for t in TEXTS])
    torch.testing.assert_close(alone, want, atol=1e-5, rtol=0)


def test_a_batch_is_routed_on_rows_sorted_by_run_and_each_row_gets_its_runs_logits(runs):
    """Whatever order a batch names its runs in, the group sorts the rows by run, so every
    adapter's rows reach its LoRA layers as one slice (a view; plain and DoRA alike); each
    row gets its run's own logits, in the request's order."""

    group = ServedGroup.for_run(runs["a"])
    for name in "abcd":
        group.add_run(name, runs[name])
    seen = []
    layer = next(layer for _, layer in lora_modules(group.model))
    handle = layer.register_forward_pre_hook(lambda m, _args: seen.append(dict(m.routes)))
    enc = group.tokenizer(TEXTS, truncation=True, max_length=64, padding=True, return_tensors="pt")
    try:
        for names in (["a", "c", "d", "a", "c", "d"], ["b", "a", "b", "c", "d", "a"], ["c"] * 6, ["b"] * 6):
            got = torch.stack(group.logits(names, enc["input_ids"], enc["attention_mask"]))
            want = torch.stack([torch.from_numpy(lorafit.load_run(runs[n]).logits([t])[0])
                                for n, t in zip(names, TEXTS)])
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    finally:
        handle.remove()
    assert len(seen) == 4 and all(isinstance(rows, slice) for routes in seen for rows in routes.values())
    assert [sorted((n, r.start, r.stop) for n, r in routes.items()) for routes in seen[:2]] == [
        [("a", 0, 2), ("c", 2, 4)], [("a", 2, 4), ("b", 0, 2), ("c", 4, 5)]]


def test_adapters_serve_in_eval_mode_and_a_batch_of_one_run_takes_the_merged_path(runs, monkeypatch):
    """A run trained with LoRA dropout serves without it (every module of the group in eval
    mode, also after a hot add), and a batch whose rows all name one of several runs runs each
    layer once with that adapter merged into a copy of its weight."""
    from lorafit.lora import LoRALinear

    group = ServedGroup.for_run(runs["e"])
    group.add_run("e", runs["e"])
    group.add_run("a", runs["a"])
    assert not any(m.training for m in group.model.modules())
    calls = []
    real = LoRALinear._one_adapter
    monkeypatch.setattr(LoRALinear, "_one_adapter", lambda self, n, x: calls.append(n) or real(self, n, x))
    enc = group.tokenizer(TEXTS, truncation=True, max_length=64, padding=True, return_tensors="pt")
    want = torch.stack([torch.from_numpy(lorafit.load_run(runs["e"]).logits([t])[0]) for t in TEXTS])
    for merge_from in (0, 10**9, 0):  # merged into a copy of each weight; added in place; merged again
        monkeypatch.setattr("lorafit.lora.MERGE_FROM_TOKENS", merge_from)
        got = torch.stack(group.logits(["e"] * len(TEXTS), enc["input_ids"], enc["attention_mask"]))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    layers = sum(1 for m in group.model.modules() if isinstance(m, LoRALinear))
    assert calls == ["e"] * (3 * layers)
