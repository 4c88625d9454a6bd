"""The endpoint in-process: schema, policy propensities, refusals, rewards, fallback, swaps."""

from __future__ import annotations

import datetime as dt
import os
import shutil

import numpy as np
import orjson
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from serving_fixtures import app_client, log_rows, make_bundle, page, served_page

from keyart import contracts, policy
from keyart.bench import synthetic
from keyart.lake import Lake
from keyart.serving.schemas import ArtworkResponse

SECRET = "api-tests-event-secret-" + "0" * 40


def client(uri, rng=None, **overrides) -> TestClient:
    return app_client(uri, SECRET, rng, **overrides)


def impressions(settings_home) -> list[dict]:
    return log_rows(settings_home / "lake" / "raw" / "impressions")


def test_response_schema_and_log_rows(bundle_dir, _isolated_home):
    path, world = bundle_dir
    with client(path) as c:
        r = c.post("/v1/artwork", json=page(world, 6))
        unknown = c.post("/v1/artwork", json=page(world, 4, member="nobody", explicit=False))
    assert r.status_code == 200 and unknown.status_code == 200
    body = ArtworkResponse.model_validate(r.json())
    assert (body.model_version, body.policy, body.fallback) == ("v1", "squarecb", False)
    assert [d.title_id for d in body.decisions] == world.title_ids[:6]
    for d in body.decisions:
        assert d.artwork_id in world.artworks_of[d.title_id] and 0 < d.propensity <= 1 and d.model_version == "v1"
    rows = impressions(_isolated_home)
    assert len(rows) == 10
    for row in rows:
        assert contracts.IMPRESSIONS.validate_row(row) is None, row
    assert {row["event_id"] for row in rows} >= {d.event_id for d in body.decisions}
    assert rows[-1]["candidates"] == world.artworks_of[world.title_ids[3]]


@pytest.mark.parametrize("policy_name", ["squarecb", "thompson", "egreedy"])
def test_propensity_matches_policy_for_fixed_seed(bundle_dir, policy_name):
    path, world = bundle_dir
    got, p, b, probs, rng = served_page(path, page(world, 8, explicit=False), policy_name, SECRET)
    chosen, propensity = policy.draw(probs, p.offsets, rng)
    assert [d["artwork_id"] for d in got["decisions"]] == [b.artworks.artwork_ids[p.rows[i]] for i in chosen]
    assert [d["propensity"] for d in got["decisions"]] == propensity.tolist()
    assert got["policy"] == policy_name


def test_residual_blend_reads_the_bundles_model_means(bundle_dir):
    """prior_blend=residual: serving hands the policy each candidate's model mean from the bundle's
    priors (the draw matches the policy recomputed with them), and the means change the decision."""
    path, world = bundle_dir
    req = page(world, 8, explicit=False)
    got, p, b, probs, rng = served_page(path, req, "squarecb", SECRET, prior_blend="residual")
    assert b.policy.prior_blend == "residual"
    means = b.artworks.model_mean[p.rows]
    assert np.isfinite(means).any() and np.isnan(b.artworks.model_mean).any()  # 'all' rows carry one, missing rows NaN
    chosen, propensity = policy.draw(probs, p.offsets, rng)
    assert [d["artwork_id"] for d in got["decisions"]] == [b.artworks.artwork_ids[p.rows[i]] for i in chosen]
    assert [d["propensity"] for d in got["decisions"]] == propensity.tolist()
    mixed = served_page(path, req, "squarecb", SECRET, prior_blend="mix")[3]
    assert not np.allclose(probs, mixed)


def _body(world, **change):
    req = page(world, 3, per_title=4)
    for key, value in change.items():
        if key == "context":
            req["context"].update(value)
        else:
            req[key] = value
    return req


BAD = [
    ("empty page", lambda w: _body(w, titles=[]), 422, "at least 1"),
    ("bad device", lambda w: _body(w, context={"device": "fridge"}), 422, "device"),
    ("hour 24", lambda w: _body(w, context={"local_hour": 24}), 422, "local_hour"),
    ("no context", lambda w: {"member_id": "m1", "titles": page(w, 1)["titles"]}, 422, "context"),
    ("bad member id", lambda w: _body(w, member_id="bad id!"), 422, "member_id"),
    ("unknown title", lambda w: _body(w, titles=[{"title_id": "t9999", "page_row": 0, "position": 0}]), 422, "t9999"),
    ("unknown artwork", lambda w: _body(w, titles=[{"title_id": "t0001", "candidates": ["t0001-a0", "t0001-zz"],
                                                   "page_row": 0, "position": 0}]), 422, "t0001-zz"),
    ("artwork of another title", lambda w: _body(w, titles=[{"title_id": "t0001", "candidates": ["t0002-a0"],
                                                            "page_row": 0, "position": 0}]), 422, "t0002-a0"),
    ("duplicate title", lambda w: _body(w, titles=page(w, 1, per_title=2)["titles"] * 2), 422, "twice"),
    ("repeated candidate", lambda w: _body(w, titles=[{"title_id": "t0001", "candidates": ["t0001-a0"] * 2,
                                                      "page_row": 0, "position": 0}]), 422, "repeat"),
    ("too many titles", lambda w: _body(w, titles=page(w, 30)["titles"]), 413, "serve_max_titles"),
    ("too many artworks", lambda w: _body(w, titles=page(w, 2)["titles"]), 413, "serve_max_artworks"),
]


