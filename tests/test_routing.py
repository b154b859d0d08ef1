"""Mixed-adapter batches (lorafit.lora.route_adapters): each row of one forward gets its own
adapter, and equals that row run alone with only its adapter active."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import ARCHS, tiny_model
from lorafit.errors import TargetError
from lorafit.lora import LoRAConfig, apply_lora, merge_lora, route_adapters, set_active_adapter, unmerge_lora

ADAPTERS = {  # three kinds on the same base: plain, DoRA on other targets, rsLoRA of another rank
    "a": LoRAConfig(r=4, alpha=8, targets=["key", "value"]),
    "b": LoRAConfig(r=2, alpha=4, targets=["query", "value"], use_dora=True),
    "c": LoRAConfig(r=8, alpha=8, targets=["key", "value", "output"], scaling="rslora"),
}


def adapted(arch: str):
    base = tiny_model(arch)
    model = copy.deepcopy(base)
    torch.manual_seed(1)
    for name, cfg in ADAPTERS.items():
        apply_lora(model, cfg, adapter_name=name)
    with torch.no_grad():  # B starts at zero: give every adapter a real update
        for n, p in model.named_parameters():
            if "lora_B" in n or "magnitude" in n:
                p.add_(torch.randn_like(p) * 0.2)
    return base.eval(), model.eval()


def alone(base, model, name, batch, i):
    row = {k: v[i:i + 1] for k, v in batch.items()}
    if name is None:
        return base(**row).logits
    set_active_adapter(model, name)
    return model(**row).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_each_row_gets_its_own_adapter(arch):
    base, model = adapted(arch)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 100, (6, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0  # a padded row among them
    batch = {"input_ids": ids, "attention_mask": mask}
    names = ["a", "b", None, "c", "a", "b"]
    with torch.no_grad():
        with route_adapters(model, names):
            mixed = model(**batch).logits
        want = torch.cat([alone(base, model, n, batch, i) for i, n in enumerate(names)])
        # and the routes are gone after the block: the active adapter applies to every row
        set_active_adapter(model, "c")
        torch.testing.assert_close(model(**batch).logits[3:4], want[3:4], atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed, want, atol=1e-5, rtol=0)
    assert len({tuple(r.round(decimals=4).tolist()) for r in want[[0, 1, 3]]}) == 3  # the adapters differ


@pytest.mark.parametrize("arch", ARCHS)
def test_rows_sorted_by_adapter_route_as_views_and_equal_each_row_alone(arch):
    """A batch whose rows come in runs of one adapter (a server sorts its batch so) routes
    each run as a slice, added in place without gradients and on a copy with them: the same
    logits as each row alone either way."""
    from lorafit.lora import lora_modules

    base, model = adapted(arch)
    ids = torch.randint(3, 100, (6, 10), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    names = ["a", "a", "b", "b", None, "c"]
    with torch.no_grad():
        want = torch.cat([alone(base, model, n, batch, i) for i, n in enumerate(names)])
        with route_adapters(model, names):
            routes = [layer.routes for _, layer in lora_modules(model)]
            assert all(isinstance(rows, slice) for r in routes for rows in r.values())
            sliced = model(**batch).logits
    with route_adapters(model, names):  # gradients on: y is not written in place
        with_grad = model(**batch).logits
    torch.testing.assert_close(sliced, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(with_grad.detach(), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("merge_from", [0, 10**9])
@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_a_batch_of_one_adapter_equals_that_adapter_active_and_leaves_the_weights(arch, batch, merge_from,
                                                                                  monkeypatch):
    """Every row naming one adapter takes the one-adapter path, merged into a copy of each
    weight (`merge_from` 0) or added in place (a threshold no batch reaches): the same logits
    as the adapter active, for plain, DoRA and rsLoRA, and no weight changes."""
    from lorafit.lora import lora_modules

    monkeypatch.setattr("lorafit.lora.MERGE_FROM_TOKENS", merge_from)

    _, model = adapted(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for name in ADAPTERS:
            # in every mode that takes the adapter (DoRA's "b": grouped only), the one-matmul path
            for mode in ("grouped",) if name == "b" else ("grouped", "gathered", "stacked"):
                with route_adapters(model, [name] * 3, mode=mode):
                    assert all(isinstance(layer.routes, dict) for _, layer in lora_modules(model)), mode
                    routed = model(**batch).logits
                set_active_adapter(model, name)
                torch.testing.assert_close(routed, model(**batch).logits, atol=1e-5, rtol=0)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_routing_refuses_unknown_names_and_merged_layers():
    base, model = adapted("bert")
    with pytest.raises(TargetError, match="no adapter 'z' in this model; its adapters: a, b, c"):
        with route_adapters(model, ["a", "z"]):
            pass
    with pytest.raises(TargetError, match="no LoRA layers"):
        with route_adapters(base, ["a"]):
            pass
    set_active_adapter(model, "a")
    merge_lora(model)
    with pytest.raises(TargetError, match="merged"):
        with route_adapters(model, ["a"]):
            pass
    unmerge_lora(model)


@pytest.mark.parametrize("mode", ["gathered", "stacked"])
@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_gathered_and_stacked_rows_equal_grouped_rows_for_plain_lora(arch, mode):
    base = tiny_model(arch)
    model = copy.deepcopy(base)
    torch.manual_seed(2)
    for name, cfg in {"a": ADAPTERS["a"], "c": ADAPTERS["c"]}.items():  # ranks 4 and 8, other targets
        apply_lora(model, cfg, adapter_name=name)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(torch.randn_like(p) * 0.2)
    model.eval()
    ids = torch.randint(3, 100, (5, 9), generator=torch.Generator().manual_seed(4))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    names = ["a", None, "c", "c", "a"]
    with torch.no_grad():
        with route_adapters(model, names):
            grouped = model(**batch).logits
        with route_adapters(model, names, mode=mode):
            routed = model(**batch).logits
        with route_adapters(model, [None, None], mode=mode):  # no row names an adapter: the base model
            plain = model(**{k: v[:2] for k, v in batch.items()}).logits
        want_base = base.eval()(**batch).logits
    torch.testing.assert_close(routed, grouped, atol=1e-5, rtol=0)
    torch.testing.assert_close(plain, want_base[:2], atol=1e-6, rtol=0)
    torch.testing.assert_close(routed[1], want_base[1], atol=1e-6, rtol=0)  # the row without an adapter
    assert not torch.allclose(routed[[0, 2, 4]], want_base[[0, 2, 4]], atol=1e-3)  # the adapters changed theirs
    _, dora = adapted("bert")
    with pytest.raises(TargetError, match="mode='grouped'"):
        with route_adapters(dora, ["b"], mode=mode):
            pass


@pytest.mark.parametrize("names", [["a", "a", "c", "c"], ["a", "a", "a", "a"]], ids=["mixed", "one-adapter"])
@pytest.mark.parametrize("one_thread", [True, False])
def test_served_updates_run_on_one_thread_and_the_thread_count_comes_back(names, one_thread, monkeypatch):
    """Without gradients, a routed batch's adapter updates run on one intra-op thread when
    SERVED_UPDATES_ON_ONE_THREAD is set (the base matmuls on all of them), and the count is back
    after each layer; the logits are the same either way."""
    import lorafit.lora
    from lorafit.lora import LoRAAdapter

    base, model = adapted("bert")
    batch = {"input_ids": torch.randint(3, 100, (4, 12), generator=torch.Generator().manual_seed(5))}
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    seen: list[int] = []
    add_update_ = LoRAAdapter.add_update_

    def watched(self, *args):
        seen.append(torch.get_num_threads())
        return add_update_(self, *args)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            with route_adapters(model, names):
                want = model(**batch).logits
            monkeypatch.setattr(lorafit.lora, "SERVED_UPDATES_ON_ONE_THREAD", one_thread)
            monkeypatch.setattr(LoRAAdapter, "add_update_", watched)
            with route_adapters(model, names):
                got = model(**batch).logits
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == ({1} if one_thread else {2})
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
