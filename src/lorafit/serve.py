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
    GET  /health

Every text of a request is queued (lorafit.serve_batcher); a batch holds texts of one
engine, so rows of different adapters of one base share a forward.
"""

from __future__ import annotations

import contextlib
import json
import signal
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


def create_app(registry: Registry, settings: ServeSettings | None = None):
    """The ASGI app serving `registry` (a Starlette application)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from lorafit import __version__

    settings = settings or ServeSettings()

    def forward(items: list[Item]) -> list[torch.Tensor]:
        engine = registry.served[items[0].payload[0]].engine
        return engine.forward([it.payload[0] for it in items], [it.payload[1] for it in items])

    batcher = Batcher(forward, max_batch_tokens=settings.max_batch_tokens, max_wait_ms=settings.max_wait_ms,
                      max_queue=settings.max_queue)

    def error(message: str, status: int, **headers) -> JSONResponse:
        return JSONResponse({"error": message, "error_type": "validation" if status < 500 else "backend"},
                            status_code=status, headers=headers)

    async def predict(request: Request) -> Response:
        try:
            texts, name, raw, batch = parse_predict(await request.body(), registry, settings)
        except BadRequest as exc:
            return error(str(exc), exc.status)
        served = registry.served[name]
        rows, truncated = registry.tokenize(name, texts)
        engine_key = id(served.engine)
        items = [Item(engine=engine_key, tokens=len(r), payload=(name, r)) for r in rows]
        try:
            logits = await batcher.submit(items)
        except QueueFull as exc:
            return error(f"the server is busy ({exc}); retry shortly", 503, **{"Retry-After": "1"})
        except Exception as exc:  # noqa: BLE001 - a failed forward answers its own requests; serving goes on
            return error(f"the model failed on this batch: {type(exc).__name__}: {exc}", 500)
        out = []
        for row in logits:
            scores = row if raw else torch.softmax(row, dim=-1)
            pairs = sorted(zip(served.label_names, scores.tolist()), key=lambda p: -p[1])
            out.append([{"label": label, "score": score} for label, score in pairs])
        headers = {"x-lorafit-truncated": ",".join(str(i) for i, t in enumerate(truncated) if t)}
        return JSONResponse(out if batch else out[0], headers=headers)

    async def info(_request: Request) -> Response:
        return JSONResponse({
            "lorafit_version": __version__,
            "served": {s.name: {"kind": s.kind, "labels": s.label_names, "max_length": s.max_length,
                                "path": str(s.path)} for s in registry.served.values()},
            "max_batch_tokens": settings.max_batch_tokens, "max_inputs": settings.max_inputs})

    async def health(_request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        batcher.start()
        try:
            yield
        finally:
            await batcher.stop()  # what is queued is answered first

    app = Starlette(routes=[Route("/predict", predict, methods=["POST"]), Route("/info", info),
                            Route("/health", health)], lifespan=lifespan)
    app.state.registry, app.state.batcher = registry, batcher
    return app


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
        import starlette  # noqa: F401
        import uvicorn
    except ImportError:
        raise LorafitError("lorafit serve needs the serve extra: pip install 'lorafit[serve]' (starlette, uvicorn)"
                           ) from None
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
