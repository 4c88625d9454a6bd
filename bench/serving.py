"""``keyart bench serving``: what one pinned serving core decides, against its in-process floor.

The ``keyart serve`` subprocess (uvicorn, uvloop, httptools, impression log fsynced per
the default policy) is pinned to one CPU and this process, the load generator, to
another. On the server's CPU, in the same run, the *in-process floor* times the page's
preparation, feature assembly, onnxruntime call and policy without HTTP, JSON or logging.
A raw keep-alive HTTP/1.1 client then sends one page of 40 titles x 8 candidate artworks
over loopback in closed loop at several concurrencies (the best is the saturation
throughput), and in open loop at fixed offered rates, shares of that saturation, with
latency counted from each request's scheduled send time (queueing included, so no
coordinated omission). The server's own stage timers (``/metrics``,
``keyart_page_stage_seconds_total``) give the mean time per page of every stage.

    keyart bench serving [--bundle PATH] [--workers 1] [--concurrency 1,2,4,8,16]
                         [--rates 0.25,0.5,0.75,0.9] [--server-cpu N] [--no-pin] [--json]

``--json`` has ``decisions_per_s_per_core``, ``endpoint_over_floor`` and
``p99_ms_at_half_saturation`` at the top level. Without ``--bundle`` a synthetic bundle is
built (200 titles, 200 trees of 32 leaves).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from keyart.net import free_port, stop_process

TARGET_DECISIONS_PER_CORE = 20_000
TARGET_RATIO = 0.8
TARGET_P99_MS = 10.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", help="bundle folder to serve (default: a synthetic bundle)")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    parser.add_argument("--concurrency", default="1,2,4,8,16", help="closed-loop concurrencies")
    parser.add_argument("--rates", default="0.25,0.5,0.75,0.9",
                        help="open-loop offered rates, as shares of the measured saturation throughput")
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each load level")
    parser.add_argument("--server-cpu", type=int, help="CPU the server (and the floor) is pinned to "
                        "(default: the first allowed; the load generator gets another)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the server and the load generator")
    parser.add_argument("--titles", type=int, default=40)
    parser.add_argument("--artworks", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--stack", action="store_true", help="the serving tier of `make up` instead: replicas behind "
                        "HAProxy, 2 vs 1 and the shared online state in Redis vs per process (bench/serving_stack.py)")


def _page(bundle_dir: Path, n_titles: int, n_art: int) -> dict[str, Any]:
    import pyarrow.parquet as pq

    arts = pq.read_table(bundle_dir / "artworks.parquet", columns=["artwork_id", "title_id"]).to_pylist()
    by_title: dict[str, list[str]] = {}
    for a in arts:
        by_title.setdefault(a["title_id"], []).append(a["artwork_id"])
    titles = [t for t, a in sorted(by_title.items()) if len(a) >= n_art][:n_titles]
    if len(titles) < n_titles:
        raise SystemExit(f"bundle has only {len(titles)} titles with {n_art} artworks")
    member = pq.read_table(bundle_dir / "members.parquet", columns=["member_id"]).column(0)[0].as_py()
    return {"member_id": member, "context": {"device": "tv", "country": "US", "local_hour": 21, "day_of_week": 5},
            "titles": [{"title_id": t, "candidates": sorted(by_title[t])[:n_art], "page_row": i // 10,
                        "position": i % 10} for i, t in enumerate(titles)]}


def _stats(latencies: list[float], seconds: float, decisions_per_page: int) -> dict[str, float]:
    lat = np.asarray(latencies) * 1000.0
    pages = len(lat) / seconds if seconds > 0 else 0.0
    return {"pages_per_s": round(pages, 1), "decisions_per_s": round(pages * decisions_per_page, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 3) if len(lat) else float("nan"),
            "p99_ms": round(float(np.percentile(lat, 99)), 3) if len(lat) else float("nan"),
            "requests": len(lat)}


def floor(bundle_dir: Path, page: dict[str, Any], seconds: float) -> dict[str, float]:
    """Prepare + features + one ONNX call + policy for the page, in this process (on the
    CPUs this process is pinned to)."""
    from keyart.config import Settings
    from keyart.serving.app import settle_heap
    from keyart.serving.bundle_store import BundleStore
    from keyart.serving.rewards import EventSigner
    from keyart.serving.schemas import ArtworkRequest
    from keyart.serving.service import Service

    settings = Settings()
    store = BundleStore(settings, str(bundle_dir))
    store.poll_once()
    if store.current is None:
        raise SystemExit(f"bundle {bundle_dir} refused: {store.bad}")
    svc = Service(store, EventSigner(settings.serve_event_secret), settings)
    req = ArtworkRequest.model_validate(page)
    for _ in range(50):
        svc.choose(svc.prepare(req))
    settle_heap()  # as the server does after loading a bundle
    lat: list[float] = []
    end = time.perf_counter() + seconds
    while (t0 := time.perf_counter()) < end:
        svc.choose(svc.prepare(req))
        lat.append(time.perf_counter() - t0)
    return _stats(lat, sum(lat), len(page["titles"]))


class _Conn:
    """One keep-alive HTTP/1.1 connection sending the same pre-built request."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes):
        self.reader, self.writer, self.request = reader, writer, request

    async def send(self) -> int:
        self.writer.write(self.request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        low = head.lower()
        i = low.index(b"content-length:") + 15
        length = int(low[i:low.index(b"\r\n", i)])
        await self.reader.readexactly(length)
        return status


async def _connect(port: int, request: bytes) -> _Conn:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    return _Conn(reader, writer, request)


async def closed_loop(port: int, request: bytes, concurrency: int, seconds: float) -> tuple[list[float], float, int]:
    conns = [await _connect(port, request) for _ in range(concurrency)]
    lat: list[float] = []
    errors = 0
    start = time.perf_counter()
    end = start + seconds

    async def worker(c: _Conn) -> None:
        nonlocal errors
        while (t0 := time.perf_counter()) < end:
            if await c.send() != 200:
                errors += 1
            lat.append(time.perf_counter() - t0)

    await asyncio.gather(*(worker(c) for c in conns))
    elapsed = time.perf_counter() - start
    for c in conns:
        c.writer.close()
    return lat, elapsed, errors


async def open_loop(port: int, request: bytes, rate: float, seconds: float, pool: int = 64) -> tuple[list[float], float, int]:
    """Send at a fixed rate; latency from the scheduled time (queueing included)."""
    free: asyncio.Queue[_Conn] = asyncio.Queue()
    for _ in range(pool):
        free.put_nowait(await _connect(port, request))
    lat: list[float] = []
    errors = 0
    n = int(rate * seconds)
    start = time.perf_counter()

    async def one(scheduled: float) -> None:
        nonlocal errors
        c = await free.get()
        if await c.send() != 200:
            errors += 1
        lat.append(time.perf_counter() - scheduled)
        free.put_nowait(c)

    tasks = []
    for i in range(n):
        scheduled = start + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(scheduled)))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    while not free.empty():
        free.get_nowait().writer.close()
    return lat, elapsed, errors


