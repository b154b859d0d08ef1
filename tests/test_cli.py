"""The experiment end to end through the real CLI, on a tiny slice of the embedded data."""

from __future__ import annotations

import json

import pytest
import torch

from cli_helpers import TINY, lorafit, lorafit_here

from lorafit.machine import cpu_model


@pytest.fixture(scope="module")
def compare_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "compare"
    r = lorafit("compare", *TINY, "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_compare_leaves_every_artifact(compare_dir):
    for strategy in ("full", "last-two-layers", "lora"):
        run = compare_dir / strategy
        cfg = json.loads((run / "config.json").read_text())
        assert cfg["strategy"] == strategy and cfg["epochs"] == 1
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == 1 and {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "seconds",
                                   "tokens_per_s"} <= set(rows[0])
        final = json.loads((run / "final.json").read_text())
        # accuracy is a count over the 16 test reviews; F1 is the harmonic mean its counts give
        assert final["test_accuracy"] * 16 == round(final["test_accuracy"] * 16)
        assert rows[0]["val_accuracy"] * 8 == round(rows[0]["val_accuracy"] * 8)
        assert final["kept_epoch"] == 1 and final["best_val_accuracy"] == rows[0]["val_accuracy"]
        assert final["sizes"] == {"train": 24, "validation": 8, "test": 16}
        assert final["trainable_params"] <= final["total_params"] and final["peak_memory_mb"] > 0
        assert final["saved_bytes"] > 0
        assert final["cpu"] == cpu_model()  # where it ran: a benchmark never mixes records of two CPUs
        assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lora = json.loads((compare_dir / "lora" / "final.json").read_text())
    full = json.loads((compare_dir / "full" / "final.json").read_text())
    last2 = json.loads((compare_dir / "last-two-layers" / "final.json").read_text())
    # adapters on every linear layer of the 6 encoder layers (query, key, value and the attention output,
    # 4 x (384 + 384) each; the two feed-forward layers, 4 x (384 + 1536) each), on the head's first layer
    # (pooler.dense, 4 x (384 + 384)), and the classifier trained fully (384 x 2 + 2)
    want = 6 * (4 * 4 * (384 + 384) + 2 * 4 * (384 + 1536)) + 4 * (384 + 384) + 384 * 2 + 2
    assert lora["trainable_params"] == want == 169_730
    assert full["trainable_params"] == full["total_params"] == 22_713_986
    assert last2["trainable_params"] == 384 * 384 + 384 + 384 * 2 + 2  # pooler.dense + classifier
    assert sorted(p.name for p in (compare_dir / "lora" / "adapter").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"]
    assert lora["saved_bytes"] < 4 * 1.05 * lora["trainable_params"]  # the adapter in fp32, and little else
    report = json.loads((compare_dir / "report.json").read_text())
    assert [r["strategy"] for r in report["rows"]] == ["full", "last-two-layers", "lora"]
    md = (compare_dir / "report.md").read_text()
    assert "| lora |" in md and "169,730" in md
    assert (compare_dir / "report.png").read_bytes()[:4] == b"\x89PNG"
    # the times beside the CPU they ran on and what it multiplies at, measured by this comparison
    machine = report["machine"]
    assert machine["cpu"] == cpu_model() and machine["threads"] == torch.get_num_threads()
    assert 1e-4 < machine["bf16_tflops"] < 1e3 and 1e-4 < machine["fp32_tflops"] < 1e3
    precision = lora["precision"]
    assert {full["precision"], last2["precision"]} == {precision}
    assert (f"CPU: {cpu_model()}, {machine['threads']} threads, runs in {precision}; its matmul peak, measured "
            f"after the runs: bf16 {machine['bf16_tflops']:.2f} TFLOP/s, fp32 {machine['fp32_tflops']:.2f} TFLOP/s"
            ) in md


def test_evaluate_and_predict_agree_with_final(compare_dir):
    # lora's in a process of its own, as a user runs it; last-two-layers' through the same `main` in this one
    for strategy, cli in (("lora", lorafit), ("last-two-layers", lorafit_here)):
        run = compare_dir / strategy
        final = json.loads((run / "final.json").read_text())
        r = cli("evaluate", str(run), "--no-progress")
        assert r.returncode == 0, r.stderr[-2000:]
        got = json.loads(r.stdout)
        assert (got["test_accuracy"], got["test_f1"], got["test_loss"]) == (
            final["test_accuracy"], final["test_f1"], final["test_loss"]) and got["examples"] == 16
    run = compare_dir / "lora"
    r = lorafit("predict", str(run), "A wonderful film.", "Dreadful, boring.")
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    # the label and probability printed are the saved run's softmax, computed here in-process
    import numpy as np

    from lorafit.data.encoding import Encoded, encode_texts
    from lorafit.runs import load_trained
    from lorafit.precision import resolve_precision
    from lorafit.training import predict_logits

    cfg, loaded = load_trained(run, merge=True)
    ids, offsets = encode_texts(loaded.tokenizer, ["A wonderful film.", "Dreadful, boring."], cfg.max_length)
    cpu = torch.device("cpu")
    logits = predict_logits(loaded.model, Encoded(ids, offsets, np.zeros(2, dtype=np.int64)), batch_size=16,
                            pad_id=loaded.tokenizer.pad_token_id, device=cpu,
                            precision=loaded.precision or resolve_precision(cfg.precision, cpu))
    probs = torch.softmax(torch.from_numpy(logits), dim=-1)
    expected = [f"{['neg', 'pos'][int(p.argmax())]}\t{float(p.max()):.4f}" for p in probs]
    assert ["\t".join(line.split("\t")[:2]) for line in lines] == expected
    r2 = lorafit("predict", str(run), stdin="A wonderful film.\nDreadful, boring.\n")
    assert r2.stdout == r.stdout


def test_merge_loads_with_plain_transformers(compare_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lorafit.runs import load_trained

    # the default model pools by mean (auto), which a plain transformers head cannot: merge a cls run
    run = tmp_path / "lora"
    r = lorafit("train", "--strategy", "lora", "--pooling", "cls", *TINY, "--out", str(run))
    assert r.returncode == 0, r.stderr[-2000:]
    r = lorafit("merge", str(run), str(tmp_path / "merged"))
    assert r.returncode == 0, r.stderr[-2000:]
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert not any(type(m).__name__ == "LoRALinear" for m in plain.modules())
    _, loaded = load_trained(run)
    batch = tok(["A wonderful film.", "Dreadful and boring, I left early."], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, loaded.model.eval()(**batch).logits, atol=1e-5, rtol=0)
    assert plain.config.id2label == {0: "neg", 1: "pos"}
    again = lorafit_here("merge", str(run), str(tmp_path / "merged"))
    assert again.returncode == 2 and "not empty" in again.stderr


def test_config_file_and_flag_override(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('strategy = "last-two-layers"\nepochs = 1\nlr = 0.01\nmax-length = 48\n')
    r = lorafit_here("train", "--config", str(cfg), *TINY, "--lr", "0.005", "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr[-2000:]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["strategy"] == "last-two-layers" and saved["lr"] == 0.005 and saved["max_length"] == 64
    assert "trainable params: 148,610 / 22,713,986 (0.654%)" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["train", "--strategy", "bogus"], "invalid choice: 'bogus'"),
    (["train", "--rank", "0"], r"rank (--rank) must be an integer >= 1"),
    (["train", "--lr", "5"], r"lr (--lr) must be a number in (0, 1] or auto"),
    (["train", "--lr", "fast"], "argument --lr: 'fast' is neither a number (such as 2e-3) nor auto"),
    (["train", "--keep", "middle"], "argument --keep: invalid choice: 'middle'"),
    (["train", "--max-length", "4096"], "above this model's 512 positions"),
    (["train", "--targets", "nothing_here"], "'nothing_here' matches no module"),
    (["train", "--data", "/no/such/path"], "data source /no/such/path does not exist"),
    (["train", "--model", "/no/such/model"], "model folder /no/such/model does not exist"),
    (["train", "--model", "someone/not-a-real-model-xyz"], "hub could not be reached"),
    (["evaluate", "/no/such/run"], "run folder /no/such/run does not exist"),
    (["predict", "/no/such/run", "hi"], "run folder /no/such/run does not exist"),
])
def test_cli_errors_are_one_clean_line(args, message, tmp_path):
    r = lorafit_here(*args, "--out", str(tmp_path / "o")) if args[0] == "train" else lorafit_here(*args)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir()) or \
        not (tmp_path / "o" / "final.json").exists()


def test_a_refusal_is_one_line_from_the_real_process(tmp_path):
    """The tests above call `main` in-process; here the user's whole process: the refusal is
    the one line on stderr, whatever the imports print."""
    r = lorafit("train", "--data", "/no/such/path", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [r.stderr.strip()] and r.stderr.startswith("error: data source /no/such/path")
    assert not (tmp_path / "o").exists()


def test_config_file_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"epochs": 2, "learning_rate": 0.1}')
    r = lorafit_here("train", "--config", str(bad))
    assert r.returncode == 2 and "unknown key 'learning_rate'" in r.stderr and "Traceback" not in r.stderr
    bad.write_text('{"epochs": "three"}')
    r = lorafit_here("train", "--config", str(bad))
    assert r.returncode == 2 and "key 'epochs' must be int" in r.stderr


def test_data_errors_end_to_end(tmp_path):
    from data_fixtures import write_imdb_tar

    good = write_imdb_tar(tmp_path / "good.tar.gz").read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(good[: len(good) // 2])
    r = lorafit_here("train", "--data", str(tmp_path / "cut.tar.gz"), "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{tmp_path / 'cut.tar.gz'} is not a readable tar archive" in r.stderr and "download it again" in r.stderr
    assert not (tmp_path / "run").exists()  # nothing half-written
    (tmp_path / "t.csv").write_text("body,label\nhi,1\n")
    r = lorafit_here("compare", "--data", str(tmp_path / "t.csv"), "--out", str(tmp_path / "cmp"))
    assert r.returncode == 2 and "--text-column" in r.stderr and "Traceback" not in r.stderr


def test_out_dir_refused_before_any_work(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r = lorafit_here("train", "--out", str(out))
    assert r.returncode == 2 and "is not empty; pass another --out" in r.stderr
    r = lorafit_here("train", "--out", str(out), "--overwrite")
    assert r.returncode == 2 and "is not a lorafit run; refusing to overwrite" in r.stderr
    assert (out / "notes.txt").read_text() == "mine"


def test_broken_run_folders_are_refused(compare_dir, tmp_path):
    import shutil

    run = tmp_path / "lora"
    shutil.copytree(compare_dir / "lora", run)
    weights = run / "adapter" / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 3])
    r = lorafit_here("evaluate", str(run), "--no-progress")
    assert r.returncode == 2 and "corrupt or truncated" in r.stderr and "Traceback" not in r.stderr
    weights.unlink()
    (run / "adapter" / "adapter_model.bin").write_bytes(b"\x80\x04pickled")
    r = lorafit_here("predict", str(run), "hello")
    assert r.returncode == 2 and "pickle" in r.stderr and "safetensors only" in r.stderr


def test_model_without_classification_head(tmp_path):
    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=16)).save_pretrained(tmp_path / "vit")
    r = lorafit_here("train", "--model", str(tmp_path / "vit"), "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "no sequence-classification head" in r.stderr


def _skewed_messages(path, n_train=120, n_test=60, seed=0):
    """Short messages, 15% spam: a small skewed set such as users bring."""
    import csv
    import random

    rng = random.Random(seed)
    ham = ["are we still on for {x} at {t}?", "can you send me the {y} before {d}", "running late, see you at {t}",
           "thanks for the {y}, I'll read it on {d}", "mum says {x} is at {t} on {d}", "did you call the {z} yet?"]
    spam = ["WINNER! claim your free {p} now, text {c} to {n}", "URGENT: you have won a {p}, call {n} to claim",
            "free {p} offer, reply {c} now to {n} to win", "congratulations, your {p} prize awaits, call {n}"]
    fill = dict(x=["lunch", "dinner", "football", "the film"], t=["5", "six", "noon", "8pm"],
                y=["report", "notes", "slides", "photos"], d=["monday", "friday", "tomorrow"],
                z=["plumber", "dentist", "bank"], p=["iPhone", "holiday", "voucher", "ringtone"],
                c=["WIN", "CLAIM", "YES"], n=["08712", "09061", "80062"])

    def one(templates):
        return rng.choice(templates).format(**{k: rng.choice(v) for k, v in fill.items()})

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label", "split"])
        for split, n in (("train", n_train), ("test", n_test)):
            n_spam = round(0.15 * n)
            for i in range(n):
                w.writerow([one(spam), "spam", split] if i < n_spam else [one(ham), "ham", split])
    return path


def test_the_default_learns_the_minority_class_and_the_report_tells_the_truth(tmp_path):
    data = _skewed_messages(tmp_path / "sms.csv")
    run = tmp_path / "run"
    r = lorafit("train", "--data", str(data), "--max-length", "32", "--no-progress", "--out", str(run))
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = json.loads((run / "config.json").read_text())
    final = json.loads((run / "final.json").read_text())
    # the classes came from the data; the skew chose balanced class weights, macro-F1 for --keep best,
    # and more than 3 epochs so the small set gets --min-steps 150 optimizer steps
    assert cfg["num_labels"] is None and cfg["num_labels_resolved"] == 2 and cfg["label_names"] == ["ham", "spam"]
    assert cfg["class_weights_resolved"] == pytest.approx([108 / (2 * 92), 108 / (2 * 16)])
    assert cfg["select_on"] == "macro_f1" and final["selected_on"] == "macro_f1"
    assert final["epochs"] == cfg["epochs_resolved"] == 22  # ceil(150 / 7 steps per epoch)
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 22
    spam = next(c for c in final["test_per_class"] if c["label"] == "spam")
    assert spam["support"] == 9 and spam["recall"] >= 0.8  # the minority class is learned
    assert final["test_majority_share"] == pytest.approx(51 / 60)
    assert final["test_macro_f1"] > 0.8 and final["collapse_warning"] is None
    assert final["test_confusion"][1][1] == round(spam["recall"] * 9) and sum(map(sum, final["test_confusion"])) == 60
    assert "macro-F1" in r.stdout and "collapsed" not in r.stdout
    p = lorafit("predict", str(run), "WINNER! claim your free voucher now, text WIN to 80062", "see you at noon")
    assert p.returncode == 0, p.stderr[-2000:]
    assert [line.split("\t")[0] for line in p.stdout.strip().splitlines()] == ["spam", "ham"]
    wrong = lorafit_here("train", "--data", str(data), "--num-labels", "3", "--out", str(tmp_path / "x"))
    assert wrong.returncode == 2 and "has 2 label classes (ham, spam) but --num-labels is 3" in wrong.stderr
