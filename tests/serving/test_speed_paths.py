"""The request path's shortcuts decide exactly what the checked path decides.

* ``Service._resolve_fast`` (whole-array checks) accepts a page only if the per-title pass
  (``_resolve_checked``) accepts it, and then resolves it to the same rows; every refusal
  still comes from the per-title pass, so its message names every problem.
* ``EventSigner.issue_page`` digests and ``Impression.issued`` equal what parsing the ids
  gives (``Impression.of``), so the online priors count the same impressions.
* The stage timers cover every decided page, and only those.
* Each impression-log line, written as one bytes format of JSON pieces, is the bytes
  ``orjson.dumps`` gives for the row's dict (same keys, same order).
* The ASGI fast path of ``POST /v1/artwork`` answers well-formed pages exactly as the
  FastAPI route does, and hands everything else to the route, so every 4xx is the route's.
"""

from __future__ import annotations

import copy
import datetime as dt

import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient
from serving_fixtures import page

from keyart.config import Settings
from keyart.serving import app as serving_app
from keyart.serving.app import create_app
from keyart.serving.bundle_store import BundleStore
from keyart.serving.event_log import frame_lines, unframe
from keyart.serving.metrics import STAGE_PAGES, STAGE_SECONDS, STAGES
from keyart.serving.rewards import SEGMENT_CODES, EventSigner, Impression
from keyart.serving.schemas import ArtworkRequest
from keyart.serving.service import PageRefused, Service

SECRET = "speed-tests-event-secret-" + "0" * 40


@pytest.fixture()
def service(bundle_dir) -> tuple[Service, object]:
    path, world = bundle_dir
    s = Settings(serve_event_secret=SECRET)
    store = BundleStore(s, str(path))
    store.poll_once()
    assert store.current is not None
    return Service(store, EventSigner(SECRET), s, np.random.default_rng(0)), world


def _both(svc: Service, body: dict):
    req = ArtworkRequest.model_validate(body)
    table = svc.store.current.artworks
    day = dt.datetime.now(dt.UTC).date()
    fast = svc._resolve_fast(req, table, day)
    try:
        chunks, title_rows = svc._resolve_checked(req, table, day)
    except PageRefused as exc:
        return fast, exc
    return fast, (np.concatenate(chunks), np.array([len(c) for c in chunks]), title_rows)


@pytest.mark.parametrize("explicit", [True, False])
def test_fast_path_resolves_a_valid_page_as_the_checked_path(service, explicit):
    svc, world = service
    body = page(world, 12, explicit=explicit)
    if explicit:  # mixed: some titles name their candidates, others take every active artwork
        for slot in body["titles"][::3]:
            del slot["candidates"]
    fast, checked = _both(svc, body)
    assert fast is not None and not isinstance(checked, PageRefused)
    for got, want in zip(fast, checked, strict=True):
        np.testing.assert_array_equal(got, want)
    p = svc.prepare(ArtworkRequest.model_validate(body))
    np.testing.assert_array_equal(p.rows, checked[0])
    np.testing.assert_array_equal(np.diff(p.offsets), checked[1])


def _bad_pages(world) -> dict[str, dict]:
    base = page(world, 6)
    t0, t1 = world.title_ids[0], world.title_ids[1]
    out = {}
    b = copy.deepcopy(base)
    b["titles"][1]["title_id"] = "no-such-title"
    out["unknown title"] = b
    b = copy.deepcopy(base)
    b["titles"][2]["candidates"] = b["titles"][2]["candidates"][:2] + ["no-such-artwork"]
    out["unknown artwork"] = b
    b = copy.deepcopy(base)
    b["titles"][0]["candidates"] = [world.artworks_of[t0][0], world.artworks_of[t1][0]]
    out["artwork of another title"] = b
    b = copy.deepcopy(base)
    b["titles"][3]["candidates"] = [b["titles"][3]["candidates"][0]] * 2
    out["repeated artwork"] = b
    b = copy.deepcopy(base)
    b["titles"][4] = dict(b["titles"][0])
    out["title twice"] = b
    b = copy.deepcopy(base)
    b["titles"][1]["candidates"] = world.artworks_of[t1] * 5  # 40 > serve_max_artworks (32)
    out["too many candidates"] = b
    return out


