"""Reward model: weights, split, metrics and a fit on synthetic data."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from keyart.feature_spec import N_FEATURES
from keyart.models.data import feature_array
from keyart.models.reward_model import (
    TrainConfig,
    classification_metrics,
    effective_size,
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


def test_binary_feature_rows_round_trip_and_bad_ones_are_refused():
    import pyarrow as pa

    from keyart.feature_spec import pack_rows, unpack_rows

    X = np.random.default_rng(0).standard_normal((5, N_FEATURES)).astype(np.float32)
    X[1, 3], X[2, 0] = np.nan, -0.0
    packed = pack_rows(X)
    assert packed.type == pa.binary() and len(packed) == 5
    assert bytes(packed[0].as_py()) == X[0].astype("<f4").tobytes()  # little-endian float32, the stored form
    np.testing.assert_array_equal(feature_array(packed), X)
    np.testing.assert_array_equal(feature_array(pa.chunked_array([packed.slice(0, 2), packed.slice(2)])), X)
    np.testing.assert_array_equal(feature_array(packed.slice(3)), X[3:])  # an offset slice
    with pytest.raises(ValueError, match=f"must have {N_FEATURES} values"):
        unpack_rows(pa.array([X[0].tobytes(), X[0].tobytes()[:-4]], pa.binary()))
    with pytest.raises(ValueError, match="1 null rows"):
        unpack_rows(pa.array([X[0].tobytes(), None], pa.binary()))
    with pytest.raises(ValueError, match=r"must be \[n, "):
        pack_rows(X[:, :3])


def test_a_window_spanning_list_and_binary_partitions_reads_as_one(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from keyart.feature_spec import pack_rows
    from keyart.lake import Lake
    from keyart.models.data import read_training

    lake = Lake(tmp_path)
    X = np.random.default_rng(1).random((4, N_FEATURES)).astype(np.float32)
    for day, features in (("2026-03-01", pa.array(list(X[:2]), pa.list_(pa.float32()))), ("2026-03-02", pack_rows(X[2:]))):
        lake.training(day).mkdir(parents=True)
        pq.write_table(pa.table({"event_id": ["a", "b"], "features": features}), lake.training(day) / "part-0.parquet")
    table = read_training(lake, ["2026-03-01", "2026-03-02"], columns=["event_id", "features"])
    assert table.column("features").type == pa.binary()
    np.testing.assert_array_equal(feature_array(table.column("features")), X)


def test_list_features_become_binary_in_slices_one_array_can_hold(monkeypatch):
    import pyarrow as pa

    from keyart import feature_spec
    from keyart.models import data

    X = np.random.default_rng(2).random((7, N_FEATURES)).astype(np.float32)
    lists = pa.chunked_array([pa.array(list(X[:5]), pa.list_(pa.float32())), pa.array(list(X[5:]), pa.list_(pa.float32()))])
    monkeypatch.setattr(feature_spec, "MAX_PACKED_ROWS", 2)
    monkeypatch.setattr(data, "MAX_PACKED_ROWS", 2)
    with pytest.raises(ValueError, match="too many"):
        feature_spec.pack_rows(X[:3])
    out = data.binary_features(pa.table({"event_id": [str(i) for i in range(7)], "features": lists})).column("features")
    assert out.type == pa.binary() and [len(c) for c in out.chunks] == [2, 2, 1, 2]
    np.testing.assert_array_equal(feature_array(out), X)


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


def test_weightings_sqrt_and_none():
    p, k = np.array([0.9, 0.05, 0.001]), np.array([2, 2, 2])
    clipped = np.array([0.5 / 0.9, 0.5 / 0.05, 20.0])
    np.testing.assert_allclose(importance_weights(p, k, 20.0, "sqrt"), np.sqrt(clipped) / np.sqrt(clipped).mean())
    np.testing.assert_array_equal(importance_weights(p, k, 20.0, "none"), 1.0)
    with pytest.raises(ValueError, match="weighting must be one of"):
        importance_weights(p, k, 20.0, "full")
    assert effective_size(np.ones(10)) == pytest.approx(10)
    assert effective_size(importance_weights(p, k, 20.0, "clipped")) < effective_size(importance_weights(p, k, 20.0, "sqrt")) < 3


def test_weighting_is_a_setting():
    from keyart.config import Settings
    from keyart.models.train import train_config

    assert train_config(Settings()).weighting == Settings().train_weighting == TrainConfig().weighting
    assert train_config(Settings(train_weighting="sqrt")).weighting == "sqrt"
    with pytest.raises(ValueError, match="weighting"):
        TrainConfig(weighting="full")


def test_validation_is_pooled_over_days():
    """The newest share of every labelled day, not the tail of the last day alone."""
    ts = np.r_[np.arange(100), np.arange(100, 200), np.arange(200, 210)]
    day = np.repeat(["d1", "d2", "d3"], [100, 100, 10])
    tr, va = time_split(ts, 0.2, day)
    assert sorted(ts[va]) == [*range(80, 100), *range(180, 200), 208, 209]
    assert len(tr) + len(va) == len(ts) and not set(tr) & set(va)
    tr1, va1 = time_split(ts, 0.2)  # without days: the newest 20% overall (days 2 and 3 only)
    assert ts[va1].min() >= 168


def test_trees_floor_follows_the_learning_rate():
    assert TrainConfig().trees_floor() == 45  # (1 - 0.05)^45 < 0.1
    assert TrainConfig(learning_rate=0.1).trees_floor() == 22
    assert TrainConfig(min_trees=5).trees_floor() == 5
    assert TrainConfig(num_boost_round=30).trees_floor() == 30
    with pytest.raises(ValueError, match="min_trees"):
        TrainConfig(min_trees=0)


def _day(rng, n, t0, effect):
    """n synthetic logged rows; feature 3 has effect ``effect`` on the logit."""
    X = rng.random((n, N_FEATURES)).astype(np.float32)
    z = -2.5 + 1.5 * X[:, 0] + effect * X[:, 3]
    y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(float)
    return X, y, t0 + np.arange(n)


def test_shipped_model_is_refit_on_every_row_with_the_chosen_tree_count():
    """The newest rows (the validation tail) teach the shipped model too."""
    rng = np.random.default_rng(0)
    X, y, ts = _day(rng, 6000, 0, effect=0.0)
    X[-900:, 7] = 1.0  # something only the newest rows show: a launch late in the day ...
    X[:-900, 7] = 0.0
    y[-900:] = (rng.random(900) < 0.6).astype(float)  # ... that does very well
    cfg = TrainConfig(min_data_in_leaf=50, learning_rate=0.1, num_boost_round=150, early_stopping_rounds=20)
    res = train_reward_model(X, y, ts, np.full(len(y), 0.5), np.full(len(y), 2), cfg)
    assert res.info["refit"] and res.info["rows"]["fit"] == len(y)
    assert res.booster.num_trees() == res.info["best_iteration"] >= cfg.trees_floor()
    probe = X[:200].copy()
    probe[:, 7] = 1.0
    assert res.booster.predict(probe).mean() > 0.3  # the refit model learned it
    no_refit = train_reward_model(X, y, ts, np.full(len(y), 0.5), np.full(len(y), 2), replace(cfg, refit=False))
    assert no_refit.booster.predict(probe, num_iteration=no_refit.booster.best_iteration).mean() < 0.2


def test_noisy_small_day_still_gets_the_floor_of_trees():
    # no signal beyond feature 0: early stopping turns at once (on this seed's noise; the draw depends on
    # N_FEATURES, so the seed is one where the curve turns early, which the assertion checks)
    rng = np.random.default_rng(2)
    X, y, ts = _day(rng, 1500, 0, effect=0.0)
    res = train_reward_model(X, y, ts, np.full(len(y), 0.5), np.full(len(y), 2))
    assert res.info["early_stopping_iteration"] < res.info["best_iteration"] == TrainConfig().trees_floor()


def test_adding_a_day_of_data_does_not_make_the_model_worse_on_average():
    """Capacity chosen robustly: over seeds, two days of logs fit fresh data at least as well as one."""
    gain = []
    cfg = TrainConfig(learning_rate=0.1, num_boost_round=150, early_stopping_rounds=20)
    for seed in range(4):
        rng = np.random.default_rng(100 + seed)
        X1, y1, t1 = _day(rng, 3000, 0, effect=1.0)
        X2, y2, t2 = _day(rng, 3000, 10_000, effect=1.0)
        Xt, yt, _ = _day(rng, 5000, 0, effect=1.0)
        truth = 1 / (1 + np.exp(-(-2.5 + 1.5 * Xt[:, 0] + 1.0 * Xt[:, 3])))

        fits = []
        for X, y, ts, day in ((X1, y1, t1, np.repeat("d1", len(y1))),
                              (np.vstack([X1, X2]), np.r_[y1, y2], np.r_[t1, t2], np.repeat(["d1", "d2"], [len(y1), len(y2)]))):
            res = train_reward_model(X, y, ts, np.full(len(y), 0.5), np.full(len(y), 2), cfg, day=day)
            fits.append(float(np.mean((res.booster.predict(Xt) - truth) ** 2)))
        gain.append(fits[0] - fits[1])
    assert np.mean(gain) > 0, gain
