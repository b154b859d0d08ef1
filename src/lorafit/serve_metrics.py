"""`GET /metrics` of `lorafit serve`, in Prometheus' text format (prometheus_client)."""

from __future__ import annotations

from collections.abc import Callable


class Metrics:
    """Requests and errors per adapter, latency, batch sizes and queue depth, in a registry of
    this server's own (two servers in one process do not mix their counts)."""

    def __init__(self, queue_depth: Callable[[], int]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("lorafit_requests", "Requests answered, by adapter and status", ["adapter", "status"],
                                registry=self.registry)
        self.errors = Counter("lorafit_request_errors", "Requests answered with a 4xx or 5xx, by adapter",
                              ["adapter"], registry=self.registry)
        self.latency = Histogram("lorafit_request_seconds", "Time from a request's arrival to its answer",
                                 ["adapter"], registry=self.registry,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.batch_size = Histogram("lorafit_batch_size", "Texts per forward", registry=self.registry,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        depth = Gauge("lorafit_queue_depth", "Texts waiting for a forward", registry=self.registry)
        depth.set_function(queue_depth)

    def request(self, adapter: str, status: int, seconds: float) -> None:
        self.requests.labels(adapter, str(status)).inc()
        if status >= 400:
            self.errors.labels(adapter).inc()
        self.latency.labels(adapter).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
