"""Reading labelled text from where users keep it, into `DatasetSplits`.

Sources: the embedded IMDb sample (the default), an `aclImdb/` folder in the official
layout, a `.tar.gz` of that layout (read without extracting), `imdb` (the official
archive, downloaded once into the cache), or a CSV / JSONL / Parquet table.
"""

from __future__ import annotations

import gzip
import json
import re
import tarfile
import zlib
from importlib import resources
from pathlib import Path

import numpy as np

from lorafit.data.splits import DatasetSplits, Split, carve_validation, resolve_size, stratified_subset
from lorafit.data.text import clean_text
from lorafit.errors import DataError

IMDB_LABELS = ["neg", "pos"]
EMBEDDED_SAMPLE = "imdb_sample.jsonl.gz"
TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
_IMDB_MEMBER = re.compile(r"(?:^|/)(train|test)/(pos|neg)/(\d+)_(\d+)\.txt$")
_LAYOUT = "aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt"

Rows = dict[str, list[tuple[int, int, str]]]  # split -> [(label, id, raw text)]


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{where} is not valid UTF-8 ({exc.reason} at byte {exc.start}); "
                        "re-encode the file as UTF-8") from None


def _add(rows: Rows, name: str, raw: bytes, where: str) -> bool:
    m = _IMDB_MEMBER.search(name)
    if not m:
        return False
    split, label, ident = m.group(1), IMDB_LABELS.index(m.group(2)), int(m.group(3))
    rows[split].append((label, ident, _decode(raw, where)))
    return True


def read_imdb_dir(path: Path) -> Rows:
    """Reviews of an `aclImdb/` folder (or its parent) in the official layout."""
    root = path / "aclImdb" if (path / "aclImdb").is_dir() else path
    rows: Rows = {"train": [], "test": []}
    for split in ("train", "test"):
        for label in IMDB_LABELS:
            folder = root / split / label
            if not folder.is_dir():
                continue
            for f in folder.glob("*.txt"):
                _add(rows, f"{split}/{label}/{f.name}", f.read_bytes(), str(f))
    _check_layout(rows, path)
    return rows


def _is_tarfile(path: Path) -> bool:
    """tarfile.is_tarfile, False where probing a corrupt file raises (on some random gzip
    bytes Python 3.11's probe raises EOFError instead of answering)."""
    try:
        return tarfile.is_tarfile(path)
    except (tarfile.TarError, EOFError, zlib.error, OSError):
        return False


def read_imdb_tar(path: Path) -> Rows:
    """Reviews of a tar(.gz) in the official layout, streamed: nothing is extracted to disk."""
    rows: Rows = {"train": [], "test": []}
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                if member.isfile() and _IMDB_MEMBER.search(member.name):
                    f = tar.extractfile(member)
                    _add(rows, member.name, f.read() if f else b"", f"{path}:{member.name}")
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise DataError(f"{path} is not a readable tar archive ({type(exc).__name__}: {exc}); it is truncated or "
                        "corrupt: download it again (lorafit data download)") from None
    _check_layout(rows, path)
    return rows


def _check_layout(rows: Rows, path: Path) -> None:
    missing = [f"{s}/{lab}" for s in ("train", "test") for i, lab in enumerate(IMDB_LABELS)
               if not any(r[0] == i for r in rows[s])]
    if len(missing) == 4:
        raise DataError(f"{path} holds no reviews in the official IMDb layout; expected {_LAYOUT}")
    if missing:
        raise DataError(f"{path} has no reviews under {', '.join(missing)}; expected {_LAYOUT}")


def _imdb_splits(rows: Rows) -> tuple[Split, Split]:
    out = []
    for split in ("train", "test"):
        ordered = sorted(rows[split])  # (label, id): the same order whatever the archive's
        out.append(Split([clean_text(t) for _, _, t in ordered], np.array([r[0] for r in ordered]),
                         list(IMDB_LABELS)))
    return out[0], out[1]


def read_embedded() -> tuple[Split, Split]:
    """The IMDb sample shipped in the package (built by scripts/build_sample.py)."""
    data = resources.files("lorafit.data").joinpath(EMBEDDED_SAMPLE).read_bytes()
    rows: Rows = {"train": [], "test": []}
    for line in gzip.decompress(data).decode("utf-8").split("\n"):
        if not line:
            continue
        r = json.loads(line)
        rows[r["split"]].append((IMDB_LABELS.index(r["label"]), int(r["id"]), r["text"]))
    return _imdb_splits(rows)


