"""The endpoint under hostile input and failing disks: no 5xx on bad JSON (and keep-alive
survives), the streaming body limit, log write failures, the event-secret and API-key
checks, readiness that includes the logs, idempotent retries."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import orjson
import pytest
import uvicorn
from fastapi.testclient import TestClient
from serving_fixtures import REPO, log_rows, page

from keyart.config import Settings
from keyart.net import free_port
from keyart.serving.app import (
    MAX_BODY_BYTES,
    Idempotency,
    IdempotencyConflict,
    StartupRefused,
    create_app,
)
from keyart.serving.metrics import Guard, GuardMiddleware

SECRET = "hardening-tests-event-secret-" + "0" * 40
KEY_A = "key-a-" + "a" * 30
KEY_B = "key-b-" + "b" * 30


def make_app(uri, **overrides):
    overrides.setdefault("serve_event_secret", SECRET)
    return create_app(Settings(**overrides), model_uri=str(uri) if uri else None, poll=False)


def client(uri, **overrides) -> TestClient:
    return TestClient(make_app(uri, **overrides))




# --- 1. bad JSON: a 4xx that says what is wrong, never a 5xx -----------------------------

def _bad_bodies(world) -> list[tuple[str, str, bytes]]:
    good = orjson.dumps(page(world, 2)).decode()
    reward = '{"event_id":"1.abc.def.a.AAAAAAAAAAAAAAAAAAAAAA.t0001-a0","reward":1,"minutes":3.5}'
    out = []
    for token in ("NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1" * 400):
        out += [
            ("/v1/artwork", f"local_hour {token}", good.replace('"local_hour":20', f'"local_hour":{token}').encode()),
            ("/v1/artwork", f"page_row {token}", good.replace('"page_row":0', f'"page_row":{token}', 1).encode()),
            ("/v1/artwork", f"ignored key {token}", good.replace('"day_of_week":5', f'"day_of_week":5,"x":{token}').encode()),
            ("/v1/reward", f"minutes {token}", reward.replace("3.5", token).encode()),
            ("/v1/reward", f"reward {token}", reward.replace('"reward":1', f'"reward":{token}').encode()),
        ]
    for where, text in (("member_id", '"member_id":"'), ("title_id", '"title_id":"'), ("country", '"country":"')):
        out.append(("/v1/artwork", f"lone surrogate in {where}", good.replace(text, text + "\\ud800", 1).encode()))
    out += [
        ("/v1/artwork", "low surrogate alone", good.replace('"device":"tv"', '"device":"\\udc00"').encode()),
        ("/v1/artwork", "raw surrogate bytes", good.replace('"country":"US"', '"country":"\xed\xa0\x80"').encode("latin-1")),
        ("/v1/artwork", "invalid utf-8", b'{"member_id":"\xff\xfe"}'),
        ("/v1/artwork", "truncated", good[:40].encode()),
        ("/v1/artwork", "not json", b"{not json"),
        ("/v1/artwork", "json array", b"[1,2]"),
        ("/v1/artwork", "json null", b"null"),
        ("/v1/artwork", "empty object", b"{}"),
        ("/v1/artwork", "deep nesting", b"[" * 5000 + b"]" * 5000),
        ("/v1/artwork", "trailing newline id", good.replace('"member_id":"m000', '"member_id":"\\nm000').encode()),
        ("/v1/reward", "lone surrogate event id", reward.replace('"event_id":"', '"event_id":"\\ud800').encode()),
        ("/v1/reward", "surrogate pair event id", reward.replace('"event_id":"', '"event_id":"\\ud83d\\ude00').encode()),
        ("/v1/reward", "event id with newline", reward.replace('t0001-a0"', 't0001-a0\\n"').encode()),
        ("/v1/reward", "reward string", reward.replace('"reward":1', '"reward":"1x"').encode()),
    ]
    return out


def test_bad_json_gets_a_4xx_that_always_encodes(bundle_dir):
    path, world = bundle_dir
    cases = _bad_bodies(world)
    with client(path) as c:
        answers = [(name, c.post(route, content=body, headers={"content-type": "application/json"}))
                   for route, name, body in cases]
        text_plain = c.post("/v1/artwork", content=b"\xff\xfe{", headers={"content-type": "text/plain"})
        ok = c.post("/v1/artwork", json=page(world, 2))
        metrics = c.get("/metrics").text
    for name, r in answers + [("text/plain body", text_plain)]:
        assert r.status_code in (400, 422), (name, r.status_code, r.text)
        body = r.json()  # it encodes and decodes
        assert isinstance(body["detail"], str) and body["detail"], name
    by_name = dict(answers)
    assert "not valid JSON" in by_name["local_hour NaN"].json()["detail"]
    assert "infinity" in by_name["minutes 1e400"].json()["detail"]
    assert "surrogate" in by_name["lone surrogate in member_id"].json()["detail"]
    assert "member_id" in by_name["trailing newline id"].json()["detail"]
    assert ok.status_code == 200
    assert 'status="500"' not in metrics


class UvicornThread:
    """The app under a real uvicorn server (httptools, uvloop) in this process."""

    def __init__(self, app):
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, loop="uvloop",
                                                    http="httptools", lifespan="on", log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> UvicornThread:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def _http(sock: socket.socket, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
    head = [f"{method} {path} HTTP/1.1", "host: 127.0.0.1", "content-type: application/json",
            f"content-length: {len(body)}"] + [f"{k}: {v}" for k, v in (headers or {}).items()]
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body)


def _response(sock: socket.socket, buf: bytearray) -> tuple[int, dict[str, str], bytes]:
    """Read one response (with Content-Length) from ``sock``; ``buf`` keeps what follows."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (x.split(":", 1) for x in lines[1:])}
    n = int(headers.get("content-length", "0"))
    while len(rest) < n:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed")
        rest += chunk
    buf[:] = rest[n:]
    return status, headers, rest[:n]