@contextlib.contextmanager
def quiet_client():
    """No collector pauses in the load generator while it times requests.

    A full collection in this (client) process would delay sends and reads by tens of
    milliseconds and be counted as server latency. The server does its own heap settling.
    """
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()


def _pin(cpu: int | None) -> Callable[[], None] | None:
    """A ``preexec_fn`` pinning the child (and every thread it starts) to ``cpu``."""
    if cpu is None:
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


def _start_server(bundle_dir: Path, workers: int, home: Path, cpu: int | None = None) -> tuple[subprocess.Popen, int]:
    import httpx

    port = free_port()
    # a fresh event-signing secret per run: `keyart serve` refuses the default
    env = dict(os.environ, KEYART_HOME=str(home), KEYART_SERVE_EVENT_SECRET=secrets.token_hex(32))
    proc = subprocess.Popen([sys.executable, "-m", "keyart.cli", "serve", "--bundle", str(bundle_dir),
                             "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_pin(cpu))
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("keyart serve exited during start-up")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc, port
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("keyart serve did not become ready")


def stage_totals(port: int) -> tuple[dict[str, float], float]:
    """The server's own per-stage timers (``keyart_page_stage_seconds_total``) and the pages
    they cover (``keyart_page_stage_pages_total``), read from ``/metrics``."""
    import httpx

    from keyart.serving.metrics import STAGE_PAGES, STAGE_SECONDS

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    stages: dict[str, float] = {}
    pages = 0.0
    for line in text.splitlines():
        if line.startswith(STAGE_SECONDS + "{"):
            name = line.split('stage="', 1)[1].split('"', 1)[0]
            stages[name] = float(line.rsplit(" ", 1)[1])
        elif line.startswith(STAGE_PAGES + " "):
            pages = float(line.rsplit(" ", 1)[1])
    return stages, pages


def breakdown(before: tuple[dict[str, float], float], after: tuple[dict[str, float], float]) -> dict[str, Any]:
    """Mean microseconds per page of every stage between two :func:`stage_totals` readings."""
    pages = after[1] - before[1]
    if pages <= 0:
        return {"pages": 0}
    us = {k: round((v - before[0].get(k, 0.0)) / pages * 1e6, 1) for k, v in after[0].items()}
    return {"pages": int(pages), "mean_us": us, "total_us": round(sum(us.values()), 1)}


def _cpus(args: argparse.Namespace) -> tuple[int | None, int | None]:
    """(server CPU, client CPU): two distinct CPUs of this process's affinity, or no pinning."""
    allowed = sorted(os.sched_getaffinity(0))
    if args.no_pin or len(allowed) < 2:
        return None, None
    server = args.server_cpu if args.server_cpu is not None else allowed[0]
    client = next(c for c in allowed if c != server)
    return server, client


def bench_bundle(args: argparse.Namespace, home: Path) -> tuple[Path, dict[str, Any]]:
    """The bundle to serve (``--bundle``, or a synthetic one written under ``home``) and the
    page every request sends."""
    from keyart.bench import synthetic

    bundle_dir = Path(args.bundle) if args.bundle else home / "bundle"
    if not args.bundle:
        synthetic.write_bundle(bundle_dir, seed=7, version="bench", n_titles=max(200, args.titles),
                               per_title=args.artworks, n_members=2000, n_trees=200)
    return bundle_dir, _page(bundle_dir, args.titles, args.artworks)


def measure(args: argparse.Namespace, home: Path) -> dict[str, Any]:
    bundle_dir, page = bench_bundle(args, home)
    decisions = len(page["titles"])
    server_cpu, client_cpu = _cpus(args)
    own = os.sched_getaffinity(0)
    result: dict[str, Any] = {"page": {"titles": decisions, "artworks_per_title": args.artworks},
                              "workers": args.workers, "cpus": os.cpu_count(), "bundle": str(bundle_dir),
                              "server_cpu": server_cpu, "client_cpu": client_cpu,
                              "load_average": {"start": round(os.getloadavg()[0], 2)}}
    if server_cpu is not None:
        os.sched_setaffinity(0, {server_cpu})  # the floor runs on the core the server will get
    try:
        result["floor"] = floor(bundle_dir, page, args.seconds)
    finally:
        os.sched_setaffinity(0, own)
    body = orjson.dumps(page)
    request = (b"POST /v1/artwork HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
               b"content-length: %d\r\n\r\n" % len(body)) + body
    proc, port = _start_server(bundle_dir, args.workers, home, server_cpu if args.workers == 1 else None)
    if client_cpu is not None:
        os.sched_setaffinity(0, {client_cpu})
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    try:
        with quiet_client():
            runner(closed_loop(port, request, 4, 1.0))  # warm-up
            levels = []
            for c in [int(x) for x in str(args.concurrency).split(",") if x.strip()]:
                before = stage_totals(port)
                lat, elapsed, errors = runner(closed_loop(port, request, c, args.seconds))
                levels.append({"concurrency": c, **_stats(lat, elapsed, decisions), "errors": errors,
                               "server_stages": breakdown(before, stage_totals(port))})
            result["endpoint"] = levels
            best = max(levels, key=lambda r: r["pages_per_s"])
            saturation = best["pages_per_s"]
            open_runs = []
            for share in [float(x) for x in str(args.rates).split(",") if x.strip()]:
                rate = saturation * share
                lat, elapsed, errors = runner(open_loop(port, request, rate, max(args.seconds, 4.0)))
                open_runs.append({"share_of_saturation": share, "offered_pages_per_s": round(rate, 1),
                                  **_stats(lat, elapsed, decisions), "errors": errors})
            result["open_loop"] = open_runs
            half = min(open_runs, key=lambda r: abs(r["share_of_saturation"] - 0.5))
            result["half_saturation"] = half
    finally:
        os.sched_setaffinity(0, own)
        stop_process(proc)
    result["load_average"]["end"] = round(os.getloadavg()[0], 2)
    ratio = best["pages_per_s"] / result["floor"]["pages_per_s"]
    result["server_stages"] = best["server_stages"]
    result["decisions_per_s_per_core"] = best["decisions_per_s"] if args.workers == 1 else None
    result["endpoint_over_floor"] = round(ratio, 3)
    result["p99_ms_at_half_saturation"] = result["half_saturation"]["p99_ms"]
    result["targets"] = {"decisions_per_s_per_core_min": TARGET_DECISIONS_PER_CORE,
                         "decisions_ok": best["decisions_per_s"] >= TARGET_DECISIONS_PER_CORE,
                         "endpoint_over_floor_min": TARGET_RATIO, "ratio_ok": ratio >= TARGET_RATIO,
                         "p99_at_half_saturation_max_ms": TARGET_P99_MS,
                         "p99_ok": result["half_saturation"]["p99_ms"] <= TARGET_P99_MS}
    return result


def table(r: dict[str, Any]) -> str:
    head = f"{'run':<28}{'pages/s':>10}{'decisions/s':>13}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"
    pin = (f"server on CPU {r['server_cpu']}, load generator on CPU {r['client_cpu']}" if r["server_cpu"] is not None
           else "not pinned")
    la = r["load_average"]
    lines = [f"serving bench: {r['page']['titles']} titles x {r['page']['artworks_per_title']} artworks per page, "
             f"{r['workers']} worker(s), {r['cpus']} CPUs, {pin}, load average {la['start']} -> {la['end']}",
             head, "-" * len(head)]
    f = r["floor"]
    lines.append(f"{'in-process floor':<28}{f['pages_per_s']:>10.1f}{f['decisions_per_s']:>13.1f}{f['p50_ms']:>9.2f}{f['p99_ms']:>9.2f}{'':>8}")
    for e in r["endpoint"]:
        lines.append(f"{'endpoint c=' + str(e['concurrency']):<28}{e['pages_per_s']:>10.1f}{e['decisions_per_s']:>13.1f}"
                     f"{e['p50_ms']:>9.2f}{e['p99_ms']:>9.2f}{e['errors']:>8}")
    for h in r["open_loop"]:
        lines.append(f"{'open loop @ ' + str(h['offered_pages_per_s']) + '/s':<28}{h['pages_per_s']:>10.1f}"
                     f"{h['decisions_per_s']:>13.1f}{h['p50_ms']:>9.2f}{h['p99_ms']:>9.2f}{h['errors']:>8}")
    st = r["server_stages"]
    if st.get("pages"):
        lines.append(f"server time per page at saturation ({st['pages']} pages): {st['total_us']:.0f} us = "
                     + ", ".join(f"{k} {v:.0f}" for k, v in st["mean_us"].items()))
    t = r["targets"]
    lines.append(f"decisions/s per core = {r['decisions_per_s_per_core']} (target >= {t['decisions_per_s_per_core_min']}: "
                 f"{'ok' if t['decisions_ok'] else 'MISSED'}); endpoint / floor = {r['endpoint_over_floor']:.2f} "
                 f"(target >= {t['endpoint_over_floor_min']}: {'ok' if t['ratio_ok'] else 'MISSED'}); p99 at half "
                 f"saturation = {r['p99_ms_at_half_saturation']:.2f} ms (target <= {t['p99_at_half_saturation_max_ms']:g}: "
                 f"{'ok' if t['p99_ok'] else 'MISSED'})")
    return "\n".join(lines)


def run_in_home(prefix: str, measure_fn: Callable[[argparse.Namespace, Path], dict[str, Any]],
                table_fn: Callable[[dict[str, Any]], str], args: argparse.Namespace) -> int:
    """Run ``measure_fn`` with ``KEYART_HOME`` in a fresh temporary folder; print JSON or a table."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        os.environ["KEYART_HOME"] = tmp
        from keyart import config

        config.settings.cache_clear()
        result = measure_fn(args, Path(tmp))
    print(json.dumps(result, indent=2) if args.json else table_fn(result))
    return 0


def run(args: argparse.Namespace) -> int:
    if args.stack:
        from keyart.bench import serving_stack

        return serving_stack.run(args)
    return run_in_home("keyart-bench-serving-", measure, table, args)