def _read_table(path: Path, text_column: str, label_column: str) -> dict[str, list]:
    import pyarrow as pa

    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        elif path.suffix in (".jsonl", ".json"):
            import pyarrow.json as pj

            table = pj.read_json(path)
        else:
            import pyarrow.csv as pc

            opts = pc.ParseOptions(delimiter="\t" if path.suffix == ".tsv" else ",", newlines_in_values=True)
            table = pc.read_csv(path, parse_options=opts)
    except (pa.ArrowException, OSError, UnicodeDecodeError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
        raise DataError(f"{path} cannot be read as {path.suffix.lstrip('.').upper()} ({first}); "
                        "check the file's format and encoding (UTF-8)") from None
    try:
        columns = table.column_names
        for what, col in (("text", text_column), ("label", label_column)):
            if col not in columns:
                raise DataError(f"{path} has no {what} column {col!r} (its columns: {', '.join(columns)}); "
                                f"name it with --{what}-column")
            kind = table.column(col).type
            if pa.types.is_nested(kind):  # lists, objects, maps: no text or label is one of those
                raise DataError(f"{path}: the {what} column {col!r} holds {kind} values; it must hold one "
                                + ("string per row" if what == "text" else "integer or string label per row"))
        out = {"text": table.column(text_column).to_pylist(), "label": table.column(label_column).to_pylist()}
        out["split"] = table.column("split").to_pylist() if "split" in columns else None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not valid UTF-8 ({exc.reason} at byte {exc.start}); re-encode it as UTF-8") \
            from None
    except (pa.ArrowException, SystemError) as exc:  # SystemError: pyarrow on some malformed values
        raise DataError(f"{path} holds values that cannot be read ({exc}); check the file") from None
    return out


def _label_ids(values: list, path: Path) -> tuple[np.ndarray, list[str]]:
    if any(v is None for v in values):
        raise DataError(f"{path} has rows with no label; fill or drop them")
    if not all(isinstance(v, (int, float, str, np.integer)) for v in values):
        bad = next(v for v in values if not isinstance(v, (int, float, str, np.integer)))
        raise DataError(f"{path} has a label that is not a number or a string ({type(bad).__name__}); "
                        "labels must be ints or strings")
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        names = sorted(set(values))
        index = {v: i for i, v in enumerate(names)}
        return np.array([index[v] for v in values]), [str(v) for v in names]
    strings = [str(v).strip() for v in values]
    names = sorted(set(strings))
    index = {v: i for i, v in enumerate(names)}
    return np.array([index[v] for v in strings]), names


def read_table(path: Path, text_column: str = "text", label_column: str = "label",
               seed: int = 0, test_fraction: float = 0.2) -> tuple[Split, Split]:
    """(train, test) from a CSV / TSV / JSONL / Parquet table.

    A `split` column (values `train` / `test`) says which is which; without one, a
    stratified, seeded `test_fraction` of the rows becomes the test split.
    """
    table = _read_table(path, text_column, label_column)
    texts = table["text"]
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        if isinstance(texts[bad[0]], bytes):
            raise DataError(f"{path}: row {bad[0] + 1} of column {text_column!r} is not valid UTF-8; "
                            "re-encode the file as UTF-8")
        raise DataError(f"{path}: row {bad[0] + 1} of column {text_column!r} is not text; fix or drop it")
    labels, names = _label_ids(table["label"], path)
    everything = Split([clean_text(t) for t in texts], labels, names)
    empty = [i for i, t in enumerate(everything.texts) if not t]
    if empty:
        raise DataError(f"{path}: row {empty[0] + 1} of column {text_column!r} is empty ({len(empty)} empty row(s) in "
                        "all); fill or drop them")
    if table["split"] is not None:
        split = np.array([str(s).strip().lower() for s in table["split"]])
        unknown = sorted(set(split) - {"train", "test"})
        if unknown:
            raise DataError(f"{path}: the split column holds {unknown[0]!r}; use train or test")
        return everything.subset(np.flatnonzero(split == "train")), everything.subset(np.flatnonzero(split == "test"))
    if len(everything) < 2:
        raise DataError(f"{path} holds {len(everything)} rows; a dataset needs at least a few per class")
    rest, test = carve_validation(everything, max(1, round(test_fraction * len(everything))), seed + 1)
    return rest, test


def _check_classes(train: Split, test: Split, num_labels: int | None, source: str) -> None:
    if len(train) == 0:
        raise DataError(f"{source} holds no training examples; point --data at a dataset with a train split")
    if len(test) == 0:
        raise DataError(f"{source} holds no test examples; add a test split (a `split` column for tables)")
    names = train.label_names
    if len(names) < 2:
        raise DataError(f"the labels of {source} hold one class ({', '.join(names)}); a classifier needs at least "
                        "two: check --label-column")
    counts, test_counts = train.class_counts(), test.class_counts()
    only_test = [n for n, c, t in zip(names, counts, test_counts) if c == 0 and t > 0]
    if only_test:
        raise DataError(f"class(es) {', '.join(map(repr, only_test))} of {source} appear only in the test split; "
                        "add training examples of them, or drop their test rows")
    if num_labels is not None and len(names) != num_labels:
        raise DataError(f"{source} has {len(names)} label classes ({', '.join(names[:10])}) but --num-labels is "
                        f"{num_labels}; leave --num-labels out (it defaults to the data's classes) or fix the labels")
    if min(counts) == 0:
        absent = [n for n, c in zip(names, counts) if c == 0]
        raise DataError(f"the training split of {source} has no example of class(es) {', '.join(map(repr, absent))}; "
                        "a classifier needs examples of every class")


def load_dataset(source: str | Path | None = None, *, val_size: int | float = 0.1,
                 train_size: int | None = None, test_size: int | None = None, seed: int = 0,
                 text_column: str = "text", label_column: str = "label", num_labels: int | None = None
                 ) -> DatasetSplits:
    """Load a labelled text dataset into train / validation / test.

    Args:
        source: None (the embedded IMDb sample), `imdb` (the official archive,
            downloaded once into the cache), an `aclImdb/` folder, a tar(.gz) of that
            layout, or a .csv/.tsv/.jsonl/.parquet table.
        val_size: validation examples carved from train, stratified and seeded: a
            count, or a fraction of the (capped) training size.
        train_size, test_size: optional caps, as stratified seeded subsets.
        seed: the seed of every cut.
        num_labels: the number of classes the data must have (None: whatever it holds,
            at least two).

    Raises:
        DataError: a missing path, a wrong layout, a corrupt archive, missing columns,
            undecodable or empty text, an empty or one-class dataset, a class only in the
            test split or without training examples, or a label count other than `num_labels`.
    """
    if source is None or str(source) == "embedded":
        train, test = read_embedded()
        name = "embedded IMDb sample"
    elif str(source) == "imdb":
        from lorafit.data.download import download_imdb

        path = download_imdb()
        train, test = _imdb_splits(read_imdb_tar(path))
        name = str(path)
    else:
        path = Path(source).expanduser()
        name = str(path)
        if not path.exists():
            raise DataError(f"data source {path} does not exist; pass an aclImdb/ folder, a .tar.gz of it, a "
                            ".csv/.jsonl/.parquet file, `imdb` (download) or nothing for the embedded sample")
        if path.is_dir():
            train, test = _imdb_splits(read_imdb_dir(path))
        elif path.suffix.lower() in TABLE_SUFFIXES:
            train, test = read_table(path, text_column, label_column, seed=seed)
        elif path.name.endswith((".tar.gz", ".tgz", ".tar")) or _is_tarfile(path):
            train, test = _imdb_splits(read_imdb_tar(path))
        else:
            raise DataError(f"{path} is neither a folder, a tar archive nor a .csv/.tsv/.jsonl/.parquet table; "
                            "pass one of those")
    _check_classes(train, test, num_labels, name)
    n_train_cap = resolve_size(train_size, len(train), "train_size (--train-size)")
    pool = min(n_train_cap or len(train), len(train))
    n_val = resolve_size(val_size, pool, "val_size (--val-size)")
    train, validation = carve_validation(train, n_val, seed)
    train = stratified_subset(train, n_train_cap, seed + 2)
    test = stratified_subset(test, resolve_size(test_size, len(test), "test_size (--test-size)"), seed + 3)
    if min(train.class_counts()) == 0:
        absent = [n for n, c in zip(train.label_names, train.class_counts()) if c == 0]
        raise DataError(f"after carving validation (and --train-size), the training split of {name} has no example "
                        f"of class(es) {', '.join(map(repr, absent))}; lower --val-size, raise --train-size or add "
                        "examples of that class")
    return DatasetSplits(train=train, validation=validation, test=test, source=name)
