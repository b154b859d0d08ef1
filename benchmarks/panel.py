"""The dataset panel: lorafit's defaults against three references on several public datasets.

Per dataset (benchmarks/panel_data.py) and seed: `lorafit train --data FILE --strategy S
--seed N` for each strategy, with nothing else set, and in the same run three references
on the same train / validation / test cut (`lorafit.data.load_dataset`, same seed):

- majority: the training split's most frequent class for every test text;
- tfidf-lr: TF-IDF (word 1-2 grams, sublinear tf) + logistic regression, class weights
  balanced, C chosen on the validation split's macro-F1 from 0.01-100;
- probe: logistic regression (balanced, C chosen likewise) on the frozen encoder's
  mean-pooled embeddings (what all-MiniLM-L6-v2 was trained to produce), each text cut as
  the runs cut it (`--max-length` in `--extra`; at another length than 256 tokens it is
  named `probe-<length>`).

Resumable: a finished run (its final.json, or a reference's JSON) made on this CPU, with
the settings and the trainable count today's code gives the request, is read back.
`--extra` adds flags to every lorafit run (for a study; the panel itself runs with none)
and `--tag` names such a study's runs apart.

    .venv/bin/python benchmarks/panel.py [--datasets imdb,drugs,spam,rt] [--seeds 0,1,2]
        [--strategies full,last-two-layers,lora] [--model PATH] [--out runs/panel] [--results results/panel]

Writes `--results`/panel.json (every run and reference) and panel.md (per dataset and
method: accuracy and macro-F1, mean and spread over the seeds, and each seed's macro-F1).

`--check PANEL_JSON...` prints issue 31's criteria on written results instead;
`--check-references results/panel/panel.json` judges a second encoder's runs against the
majority and TF-IDF rows of the same datasets and seeds. It repeats, each group of files with
its own `--reference-methods` (a second encoder's lora at a new default: TF-IDF from
results/panel, its full rows from its own panel's files).
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import commit  # noqa: E402
from panel_data import PANEL, build  # noqa: E402

from lorafit.machine import cpu_model  # noqa: E402

REFERENCES = ("majority", "tfidf-lr", "probe")
C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)
LORA_ONLY = {"rank", "alpha", "lora_dropout", "scaling", "targets", "train_head", "dora", "init", "lora_plus_ratio"}
"""RunConfig fields that only the lora strategy reads."""
LAST_TWO_ONLY = {"standardize"}
"""RunConfig fields that only the last-two-layers strategy reads."""


def lorafit_run(data: Path, strategy: str, seed: int, out: Path, extra: list[str], model: str | None) -> dict:
    """final.json of one `lorafit train` run (made now, or read back)."""
    final = out / "final.json"
    if not final.exists():
        cmd = [sys.executable, "-m", "lorafit", "train", "--data", str(data), "--strategy", strategy, "--seed",
               str(seed), "--no-progress", "--out", str(out), "--overwrite", *extra]
        if model:
            cmd += ["--model", model]
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out.with_suffix(".log"), "w") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    rec = json.loads(final.read_text())
    if rec.get("cpu") != cpu_model():
        raise SystemExit(f"{final} was made on {rec.get('cpu')}, but this machine is {cpu_model()}; "
                         "pass a new --out")
    _same_settings(out, [str(data), strategy, seed, extra, model])
    _same_trainable(out, rec, [str(data), strategy, seed, extra, model])
    return rec


def _same_settings(run: Path, request: list) -> None:
    """Refuse to read back a run whose settings are not what this request makes now (a default
    changed since, or other flags): the settings lorafit's parser gives the request's flags,
    against the run's config.json."""
    from lorafit.config import RunConfig
    from lorafit.strategies import learning_rate

    data, strategy, seed, extra, model = request
    cfg = _request_config(data, extra, strategy, seed, model)
    want = _effective(cfg.to_dict(), learning_rate(cfg) if cfg.lr != "auto" else "auto")
    saved = json.loads((run / "config.json").read_text())
    saved = _effective(saved, saved.get("lr_resolved") if saved.get("lr") != "auto" else "auto")
    ignored = ((LORA_ONLY if strategy != "lora" else set())  # settings that do not touch this strategy's run
               | (LAST_TWO_ONLY if strategy != "last-two-layers" else set()))
    differ = sorted(k for k in want if k in RunConfig.__dataclass_fields__ and k not in ignored
                    and saved.get(k) != want[k])
    if differ:
        raise SystemExit(f"{run} was trained with other settings than this request makes now ({', '.join(differ)}: "
                         f"{[saved.get(k) for k in differ]} against {[want[k] for k in differ]}); pass a new --out")


