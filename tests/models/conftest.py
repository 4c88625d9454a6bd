"""A tiny synthetic lake in the documented layout, shared by the model-step tests."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest

from keyart.feature_spec import N_FEATURES
from keyart.lake import Lake, shift_ds

FIRST_DS = "2026-03-01"
N_DAYS = 4  # three training days and the held-out day
IMPRESSIONS_PER_DAY = 1500
N_TITLES = 12


def true_rate(X: np.ndarray) -> np.ndarray:
    """Ground-truth quality-play probability of synthetic feature rows [n]."""
    z = -1.5 + 3.0 * (X[:, 0] - 0.5) + 2.5 * X[:, 5] * X[:, 10] - 1.0 * X[:, 20]
    return 1.0 / (1.0 + np.exp(-z))


def training_day(ds: str, rng: np.random.Generator, n: int = IMPRESSIONS_PER_DAY) -> pd.DataFrame:
    """Candidate rows of n uniformly logged impressions of day ds."""
    k = rng.integers(2, 5, size=n)
    rows = int(k.sum())
    event = np.repeat([f"e-{ds}-{i:05d}" for i in range(n)], k)
    title = np.repeat([f"t{j:02d}" for j in rng.integers(0, N_TITLES, size=n)], k)
    cand = np.concatenate([np.arange(m) for m in k])
    X = rng.random((rows, N_FEATURES)).astype(np.float32)
    shown = np.array([rng.integers(0, m) for m in k])
    is_logged = cand == np.repeat(shown, k)
    reward_imp = (rng.random(rows) < true_rate(X)).astype(int)[is_logged]
    start = np.datetime64(f"{ds}T00:00:00")
    ts = start + np.repeat(np.sort(rng.integers(0, 86_400, size=n)), k).astype("timedelta64[s]")
    alpha = 1.0 + rng.random(rows) * 20
    return pd.DataFrame({
        "event_id": event, "impression_ds": dt.date.fromisoformat(ds), "ts": ts,
        "member_id": np.repeat([f"m{j:04d}" for j in rng.integers(0, 300, size=n)], k),
        "title_id": title, "artwork_id": [f"{t}-a{c}" for t, c in zip(title, cand, strict=True)],
        "is_logged": is_logged, "logged_artwork_id": "", "propensity": 1.0 / np.repeat(k, k),
        "policy": "random", "model_version": "random",
        "reward": np.repeat(reward_imp, k), "minutes": 0.0, "played": np.repeat(reward_imp, k),
        "segment": "profile=adult", "prior_alpha": alpha, "prior_beta": alpha * 6,
        "prior_n": rng.random(rows) * 200, "features": list(X),
    })


def build_lake(root, seed: int = 0) -> Lake:
    lake = Lake(root)
    rng = np.random.default_rng(seed)
    for i in range(N_DAYS):
        ds = shift_ds(FIRST_DS, i)
        part = lake.training(ds)
        part.mkdir(parents=True)
        training_day(ds, rng).to_parquet(part / "part-0.parquet", index=False)
    last = shift_ds(FIRST_DS, N_DAYS - 1)
    titles = pd.DataFrame({"title_id": [f"t{j:02d}" for j in range(N_TITLES)], "name": "x",
                           "genres": [["drama", "comedy"]] * N_TITLES, "cast": [[]] * N_TITLES,
                           "maturity_rating": "PG"})
    arts = pd.DataFrame([{"artwork_id": f"t{j:02d}-a{c}", "title_id": f"t{j:02d}",
                          "tags": ["tone:drama"], "is_default": c == 0,
                          "active_from": dt.date(2026, 1, 1),
                          "active_to": dt.date(2026, 2, 1) if c == 4 else None}
                         for j in range(N_TITLES) for c in range(5)])
    for path, frame in ((lake.titles, titles), (lake.artworks, arts)):
        path.mkdir(parents=True)
        frame.to_parquet(path / "part-0.parquet", index=False)
    priors = arts[["title_id", "artwork_id"]].assign(segment="all", alpha=2.0, beta=18.0, n_impressions=20.0)
    members = pd.DataFrame({"member_id": ["m0001"], "member_is_kids": [0], "member_log_plays_28d": [1.0],
                            "member_days_since_last_play": [2.0], "affinity_tags": [["genre:drama"]],
                            "affinity_values": [[1.0]]})
    for path, frame in ((lake.priors(last), priors), (lake.member_features(last), members)):
        path.mkdir(parents=True)
        frame.to_parquet(path / "part-0.parquet", index=False)
    return lake


@pytest.fixture(name="true_rate", scope="session")
def _true_rate():
    return true_rate


@pytest.fixture(scope="session")
def lake_template(tmp_path_factory) -> Lake:
    return build_lake(tmp_path_factory.mktemp("lake"))


@pytest.fixture(scope="session")
def trained_run(lake_template):
    """The synthetic lake with a trained run for its last day: (lake, ds)."""
    from keyart.models.reward_model import TrainConfig
    from keyart.models.train import train_run

    ds = shift_ds(FIRST_DS, N_DAYS - 1)
    train_run(lake_template, ds, window_days=7, cfg=TrainConfig(min_data_in_leaf=20, num_boost_round=200))
    return lake_template, ds
