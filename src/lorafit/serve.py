"""`lorafit serve`: trained runs and exports behind one HTTP server, on Starlette and uvicorn.

Why Starlette and uvicorn: the smallest well-kept ASGI pair (FastAPI is Starlette plus
request models this server does not need: it validates its few fields itself, to word
each 4xx as an instruction), and uvicorn is the ASGI server both recommend; it stops on
SIGTERM by refusing new connections and finishing the requests in flight.

Routes (text-embeddings-inference's /predict shapes, plus an `adapter` field):

    POST /predict  {"inputs": "text" | ["text", ...] | [["text"], ...], "adapter": NAME, "raw_scores": false}
                   -> [{"label", "score"}, ...] per text, every label, highest score first
                      (a list of those for a list of inputs); header x-lorafit-truncated:
                      the indices of texts cut to the run's max_length
    GET  /info     models, adapters, labels, max_length, lorafit version
    GET  /health   (never needs the API key)
    GET  /metrics  Prometheus text: requests and errors per adapter, latency, batch sizes, queue depth
    POST /adapters {"name", "path"}: load a run folder under --adapter-root; DELETE /adapters/{name}

Every text of a request is queued (lorafit.serve_batcher); a batch holds texts of one
engine, so rows of different adapters of one base share a forward.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import signal
import time
from dataclasses import dataclass

import torch

from lorafit.errors import LorafitError
from lorafit.serve_batcher import Batcher, Item, QueueFull
from lorafit.serve_models import Registry


@dataclass
class ServeSettings:
    """What `lorafit serve` takes besides the models."""

    max_batch_tokens: int = 16384
    """A batch closes when its texts, padded to the longest, would pass this many tokens."""
    max_wait_ms: float = 5.0
    """... or when its oldest text has waited this long."""
    max_queue: int = 1024
    """Texts waiting at most; beyond, requests get 503 with Retry-After."""
    max_inputs: int = 64
    """Texts per request at most."""
    max_body_bytes: int = 2_000_000
    """Request body size at most."""
    api_key: str | None = None
    """Every route but /health needs `Authorization: Bearer <api_key>`; None: no key."""
    adapter_root: str | None = None
    """POST /adapters loads folders under it only; None: no loading at run time."""


class BadRequest(LorafitError):
    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


def parse_predict(body: bytes, registry: Registry, settings: ServeSettings) -> tuple[list[str], str, bool, bool]:
    """(texts, served name, raw_scores, batch) of a /predict body, or BadRequest saying what to change."""
    if len(body) > settings.max_body_bytes:
        raise BadRequest(f"the request body has {len(body):,} bytes, more than the {settings.max_body_bytes:,} this "
                         "server takes; send fewer or shorter texts per request", 413)
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the body is not valid JSON ({exc}); send {{\"inputs\": \"a text\"}}", 400) from None
    if not isinstance(data, dict) or "inputs" not in data:
        raise BadRequest('the body needs an "inputs" field: a text, or a list of texts')
    inputs, batch = data["inputs"], isinstance(data["inputs"], list)
    texts = inputs if batch else [inputs]
    texts = [t[0] if isinstance(t, list) and len(t) == 1 else t for t in texts]  # TEI's [["text"], ...]
    if not texts:
        raise BadRequest('"inputs" is an empty list; send at least one text')
    if len(texts) > settings.max_inputs:
        raise BadRequest(f'"inputs" holds {len(texts)} texts, more than the {settings.max_inputs} per request this '
                         "server takes; split the request", 413)
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()), None)
    if bad is not None:
        raise BadRequest(f'input {bad} is {"empty" if isinstance(texts[bad], str) else type(texts[bad]).__name__}; '
                         "every input must be a non-empty text (text pairs are not supported)")
    name = data.get("adapter")
    if name is None:
        if len(registry.served) != 1:
            raise BadRequest(f'this server holds {len(registry.served)} models and adapters; name one in "adapter" '
                             f"({', '.join(sorted(registry.served))})")
        name = next(iter(registry.served))
    if name not in registry.served:
        raise BadRequest(f"no adapter or model named {name!r}; this server holds: {', '.join(sorted(registry.served))}",
                         404)
    return texts, name, bool(data.get("raw_scores", False)), batch


class _Server:
    """The app's state and its route handlers."""

    def __init__(self, registry: Registry, settings: ServeSettings) -> None:
        from lorafit.serve_metrics import Metrics

        self.registry, self.settings = registry, settings
        self.batcher = Batcher(self._forward, max_batch_tokens=settings.max_batch_tokens,
                               max_wait_ms=settings.max_wait_ms, max_queue=settings.max_queue)
        self.metrics = Metrics(lambda: len(self.batcher.pending))
        self.batcher.on_batch = self.metrics.batch_size.observe

    def _forward(self, items: list[Item]) -> list[torch.Tensor]:
        engine = self.registry.served[items[0].payload[0]].engine
        return engine.forward([it.payload[0] for it in items], [it.payload[1] for it in items])

    @staticmethod
    def error(message: str, status: int, **headers):
        from starlette.responses import JSONResponse

        return JSONResponse({"error": message, "error_type": "validation" if status < 500 else "backend"},
                            status_code=status, headers=headers)

    async def predict(self, request):
        from starlette.responses import JSONResponse

        start = time.perf_counter()
        try:
            texts, name, raw, batch = parse_predict(await request.body(), self.registry, self.settings)
        except BadRequest as exc:
            self.metrics.request("-", exc.status, time.perf_counter() - start)
            return self.error(str(exc), exc.status)
        served = self.registry.served[name]
        rows, truncated = self.registry.tokenize(name, texts)
        items = [Item(engine=id(served.engine), tokens=len(r), payload=(name, r)) for r in rows]
        try:
            logits = await self.batcher.submit(items)
        except QueueFull as exc:
            self.metrics.request(name, 503, time.perf_counter() - start)
            return self.error(f"the server is busy ({exc}); retry shortly", 503, **{"Retry-After": "1"})
        except Exception as exc:  # noqa: BLE001 - a failed forward answers its own requests; serving goes on
            self.metrics.request(name, 500, time.perf_counter() - start)
            return self.error(f"the model failed on this batch: {type(exc).__name__}: {exc}", 500)
        out = []
        for row in logits:
            scores = row if raw else torch.softmax(row, dim=-1)
            pairs = sorted(zip(served.label_names, scores.tolist()), key=lambda p: -p[1])
            out.append([{"label": label, "score": score} for label, score in pairs])
        self.metrics.request(name, 200, time.perf_counter() - start)
        headers = {"x-lorafit-truncated": ",".join(str(i) for i, t in enumerate(truncated) if t)}
        return JSONResponse(out if batch else out[0], headers=headers)

    async def info(self, _request):
        from starlette.responses import JSONResponse

        from lorafit import __version__

        return JSONResponse({
            "lorafit_version": __version__,
            "served": {s.name: {"kind": s.kind, "labels": s.label_names, "max_length": s.max_length,
                                "path": str(s.path)} for s in self.registry.served.values()},
            "max_batch_tokens": self.settings.max_batch_tokens, "max_inputs": self.settings.max_inputs})

    async def health(self, _request):
        from starlette.responses import JSONResponse

        return JSONResponse({"status": "ok"})

    async def metrics_text(self, _request):
        from starlette.responses import Response

        body, content_type = self.metrics.render()
        return Response(body, media_type=content_type)

    async def add_adapter(self, request):
        """POST /adapters {"name", "path"}: a folder under --adapter-root, loaded without a restart."""
        from starlette.responses import JSONResponse

        try:
            name, folder = parse_adapter_request(await request.body(), self.settings.adapter_root, self.registry)
        except BadRequest as exc:
            return self.error(str(exc), exc.status)
        loop = asyncio.get_running_loop()
        try:  # in the forward's thread: a batch never runs while the model changes
            served = await loop.run_in_executor(self.batcher.pool, self.registry.add, name, folder)
        except LorafitError as exc:
            return self.error(f"cannot load {folder}: {exc}", 422)
        return JSONResponse({"name": name, "kind": served.kind, "labels": served.label_names}, status_code=201)

    async def remove_adapter(self, request):
        from starlette.responses import JSONResponse

        name = request.path_params["name"]
        if name not in self.registry.served:
            return self.error(f"no adapter or model named {name!r}; this server holds: "
                              f"{', '.join(sorted(self.registry.served))}", 404)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.batcher.pool, self.registry.remove, name)
        return JSONResponse({"removed": name})


