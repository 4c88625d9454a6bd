"""``keyart bench serving --stack``: the serving tier of ``make up`` (replicas behind HAProxy).

Starts ``keyart serve`` replicas on a synthetic bundle and the HAProxy of ``keyart stack``
(the same generated configuration: round robin, ``/readyz`` checks, L7 retries) in front of
them, then measures through the balancer, with the raw keep-alive client of
``keyart bench serving``:

* decisions/s with 1 replica and with 2 (closed loop, best of the concurrencies), both with
  the shared online state in Redis as ``make up`` runs it;
* the cost of the shared online state: p50/p99 with 2 replicas keeping it per process
  (``serve_online_state=local``) and in Redis, at the same offered rate (open loop at half
  the lower saturation throughput, latency from the scheduled send time);
* the online state's own cost per page in this process: one ``add_impressions`` of the
  page's decisions on :class:`LocalState` and on :class:`RedisState` (one Lua call).

    keyart bench serving --stack [--titles 40] [--artworks 8] [--concurrency 4,8,16] [--seconds 3] [--json]

Every replica, the balancer and the load generator share this machine's cores: with 2
cores, 2 replicas cannot double what 1 does (docs/capacity.md says how the figures scale).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import secrets
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from keyart.bench.serving import (
    _stats,
    bench_bundle,
    closed_loop,
    open_loop,
    quiet_client,
    run_in_home,
)
from keyart.demo import stack as stk
from keyart.net import free_port, stop_process

REDIS_URL = stk.REDIS_URL
RUNS = (("1 replica, Redis state", 1, "redis"), ("2 replicas, Redis state", 2, "redis"),
        ("2 replicas, local state", 2, "local"))


def _wait_ready(url: str, procs: list[subprocess.Popen], timeout: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise SystemExit(f"a process exited during start-up (waiting for {url})")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} did not become ready in {timeout:.0f} s")


@contextmanager
def serving_tier(home: Path, bundle_dir: Path, replicas: int, online: str, prefix: str):
    """``replicas`` replicas of ``keyart serve`` behind HAProxy; yields the balancer's port."""
    ports = {f"STACK_PORT_SERVE_{r + 1}": str(free_port()) for r in range(replicas)}
    env = {"KEYART_STACK_DIR": str(home), "STACK_PORT_BALANCER": str(free_port()),
           "STACK_PORT_BALANCER_STATS": str(free_port()), "STACK_BALANCER_STATS_PASSWORD": secrets.token_urlsafe(12),
           **ports}
    names = tuple(str(r + 1) for r in range(replicas))
    cfg = home / "haproxy" / f"bench-{replicas}-{online}.cfg"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(stk.haproxy_config(env, names))
    base = {k: v for k, v in os.environ.items() if not k.startswith("KEYART_")}
    serve_env = dict(base, KEYART_HOME=str(home), KEYART_SERVE_EVENT_SECRET=secrets.token_hex(32),
                     KEYART_SERVE_ONLINE_STATE=online, KEYART_SERVE_REDIS_URL=REDIS_URL,
                     KEYART_SERVE_REDIS_PREFIX=prefix)
    procs: list[subprocess.Popen] = []
    try:
        for r in names:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "keyart.cli", "serve", "--bundle", str(bundle_dir), "--host", stk.HOST,
                 "--port", env[f"STACK_PORT_SERVE_{r}"]], env=serve_env, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL))
        for r in names:
            _wait_ready(f"http://{stk.HOST}:{env[f'STACK_PORT_SERVE_{r}']}/readyz", procs)
        procs.append(subprocess.Popen([stk._haproxy_bin(), "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        _wait_ready(f"http://{stk.HOST}:{env['STACK_PORT_BALANCER']}/readyz", procs)
        deadline = time.monotonic() + 30  # HAProxy's own checks: every replica in rotation
        while set(stk.haproxy_servers(env).values()) != {"UP"}:
            if time.monotonic() > deadline:
                raise SystemExit(f"HAProxy does not see every replica UP: {stk.haproxy_servers(env)}")
            time.sleep(0.2)
        yield int(env["STACK_PORT_BALANCER"])
    finally:
        stop_process(*procs)


def online_state_cost(page_size: int, prefix: str, pages: int = 2000) -> dict[str, float]:
    """Microseconds per page of ``add_impressions`` of ``page_size`` decisions, per state."""
    from keyart.serving.rewards import EventSigner, Impression, LocalState, RedisState

    signer = EventSigner(secrets.token_hex(32))
    window_s, max_age_s = 4 * 3600, 5 * 3600
    now = int(time.time() * 1000)
    batches = [[Impression.of(eid, f"a{j}", 8, 0.125)
                for j, eid in enumerate(signer.issue_many(now + i, "profile=adult", [f"a{j}" for j in range(page_size)]))]
               for i in range(pages)]
    out = {}
    for name, state in (("local", LocalState(window_s, max_age_s)),
                        ("redis", RedisState.from_url(REDIS_URL, prefix, window_s, max_age_s))):
        lat = []
        for batch in batches:
            t0 = time.perf_counter()
            state.add_impressions(batch)
            lat.append(time.perf_counter() - t0)
        us = np.asarray(lat[pages // 10:]) * 1e6
        out[name] = {"mean_us": round(float(us.mean()), 1), "p99_us": round(float(np.percentile(us, 99)), 1)}
        if name == "redis":
            t0 = time.perf_counter()
            state.sync()
            out[name]["sync_ms"] = round((time.perf_counter() - t0) * 1000, 2)
    return out


def _purge(prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
    if keys:
        client.delete(*keys)


def measure(args: argparse.Namespace, home: Path) -> dict[str, Any]:

    if not stk.redis_ping(REDIS_URL):
        raise SystemExit(f"keyart bench serving --stack needs the machine's Redis at {REDIS_URL}")
    bundle_dir, page = bench_bundle(args, home)
    decisions = len(page["titles"])
    body = orjson.dumps(page)
    request = (b"POST /v1/artwork HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
               b"content-length: %d\r\n\r\n" % len(body)) + body
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover
        import asyncio

        runner = asyncio.run
    prefix = f"keyart-bench:{secrets.token_hex(4)}:"
    load1 = os.getloadavg()[0]
    result: dict[str, Any] = {"page": {"titles": decisions, "artworks_per_title": args.artworks},
                              "cpus": os.cpu_count(), "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                              "runs": []}
    levels = [int(x) for x in str(args.concurrency).split(",") if x.strip()]
    try:
        result["online_state_per_page"] = online_state_cost(decisions, prefix + "micro:")
        saturation = {}
        for label, replicas, online in RUNS:  # one tier at a time on the machine's cores
            with serving_tier(home, bundle_dir, replicas, online, prefix) as port, quiet_client():
                runner(closed_loop(port, request, 4, 1.0))  # warm-up
                rows = []
                for c in levels:
                    lat, elapsed, errors = runner(closed_loop(port, request, c, args.seconds))
                    rows.append({"concurrency": c, **_stats(lat, elapsed, decisions), "errors": errors})
            best = max(rows, key=lambda r: r["pages_per_s"])
            saturation[label] = best
            result["runs"].append({"run": label, "replicas": replicas, "online_state": online,
                                   "closed_loop": rows, "best": best})
        rate = min(b["pages_per_s"] for label, b in saturation.items() if label.startswith("2 ")) / 2
        result["open_loop_pages_per_s"] = round(rate, 1)
        for run in result["runs"]:
            if run["replicas"] != 2:
                continue
            with serving_tier(home, bundle_dir, 2, run["online_state"], prefix) as port, quiet_client():
                runner(closed_loop(port, request, 4, 1.0))
                lat, elapsed, errors = runner(open_loop(port, request, rate, max(args.seconds, 4.0)))
            run["open_loop"] = {"offered_pages_per_s": round(rate, 1), **_stats(lat, elapsed, decisions),
                                "errors": errors}
    finally:
        _purge(prefix)
    one = saturation["1 replica, Redis state"]["decisions_per_s"]
    two = saturation["2 replicas, Redis state"]["decisions_per_s"]
    by = {r["run"]: r for r in result["runs"]}
    result["scale_2_vs_1"] = round(two / one, 2) if one else None
    result["redis_p99_cost_ms"] = round(by["2 replicas, Redis state"]["open_loop"]["p99_ms"]
                                        - by["2 replicas, local state"]["open_loop"]["p99_ms"], 2)
    result["load_average"] = {"start": round(load1, 2), "end": round(os.getloadavg()[0], 2)}
    return result


def table(r: dict[str, Any]) -> str:
    head = f"{'run':<44}{'pages/s':>9}{'decisions/s':>13}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"
    lines = [f"serving tier bench (replicas behind HAProxy): {r['page']['titles']} titles x "
             f"{r['page']['artworks_per_title']} artworks per page, {r['cpus']} CPUs, load average "
             f"{r['load_average']['start']} -> {r['load_average']['end']}", head, "-" * len(head)]
    for run in r["runs"]:
        for row in run["closed_loop"]:
            lines.append(f"{run['run'] + ', c=' + str(row['concurrency']):<44}{row['pages_per_s']:>9.1f}"
                         f"{row['decisions_per_s']:>13.1f}{row['p50_ms']:>9.2f}{row['p99_ms']:>9.2f}{row['errors']:>8}")
    for run in r["runs"]:
        if "open_loop" in run:
            o = run["open_loop"]
            lines.append(f"{run['run'] + ', open loop @ ' + str(o['offered_pages_per_s']) + '/s':<44}"
                         f"{o['pages_per_s']:>9.1f}{o['decisions_per_s']:>13.1f}{o['p50_ms']:>9.2f}{o['p99_ms']:>9.2f}"
                         f"{o['errors']:>8}")
    s = r["online_state_per_page"]
    lines.append(f"2 replicas / 1 replica decisions/s = {r['scale_2_vs_1']}; p99 with Redis - p99 local "
                 f"= {r['redis_p99_cost_ms']:+.2f} ms at the same offered rate")
    lines.append(f"online state per page of {r['page']['titles']} decisions: local {s['local']['mean_us']:.0f} us "
                 f"(p99 {s['local']['p99_us']:.0f}), Redis {s['redis']['mean_us']:.0f} us (p99 {s['redis']['p99_us']:.0f}); "
                 f"a Redis sync after {2000} pages {s['redis']['sync_ms']:.1f} ms")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    return run_in_home("keyart-bench-stack-", measure, table, args)
