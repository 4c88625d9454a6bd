"""features: member snapshot arithmetic, training rows, parity with keyart.feature_spec, reruns."""

from __future__ import annotations

import datetime as dt
import math

import numpy as np
import pandas as pd
from jobs_fixtures import args, artwork, frame, impression, member, play, prior, reward_row, title
from pyspark.sql import functions as F
from pyspark.testing import assertDataFrameEqual

from keyart import feature_spec
from keyart.jobs import features
from keyart.jobs.common import write_day

DS = "2026-03-02"
PARAMS = features.SnapshotParams(DS, history_days=90, affinity_half_life_days=30.0)


def catalog(spark):
    titles = frame(spark, "titles", [title("t1", ["drama"], ["a"]), title("t2", ["comedy"])])
    artworks = frame(spark, "artworks", [
        artwork("t1-a0", "t1", ["cast:a", "tone:drama", "closeup"], is_default=True),
        artwork("t1-a1", "t1", ["tone:comedy"]),
        artwork("t2-a0", "t2", [], is_default=True),
    ])
    return titles, artworks


def test_member_snapshot_time_decayed_shares(spark):
    titles, _ = catalog(spark)
    plays = frame(spark, "plays", [
        play("m1", "t1", "2026-03-02 12:00", 60),   # age 0.5 d
        play("m1", "t2", "2026-02-01 00:00", 40),   # age 30 d = one half-life
        play("m1", "t1", "2025-11-01 00:00", 99),   # older than history_days
        play("m1", "t2", "2026-03-03 01:00", 99),   # after the snapshot
        play("m3", "t1", "2026-03-02 12:00", 10),   # not a member
    ])
    members = frame(spark, "members", [member("m1"), member("m2", "kids")])
    got = {r["member_id"]: r for r in features.member_snapshot(plays, titles, members, PARAMS).collect()}
    assert set(got) == {"m1", "m2"}
    w1, w2 = 60 * 0.5 ** (0.5 / 30), 20.0
    m1 = got["m1"]
    assert m1["member_is_kids"] == 0
    assert m1["member_log_plays_28d"] == math.log1p(1)
    assert math.isclose(m1["member_days_since_last_play"], 0.5)
    assert m1["affinity_tags"] == ["cast:a", "genre:comedy", "genre:drama"]
    np.testing.assert_allclose(m1["affinity_values"], [w1 / (w1 + w2), w2 / (w1 + w2), w1 / (w1 + w2)])
    m2 = got["m2"]
    assert (m2["member_is_kids"], m2["member_log_plays_28d"], m2["member_days_since_last_play"]) == (1, 0.0, feature_spec.DAYS_SINCE_CAP)
    assert m2["affinity_tags"] == [] and m2["affinity_values"] == []


def training_inputs(spark):
    e1 = impression("e1", "2026-03-02 10:00", member="m1", artwork="t1-a1", candidates=["t1-a0", "t1-a1"], propensity=0.5)
    e2 = impression("e2", "2026-03-01 23:00", member="m9", title="t2", artwork="t2-a0", candidates=["t2-a0"], propensity=1.0)
    rewards = frame(spark, "rewards", [reward_row(e1, 1, 30.0), reward_row(e2, 0)])
    snap = pd.DataFrame([{"member_id": "m1", "member_is_kids": 0, "member_log_plays_28d": 1.5, "member_days_since_last_play": 2.0,
                          "affinity_tags": ["cast:a", "genre:drama"], "affinity_values": [0.8, 0.5]}])
    snapshots = spark.createDataFrame(snap, features.SNAPSHOT_SCHEMA).withColumn("snapshot_ds", F.lit("2026-03-01").cast("date"))
    priors = frame(spark, "priors", [prior("t1", "t1-a0", 2, 8, 10), prior("t1", "t1-a1", 5, 5, 10),
                                     prior("t1", "t1-a1", 6, 4, 10, "profile=adult")])
    priors = priors.withColumn("prior_ds", F.lit("2026-03-01").cast("date"))
    titles, artworks = catalog(spark)
    return rewards, snapshots, priors, artworks, titles


