"""`lorafit export`: each format, strategy, pooling and LoRA variant leaves lorafit as a
folder that its own library loads, in a process without lorafit, and gives the run's logits."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import lorafit
from cli_helpers import lorafit as cli
from cli_helpers import lorafit_here as cli_here
from lorafit.data.text import clean_text
from lorafit.runs import load_data

pytest.importorskip("onnxruntime", reason="the onnx extra: pip install 'lorafit[onnx]'")
pytest.importorskip("sentence_transformers", reason="the sentence-transformers extra")

READER = Path(__file__).parent / "export_reader.py"
ATOL = 1e-4


def read_in_fresh_process(texts: list[str], exports: list[dict], tmp: Path) -> dict:
    """Each export's logits, read by its own library in a process that never imports lorafit."""
    spec, out = tmp / "spec.json", tmp / "logits.json"
    spec.write_text(json.dumps({"texts": texts, "exports": exports}))
    r = subprocess.run([sys.executable, str(READER), str(spec), str(out)], capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got.pop("lorafit_imported") is False
    return {k: np.asarray(v, dtype=np.float32) for k, v in got.items()}


def varied_texts(run_dir: Path, n: int = 32) -> list[str]:
    """`n` reviews of the run's data, cleaned, from the shortest to ones past max_length."""
    cfg = lorafit.load_run(run_dir).config
    texts = sorted(load_data(cfg).train.texts, key=len)
    picks = np.linspace(0, len(texts) - 1, n).round().astype(int)
    return [clean_text(texts[i]) for i in picks]


# --- the default case: real all-MiniLM-L6-v2, mean pooling, lora, fp32 --------------------------

@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    root = tmp_path_factory.mktemp("export-minilm")
    run = lorafit.train(strategy="lora", out=root / "run", progress=False, precision="fp32", train_size=24,
                        val_size=8, test_size=32, max_length=128, epochs=1)
    hf = lorafit.export(run.path, root / "hf")
    onnx = lorafit.export(run.path, root / "onnx", format="onnx", quantize="int8")
    return run, hf, onnx, root


def test_default_run_exports_give_its_logits_without_lorafit(minilm):
    run, hf, onnx, root = minilm
    assert run.config.pooling == "auto" and hf.layout == "sentence-transformers" and onnx.layout == "onnx"
    texts = varied_texts(run.path)
    lengths = [len(lorafit.load_run(run.path).tokenizer(t)["input_ids"]) for t in texts]
    assert min(lengths) < 40 and max(lengths) > 128  # short ones, and ones the export must truncate
    want = lorafit.load_run(run.path).logits(texts)
    got = read_in_fresh_process(texts, [
        {"name": "hf", "path": str(hf.path), "layout": hf.layout},
        {"name": "onnx", "path": str(onnx.path), "layout": "onnx", "file": "model.onnx"},
        {"name": "int8", "path": str(onnx.path), "layout": "onnx", "file": "model_int8.onnx"}], root)
    for name in ("hf", "onnx"):
        np.testing.assert_allclose(got[name], want, atol=ATOL, rtol=0, err_msg=name)
        assert (got[name].argmax(1) == want.argmax(1)).all()
    assert got["int8"].shape == want.shape and np.abs(got["int8"] - want).max() > 0  # a quantized graph indeed


def test_evaluate_and_predict_on_exports_give_the_runs_numbers(minilm):
    run, hf, onnx, _ = minilm
    # each command once in a process of its own, as a user runs it, and once through the same `main` here
    for export, run_cli in ((hf.path, cli_here), (onnx.path, cli)):
        r = run_cli("evaluate", str(export), "--no-progress")
        assert r.returncode == 0, r.stderr[-2000:]
        got = json.loads(r.stdout)
        assert got["test_accuracy"] == run.final["test_accuracy"] and got["examples"] == 32
        assert got["test_confusion"] == run.final["test_confusion"]
    # the int8 graph's accuracy is printed beside the fp32 one's
    assert set(got["int8"]) >= {"test_accuracy", "test_macro_f1"}
    assert got["int8_accuracy_change"] == pytest.approx(got["int8"]["test_accuracy"] - got["test_accuracy"])
    texts = ["A wonderful, moving film.", "Dull, and far too long."]
    on_export = cli_here("predict", str(onnx.path), *texts)
    assert on_export.returncode == 0, on_export.stderr[-2000:]
    assert [line.split("\t")[0] for line in on_export.stdout.splitlines()] == [
        p["label"] for p in lorafit.load_run(run.path).predict(texts)]
    int8 = cli("predict", "--int8", str(onnx.path), *texts)
    assert int8.returncode == 0 and len(int8.stdout.splitlines()) == 2, int8.stderr[-2000:]


def run_card_example(folder: Path) -> str:
    """What the model card's example prints, run as written (the folder's path put in) in a
    process without lorafit."""
    from lorafit.export_card import EXAMPLE_PATH

    card = (folder / "README.md").read_text()
    code = card.split("```python\n", 1)[1].split("```", 1)[0].replace(EXAMPLE_PATH, str(folder))
    assert len(code.strip().splitlines()) == 4  # the four-line example
    code += "\nimport sys; assert not any(m.startswith('lorafit') for m in sys.modules)\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip().splitlines()[-1]


def test_export_folder_says_how_to_load_it(minilm):
    import onnx

    run, hf, ox, _ = minilm
    label = lorafit.load_run(run.path).predict(["A wonderful film."])[0]["label"]
    for result, loader in ((hf, "SentenceTransformer"), (ox, "onnxruntime.InferenceSession")):
        card = (result.path / "README.md").read_text()
        assert loader in card and "all-MiniLM-L6-v2" in card and "0: neg, 1: pos" in card
        assert f"{run.final['test_accuracy']:.4f}" in card and "| strategy | lora |" in card
        assert json.loads((result.path / "labels.json").read_text())["id2label"] == {"0": "neg", "1": "pos"}
        assert run_card_example(result.path) == label
    info = json.loads((ox.path / "lorafit.json").read_text())
    assert info["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert info["onnx_files"] == {"fp32": "model.onnx", "int8": "model_int8.onnx"}
    graph = onnx.load(str(ox.path / "model.onnx"))
    assert [o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")] == [info["opset"]]
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.graph.input]
    assert len(dims) == 3 and all(isinstance(d, str) for pair in dims for d in pair)  # dynamic batch and sequence


# --- every strategy, pooling and variant, on the tiny architectures ------------------------------

TINY_RUN = dict(train_size=24, val_size=8, test_size=16, max_length=64, epochs=1, precision="fp32", progress=False)
CASES = {  # name -> architecture, settings
    "bert-full-cls": ("bert", dict(strategy="full", pooling="cls")),
    "bert-full-mean": ("bert", dict(strategy="full", pooling="mean")),
    "bert-last2-cls": ("bert", dict(strategy="last-two-layers", pooling="cls")),
    "bert-last2-mean": ("bert", dict(strategy="last-two-layers", pooling="mean")),
    "bert-lora-cls": ("bert", dict(strategy="lora", pooling="cls")),
    "bert-lora-mean": ("bert", dict(strategy="lora", pooling="mean")),
    "bert-dora": ("bert", dict(strategy="lora", pooling="mean", dora=True)),
    "bert-pissa": ("bert", dict(strategy="lora", pooling="cls", init="pissa")),
    "bert-rslora": ("bert", dict(strategy="lora", pooling="mean", scaling="rslora", targets=["query", "value", "ffn"])),
    "distilbert-lora-mean": ("distilbert", dict(strategy="lora", pooling="mean")),
    "distilbert-full-cls": ("distilbert", dict(strategy="full", pooling="cls")),
    "roberta-lora-mean": ("roberta", dict(strategy="lora", pooling="mean")),
    "mpnet-lora-mean": ("mpnet", dict(strategy="lora", pooling="mean")),
}


HF_ONLY = {"bert-full-mean", "bert-last2-cls", "bert-last2-mean", "bert-lora-cls", "bert-dora", "bert-pissa",
           "bert-rslora", "distilbert-full-cls"}
"""Exported as hf only, to keep the suite short. The graph ONNX traces is the architecture with
its pooling and head: the strategy and the variant change only the merged weights. So ONNX
covers each pooling on BERT (bert-full-cls, bert-lora-mean) and each other architecture."""


def tiny_folder(arch: str, root: Path, tokenizer) -> Path:
    """A tiny pretrained-style encoder of `arch` (random weights) with MiniLM's tokenizer."""
    from transformers import BertConfig, BertModel, DistilBertConfig, DistilBertModel, MPNetConfig, MPNetModel
    from transformers import RobertaConfig, RobertaModel

    dims = dict(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=130)
    torch.manual_seed(0)
    model = {"bert": lambda: BertModel(BertConfig(**dims)),
             "roberta": lambda: RobertaModel(RobertaConfig(**dims, pad_token_id=0)),
             "mpnet": lambda: MPNetModel(MPNetConfig(**dims, pad_token_id=0)),
             "distilbert": lambda: DistilBertModel(DistilBertConfig(
                 vocab_size=tokenizer.vocab_size, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                 max_position_embeddings=130))}[arch]()
    folder = root / f"tiny-{arch}"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    from transformers import AutoTokenizer

    from lorafit.models import resolve_model_path

    root = tmp_path_factory.mktemp("export-matrix")
    tok = AutoTokenizer.from_pretrained(resolve_model_path(None))
    folders = {arch: tiny_folder(arch, root, tok) for arch in {a for a, _ in CASES.values()}}
    out = {}
    for name, (arch, settings) in CASES.items():
        run = lorafit.train(model=str(folders[arch]), out=root / name, **TINY_RUN, **settings)
        onnx = lorafit.export(run.path, root / f"{name}.onnx", format="onnx") if name not in HF_ONLY else None
        out[name] = (run, lorafit.export(run.path, root / f"{name}.hf"), onnx)
    return out, root


def test_every_strategy_pooling_and_variant_exports_its_logits(matrix):
    runs, root = matrix
    texts = varied_texts(next(iter(runs.values()))[0].path)
    exports, want = [], {}
    for name, (run, hf, ox) in runs.items():
        expected_layout = "sentence-transformers" if CASES[name][1]["pooling"] == "mean" else "transformers"
        assert hf.layout == expected_layout, name
        exports.append({"name": f"{name}.hf", "path": str(hf.path), "layout": hf.layout})
        if ox is not None:
            exports.append({"name": f"{name}.onnx", "path": str(ox.path), "layout": "onnx", "file": "model.onnx"})
        want[name] = lorafit.load_run(run.path).logits(texts)
    got = read_in_fresh_process(texts, exports, root)
    for name, logits in want.items():
        assert np.abs(logits - logits.mean(0)).max() > 1e-6, name  # the texts give different logits
        for fmt in ("hf",) if name in HF_ONLY else ("hf", "onnx"):
            np.testing.assert_allclose(got[f"{name}.{fmt}"], logits, atol=ATOL, rtol=0, err_msg=f"{name}.{fmt}")


def test_evaluating_an_export_gives_the_runs_test_accuracy(matrix):
    runs, _ = matrix
    run, hf, _ = runs["bert-lora-cls"]  # the transformers layout's card example, as written
    assert hf.layout == "transformers"
    assert run_card_example(hf.path) == lorafit.load_run(run.path).predict(["A wonderful film."])[0]["label"]
    for name in ("bert-full-cls", "bert-lora-mean", "roberta-lora-mean"):
        run, hf, ox = runs[name]
        for export in (hf, ox):
            got = lorafit.load_run(export.path).evaluate()
            assert (got["test_accuracy"], got["test_confusion"]) == (
                run.final["test_accuracy"], run.final["test_confusion"]), (name, export.format)


def test_a_chosen_adapter_of_several_exports(matrix, tmp_path):
    import shutil

    run, _, _ = matrix[0]["bert-lora-mean"]
    two = tmp_path / "two"
    shutil.copytree(run.path, two)
    second = two / "adapter" / "second"
    second.mkdir()
    shutil.copy(two / "adapter" / "adapter_config.json", second)
    tensors = load_file(two / "adapter" / "adapter_model.safetensors")
    save_file({k: v * 3 + 0.01 for k, v in tensors.items()}, second / "adapter_model.safetensors")
    texts = ["A wonderful film.", "Dull and far too long, I left early.", "ok"]
    default = lorafit.load_run(two).logits(texts)
    chosen = lorafit.load_run(two, adapter="second").logits(texts)
    assert np.abs(chosen - default).max() > 1e-3
    for fmt in ("hf", "onnx"):
        export = lorafit.export(two, tmp_path / fmt, format=fmt, adapter="second")
        np.testing.assert_allclose(lorafit.load_run(export.path).logits(texts), chosen, atol=ATOL, rtol=0)
        assert json.loads((export.path / "lorafit.json").read_text())["adapter"] == "second"


# --- bad input: one clear line, nothing written ---------------------------------------------------

def _nothing_left(out: Path) -> bool:
    return not out.exists() and not list(out.parent.glob(f".{out.name}.*"))


def test_bad_exports_say_what_to_do_and_write_nothing(matrix, tmp_path):
    import shutil

    run, _, _ = matrix[0]["bert-lora-cls"]
    out = tmp_path / "out"
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run.path, unfinished)
    (unfinished / "final.json").unlink()
    incomplete = tmp_path / "incomplete"
    shutil.copytree(run.path, incomplete)
    shutil.rmtree(incomplete / "adapter")
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    cases = [
        ((str(run.path), str(out), "--format", "tflite"), "unknown export format 'tflite'; choose one of: hf, onnx"),
        ((str(run.path), str(out), "--quantize", "int8"), "applies to --format onnx only"),
        ((str(run.path), str(full)), "exists and is not empty"),
        ((str(unfinished), str(out)), "no final.json: the run is still training or was interrupted"),
        ((str(incomplete), str(out)), "has no adapter/ folder; the run did not finish"),
        ((str(tmp_path / "nowhere"), str(out)), "does not exist"),
    ]
    from lorafit.errors import LorafitError

    for args, message in cases:  # in this process: the message; one through the CLI: one line, status 2
        fmt = args[args.index("--format") + 1] if "--format" in args else "hf"
        quantize = args[args.index("--quantize") + 1] if "--quantize" in args else None
        with pytest.raises(LorafitError, match=re.escape(message)):
            lorafit.export(args[0], args[1], format=fmt, quantize=quantize)
        assert _nothing_left(out), args
    r = cli("export", *cases[3][0])
    assert r.returncode == 2 and r.stderr.startswith("error: ") and cases[3][1] in r.stderr
    assert r.stderr.count("\n") == 1 and _nothing_left(out)
    assert sorted(p.name for p in full.iterdir()) == ["x"]


def test_an_architecture_the_exporter_cannot_trace_is_one_line(matrix, tmp_path, monkeypatch):
    from lorafit.errors import ConfigError

    def refuses(*_a, **_k):  # what torch.export raises on an op it cannot trace
        raise torch._dynamo.exc.Unsupported("data-dependent control flow\nmore lines")

    run, _, _ = matrix[0]["bert-lora-cls"]
    monkeypatch.setattr(torch.onnx, "export", refuses)
    with pytest.raises(ConfigError, match=r"cannot trace this bert model \(data-dependent control flow\); export "
                       "it with --format hf"):
        lorafit.export(run.path, tmp_path / "out", format="onnx")
    assert _nothing_left(tmp_path / "out")


@pytest.mark.parametrize("umask, dirs, files", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_the_export_folder_carries_the_users_umask(matrix, tmp_path, umask, dirs, files):
    run, _, _ = matrix[0]["bert-full-mean"]
    old = os.umask(umask)
    try:
        out = lorafit.export(run.path, tmp_path / "out").path
    finally:
        os.umask(old)
    modes = {p.relative_to(out): p.stat().st_mode & 0o777 for p in [out, *out.rglob("*")]}
    assert modes[Path(".")] == dirs and modes[Path("2_Dense")] == dirs
    assert all(m == files for p, m in modes.items() if (out / p).is_file())


def test_a_mean_pooled_head_lorafit_does_not_know_is_refused_for_hf(tmp_path):
    """ELECTRA's head (dense, GELU, out_proj) is not in lorafit's architecture table: a
    mean-pooled run of it cannot be written as sentence-transformers modules, and says so."""
    from transformers import AutoTokenizer, ElectraConfig, ElectraModel

    from lorafit.errors import ConfigError
    from lorafit.models import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path(None))
    torch.manual_seed(0)
    folder = tmp_path / "tiny-electra"
    ElectraModel(ElectraConfig(vocab_size=tok.vocab_size, embedding_size=32, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=2, intermediate_size=64)).save_pretrained(folder)
    tok.save_pretrained(folder)
    run = lorafit.train(model=str(folder), out=tmp_path / "run", strategy="full", pooling="mean", **TINY_RUN)
    with pytest.raises(ConfigError, match="does not know the classification head of electra models"):
        lorafit.export(run.path, tmp_path / "out")
    assert _nothing_left(tmp_path / "out")


@pytest.mark.parametrize("name", ["bert-lora-mean", "distilbert-lora-mean", "roberta-lora-mean", "mpnet-lora-mean"])
def test_a_default_lora_run_adapts_a_pretrained_pooler_and_keeps_a_fresh_one(matrix, name):
    """lora's default head on each architecture: BERT's pretrained `pooler.dense` gets an adapter; a
    head's first layer that loading initialised afresh (DistilBERT `pre_classifier`, RoBERTa and
    MPNet `classifier.dense`) stays frozen at its random start and is saved whole in the adapter.
    PEFT, which initialises that layer afresh (other random weights) when it loads the pretrained
    folder, loads the run's adapter onto it and merges to lorafit's merged weights (PEFT matches
    `modules_to_save` by bare suffix, so on DistilBERT `classifier` names `pre_classifier` too,
    which an adapter there would break)."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForSequenceClassification

    runs, root = matrix
    arch, run = name.split("-")[0], runs[name][0]
    config = json.loads((run.path / "adapter" / "adapter_config.json").read_text())
    pooler = {"bert": "bert.pooler.dense", "distilbert": "pre_classifier"}.get(arch, "classifier.dense")
    assert (pooler in config["target_modules"]) is (arch == "bert")
    assert (pooler in config["modules_to_save"]) is (arch != "bert")
    ours = lorafit.load_run(run.path).model
    base = AutoModelForSequenceClassification.from_pretrained(root / f"tiny-{arch}", num_labels=2)
    base_pooler = base.get_submodule(pooler).weight.detach().clone()
    theirs = peft.PeftModel.from_pretrained(base, run.path / "adapter").merge_and_unload()
    want = {k.replace(".base.", "."): v for k, v in ours.state_dict().items() if "lora_" not in k}
    got = theirs.state_dict()
    if arch != "bert":  # frozen at the run's own random start, which PEFT's fresh load does not repeat
        start = load_file(run.path / "fresh_init.safetensors")
        torch.testing.assert_close(want[f"{pooler}.weight"], start[f"{pooler}.weight"], atol=0, rtol=0)
        assert not torch.allclose(base_pooler, want[f"{pooler}.weight"])
    for key in (f"{pooler}.weight", f"{pooler}.bias", "classifier.weight" if arch in ("bert", "distilbert")
                else "classifier.out_proj.weight"):
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=0)
    layer = next(k for k in got if k.endswith(("value.weight", "v_lin.weight", "attn.v.weight")))
    torch.testing.assert_close(got[layer], want[layer], atol=1e-6, rtol=0)
