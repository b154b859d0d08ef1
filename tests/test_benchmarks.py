"""The benchmarks' shared round-stepping: every system steps once per round, every order in turn."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_step_in_rounds_steps_each_system_once_per_round_in_every_order():
    from interleaved import step_in_rounds

    calls = []
    names = ("a", "b", "c")
    steps = {k: (lambda batch, k=k: calls.append((k, batch))) for k in names}
    batches = {k: [f"{k}{r}" for r in range(8)] for k in names}
    kept = []
    times = step_in_rounds(steps, batches, warmup=2, on_round=lambda r, t: kept.append((r, len(t["a"]))))
    # each system got its own batch of each round, once, and rounds ran in order
    assert [b for _, b in calls] == [f"{k}{r}" for r in range(8) for k, _ in calls[3 * r:3 * r + 3]]
    rounds = [tuple(k for k, _ in calls[3 * r:3 * r + 3]) for r in range(8)]
    assert all(sorted(o) == list(names) for o in rounds)
    assert set(rounds[:6]) == set(itertools.permutations(names))  # the first six rounds: all six orders
    assert rounds[6:] == rounds[:2]  # then the cycle starts again
    assert {k: len(v) for k, v in times.items()} == {k: 6 for k in names}  # the 2 warm-up rounds not kept
    assert all(t >= 0 for v in times.values() for t in v)
    assert kept == [(r, r + 1) for r in range(6)]


def test_step_in_rounds_refuses_unequal_batches():
    from interleaved import step_in_rounds

    with pytest.raises(ValueError, match="one batch per round"):
        step_in_rounds({"a": print, "b": print}, {"a": [1, 2], "b": [1]}, warmup=0)


def test_bench_reads_back_only_records_made_on_this_cpu(tmp_path):
    """A record from another CPU (or one that names none) stops the benchmark with the fix named,
    rather than joining this machine's ratios and accuracy means."""
    from common import same_cpu

    from lorafit.machine import cpu_model

    record = tmp_path / "lora-seed1"
    assert same_cpu(cpu_model(), record) == cpu_model()
    for other in ("AMD EPYC", None):  # a Zen 4 record, named before family/model were recorded; none at all
        with pytest.raises(SystemExit, match=r"lora-seed1 was made on .*pass a new --out"):
            same_cpu(other, record)


def test_results_record_the_commit_of_the_code_that_runs(tmp_path, monkeypatch):
    """The commit beside a result is that of the checkout holding the imported lorafit, from any
    folder (a study may run one worktree's code from another's folder, or from outside git)."""
    import subprocess

    import lorafit
    from common import commit

    package = Path(lorafit.__file__).resolve().parent
    head = subprocess.run(["git", "-C", str(package), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(package), "status", "--porcelain", "--", "."], capture_output=True,
                           text=True).stdout.strip()
    monkeypatch.chdir(tmp_path)  # not a git checkout
    assert head and commit() == head + ("-dirty" if dirty else "")


def _rec(dataset, method, seed, f1):
    return {"dataset": dataset, "method": method, "seed": seed, "accuracy": f1, "macro_f1": f1,
            "majority_share": 0.5}


