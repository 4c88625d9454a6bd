"""Every impression line carries the distribution its artwork was drawn from, and a
restarted endpoint resumes the day's online priors from its logs."""

from __future__ import annotations

import datetime as dt

import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient
from serving_fixtures import app_client, log_rows, page, served_page

from keyart import contracts

SECRET = "logged-distribution-tests-secret-" + "0" * 40


def client(uri, rng=None, **overrides) -> TestClient:
    return app_client(uri, SECRET, rng, **overrides)


def impression_rows(home) -> list[dict]:
    return log_rows(home / "lake" / "raw" / "impressions")


def check_rows(rows: list[dict]) -> None:
    for row in rows:
        assert contracts.IMPRESSIONS.validate_row(row) is None, row
        probs = row["candidate_probabilities"]
        assert len(probs) == len(row["candidates"])
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)
        assert probs[row["candidates"].index(row["artwork_id"])] == row["propensity"]  # exactly


@pytest.mark.parametrize("policy_name", ["squarecb", "thompson", "egreedy"])
def test_the_log_reproduces_the_served_distribution(bundle_dir, _isolated_home, policy_name):
    path, world = bundle_dir
    got, _, _, probs, _ = served_page(path, page(world, 8, explicit=False), policy_name, SECRET)
    rows = impression_rows(_isolated_home)
    check_rows(rows)
    assert [r["event_id"] for r in rows] == [d["event_id"] for d in got["decisions"]]
    logged = np.concatenate([r["candidate_probabilities"] for r in rows])
    np.testing.assert_allclose(logged, probs, rtol=5e-6)  # 6 significant digits
    line = max(len(orjson.dumps(r["candidate_probabilities"])) for r in rows)
    assert line <= 12 * max(len(r["candidates"]) for r in rows) + 10  # short numbers, the shown one exact


@pytest.mark.parametrize("cold_start", ["uniform", "default"])
def test_without_a_model_the_log_still_says_what_was_drawn_from(_isolated_home, cold_start):
    import pyarrow.parquet as pq

    from keyart.bench import synthetic
    from keyart.lake import Lake

    lake = Lake(_isolated_home / "lake")
    lake.artworks.mkdir(parents=True)
    pq.write_table(synthetic.catalog_rows(synthetic.artwork_rows(np.random.default_rng(0), 5, 4)),
                   lake.artworks / "part-0.parquet")
    body = {"member_id": "m1", "context": {"device": "tv", "country": "US", "local_hour": 20, "day_of_week": 4},
            "titles": [{"title_id": "t0002", "page_row": 0, "position": 0},
                       {"title_id": "t0003", "candidates": ["t0003-a2", "t0003-a1"], "page_row": 0, "position": 1}]}
    with client(None, serve_cold_start=cold_start) as c:
        assert c.post("/v1/artwork", json=body).status_code == 200
    rows = impression_rows(_isolated_home)
    assert len(rows) == 2
    check_rows(rows)
    for r in rows:
        k = len(r["candidates"])
        want = [1 / k] * k if cold_start == "uniform" else [float(a == r["artwork_id"]) for a in r["candidates"]]
        np.testing.assert_allclose(r["candidate_probabilities"], want, rtol=5e-6)


def test_a_restart_mid_day_resumes_the_online_priors(bundle_dir, _isolated_home):
    """Pages and rewards on the client's clock, a restart, the same arrays: the restarted
    endpoint folds the day's impression and reward logs back in (the impressions too: an
    artwork with 200 impressions and 10 rewards keeps its mean instead of jumping to the
    take rate of its rewards alone)."""
    path, world = bundle_dir
    t0 = dt.datetime(2026, 11, 2, 9, tzinfo=dt.UTC)
    opts = {"serve_client_clock": True, "serve_online_sync_seconds": 0}
    with client(path, rng=np.random.default_rng(0), **opts) as c:
        rng = np.random.default_rng(1)
        for j in range(120):
            ts = t0 + dt.timedelta(minutes=3 * j)
            body = dict(page(world, 4, member=world.member_ids[j % 50], explicit=False), ts=ts.isoformat())
            for d in c.post("/v1/artwork", json=body).json()["decisions"]:
                if rng.random() < 0.2:
                    later = (ts + dt.timedelta(minutes=float(rng.uniform(1, 60)))).isoformat()
                    assert c.post("/v1/reward", json={"event_id": d["event_id"], "reward": 1, "minutes": 30.0,
                                                      "ts": later}).status_code == 200
        b = c.app.state.runtime.store.current
        before = (b.prior_alpha.copy(), b.prior_beta.copy(), b.prior_n.copy())
        priors = c.app.state.runtime.rewards.priors
        shown = {d for (_, d, _) in priors.state.keys()}
        counts = {a: priors.counts(a, "all") for a in shown}
    assert sum(n for n, _ in counts.values()) == 120 * 4
    assert any(np.any(x != y) for x, y in zip(before, (b.artworks.policy_alpha, b.artworks.policy_beta,
                                                       b.artworks.policy_n), strict=True))
    with client(path, **opts) as c:
        b = c.app.state.runtime.store.current
        for got, want in zip((b.prior_alpha, b.prior_beta, b.prior_n), before, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-12)
        priors = c.app.state.runtime.rewards.priors
        assert {a: priors.counts(a, "all") for a in shown} == counts
