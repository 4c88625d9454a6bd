"""Which logged impressions train the model: the window, plus the uniform logs within the horizon."""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from keyart.feature_spec import N_FEATURES
from keyart.lake import Lake, exploration_days, shift_ds, training_days
from keyart.models.data import uniform_impressions
from keyart.models.reward_model import TrainConfig
from keyart.models.train import TRAIN_ORDER, logged_arrays, train_run

DAY0 = "2026-05-01"


def logged_day(ds: str, rng: np.random.Generator, n: int, uniform: bool) -> pd.DataFrame:
    """Candidate rows of n impressions of ``ds``: uniform logging, or an exploiting policy
    (the shown artwork at propensity 0.8, whatever K)."""
    k = rng.integers(2, 5, size=n)
    rows = int(k.sum())
    X = rng.random((rows, N_FEATURES)).astype(np.float32)
    shown = np.array([rng.integers(0, m) for m in k])
    cand = np.concatenate([np.arange(m) for m in k])
    is_logged = cand == np.repeat(shown, k)
    reward = (rng.random(n) < 0.05 + 0.3 * X[is_logged, 0]).astype(int)
    ts = np.datetime64(f"{ds}T00:00:00") + np.repeat(np.sort(rng.integers(0, 86_400, n)), k).astype("timedelta64[s]")
    return pd.DataFrame({
        "event_id": np.repeat([f"e-{ds}-{i:05d}" for i in range(n)], k), "impression_ds": dt.date.fromisoformat(ds),
        "ts": ts, "is_logged": is_logged, "propensity": 1.0 / np.repeat(k, k) if uniform else 0.8,
        "policy": "random" if uniform else "squarecb", "reward": np.repeat(reward, k), "features": list(X),
    })


@pytest.fixture
def lake(tmp_path) -> Lake:
    """Day 0 logged uniformly (the cold start), days 1..5 by an exploiting policy."""
    lake = Lake(tmp_path / "lake")
    rng = np.random.default_rng(0)
    for i in range(6):
        ds = shift_ds(DAY0, i)
        lake.training(ds).mkdir(parents=True)
        logged_day(ds, rng, 400, uniform=i == 0).to_parquet(lake.training(ds) / "part-0.parquet", index=False)
    return lake


def test_uniform_impressions_are_found_by_their_propensities():
    rng = np.random.default_rng(1)
    both = pd.concat([logged_day(DAY0, rng, 50, uniform=True), logged_day(shift_ds(DAY0, 1), rng, 50, uniform=False)])
    kept = uniform_impressions(pa.Table.from_pandas(both, preserve_index=False))
    assert set(kept.column("policy").to_pylist()) == {"random"}
    assert kept.num_rows == int((both["policy"] == "random").sum())  # every candidate row of those impressions


def test_uniform_day_stays_in_training_after_the_window_passes_it(lake, tmp_path):
    last = shift_ds(DAY0, 5)  # held out; window 2 = days 3 and 4
    assert training_days(lake, last, 2) == [shift_ds(DAY0, 3), shift_ds(DAY0, 4)]
    assert exploration_days(lake, last, 2, 30) == [DAY0, shift_ds(DAY0, 1), shift_ds(DAY0, 2)]
    assert exploration_days(lake, last, 2, 4) == [shift_ds(DAY0, 1), shift_ds(DAY0, 2)]  # day 0 is 5 days old
    assert exploration_days(lake, last, 2, 2) == []
    cfg = TrainConfig(min_data_in_leaf=20, num_boost_round=60)
    info = train_run(lake, last, 2, cfg, run_dir=tmp_path / "run", exploration_horizon_days=30)
    # day 0's 400 uniform impressions are kept, days 1 and 2 (exploit-logged) are not
    assert info["window"]["exploration_impressions"] == {DAY0: 400}
    assert info["rows"]["train"] + info["rows"]["valid"] == 400 + 2 * 400
    assert json.loads((tmp_path / "run" / "train.json").read_text())["window"]["exploration_horizon_days"] == 30
    info = train_run(lake, last, 2, cfg, run_dir=tmp_path / "run0", exploration_horizon_days=0)
    assert info["window"]["exploration_impressions"] == {}
    assert info["rows"]["train"] + info["rows"]["valid"] == 2 * 400


def test_validation_spans_every_training_day(lake, tmp_path):
    info = train_run(lake, shift_ds(DAY0, 5), 2, TrainConfig(min_data_in_leaf=20, num_boost_round=60),
                     run_dir=tmp_path / "run", exploration_horizon_days=30)
    assert info["valid_days"] == 3  # day 0's uniform rows and the two window days
    assert info["refit"] and info["rows"]["fit"] == 1200


def test_logged_arrays_ordered_on_the_shown_rows_equal_sorting_the_whole_table_first():
    """train_run sorts only the shown rows (order_by): the arrays must be those of sorting every
    candidate row first, ties (same ts, even the same event id) and chunked columns included."""
    rng = np.random.default_rng(3)
    days = [logged_day(shift_ds(DAY0, d), rng, 40, uniform=d == 0) for d in range(3)]
    frame = pd.concat(days, ignore_index=True)
    frame["ts"] = frame["ts"].dt.floor("h")  # many impressions share a ts
    ids = frame["event_id"].unique()
    frame["event_id"] = frame["event_id"].map(dict(zip(ids, rng.permutation(ids), strict=True)))  # ids unrelated to ts
    frame = frame.sample(frac=1.0, random_state=5).reset_index(drop=True)  # Spark's row order is arbitrary
    dup = frame[frame["event_id"] == frame["event_id"].iloc[0]].assign(ds="again")  # an impression read twice
    parts = [pa.Table.from_pandas(p, preserve_index=False) for p in (frame.iloc[:150], frame.iloc[150:], dup)]
    table = pa.concat_tables([p if "ds" in p.column_names else p.append_column("ds", pa.array([str(i)] * p.num_rows))
                              for i, p in enumerate(parts)], promote_options="default")
    assert table.column("event_id").num_chunks == 3
    before = logged_arrays(table.sort_by(list(TRAIN_ORDER)))
    after = logged_arrays(table, order_by=TRAIN_ORDER)
    assert before.keys() == after.keys() == {"X", "y", "ts", "propensity", "n_candidates", "day"}
    for key, value in before.items():
        assert value.dtype == after[key].dtype and np.array_equal(value, after[key]), key
    assert np.all(np.diff(after["ts"]) >= 0)
    # an impression read twice counts the candidate rows of both reads, as before
    twice = dup["event_id"].iloc[0]
    k = int((frame["event_id"] == twice).sum())
    shown_ids = table.filter(table.column("is_logged")).sort_by(list(TRAIN_ORDER)).column("event_id").to_pylist()
    assert [int(n) for n, e in zip(after["n_candidates"], shown_ids, strict=True) if e == twice] == [2 * k, 2 * k]