def test_panel_check_judges_each_criterion_on_the_seeds_it_has(tmp_path):
    """`panel.py --check`: a second encoder's runs are judged against the references of the same
    datasets and seeds only (another seed's TF-IDF does not enter the mean), each line names its
    seeds, and the probe of another encoder is not borrowed."""
    import json

    from panel import ENCODER_FREE, check, checked_records

    runs = tmp_path / "mpnet.json"
    runs.write_text(json.dumps({"records": [
        _rec("rt", "lora", 1, 0.80), _rec("rt", "full", 1, 0.86),  # lora 3 points under full: fails
        _rec("rt", "lora", 0, 0.90), _rec("rt", "full", 0, 0.90)]}))
    refs = tmp_path / "panel.json"
    refs.write_text(json.dumps({"records": [
        _rec("rt", "majority", s, 0.2) for s in (0, 1, 2)] + [
        _rec("rt", "tfidf-lr", 0, 0.83), _rec("rt", "tfidf-lr", 1, 0.85), _rec("rt", "tfidf-lr", 2, 0.10),
        _rec("rt", "probe", 0, 0.99), _rec("drugs", "tfidf-lr", 0, 0.5)]}))
    lines = check(checked_records([runs], [([refs], ENCODER_FREE)]))
    assert lines == [
        (True, "rt seed 0 lora: macro-F1 0.900 above the majority class's 0.200"),
        (True, "rt seed 0 full: macro-F1 0.900 above the majority class's 0.200"),
        (True, "rt seed 1 lora: macro-F1 0.800 above the majority class's 0.200"),
        (True, "rt seed 1 full: macro-F1 0.860 above the majority class's 0.200"),
        (True, "rt (seeds 0,1): lora's mean macro-F1 0.850 at least TF-IDF's 0.840"),
        (False, "rt (seeds 0,1): lora's mean macro-F1 0.850 within 2 points of full's 0.880"),
    ]
    # without references: only the lora-against-full criterion can be judged
    assert [ok for ok, _ in check(checked_records([runs]))] == [False]
    # the same run in two files would count twice in a mean: refused, naming it
    twice = r"rt seed 0 full, rt seed 0 lora, rt seed 1 full, rt seed 1 lora in more than one file"
    with pytest.raises(SystemExit, match=twice):
        checked_records([runs, runs], [([refs], ENCODER_FREE)])


def test_panel_reads_back_a_run_only_where_it_trained_as_the_request_would(tmp_path):
    """`panel.py` reads a run back by the settings it trained with: a run made with `--lr 1e-3`
    and the targets without the fully trained classifier is today's default run, one without the
    pooler's adapter (the earlier default) is not; a run left
    at an earlier default rate (config `lr` None, trained at 2e-3) is not, though its `lr`
    field equals the request's."""
    import json

    from panel import _same_settings

    from lorafit.cli import _config, build_parser
    from lorafit.strategies import learning_rate

    def saved(run, **changes):
        cfg = _config(build_parser().parse_args(["train", "--data", "d.csv", "--strategy", "lora", "--seed", "0"]))
        rec = {**cfg.to_dict(), "lr_resolved": learning_rate(cfg), **changes}
        run.mkdir()
        (run / "config.json").write_text(json.dumps(rec))
        return run

    request = ["d.csv", "lora", 0, [], None]
    _same_settings(saved(tmp_path / "default"), request)  # the default run itself
    explicit = saved(tmp_path / "explicit", lr=learning_rate(_config(build_parser().parse_args(["train"]))),
                     targets=["query", "key", "value", "output", "ffn", "pooler.dense"])
    _same_settings(explicit, request)
    with pytest.raises(SystemExit, match=r"targets"):  # the default before the head's first layer had an adapter
        _same_settings(saved(tmp_path / "no-pooler", targets=["encoder", "classifier"]), request)
    with pytest.raises(SystemExit, match=r"\(lr: \[0.002\] against \[0.001\]\)"):
        _same_settings(saved(tmp_path / "earlier", lr_resolved=2e-3), request)
    with pytest.raises(SystemExit, match=r"targets"):
        _same_settings(saved(tmp_path / "kv", targets=["key", "value", "classifier"]), request)
    # the classifier's adapter matters where it is an adapter (--no-train-head)
    no_head = saved(tmp_path / "nohead", train_head=False, targets=["encoder", "pooler"])
    with pytest.raises(SystemExit, match=r"targets"):
        _same_settings(no_head, ["d.csv", "lora", 0, ["--no-train-head"], None])
    # a setting only another strategy reads is no difference (a lora run made before last-two-layers'
    # --standardize existed records none); for last-two-layers it is
    before = saved(tmp_path / "before", standardize=None)
    _same_settings(before, request)

    def saved_last2(run, **changes):
        cfg = _config(build_parser().parse_args(["train", "--data", "d.csv", "--strategy", "last-two-layers"]))
        rec = {**cfg.to_dict(), "lr_resolved": learning_rate(cfg), **changes}
        run.mkdir()
        (run / "config.json").write_text(json.dumps(rec))
        return run

    last2 = ["d.csv", "last-two-layers", 0, [], None]
    _same_settings(saved_last2(tmp_path / "l2"), last2)
    with pytest.raises(SystemExit, match=r"\(standardize: \[None\] against \[True\]\)"):
        _same_settings(saved_last2(tmp_path / "l2-before", standardize=None), last2)


