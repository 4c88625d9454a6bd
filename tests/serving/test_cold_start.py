"""A cold start (no model yet) explores: uniform over the active candidates, propensity 1/K."""

from __future__ import annotations

import numpy as np
import orjson
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from scipy import stats

from keyart import contracts
from keyart.bench import synthetic
from keyart.config import Settings
from keyart.lake import Lake
from keyart.serving.app import create_app
from keyart.serving.event_log import read_lines

SECRET = "cold-start-tests-secret-" + "0" * 40
CONTEXT = {"device": "tv", "country": "US", "local_hour": 20, "day_of_week": 4}


def _catalog(home) -> None:
    rows = synthetic.artwork_rows(np.random.default_rng(0), 5, 4)
    lake = Lake(home / "lake")
    lake.artworks.mkdir(parents=True)
    pq.write_table(synthetic.catalog_rows(rows), lake.artworks / "part-0.parquet")


def _client(**overrides) -> TestClient:
    settings = Settings(serve_event_secret=SECRET, **overrides)
    return TestClient(create_app(settings, model_uri=None, rng=np.random.default_rng(3), poll=False))


def _page():
    return {"member_id": "m1", "context": CONTEXT,
            "titles": [{"title_id": "t0002", "page_row": 0, "position": 0},
                       {"title_id": "t0003", "candidates": ["t0003-a2", "t0003-a1"], "page_row": 0, "position": 1}]}


def test_cold_start_draws_uniformly_and_logs_one_over_k(_isolated_home):
    _catalog(_isolated_home)
    n = 800
    with _client() as c:
        assert Settings().serve_cold_start == "uniform"  # the default
        bodies = [c.post("/v1/artwork", json=_page()).json() for _ in range(n)]
    assert all(b["fallback"] and b["policy"] == "random" and b["model_version"] == "default" for b in bodies)
    first = [b["decisions"][0] for b in bodies]
    second = [b["decisions"][1] for b in bodies]
    np.testing.assert_allclose([d["propensity"] for d in first], 1 / 4)  # t0002: its 4 active artworks
    np.testing.assert_allclose([d["propensity"] for d in second], 1 / 2)  # the 2 candidates given
    counts = [sum(d["artwork_id"] == f"t0002-a{j}" for d in first) for j in range(4)]
    assert stats.chisquare(counts).pvalue > 1e-4, counts  # every artwork is shown, evenly
    assert {d["artwork_id"] for d in second} == {"t0003-a1", "t0003-a2"}
    # the log carries what offline evaluation needs: candidates and the exact propensity
    rows = [orjson.loads(line) for f in sorted((_isolated_home / "lake" / "raw" / "impressions").rglob("*.jsonl"))
            for line in read_lines(f)]
    assert len(rows) == 2 * n
    for row in rows[:20]:
        assert contracts.IMPRESSIONS.validate_row(row) is None, row
        assert row["propensity"] == pytest.approx(1 / len(row["candidates"]))
        assert row["policy"] == "random"


def test_default_artwork_mode_stays_an_option(_isolated_home):
    _catalog(_isolated_home)
    with _client(serve_cold_start="default") as c:
        body = c.post("/v1/artwork", json=_page()).json()
    assert [(d["artwork_id"], d["propensity"]) for d in body["decisions"]] == [("t0002-a0", 1.0), ("t0003-a2", 1.0)]
    assert body["policy"] == "default"


def test_cold_start_setting_is_validated():
    with pytest.raises(ValueError, match="serve_cold_start"):
        Settings(serve_cold_start="first")