@pytest.mark.parametrize("case", ["unknown title", "unknown artwork", "artwork of another title",
                                  "repeated artwork", "title twice", "too many candidates"])
def test_fast_path_refuses_what_the_checked_path_refuses(service, case):
    svc, world = service
    body = _bad_pages(world)[case]
    fast, checked = _both(svc, body)
    assert isinstance(checked, PageRefused), case
    assert fast is None, f"{case}: the whole-array checks accepted a page the per-title checks refuse"
    with pytest.raises(PageRefused) as exc:
        svc.prepare(ArtworkRequest.model_validate(body))
    assert (exc.value.status, exc.value.message) == (checked.status, checked.message)


def test_fast_path_refuses_an_artwork_not_active_today(service):
    svc, world = service
    table = svc.store.current.artworks
    body = page(world, 3)
    row = table.index[body["titles"][1]["candidates"][0]]
    table.active_to_day = table.active_to_day.copy()
    table.active_to_day[row] = dt.date(2000, 1, 1).toordinal()
    fast, checked = _both(svc, body)
    assert fast is None and isinstance(checked, PageRefused) and "not active" in checked.message


def test_issued_impressions_equal_parsed_ones():
    signer = EventSigner(SECRET)
    for segment in SEGMENT_CODES:
        ids, digests = signer.issue_page(1_764_000_000_123, segment, ["t0001-a0", "t0002-a3"])
        for event_id, digest, artwork_id in zip(ids, digests, ["t0001-a0", "t0002-a3"], strict=True):
            assert signer.verify(event_id).digest == digest
            for k, p in [(8, 0.25), (1, 1.0), (8, 0.0), (0, 0.5), (3, 1.5)]:
                assert Impression.issued(digest, 1_764_000_000_123, artwork_id, segment, k, p) == \
                    Impression.of(event_id, artwork_id, k, p)


def test_frame_lines_takes_a_list_with_the_same_checks():
    lines = [b'{"a":1}', b'{"b":[1,2]}']
    assert frame_lines(lines) == frame_lines(b"\n".join(lines))
    assert [unframe(x) for x in frame_lines(lines).splitlines()] == lines
    for bad in (b'{"a":1}\n{"b":2}', b"[1]", b'{"_crc32":"00000000","a":1}'):
        with pytest.raises(ValueError):
            frame_lines([bad])


def _stages(c: TestClient) -> tuple[dict[str, float], float]:
    seconds, pages = {}, None
    for line in c.get("/metrics").text.splitlines():
        if line.startswith(STAGE_SECONDS + "{"):
            seconds[line.split('stage="', 1)[1].split('"', 1)[0]] = float(line.rsplit(" ", 1)[1])
        elif line.startswith(STAGE_PAGES + " "):
            pages = float(line.rsplit(" ", 1)[1])
    return seconds, pages


def test_stage_timers_cover_decided_pages_only(bundle_dir, _isolated_home):
    path, world = bundle_dir
    app = create_app(Settings(serve_event_secret=SECRET), model_uri=str(path), poll=False)
    with TestClient(app) as c:
        assert _stages(c)[1] == 0
        for _ in range(3):
            assert c.post("/v1/artwork", json=page(world, 5)).status_code == 200
        bad = page(world, 2)
        bad["titles"][0]["title_id"] = "no-such-title"
        assert c.post("/v1/artwork", json=bad).status_code == 422
        seconds, pages = _stages(c)
    assert pages == 3
    assert list(seconds) == list(STAGES)
    assert all(v >= 0 for v in seconds.values()) and seconds["inference"] > 0 and seconds["log_append"] > 0


