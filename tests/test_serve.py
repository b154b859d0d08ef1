"""`lorafit serve` as users run it: a real server in a subprocess on a free port, a real HTTP
client. Adapters of one base share it; every answer equals the run's own prediction."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

import lorafit

httpx = pytest.importorskip("httpx", reason="the test extra (httpx)")
pytest.importorskip("uvicorn", reason="the serve extra: pip install 'lorafit[serve]'")

SMALL = dict(train_size=24, val_size=8, test_size=16, max_length=64, epochs=1, precision="fp32", progress=False,
             pooling="mean")
TEXTS = ["A wonderful, moving film.", "Dull and far too long; I left early.", "ok", "The plot made no sense at all.",
         "Superb acting, a script that sings, and an ending I did not see coming.", "meh " * 80]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three lora runs (plain, DoRA, rsLoRA) and a last-two-layers run of the embedded
    all-MiniLM-L6-v2 on tiny IMDb slices: real weights, as users serve them."""
    root = tmp_path_factory.mktemp("serve")
    return {
        "a": lorafit.train(strategy="lora", seed=0, out=root / "a", **SMALL).path,
        "b": lorafit.train(strategy="lora", seed=1, dora=True, out=root / "b", **SMALL).path,
        "c": lorafit.train(strategy="lora", seed=2, scaling="rslora", out=root / "c", **SMALL).path,
        "heads": lorafit.train(strategy="last-two-layers", seed=3, out=root / "d", **SMALL).path,
    }


