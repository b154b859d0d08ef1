"""Frozen-prefix caching: the head on cached features computes what the whole model computes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import ARCHS, tiny_model
from lorafit.config import RunConfig
from lorafit.data.encoding import Encoded
from lorafit.feature_cache import HeadOnCache, cacheable_head, extract_features
from lorafit.strategies import STRATEGIES, head_layers


def _encoded(n=10, seed=0) -> Encoded:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 12, n)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    ids = rng.integers(3, 100, offsets[-1]).astype(np.int32)
    return Encoded(ids, offsets, rng.integers(0, 2, n))


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("arch", ARCHS)
def test_head_on_cache_equals_model(arch, pooling):
    from lorafit.pooling import apply_pooling
    from lorafit.training import predict_logits

    model = tiny_model(arch)
    apply_pooling(model, pooling)
    STRATEGIES["last-two-layers"].setup(model, RunConfig(strategy="last-two-layers"))
    head = head_layers(model)
    assert cacheable_head(model, head)
    enc = _encoded()
    kw = dict(batch_size=4, pad_id=0, device=torch.device("cpu"), precision="fp32")
    feats = extract_features(model, head[0], enc, **kw)
    cached = HeadOnCache(model, *head)
    torch.testing.assert_close(torch.from_numpy(predict_logits(cached, feats, **kw)),
                               torch.from_numpy(predict_logits(model, enc, **kw)), atol=1e-6, rtol=0)
    # the head shares the model's modules: training one trains the other
    assert cached.second.weight is model.get_submodule(head[1]).weight


def test_not_cacheable_when_the_encoder_trains():
    model = tiny_model("bert")
    STRATEGIES["lora"].setup(model, RunConfig())
    assert not cacheable_head(model, head_layers(model))
    model = tiny_model("bert")
    STRATEGIES["full"].setup(model, RunConfig(strategy="full"))
    assert not cacheable_head(model, head_layers(model))


@pytest.mark.parametrize("arch", ARCHS)
def test_padding_to_a_multiple_changes_no_logit(arch):
    """Extra padding is masked: logits with batches padded to a multiple of 16 equal exact padding's."""
    from lorafit.training import predict_logits

    model = tiny_model(arch)
    exact, rounded = _encoded(seed=1), _encoded(seed=1)
    rounded.pad_multiple, rounded.max_padded = 16, 64
    assert rounded.batch(np.arange(4), 0)["input_ids"].shape[1] == 16
    kw = dict(batch_size=4, pad_id=0, device=torch.device("cpu"), precision="fp32")
    torch.testing.assert_close(torch.from_numpy(predict_logits(model, rounded, **kw)),
                               torch.from_numpy(predict_logits(model, exact, **kw)), atol=1e-5, rtol=0)
