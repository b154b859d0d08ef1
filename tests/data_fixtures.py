"""Small datasets the data tests write themselves: IMDb layouts, archives, tables."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

REVIEWS = {
    ("train", "pos"): ["A <b>great</b> film.<br /><br />Loved it &amp; the cast.", "Wonderful acting, superb story.",
                       "Best movie of the year!"],
    ("train", "neg"): ["Terrible.<br />Boring plot.", "I walked out after ten minutes.", "Awful, just awful."],
    ("test", "pos"): ["Charming and funny.", "A masterpiece."],
    ("test", "neg"): ["Dull and far too long.", "Not worth the ticket."],
}


def write_imdb_dir(root: Path, reviews=REVIEWS) -> Path:
    for (split, label), texts in reviews.items():
        folder = root / "aclImdb" / split / label
        folder.mkdir(parents=True, exist_ok=True)
        for i, text in enumerate(texts):
            rating = 9 if label == "pos" else 2
            (folder / f"{i}_{rating}.txt").write_text(text, encoding="utf-8")
    return root / "aclImdb"


def write_imdb_tar(path: Path, reviews=REVIEWS, extra: dict[str, bytes] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        members = {f"aclImdb/{s}/{lab}/{i}_{9 if lab == 'pos' else 2}.txt": t.encode()
                   for (s, lab), texts in reviews.items() for i, t in enumerate(texts)}
        members.update(extra or {})
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path