def _same_trainable(run: Path, rec: dict, request: list) -> None:
    """Refuse to read back a run that trained another number of parameters than today's code
    trains for the request: a rule that changed with no setting of its own (which of a head's
    layers lora adapts, trains fully or leaves frozen) passes `_same_settings`, but not this."""
    data, strategy, seed, extra, model = request
    cfg = _request_config(data, extra, strategy, seed, model)
    want = trainable_now(cfg, len(rec["label_names"]))
    if rec["trainable_params"] != want:
        raise SystemExit(f"{run} trained {rec['trainable_params']:,} parameters, but this request trains {want:,} "
                         "with today's code (a rule changed since the run was made); pass a new --out")


def trainable_now(cfg, num_labels: int) -> int:
    """How many parameters `cfg`'s strategy trains on its model with `num_labels` classes today:
    the model loaded and set up as `lorafit train` does, nothing trained."""
    settings = {k: v for k, v in cfg.to_dict().items() if k not in ("seed", "data")}  # what a setup does not read
    return _trainable(json.dumps(settings, sort_keys=True), num_labels)


@functools.cache
def _trainable(settings: str, num_labels: int) -> int:
    """`trainable_now` for a RunConfig's settings as JSON (seed and data at their defaults)."""
    from lorafit.config import RunConfig
    from lorafit.lora import count_parameters
    from lorafit.models import load_model
    from lorafit.strategies import STRATEGIES

    cfg = RunConfig(**json.loads(settings))
    loaded = load_model(cfg.model, num_labels=num_labels, seed=cfg.seed, attn_dropout=cfg.attn_dropout,
                        pooling=cfg.pooling)
    STRATEGIES[cfg.strategy].setup(loaded.model, cfg, loaded.fresh_keys)
    return count_parameters(loaded.model)[0]


def _effective(config: dict, lr) -> dict:
    """A run's settings as training used them: the rate it trained at (a default that moved
    since is a difference; `--lr 1e-3` and a default of 1e-3 are not), and for lora the modules
    its adapters sit on and the modules it trains fully (`encoder` and the five roles it spans
    are the same run; `classifier` is no adapter where `train_head` trains it fully, and a
    `pooler` that loading initialises afresh is neither adapted nor trained there)."""
    from lorafit.config import RunConfig
    from lorafit.strategies import lora_config

    out = {**config, "lr": lr}
    if out.get("strategy") == "lora":
        fields = {k: v for k, v in config.items() if k in RunConfig.__dataclass_fields__}
        loaded = _loaded(out.get("model"))
        lora = lora_config(RunConfig(**fields), loaded.model, loaded.fresh_keys)
        out["targets"] = (_adapted_modules(out.get("model"), tuple(lora.targets)),
                          _adapted_modules(out.get("model"), tuple(lora.train_modules)))
    return out


@functools.cache
def _loaded(model: str | None):
    """`model` as `lorafit train` loads it (2 classes): `lora_config` reads from it whether loading
    initialised the head's first layer afresh, which leaves that layer frozen and out of the adapters."""
    from lorafit.models import load_model

    return load_model(model, num_labels=2)


@functools.cache
def _adapted_modules(model: str | None, targets: tuple[str, ...]) -> tuple[str, ...]:
    """The module names `targets` select on `model`, built from its config on the meta device
    (no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from lorafit.models import resolve_model_path
    from lorafit.targets import resolve_targets

    with torch.device("meta"):
        net = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(resolve_model_path(model)))
    return tuple(resolve_targets(net, targets)) if targets else ()


def _splits(data: Path, seed: int):
    from lorafit.data import load_dataset

    return load_dataset(str(data), seed=seed)


def _fit_lr(x_train, y_train, x_val, y_val, x_test):
    """Balanced logistic regression, C chosen on validation macro-F1; test predictions."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    best = None
    for c in C_GRID:
        clf = LogisticRegression(C=c, class_weight="balanced", max_iter=2000).fit(x_train, y_train)
        score = f1_score(y_val, clf.predict(x_val), average="macro")
        if best is None or score > best[0]:
            best = (score, c, clf)
    return best[2].predict(x_test), best[1]