def test_log_lines_are_the_bytes_of_the_rows_dict(service):
    svc, world = service
    body = page(world, 6, explicit=True)
    body["titles"][1].pop("candidates")  # a title without candidates logs its active artworks
    body["context"]["country"] = "GB-x"
    d = svc.decide(ArtworkRequest.model_validate(body))
    assert len(d.lines) == 6
    for line, slot, decision in zip(d.lines, body["titles"], d.body["decisions"], strict=True):
        row = orjson.loads(line)
        assert list(row) == ["event_id", "ts", "member_id", "title_id", "artwork_id", "candidates", "propensity",
                             "candidate_probabilities", "model_version", "policy", "context"]
        assert line == orjson.dumps(row)  # what dumping the dict in this key order gives, byte for byte
        assert row["event_id"] == decision["event_id"] and row["artwork_id"] == decision["artwork_id"]
        assert row["propensity"] == decision["propensity"] and row["title_id"] == slot["title_id"]
        assert row["context"] == {**body["context"], "page_row": slot["page_row"], "position": slot["position"]}
        assert row["member_id"] == body["member_id"] and row["policy"] == d.body["policy"]
        if "candidates" in slot:
            assert row["candidates"] == slot["candidates"]
        assert len(row["candidate_probabilities"]) == len(row["candidates"])


def _answers(bundle_dir, fast: bool, requests: list[tuple[bytes, dict[str, str]]]):
    """(status, headers that matter, JSON body) of each request, with the fast path on or off."""
    path, _ = bundle_dir
    used = []
    app = create_app(Settings(serve_event_secret=SECRET), model_uri=str(path), poll=False,
                     rng=np.random.default_rng(0))
    out = []
    with TestClient(app) as c:
        guard_routes = app.state.guard.fast_routes
        assert ("POST", "/v1/artwork") in guard_routes
        original = guard_routes[("POST", "/v1/artwork")]

        async def spy(scope, body, send):
            answered = await original(scope, body, send)
            used.append(answered)
            return answered

        if fast:
            guard_routes[("POST", "/v1/artwork")] = spy
        else:  # the route alone, as before the fast path existed
            del guard_routes[("POST", "/v1/artwork")]
        for body, headers in requests:
            r = c.post("/v1/artwork", content=body, headers=headers)
            out.append((r.status_code, r.headers.get("content-type"), r.headers.get("idempotent-replayed"),
                        r.json()))
    return out, used


def test_asgi_fast_path_answers_as_the_route(bundle_dir, _isolated_home):
    _, world = bundle_dir
    good = orjson.dumps(page(world, 5))
    keyed = page(world, 3)
    keyed["request_id"] = "req-1"
    bad_title = page(world, 2)
    bad_title["titles"][0]["title_id"] = "no-such-title"
    json_ct = {"content-type": "application/json"}
    requests = [
        (good, json_ct),                                                     # fast
        (good, {"content-type": "application/json; charset=utf-8"}),         # fast
        (orjson.dumps(keyed), json_ct),                                      # fast, kept for replay
        (orjson.dumps(keyed), json_ct),                                      # fast, replayed
        (good, {**json_ct, "idempotency-key": "key-2"}),                     # fast, header key
        (good, {**json_ct, "idempotency-key": "key-2"}),                     # fast, replayed
        (good, {**json_ct, "idempotency-key": "bad key!"}),                  # route: header pattern 422
        (orjson.dumps(bad_title), json_ct),                                  # fast: service refuses (422)
        (good[:-3], json_ct),                                                # route: invalid JSON 422
        (b'{"member_id": "m1", "context": {}, "titles": []}', json_ct),      # route: validation 422
        (b'{"member_id": NaN}', json_ct),                                    # route: orjson refuses NaN
        (good, {"content-type": "text/plain"}),                              # route
    ]
    fast, used = _answers(bundle_dir, True, requests)
    slow, _ = _answers(bundle_dir, False, requests)
    assert used == [True] * 6 + [False, True, False, False, False, False]
    for (fs, fct, frep, fbody), (ss, sct, srep, sbody) in zip(fast, slow, strict=True):
        assert (fs, fct, frep) == (ss, sct, srep)
        if fs == 200:  # event ids are signed afresh per app; the rest of the answer is the same
            for d in fbody["decisions"] + sbody["decisions"]:
                d.pop("event_id")
        assert fbody == sbody
    assert [s for s, *_ in fast] == [200, 200, 200, 200, 200, 200, 422, 422, 422, 422, 422, 422]
    assert fast[3][2] == "true" and fast[5][2] == "true"
    assert serving_app.REPLAYED == (b"idempotent-replayed", b"true")