def test_keep_alive_connection_survives_bad_json_on_a_real_server(bundle_dir):
    path, world = bundle_dir
    cases = _bad_bodies(world)
    good = orjson.dumps(page(world, 2))
    with UvicornThread(make_app(path)) as srv, socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        buf = bytearray()
        statuses = []
        for route, _, body in cases:
            _http(sock, "POST", route, body)
            status, _, answer = _response(sock, buf)
            orjson.loads(answer)
            statuses.append(status)
            _http(sock, "POST", "/v1/artwork", good)  # the same connection keeps working
            status, headers, answer = _response(sock, buf)
            assert status == 200 and headers.get("connection") != "close", answer
    assert set(statuses) <= {400, 422}, statuses


# --- 2. the body limit holds for chunked bodies ------------------------------------------

async def _guarded(chunks, headers=()):
    """Run the guard over a stream of body chunks; how much it read and what it answered."""
    consumed = {"bytes": 0, "calls": 0}
    sent: list[dict] = []
    reached = {"app": False}

    async def receive():
        consumed["calls"] += 1
        try:
            chunk = next(chunks)
        except StopIteration:
            return {"type": "http.request", "body": b"", "more_body": False}
        consumed["bytes"] += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message):
        sent.append(message)

    async def app(scope, receive, send):
        reached["app"] = True

    scope = {"type": "http", "method": "POST", "path": "/v1/artwork", "headers": list(headers)}
    await GuardMiddleware(app, Guard(MAX_BODY_BYTES))(scope, receive, send)
    return consumed, sent, reached["app"]


def test_chunked_body_over_the_limit_stops_reading_and_gets_413():
    chunk = b"x" * 65536
    endless = (chunk for _ in range(800))  # 50 MiB, no Content-Length
    consumed, sent, reached = asyncio.run(_guarded(endless))
    assert not reached
    assert sent[0]["status"] == 413 and (b"connection", b"close") in sent[0]["headers"]
    assert MAX_BODY_BYTES < consumed["bytes"] <= MAX_BODY_BYTES + len(chunk)
    assert b"larger than" in sent[1]["body"]


def test_content_length_over_the_limit_gets_413_before_reading():
    consumed, sent, reached = asyncio.run(_guarded(iter([b"x"]), headers=[(b"content-length", b"52428800")]))
    assert consumed["calls"] == 0 and not reached and sent[0]["status"] == 413


