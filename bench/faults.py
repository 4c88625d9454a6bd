"""``keyart bench faults``: the endpoint and ingest under hostile input and failures.

Every probe runs against real parts: a ``keyart serve`` subprocess on 127.0.0.1 (with an
API key and a random event secret), a real MLflow server for the registry outage, a
real SparkSession for ingest. Probes:

* ``bad_input``: a corpus of bad requests (NaN / Infinity / 1e400 in every number, lone
  surrogates in every id, invalid UTF-8, truncated and deep JSON, wrong types, path-like
  and newline-terminated ids, unknown and foreign ids, chunked bodies over the limit and a
  chunked 300k-title page, missing or wrong API keys, forged, tampered and replayed
  rewards) on one keep-alive connection. Failures: a 5xx, a dropped connection where an
  answer was due, a forged reward accepted.
* ``kill9``: kill -9 of a loaded server (pages and rewards), three times on the same
  logs. Failures: acknowledged decisions or rewards missing from the logs.
* ``disk_full``: the impression log on a 16 MiB tmpfs filled to the last few hundred KiB
  (when tmpfs cannot be mounted, a per-process file-size limit, RLIMIT_FSIZE, set on the
  server with prlimit: writes past it fail with EFBIG; the report says which). Failures:
  acknowledged decisions not logged, a line that fails its checksum, readiness 200 while
  writes fail or 503 after the space is back.
* ``unwritable_log``: the log directory is a file, then is repaired. Failures: readiness
  200 while decisions get 503, or no recovery.
* ``bundles``: corrupt, truncated, unsigned, tampered, foreign-signed, wrong-spec bundles
  and a missing folder / non-JSON manifest behind the served symlink. Failures: a bad
  bundle swapped in, a refusal without its event, the good bundle not swapped in after.
* ``registry``: the MLflow server is killed (registry outage) and its artifact folder
  moved away (artifact store outage) while a new champion waits; both come back.
  Failures: serving stops answering, the new champion is blacklisted or not loaded after
  recovery.
* ``ingest``: a malformed raw-log corpus through the ingest transform. Failures: a bad
  row counted clean, a good row lost, read != clean + quarantined + duplicates.

It prints one table: probe, tried, failures (``--json`` for everything).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson

from keyart.net import stop_process

DEFAULT_SECRET = "keyart-dev-secret-change-me"
PROBES = ("bad_input", "kill9", "disk_full", "unwritable_log", "bundles", "registry", "ingest")


# --- a keyart serve subprocess -------------------------------------------------------------

class Server:
    """``keyart serve`` on 127.0.0.1 with its own environment."""

    def __init__(self, env: dict[str, str], args: list[str], ready_status: tuple[int, ...] = (200,),
                 timeout_s: float = 120):
        from keyart.net import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "keyart.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port), *args],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code in ready_status:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("server did not become ready")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        stop_process(self.proc, timeout=30)


def page_body(world: Any, n_titles: int = 5, start: int = 0) -> dict[str, Any]:
    titles = [{"title_id": tid, "candidates": world.artworks_of[tid][:4], "page_row": i // 10, "position": i % 10}
              for i, tid in enumerate(world.title_ids[start:start + n_titles])]
    return {"member_id": world.member_ids[0],
            "context": {"device": "tv", "country": "US", "local_hour": 20, "day_of_week": 5}, "titles": titles}


def log_event_ids(root: Path) -> tuple[set[str], int, int]:
    """(event ids, lines that fail their checksum, lines) of every log file under ``root``."""
    from keyart.serving.event_log import read_lines

    ids: set[str] = set()
    bad = total = 0
    for f in sorted(Path(root).rglob("*.jsonl")):
        for payload in read_lines(f):
            total += 1
            if payload is None:
                bad += 1
                continue
            ids.add(orjson.loads(payload)["event_id"])
    return ids, bad, total


# --- bad input -------------------------------------------------------------------------

Case = tuple[str, str, bytes, dict[str, str], str]  # name, route, body, headers, kind


def bad_corpus(world: Any, api_key: str, real_event_id: str) -> list[Case]:
    """The bad requests (kind: ``bad`` must be 4xx, ``forged`` must be refused)."""
    from keyart.serving.rewards import SEGMENT_CODES, EventSigner

    auth = {"X-API-Key": api_key, "content-type": "application/json"}
    good = orjson.dumps(page_body(world, 2)).decode()
    reward = orjson.dumps({"event_id": real_event_id, "reward": 1, "minutes": 3.5}).decode()
    out: list[Case] = []

    def add(name: str, route: str, body: str | bytes, headers: dict[str, str] | None = None, kind: str = "bad") -> None:
        out.append((name, route, body if isinstance(body, bytes) else body.encode("utf-8", "surrogatepass"),
                    headers if headers is not None else auth, kind))

    for token in ("NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1" * 400):
        add(f"local_hour {token}", "/v1/artwork", good.replace('"local_hour":20', f'"local_hour":{token}'))
        add(f"day_of_week {token}", "/v1/artwork", good.replace('"day_of_week":5', f'"day_of_week":{token}'))
        add(f"page_row {token}", "/v1/artwork", good.replace('"page_row":0', f'"page_row":{token}', 1))
        add(f"position {token}", "/v1/artwork", good.replace('"position":1', f'"position":{token}', 1))
        add(f"ignored key {token}", "/v1/artwork", good.replace('"day_of_week":5', f'"day_of_week":5,"x":{token}'))
        add(f"reward minutes {token}", "/v1/reward", reward.replace("3.5", token))
        add(f"reward value {token}", "/v1/reward", reward.replace('"reward":1', f'"reward":{token}'))
    for field, text in (("member_id", '"member_id":"'), ("title_id", '"title_id":"'), ("country", '"country":"'),
                        ("device", '"device":"'), ("candidate", '"candidates":["')):
        for sur in ("\\ud800", "\\udc00", "\\ud83d"):
            add(f"lone surrogate {sur} in {field}", "/v1/artwork", good.replace(text, text + sur, 1))
    for sur in ("\\ud800", "\\udfff"):
        add(f"lone surrogate {sur} in event_id", "/v1/reward", reward.replace('"event_id":"', '"event_id":"' + sur))
        add(f"lone surrogate {sur} in request_id", "/v1/artwork", good[:-1] + f',"request_id":"a{sur}"}}')
    add("raw surrogate bytes", "/v1/artwork", good.replace('"country":"US"', '"country":"\xed\xa0\x80"').encode("latin-1"))
    add("invalid utf-8 0xff", "/v1/artwork", b'{"member_id":"\xff\xfe"}')
    add("overlong utf-8", "/v1/artwork", good.encode().replace(b'"US"', b'"\xc0\xafUS"'))
    add("truncated multibyte", "/v1/artwork", good.encode().replace(b'"US"', b'"U\xe2\x82"'))
    for k in (1, 5, 10, 20, 40, 60, 80, 100, 150, len(good) - 1):
        add(f"truncated at {k}", "/v1/artwork", good[:k])
    for name, body in (("not json", "{not json"), ("json array", "[1,2]"), ("json null", "null"), ("json true", "true"),
                       ("json number", "42"), ("json string", '"page"'), ("empty body", ""), ("whitespace body", "  \n"),
                       ("empty object", "{}"), ("deep arrays", "[" * 5000 + "]" * 5000),
                       ("deep objects", '{"a":' * 3000 + "1" + "}" * 3000), ("trailing garbage", good + "xyz"),
                       ("two documents", good + good)):
        add(name, "/v1/artwork", body)
    page = orjson.loads(good)

    def variant(name: str, change: Callable[[dict[str, Any]], None]) -> None:
        body = json.loads(json.dumps(page))
        change(body)
        add(name, "/v1/artwork", orjson.dumps(body))

    for value, label in ((123, "number"), (None, "null"), (["m1"], "list"), (True, "bool"), ({"a": 1}, "object")):
        variant(f"member_id {label}", lambda b, v=value: b.__setitem__("member_id", v))
        variant(f"title_id {label}", lambda b, v=value: b["titles"][0].__setitem__("title_id", v))
    for ident, label in (("../../etc/passwd", "path-like"), ("m000501\n", "trailing newline"), ("m 1", "space"),
                         ("m" * 129, "129 chars"), ("m0001\u00e9", "non-ascii"), ("", "empty"), ("m1\x00", "NUL")):
        variant(f"member_id {label}", lambda b, v=ident: b.__setitem__("member_id", v))
        variant(f"title_id {label}", lambda b, v=ident: b["titles"][0].__setitem__("title_id", v))
        variant(f"candidate {label}", lambda b, v=ident: b["titles"][0].__setitem__("candidates", [v]))
    for key, value in (("device", "fridge"), ("country", "U"), ("local_hour", -1), ("local_hour", 24),
                       ("local_hour", 1.5), ("local_hour", "20"), ("day_of_week", 7)):
        variant(f"context {key}={value!r}", lambda b, k=key, v=value: b["context"].__setitem__(k, v))
    variant("context missing", lambda b: b.pop("context"))
    variant("titles empty", lambda b: b.__setitem__("titles", []))
    variant("titles not a list", lambda b: b.__setitem__("titles", "t0001"))
    variant("title item a string", lambda b: b["titles"].__setitem__(0, "t0001"))
    variant("candidates empty", lambda b: b["titles"][0].__setitem__("candidates", []))
    variant("candidates 40", lambda b: b["titles"][0].__setitem__("candidates", [f"x{i}" for i in range(40)]))
    variant("page_row 1001", lambda b: b["titles"][0].__setitem__("page_row", 1001))
    variant("position -1", lambda b: b["titles"][0].__setitem__("position", -1))
    variant("unknown title", lambda b: b["titles"][0].__setitem__("title_id", "t9999"))
    variant("unknown artwork", lambda b: b["titles"][0].__setitem__("candidates", ["t0001-zz"]))
    variant("artwork of another title", lambda b: b["titles"][0].__setitem__(
        "candidates", [world.artworks_of[world.title_ids[1]][0]]))
    variant("duplicate title", lambda b: b["titles"].append(dict(b["titles"][0])))
    variant("repeated candidate", lambda b: b["titles"][0].__setitem__("candidates", [b["titles"][0]["candidates"][0]] * 2))
    variant("too many titles", lambda b: b.__setitem__("titles", [dict(b["titles"][0], title_id=f"t{i:04d}")
                                                                for i in range(101)]))
    variant("ts without client clock", lambda b: b.__setitem__("ts", "2026-01-01T00:00:00Z"))
    variant("bad request_id", lambda b: b.__setitem__("request_id", "a b"))
    add("text/plain content type", "/v1/artwork", good, {"X-API-Key": api_key, "content-type": "text/plain"})
    add("no API key", "/v1/artwork", good, {"content-type": "application/json"})
    add("wrong API key", "/v1/artwork", good, {"content-type": "application/json", "X-API-Key": api_key[:-1] + "x"})
    add("API key prefix", "/v1/artwork", good, {"content-type": "application/json", "X-API-Key": api_key[:-1]})
    add("basic auth", "/v1/artwork", good, {"content-type": "application/json", "Authorization": "Basic " + api_key})
    add("reward without API key", "/v1/reward", reward, {"content-type": "application/json"})
    add("Idempotency-Key with spaces", "/v1/artwork", good, {**auth, "Idempotency-Key": "a b"})
    add("Idempotency-Key differs from request_id", "/v1/artwork", good[:-1] + ',"request_id":"r1"}',
        {**auth, "Idempotency-Key": "r2"})
    for name, body in (("reward 2", reward.replace('"reward":1', '"reward":2')),
                       ("minutes -1", reward.replace("3.5", "-1")), ("minutes 1441", reward.replace("3.5", "1441")),
                       ("reward string", reward.replace('"reward":1', '"reward":"1"')),
                       ("reward ts without client clock", reward[:-1] + ',"ts":"2026-01-01T00:00:00Z"}'),
                       ("event id empty", reward.replace(real_event_id, "")),
                       ("event id 300 chars", reward.replace(real_event_id, "e" * 300))):
        add(name, "/v1/reward", body)
    # forged rewards: ids signed with the built-in default secret, made up, or altered
    forger = EventSigner(DEFAULT_SECRET)
    now_ms = int(time.time() * 1000)
    for i, artwork in enumerate([*world.artworks_of[world.title_ids[0]][:4], "t9999-a0", "not-in-catalog"]):
        for segment in SEGMENT_CODES:
            eid = forger.issue(now_ms - i * 1000, segment, artwork)
            add(f"forged with the default secret {artwork} {segment}", "/v1/reward",
                orjson.dumps({"event_id": eid, "reward": 1}), kind="forged")
    for eid in ("aaaaaaaa", "1.abc.def.all.AAAAAAAAAAAAAAAAAAAAAA.t0001-a0", real_event_id[:-1] + "x",
                real_event_id.rsplit(".", 1)[0] + "." + world.artworks_of[world.title_ids[0]][-1],
                real_event_id.replace(".", "..", 1)):
        add(f"forged id {eid[:24]}", "/v1/reward", orjson.dumps({"event_id": eid, "reward": 1}), kind="forged")
    return out


def _raw_chunked(port: int, api_key: str, chunks: Iterator[bytes]) -> tuple[int | None, float, int]:
    """Send a chunked body on a raw socket until the server stops reading; (status, s, bytes)."""
    start = time.perf_counter()
    sent = 0
    status = None
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"POST /v1/artwork HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                     b"x-api-key: " + api_key.encode() + b"\r\ntransfer-encoding: chunked\r\n\r\n")
        try:
            for chunk in chunks:
                sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                sent += len(chunk)
            sock.sendall(b"0\r\n\r\n")
        except OSError:  # the server answered and closed
            pass
        with contextlib.suppress(OSError):
            head = sock.recv(4096)
            if head.startswith(b"HTTP/1.1 "):
                status = int(head.split()[1])
    return status, time.perf_counter() - start, sent


def probe_bad_input(home: Path, bundle_dir: Path, world: Any, env: dict[str, str], api_key: str) -> dict[str, Any]:
    server = Server(env, ["--bundle", str(bundle_dir)])
    try:
        headers = {"X-API-Key": api_key}
        with httpx.Client(base_url=server.url, timeout=30) as c:
            first = c.post("/v1/artwork", json=page_body(world, 2), headers=headers).json()
            real = first["decisions"][0]["event_id"]
            corpus = bad_corpus(world, api_key, real)
            statuses: dict[str, int] = {}
            by_kind: dict[str, dict[str, int]] = {}
            failures: list[str] = []
            dropped = 0
            accepted: list[str] = []
            for name, route, body, hdrs, kind in corpus:
                try:
                    r = c.post(route, content=body, headers=hdrs)
                    status = r.status_code
                    r.json()  # every answer is JSON that decodes
                except (httpx.HTTPError, ValueError) as exc:
                    dropped += 1
                    failures.append(f"{name}: {type(exc).__name__}")
                    continue
                cls = f"{status // 100}xx"
                statuses[cls] = statuses.get(cls, 0) + 1
                by_kind.setdefault(kind, {}).setdefault(cls, 0)
                by_kind[kind][cls] += 1
                if status >= 500 or (kind == "forged" and status < 400):
                    failures.append(f"{name}: {status}")
                elif status < 400:
                    accepted.append(name)  # valid after all (e.g. pydantic reads "20" as 20): reported, not a failure
            fresh = c.post("/v1/artwork", json=page_body(world, 1), headers=headers).json()["decisions"][0]["event_id"]
            replay = [c.post("/v1/reward", json={"event_id": fresh, "reward": 1}, headers=headers).status_code
                      for _ in range(2)]
            # chunked bodies: a good page in pieces, 50 MiB of chunks, a 300k-title page
            good = orjson.dumps(page_body(world, 2))
            pieces = c.post("/v1/artwork", content=iter([good[:20], good[20:]]),
                            headers={**headers, "content-type": "application/json"}).status_code
        big_page = orjson.dumps({"member_id": "m1", "context": {"device": "tv", "country": "US", "local_hour": 1,
                                                                "day_of_week": 1},
                                 "titles": [{"title_id": f"t{i}", "page_row": 0, "position": 0}
                                            for i in range(300_000)]})
        huge = _raw_chunked(server.port, api_key, (b"[" * 65536 for _ in range(800)))
        big = _raw_chunked(server.port, api_key, (big_page[i:i + 65536] for i in range(0, len(big_page), 65536)))
        after = httpx.post(server.url + "/v1/artwork", json=page_body(world, 2), headers=headers).status_code
        metrics = httpx.get(server.url + "/metrics").text
        five_xx = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                      if line.startswith("keyart_requests_total{") and 'status="5' in line)
        if replay != [200, 409]:
            failures.append(f"reward replay answered {replay}")
        if pieces != 200:
            failures.append(f"good chunked page answered {pieces}")
        for label, (status, seconds, sent) in (("chunked 50 MiB", huge), ("chunked 300k-title page", big)):
            if sent >= 50 << 20 or (status not in (None, 413)) or seconds > 10:
                failures.append(f"{label}: status {status}, {sent} bytes read in {seconds:.1f} s")
        if after != 200 or not server.alive():
            failures.append(f"a good page after the corpus answered {after}")
        tried = len(corpus) + 2 + 3 + 1  # the corpus, a replayed reward, three chunked bodies, a good page after
        return {"probe": "bad_input", "tried": tried, "failures": len(failures) + int(five_xx > 0 and not failures),
                "detail": {"cases": len(corpus), "status_classes": statuses, "by_kind": by_kind,
                           "dropped_connections": dropped, "server_5xx_counted": five_xx,
                           "accepted_as_valid": accepted,
                           "forged_accepted": by_kind.get("forged", {}).get("2xx", 0),
                           "reward_replay": replay, "chunked_good": pieces,
                           "chunked_50MiB": {"status": huge[0], "seconds": round(huge[1], 3), "bytes_sent": huge[2]},
                           "chunked_300k_titles": {"status": big[0], "seconds": round(big[1], 3), "bytes_sent": big[2],
                                                   "body_bytes": len(big_page)},
                           "failures": failures[:20]}}
    finally:
        server.stop()


# --- kill -9 under load ----------------------------------------------------------------

def probe_kill9(home: Path, bundle_dir: Path, world: Any, env: dict[str, str], api_key: str,
                rounds: int = 3) -> dict[str, Any]:
    lake = Path(env["KEYART_LAKE_ROOT"])
    acked_pages: set[str] = set()
    acked_rewards: set[str] = set()
    per_round = []
    headers = {"X-API-Key": api_key}
    lock = threading.Lock()
    for k in range(rounds):
        server = Server(env, ["--bundle", str(bundle_dir)])
        stop = threading.Event()
        mine: list[str] = []
        rewards: list[str] = []

        def pages(offset: int, server: Server = server, stop: threading.Event = stop, mine: list[str] = mine) -> None:
            body = page_body(world, 10, start=offset)
            with httpx.Client(base_url=server.url, timeout=10, headers=headers) as c:
                while not stop.is_set():
                    try:
                        r = c.post("/v1/artwork", json=body)
                    except httpx.HTTPError:
                        continue
                    if r.status_code == 200:
                        with lock:
                            mine.extend(d["event_id"] for d in r.json()["decisions"])

        def post_rewards(server: Server = server, stop: threading.Event = stop, mine: list[str] = mine,
                         rewards: list[str] = rewards) -> None:
            sent = 0
            with httpx.Client(base_url=server.url, timeout=10, headers=headers) as c:
                while not stop.is_set():
                    with lock:
                        todo = mine[sent:sent + 5]
                    if not todo:
                        time.sleep(0.01)
                        continue
                    for eid in todo:
                        sent += 1
                        try:
                            r = c.post("/v1/reward", json={"event_id": eid, "reward": 1, "minutes": 20.0})
                        except httpx.HTTPError:
                            continue
                        if r.status_code == 200:
                            rewards.append(eid)

        threads = [threading.Thread(target=pages, args=(3 * i,)) for i in range(3)] + [threading.Thread(target=post_rewards)]
        for t in threads:
            t.start()
        time.sleep(1.5 + k)
        server.kill9()  # while requests are in flight
        stop.set()
        for t in threads:
            t.join()
        acked_pages |= set(mine)
        acked_rewards |= set(rewards)
        per_round.append({"killed_after_s": 1.5 + k, "acked_decisions": len(mine), "acked_rewards": len(rewards)})
    # a restart cuts the torn tails and must start cleanly on the logs the kills left
    restarted = Server(env, ["--bundle", str(bundle_dir)])
    restarted.stop()
    logged_pages, bad_pages, _ = log_event_ids(lake / "raw" / "impressions")
    logged_rewards, bad_rewards, _ = log_event_ids(lake / "raw" / "rewards")
    lost_pages = len(acked_pages - logged_pages)
    lost_rewards = len(acked_rewards - logged_rewards)
    return {"probe": "kill9", "tried": rounds, "failures": lost_pages + lost_rewards,
            "detail": {"rounds": per_round, "acked_decisions": len(acked_pages), "logged_decisions_found": len(acked_pages & logged_pages),
                       "lost_decisions": lost_pages, "acked_rewards": len(acked_rewards),
                       "lost_rewards": lost_rewards,
                       "torn_lines_left_by_kills": bad_pages + bad_rewards}}


# --- disk full -------------------------------------------------------------------------

def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        return False
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                       capture_output=True, text=True)
    return r.returncode == 0


def probe_disk_full(home: Path, bundle_dir: Path, world: Any, env: dict[str, str], api_key: str) -> dict[str, Any]:
    mount = home / "small-disk"
    tmpfs = _mount_tmpfs(mount, "16m")
    log_dir = mount / "impressions"
    log_dir.mkdir(parents=True, exist_ok=True)
    server = None
    try:
        run_env = dict(env, KEYART_SERVE_LOG_DIR=str(log_dir))
        server = Server(run_env, ["--bundle", str(bundle_dir)])
        headers = {"X-API-Key": api_key}
        ballast = mount / "ballast"
        if tmpfs:  # fill the file system to its last ~300 KiB
            free = shutil.disk_usage(mount).free
            with open(ballast, "wb") as f:
                f.write(b"\0" * max(0, free - (300 << 10)))
            method = "tmpfs 16 MiB filled with a ballast file (ENOSPC)"
        else:
            size = sum(p.stat().st_size for p in log_dir.rglob("*.jsonl"))
            resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE, (size + (300 << 10), resource.RLIM_INFINITY))
            method = "RLIMIT_FSIZE on the server process (EFBIG past 300 KiB more), tmpfs could not be mounted"
        acked: set[str] = set()
        statuses: dict[int, int] = {}
        ready_while_failing = []
        body = page_body(world, 10)
        with httpx.Client(base_url=server.url, timeout=30, headers=headers) as c:
            failed = 0
            for _ in range(400):
                r = c.post("/v1/artwork", json=body)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if r.status_code == 200:
                    acked.update(d["event_id"] for d in r.json()["decisions"])
                else:
                    failed += 1
                    ready_while_failing.append(c.get("/readyz").status_code)
                    if failed >= 10:
                        break
            if tmpfs:
                ballast.unlink()
            else:
                resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
            deadline = time.monotonic() + 30
            while c.get("/readyz").status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.2)
            recovered_ready = c.get("/readyz").status_code
            after = [c.post("/v1/artwork", json=body) for _ in range(20)]
            for r in after:
                if r.status_code == 200:
                    acked.update(d["event_id"] for d in r.json()["decisions"])
        server.stop()
        logged, bad_lines, lines = log_event_ids(log_dir)
        lost = len(acked - logged)
        unacked_logged = len(logged - acked)
        failures = lost + bad_lines + sum(s == 200 for s in ready_while_failing) + int(recovered_ready != 200) \
            + int(any(r.status_code != 200 for r in after)) + int(failed == 0)
        return {"probe": "disk_full", "tried": sum(statuses.values()) + len(after), "failures": failures,
                "detail": {"method": method, "statuses_while_filling": statuses, "writes_failed": failed,
                           "readiness_while_failing": ready_while_failing, "readiness_after_space_back": recovered_ready,
                           "pages_after_recovery_ok": sum(r.status_code == 200 for r in after),
                           "acked_decisions": len(acked), "lost_decisions": lost,
                           "logged_but_not_acked": unacked_logged, "lines": lines, "lines_failing_checksum": bad_lines}}
    finally:
        if server is not None:
            server.stop()
        if tmpfs:
            subprocess.run(["umount", str(mount)], capture_output=True)


def probe_unwritable_log(home: Path, bundle_dir: Path, world: Any, env: dict[str, str], api_key: str) -> dict[str, Any]:
    log_dir = home / "unwritable" / "impressions"
    log_dir.parent.mkdir(parents=True, exist_ok=True)
    log_dir.write_text("a file where the log directory should be")
    server = Server(dict(env, KEYART_SERVE_LOG_DIR=str(log_dir)), ["--bundle", str(bundle_dir)], ready_status=(503,))
    failures = []
    tried = 0
    try:
        with httpx.Client(base_url=server.url, timeout=30, headers={"X-API-Key": api_key}) as c:
            for _ in range(5):
                tried += 1
                ready, decided = c.get("/readyz"), c.post("/v1/artwork", json=page_body(world, 3))
                if ready.status_code != 503 or decided.status_code != 503:
                    failures.append(f"broken log: readyz {ready.status_code}, decision {decided.status_code}")
            detail_broken = c.get("/readyz").json()["detail"]
            log_dir.unlink()
            deadline = time.monotonic() + 30
            while c.get("/readyz").status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.2)
            tried += 1
            recovered = c.get("/readyz").status_code
            decided = c.post("/v1/artwork", json=page_body(world, 3))
            if recovered != 200 or decided.status_code != 200:
                failures.append(f"repaired log: readyz {recovered}, decision {decided.status_code}")
    finally:
        server.stop()
    return {"probe": "unwritable_log", "tried": tried, "failures": len(failures),
            "detail": {"readiness_detail_while_broken": detail_broken, "failures": failures}}


# --- bundles ---------------------------------------------------------------------------

def probe_bundles(home: Path, bundle_dir: Path, world: Any) -> dict[str, Any]:
    from keyart import bundle as kb
    from keyart.bench import synthetic
    from keyart.config import Settings
    from keyart.serving.bundle_store import BundleStore

    root = home / "bundles"
    root.mkdir()
    link = root / "current"
    os.symlink(bundle_dir, link)
    events: list[tuple[str, dict[str, Any]]] = []
    store = BundleStore(Settings(), str(link), on_event=lambda e, f: events.append((e, f)))
    store.poll_once()
    first = store.current.version if store.current else None
    foreign = kb.generate_key(root / "foreign" / "key.pem")

    def make(name: str) -> Path:
        path = root / name
        synthetic.write_bundle(path, seed=1, version=name, n_titles=20, per_title=4, n_members=50, n_trees=20)
        return path

    def edit_manifest(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
        m = json.loads((path / kb.MANIFEST).read_text())
        change(m)
        (path / kb.MANIFEST).write_text(json.dumps(m))

    def corrupt(p: Path) -> None:
        (p / kb.MEMBERS_FILE).write_bytes(b"garbage")

    def truncated(p: Path) -> None:
        data = (p / kb.MODEL_FILE).read_bytes()
        (p / kb.MODEL_FILE).write_bytes(data[: len(data) // 2])

    def unsigned(p: Path) -> None:
        (p / kb.SIGNATURE_FILE).unlink()

    def tampered(p: Path) -> None:  # another model, its checksum updated, the signature left as it was
        shutil.copy(bundle_dir / kb.MODEL_FILE, p / kb.MODEL_FILE)
        edit_manifest(p, lambda m: m["files"].__setitem__(kb.MODEL_FILE, kb.sha256(p / kb.MODEL_FILE)))

    def foreign_key(p: Path) -> None:
        kb.sign(p, key=foreign)

    def wrong_spec(p: Path) -> None:  # signed by the daily run's key, built for another feature spec
        edit_manifest(p, lambda m: m.__setitem__("feature_spec_version", "999"))
        kb.sign(p)

    def manifest_not_json(p: Path) -> None:
        (p / kb.MANIFEST).write_text("{not json")

    def missing_folder(p: Path) -> None:
        shutil.rmtree(p)

    cases = {"corrupt": corrupt, "truncated": truncated, "unsigned": unsigned, "tampered": tampered,
             "foreign_key": foreign_key, "wrong_spec": wrong_spec, "manifest_not_json": manifest_not_json,
             "missing_folder": missing_folder}
    results = {}
    failures = 0
    for name, damage in cases.items():
        path = make(f"bad-{name}")
        damage(path)
        os.symlink(path, root / "next")
        os.replace(root / "next", link)
        before = len(events)
        swapped = store.poll_once()
        refusals = [f.get("reason") for e, f in events[before:] if e == "bundle_refused"]
        ok = not swapped and store.current is not None and store.current.version == first and len(refusals) == 1
        failures += not ok
        results[name] = {"refused": refusals[0] if refusals else None, "still_serving": store.current.version
                         if store.current else None}
    good = make("good-v2")
    os.symlink(good, root / "next")
    os.replace(root / "next", link)
    swapped = store.poll_once()
    failures += not (swapped and store.current.version == "good-v2")
    return {"probe": "bundles", "tried": len(cases) + 1, "failures": failures,
            "detail": {"first": first, "cases": results, "good_after": store.current.version if store.current else None}}


# --- registry outage -------------------------------------------------------------------

class MlflowServer:
    def __init__(self, home: Path, port: int):
        self.home, self.port = home, port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 180) -> None:
        mlflow = Path(sys.executable).with_name("mlflow")
        self.proc = subprocess.Popen(
            [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{self.home / 'mlflow.db'}",
             "--artifacts-destination", (self.home / "artifacts").as_uri(), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1", "--allowed-hosts", f"127.0.0.1:{self.port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.3)
        raise RuntimeError("mlflow server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


def probe_registry(home: Path, bundle_dir: Path, world: Any) -> dict[str, Any]:
    from mlflow import MlflowClient

    from keyart.bench import synthetic
    from keyart.config import Settings
    from keyart.net import free_port
    from keyart.serving.bundle_store import BundleStore

    # fail fast while the server is down (MLflow retries a refused connection for minutes by default)
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "10"
    mhome = home / "mlflow-server"
    mhome.mkdir()
    server = MlflowServer(mhome, free_port())
    server.start()
    try:
        s = Settings(mlflow_tracking_uri=server.url, mlflow_artifact_root="mlflow-artifacts:/keyart")
        client = MlflowClient(tracking_uri=server.url, registry_uri=server.url)
        exp = client.create_experiment(s.mlflow_experiment, artifact_location=s.artifact_root)
        client.create_registered_model(s.registered_model)

        def register(path: Path) -> str:
            run = client.create_run(exp)
            client.log_artifacts(run.info.run_id, str(path), artifact_path="bundle")
            client.set_terminated(run.info.run_id)
            mv = client.create_model_version(s.registered_model, source=f"runs:/{run.info.run_id}/bundle",
                                             run_id=run.info.run_id)
            client.set_registered_model_alias(s.registered_model, "champion", mv.version)
            return str(mv.version)

        events: list[tuple[str, dict[str, Any]]] = []
        store = BundleStore(s, on_event=lambda e, f: events.append((e, f)))
        store.retry_base_s = 0.2
        register(bundle_dir)
        store.poll_once()
        v1 = store.current.registry_version if store.current else None
        v2_dir = home / "registry-v2"
        synthetic.write_bundle(v2_dir, seed=2, version="registry-v2", n_titles=20, per_title=4, n_members=50, n_trees=20)
        register(v2_dir)
        steps = []
        # 1. the artifact store is gone while the registry answers: the new champion is retried, not refused
        artifacts = mhome / "artifacts"
        artifacts.rename(mhome / "artifacts-away")
        for _ in range(3):
            store.poll_once()
            time.sleep(0.25)
        steps.append({"step": "artifact store down", "serving": store.current.registry_version if store.current else None,
                      "fetch_failures": sum(e == "bundle_fetch_failed" for e, _ in events), "refused": len(store.bad)})
        # 2. the whole registry is down
        server.stop()
        for _ in range(3):
            store.poll_once()
            time.sleep(0.25)
        steps.append({"step": "registry down", "serving": store.current.registry_version if store.current else None,
                      "resolve_failures": sum(e == "bundle_resolve_failed" for e, _ in events), "refused": len(store.bad)})
        # 3. both come back: the waiting champion is loaded
        (mhome / "artifacts-away").rename(artifacts)
        server.start()
        deadline = time.monotonic() + 30
        while (store.current is None or store.current.registry_version != "2") and time.monotonic() < deadline:
            store.poll_once()
            time.sleep(0.2)
        steps.append({"step": "recovered", "serving": store.current.registry_version if store.current else None})
        failures = int(v1 != "1") + sum(st["serving"] != "1" for st in steps[:2]) + int(steps[2]["serving"] != "2") \
            + sum(st.get("refused", 0) for st in steps) + int(steps[0]["fetch_failures"] == 0) \
            + int(steps[1]["resolve_failures"] == 0)
        return {"probe": "registry", "tried": len(steps), "failures": failures, "detail": {"steps": steps}}
    finally:
        server.stop()


# --- ingest ----------------------------------------------------------------------------

def ingest_corpus() -> tuple[list[str], set[str], set[str]]:
    """(raw lines, event ids that must come out clean, event ids that must not)."""
    from keyart.serving.event_log import frame

    def imp(eid: str, **change: Any) -> dict[str, Any]:
        row = {"event_id": eid, "ts": "2026-03-02T10:00:00.000Z", "member_id": "m000001", "title_id": "t0001",
               "artwork_id": "t0001-a0", "candidates": ["t0001-a0", "t0001-a1"], "propensity": 0.5,
               "candidate_probabilities": [0.5, 0.5], "model_version": "v1", "policy": "random",
               "context": {"device": "tv", "country": "US", "local_hour": 20, "day_of_week": 2, "page_row": 0,
                           "position": 1}}
        row.update(change)
        return row

    def framed(row: dict[str, Any]) -> str:
        return frame(orjson.dumps(row)).decode()

    good = [imp(f"good-{i}") for i in range(20)]
    lines = [framed(r) for r in good]
    lines += [framed(good[0]), framed(good[1])]  # exact duplicates (a retried ship)
    bad_rows = {
        "bad-num-member": {"member_id": 123}, "bad-newline-member": {"member_id": "m000501\n"},
        "bad-prop-high": {"propensity": 1.5}, "bad-prop-str": {"propensity": "high"},
        "bad-prop-nan": {"propensity": float("nan")}, "bad-device": {"context": {**imp("x")["context"], "device": "fridge"}},
        "bad-hour": {"context": {**imp("x")["context"], "local_hour": 24}}, "bad-cands-empty": {"candidates": []},
        "bad-cand-id": {"candidates": ["ok", "no way"]}, "bad-ts": {"ts": "yesterday"},
        "bad-ts-day": {"ts": "2026-03-03T00:00:00.000Z"}, "bad-probs-sum": {"candidate_probabilities": [0.9, 0.9]},
        "bad-probs-len": {"candidate_probabilities": [1.0]}, "bad-shown-not-candidate": {"artwork_id": "t0002-a0"},
        "bad-too-many": {"candidates": [f"t0001-a{i}" for i in range(400_001)],
                         "candidate_probabilities": None},
        "bad-path-member": {"member_id": "../../etc/passwd"}, "bad-title-null": {"title_id": None},
    }
    for eid, change in bad_rows.items():
        row = imp(eid, **change)
        if row.get("candidate_probabilities") is None:
            row.pop("candidate_probabilities", None)
        payload = json.dumps(row, separators=(",", ":")).encode()  # NaN as Python's json writes it
        lines.append(frame(payload).decode())
    # a conflicting duplicate: the same event id with another artwork and propensity
    lines.append(framed(imp("good-2", artwork_id="t0001-a1", propensity=0.25, candidate_probabilities=[0.75, 0.25])))
    # damaged lines: a checksum that does not match, a torn tail, garbage, a glued line
    ok = framed(imp("bad-crc"))
    lines.append(ok.replace('"m000001"', '"m000002"'))
    lines.append(framed(imp("bad-torn"))[:60])
    lines += ["not json at all {", "[1, 2]", framed(imp("bad-glued-a"))[:-10] + framed(imp("bad-glued-b"))]
    must_clean = {r["event_id"] for r in good} - {"good-2"}  # good-2 has a conflicting duplicate
    must_not = {*bad_rows, "bad-crc", "bad-torn", "bad-glued-a", "bad-glued-b"}
    return lines, must_clean, must_not


def probe_ingest(home: Path) -> dict[str, Any]:
    from keyart.contracts import IMPRESSIONS
    from keyart.jobs import ingest
    from keyart.jobs.common import get_spark

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    spark = get_spark("keyart-bench-faults", master="local[1]", shuffle_partitions=1, ui=False)
    try:
        lines, must_clean, must_not = ingest_corpus()
        raw = spark.createDataFrame([("2026-03-02", "corpus.jsonl", x) for x in lines], ingest.RAW_SCHEMA)
        result = ingest.transform(raw, IMPRESSIONS)
        clean = {r["event_id"] for r in result.clean.select("event_id").collect()}
        counts = result.counts.first().asDict()
        reasons: dict[str, int] = {}
        for r in result.quarantine.select("reason").collect():
            key = str(r["reason"]).split(",")[0][:60]
            reasons[key] = reasons.get(key, 0) + 1
    finally:
        spark.stop()
    bad_clean = sorted(clean & must_not)
    lost = sorted(must_clean - clean)
    balanced = counts["read"] == counts["clean"] + counts["quarantined"] + counts["duplicates"]
    return {"probe": "ingest", "tried": len(lines), "failures": len(bad_clean) + len(lost) + int(not balanced)
            + int(counts["read"] != len(lines)),
            "detail": {"read": counts["read"], "clean": counts["clean"], "quarantined": counts["quarantined"],
                       "duplicates": counts["duplicates"], "balanced": balanced, "bad_rows_counted_clean": bad_clean,
                       "good_rows_lost": lost, "reasons": reasons}}


# --- driver ----------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the full results as JSON")
    parser.add_argument("--only", nargs="+", choices=PROBES, help="run only these probes")
    parser.add_argument("--keep", action="store_true", help="keep the temporary home (printed)")


def table(results: list[dict[str, Any]]) -> str:
    lines = [f"{'probe':<16}{'tried':>8}{'failures':>10}", "-" * 34]
    for r in results:
        lines.append(f"{r['probe']:<16}{r['tried']:>8}{r['failures']:>10}" + (f"   {r['error']}" if "error" in r else ""))
    lines.append("-" * 34)
    lines.append(f"{'total':<16}{sum(r['tried'] for r in results):>8}{sum(r['failures'] for r in results):>10}")
    return "\n".join(lines)


def summary(results: list[dict[str, Any]]) -> list[str]:
    by = {r["probe"]: r.get("detail", {}) for r in results}
    out = []
    if "bad_input" in by and by["bad_input"]:
        d = by["bad_input"]
        out.append(f"bad_input: {d['cases']} bad requests -> {d['status_classes']}, 5xx counted by the server "
                   f"{d['server_5xx_counted']:g}, forged rewards accepted {d['forged_accepted']}, chunked 50 MiB -> "
                   f"{d['chunked_50MiB']['status']} after {d['chunked_50MiB']['bytes_sent']} bytes, 300k-title page -> "
                   f"{d['chunked_300k_titles']['status']} in {d['chunked_300k_titles']['seconds']} s")
    if "kill9" in by and by["kill9"]:
        d = by["kill9"]
        out.append(f"kill9: {len(d['rounds'])} kills; acknowledged decisions {d['acked_decisions']}, lost "
                   f"{d['lost_decisions']}; acknowledged rewards {d['acked_rewards']}, lost {d['lost_rewards']}")
    if "disk_full" in by and by["disk_full"]:
        d = by["disk_full"]
        out.append(f"disk_full ({d['method']}): {d['statuses_while_filling']}; readiness while failing "
                   f"{sorted(set(d['readiness_while_failing']))}, after {d['readiness_after_space_back']}; acknowledged "
                   f"{d['acked_decisions']}, lost {d['lost_decisions']}, lines failing checksum {d['lines_failing_checksum']}")
    if "ingest" in by and by["ingest"]:
        d = by["ingest"]
        out.append(f"ingest: read {d['read']} = clean {d['clean']} + quarantined {d['quarantined']} + duplicates "
                   f"{d['duplicates']} ({'balanced' if d['balanced'] else 'NOT balanced'}); bad rows counted clean "
                   f"{len(d['bad_rows_counted_clean'])}")
    return out


def run(args: argparse.Namespace) -> int:
    from keyart import config

    home = Path(tempfile.mkdtemp(prefix="keyart-bench-faults-"))
    os.environ["KEYART_HOME"] = str(home)
    for k in [k for k in os.environ if k.startswith("KEYART_SERVE_")]:
        os.environ.pop(k)
    config.settings.cache_clear()
    from keyart.bench import synthetic

    api_key = secrets.token_urlsafe(32)
    env = dict(os.environ, KEYART_HOME=str(home), KEYART_LAKE_ROOT=str(home / "lake"),
               KEYART_SERVE_EVENT_SECRET=secrets.token_hex(32), KEYART_SERVE_API_KEYS=api_key,
               KEYART_SERVE_POLL_SECONDS="0.5")
    bundle_dir = home / "bundle-v1"
    world = synthetic.write_bundle(bundle_dir, seed=0, version="faults-v1", n_titles=60, per_title=8,
                                   n_members=300, n_trees=50)
    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "bad_input": lambda: probe_bad_input(home, bundle_dir, world, env, api_key),
        "kill9": lambda: probe_kill9(home, bundle_dir, world, env, api_key),
        "disk_full": lambda: probe_disk_full(home, bundle_dir, world, env, api_key),
        "unwritable_log": lambda: probe_unwritable_log(home, bundle_dir, world, env, api_key),
        "bundles": lambda: probe_bundles(home, bundle_dir, world),
        "registry": lambda: probe_registry(home, bundle_dir, world),
        "ingest": lambda: probe_ingest(home),
    }
    results = []
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    try:
        for name in args.only or PROBES:
            t0 = time.perf_counter()
            try:
                with contextlib.redirect_stdout(sys.stderr):  # MLflow and Spark print; stdout is the report
                    r = runners[name]()
            except Exception as exc:  # a probe that cannot run is a failure, reported as such
                r = {"probe": name, "tried": 0, "failures": 1, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            r["seconds"] = round(time.perf_counter() - t0, 1)
            results.append(r)
            print(f"  {name}: tried {r['tried']}, failures {r['failures']} ({r['seconds']} s)", file=sys.stderr)
    finally:
        if not args.keep:
            shutil.rmtree(home, ignore_errors=True)
    report = {"started": started, "load_average": os.getloadavg(), "cpus": os.cpu_count(), "probes": results,
              "total_failures": sum(r["failures"] for r in results)}
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(table(results))
        for line in summary(results):
            print(line)
        if args.keep:
            print(f"home kept: {home}")
    return 0 if report["total_failures"] == 0 else 1
