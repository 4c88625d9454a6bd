"""Prometheus metrics of the endpoint and a pure-ASGI middleware that records them.

Each app owns a :class:`CollectorRegistry`, so tests can build several apps in one
process. With several uvicorn workers each worker exposes its own counters (scrape them
per process, or set ``PROMETHEUS_MULTIPROC_DIR`` as prometheus-client documents).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]
ROUTES = ("/v1/artwork", "/v1/reward", "/healthz", "/readyz", "/metrics", "/openapi.json", "/docs")
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    """Every metric the endpoint exports."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("keyart_requests_total", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.latency = Histogram("keyart_request_seconds", "HTTP request latency", ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.decisions = Counter("keyart_decisions_total", "Artwork decisions (one per title)", ["policy", "fallback"], registry=r)
        self.pages = Counter("keyart_pages_total", "Pages decided", ["fallback"], registry=r)
        self.fallbacks = Counter("keyart_fallback_pages_total", "Pages served with default artwork (no model)", registry=r)
        self.fallback_mode = Gauge("keyart_fallback_mode", "1 while no model is loaded", registry=r)
        self.rejections = Counter("keyart_rejections_total", "Refused requests by route and reason", ["route", "reason"], registry=r)
        self.rewards = Counter("keyart_rewards_total", "Rewards by outcome", ["outcome"], registry=r)
        self.model = Gauge("keyart_model_info", "The serving bundle (value 1)", ["version", "source"], registry=r)
        self.bundle_loads = Counter("keyart_bundle_loads_total", "Bundle load attempts", ["outcome"], registry=r)
        self.log_seconds = Histogram("keyart_impression_log_seconds", "Wait for the durable impression log write",
                                     buckets=LATENCY_BUCKETS, registry=r)

    def set_model(self, version: str | None, source: str | None) -> None:
        self.model.clear()
        if version is None:
            self.fallback_mode.set(1)
        else:
            self.fallback_mode.set(0)
            self.model.labels(version=version, source=source or "").set(1)

    def reject(self, route: str, reason: str) -> None:
        self.rejections.labels(route=route, reason=reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts and times every HTTP request; refuses bodies over ``max_body_bytes`` (413)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, max_body_bytes: int):
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        route = path if path in ROUTES else "other"
        start = time.perf_counter()
        status = 500

        async def send_status(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            length = next((v for k, v in scope.get("headers", ()) if k == b"content-length"), None)
            if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
                await _too_large(send_status, self.max_body_bytes)
            else:
                await self.app(scope, receive, send_status)
        finally:
            m = self.metrics
            m.requests.labels(route=route, status=str(status)).inc()
            m.latency.labels(route=route).observe(time.perf_counter() - start)
            if 400 <= status < 500:
                m.reject(route, str(status))


async def _too_large(send: Callable[[Any], Awaitable[None]], limit: int) -> None:
    body = b'{"detail":"request body larger than %d bytes"}' % limit
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
