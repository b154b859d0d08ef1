"""Downloading the official IMDb archive into the cache: progress bar, checksum, atomic."""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from lorafit.machine import cache_root
from lorafit.errors import DataError

IMDB_URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
IMDB_SHA256 = "c40f74a18d3b61f90feba1e17730e0d38e8b97c05fde7008942e91923d1658fe"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(url: str, dest: Path, sha256: str | None, progress: bool = True, timeout: float = 60.0) -> Path:
    """Fetch `url` to `dest`: into a temporary file beside it, checked, then renamed.

    A failed, interrupted or mismatching download leaves no file at `dest` (nor a
    temporary one), so a later run never takes a partial file for complete.

    Raises:
        DataError: the server cannot be reached, the transfer breaks off, or the
            checksum differs.
    """
    from tqdm import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp, os.fdopen(fd, "wb") as out:
                total = int(resp.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=not progress) as bar:
                    got = 0
                    while block := resp.read(1 << 16):
                        out.write(block)
                        h.update(block)
                        got += len(block)
                        bar.update(len(block))
                if total is not None and got != total:
                    raise DataError(f"the download of {url} broke off after {got:,} of {total:,} bytes; "
                                    "run the command again")
                out.flush()
                os.fsync(out.fileno())
        except (urllib.error.URLError, OSError, ConnectionError) as exc:
            raise DataError(f"cannot download {url} ({exc}); check the network, or pass a local copy with --data "
                            "PATH (an aclImdb folder or its .tar.gz)") from None
        if sha256 and h.hexdigest() != sha256:
            raise DataError(f"the file downloaded from {url} has sha256 {h.hexdigest()}, expected {sha256}; "
                            "it is corrupt or not the expected file: run the command again")
        os.replace(tmp, dest)
        return dest
    finally:
        tmp.unlink(missing_ok=True)


def download_imdb(cache_dir: Path | None = None, url: str = IMDB_URL, sha256: str | None = IMDB_SHA256,
                  progress: bool = True) -> Path:
    """The official archive in the cache (`<cache>/aclImdb_v1.tar.gz`), fetched if absent."""
    dest = (cache_dir or cache_root()) / "aclImdb_v1.tar.gz"
    if dest.exists() and (sha256 is None or _sha256(dest) == sha256):
        return dest
    return download(url, dest, sha256, progress=progress)