def _embed(split, model: str | None, max_length: int) -> np.ndarray:
    """Mean-pooled embeddings (N, H) of the frozen encoder (lorafit's mean pooling), each text
    cut to `max_length` tokens as the runs cut it."""
    import torch

    from lorafit.data.encoding import encode_split
    from lorafit.feature_cache import extract_features
    from lorafit.models import load_model
    from lorafit.strategies import head_layers

    loaded = load_model(model or "all-MiniLM-L6-v2", num_labels=2, pooling="mean")
    enc = encode_split(split, loaded.tokenizer, max_length, pad_multiple=8)
    feats = extract_features(loaded.model, head_layers(loaded.model)[0], enc, batch_size=16,
                             pad_id=loaded.tokenizer.pad_token_id or 0, device=torch.device("cpu"), precision="fp32")
    return feats.features.numpy()


PROBE_PLAIN_LENGTH = 256
"""The length the probe's plain name, `probe`, stands for: lorafit's default when results/panel
was made. A probe at any other length is named for it (`probe-512`), whatever the default is
now, so a panel's files and records keep one meaning."""


def reference_name(name: str, max_length: int) -> str:
    """The probe reads the texts as the runs do, so each length is another reference
    (`probe` at 256 tokens, `probe-512`); the majority and TF-IDF do not depend on it."""
    return f"{name}-{max_length}" if name == "probe" and max_length != PROBE_PLAIN_LENGTH else name


def _probe_method(dataset: str, methods: set[str]) -> str | None:
    """The one probe among a dataset's methods (`probe` or `probe-<length>`); two are an error."""
    probes = sorted(m for m in methods if m == "probe" or m.startswith("probe-"))
    if len(probes) > 1:
        raise SystemExit(f"--check: {dataset} has probes at more than one length ({', '.join(probes)}); "
                         f"check each length's runs against their own probe")
    return probes[0] if probes else None


def _request_config(data: str, extra: list[str], strategy: str = "lora", seed: int = 0, model: str | None = None):
    """The RunConfig lorafit's own parser makes of a panel run's flags (its defaults included)."""
    from lorafit.cli import _config, build_parser

    argv = ["train", "--data", str(data), "--strategy", strategy, "--seed", str(seed), *extra,
            *(["--model", model] if model else [])]
    return _config(build_parser().parse_args(argv))


def request_max_length(extra: list[str]) -> int:
    """The `--max-length` a lorafit run of this request trains with (lorafit's parser, so its default too)."""
    return _request_config("panel.csv", extra).max_length


def reference(name: str, data: Path, seed: int, out: Path, model: str | None, max_length: int) -> dict:
    """A reference's test metrics on the seed's cut (made now, or read back)."""
    path = out / f"{reference_name(name, max_length)}.json"
    if path.exists():
        return json.loads(path.read_text())
    from lorafit import metrics

    s = _splits(data, seed)
    y_train, y_val, y_test = s.train.labels, s.validation.labels, s.test.labels
    k = len(s.label_names)
    extra = {}
    if name == "majority":
        preds = np.full(len(y_test), np.bincount(y_train, minlength=k).argmax())
    elif name == "tfidf-lr":
        from sklearn.feature_extraction.text import TfidfVectorizer

        vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2)
        x_train = vec.fit_transform(s.train.texts)
        preds, extra["C"] = _fit_lr(x_train, y_train, vec.transform(s.validation.texts), y_val,
                                    vec.transform(s.test.texts))
    else:
        preds, extra["C"] = _fit_lr(_embed(s.train, model, max_length), y_train,
                                    _embed(s.validation, model, max_length), y_val, _embed(s.test, model, max_length))
    logits = np.eye(k, dtype=np.float32)[preds]
    rec = {**metrics.report(logits, y_test, s.label_names), **extra, "cpu": cpu_model()}
    rec.pop("loss")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec, indent=2) + "\n")
    return rec


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def table(records: list[dict]) -> str:
    """Markdown: per dataset and method, accuracy and macro-F1 (mean ± sd over seeds), each seed's macro-F1."""
    lines = ["| dataset | method | accuracy | macro-F1 | macro-F1 per seed | majority share | epochs |",
             "|---|---|---|---|---|---|---|"]
    keys = list(dict.fromkeys((r["dataset"], r["method"]) for r in records))
    for dataset, method in keys:
        rs = sorted((r for r in records if r["dataset"] == dataset and r["method"] == method), key=lambda r: r["seed"])
        epochs = sorted({r["epochs"] for r in rs if r.get("epochs")})
        per_seed = " / ".join(f"{r['macro_f1']:.3f}" for r in rs)
        lines.append(f"| {dataset} | {method} | {_mean_sd([r['accuracy'] for r in rs])} | "
                     f"{_mean_sd([r['macro_f1'] for r in rs])} | {per_seed} | {rs[0]['majority_share']:.3f} | "
                     f"{','.join(map(str, epochs)) or '-'} |")
    return "\n".join(lines) + "\n"