def test_body_under_the_limit_reaches_the_app_whole():
    consumed, sent, reached = asyncio.run(_guarded(iter([b"x" * 1000] * 10)))
    assert reached and not sent and consumed["bytes"] == 10_000


def test_chunked_bodies_on_a_real_server(bundle_dir):
    path, world = bundle_dir
    good = orjson.dumps(page(world, 2))
    with UvicornThread(make_app(path)) as srv:
        url = f"http://127.0.0.1:{srv.port}"

        def halves():
            yield good[:20]
            yield good[20:]

        assert httpx.post(url + "/v1/artwork", content=halves(), headers={"content-type": "application/json"}).status_code == 200
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
            sock.sendall(b"POST /v1/artwork HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                         b"transfer-encoding: chunked\r\n\r\n")
            chunk = b"[" * 65536
            start = time.perf_counter()
            sent = 0
            try:
                for _ in range(800):  # 50 MiB if the server kept reading
                    sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                    sent += len(chunk)
            except OSError:  # the server answered and closed the connection
                pass
            try:
                status, headers, body = _response(sock, bytearray())
                assert status == 413 and headers.get("connection") == "close", body
            except ConnectionError:  # the reset of the close may overtake the answer on the client
                pass
            assert time.perf_counter() - start < 10
        assert sent < 50 * MAX_BODY_BYTES  # the server stopped reading
        assert httpx.post(url + "/v1/artwork", content=good, headers={"content-type": "application/json"}).status_code == 200
        assert 'keyart_rejections_total{reason="413",route="/v1/artwork"} 1.0' in httpx.get(url + "/metrics").text


# --- 3. a failed log write is not acknowledged and leaves whole lines --------------------

def test_disk_full_mid_write_gets_503_and_the_log_stays_whole(bundle_dir, _isolated_home, monkeypatch):
    path, world = bundle_dir
    real = os.write
    state = {"armed": False, "short": False}
    with client(path) as c:
        log = c.app.state.runtime.impressions

        def disk_full(fd, data):
            if state["armed"] and fd in {f[0] for f in log._files.values()}:
                if not state["short"]:
                    state["short"] = True
                    return real(fd, bytes(data[: len(data) // 2]))
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(fd, data)

        monkeypatch.setattr(os, "write", disk_full)
        first = c.post("/v1/artwork", json=page(world, 3))
        state["armed"] = True
        failed = c.post("/v1/artwork", json=page(world, 3))
        ready = c.get("/readyz")
        state["armed"] = False
        after = c.post("/v1/artwork", json=page(world, 3))
    assert first.status_code == 200 and after.status_code == 200
    assert failed.status_code == 503 and "not made" in failed.json()["detail"]
    assert ready.status_code == 503 and "No space" in ready.json()["detail"]
    acked = {d["event_id"] for r in (first, after) for d in r.json()["decisions"]}
    logged = [row["event_id"] for row in log_rows(_isolated_home / "lake" / "raw" / "impressions")]
    assert sorted(logged) == sorted(acked)  # every acknowledged decision, nothing else, no glued line


# --- 4. the event secret -----------------------------------------------------------------

@pytest.mark.parametrize("secret,dev,ok", [
    (None, False, False),                 # the built-in default
    ("s" * 31, False, False),             # too short
    ("s" * 32, False, True),
    (None, True, True),                   # explicit development mode
    ("dev-short", True, True),
])
def test_event_secret_must_be_real_outside_dev_mode(secret, dev, ok):
    overrides = {"serve_dev_mode": dev}
    if secret is not None:
        overrides["serve_event_secret"] = secret
    app = create_app(Settings(**overrides), poll=False)
    if ok:
        with TestClient(app) as c:
            assert c.get("/healthz").status_code == 200
    else:
        with pytest.raises(StartupRefused, match="KEYART_SERVE_EVENT_SECRET") as exc, TestClient(app):
            pass
        assert "KEYART_SERVE_DEV_MODE" in str(exc.value)


def test_keyart_serve_refuses_the_default_secret(_isolated_home):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYART_SERVE_")}
    env["KEYART_HOME"] = str(_isolated_home)
    proc = subprocess.run([sys.executable, "-m", "keyart.cli", "serve", "--port", str(free_port())], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "serve_event_secret is the built-in default" in proc.stderr and "token_hex(32)" in proc.stderr


def test_max_artworks_beyond_the_contract_is_refused():
    with pytest.raises(StartupRefused, match="MAX_CANDIDATES"), TestClient(make_app(None, serve_max_artworks=5000)):
        pass


# --- 5. API keys -------------------------------------------------------------------------

def test_api_keys_guard_both_endpoints_and_leave_probes_open(bundle_dir, tmp_path):
    path, world = bundle_dir
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# rotated 2026-12\n{KEY_B}\n\n")
    with client(path, serve_api_keys=f"{KEY_A}, ", serve_api_keys_file=keys_file) as c:
        body = page(world, 2)
        refused = {
            "none": c.post("/v1/artwork", json=body),
            "wrong": c.post("/v1/artwork", json=body, headers={"Authorization": "Bearer " + KEY_A[:-1] + "x"}),
            "prefix": c.post("/v1/artwork", json=body, headers={"X-API-Key": KEY_A[:-1]}),
            "non-ascii": c.post("/v1/artwork", json=body, headers=[(b"x-api-key", b"\xff" * 36)]),
            "basic": c.post("/v1/artwork", json=body, headers={"Authorization": "Basic " + KEY_A}),
            "reward": c.post("/v1/reward", json={"event_id": "x", "reward": 1}),
        }
        bearer = c.post("/v1/artwork", json=body, headers={"Authorization": "Bearer " + KEY_A})
        header = c.post("/v1/artwork", json=body, headers={"X-API-Key": KEY_B})
        eid = bearer.json()["decisions"][0]["event_id"]
        reward = c.post("/v1/reward", json={"event_id": eid, "reward": 1}, headers={"X-API-Key": KEY_B})
        open_ = [c.get(p).status_code for p in ("/healthz", "/readyz", "/metrics", "/openapi.json")]
        metrics = c.get("/metrics").text
    for name, r in refused.items():
        assert r.status_code == 401, name
        assert "Authorization: Bearer" in r.json()["detail"] and r.headers["www-authenticate"].startswith("Bearer")
    assert bearer.status_code == 200 and header.status_code == 200 and reward.status_code == 200
    assert open_ == [200, 200, 200, 200]
    assert 'keyart_rejections_total{reason="401",route="/v1/artwork"} 5.0' in metrics


@pytest.mark.parametrize("setup,match", [
    ("missing", "cannot be read"),
    ("empty", "holds no key"),
    ("short", "at least 16"),
])
def test_bad_api_key_configuration_refuses_start(tmp_path, setup, match):
    keys_file = tmp_path / "keys"
    overrides: dict = {"serve_api_keys_file": keys_file}
    if setup == "empty":
        keys_file.write_text("# nothing yet\n\n")
    elif setup == "short":
        overrides = {"serve_api_keys": "abc"}
    with pytest.raises(StartupRefused, match=match), TestClient(make_app(None, **overrides)):
        pass


# --- 7. readiness includes the log -------------------------------------------------------

def test_readiness_is_false_while_the_log_directory_is_not_writable(bundle_dir, tmp_path):
    path, world = bundle_dir
    log_dir = tmp_path / "impressions"
    log_dir.write_text("a file where the log directory should be")
    with client(path, serve_log_dir=log_dir) as c:
        ready = c.get("/readyz")
        decided = c.post("/v1/artwork", json=page(world, 2))
        log_dir.unlink()
        c.app.state.runtime.impressions.probe_interval_s = 0
        c.app.state.runtime.impressions.failure_hold_s = 0
        again = c.get("/readyz")
        decided_again = c.post("/v1/artwork", json=page(world, 2))
    assert ready.status_code == 503 and ready.json()["ready"] is False
    assert "impressions log directory" in ready.json()["detail"] and "not writable" in ready.json()["detail"]
    assert ready.json()["model_version"] == "v1"  # the model is fine; the log is not
    assert decided.status_code == 503
    assert again.status_code == 200 and again.json()["ready"] is True and decided_again.status_code == 200


# --- 11. idempotent retries --------------------------------------------------------------

def test_a_retry_with_the_same_request_id_replays_the_decisions(bundle_dir, _isolated_home):
    path, world = bundle_dir
    body = dict(page(world, 3), request_id="req-0001")
    with client(path) as c:
        first = c.post("/v1/artwork", json=body)
        retry = c.post("/v1/artwork", json=body)
        by_header = c.post("/v1/artwork", json=page(world, 3), headers={"Idempotency-Key": "req-0001"})
        other_body = c.post("/v1/artwork", json=dict(page(world, 4), request_id="req-0001"))
        mismatch = c.post("/v1/artwork", json=body, headers={"Idempotency-Key": "req-0002"})
        fresh = c.post("/v1/artwork", json=dict(body, request_id="req-0002"))
        no_key = [c.post("/v1/artwork", json=page(world, 3)) for _ in range(2)]
        shown = first.json()["decisions"][0]["artwork_id"]
        counted = c.app.state.runtime.rewards.priors.counts(shown, "all")
        metrics = c.get("/metrics").text
    assert first.status_code == retry.status_code == by_header.status_code == 200
    assert retry.content == first.content and by_header.content == first.content
    assert retry.headers["idempotent-replayed"] == "true" and "idempotent-replayed" not in first.headers
    assert other_body.status_code == 422 and "different request" in other_body.json()["detail"]
    assert mismatch.status_code == 422 and "differ" in mismatch.json()["detail"]
    ids = lambda r: [d["event_id"] for d in r.json()["decisions"]]  # noqa: E731
    assert fresh.status_code == 200 and set(ids(fresh)).isdisjoint(ids(first))
    assert set(ids(no_key[0])).isdisjoint(ids(no_key[1]))  # without a key every request decides anew
    logged = [r["event_id"] for r in log_rows(_isolated_home / "lake" / "raw" / "impressions")]
    assert len(logged) == len(set(logged)) == 3 * 4  # first, fresh and the two keyless pages; no replay logged
    assert counted[0] >= 1 and "keyart_idempotent_replays_total 2.0" in metrics


def test_concurrent_retries_decide_once(bundle_dir, _isolated_home):
    path, world = bundle_dir
    app = make_app(path)
    body = dict(page(world, 3), request_id="same-request")

    async def main():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://serving") as c:
                return await asyncio.gather(*(c.post("/v1/artwork", json=body) for _ in range(8)))

    answers = asyncio.run(main())
    assert {r.status_code for r in answers} == {200}
    assert len({r.content for r in answers}) == 1
    assert len(log_rows(_isolated_home / "lake" / "raw" / "impressions")) == 3


def test_request_ids_are_per_api_key(bundle_dir):
    path, world = bundle_dir
    body = dict(page(world, 2), request_id="r1")
    with client(path, serve_api_keys=f"{KEY_A},{KEY_B}") as c:
        a = c.post("/v1/artwork", json=body, headers={"X-API-Key": KEY_A})
        b = c.post("/v1/artwork", json=body, headers={"X-API-Key": KEY_B})
    assert a.status_code == b.status_code == 200 and a.content != b.content


def test_idempotency_cache_is_bounded_in_time_and_memory():
    async def main():
        cache = Idempotency(ttl_s=0.2, max_bytes=3000)
        for i in range(20):
            cache.start((None, f"k{i}"), b"fp")
            cache.finish((None, f"k{i}"), 200, b"x" * 500)
        assert cache.bytes <= 3000 and 0 < len(cache) < 20
        assert cache.find((None, "k19"), b"fp") == b"x" * 500  # the newest are kept
        assert cache.find((None, "k0"), b"fp") is None  # the oldest were dropped
        with pytest.raises(IdempotencyConflict):
            cache.find((None, "k19"), b"other")
        cache.start((None, "failed"), b"fp")
        cache.finish((None, "failed"), 503, b"{}")
        assert cache.find((None, "failed"), b"fp") is None  # a failed page is decided again
        await asyncio.sleep(0.25)
        assert cache.find((None, "k19"), b"fp") is None and len(cache) == 0 and cache.bytes == 0

    asyncio.run(main())
