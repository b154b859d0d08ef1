"""The downloader against a local HTTP server on 127.0.0.1 (lorafit/data/download.py)."""

from __future__ import annotations

import hashlib
import http.server
import threading
from pathlib import Path

import pytest

from data_fixtures import write_imdb_tar
from lorafit.data import load_dataset
from lorafit.data.download import download, download_imdb
from lorafit.errors import DataError


@pytest.fixture
def server(tmp_path):
    payload = write_imdb_tar(tmp_path / "served.tar.gz").read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.path == "/cut":  # the connection drops half-way
                self.wfile.write(payload[: len(payload) // 2])
                self.wfile.flush()
                self.connection.shutdown(2)
                return
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", payload
    httpd.shutdown()
    httpd.server_close()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_checksum_pass_then_cached(server, tmp_path):
    url, payload = server
    cache = tmp_path / "cache"
    path = download_imdb(cache, url=url + "/a", sha256=hashlib.sha256(payload).hexdigest(), progress=False)
    assert path.read_bytes() == payload and _leftovers(cache) == ["aclImdb_v1.tar.gz"]
    assert download_imdb(cache, url="http://127.0.0.1:9/unused", sha256=hashlib.sha256(payload).hexdigest(),
                         progress=False) == path  # cached: no second fetch
    assert load_dataset(path, val_size=2).sizes()["test"] == 4


def test_checksum_fail_leaves_nothing(server, tmp_path):
    url, _ = server
    with pytest.raises(DataError, match="has sha256 .* expected 0000"):
        download(url + "/a", tmp_path / "c" / "a.tar.gz", sha256="0" * 64, progress=False)
    assert _leftovers(tmp_path / "c") == []


def test_connection_cut_leaves_nothing(server, tmp_path):
    url, payload = server
    with pytest.raises(DataError, match="broke off|cannot download"):
        download(url + "/cut", tmp_path / "c" / "a.tar.gz", sha256=hashlib.sha256(payload).hexdigest(),
                 progress=False)
    assert _leftovers(tmp_path / "c") == []


def test_unreachable_server_says_what_to_do(tmp_path):
    with pytest.raises(DataError, match="check the network, or pass a local copy with --data"):
        download("http://127.0.0.1:9/x", tmp_path / "a.tar.gz", sha256=None, progress=False, timeout=5)
    assert _leftovers(tmp_path) == []
