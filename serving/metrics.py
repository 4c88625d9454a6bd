"""Prometheus metrics of the endpoint, and the pure-ASGI edge every request passes first.

:class:`MetricsMiddleware` counts and times every request (whatever answers it);
:class:`GuardMiddleware`, inside it, checks the API key of ``/v1/*`` requests and reads
the body under its size limit before the app sees a byte of it.

Each app owns a :class:`CollectorRegistry`, so tests can build several apps in one
process. With several uvicorn workers each worker exposes its own counters (scrape them
per process, or set ``PROMETHEUS_MULTIPROC_DIR`` as prometheus-client documents).
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson
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
        self.replays = Counter("keyart_idempotent_replays_total",
                               "/v1/artwork retries answered from the idempotency cache", registry=r)

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
    """Counts and times every HTTP request; 4xx answers also count as rejections."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

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
            await self.app(scope, receive, send_status)
        finally:
            m = self.metrics
            m.requests.labels(route=route, status=str(status)).inc()
            m.latency.labels(route=route).observe(time.perf_counter() - start)
            if 400 <= status < 500:
                m.reject(route, str(status))


class Guard:
    """What :class:`GuardMiddleware` enforces; filled in when the app starts (settings are
    read in the lifespan). ``api_keys`` empty = no authentication."""

    def __init__(self, max_body_bytes: int, api_keys: list[bytes] | None = None):
        self.max_body_bytes = max_body_bytes
        self.api_keys = list(api_keys or [])

    def client(self, headers: list[tuple[bytes, bytes]]) -> int | None:
        """Index of the API key the request presents (``Authorization: Bearer <key>`` or
        ``X-API-Key: <key>``), None if it presents none that is valid. Every configured key
        is compared in constant time, whichever matches."""
        given = None
        for name, value in headers:
            if name == b"x-api-key":
                given = value.strip()
            elif name == b"authorization" and value[:7].lower() == b"bearer ":
                given = value[7:].strip()
            if given:
                break
        if not given:
            return None
        found = None
        for i, key in enumerate(self.api_keys):
            if hmac.compare_digest(key, given) and found is None:
                found = i
        return found


PROTECTED_PREFIX = "/v1/"
CLIENT_KEY = "keyart.client"  # scope key: index of the caller's API key


class GuardMiddleware:
    """API keys for ``/v1/*`` (401 before the body is read) and the body limit: a
    Content-Length over ``max_body_bytes`` is refused before reading; a chunked body is read
    only until it passes the limit. Both get 413 and the connection is closed (the rest of
    the body is never read). The app then receives the body it was sent, in one message."""

    def __init__(self, app: ASGIApp, guard: Guard):
        self.app = app
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        g = self.guard
        headers = scope.get("headers", [])
        if g.api_keys and scope.get("path", "").startswith(PROTECTED_PREFIX):
            client = g.client(headers)
            if client is None:
                await send_problem(send, 401, "missing or invalid API key: send 'Authorization: Bearer <key>' "
                                   "or 'X-API-Key: <key>'", close=True,
                                   extra=[(b"www-authenticate", b'Bearer realm="keyart"')])
                return
            scope[CLIENT_KEY] = client
        limit = g.max_body_bytes
        length = next((v for k, v in headers if k == b"content-length"), None)
        if length is not None and length.strip().isdigit() and int(length) > limit:
            await send_problem(send, 413, f"request body larger than {limit} bytes", close=True)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            body += message.get("body", b"")
            if len(body) > limit:
                await send_problem(send, 413, f"request body larger than {limit} bytes", close=True)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def send_problem(send: Callable[[Any], Awaitable[None]], status: int, detail: str, close: bool = False,
                       extra: list[tuple[bytes, bytes]] | None = None) -> None:
    """A JSON ``{"detail": ...}`` answer sent straight from the ASGI layer."""
    body = orjson.dumps({"detail": detail})
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra or [])})
    await send({"type": "http.response.body", "body": body})