def test_panel_reads_back_a_run_only_where_it_trained_what_today_s_code_trains(tmp_path):
    """A rule with no setting of its own (which head layer lora adapts, trains fully or leaves
    frozen) changes what a run trains but not its config.json: the read-back compares the run's
    trainable count with what today's code sets up for the request on the same number of classes."""
    from panel import _same_trainable, _request_config, trainable_now

    request = ["d.csv", "lora", 0, [], None]
    today = trainable_now(_request_config("d.csv", [], "lora", 0, None), 2)
    assert today == 169_730  # the default model's lora run (docs/recipe.md)
    assert trainable_now(_request_config("d.csv", [], "lora", 1, None), 3) == today + 385  # a third class: 384 + 1
    run = tmp_path / "run"
    _same_trainable(run, {"trainable_params": today, "label_names": ["neg", "pos"]}, request)
    pooler = 384 * 384 + 384  # the pooler trained fully instead of carrying its adapter (rank 4: 4 x 768)
    earlier = today - 4 * 768 + pooler
    with pytest.raises(SystemExit, match=f"trained {earlier:,} parameters, but this request trains {today:,}"):
        _same_trainable(run, {"trainable_params": earlier, "label_names": ["neg", "pos"]}, request)


def test_panel_check_takes_named_methods_from_the_references():
    """lora's rows at a new default, checked against the other rows of the same encoder's panel:
    the named methods come from the references, the references' own lora rows do not, and naming
    lora there too is a run counted twice."""
    import json
    import tempfile

    from panel import check, checked_records

    with tempfile.TemporaryDirectory() as tmp:
        new, old = Path(tmp) / "new.json", Path(tmp) / "old.json"
        new.write_text(json.dumps({"records": [_rec("rt", "lora", 0, 0.85)]}))
        old.write_text(json.dumps({"records": [
            _rec("rt", "majority", 0, 0.2), _rec("rt", "tfidf-lr", 0, 0.7), _rec("rt", "probe", 0, 0.78),
            _rec("rt", "full", 0, 0.86), _rec("rt", "last-two-layers", 0, 0.77), _rec("rt", "lora", 0, 0.10),
            _rec("rt", "full", 1, 0.99)]}))
        methods = ("majority", "tfidf-lr", "probe", "full", "last-two-layers")
        assert [what for _, what in check(checked_records([new], [([old], methods)]))] == [
            "rt seed 0 lora: macro-F1 0.850 above the majority class's 0.200",
            "rt seed 0 full: macro-F1 0.860 above the majority class's 0.200",
            "rt seed 0 last-two-layers: macro-F1 0.770 above the majority class's 0.200",
            "rt (seeds 0): lora's mean macro-F1 0.850 at least TF-IDF's 0.700",
            "rt (seeds 0): lora's mean macro-F1 0.850 within 2 points of full's 0.860",
            "rt (seeds 0): last-two-layers' mean macro-F1 0.770 at least the probe's 0.780",
        ]
        with pytest.raises(SystemExit, match="rt seed 0 lora in more than one file"):
            checked_records([new], [([old], (*methods, "lora"))])


def test_panel_check_takes_the_probe_at_the_runs_length_and_refuses_two_lengths():
    """Runs at 512 tokens are judged against the probe that read 512 (`probe-512`), named as such;
    a dataset holding probes at two lengths has no one probe to judge against: refused."""
    from panel import check

    runs = [_rec("spam", "last-two-layers", s, f) for s, f in ((0, 0.90), (1, 0.88))]
    at512 = [_rec("spam", "probe-512", s, f) for s, f in ((0, 0.88), (1, 0.89))]
    assert check(runs + at512)[-1] == (
        True, "spam (seeds 0,1): last-two-layers' mean macro-F1 0.890 at least the probe-512's 0.885")
    with pytest.raises(SystemExit, match=r"spam has probes at more than one length \(probe, probe-512\)"):
        check(runs + at512 + [_rec("spam", "probe", 0, 0.95)])


