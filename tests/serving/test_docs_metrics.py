"""What people look at (issue 20, points 9 and 10): /docs and /redoc work offline with
request examples a "Try it out" can send as they are; responses and metrics name the
registry version; /metrics carries what an operator needs to spot policy collapse or a
stale model (process metrics, per-artwork decisions, propensities, the online reward
rate, inference-only latency)."""

from __future__ import annotations

import math
import re
import shutil
import subprocess

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from serving_fixtures import page
from test_hardening import UvicornThread

from keyart.config import Settings
from keyart.serving.app import DOCS_ASSETS, create_app

SECRET = "docs-metrics-tests-event-secret-" + "0" * 40


def make_app(uri, **overrides):
    return create_app(Settings(serve_event_secret=SECRET, **overrides), model_uri=str(uri) if uri else None, poll=False)


def samples(text: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append(s)
    return out


def test_docs_and_redoc_load_their_assets_from_the_server(bundle_dir):
    path, _ = bundle_dir
    with TestClient(make_app(path)) as c:
        docs, redoc = c.get("/docs"), c.get("/redoc")
        assets = re.findall(r'(?:src|href)="([^"]+)"', docs.text + redoc.text)
        fetched = {a: c.get(a) for a in assets}
    assert docs.status_code == redoc.status_code == 200
    assert not re.search(r"https?://", docs.text + redoc.text.replace("http://www.w3.org", ""))  # no CDN, no fonts
    assert {f"{DOCS_ASSETS}/swagger-ui-bundle.js", f"{DOCS_ASSETS}/swagger-ui.css",
            f"{DOCS_ASSETS}/redoc.standalone.js"} <= set(assets)
    for a, r in fetched.items():
        assert r.status_code == 200 and len(r.content) > 1000, a


def test_the_openapi_examples_are_decidable_as_they_are(bundle_dir):
    path, world = bundle_dir
    with TestClient(make_app(path)) as c:
        spec = c.get("/openapi.json").json()
        body = spec["paths"]["/v1/artwork"]["post"]["requestBody"]["content"]["application/json"]
        example = body["example"]
        answer = c.post("/v1/artwork", json=example)
        reward = spec["paths"]["/v1/reward"]["post"]["requestBody"]["content"]["application/json"]["example"]
    assert {t["title_id"] for t in example["titles"]} <= set(world.title_ids)  # ids of the loaded catalog
    assert answer.status_code == 200, answer.text
    assert set(reward) == {"event_id", "reward", "minutes"} and "event_id" in reward["event_id"]


def test_without_a_catalog_the_example_is_the_schema_example():
    with TestClient(make_app(None)) as c:
        example = c.get("/openapi.json").json()["paths"]["/v1/artwork"]["post"]["requestBody"]["content"][
            "application/json"]["example"]
    assert example["member_id"] == "m000042" and example["titles"][0]["title_id"] == "t0001"


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
@pytest.mark.parametrize("route,marker", [("/docs", "opblock"), ("/redoc", "operation")])
def test_headless_chromium_renders_the_docs_offline(bundle_dir, tmp_path, route, marker):
    path, _ = bundle_dir
    with UvicornThread(make_app(path)) as srv:
        url = f"http://127.0.0.1:{srv.port}{route}"
        proc = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
             f"--user-data-dir={tmp_path / 'profile'}",
             # every host but the server is unreachable: the page must not need the internet
             "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--proxy-server=direct://",
             "--virtual-time-budget=15000", "--dump-dom", url],
            capture_output=True, text=True, timeout=180)
    dom = proc.stdout
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert marker in dom, dom[:2000]
    for endpoint in ("/v1/artwork", "/v1/reward", "/readyz", "/metrics"):
        assert endpoint in dom, endpoint


def test_an_artwork_of_another_title_gets_the_documented_message(bundle_dir):
    path, world = bundle_dir
    a, b = world.title_ids[:2]
    body = page(world, 1)
    body["titles"][0]["candidates"] = [world.artworks_of[a][0], world.artworks_of[b][0]]
    with TestClient(make_app(path)) as c:
        r = c.post("/v1/artwork", json=body)
    assert r.status_code == 422
    assert r.json()["detail"] == f"title {a!r}: artwork ids of another title {world.artworks_of[b][0]!r}"


def test_metrics_name_the_registry_version_and_show_what_the_policy_does(bundle_dir):
    path, world = bundle_dir
    with TestClient(make_app(path)) as c:
        pages = [c.post("/v1/artwork", json=page(world, 5)).json() for _ in range(6)]
        events = [d["event_id"] for p in pages for d in p["decisions"]]
        for e in events[:3]:
            assert c.post("/v1/reward", json={"event_id": e, "reward": 1}).status_code == 200
        c.post("/v1/reward", json={"event_id": events[3], "reward": 0})
        ready = c.get("/readyz").json()
        text = c.get("/metrics").text
    assert pages[0]["registry_version"] is None and ready["registry_version"] is None  # a folder, not the registry
    m = samples(text)
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds", "python_info"):
        assert name in m, name
    shown: dict[str, int] = {}
    for p in pages:
        for d in p["decisions"]:
            shown[d["artwork_id"]] = shown.get(d["artwork_id"], 0) + 1
    assert {s.labels["artwork_id"]: s.value for s in m["keyart_artwork_decisions_total"]} == shown
    buckets = {s.labels["le"]: s.value for s in m["keyart_decision_propensity_bucket"]}
    props = [d["propensity"] for p in pages for d in p["decisions"]]
    assert buckets["+Inf"] == len(props) == 30
    assert buckets["0.5"] == sum(x <= 0.5 for x in props)
    assert math.isclose(m["keyart_decision_propensity_sum"][0].value, sum(props))
    assert m["keyart_online_reward_rate"][0].value == pytest.approx(3 / 30)
    assert m["keyart_inference_seconds_count"][0].value == 6 and m["keyart_decide_seconds_count"][0].value == 6
    assert 0 < m["keyart_inference_seconds_sum"][0].value < m["keyart_decide_seconds_sum"][0].value
    (info,) = m["keyart_model_info"]
    assert info.labels["version"] == "v1" and info.labels["signed_by"]


@pytest.mark.mlflow
def test_a_registry_bundle_is_named_by_its_registry_version(tmp_path, _isolated_home, lgbm_model):
    from serving_fixtures import make_bundle
    from test_registry import new_registry, register

    s = Settings(serve_event_secret=SECRET)
    client, exp = new_registry(s)
    world = make_bundle(tmp_path / "b1", lgbm_model, "v1")
    register(client, s.registered_model, exp, tmp_path / "b1", "champion")
    with UvicornThread(create_app(s, poll=False)) as srv:
        url = f"http://127.0.0.1:{srv.port}"
        answer = httpx.post(url + "/v1/artwork", json=page(world, 2)).json()
        ready = httpx.get(url + "/readyz").json()
        metrics = httpx.get(url + "/metrics").text
    assert answer["model_version"] == "v1" and answer["registry_version"] == "1"
    assert ready["registry_version"] == "1" and ready["source"] == f"models:/{s.registered_model}/1"
    assert 'registry_version="1"' in metrics