def start(args: list[str]):
    """`lorafit serve ARGS` on a free port; (url, process) once /health answers."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lorafit", "serve", *args, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            time.sleep(0.3)
    else:
        proc.kill()
        raise AssertionError("the server did not come up in 180 s")
    return url, proc


@pytest.fixture(scope="module")
def server(runs):
    url, proc = start([a for name, path in runs.items() for a in ("--adapter", f"{name}={path}")])
    yield url, proc
    if proc.poll() is None:
        proc.kill()


@pytest.fixture(scope="module")
def guarded(runs):
    """A server with an API key and an adapter root (the folder holding the runs), serving `a`."""
    url, proc = start(["--adapter", f"a={runs['a']}", "--api-key", "s3cret", "--adapter-root",
                       str(runs["a"].parent)])
    yield url, proc, {"Authorization": "Bearer s3cret"}
    if proc.poll() is None:
        proc.kill()


def expected(runs, name, texts):
    return [p["probabilities"] for p in lorafit.load_run(runs[name]).predict(texts)]


def test_each_adapter_answers_as_its_run_predicts(runs, server):
    url, _ = server
    info = httpx.get(url + "/info").json()
    assert sorted(info["served"]) == ["a", "b", "c", "heads"]
    assert info["served"]["a"]["kind"] == "adapter" and info["served"]["heads"]["labels"] == ["neg", "pos"]
    for name in runs:
        r = httpx.post(url + "/predict", json={"inputs": TEXTS, "adapter": name}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.headers["x-lorafit-truncated"] == "5"  # the long text was cut to max_length, as in training
        for got, want in zip(r.json(), expected(runs, name, TEXTS)):
            assert [p["score"] for p in got] == sorted((p["score"] for p in got), reverse=True)
            assert {p["label"]: p["score"] for p in got} == pytest.approx(want, abs=1e-5)
    one = httpx.post(url + "/predict", json={"inputs": TEXTS[0], "adapter": "b"}).json()
    assert isinstance(one, list) and isinstance(one[0], dict)  # a single text: one list of labels (TEI's shape)


def test_300_concurrent_requests_over_four_adapters_none_lost_none_mixed(runs, server):
    url, _ = server
    want = {n: expected(runs, n, TEXTS) for n in runs}
    names = list(runs)
    # the four answer differently, so an answer given under another adapter would show
    assert len({tuple(round(v, 4) for v in want[n][0].values()) for n in names}) == 4

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=64)) as c:
            async def one(k):
                name, i = names[k % 4], k % len(TEXTS)
                r = await c.post("/predict", json={"inputs": [TEXTS[i]], "adapter": name})
                return name, i, r
            return await asyncio.gather(*(one(k) for k in range(300)))

    results = asyncio.run(main())
    assert len(results) == 300
    for name, i, r in results:
        assert r.status_code == 200, r.text
        assert {p["label"]: p["score"] for p in r.json()[0]} == pytest.approx(want[name][i], abs=1e-5)


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, "not valid JSON"),
    (b'{"text": "hi"}', 422, 'needs an "inputs" field'),
    (b'{"inputs": [], "adapter": "a"}', 422, "empty list"),
    (b'{"inputs": ["fine", ""], "adapter": "a"}', 422, "input 1 is empty"),
    (b'{"inputs": [3], "adapter": "a"}', 422, "input 0 is int"),
    (b'{"inputs": "hi", "adapter": "nope"}', 404, "no adapter or model named 'nope'; this server holds: a, b, c, "
                                                  "heads"),
    (b'{"inputs": "hi"}', 422, 'name one in "adapter"'),
])
def test_bad_requests_get_a_4xx_that_says_what_to_change(server, body, status, message):
    url, _ = server
    r = httpx.post(url + "/predict", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status and message in r.json()["error"], r.text
    assert httpx.post(url + "/predict", json={"inputs": "still serving", "adapter": "a"}).status_code == 200


def test_too_many_inputs_is_413(server):
    url, _ = server
    r = httpx.post(url + "/predict", json={"inputs": ["x"] * 65, "adapter": "a"})
    assert r.status_code == 413 and "more than the 64 per request" in r.json()["error"]


def test_the_api_key_guards_every_route_but_health(guarded):
    url, _, key = guarded
    assert httpx.get(url + "/health").status_code == 200
    r = httpx.get(url + "/info")
    assert r.status_code == 401 and "Authorization: Bearer" in r.json()["error"]
    assert httpx.get(url + "/info", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(url + "/info", headers=key).status_code == 200
    assert httpx.post(url + "/predict", json={"inputs": "hi"}, headers=key).status_code == 200  # one model: no name


def test_adapters_load_and_unload_under_load_without_a_restart(runs, guarded):
    url, _, key = guarded
    want_a, want_b = expected(runs, "a", TEXTS[:1])[0], expected(runs, "b", TEXTS[:2])

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=120, headers=key) as c:
            async def load():
                while True:
                    r = await c.post("/predict", json={"inputs": [TEXTS[0]], "adapter": "a"})
                    assert r.status_code == 200 and {p["label"]: p["score"] for p in r.json()[0]} == pytest.approx(
                        want_a, abs=1e-5)
                    await asyncio.sleep(0)

            background = [asyncio.ensure_future(load()) for _ in range(4)]
            await asyncio.sleep(0.3)
            added = await c.post("/adapters", json={"name": "b2", "path": runs["b"].name})
            got = await c.post("/predict", json={"inputs": TEXTS[:2], "adapter": "b2"})
            removed = await c.delete("/adapters/b2")
            gone = await c.post("/predict", json={"inputs": "hi", "adapter": "b2"})
            await asyncio.sleep(0.3)
            for t in background:
                assert not t.done(), t.exception()  # every background request was answered, and right
                t.cancel()
            return added, got, removed, gone

    added, got, removed, gone = asyncio.run(main())
    assert added.status_code == 201 and added.json()["kind"] == "adapter", added.text
    for scores, want in zip(got.json(), want_b):
        assert {p["label"]: p["score"] for p in scores} == pytest.approx(want, abs=1e-5)
    assert removed.status_code == 200 and gone.status_code == 404


def test_adapter_folders_outside_the_root_or_pickled_are_refused(runs, guarded, tmp_path):
    url, _, key = guarded
    pickled = runs["a"].parent / "pickled"
    pickled.mkdir(exist_ok=True)
    (pickled / "adapter_model.bin").write_bytes(b"not loaded")
    for body, status, message in [
        ({"name": "x", "path": "../../etc"}, 403, "outside the adapter root"),
        ({"name": "x", "path": "pickled"}, 422, "holds pickle files (adapter_model.bin)"),
        ({"name": "a", "path": runs["b"].name}, 409, "is served already"),
        ({"name": "x"}, 422, 'send {"name"'),
        ({"name": "x", "path": "nowhere"}, 404, "not a folder under the adapter root"),
    ]:
        r = httpx.post(url + "/adapters", json=body, headers=key)
        assert r.status_code == status and message in r.json()["error"], (body, r.text)
    assert httpx.delete(url + "/adapters/nope", headers=key).status_code == 404
    assert httpx.post(url + "/predict", json={"inputs": "hi", "adapter": "a"}, headers=key).status_code == 200


def test_metrics_count_requests_per_adapter_in_prometheus_text(server):
    url, _ = server
    for _ in range(3):
        assert httpx.post(url + "/predict", json={"inputs": "hi", "adapter": "b"}).status_code == 200
    assert httpx.post(url + "/predict", json={"inputs": "hi", "adapter": "nope"}).status_code == 404
    text = httpx.get(url + "/metrics").text
    import re

    count = float(re.search(r'^lorafit_requests_total\{adapter="b",status="200"\} (\S+)$', text, re.M).group(1))
    assert count >= 3
    assert re.search(r'^lorafit_request_errors_total\{adapter="-"\} [1-9]', text, re.M)
    assert "lorafit_batch_size_bucket" in text and re.search(r"^lorafit_queue_depth \S+$", text, re.M)
    assert 'lorafit_request_seconds_bucket{adapter="b"' in text


def test_a_full_queue_answers_503_with_retry_after_and_a_huge_body_413(runs):
    url, proc = start(["--adapter", f"a={runs['a']}", "--max-queue", "2", "--max-wait-ms", "300"])
    try:
        async def main():
            async with httpx.AsyncClient(base_url=url, timeout=60) as c:
                return await asyncio.gather(*(c.post("/predict", json={"inputs": [TEXTS[k % 6]], "adapter": "a"})
                                              for k in range(20)))

        results = asyncio.run(main())
        busy = [r for r in results if r.status_code == 503]
        assert busy and all(r.headers["retry-after"] == "1" and "retry shortly" in r.json()["error"] for r in busy)
        assert all(r.status_code in (200, 503) for r in results) and any(r.status_code == 200 for r in results)
        r = httpx.post(url + "/predict", content=b'{"inputs": "' + b"x" * 2_100_000 + b'"}', timeout=60)
        assert r.status_code == 413 and "more than the 2,000,000 this server takes" in r.json()["error"]
        assert httpx.post(url + "/predict", json={"inputs": "fine", "adapter": "a"}).status_code == 200
    finally:
        proc.kill()


def test_a_failing_forward_answers_its_own_requests_with_500_and_serving_goes_on(runs):
    """The app in this process (lorafit.serve.create_app), its engine's forward made to fail on
    one batch: that batch's requests get a 500 that names the failure, the next batch is served."""
    from starlette.testclient import TestClient

    from lorafit.serve import ServeSettings, create_app
    from lorafit.serve_models import Registry

    registry = Registry()
    registry.add("a", runs["a"])
    engine = registry.served["a"].engine
    real, calls = engine.forward, []

    def flaky(names, rows):
        calls.append(len(rows))
        if len(calls) == 1:
            raise RuntimeError("simulated out-of-memory in the forward")
        return real(names, rows)

    engine.forward = flaky
    with TestClient(create_app(registry, ServeSettings(max_wait_ms=1))) as client:
        failed = client.post("/predict", json={"inputs": TEXTS[:2], "adapter": "a"})
        assert failed.status_code == 500
        assert failed.json() == {"error": "the model failed on this batch: RuntimeError: simulated out-of-memory "
                                          "in the forward", "error_type": "backend"}
        ok = client.post("/predict", json={"inputs": TEXTS, "adapter": "a"})
        assert ok.status_code == 200 and len(calls) == 2
        got = [{p["label"]: p["score"] for p in row} for row in ok.json()]
        for row, want in zip(got, expected(runs, "a", TEXTS)):
            assert sorted(row) == sorted(want) and all(abs(row[k] - want[k]) < 1e-5 for k in want)
        assert 'lorafit_requests_total{adapter="a",status="500"} 1.0' in client.get("/metrics").text


def test_sigterm_answers_what_it_accepted_and_exits_0(server):
    """Last in this file: it stops the module's server."""
    url, proc = server

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            tasks = [asyncio.ensure_future(c.post("/predict", json={"inputs": TEXTS, "adapter": "c"}))
                     for _ in range(20)]
            await asyncio.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(main())
    answered = [r for r in results if not isinstance(r, Exception)]
    assert answered and all(r.status_code == 200 for r in answered)
    refused = [r for r in results if isinstance(r, Exception)]
    assert all(isinstance(r, httpx.ConnectError) for r in refused), refused[:3]  # never accepted, never dropped
    assert proc.wait(timeout=60) == 0