def test_panel_check_borrows_each_method_from_its_own_files(tmp_path, monkeypatch, capsys):
    """A second encoder's lora at a new default: its full rows from its own earlier panel files
    (whose lora rows, at the old default, stay out), TF-IDF and the majority from results/panel
    (whose full rows, another encoder's, stay out): `--check-references` once per group, each with
    its `--reference-methods`."""
    import json

    import panel

    new = tmp_path / "new.json"
    new.write_text(json.dumps({"records": [_rec("rt", "lora", 0, 0.91), _rec("rt", "lora", 1, 0.89)]}))
    own = [tmp_path / "own0.json", tmp_path / "own1.json"]
    for seed, f in enumerate(own):
        f.write_text(json.dumps({"records": [_rec("rt", "lora", seed, 0.10), _rec("rt", "full", seed, 0.905)]}))
    minilm = tmp_path / "panel.json"
    minilm.write_text(json.dumps({"records": [
        *(_rec("rt", m, s, f1) for s in (0, 1) for m, f1 in (("majority", 0.2), ("tfidf-lr", 0.7), ("full", 0.3)))]}))
    argv = ["panel.py", "--check", str(new), "--check-references", str(minilm), "--check-references", *map(str, own),
            "--reference-methods", "majority,tfidf-lr", "--reference-methods", "full"]
    monkeypatch.setattr(sys, "argv", argv)
    panel.main()
    assert capsys.readouterr().out.splitlines()[-2:] == [
        "holds   rt (seeds 0,1): lora's mean macro-F1 0.900 at least TF-IDF's 0.700",
        "holds   rt (seeds 0,1): lora's mean macro-F1 0.900 within 2 points of full's 0.905"]
    # a group named without --reference-methods lends the encoder-free two only: not its full rows
    monkeypatch.setattr(sys, "argv", ["panel.py", "--check", str(new), "--check-references", str(minilm)])
    panel.main()
    assert capsys.readouterr().out.splitlines()[-1] == (
        "holds   rt (seeds 0,1): lora's mean macro-F1 0.900 at least TF-IDF's 0.700")
    # the old default's lora rows taken as well would count twice: refused
    monkeypatch.setattr(sys, "argv", [*argv[:-1], "full,lora"])
    with pytest.raises(SystemExit, match="rt seed 0 lora, rt seed 1 lora in more than one file"):
        panel.main()
    monkeypatch.setattr(sys, "argv", [*argv, "--reference-methods", "probe"])
    with pytest.raises(SystemExit, match="one per --check-references"):
        panel.main()


def test_panel_probe_reads_the_texts_at_the_runs_length(tiny_model_dir):
    """A study at another --max-length (in --extra) gets a probe that cuts the texts there too,
    recorded under its own name; the majority and TF-IDF, which read no tokens, keep theirs."""
    import numpy as np

    import panel
    from lorafit.data import load_dataset

    from lorafit.config import RunConfig

    assert panel.request_max_length([]) == RunConfig.max_length  # lorafit's default, through its own parser
    assert panel.request_max_length(["--max-length", "384", "--lr", "1e-3"]) == 384
    assert [panel.reference_name(n, 512) for n in panel.REFERENCES] == ["majority", "tfidf-lr", "probe-512"]
    # `probe` is the 256-token probe of results/panel, whatever lorafit's default is now
    assert [panel.reference_name(n, 256) for n in panel.REFERENCES] == list(panel.REFERENCES)
    split = load_dataset(None, train_size=4, val_size=2, test_size=2).train  # IMDb reviews, all over 16 tokens
    short, long = panel._embed(split, str(tiny_model_dir), 16), panel._embed(split, str(tiny_model_dir), 64)
    assert short.shape == long.shape == (4, 32)
    assert not np.allclose(short, long, atol=1e-4)  # the reviews were cut at 16 tokens, not at 64
