"""Reward model: weights, split, metrics and a fit on synthetic data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from keyart.feature_spec import N_FEATURES
from keyart.models.data import feature_array
from keyart.models.reward_model import (
    TrainConfig,
    classification_metrics,
    importance_weights,
    logged_rows,
    time_split,
    train_reward_model,
    weighted_auc,
)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"learning_rate": 0.0}, "learning_rate"),
    ({"num_leaves": 1}, "num_leaves"),
    ({"min_data_in_leaf": 0}, "min_data_in_leaf"),
    ({"feature_fraction": 1.5}, "feature_fraction"),
    ({"num_boost_round": 0}, "num_boost_round"),
    ({"valid_fraction": 0.6}, "valid_fraction"),
    ({"max_weight": 0.5}, "max_weight"),
])
def test_train_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


@pytest.mark.parametrize(("p", "k", "match"), [
    ([0.5, 0.0], [2, 2], r"propensity must be in \(0, 1\]"),
    ([0.5, 1.2], [2, 2], r"propensity must be in \(0, 1\]"),
    ([0.5, 0.5], [2, 0], "n_candidates must be >= 1"),
    ([0.5], [2, 2], "differ in shape"),
])
def test_importance_weights_reject_bad_input(p, k, match):
    with pytest.raises(ValueError, match=match):
        importance_weights(np.array(p), np.array(k))


def test_uniform_logging_is_not_weighted():
    np.testing.assert_array_equal(importance_weights(np.array([0.5, 0.25, 1 / 3]), np.array([2, 4, 3])), 1.0)


def test_non_uniform_logging_is_reweighted_to_uniform_and_clipped():
    w = importance_weights(np.array([0.9, 0.05, 0.001]), np.array([2, 2, 2]), max_weight=20.0)
    raw = np.array([0.5 / 0.9, 0.5 / 0.05, 20.0])  # the last is clipped from 500
    np.testing.assert_allclose(w, raw / raw.mean())
    assert w.mean() == pytest.approx(1.0)


def test_time_split_holds_out_the_newest_rows():
    ts = np.array([5, 1, 4, 2, 3, 9, 0, 8, 7, 6])
    tr, va = time_split(ts, 0.2)
    assert sorted(ts[va]) == [8, 9]
    assert len(tr) == 8


def test_weighted_auc_matches_pair_counting():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = np.round(rng.random(200), 1)  # many ties
    w = rng.random(200)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    num = sum(w[i] * w[j] * ((p[i] > p[j]) + 0.5 * (p[i] == p[j])) for i in pos for j in neg)
    assert weighted_auc(y, p, w) == pytest.approx(num / (w[pos].sum() * w[neg].sum()))
    assert np.isnan(weighted_auc(np.ones(3), np.array([0.1, 0.2, 0.3])))


def test_calibrated_predictions_have_small_ece():
    rng = np.random.default_rng(1)
    p = rng.uniform(0.05, 0.6, 100_000)
    y = (rng.random(len(p)) < p).astype(float)
    m = classification_metrics(y, p)
    assert m["ece"] < 0.01
    assert m["calibration_ratio"] == pytest.approx(1.0, abs=0.02)
    assert classification_metrics(y, np.clip(p * 1.5, 0, 1))["ece"] > 0.05


def test_logged_rows_need_one_shown_row_per_impression():
    frame = pd.DataFrame({"event_id": ["a", "a", "b", "b"], "is_logged": [True, True, False, True],
                          "reward": 0, "propensity": 0.5, "ts": 0})
    with pytest.raises(ValueError, match="more than one is_logged row"):
        logged_rows(frame)
    ok = logged_rows(frame.assign(is_logged=[True, False, False, True]))
    assert ok["n_candidates"].tolist() == [2, 2]
    with pytest.raises(KeyError, match="lacks column 'ts'"):
        logged_rows(frame.drop(columns=["ts"]))


def test_feature_rows_of_the_wrong_length_are_refused():
    import pyarrow as pa

    with pytest.raises(ValueError, match=f"must have {N_FEATURES} values"):
        feature_array(pa.array([[0.0] * N_FEATURES, [0.0] * 3]))


def test_model_learns_the_signal(true_rate):
    rng = np.random.default_rng(2)
    n = 20_000
    X = rng.random((n, N_FEATURES)).astype(np.float32)
    y = (rng.random(n) < true_rate(X)).astype(float)
    res = train_reward_model(X, y, np.arange(n), np.full(n, 0.5), np.full(n, 2),
                             TrainConfig(num_boost_round=200, min_data_in_leaf=50))
    v = res.metrics["valid"]
    assert v["auc"] > 0.72
    assert v["ece"] < 0.03
    assert not res.info["importance_weighted"]
    assert res.booster.num_feature() == N_FEATURES


@pytest.mark.parametrize(("mutate", "match"), [
    (lambda X, y: (X[:, :5], y), "X must be"),
    (lambda X, y: (X, y * 2), "rewards must be 0 or 1"),
    (lambda X, y: (np.where(X > 0.99, np.nan, X), y), "NaN or infinite"),
    (lambda X, y: (X, y[:-1]), "same rows"),
])
def test_training_rejects_bad_input(mutate, match):
    X = np.random.default_rng(0).random((100, N_FEATURES)).astype(np.float32)
    y = np.arange(100) % 2.0
    X2, y2 = mutate(X, y)
    with pytest.raises(ValueError, match=match):
        train_reward_model(X2, y2, np.arange(100), np.full(100, 0.5), np.full(100, 2))
