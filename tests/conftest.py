"""Shared fixtures: tiny randomly initialised encoders built from configs (offline, seconds)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# The tests' token caches and attention timings (tiny models, test shapes) stay out of the
# user's $LORAFIT_CACHE: one folder for the session, shared by the CLI subprocesses.
os.environ["LORAFIT_CACHE"] = tempfile.mkdtemp(prefix="lorafit-tests-cache-")
atexit.register(shutil.rmtree, os.environ["LORAFIT_CACHE"], True)
# Under pytest-xdist (pyproject: -n auto) the workers share the cores: each worker, and the
# CLI processes it starts, computes with its share of them instead of all of them.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    torch.set_num_threads(_threads)

from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    MPNetConfig,
    MPNetForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

TINY = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """A 2-layer, hidden-32 classifier of `arch`, random weights, eval mode, same weights per seed."""
    torch.manual_seed(seed)
    if arch == "distilbert":
        model = DistilBertForSequenceClassification(
            DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64))
    elif arch == "bert":
        model = BertForSequenceClassification(BertConfig(**TINY))
    elif arch == "roberta":
        model = RobertaForSequenceClassification(RobertaConfig(**TINY, pad_token_id=1))
    elif arch == "mpnet":
        model = MPNetForSequenceClassification(MPNetConfig(**TINY))
    else:
        raise ValueError(arch)
    return model.eval()


ARCHS = ["distilbert", "bert", "roberta", "mpnet"]


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 100, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A folder holding a tiny pretrained-style BERT encoder (2 layers, hidden 32, random
    weights, no classification head) with all-MiniLM-L6-v2's tokenizer: `--model DIR`
    runs the real CLI end to end in seconds (the process's imports dominate)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from lorafit.models import resolve_model_path

    folder = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(resolve_model_path(None))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tok.vocab_size, max_position_embeddings=128, **{
        k: v for k, v in TINY.items() if k != "vocab_size"})).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def minilm_data(tmp_path_factory):
    """The embedded all-MiniLM-L6-v2's encodings of a tiny IMDb slice (16 train, 8 validation,
    8 test, 64 tokens), and its pad id: what loop-level tests train on."""
    from lorafit.data import load_dataset
    from lorafit.data.encoding import encode_split
    from lorafit.models import load_model

    cache = tmp_path_factory.mktemp("cache")
    loaded = load_model(None, seed=0)
    d = load_dataset(None, train_size=16, val_size=8, test_size=8)
    enc = {n: encode_split(getattr(d, n), loaded.tokenizer, 64, cache_dir=cache)
           for n in ("train", "validation", "test")}
    return enc, loaded.tokenizer.pad_token_id
