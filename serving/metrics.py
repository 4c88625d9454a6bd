"""Prometheus metrics of the endpoint, and the pure-ASGI edge every request passes first.

:class:`MetricsMiddleware` counts and times every request (whatever answers it);
:class:`GuardMiddleware`, inside it, checks the API key of ``/v1/*`` requests and reads
the body under its size limit before the app sees a byte of it, then hands a well-formed
``POST /v1/artwork`` to the app's fast path (``Guard.fast_routes``), which answers it
without FastAPI's routing and dependency solving; anything else goes to the app.

Each app owns a :class:`CollectorRegistry`, so tests can build several apps in one
process. With several uvicorn workers each worker exposes its own counters (scrape them
per process, or set ``PROMETHEUS_MULTIPROC_DIR`` as prometheus-client documents).

What an operator watches for policy collapse or a stale model is counted per page with
numpy (:class:`DecisionStats`: per-artwork decisions, the propensity histogram, the
online reward rate over the last hour) and rendered only when ``/metrics`` is scraped, so
a 40-title page costs a few vector operations, not 40 metric updates.
"""

from __future__ import annotations

import hmac
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping, Sequence
from typing import Any

import numpy as np
import orjson
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]
ROUTES = ("/v1/artwork", "/v1/reward", "/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/redoc")
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
INFERENCE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.015, 0.025, 0.05, 0.1)
PROPENSITY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 0.99, 1.0)
FOLD_PAGES = 64  # DecisionStats folds decided pages into its counters this many at a time (and on every read)
MAX_ARTWORK_SERIES = 2000  # beyond this, the least shown artworks are summed as artwork_id="_other"
REWARD_WINDOW_S = 3600
REWARD_SLOT_S = 60
STAGES = ("receive", "parse_validate", "prepare", "features", "inference", "policy", "render", "log_append",
          "online_state", "metrics", "response")
"""Where a decided page's time goes, in order (:class:`StageTimes`)."""
STAGE_SECONDS = "keyart_page_stage_seconds_total"
STAGE_PAGES = "keyart_page_stage_pages_total"


class StageTimes(Collector):
    """Server time of every decided page (``/v1/artwork`` answered 200) by stage, summed in
    plain floats and rendered at scrape time: ``keyart_page_stage_seconds_total{stage}`` and
    ``keyart_page_stage_pages_total`` (their ratio is the mean per page; ``keyart bench
    serving`` reads it). Stages: ``receive`` (the ASGI edge until the body is read),
    ``parse_validate`` (JSON and schema), ``prepare`` (the page against the catalog),
    ``features``, ``inference`` (the ONNX call), ``policy``, ``render`` (event ids, response
    body, log lines), ``log_append`` (until the lines are durable), ``online_state``,
    ``metrics`` and ``response`` (the answer until it is handed to the server)."""

    def __init__(self) -> None:
        self.sums = [0.0] * len(STAGES)
        self.pages = 0

    def add(self, seconds: Sequence[float]) -> None:
        """One page: ``seconds`` per stage, in :data:`STAGES` order."""
        sums = self.sums
        for i, v in enumerate(seconds):
            sums[i] += v
        self.pages += 1

    def collect(self) -> Iterator[Any]:
        fam = CounterMetricFamily(STAGE_SECONDS.removesuffix("_total"), "Server time of decided pages by stage",
                                  labels=["stage"])
        for name, v in zip(STAGES, list(self.sums), strict=True):
            fam.add_metric([name], v)
        yield fam
        yield CounterMetricFamily(STAGE_PAGES.removesuffix("_total"), "Decided pages the stage times cover",
                                  value=self.pages)