def parse_adapter_request(body: bytes, root, registry: Registry):
    """(name, folder) of a POST /adapters body, the folder inside `root`, or BadRequest."""
    from pathlib import Path

    if root is None:
        raise BadRequest("this server loads no adapters at run time; start it with --adapter-root DIR", 403)
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the body is not valid JSON ({exc}); send {{\"name\": ..., \"path\": ...}}", 400) from None
    name, path = (data.get("name"), data.get("path")) if isinstance(data, dict) else (None, None)
    if not isinstance(name, str) or not name.strip() or not isinstance(path, str) or not path:
        raise BadRequest('send {"name": "a new name", "path": "a folder under the adapter root"}')
    if name in registry.served:
        raise BadRequest(f"the name {name!r} is served already; pick another, or DELETE /adapters/{name} first", 409)
    root = Path(root).resolve()
    folder = (root / path).resolve()
    if not folder.is_relative_to(root):
        raise BadRequest(f"{path} is outside the adapter root; pass a folder under it", 403)
    if not folder.is_dir():
        raise BadRequest(f"{path} is not a folder under the adapter root", 404)
    pickles = sorted(p.name for p in folder.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt"))
    if pickles:
        raise BadRequest(f"{path} holds pickle files ({', '.join(pickles[:3])}); lorafit loads safetensors only, "
                         "since unpickling can run code", 422)
    return name, folder


def create_app(registry: Registry, settings: ServeSettings | None = None):
    """The ASGI app serving `registry` (a Starlette application)."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.routing import Route

    server = _Server(registry, settings or ServeSettings())

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        server.batcher.start()
        try:
            yield
        finally:
            await server.batcher.stop()  # what is queued is answered first

    routes = [Route("/predict", server.predict, methods=["POST"]), Route("/info", server.info),
              Route("/health", server.health), Route("/metrics", server.metrics_text),
              Route("/adapters", server.add_adapter, methods=["POST"]),
              Route("/adapters/{name}", server.remove_adapter, methods=["DELETE"])]
    middleware = [Middleware(BearerAuth, key=server.settings.api_key)] if server.settings.api_key else []
    app = Starlette(routes=routes, lifespan=lifespan, middleware=middleware)
    app.state.server = server
    return app


class BearerAuth:
    """Every route but /health needs `Authorization: Bearer <key>` (a pure ASGI middleware)."""

    def __init__(self, app, key: str) -> None:
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] == "/health":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if not hmac.compare_digest(given, b"Bearer " + self.key):
            response = _Server.error("this server needs an API key: send the header Authorization: Bearer <key>", 401)
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def _named(paths: list[str], adapters: list[str]) -> list[tuple[str, str]]:
    """(name, path) of each positional folder (named by its folder name) and NAME=PATH flag."""
    from pathlib import Path

    out: list[tuple[str, str]] = []
    for p in paths:
        out.append((Path(p).resolve().name, p))
    for spec in adapters:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise LorafitError(f"--adapter takes NAME=PATH, got {spec!r}")
        out.append((name, path))
    names = [n for n, _ in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise LorafitError(f"two folders would be served as {dup!r}; name them with --adapter NAME=PATH")
    if not out:
        raise LorafitError("nothing to serve: pass run or export folders, or --adapter NAME=PATH")
    return out


def serve(paths: list[str], adapters: list[str] | None = None, host: str = "127.0.0.1", port: int = 8080,
          settings: ServeSettings | None = None) -> None:
    """Load every folder, then serve until SIGTERM or Ctrl-C (see the module)."""
    try:
        import prometheus_client  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn
    except ImportError:
        raise LorafitError("lorafit serve needs the serve extra: pip install 'lorafit[serve]' (starlette, uvicorn, "
                           "prometheus-client)") from None
    registry = Registry()
    for name, path in _named(paths, adapters or []):
        registry.add(name, path)
        print(f"serving {path} as {name!r} ({registry.served[name].kind})", flush=True)
    server = uvicorn.Server(uvicorn.Config(create_app(registry, settings), host=host, port=port, log_level="warning"))

    @contextlib.contextmanager
    def stop_on_signals():
        """SIGTERM or Ctrl-C: stop accepting, answer what was accepted, exit 0 (uvicorn's own
        handler re-raises the signal after its graceful stop, which ends the process with it)."""
        def stop(_signum, _frame):
            server.should_exit = True

        previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    server.capture_signals = stop_on_signals
    server.run()
