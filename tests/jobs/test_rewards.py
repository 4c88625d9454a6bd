"""rewards: attribution edge cases, stateless labelling by window end, reruns."""

from __future__ import annotations

import datetime as dt
import json

from jobs_fixtures import args, frame, impression, play, reward_row, ts
from pyspark.testing import assertDataFrameEqual

from keyart.jobs import rewards
from keyart.jobs.common import write_day

DS = "2026-03-02"
PARAMS = rewards.RewardParams(DS, attribution_window_hours=4.0, quality_play_minutes=15.0)


def cases():
    """(impressions, plays, expected reward rows)."""
    a = impression("a", "2026-03-02 10:00", member="ma")
    b1 = impression("b1", "2026-03-02 10:00", member="mb")
    b2 = impression("b2", "2026-03-02 11:00", member="mb")
    c = impression("c", "2026-03-02 10:00", member="mc")
    d = impression("d", "2026-03-02 21:00", member="md")
    e = impression("e", "2026-03-01 22:00", member="me")
    f = impression("f", "2026-03-02 10:00", member="mf")
    g = impression("g", "2026-03-02 10:00", member="mg")
    h = impression("h", "2026-03-01 19:00", member="mh")
    i1 = impression("i1", "2026-03-02 19:00", member="mi")
    i2 = impression("i2", "2026-03-02 21:00", member="mi")
    other = impression("o", "2026-03-02 10:00", member="mo", title="t2", artwork="t2-a0", candidates=["t2-a0"], propensity=1.0)
    plays = [
        play("ma", "t1", "2026-03-02 09:00", 60),   # before the impression
        play("mb", "t1", "2026-03-02 11:30", 40),   # latest of two impressions gets it
        play("mc", "t1", "2026-03-02 14:00", 30),   # at window end: outside (half-open)
        play("mc", "t1", "2026-03-02 15:00", 30),   # outside
        play("md", "t1", "2026-03-02 21:30", 30),   # window still open at end of day
        play("me", "t1", "2026-03-02 00:30", 20),   # crosses midnight
        play("mf", "t1", "2026-03-02 10:10", 5),    # short play: played, not quality
        play("mg", "t1", "2026-03-02 10:05", 5),
        play("mg", "t1", "2026-03-02 11:00", 50),   # longest credited play counts
        play("mi", "t1", "2026-03-02 21:30", 60),   # credited to i2 (later, still open), not i1
        play("mo", "t1", "2026-03-02 10:30", 60),   # other title: no credit for t2
    ]
    expected = [
        reward_row(a, 0), reward_row(b1, 0), reward_row(b2, 1, 40.0), reward_row(c, 0), reward_row(e, 1, 20.0),
        reward_row(f, 0, 5.0), reward_row(g, 1, 50.0), reward_row(i1, 0), reward_row(other, 0),
    ]
    return [a, b1, b2, c, d, e, f, g, h, i1, i2, other], plays, expected


def test_attribution_edge_cases(spark):
    imps, plays, expected = cases()
    got = rewards.transform(frame(spark, "impressions", imps), frame(spark, "plays", plays), PARAMS)
    assertDataFrameEqual(got, frame(spark, "rewards", expected))


def test_each_impression_is_labelled_by_exactly_one_run(spark):
    imps, plays, _ = cases()
    imp_df, play_df = frame(spark, "impressions", imps), frame(spark, "plays", plays)
    labelled = []
    for day in ("2026-03-01", "2026-03-02", "2026-03-03"):
        p = rewards.RewardParams(day, 4.0, 15.0)
        labelled += [r["event_id"] for r in rewards.transform(imp_df, play_df, p).collect()]
    assert sorted(labelled) == sorted(i["event_id"] for i in imps)
    nxt = rewards.transform(imp_df, play_df, rewards.RewardParams("2026-03-03", 4.0, 15.0))
    assert {r["event_id"]: r["reward"] for r in nxt.collect()} == {"d": 1, "i2": 1}


def test_windows_beyond_the_available_plays_stay_unlabelled(spark):
    imps, plays, _ = cases()
    through = ts("2026-03-02 13:00")
    got = rewards.transform(frame(spark, "impressions", imps), frame(spark, "plays", plays),
                            rewards.RewardParams(DS, 4.0, 15.0, plays_through=through))
    assert {r["event_id"] for r in got.collect()} == {"e"}


def test_input_days_cover_the_window():
    assert rewards.input_days(DS, 4.0) == ["2026-03-01", DS]
    assert rewards.input_days(DS, 48.0) == ["2026-02-28", "2026-03-01", DS]


def test_run_writes_partition_and_metrics_and_rerun_is_identical(spark, lake, settings):
    imps, plays, expected = cases()
    imp_df, play_df = frame(spark, "impressions", imps), frame(spark, "plays", plays)
    for day in ("2026-03-01", DS):
        write_day(imp_df.where(imp_df.ts.cast("date") == day), lake.clean("impressions", day))
        write_day(play_df.where(play_df.ts.cast("date") == day), lake.clean("plays", day))
    rewards.run(spark, lake, args(DS, lake.root), settings)
    first = spark.read.parquet(str(lake.rewards(DS)))
    assertDataFrameEqual(first, frame(spark, "rewards", expected))
    metrics = json.loads(lake.metrics("rewards", DS).read_text())
    assert (metrics["labelled"], metrics["rewarded"], metrics["played"]) == (9, 3, 4)
    rewards.run(spark, lake, args(DS, lake.root), settings)
    assertDataFrameEqual(spark.read.parquet(str(lake.rewards(DS))), frame(spark, "rewards", expected))
    assert json.loads(lake.metrics("rewards", DS).read_text()) == metrics


def test_missing_play_partition_labels_nothing_that_needs_it(spark, lake, settings):
    imps, _, _ = cases()
    write_day(frame(spark, "impressions", [i for i in imps if i["ts"].date() == dt.date(2026, 3, 2)]), lake.clean("impressions", DS))
    rewards.run(spark, lake, args(DS, lake.root), settings)
    assert spark.read.parquet(str(lake.rewards(DS))).count() == 0