class DecisionStats(Collector):
    """Per-page counts an operator needs to spot policy collapse or a stale model, kept in
    numpy and rendered at scrape time.

    * ``keyart_artwork_decisions_total{artwork_id}``: decisions per shown artwork (at most
      ``MAX_ARTWORK_SERIES`` series, the most shown; the rest as ``_other``). One artwork
      taking every decision of its title is a collapsed policy.
    * ``keyart_decision_propensity``: histogram of the propensities served (a mass at 1.0
      with a model loaded = no exploration left).
    * ``keyart_online_reward_rate``: rewards of 1 received in the last hour / decisions made
      in the last hour (rewards arrive up to the attribution window later, so the rate of
      a young window reads low; compare it with itself over days).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._index: dict[str, int] = {}
        self._ids: list[str] = []
        self._counts = np.zeros(0, dtype=np.int64)
        self._table: object | None = None
        self._rows_to_slot = np.zeros(0, dtype=np.int64)
        self._bounds = np.asarray(PROPENSITY_BUCKETS, dtype=np.float64)
        self._buckets = np.zeros(len(PROPENSITY_BUCKETS) + 1, dtype=np.int64)  # last: +Inf overflow (never)
        self._p_sum = 0.0
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []  # pages not folded yet: (shown rows, propensities)
        n_slots = REWARD_WINDOW_S // REWARD_SLOT_S
        self._slot_minute = np.full(n_slots, -1, dtype=np.int64)
        self._slot_decisions = np.zeros(n_slots, dtype=np.int64)
        self._slot_rewards = np.zeros(n_slots, dtype=np.int64)

    def _slot(self, now: float) -> int:
        minute = int(now // REWARD_SLOT_S)
        i = minute % len(self._slot_minute)
        if self._slot_minute[i] != minute:
            self._slot_minute[i] = minute
            self._slot_decisions[i] = 0
            self._slot_rewards[i] = 0
        return i

    def _bind(self, table: object, artwork_ids: Sequence[str]) -> None:
        """Map the rows of a (new) artwork table onto counter slots, kept across bundle swaps
        (the pages of the old table are folded first: their rows are that table's)."""
        self._fold()
        slots = np.empty(len(artwork_ids), dtype=np.int64)
        for r, a in enumerate(artwork_ids):
            j = self._index.get(a)
            if j is None:
                j = self._index[a] = len(self._ids)
                self._ids.append(a)
            slots[r] = j
        if len(self._ids) > len(self._counts):
            self._counts = np.concatenate([self._counts, np.zeros(len(self._ids) - len(self._counts), np.int64)])
        self._rows_to_slot, self._table = slots, table

    def record_page(self, table: object, artwork_ids: Sequence[str], shown_rows: np.ndarray,
                    propensities: np.ndarray, now: float | None = None) -> None:
        """Count one decided page: ``shown_rows`` [T] rows of ``table`` (whose ids are
        ``artwork_ids``), ``propensities`` [T].

        The page is kept as it is and folded into the per-artwork counts and the propensity
        histogram with up to ``FOLD_PAGES - 1`` others in a few vector operations (and
        whenever they are read), so a page costs a list append, not a handful of numpy calls
        on 40 numbers; the decisions of the reward rate are counted at once."""
        p = np.asarray(propensities, dtype=np.float64)
        with self._lock:
            if table is not self._table:
                self._bind(table, artwork_ids)
            self._pending.append((shown_rows, p))
            if len(self._pending) >= FOLD_PAGES:
                self._fold()
            self._slot_decisions[self._slot(time.time() if now is None else now)] += len(p)

    def _fold(self) -> None:
        """Fold the pending pages into the counters (lock held): the same counts, and the
        propensity sum added page by page in the order the pages came, as when each page was
        counted on its own."""
        pending = self._pending
        if not pending:
            return
        self._pending = []
        rows = np.concatenate([r for r, _ in pending])
        p = np.concatenate([q for _, q in pending])
        np.add.at(self._counts, self._rows_to_slot[rows], 1)
        self._buckets += np.bincount(np.searchsorted(self._bounds, p, side="left"),
                                     minlength=len(self._buckets))[: len(self._buckets)]
        p_sum = self._p_sum
        for _, q in pending:
            p_sum += float(q.sum())
        self._p_sum = p_sum

    def record_reward(self, reward: int, now: float | None = None) -> None:
        if reward:
            with self._lock:
                self._slot_rewards[self._slot(time.time() if now is None else now)] += 1

    def reward_rate(self, now: float | None = None) -> float:
        """Rewards of 1 / decisions over the last hour (NaN without decisions)."""
        with self._lock:
            minute = int((time.time() if now is None else now) // REWARD_SLOT_S)
            live = self._slot_minute > minute - len(self._slot_minute)
            decisions = int(self._slot_decisions[live].sum())
            rewards = int(self._slot_rewards[live].sum())
        return rewards / decisions if decisions else float("nan")

    def artwork_counts(self) -> dict[str, int]:
        with self._lock:
            self._fold()
            return {a: int(c) for a, c in zip(self._ids, self._counts.tolist(), strict=True) if c}

    def collect(self) -> Iterator[Any]:
        counts = self.artwork_counts()
        fam = CounterMetricFamily("keyart_artwork_decisions", "Decisions per shown artwork", labels=["artwork_id"])
        ranked = sorted(counts.items(), key=lambda kv: -kv[1])
        for a, c in ranked[:MAX_ARTWORK_SERIES]:
            fam.add_metric([a], c)
        if len(ranked) > MAX_ARTWORK_SERIES:
            fam.add_metric(["_other"], sum(c for _, c in ranked[MAX_ARTWORK_SERIES:]))
        yield fam
        with self._lock:
            self._fold()
            cumulative = np.cumsum(self._buckets).tolist()
            p_sum = self._p_sum
        buckets = [(repr(b), c) for b, c in zip(PROPENSITY_BUCKETS, cumulative, strict=False)]
        buckets.append(("+Inf", cumulative[-1]))
        yield HistogramMetricFamily("keyart_decision_propensity", "Propensity of every decision served",
                                    buckets=buckets, sum_value=p_sum)
        rate = self.reward_rate()
        yield GaugeMetricFamily("keyart_online_reward_rate",
                                "Rewards of 1 received / decisions made, over the last hour (NaN without decisions)",
                                value=rate)


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
        self.model = Gauge("keyart_model_info", "The serving bundle (value 1): bundle version, where it came from, "
                           "its registry version and the key that signed it", ["version", "source", "registry_version",
                                                                                "signed_by"], registry=r)
        self.bundle_loads = Counter("keyart_bundle_loads_total", "Bundle load attempts", ["outcome"], registry=r)
        self.log_seconds = Histogram("keyart_impression_log_seconds", "Wait for the durable impression log write",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.replays = Counter("keyart_idempotent_replays_total",
                               "/v1/artwork retries answered from the idempotency cache", registry=r)
        self.bundle_refusals = Counter("keyart_bundle_refusals_total",
                                       "Bundles refused (and folder URIs without a readable bundle), by reason",
                                       ["reason"], registry=r)
        self.inference = Histogram("keyart_inference_seconds", "ONNX model call for one page (inference only)",
                                   buckets=INFERENCE_BUCKETS, registry=r)
        self.decide_seconds = Histogram("keyart_decide_seconds",
                                        "Deciding one page in process: validate against the catalog, features, "
                                        "inference, policy, render (not the log wait)",
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.stats = DecisionStats()
        r.register(self.stats)
        self.stages = StageTimes()
        r.register(self.stages)
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes, open fds, ...
        PlatformCollector(registry=r)  # python_info
        GCCollector(registry=r)  # python_gc_*
        # labelled children by label values, looked up once: ``.labels()`` costs a lock, a
        # dict look-up and argument checks per call, several times a page
        self._page_children: dict[tuple[str, bool], tuple[Any, Any, Any]] = {}
        self._request_children: dict[tuple[str, int], tuple[Any, Any]] = {}

    def count_page(self, policy: str, fallback: bool, decisions: int) -> None:
        """One decided page: ``keyart_pages_total{fallback}``, ``keyart_decisions_total{policy,
        fallback}`` by ``decisions`` and, without a model, ``keyart_fallback_pages_total``."""
        children = self._page_children.get((policy, fallback))
        if children is None:
            fb = "true" if fallback else "false"
            children = self._page_children[(policy, fallback)] = (
                self.pages.labels(fallback=fb), self.decisions.labels(policy=policy, fallback=fb),
                self.fallbacks if fallback else None)
        pages, decided, fallbacks = children
        pages.inc()
        decided.inc(decisions)
        if fallbacks is not None:
            fallbacks.inc()

    def count_request(self, route: str, status: int, seconds: float) -> None:
        """One HTTP request: ``keyart_requests_total{route,status}`` and
        ``keyart_request_seconds{route}``; a 4xx also counts as a rejection."""
        children = self._request_children.get((route, status))
        if children is None:
            children = self._request_children[(route, status)] = (
                self.requests.labels(route=route, status=str(status)), self.latency.labels(route=route))
        requests, latency = children
        requests.inc()
        latency.observe(seconds)
        if 400 <= status < 500:
            self.reject(route, str(status))

    def set_model(self, version: str | None, source: str | None, registry_version: str | None = None,
                  signed_by: str | None = None) -> None:
        self.model.clear()
        if version is None:
            self.fallback_mode.set(1)
        else:
            self.fallback_mode.set(0)
            self.model.labels(version=version, source=source or "", registry_version=registry_version or "",
                              signed_by=signed_by or "").set(1)

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
            end = time.perf_counter()
            m.count_request(route, status, end - start)
            timed = scope.get(STAGES_KEY)
            if timed is not None and status == 200:
                # [body read at, handler start, decision stages..., handler end]
                body_at, handler_at, *inner, handler_end = timed
                m.stages.add((body_at - start, handler_at - body_at, *inner, end - handler_end))


class Guard:
    """What :class:`GuardMiddleware` enforces; filled in when the app starts (settings are
    read in the lifespan). ``api_keys`` empty = no authentication."""

    def __init__(self, max_body_bytes: int, api_keys: list[bytes] | None = None):
        self.max_body_bytes = max_body_bytes
        self.api_keys = list(api_keys or [])
        # (method, path) -> async (scope, body, send) -> True if it answered; False hands the
        # request to the app as if the route were not there
        self.fast_routes: dict[tuple[str, str], Callable[[Scope, bytes, Callable[[Any], Awaitable[None]]],
                                                          Awaitable[bool]]] = {}

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
STAGES_KEY = "keyart.stages"  # scope key: the decision's stage timers (StageTimes)
STAGES_KEY_BODY = "keyart.body_at"  # scope key: when the body was read


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
        scope[STAGES_KEY_BODY] = time.perf_counter()
        fast = g.fast_routes.get((scope.get("method", ""), scope.get("path", "")))
        if fast is not None and await fast(scope, bytes(body), send):
            return
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
