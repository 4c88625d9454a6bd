"""The priors a bundle ships: every artwork it may serve has an ``all`` row, an artwork that
starts after the priors' day gets the priors job's empirical-Bayes start, not Beta(1, 9)."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from keyart import feature_spec
from keyart.contracts import ARTWORKS, PRIORS, TITLES
from keyart.lake import Lake
from keyart.models.export import EB_MAX_ESS, bundle_priors, write_tables

DS = "2026-11-01"


def _priors(rows) -> pd.DataFrame:
    return pd.DataFrame([{"title_id": t, "artwork_id": a, "segment": s, "alpha": al, "beta": be, "n_impressions": n}
                         for t, a, s, al, be, n in rows])


def _arts(ids) -> pd.DataFrame:
    return pd.DataFrame({"title_id": [a.split("-")[0] for a in ids], "artwork_id": ids})


def _mean_ess(row) -> tuple[float, float]:
    return row["alpha"] / (row["alpha"] + row["beta"]), row["alpha"] + row["beta"]


PRIORS_OF_DAY = _priors([
    ("t1", "t1-a", "all", 3.0, 57.0, 60.0),  # 0.05
    ("t1", "t1-b", "all", 4.2, 55.8, 60.0),  # 0.07
    ("t1", "t1-b", "profile=kids", 1.0, 99.0, 5.0),  # segments do not count
    ("t2", "t2-a", "all", 6.0, 54.0, 60.0),  # 0.10, alone in its title
    ("t3", "t3-a", "all", 1.0, 9.0, 0.0),  # no data of its own: not evidence
])


def test_an_artwork_of_a_known_title_gets_its_titles_moments():
    out, added = bundle_priors(PRIORS_OF_DAY, _arts(["t1-a", "t1-b", "t1-new"]))
    assert added == 1 and len(out) == len(PRIORS_OF_DAY) + 1
    new = out[out["artwork_id"] == "t1-new"].iloc[0]
    p = np.array([0.05, 0.07])
    m, v = p.mean(), p.var()
    mean, ess = _mean_ess(new)
    assert new["segment"] == feature_spec.SEGMENT_ALL and new["n_impressions"] == 0.0
    assert mean == pytest.approx(m) and ess == pytest.approx(min(max(m * (1 - m) / v - 1, 1.0), EB_MAX_ESS))
    assert mean < 0.09  # not the default prior's 0.10


def test_a_title_with_fewer_than_two_known_artworks_borrows_the_catalogs_strength():
    out, _ = bundle_priors(PRIORS_OF_DAY, _arts(["t2-new", "t9-new"]))
    cat = np.array([0.05, 0.07, 0.10])
    cat_ess = min(max(cat.mean() * (1 - cat.mean()) / cat.var() - 1, 1.0), EB_MAX_ESS)
    t2 = out[out["artwork_id"] == "t2-new"].iloc[0]
    assert _mean_ess(t2) == pytest.approx((0.10, cat_ess))  # its title's mean, the catalog's strength
    t9 = out[out["artwork_id"] == "t9-new"].iloc[0]  # a new title: the catalog's prior
    assert _mean_ess(t9) == pytest.approx((cat.mean(), cat_ess))


def test_nothing_is_added_when_every_artwork_has_a_row_and_the_default_only_without_data():
    out, added = bundle_priors(PRIORS_OF_DAY, _arts(["t1-a", "t2-a", "t3-a"]))
    assert added == 0 and len(out) == len(PRIORS_OF_DAY)
    empty = PRIORS_OF_DAY.iloc[:0]
    out, added = bundle_priors(empty, _arts(["t1-a"]))
    assert added == 1
    assert (out.iloc[0]["alpha"], out.iloc[0]["beta"]) == pytest.approx(feature_spec.DEFAULT_PRIOR)


def test_the_cap_is_the_priors_jobs():
    priors_job = pytest.importorskip("keyart.jobs.priors")
    assert EB_MAX_ESS == priors_job.EB_MAX_ESS


def test_an_artwork_launched_after_the_priors_day_gets_an_empirical_bayes_row(tmp_path):
    """The priors job writes rows for artworks active on D only; the bundle of D also serves
    the artworks starting within the export horizon, so their rows are added."""
    lake = Lake(tmp_path)
    for path in (lake.titles, lake.artworks, lake.priors(DS), lake.member_features(DS)):
        path.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{"title_id": "t1", "name": "T", "genres": ["drama"], "cast": [],
                                          "maturity_rating": "PG"}], TITLES.arrow_schema()), lake.titles / "p.parquet")
    arts = [{"artwork_id": a, "title_id": "t1", "tags": [], "is_default": a == "t1-a",
             "active_from": start, "active_to": None}
            for a, start in (("t1-a", dt.date(2026, 10, 1)), ("t1-b", dt.date(2026, 10, 1)),
                             ("t1-c", dt.date(2026, 10, 1)), ("t1-new", dt.date(2026, 11, 4)))]
    pq.write_table(pa.Table.from_pylist(arts, ARTWORKS.arrow_schema()), lake.artworks / "p.parquet")
    pq.write_table(pa.Table.from_pandas(_priors([
        ("t1", "t1-a", "all", 2.5, 47.5, 50.0), ("t1", "t1-b", "all", 3.0, 47.0, 50.0),
        ("t1", "t1-c", "all", 2.0, 48.0, 50.0)]), PRIORS.arrow_schema(), preserve_index=False),
        lake.priors(DS) / "p.parquet")
    pq.write_table(pa.table({"member_id": ["m1"], "member_is_kids": [0], "member_log_plays_28d": [0.0],
                             "member_days_since_last_play": [1.0], "affinity_tags": [[]], "affinity_values": [[]]}),
                   lake.member_features(DS) / "p.parquet")
    out = tmp_path / "bundle"
    out.mkdir()
    counts = write_tables(lake, DS, out, {"t1-a": 0.05, "t1-new": 0.07, "elsewhere": 0.2})
    assert counts == {"priors": 4, "priors_filled": 1, "members": 1, "artworks": 4, "model_means": 2}
    priors = pd.read_parquet(out / "priors.parquet")
    new = priors[priors["artwork_id"] == "t1-new"].iloc[0]
    assert _mean_ess(new)[0] == pytest.approx(np.mean([0.05, 0.06, 0.04]))
    assert list(priors.columns) == [*PRIORS.arrow_schema().names, "model_mean"]
    # the model's means on the segment-'all' rows of the artworks it has one for, NaN elsewhere
    by = {(r.artwork_id, r.segment): r.model_mean for r in priors.itertuples()}
    assert by[("t1-a", "all")] == 0.05 and by[("t1-new", "all")] == 0.07
    assert np.isnan([v for (a, seg), v in by.items() if seg != "all" or a not in ("t1-a", "t1-new")]).all()
