"""The FastAPI app: thin routes over :class:`Runtime` (service, rewards, logs, store, metrics).

``create_app()`` is the uvicorn factory (``keyart serve`` runs it). The lifespan loads
the bundle (or the fallback catalog), starts the alias poller and the log writers, and
replays today's reward log; shutdown flushes and fsyncs the logs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response

from keyart import config
from keyart.lake import Lake
from keyart.serving.bundle_store import BundleStore, LoadedBundle
from keyart.serving.event_log import JsonlLog
from keyart.serving.metrics import Metrics, MetricsMiddleware
from keyart.serving.rewards import EventSigner, OnlinePriors, RewardBook, RewardRefused
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


def log_event(event: str, fields: dict[str, Any]) -> None:
    """A structured (JSON) log line."""
    log.info(json.dumps({"event": event, **fields}, default=str))


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


def build_runtime(settings: config.Settings, metrics: Metrics, model_uri: str | None = None,
                  rng: np.random.Generator | None = None) -> Runtime:
    """Load the bundle and open the logs (no background threads yet besides the log writers)."""
    signer = EventSigner(settings.serve_event_secret)
    priors = OnlinePriors()

    def on_swap(b: LoadedBundle) -> None:
        b.prior_alpha, b.prior_beta, b.prior_n = priors.bind(b.artworks, b.priors_ds)
        metrics.set_model(b.version, b.source)

    def on_event(event: str, fields: dict[str, Any]) -> None:
        if event == "bundle_swapped":
            metrics.bundle_loads.labels(outcome="ok").inc()
            settle_heap()
        elif event == "bundle_refused":
            metrics.bundle_loads.labels(outcome="refused").inc()
        log_event(event, fields)

    store = BundleStore(settings, model_uri, on_swap=on_swap, on_event=on_event)
    rewards = RewardBook(signer, priors, max_age_s=settings.attribution_window_hours * 3600 + 3600)
    lake = Lake(settings.lake)
    fsync = dict(fsync=settings.serve_log_fsync, fsync_interval_ms=settings.serve_log_fsync_interval_ms)
    rt = Runtime(settings, store, Service(store, signer, settings, rng), rewards,
                 JsonlLog(settings.impression_log_dir, "impressions", **fsync),
                 JsonlLog(lake.root / "raw" / "rewards", "rewards", **fsync), metrics)
    replayed = rewards.replay(_reward_lines(lake))
    store.poll_once()
    if store.current is None:
        metrics.set_model(None, None)
    log_event("serving_ready", {"uri": store.uri, "version": store.current.version if store.current else None,
                                "fallback": store.current is None, "rewards_replayed": replayed})
    return rt


def _reward_lines(lake: Lake) -> list[tuple[str, bytes]]:
    today = dt.datetime.now(dt.UTC).date()
    out = []
    for days in (1, 0):
        ds = (today - dt.timedelta(days=days)).strftime("%Y-%m-%d")
        for f in sorted((lake.root / "raw" / "rewards" / f"ds={ds}").glob("*.jsonl")):
            out.extend((ds, line) for line in f.read_bytes().splitlines() if line.strip())
    return out


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def _problem(status: int, detail: str) -> Response:
    return _json({"detail": detail}, status)


ERRORS = {400: {"model": Problem, "description": "Body is not parseable (not UTF-8 JSON)"},
          413: {"model": Problem, "description": "Too many titles or artworks, or body too large"},
          422: {"model": Problem, "description": "Invalid request, unknown title or artwork ids"},
          503: {"model": Problem, "description": "No catalog loaded, or the log is unavailable"}}
REWARD_ERRORS = {400: {"model": Problem, "description": "Body is not parseable (not UTF-8 JSON)"},
                 403: {"model": Problem, "description": "Forged event id"},
                 409: {"model": Problem, "description": "Duplicate reward (already recorded)"},
                 410: {"model": Problem, "description": "Event older than the reward window"},
                 413: {"model": Problem, "description": "Body too large"},
                 422: {"model": Problem, "description": "Malformed request or event id"},
                 503: {"model": Problem, "description": "Reward log unavailable"}}


def create_app(settings: config.Settings | None = None, model_uri: str | None = None,
               rng: np.random.Generator | None = None, poll: bool = True) -> FastAPI:
    """The ASGI app. ``settings`` default to :func:`keyart.config.settings`."""
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        s = settings or config.settings()
        rt = build_runtime(s, metrics, model_uri, rng)
        app.state.runtime = rt
        settle_heap()
        if poll:
            rt.store.start()
        try:
            yield
        finally:
            rt.store.stop()
            rt.impressions.close()
            rt.reward_log.close()

    app = FastAPI(title="keyart serving", version="1", lifespan=lifespan,
                  description="Personalized artwork selection with exploration, durable impression "
                              "logging and online priors. See docs/serving.md.")
    app.add_middleware(MetricsMiddleware, metrics=metrics, max_body_bytes=MAX_BODY_BYTES)

    @app.post("/v1/artwork", response_model=ArtworkResponse, responses=ERRORS)
    async def choose_artwork(page: ArtworkRequest, request: Request) -> Response:
        """Choose one artwork per title of the page; log every decision durably before answering."""
        rt: Runtime = request.app.state.runtime
        try:
            decided = rt.service.decide(page)
        except PageRefused as exc:
            return _problem(exc.status, exc.message)
        body = decided.body
        start = time.perf_counter()
        try:
            await rt.impressions.append(decided.ds, decided.lines)
        except Exception as exc:  # not logged = not decided: never acknowledge it
            log_event("impression_log_failed", {"error": str(exc)})
            return _problem(503, "impression log unavailable; the decision was not made")
        rt.rewards.priors.record_impressions(decided.ds, decided.shown, decided.segment)
        m = rt.metrics
        m.log_seconds.observe(time.perf_counter() - start)
        fb = "true" if body["fallback"] else "false"
        m.pages.labels(fallback=fb).inc()
        m.decisions.labels(policy=body["policy"], fallback=fb).inc(len(body["decisions"]))
        if body["fallback"]:
            m.fallbacks.inc()
        return _json(body)

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
        rt.rewards.apply(ref, outcome.reward)
        rt.metrics.rewards.labels(outcome="accepted").inc()
        return _json({"event_id": ref.event_id, "artwork_id": ref.artwork_id, "accepted": True})

    @app.get("/healthz", response_model=Health)
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
    async def readyz(request: Request) -> Response:
        """Readiness: a bundle, or at least the fallback catalog, is loaded."""
        rt: Runtime = request.app.state.runtime
        b = rt.store.current
        ready = b is not None or rt.store.fallback is not None
        body = {"ready": ready, "model_version": b.version if b else None, "source": b.source if b else None,
                "fallback": b is None,
                "detail": "" if b else ("serving default artwork (no model)" if ready else "no model and no catalog")}
        return _json(body, 200 if ready else 503)

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def prometheus(request: Request) -> Response:
        """Prometheus text exposition."""
        rt: Runtime = request.app.state.runtime
        return Response(rt.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


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
    uvicorn.run("keyart.serving.app:create_app", factory=True, host=args.host or s.serve_host,
                port=args.port if args.port is not None else s.serve_port, workers=max(1, args.workers),
                loop="uvloop", http="httptools", access_log=False, lifespan="on",
                timeout_graceful_shutdown=10, log_level="info")
    return 0
