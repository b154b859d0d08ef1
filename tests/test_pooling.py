"""Pooling: what the head reads (the first token, or the masked mean of the tokens)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from cli_helpers import TINY, lorafit, lorafit_here
from conftest import ARCHS, tiny_model
from lorafit.models import load_model, resolve_model_path
from lorafit.pooling import apply_pooling, masked_mean, pooling_of, resolve_pooling


def test_auto_follows_the_sentence_transformers_config(tiny_model_dir):
    assert resolve_pooling("auto", resolve_model_path(None)) == "mean"  # all-MiniLM-L6-v2's 1_Pooling says mean
    assert resolve_pooling("auto", str(tiny_model_dir)) == "cls"  # no sentence-transformers config: BERT's head
    assert resolve_pooling("cls", resolve_model_path(None)) == "cls"
    assert resolve_pooling("auto", "someone/not-in-any-cache") == "cls"


def test_mean_pooled_logits_are_the_head_on_the_masked_mean(tiny_model_dir, batch):
    """BERT with mean pooling: classifier(tanh(pooler.dense(mean of the unmasked last hidden states)))."""
    mean = load_model(str(tiny_model_dir), seed=0, pooling="mean").model
    cls = load_model(str(tiny_model_dir), seed=0, pooling="cls").model  # the same weights, the head unchanged
    assert pooling_of(mean) == "mean" and pooling_of(cls) == "cls"
    with torch.no_grad():
        hidden = cls.bert(**batch).last_hidden_state  # (B, T, H)
        expected = cls.classifier(torch.tanh(cls.bert.pooler.dense(masked_mean(hidden, batch["attention_mask"]))))
        torch.testing.assert_close(mean(**batch).logits, expected, atol=1e-6, rtol=0)
        assert not torch.allclose(cls(**batch).logits, expected, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_mean_pooling_ignores_padding(arch, batch):
    """The same texts padded further give the same logits; pooling applied twice is applied once."""
    model = tiny_model(arch)
    apply_pooling(model, "mean")
    apply_pooling(model, "mean")
    pad = 1 if arch == "roberta" else 0
    longer = {"input_ids": torch.cat([batch["input_ids"], torch.full((3, 5), pad)], 1),
              "attention_mask": torch.cat([batch["attention_mask"], torch.zeros(3, 5, dtype=torch.long)], 1)}
    with torch.no_grad():
        a, b = model(**batch).logits, model(**longer).logits
        plain = tiny_model(arch)(**batch).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert not torch.allclose(a, plain, atol=1e-4)  # it is not the first token's head


def test_a_deepcopy_pools_on_its_own(tiny_model_dir, batch):
    """A deepcopy of a mean-pooled model is mean-pooled, pooling it again changes nothing
    (no hook registered twice), and the copy keeps its own mask, not the original's."""
    model = load_model(str(tiny_model_dir), seed=0, pooling="mean").model
    copy_ = copy.deepcopy(model)
    assert pooling_of(copy_) == "mean"
    apply_pooling(copy_, "mean")
    assert len(copy_._forward_pre_hooks) == len(copy_.bert.encoder._forward_hooks) == 1
    assert copy_._lorafit_mask is copy_.bert.encoder._lorafit_mask is not model._lorafit_mask
    short = {k: v[:, :4] for k, v in batch.items()}
    with torch.no_grad():
        torch.testing.assert_close(copy_(**batch).logits, model(**batch).logits, atol=1e-6, rtol=0)
        torch.testing.assert_close(copy_(**short).logits, model(**short).logits, atol=1e-6, rtol=0)


def test_a_mean_pooled_run_end_to_end(tiny_model_dir, tmp_path):
    """--pooling mean: recorded in config.json and final.json; `evaluate` reproduces the test
    numbers (so it pools as the run did); `merge` writes a sentence-transformers folder (mean
    pooling built in; tests/test_export.py checks its logits). That auto resolves to cls on a
    plain BERT folder: test_auto_follows_the_sentence_transformers_config, and every tiny-model
    run of tests/test_resume.py records the first-token last layer, which cls gives."""
    run = tmp_path / "mean"
    r = lorafit("train", "--model", str(tiny_model_dir), "--pooling", "mean", *TINY, "--out", str(run))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "mean pooling" in r.stdout
    assert json.loads((run / "config.json").read_text())["pooling_resolved"] == "mean"
    final = json.loads((run / "final.json").read_text())
    assert final["pooling"] == "mean"
    r = lorafit_here("evaluate", str(run), "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    again = json.loads(r.stdout[r.stdout.index("{"):])
    assert again["test_accuracy"] == final["test_accuracy"] and again["test_loss"] == pytest.approx(
        final["test_loss"], abs=1e-6)
    r = lorafit_here("merge", str(run), str(tmp_path / "merged"))
    assert r.returncode == 0 and "sentence-transformers" in r.stdout, r.stderr[-2000:]
    pooling = json.loads((tmp_path / "merged" / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] and not pooling["pooling_mode_cls_token"]


def test_runs_from_before_pooling_read_the_first_token(tmp_path):
    from lorafit.runs import read_run_config, run_pooling

    raw = {"strategy": "lora"}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    cfg = read_run_config(tmp_path)
    assert cfg.pooling == "cls" and run_pooling(raw) == "cls"


def test_probe_embeddings_are_what_each_pooled_head_reads(tiny_model_dir):
    """benchmarks/studies/probe.py's one encoder pass gives, per text, exactly the input of
    pooler.dense in the mean-pooled model and in the first-token model (the features
    last-two-layers trains on), so its probe is the reference for that strategy."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "studies"))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from probe import embed

    from lorafit.data.encoding import encode_split
    from lorafit.data.splits import Split
    from lorafit.feature_cache import extract_features

    texts = ["a fine film", "dull, long and far too loud for its own good " * 3, "ok", "bad acting and a thin plot"]
    split = Split(texts=texts, labels=np.array([1, 0, 1, 0]))
    base = load_model(str(tiny_model_dir), seed=0)
    got = embed(split, base.model, base.tokenizer, max_length=64, batch_size=3, precision="fp32")
    for pooling in ("mean", "cls"):
        loaded = load_model(str(tiny_model_dir), seed=0, pooling=pooling)
        enc = encode_split(split, loaded.tokenizer, 64, pad_multiple=32)
        want = extract_features(loaded.model, "bert.pooler.dense", enc, batch_size=3, pad_id=0,
                                device=torch.device("cpu"), precision="fp32").features.numpy()
        np.testing.assert_allclose(got[pooling], want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(got["mean"], got["cls"])