@pytest.mark.parametrize("name,make,status,match", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_clear_4xx(bundle_dir, name, make, status, match):
    path, world = bundle_dir
    with client(path, serve_max_titles=20, serve_max_artworks=6) as c:
        r = c.post("/v1/artwork", json=make(world))
    assert r.status_code == status, r.text
    assert match in r.text


def test_malformed_json_and_huge_body(bundle_dir):
    path, _ = bundle_dir
    with client(path) as c:
        assert c.post("/v1/artwork", content=b"{not json", headers={"content-type": "application/json"}).status_code == 422
        assert c.post("/v1/artwork", content=b"x" * (2 << 20), headers={"content-type": "application/json"}).status_code == 413
        metrics = c.get("/metrics").text
    assert 'keyart_rejections_total{reason="413",route="/v1/artwork"} 1.0' in metrics


def test_rewards_forged_duplicate_and_online_priors(bundle_dir, _isolated_home):
    path, world = bundle_dir
    with client(path) as c:
        d = c.post("/v1/artwork", json=page(world, 1)).json()["decisions"][0]
        rt = c.app.state.runtime
        b = rt.store.current
        i = b.artworks.index[d["artwork_id"]]
        base = (b.artworks.policy_alpha[i], b.artworks.policy_beta[i], b.artworks.policy_n[i])
        # the logged decision is counted, pending: it is no failure while its window is open
        # (tests/serving/test_online_state.py has the rules)
        assert (b.prior_alpha[i], b.prior_beta[i], b.prior_n[i]) == base
        assert rt.rewards.priors.counts(d["artwork_id"], "all") == (1, 0)
        ok = c.post("/v1/reward", json={"event_id": d["event_id"], "reward": 1, "minutes": 42.0})
        dup = c.post("/v1/reward", json={"event_id": d["event_id"], "reward": 1, "minutes": 42.0})
        head, sig, art = d["event_id"].rsplit(".", 2)[0], d["event_id"].split(".")[4], d["artwork_id"]
        other = world.artworks_of[d["title_id"]][0] if art != world.artworks_of[d["title_id"]][0] else world.artworks_of[d["title_id"]][1]
        forged = c.post("/v1/reward", json={"event_id": d["event_id"].replace(art, other), "reward": 1})
        invented = c.post("/v1/reward", json={"event_id": "1.abc.def.a.AAAAAAAAAAAAAAAAAAAAAA.t0001-a0", "reward": 1})
        malformed = c.post("/v1/reward", json={"event_id": "hello", "reward": 1})
        bad_reward = c.post("/v1/reward", json={"event_id": d["event_id"], "reward": 3})
        after = rt.rewards.priors.counts(d["artwork_id"], "all")
        delta = rt.rewards.priors.delta(d["artwork_id"], "all")
    assert ok.status_code == 200 and ok.json()["artwork_id"] == d["artwork_id"], (head, sig)
    assert dup.status_code == 409 and "already recorded" in dup.text
    assert forged.status_code == 403 and invented.status_code == 403
    assert malformed.status_code == 422 and bad_reward.status_code == 422
    assert after == (1, 1)  # counted once
    logged = log_rows(_isolated_home / "lake" / "raw" / "rewards")
    assert [r["event_id"] for r in logged] == [d["event_id"]]
    # a restarted server rebuilds de-duplication and priors from the impression and reward logs
    with client(path) as c:
        assert c.post("/v1/reward", json={"event_id": d["event_id"], "reward": 1}).status_code == 409
        assert c.app.state.runtime.rewards.priors.counts(d["artwork_id"], "all") == (1, 1)
        assert c.app.state.runtime.rewards.priors.delta(d["artwork_id"], "all") == delta


def test_expired_reward_refused(bundle_dir):
    from keyart.serving.rewards import RewardRefused

    path, world = bundle_dir
    with client(path) as c:
        eid = c.post("/v1/artwork", json=page(world, 1)).json()["decisions"][0]["event_id"]
        book = c.app.state.runtime.rewards
        with pytest.raises(RewardRefused, match="older than"):
            book.admit(eid, now_ms=int(1e13))


def test_client_clock_is_refused_unless_enabled(bundle_dir):
    path, world = bundle_dir
    req = dict(page(world, 2), ts="2026-11-01T10:00:00Z")
    with client(path) as c:
        r = c.post("/v1/artwork", json=req)
        assert r.status_code == 422 and "serve_client_clock" in r.json()["detail"]
        eid = c.post("/v1/artwork", json=page(world, 1)).json()["decisions"][0]["event_id"]
        r = c.post("/v1/reward", json={"event_id": eid, "reward": 1, "ts": "2026-11-01T10:00:00Z"})
        assert r.status_code == 422 and "serve_client_clock" in r.json()["detail"]


def test_client_clock_stamps_decisions_and_ages_rewards(bundle_dir, _isolated_home):
    path, world = bundle_dir
    with client(path, serve_client_clock=True, attribution_window_hours=4) as c:
        r = c.post("/v1/artwork", json=dict(page(world, 2), ts="2026-11-01T22:30:00Z"))
        assert r.status_code == 200
        first, second = (d["event_id"] for d in r.json()["decisions"])
        ok = c.post("/v1/reward", json={"event_id": first, "reward": 1, "minutes": 30, "ts": "2026-11-02T00:10:00Z"})
        late = c.post("/v1/reward", json={"event_id": second, "reward": 1, "ts": "2026-11-02T12:00:00Z"})
    assert ok.status_code == 200
    assert late.status_code == 410
    rows = impressions(_isolated_home)
    assert {row["ts"] for row in rows} == {"2026-11-01T22:30:00.000Z"}
    assert (_isolated_home / "lake" / "raw" / "impressions" / "ds=2026-11-01").is_dir()
    reward_rows = log_rows(_isolated_home / "lake" / "raw" / "rewards")
    assert [(row["event_id"], row["ts"][:10]) for row in reward_rows] == [(first, "2026-11-02")]


def test_fallback_without_model_serves_defaults(_isolated_home):
    rows = synthetic.artwork_rows(np.random.default_rng(0), 5, 4)
    lake = Lake(_isolated_home / "lake")
    lake.artworks.mkdir(parents=True)
    pq.write_table(synthetic.catalog_rows(rows), lake.artworks / "part-0.parquet")
    with client(None, serve_cold_start="default") as c:
        assert c.get("/readyz").json() == {"ready": True, "model_version": None, "registry_version": None,
                                           "source": None, "fallback": True,
                                           "detail": "serving default artwork (no model)"}
        r = c.post("/v1/artwork", json={"member_id": "m1", "context": {"device": "web", "country": "DE",
                                        "local_hour": 3, "day_of_week": 0},
                                        "titles": [{"title_id": "t0002", "page_row": 0, "position": 0},
                                                   {"title_id": "t0003", "candidates": ["t0003-a2", "t0003-a1"],
                                                    "page_row": 0, "position": 1}]})
        metrics = c.get("/metrics").text
    body = r.json()
    assert r.status_code == 200 and body["fallback"] is True and body["model_version"] == "default"
    assert [(d["artwork_id"], d["propensity"]) for d in body["decisions"]] == [("t0002-a0", 1.0), ("t0003-a2", 1.0)]
    assert "keyart_fallback_mode 1.0" in metrics and "keyart_fallback_pages_total 1.0" in metrics


def test_no_model_no_catalog_is_not_ready():
    with client(None) as c:
        assert c.get("/readyz").status_code == 503
        assert c.get("/healthz").json() == {"status": "ok"}


def test_bad_bundle_refused_old_keeps_serving(tmp_path, bundle_dir, lgbm_model_b):
    from keyart import bundle as kb

    path, world = bundle_dir
    link = tmp_path / "current"
    os.symlink(path, link)
    foreign = kb.generate_key(tmp_path / "foreign" / "key.pem")
    with client(link) as c:
        store = c.app.state.runtime.store
        assert store.current.version == "v1" and store.current.signed_by is not None
        cases = {}
        for name in ("corrupt", "truncated", "spec", "model", "unsigned", "tampered", "foreign-key"):
            bad = tmp_path / f"bad-{name}"
            make_bundle(bad, lgbm_model_b, f"bad-{name}")
            m = orjson.loads((bad / "manifest.json").read_bytes())
            if name == "corrupt":
                (bad / "members.parquet").write_bytes(b"garbage")
            elif name == "truncated":
                data = (bad / "model.onnx").read_bytes()
                (bad / "model.onnx").write_bytes(data[: len(data) // 2])
            elif name == "spec":  # signed by the daily run's key, but for another feature specification
                m["feature_spec_version"] = "999"
                (bad / "manifest.json").write_bytes(orjson.dumps(m))
                kb.sign(bad)
            elif name == "model":  # signed, but its model does not score the manifest's probe rows
                shutil.copy(path / "model.onnx", bad / "model.onnx")
                m["files"]["model.onnx"] = kb.sha256(bad / "model.onnx")
                (bad / "manifest.json").write_bytes(orjson.dumps(m))
                kb.sign(bad)
            elif name == "unsigned":
                (bad / kb.SIGNATURE_FILE).unlink()
            elif name == "tampered":  # another model with a matching checksum, the signature left as it was
                shutil.copy(path / "model.onnx", bad / "model.onnx")
                m["files"]["model.onnx"] = kb.sha256(bad / "model.onnx")
                (bad / "manifest.json").write_bytes(orjson.dumps(m))
            else:  # a consistent bundle signed by a key serving does not trust
                kb.sign(bad, key=foreign)
            tmp_link = tmp_path / "next"
            os.symlink(bad, tmp_link)
            os.replace(tmp_link, link)
            assert store.poll_once() is False
            cases[name] = next(v for k, v in store.bad.items() if f"bad-{name}" in k)
            assert store.poll_once() is False  # refused once, not retried while the URI stays
            r = c.post("/v1/artwork", json=page(world, 2))
            assert r.status_code == 200 and r.json()["model_version"] == "v1"
        good = tmp_path / "good"
        make_bundle(good, lgbm_model_b, "v2", seed=0)
        os.symlink(good, tmp_path / "next")
        os.replace(tmp_path / "next", link)
        assert store.poll_once() is True
        assert c.post("/v1/artwork", json=page(world, 2)).json()["model_version"] == "v2"
        metrics = c.get("/metrics").text
    assert "checksum" in cases["corrupt"] and "checksum" in cases["truncated"]
    assert "feature spec" in cases["spec"] and "parity probe" in cases["model"]
    assert "unsigned" in cases["unsigned"] and "does not verify" in cases["tampered"]
    assert "not trusted" in cases["foreign-key"]
    assert 'keyart_bundle_loads_total{outcome="refused"} 7.0' in metrics
    for reason in ("checksum_mismatch", "feature_spec", "parity_probe", "unsigned", "bad_signature", "unknown_key"):
        assert f'keyart_bundle_refusals_total{{reason="{reason}"}}' in metrics, reason
    assert 'keyart_model_info{registry_version="",signed_by=' in metrics and 'version="v2"' in metrics


def test_artworks_that_start_later_are_resolved_per_request_day(_isolated_home):
    rows = synthetic.artwork_rows(np.random.default_rng(0), 2, 3)
    for r in rows:
        if r["artwork_id"] == "t0001-a2":
            r["active_from"] = "2026-11-05"  # starts after the first request's day
        if r["artwork_id"] == "t0002-a1":
            r["active_to"] = dt.date(2020, 1, 1)  # long retired: never served
    lake = Lake(_isolated_home / "lake")
    lake.artworks.mkdir(parents=True)
    pq.write_table(synthetic.catalog_rows(rows), lake.artworks / "part-0.parquet")
    ctx = {"device": "web", "country": "DE", "local_hour": 3, "day_of_week": 0}
    titles = [{"title_id": "t0001", "page_row": 0, "position": 0}, {"title_id": "t0002", "page_row": 0, "position": 1}]
    with client(None, serve_client_clock=True) as c:
        for ts in ("2026-11-04T10:00:00Z", "2026-11-05T10:00:00Z"):
            assert c.post("/v1/artwork", json={"member_id": "m1", "context": ctx, "titles": titles, "ts": ts}).status_code == 200
        retired = c.post("/v1/artwork", json={"member_id": "m1", "context": ctx, "ts": "2026-11-05T10:00:00Z",
                                              "titles": [{"title_id": "t0002", "candidates": ["t0002-a1"],
                                                          "page_row": 0, "position": 0}]})
    assert retired.status_code == 422 and "t0002-a1" in retired.json()["detail"]
    logged = {(row["ts"][:10], row["title_id"]): row["candidates"] for row in impressions(_isolated_home)}
    assert logged[("2026-11-04", "t0001")] == ["t0001-a0", "t0001-a1"]
    assert logged[("2026-11-05", "t0001")] == ["t0001-a0", "t0001-a1", "t0001-a2"]
    assert logged[("2026-11-05", "t0002")] == ["t0002-a0", "t0002-a2"]
