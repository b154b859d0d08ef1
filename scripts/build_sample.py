"""Build the embedded IMDb sample (src/lorafit/data/imdb_sample.jsonl.gz) from the official archive.

Reproducible: a stratified, seeded draw of reviews from the official train and test
splits, balanced per class, written with a fixed gzip mtime so the bytes are the same
on every run.

    .venv/bin/python scripts/build_sample.py ../shared/data/aclImdb_v1_labeled.tar.gz
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "src" / "lorafit" / "data" / "imdb_sample.jsonl.gz"
MEMBER = re.compile(r"(?:^|/)(train|test)/(pos|neg)/(\d+)_(\d+)\.txt$")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("archive", type=Path)
    ap.add_argument("--train-per-class", type=int, default=550)
    ap.add_argument("--test-per-class", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()

    rows: dict[tuple[str, str], list[tuple[int, int, str]]] = {}
    with tarfile.open(args.archive, "r|*") as tar:
        for m in tar:
            hit = MEMBER.search(m.name)
            if hit and m.isfile():
                split, label, ident, rating = hit.groups()
                text = tar.extractfile(m).read().decode("utf-8")
                rows.setdefault((split, label), []).append((int(ident), int(rating), text))
    rng = np.random.default_rng(args.seed)
    lines = []
    for split, per_class in (("train", args.train_per_class), ("test", args.test_per_class)):
        for label in ("neg", "pos"):
            pool = sorted(rows[(split, label)])
            for i in sorted(rng.choice(len(pool), size=per_class, replace=False)):
                ident, rating, text = pool[i]
                lines.append(json.dumps({"split": split, "label": label, "id": ident, "rating": rating,
                                         "text": text}, ensure_ascii=False))
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9, mtime=0, filename="") as gz:
        gz.write(("\n".join(lines) + "\n").encode("utf-8"))
    args.out.write_bytes(buf.getvalue())
    print(f"wrote {args.out}: {len(lines)} reviews, {len(buf.getvalue()) / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