def check(records: list[dict]) -> list[tuple[bool, str]]:
    """Issue 31's criteria on the panel's records: (holds, what) per criterion and dataset.

    Each line names the seeds its means are over, so a partial panel (one seed of a second
    encoder's runs) reads as what it is."""
    out = []
    for dataset in dict.fromkeys(r["dataset"] for r in records):
        rs = sorted((r for r in records if r["dataset"] == dataset), key=lambda r: r["seed"])
        seeds = ",".join(map(str, sorted({r["seed"] for r in rs})))

        def mean(method: str) -> float | None:
            vals = [r["macro_f1"] for r in rs if r["method"] == method]
            return statistics.mean(vals) if vals else None

        majority = {r["seed"]: r["macro_f1"] for r in rs if r["method"] == "majority"}
        for r in rs:
            if r["method"] in ("full", "last-two-layers", "lora") and r["seed"] in majority:
                out.append((r["macro_f1"] > majority[r["seed"]],
                            f"{dataset} seed {r['seed']} {r['method']}: macro-F1 {r['macro_f1']:.3f} above the "
                            f"majority class's {majority[r['seed']]:.3f}"))
        lora, full, tfidf = mean("lora"), mean("full"), mean("tfidf-lr")
        probe_name = _probe_method(dataset, {r["method"] for r in rs})
        last2, probe = mean("last-two-layers"), mean(probe_name) if probe_name else None
        where = f"{dataset} (seeds {seeds})"
        if lora is not None and tfidf is not None:
            out.append((lora >= tfidf, f"{where}: lora's mean macro-F1 {lora:.3f} at least TF-IDF's {tfidf:.3f}"))
        if lora is not None and full is not None:
            out.append((lora >= full - 0.02, f"{where}: lora's mean macro-F1 {lora:.3f} within 2 points of "
                        f"full's {full:.3f}"))
        if last2 is not None and probe is not None:
            out.append((last2 >= probe, f"{where}: last-two-layers' mean macro-F1 {last2:.3f} at least the "
                        f"{probe_name}'s {probe:.3f}"))
    return out


ENCODER_FREE = ("majority", "tfidf-lr")
"""The references that do not depend on the encoder: another encoder's check may borrow them."""


def checked_records(panels: list[Path], borrowed: list[tuple[list[Path], tuple[str, ...]]] = ()) -> list[dict]:
    """The records of every `panels` file, and from each (files, methods) pair of `borrowed`
    those files' rows of `methods` on the same datasets and seeds. The majority and TF-IDF rows
    (`ENCODER_FREE`) do not depend on the encoder fine-tuned, so a second encoder's runs borrow
    them from results/panel; the probe and the strategies' rows do, so they are borrowed only
    from the same encoder's files (lora's rows at a new default against the other rows of the
    same encoder's panel; a second encoder's full rows from its own earlier panel). A record
    that two files both hold would count twice in a mean, so it stops the check."""
    records = [r for p in panels for r in json.loads(p.read_text())["records"]]
    seen = {(r["dataset"], r["seed"]) for r in records}
    for files, names in borrowed:
        records += [r for f in files for r in json.loads(f.read_text())["records"]
                    if r["method"] in names and (r["dataset"], r["seed"]) in seen]
    counts = collections.Counter((r["dataset"], r["seed"], r["method"]) for r in records)
    twice = sorted(k for k, n in counts.items() if n > 1)
    if twice:
        raise SystemExit(f"--check: {', '.join(f'{d} seed {s} {m}' for d, s, m in twice)} in more than one file; "
                         f"pass each run's panel.json once")
    return records