def expected_features() -> dict[tuple[str, str], np.ndarray]:
    """The same rows assembled by hand and passed to keyart.feature_spec directly."""
    ctx = {"device": "tv", "local_hour": 20, "day_of_week": 2, "page_row": 0, "position": 1}
    known = {"member_known": 1, "member_is_kids": 0, "member_log_plays_28d": 1.5, "member_days_since_last_play": 2.0,
             "affinity_tags": ["cast:a", "genre:drama"], "affinity_values": [0.8, 0.5]}
    rows = [
        {**known, **ctx, "art_tags": ["cast:a", "tone:drama", "closeup"], "art_is_default": 1, "title_genres": ["drama"]},
        {**known, **ctx, "art_tags": ["tone:comedy"], "art_is_default": 0, "title_genres": ["drama"]},
        {**feature_spec.UNKNOWN_MEMBER, **ctx, "art_tags": [], "art_is_default": 1, "title_genres": ["comedy"]},
    ]
    nan = float("nan")
    pri = feature_spec.prior_inputs([2, 5, nan], [8, 5, nan], [10, 10, nan], [nan, 6, nan], [nan, 4, nan], ["e1", "e1", "e2"])
    inputs = pd.DataFrame(rows)
    for k, v in pri.items():
        inputs[k] = v
    matrix = feature_spec.feature_matrix(inputs)
    return {("e1", "t1-a0"): matrix[0], ("e1", "t1-a1"): matrix[1], ("e2", "t2-a0"): matrix[2]}


def test_training_rows_and_feature_parity(spark):
    got = features.transform(*training_inputs(spark)).collect()
    by_key = {(r["event_id"], r["artwork_id"]): r for r in got}
    expected = expected_features()
    assert set(by_key) == set(expected)
    for key, vector in expected.items():
        assert len(by_key[key]["features"]) == feature_spec.N_FEATURES
        np.testing.assert_array_equal(np.asarray(by_key[key]["features"], dtype=np.float32), vector)
    a0, a1, other = by_key[("e1", "t1-a0")], by_key[("e1", "t1-a1")], by_key[("e2", "t2-a0")]
    assert (a0["is_logged"], a1["is_logged"], other["is_logged"]) == (False, True, True)
    assert (a1["prior_alpha"], a1["prior_beta"], a1["prior_n"], a1["segment"]) == (5.0, 5.0, 10.0, "profile=adult")
    assert (other["prior_alpha"], other["prior_beta"], other["prior_n"]) == (*feature_spec.DEFAULT_PRIOR, 0.0)
    assert (a1["reward"], a1["minutes"], a1["played"], a1["logged_artwork_id"]) == (1, 30.0, 1, "t1-a1")
    assert other["impression_ds"] == dt.date(2026, 3, 1) and other["ts"] == dt.datetime(2026, 3, 1, 23, 0)


def test_impressions_split_across_arrow_batches_keep_their_title_mean(spark):
    inputs = training_inputs(spark)
    whole = features.transform(*inputs)
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "1")
    try:
        split = features.transform(*inputs).collect()
    finally:
        spark.conf.unset("spark.sql.execution.arrow.maxRecordsPerBatch")
    assertDataFrameEqual(split, whole.collect())


def test_run_writes_snapshot_and_training_and_rerun_is_identical(spark, lake, settings):
    rewards, _, priors, artworks, titles = training_inputs(spark)
    titles.write.parquet(str(lake.titles))
    artworks.write.parquet(str(lake.artworks))
    frame(spark, "members", [member("m1"), member("m9", "kids")]).write.parquet(str(lake.members))
    write_day(frame(spark, "plays", [play("m1", "t1", "2026-02-28 20:00", 50)]), lake.clean("plays", "2026-02-28"))
    write_day(rewards, lake.rewards(DS))
    write_day(priors.drop("prior_ds"), lake.priors("2026-03-01"))
    features.run(spark, lake, args(DS, lake.root), settings)
    snapshot = spark.read.parquet(str(lake.member_features(DS)))
    training = spark.read.parquet(str(lake.training(DS)))
    assert snapshot.count() == 2 and training.count() == 3
    m1 = training.where("event_id = 'e1'").first()
    assert m1["features"][feature_spec.FEATURE_NAMES.index("member_known")] == 1.0  # snapshot of 03-01 computed from plays
    first_snap, first_train = snapshot.collect(), training.collect()
    features.run(spark, lake, args(DS, lake.root), settings)
    assertDataFrameEqual(spark.read.parquet(str(lake.member_features(DS))), first_snap)
    assertDataFrameEqual(spark.read.parquet(str(lake.training(DS))), first_train)
