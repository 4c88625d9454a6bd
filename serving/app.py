"""The FastAPI app: thin routes over :class:`Runtime` (service, rewards, logs, store, metrics).

``create_app()`` is the uvicorn factory (``keyart serve`` runs it). The lifespan checks
the settings (:func:`check_settings`: a real event secret, API keys), starts the log
writers, folds the kept days' impression and reward logs into the online priors, loads the
bundle (or the fallback catalog), starts the alias poller and the periodic fold of the
other workers' log lines (``serve_online_sync_seconds``); shutdown flushes and fsyncs the logs.

``/docs`` and ``/redoc`` load Swagger UI and ReDoc from the fastapi-offline wheel (no CDN),
and ``/openapi.json`` carries a request example built from the loaded catalog, so "Try it
out" sends a page this server can decide.

Every error is JSON ``{"detail": "..."}`` (invalid requests add ``errors``: loc, msg,
type per field) and never echoes the input, so it always encodes; bodies are parsed by
orjson, which refuses NaN, Infinity, numbers beyond a double and lone surrogates (422).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import datetime as dt
import gc
import hashlib
import json
import logging
import os
import re
import sys
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import orjson
from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.routing import APIRoute
from fastapi_offline import FastAPIOffline
from pydantic import ValidationError

from keyart import bundle as kbundle
from keyart import config
from keyart.contracts import ID_SCHEMA_PATTERN, MAX_CANDIDATES
from keyart.lake import Lake
from keyart.serving.bundle_store import BundleStore, LoadedBundle
from keyart.serving.event_log import JsonlLog
from keyart.serving.metrics import (
    CLIENT_KEY,
    STAGES_KEY,
    STAGES_KEY_BODY,
    Guard,
    GuardMiddleware,
    Metrics,
    MetricsMiddleware,
)
from keyart.serving.rewards import (
    EventSigner,
    LogTail,
    OnlinePriors,
    RewardBook,
    RewardRefused,
    online_state,
)
from keyart.serving.schemas import (
    ArtworkRequest,
    ArtworkResponse,
    Health,
    Problem,
    Readiness,
    RewardRequest,
    RewardResponse,
)
from keyart.serving.service import PageRefused, Service, client_clock_ms

log = logging.getLogger("keyart.serving")
MAX_BODY_BYTES = 1 << 20
MIN_SECRET_BYTES = 32
MIN_API_KEY_CHARS = 16
DEFAULT_EVENT_SECRET = config.Settings.model_fields["serve_event_secret"].default
MAX_ERRORS = 20
REPLAYED = (b"idempotent-replayed", b"true")
_ID_RE = re.compile(ID_SCHEMA_PATTERN.removeprefix("^").removesuffix("$"))
Answer = tuple[int, bytes, tuple[tuple[bytes, bytes], ...]]
"""An answer of ``POST /v1/artwork``: status, JSON body, extra headers."""


def log_event(event: str, fields: dict[str, Any]) -> None:
    """A structured (JSON) log line."""
    log.info(json.dumps({"event": event, **fields}, default=str))


class StartupRefused(RuntimeError):
    """The settings are not safe to serve with; the message says what to change."""


def check_settings(s: config.Settings) -> list[bytes]:
    """Refuse to serve with a guessable event secret (unless ``serve_dev_mode``) or with
    limits the data contracts cannot hold; return the API keys (empty = no authentication)."""
    secret = s.serve_event_secret
    why = ("is the built-in default" if secret == DEFAULT_EVENT_SECRET
           else f"is {len(secret.encode())} bytes" if len(secret.encode()) < MIN_SECRET_BYTES else None)
    if why is not None:
        if not s.serve_dev_mode:
            raise StartupRefused(
                f"serve_event_secret {why}: anyone who knows or guesses it can forge event ids and post "
                f"rewards. Set a random secret of at least {MIN_SECRET_BYTES} bytes, the same on every "
                "worker and replica, e.g. export KEYART_SERVE_EVENT_SECRET=$(python -c "
                "'import secrets; print(secrets.token_hex(32))') (or serve_event_secret in keyart.yaml). "
                "For local development or a demo only, KEYART_SERVE_DEV_MODE=true starts anyway.")
        log_event("insecure_event_secret", {"why": why, "serve_dev_mode": True})
    if s.serve_max_artworks > MAX_CANDIDATES:
        raise StartupRefused(f"serve_max_artworks is {s.serve_max_artworks}; the impressions contract allows at "
                             f"most {MAX_CANDIDATES} candidates (keyart.contracts.MAX_CANDIDATES)")
    return load_api_keys(s)


def load_api_keys(s: config.Settings) -> list[bytes]:
    """API keys from ``serve_api_keys`` (comma-separated) and ``serve_api_keys_file`` (one
    per line, ``#`` comments). A keys file that cannot be read or holds no key refuses start-up."""
    keys = [k.strip() for k in (s.serve_api_keys or "").split(",") if k.strip()]
    if s.serve_api_keys_file is not None:
        path = Path(s.serve_api_keys_file)
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise StartupRefused(f"serve_api_keys_file {path} cannot be read: {exc}") from None
        found = [x.strip() for x in lines if x.strip() and not x.strip().startswith("#")]
        if not found:
            raise StartupRefused(f"serve_api_keys_file {path} holds no key (one key per line)")
        keys += found
    for k in keys:
        if len(k) < MIN_API_KEY_CHARS or not all(0x21 <= ord(c) <= 0x7E for c in k):
            raise StartupRefused(f"API keys must be at least {MIN_API_KEY_CHARS} printable ASCII characters "
                                 "without spaces or commas (e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return [k.encode() for k in dict.fromkeys(keys)]


@dataclass
class Runtime:
    """Everything a request needs, built in the lifespan."""

    settings: config.Settings
    store: BundleStore
    service: Service
    rewards: RewardBook
    impressions: JsonlLog
    reward_log: JsonlLog
    metrics: Metrics
    replays: Idempotency = field(default_factory=lambda: Idempotency(0, 0))
    api_keys: list[bytes] = field(default_factory=list)


def settle_heap() -> None:
    """Collect once, then freeze what is alive (modules, the bundle, the tables).

    Frozen objects sit in the collector's permanent generation, so the full collections
    that request garbage triggers scan only young objects: without this a full collection
    walks ~10^5 long-lived objects and stalls every in-flight request for 30-60 ms. Runs at
    start-up and after every bundle swap (unfreezing first, so the old bundle is freed).
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


# --- idempotency -----------------------------------------------------------------------

class IdempotencyConflict(Exception):
    """The key was used for a different request."""


@dataclass
class _Pending:
    fingerprint: bytes
    future: asyncio.Future


class Idempotency:
    """Answers of ``/v1/artwork`` by (client, request_id) for ``ttl_s``; beyond ``max_bytes``
    the oldest are dropped first (entries are kept in answer order, which is also expiry
    order). A retry while the first request is still being decided waits for its answer.
    Only 200 answers are kept (a refused or failed page decided nothing, so its retry is
    decided afresh). Per process; the event loop is its lock."""

    def __init__(self, ttl_s: float, max_bytes: int):
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self.bytes = 0
        self._done: OrderedDict[tuple, tuple[bytes, bytes, float]] = OrderedDict()  # key -> (fp, body, expires)
        self._pending: dict[tuple, _Pending] = {}

    @property
    def enabled(self) -> bool:
        return self.ttl_s > 0 and self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._done)

    @staticmethod
    def _cost(key: tuple, body: bytes) -> int:
        return len(body) + len(str(key)) + 200

    def _drop(self, key: tuple) -> None:
        _, body, _ = self._done.pop(key)
        self.bytes -= self._cost(key, body)

    def find(self, key: tuple, fingerprint: bytes) -> bytes | asyncio.Future | None:
        """The stored body, a future of the answer in progress, or None (decide it)."""
        now = time.monotonic()
        while self._done:
            oldest = next(iter(self._done))
            if self._done[oldest][2] > now:
                break
            self._drop(oldest)
        hit = self._done.get(key)
        if hit is not None:
            if hit[0] != fingerprint:
                raise IdempotencyConflict
            return hit[1]
        pending = self._pending.get(key)
        if pending is not None:
            if pending.fingerprint != fingerprint:
                raise IdempotencyConflict
            return pending.future
        return None

    def start(self, key: tuple, fingerprint: bytes) -> None:
        self._pending[key] = _Pending(fingerprint, asyncio.get_running_loop().create_future())

    def finish(self, key: tuple, status: int, body: bytes) -> None:
        pending = self._pending.pop(key)
        if status == 200:
            if key in self._done:
                self._drop(key)
            self._done[key] = (pending.fingerprint, body, time.monotonic() + self.ttl_s)  # expiry from the answer
            self.bytes += self._cost(key, body)
            while self.bytes > self.max_bytes and self._done:
                self._drop(next(iter(self._done)))
        if not pending.future.done():
            pending.future.set_result((status, body))


def _fingerprint(page: ArtworkRequest) -> bytes:
    return hashlib.sha256(page.model_dump_json(exclude={"request_id"}).encode()).digest()


def build_runtime(settings: config.Settings, metrics: Metrics, model_uri: str | None = None,
                  rng: np.random.Generator | None = None) -> Runtime:
    """Check the settings, open the logs, fold the kept days' impression and reward logs into
    the online priors and load the bundle (no background threads yet besides the log
    writers). :class:`StartupRefused` if the settings are unsafe."""
    api_keys = check_settings(settings)
    signer = EventSigner(settings.serve_event_secret)
    lake = Lake(settings.lake)
    fsync = dict(fsync=settings.serve_log_fsync, fsync_interval_ms=settings.serve_log_fsync_interval_ms)
    impressions = JsonlLog(settings.impression_log_dir, "impressions", **fsync)
    reward_log = JsonlLog(lake.root / "raw" / "rewards", "rewards", **fsync)
    max_age_s = settings.attribution_window_hours * 3600 + 3600
    state = online_state(settings, settings.attribution_window_hours * 3600, max_age_s,
                         logs=[(LogTail(impressions.root, "impressions", own=impressions), "impressions"),
                               (LogTail(reward_log.root, "rewards", own=reward_log), "rewards")],
                         wall_clock=not settings.serve_client_clock)
    priors = OnlinePriors(state)

    def on_swap(b: LoadedBundle) -> None:
        b.prior_alpha, b.prior_beta, b.prior_n = priors.bind(b.artworks, b.priors_ds)
        metrics.set_model(b.version, b.source, b.registry_version, b.signed_by)

    def on_event(event: str, fields: dict[str, Any]) -> None:
        if event == "bundle_swapped":
            metrics.bundle_loads.labels(outcome="ok").inc()
            settle_heap()
        elif event == "bundle_refused":
            metrics.bundle_loads.labels(outcome="refused").inc()
            metrics.bundle_refusals.labels(reason=fields.get("reason", "invalid")).inc()
        elif event == "bundle_fetch_failed":
            metrics.bundle_loads.labels(outcome="retry").inc()
        elif event == "bundle_resolve_failed":
            metrics.bundle_loads.labels(outcome="resolve_failed").inc()
        log_event(event, fields)

    store = BundleStore(settings, model_uri, on_swap=on_swap, on_event=on_event)
    rewards = RewardBook(signer, priors, max_age_s=max_age_s)
    rt = Runtime(settings, store, Service(store, signer, settings, rng), rewards, impressions, reward_log, metrics,
                 Idempotency(settings.serve_idempotency_ttl_seconds, settings.serve_idempotency_max_bytes),
                 api_keys)
    t0 = time.perf_counter()
    priors.sync()  # a restart resumes the day's online priors from the logs
    folded = {"keys": len(state.keys()), "seconds": round(time.perf_counter() - t0, 3)}
    store.poll_once()
    if store.current is None:
        metrics.set_model(None, None)
    log_event("serving_ready", {"uri": store.uri, "version": store.current.version if store.current else None,
                                "fallback": store.current is None, "online_priors": folded,
                                "api_keys": len(api_keys), "bundle_keys": trusted_key_ids(settings)})
    return rt


def trusted_key_ids(s: config.Settings) -> list[str] | str:
    """The ids of the public keys bundle signatures are checked against (for the start-up
    log line), or why there are none."""
    path = kbundle.public_key_path(s)
    if not path.exists():
        return f"none: {path} does not exist" + (" (serve_dev_mode: bundles are not checked)" if s.serve_dev_mode else
                                                 " (every bundle will be refused)")
    try:
        return sorted(kbundle.load_public_keys(path))
    except kbundle.BundleError as exc:
        return f"none: {exc}"


async def sync_online_priors(rt: Runtime, every_s: float) -> None:
    """Fold in what the other workers logged every ``every_s`` seconds (until cancelled)."""
    while True:
        await asyncio.sleep(every_s)
        try:
            await asyncio.to_thread(rt.rewards.priors.sync)
        except Exception as exc:  # a log that cannot be read now is read next time
            log_event("online_priors_sync_failed", {"error": str(exc)})


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


def _detail(message: str) -> bytes:
    """The JSON body of an error: ``{"detail": message}``."""
    return orjson.dumps({"detail": message})


def _problem(status: int, detail: str) -> Response:
    return Response(_detail(detail), status_code=status, media_type="application/json")


def _safe(value: Any, limit: int = 300) -> str:
    """Text that always encodes: lone surrogates and other unencodable characters escaped."""
    text = value if isinstance(value, str) else str(value)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")[:limit]


def validation_problem(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """The 422 body for pydantic/FastAPI errors: each field's loc, msg and type, never its input."""
    out = []
    for e in errors[:MAX_ERRORS]:
        loc = [x if isinstance(x, int) else _safe(x, 80) for x in e.get("loc", ())]
        msg = _safe(e.get("msg", "invalid value"))
        kind = _safe(e.get("type", "value_error"), 80)
        if kind == "json_invalid":
            where = f" at character {loc[1]}" if len(loc) > 1 and isinstance(loc[1], int) else ""
            msg = f"body is not valid JSON{where}: {_safe((e.get('ctx') or {}).get('error', 'decode error'))}"
            loc = ["body"]
        out.append({"loc": loc, "msg": msg, "type": kind})
    more = f" (and {len(errors) - MAX_ERRORS} more)" if len(errors) > MAX_ERRORS else ""
    detail = "; ".join(m["msg"] if m["type"] == "json_invalid" else f"{'.'.join(map(str, m['loc']))}: {m['msg']}"
                       for m in out) + more
    return {"detail": detail or "invalid request", "errors": out}


class StrictJsonRequest(Request):
    """A request whose JSON body is parsed by orjson: no NaN/Infinity, no number beyond a
    double, valid UTF-8 without lone surrogates (its errors are json.JSONDecodeError, so
    FastAPI reports them as invalid JSON)."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = orjson.loads(await self.body())
        return self._json


class StrictJsonRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(StrictJsonRequest(request.scope, request.receive))

        return strict


AUTH = {401: {"model": Problem, "description": "API keys are configured and the request has no valid one"}}
ERRORS = {400: {"model": Problem, "description": "Body is not parseable"},
          **AUTH,
          413: {"model": Problem, "description": "Too many titles or artworks, or body too large"},
          422: {"model": Problem, "description": "Invalid request or JSON, unknown title or artwork ids, "
                                                 "Idempotency-Key reused for another request"},
          503: {"model": Problem, "description": "No catalog loaded, or the log is unavailable"}}
REWARD_ERRORS = {400: {"model": Problem, "description": "Body is not parseable"},
                 **AUTH,
                 403: {"model": Problem, "description": "Forged event id"},
                 409: {"model": Problem, "description": "Duplicate reward (already recorded)"},
                 410: {"model": Problem, "description": "Event older than the reward window"},
                 413: {"model": Problem, "description": "Body too large"},
                 422: {"model": Problem, "description": "Malformed request, JSON or event id"},
                 503: {"model": Problem, "description": "Reward log unavailable"}}


def with_edge(app: FastAPI, metrics: Metrics, guard: Guard) -> FastAPI:
    """Put keyart's ASGI edge in front of the app's whole middleware stack. Every HTTP request
    passes :class:`MetricsMiddleware` (counted and timed, whatever answers it), then
    :class:`GuardMiddleware` (API key, body read under its limit), then either the fast path
    of ``POST /v1/artwork`` (``guard.fast_routes``: a well-formed page is answered without
    Starlette's middleware stack, routing and dependency solving) or the app as built by
    Starlette (error handling, routing). ``app.state.guard`` is the :class:`Guard`."""
    build = app.build_middleware_stack

    def build_with_edge() -> Any:
        stack = build()
        edge = MetricsMiddleware(GuardMiddleware(stack, guard), metrics)

        async def route(scope: Any, receive: Any, send: Any) -> None:
            await (edge if scope["type"] == "http" else stack)(scope, receive, send)

        return route

    app.build_middleware_stack = build_with_edge  # type: ignore[method-assign]
    app.state.guard = guard
    return app


def create_app(settings: config.Settings | None = None, model_uri: str | None = None,
               rng: np.random.Generator | None = None, poll: bool = True) -> FastAPI:
    """The ASGI app. ``settings`` default to :func:`keyart.config.settings`."""
    metrics = Metrics()
    guard = Guard(MAX_BODY_BYTES)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        s = settings or config.settings()
        rt = build_runtime(s, metrics, model_uri, rng)
        guard.api_keys = rt.api_keys
        app.state.runtime = rt
        settle_heap()
        if poll:
            rt.store.start()
        syncing = (asyncio.create_task(sync_online_priors(rt, s.serve_online_sync_seconds))
                   if s.serve_online_sync_seconds > 0 else None)
        try:
            yield
        finally:
            if syncing is not None:
                syncing.cancel()
            rt.store.stop()
            rt.impressions.close()
            rt.reward_log.close()

    # /docs and /redoc with Swagger UI and ReDoc served from the fastapi-offline wheel (no CDN)
    app = with_edge(FastAPIOffline(title="keyart serving", version="1", lifespan=lifespan, static_url=DOCS_ASSETS,
                                   description="Personalized artwork selection with exploration, durable impression "
                                               "logging and online priors. See docs/serving.md."), metrics, guard)
    app.router.route_class = StrictJsonRoute

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        return _json(validation_problem(list(exc.errors())), 422)

    async def decide(rt: Runtime, page: ArtworkRequest, scope: dict[str, Any], handler_at: float) -> Answer:
        decide_start = time.perf_counter()
        try:
            decided = rt.service.decide(page)
        except PageRefused as exc:
            return exc.status, _detail(exc.message), ()
        body = decided.body
        start = time.perf_counter()
        try:
            await rt.impressions.append(decided.ds, decided.lines)
        except Exception as exc:  # not logged = not decided: never acknowledge it
            log_event("impression_log_failed", {"error": str(exc)})
            return 503, _detail("impression log unavailable; the decision was not made"), ()
        logged = time.perf_counter()
        rt.rewards.priors.record_impressions(decided.events)
        counted = time.perf_counter()
        m = rt.metrics
        m.log_seconds.observe(logged - start)
        m.decide_seconds.observe(start - decide_start)
        if decided.inference_s is not None:
            m.inference.observe(decided.inference_s)
        m.stats.record_page(decided.table, decided.table.artwork_ids, decided.shown_rows, decided.propensity)
        m.count_page(body["policy"], body["fallback"], len(body["decisions"]))
        end = time.perf_counter()
        scope[STAGES_KEY] = (scope.get(STAGES_KEY_BODY, handler_at), handler_at, *decided.stages, logged - start,
                             counted - logged, end - counted, end)
        return 200, orjson.dumps(body), ()

    async def answer_page(rt: Runtime, page: ArtworkRequest, idempotency_key: str | None, scope: dict[str, Any],
                          handler_at: float) -> Answer:
        """``POST /v1/artwork`` once the page is valid: (status, JSON body, extra headers).
        Both the route and the fast path (:func:`fast_artwork`) answer through it."""
        key = page.request_id
        if idempotency_key is not None:
            if key is not None and key != idempotency_key:
                return 422, _detail("request_id and the Idempotency-Key header differ; send one, or the same in both"), ()
            key = idempotency_key
        if key is None or not rt.replays.enabled:
            return await decide(rt, page, scope, handler_at)
        ck = (scope.get(CLIENT_KEY), key)
        fingerprint = _fingerprint(page)
        try:
            hit = rt.replays.find(ck, fingerprint)
        except IdempotencyConflict:
            return 422, _detail(f"request_id {key!r} was already used for a different request; use a new one"), ()
        if hit is not None:
            status, body = (200, hit) if isinstance(hit, bytes) else await asyncio.shield(hit)
            if status == 200:
                rt.metrics.replays.inc()
            return status, body, (REPLAYED,) if status == 200 else ()
        rt.replays.start(ck, fingerprint)
        status, body = 503, _detail("the first request with this request_id failed; retry")
        try:
            status, body, extra = await decide(rt, page, scope, handler_at)
            return status, body, extra
        finally:
            rt.replays.finish(ck, status, body)

    @app.post("/v1/artwork", response_model=ArtworkResponse, responses=ERRORS)
    async def choose_artwork(page: ArtworkRequest, request: Request,
                             idempotency_key: Annotated[str | None, Header(
                                 alias="Idempotency-Key", pattern=ID_SCHEMA_PATTERN,
                                 description="Same as the body's request_id.")] = None) -> Response:
        """Choose one artwork per title of the page; log every decision durably before answering.

        With ``request_id`` (or ``Idempotency-Key``) a retry of the same request within
        ``serve_idempotency_ttl_seconds`` gets the first answer again (same event ids) and
        logs nothing new."""
        handler_at = time.perf_counter()
        status, body, extra = await answer_page(request.app.state.runtime, page, idempotency_key, request.scope,
                                                handler_at)
        return Response(body, status_code=status, media_type="application/json",
                        headers={k.decode(): v.decode() for k, v in extra} or None)

    async def fast_artwork(scope: dict[str, Any], body: bytes, send: Callable[[Any], Coroutine[Any, Any, None]]) -> bool:
        """``POST /v1/artwork`` straight from the ASGI edge when the request is well formed:
        a JSON content type, a body orjson parses, a page the request model validates in one
        call, an ``Idempotency-Key`` (if any) of the id pattern. It answers exactly as the
        route does (:func:`answer_page`). Anything else returns False and the FastAPI route
        handles the request from the start, so every 4xx body stays the route's own."""
        rt: Runtime | None = getattr(app.state, "runtime", None)
        if rt is None:
            return False
        ctype = idem = None
        for k, v in scope["headers"]:
            if k == b"content-type":
                if ctype is not None:
                    return False
                ctype = v
            elif k == b"idempotency-key":
                if idem is not None:
                    return False
                idem = v
        if ctype is None or ctype.split(b";", 1)[0].strip().lower() != b"application/json":
            return False
        if idem is not None:
            try:
                idem_key = idem.decode("ascii")
            except UnicodeDecodeError:
                return False
            if not _ID_RE.fullmatch(idem_key):
                return False
        else:
            idem_key = None
        try:
            page = ArtworkRequest.model_validate(orjson.loads(body))
        except (orjson.JSONDecodeError, ValidationError):
            return False
        handler_at = time.perf_counter()
        status, out, extra = await answer_page(rt, page, idem_key, scope, handler_at)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-length", str(len(out)).encode()), (b"content-type", b"application/json"),
                                *extra]})
        await send({"type": "http.response.body", "body": out})
        return True

    guard.fast_routes[("POST", "/v1/artwork")] = fast_artwork

    @app.post("/v1/reward", response_model=RewardResponse, responses=REWARD_ERRORS)
    async def reward(outcome: RewardRequest, request: Request) -> Response:
        """Record the outcome of a decision (once per event id) and update the online priors."""
        rt: Runtime = request.app.state.runtime
        if outcome.ts is not None and not rt.settings.serve_client_clock:
            rt.metrics.rewards.labels(outcome="malformed").inc()
            return _problem(422, "ts is accepted only when the server runs with serve_client_clock (simulation/replay); omit it")
        now_ms = client_clock_ms(outcome.ts) if outcome.ts is not None else int(time.time() * 1000)
        try:
            ref = rt.rewards.admit(outcome.event_id, now_ms=now_ms)
        except RewardRefused as exc:
            rt.metrics.rewards.labels(outcome=exc.reason).inc()
            return _problem(exc.status, exc.message)
        ds, line = rt.rewards.record_line(ref, outcome.reward, outcome.minutes,
                                          dt.datetime.fromtimestamp(now_ms / 1000, dt.UTC))
        try:
            await rt.reward_log.append(ds, line)
        except Exception as exc:
            rt.rewards.release(ref)
            log_event("reward_log_failed", {"error": str(exc)})
            return _problem(503, "reward log unavailable; retry")
        rt.rewards.apply(ref, outcome.reward, now_ms)
        rt.metrics.rewards.labels(outcome="accepted").inc()
        rt.metrics.stats.record_reward(outcome.reward)
        return _json({"event_id": ref.event_id, "artwork_id": ref.artwork_id, "accepted": True})

    @app.get("/healthz", response_model=Health)
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
    async def readyz(request: Request) -> Response:
        """Readiness: a bundle (or at least the fallback catalog) is loaded, and the impression
        and reward logs can be written."""
        rt: Runtime = request.app.state.runtime
        b = rt.store.current
        problems = [] if b is not None or rt.store.fallback is not None else ["no model and no catalog"]
        problems += [h for h in (rt.impressions.health(), rt.reward_log.health()) if h]
        ready = not problems
        detail = "; ".join(problems) if problems else ("" if b else "serving default artwork (no model)")
        body = {"ready": ready, "model_version": b.version if b else None,
                "registry_version": b.registry_version if b else None, "source": b.source if b else None,
                "fallback": b is None, "detail": detail}
        return _json(body, 200 if ready else 503)

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def prometheus(request: Request) -> Response:
        """Prometheus text exposition."""
        rt: Runtime = request.app.state.runtime
        return Response(rt.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    schema_cache: dict[int, dict[str, Any]] = {}
    base_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        """The schema, with request examples taken from the loaded catalog, so "Try it out"
        in /docs sends a page this server can decide."""
        rt: Runtime | None = getattr(app.state, "runtime", None)
        b = rt.store.current if rt else None
        table = b.artworks if b is not None else (rt.store.fallback if rt else None)
        hit = schema_cache.get(id(table))
        if hit is not None:
            return hit
        schema = copy.deepcopy(base_openapi())
        example = request_example(table, rt.settings if rt else config.Settings.model_construct())
        body = schema["paths"]["/v1/artwork"]["post"]["requestBody"]["content"]["application/json"]
        body["example"] = example
        schema["paths"]["/v1/reward"]["post"]["requestBody"]["content"]["application/json"]["example"] = REWARD_EXAMPLE
        schema_cache.clear()
        schema_cache[id(table)] = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


DOCS_ASSETS = "/docs-assets"
REWARD_EXAMPLE = {"event_id": "paste the event_id of a decision from POST /v1/artwork", "reward": 1, "minutes": 42.0}


def request_example(table: Any, s: config.Settings, n_titles: int = 2) -> dict[str, Any]:
    """A page of the first ``n_titles`` titles of ``table`` with artworks active today
    (each with at most two candidates), or the schema's generic example without a catalog."""
    example = copy.deepcopy(ArtworkRequest.model_config["json_schema_extra"]["examples"][0])  # type: ignore[index]
    if table is None:
        return example
    today = dt.datetime.now(dt.UTC).date()
    titles = []
    for tid in table.title_ids:
        rows = table.active_rows(table.title_index[tid], today)
        if len(rows) == 0:
            continue
        titles.append({"title_id": tid, "candidates": [table.artwork_ids[r] for r in rows[:min(2, s.serve_max_artworks)]],
                       "page_row": 0, "position": len(titles)})
        if len(titles) == min(n_titles, s.serve_max_titles):
            break
    if titles:
        example["titles"] = titles
    return example


# --- command line ----------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--model-uri", help="models:/<name>@<alias>, models:/<name>/<version> or a bundle path "
                                         "(default: serve_model_uri, else the champion alias)")
    src.add_argument("--bundle", help="serve this bundle folder (polled for changes)")
    parser.add_argument("--host", help="bind address (default serve_host)")
    parser.add_argument("--port", type=int, help="port (default serve_port)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    uri = args.bundle or args.model_uri
    if uri and not uri.startswith("models:/"):
        uri = str(Path(uri.removeprefix("file://")).absolute())  # keep symlinks: they are swapped
    if uri:
        # workers are separate processes: hand the choice over through the environment
        os.environ["KEYART_SERVE_MODEL_URI"] = str(uri)
        config.settings.cache_clear()
    s = config.settings()
    try:
        check_settings(s)
    except StartupRefused as exc:
        print(f"keyart serve: {exc}", file=sys.stderr)
        return 2
    uvicorn.run("keyart.serving.app:create_app", factory=True, host=args.host or s.serve_host,
                port=args.port if args.port is not None else s.serve_port, workers=max(1, args.workers),
                loop="uvloop", http="httptools", access_log=False, lifespan="on",
                timeout_graceful_shutdown=10, log_level="info")
    return 0