def criteria_lines(records: list[dict]) -> list[str]:
    """`check`'s verdicts as `--check` prints them: "holds   " or "FAILS   ", then the criterion."""
    return [("holds   " if ok else "FAILS   ") + what for ok, what in check(records)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default=",".join(PANEL))
    ap.add_argument("--strategies", default="full,last-two-layers,lora")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--references", default=",".join(REFERENCES), help="comma list, or none")
    ap.add_argument("--model", default=None, help="--model for lorafit and the probe (default: the embedded one)")
    ap.add_argument("--extra", default="", help="flags added to every lorafit run (a study; the panel uses none)")
    ap.add_argument("--tag", default="", help="a name for this study's runs (with --extra)")
    ap.add_argument("--data-dir", default="runs/panel_data")
    ap.add_argument("--out", default="runs/panel")
    ap.add_argument("--results", default=None, help="folder for panel.json and panel.md (default: none written)")
    ap.add_argument("--check", metavar="PANEL_JSON", nargs="+", type=Path,
                    help="only print issue 31's criteria on written panel.json files (their runs together)")
    ap.add_argument("--check-references", metavar="PANEL_JSON", type=Path, nargs="+", action="append",
                    help="with --check: the majority and TF-IDF rows of the same datasets and seeds from these panel "
                         "files (a second encoder's runs against the references of results/panel); repeatable, "
                         "each with its own --reference-methods")
    ap.add_argument("--reference-methods", action="append",
                    help="with --check-references, once per --check-references in the same order: the methods taken "
                         "from those files (default: majority,tfidf-lr, the two that do not depend on the encoder; "
                         "name probe, full, last-two-layers only for runs of the same encoder)")
    args = ap.parse_args()
    if args.check:
        files, names = args.check_references or [], args.reference_methods or []
        if len(names) > len(files):
            raise SystemExit("--reference-methods: one per --check-references, in the same order")
        groups = [(f, tuple((names[i] if i < len(names) else ",".join(ENCODER_FREE)).split(",")))
                  for i, f in enumerate(files)]
        print("\n".join(criteria_lines(checked_records(args.check, groups))))
        return
    extra = shlex.split(args.extra)
    max_length = request_max_length(extra)
    refs = [] if args.references == "none" else args.references.split(",")
    records, t0 = [], time.perf_counter()
    for dataset in args.datasets.split(","):
        data = build(dataset, Path(args.data_dir))
        for seed in map(int, args.seeds.split(",")):
            for name in refs:
                r = reference(name, data, seed, Path(args.out) / dataset / f"seed{seed}", args.model, max_length)
                records.append({"dataset": dataset, "method": reference_name(name, max_length), "seed": seed,
                                "accuracy": r["accuracy"],
                                "macro_f1": r["macro_f1"], "majority_share": r["majority_share"]})
            for strategy in [] if args.strategies == "none" else args.strategies.split(","):
                run_name = strategy + (f"-{args.tag}" if args.tag else "")
                t_run = time.perf_counter()
                f = lorafit_run(data, strategy, seed, Path(args.out) / dataset / f"seed{seed}" / run_name, extra,
                                args.model)
                records.append({"dataset": dataset, "method": run_name, "seed": seed, "accuracy": f["test_accuracy"],
                                "macro_f1": f["test_macro_f1"], "majority_share": f["test_majority_share"],
                                "epochs": f["epochs"], "train_seconds": f["train_seconds"],
                                "collapse_warning": f["collapse_warning"], "lr": f["lr"],
                                "trainable_params": f["trainable_params"]})
                print(f"{dataset} seed {seed} {run_name}: acc {f['test_accuracy']:.4f} macro-F1 "
                      f"{f['test_macro_f1']:.4f} (this run {time.perf_counter() - t_run:.0f} s, "
                      f"the panel so far {time.perf_counter() - t0:.0f} s)", flush=True)
                write_results(args.results, records)  # after every run: a cut-off panel keeps what it has
    write_results(args.results, records)
    print(table(records))


def write_results(folder: str | None, records: list[dict]) -> None:
    """`folder`/panel.json (every record, the command, the CPU) and panel.md (the table)."""
    if not folder or not records:
        return
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    command = "benchmarks/panel.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    made_at = commit()
    (out / "panel.json").write_text(json.dumps({"command": command, "commit": made_at, "cpu": cpu_model(),
                                                "records": records}, indent=2) + "\n")
    (out / "panel.md").write_text(f"# The dataset panel\n\n`{command}` at commit {made_at}\n\nCPU: {cpu_model()}"
                                  f"\n\n{table(records)}")


if __name__ == "__main__":
    main()
