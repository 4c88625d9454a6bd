"""rewards: attribution edge cases, labelling by window end once the plays are complete, late plays, reruns."""

from __future__ import annotations

import datetime as dt
import json

from jobs_fixtures import args, frame, impression, jsonl, play, reward_row, ts
from pyspark.testing import assertDataFrameEqual

from keyart.contracts import REWARDS
from keyart.jobs import ingest, rewards
from keyart.jobs.common import write_day
from keyart.lake import PlaysMarker, day_bounds, mark_plays_delivered, write_plays_marker

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


def write_clean(spark, lake, imps, plays, days, marked=None):
    """Clean partitions of ``days`` as ingest leaves them; plays of the ``marked`` days (default
    all) carry a completeness marker for the whole day."""
    imp_df, play_df = frame(spark, "impressions", imps), frame(spark, "plays", plays)
    for day in days:
        write_day(imp_df.where(imp_df.ts.cast("date") == day), lake.clean("impressions", day))
        write_day(play_df.where(play_df.ts.cast("date") == day), lake.clean("plays", day))
        if marked is None or day in marked:
            mark_clean(lake, day)


def mark_clean(lake, day, through=None):
    write_plays_marker(lake.plays_marker(day, "clean"), PlaysMarker(day, through or day_bounds(day)[1]))


def labelled_ids(spark, lake, *days):
    return sorted(r["event_id"] for d in days if lake.rewards(d).is_dir()
                  for r in spark.read.schema(REWARDS.spark_schema()).parquet(str(lake.rewards(d))).collect())


def test_run_writes_partition_and_metrics_and_rerun_is_identical(spark, lake, settings):
    imps, plays, expected = cases()
    write_clean(spark, lake, imps, plays, ("2026-03-01", DS))
    rewards.run(spark, lake, args("2026-03-01", lake.root), settings)
    assert labelled_ids(spark, lake, "2026-03-01") == ["h"]
    rewards.run(spark, lake, args(DS, lake.root), settings)
    first = spark.read.parquet(str(lake.rewards(DS)))
    assertDataFrameEqual(first, frame(spark, "rewards", expected))
    metrics = json.loads(lake.metrics("rewards", DS).read_text())
    assert (metrics["labelled"], metrics["rewarded"], metrics["played"]) == (9, 3, 4)
    assert (metrics["pending"], metrics["expired"], metrics["still_open"]) == (0, 0, 2)
    rewards.run(spark, lake, args(DS, lake.root), settings)
    assertDataFrameEqual(spark.read.parquet(str(lake.rewards(DS))), frame(spark, "rewards", expected))
    assert json.loads(lake.metrics("rewards", DS).read_text()) == metrics


def test_play_log_outage_labels_nothing_until_the_plays_are_complete(spark, lake, settings):
    """Day 2's plays are not delivered (no marker): its closing windows wait, none becomes a
    negative; once the plays arrive the next run labels them, each impression exactly once."""
    imps, plays, expected = cases()
    days = ("2026-03-01", DS, "2026-03-03")
    write_clean(spark, lake, imps, [p for p in plays if p["ts"].date() != dt.date(2026, 3, 2)], days,
                marked={"2026-03-01", "2026-03-03"})
    for day in ("2026-03-01", DS):
        rewards.run(spark, lake, args(day, lake.root), settings)
    assert labelled_ids(spark, lake, DS) == []  # not nine zeros
    m = json.loads(lake.metrics("rewards", DS).read_text())
    assert (m["labelled"], m["pending"], m["pending_since"], m["expired"]) == (0, 9, DS, 0)
    assert m["pending_by_window_end"] == {DS: 9}
    assert DS in m["plays_incomplete"] and "no completeness marker" in m["plays_incomplete"][DS]
    assert "not complete" in m["pending_reason"]

    # the plays of day 2 are delivered late but whole (ingest reran for the day)
    write_clean(spark, lake, imps, plays, (DS,))
    rewards.run(spark, lake, args("2026-03-03", lake.root), settings)
    m3 = json.loads(lake.metrics("rewards", "2026-03-03").read_text())
    assert (m3["labelled"], m3["labelled_after_waiting"], m3["pending"]) == (11, 9, 0)
    got = spark.read.parquet(str(lake.rewards("2026-03-03")))
    assertDataFrameEqual(got.where("event_id NOT IN ('d', 'i2')"), frame(spark, "rewards", expected))
    assert {r["event_id"]: r["reward"] for r in got.where("event_id IN ('d', 'i2')").collect()} == {"d": 1, "i2": 1}
    everything = labelled_ids(spark, lake, *days)
    assert everything == sorted(i["event_id"] for i in imps)  # each exactly once

    # a rerun of the outage day now finds its windows labelled by day 3: still exactly once
    rewards.run(spark, lake, args(DS, lake.root), settings)
    assert labelled_ids(spark, lake, *days) == everything


def test_windows_wait_across_runs_and_are_labelled_exactly_once(spark):
    """Pure attribution over four runs while the plays of day 2 arrive late: every impression
    is labelled by exactly one run, with the label complete plays give."""
    imps, plays, _ = cases()
    imp_df, play_df = frame(spark, "impressions", imps), frame(spark, "plays", plays)
    truth = {}
    for day in ("2026-03-01", DS, "2026-03-03"):
        truth |= {r["event_id"]: r["reward"] for r in rewards.transform(imp_df, play_df, rewards.RewardParams(day, 4.0, 15.0)).collect()}
    end = {d: day_bounds(d)[1] for d in ("2026-02-28", "2026-03-01", DS, "2026-03-03", "2026-03-04")}
    start2 = day_bounds(DS)[0]
    # what each run finds complete: day 2 has no plays until run 4
    seen = {"2026-03-01": {"2026-02-28": end["2026-03-01"], "2026-03-01": end["2026-03-01"], DS: start2},
            DS: {"2026-03-01": start2, DS: start2},
            "2026-03-03": {"2026-03-01": start2, DS: start2, "2026-03-03": end["2026-03-03"]},
            "2026-03-04": {"2026-03-01": end["2026-03-04"], DS: end["2026-03-04"], "2026-03-03": end["2026-03-04"],
                           "2026-03-04": end["2026-03-04"]}}
    labelled: list[tuple[str, int]] = []
    for day, reach in seen.items():
        elsewhere = spark.createDataFrame([(e,) for e, _ in labelled], "event_id string")
        params = rewards.RewardParams(day, 4.0, 15.0, complete_from=reach, pending_days=7)
        labelled += [(r["event_id"], r["reward"]) for r in rewards.transform(imp_df, play_df, params, elsewhere).collect()]
        if day == DS:
            assert labelled == [("h", 0)]
    assert sorted(e for e, _ in labelled) == sorted(truth)  # exactly once
    assert dict(labelled) == truth  # and never a negative for missing plays


def test_a_window_waits_at_most_pending_days_then_expires(spark):
    imps, plays, _ = cases()
    imp_df, play_df = frame(spark, "impressions", imps), frame(spark, "plays", plays)
    nothing = {d: day_bounds(d)[0] for d in ("2026-03-01", DS, "2026-03-03")}
    params = rewards.RewardParams("2026-03-03", 4.0, 15.0, complete_from=nothing, pending_days=1)
    none = spark.createDataFrame([], "event_id string")
    assert rewards.transform(imp_df, play_df, params, none).count() == 0
    m = rewards.metrics(rewards.transform(imp_df, play_df, params, none), imp_df, params, none)
    # windows that closed on day 2 had their last chance today; those of day 3 may still be labelled
    assert (m["expired"], m["pending"], m["pending_by_window_end"]) == (9, 2, {"2026-03-03": 2})


def test_late_plays_relabel_the_impressions_they_fall_in(spark, lake, settings):
    """A play delivered a day late (within late_play_lookback_days) is ingested as a late play and
    rewrites the labels of the earlier rewards partition; an older one stays quarantined."""
    d1, d2 = "2026-03-01", DS
    for log, day, rows in (
        ("impressions", d1, [impression("e1", f"{d1} 10:00", member="m1"), impression("e2", f"{d1} 12:00", member="m2")]),
        ("impressions", d2, [impression("e3", f"{d2} 09:00", member="m3")]),
        ("plays", d1, [play("m2", "t1", f"{d1} 12:30", 5)]),
        ("plays", d2, [play("m1", "t1", f"{d1} 10:30", 40), play("m2", "t1", f"{d1} 12:40", 30),   # late, in lookback
                       play("m9", "t1", "2026-02-20 08:00", 50),                                    # too late
                       play("m3", "t1", f"{d2} 09:30", 20)]),
    ):
        folder = lake.raw(log, day)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "part-0.jsonl").write_text(jsonl(rows))
    for day in (d1, d2):
        mark_plays_delivered(lake, day)
        ingest.run(spark, lake, args(day, lake.root), settings)
        rewards.run(spark, lake, args(day, lake.root), settings)
        if day == d1:
            before = {r["event_id"]: (r["reward"], r["minutes"], r["played"]) for r in spark.read.parquet(str(lake.rewards(d1))).collect()}
            assert before == {"e1": (0, 0.0, 0), "e2": (0, 5.0, 1)}

    ingested = json.loads(lake.metrics("ingest", d2).read_text())["plays"]
    assert (ingested["read"], ingested["clean"], ingested["late"], ingested["quarantined"], ingested["balanced"]) == (4, 1, 2, 1, True)
    assert spark.read.parquet(str(lake.late_plays(d2))).count() == 2
    reason = spark.read.parquet(str(lake.quarantine("plays", d2))).first()["reason"]
    assert reason.startswith("ts is not in day 2026-03-02 (more than late_play_lookback_days=3 days late)")

    after = {r["event_id"]: (r["reward"], r["minutes"], r["played"]) for r in spark.read.parquet(str(lake.rewards(d1))).collect()}
    assert after == {"e1": (1, 40.0, 1), "e2": (1, 30.0, 1)}
    m = json.loads(lake.metrics("rewards", d2).read_text())
    assert m["late_plays"] == 2 and m["relabelled_rows"] == 2
    assert m["relabelled"] == {d1: {"rows": 2, "rewarded_delta": 2, "played_delta": 1}}
    assert labelled_ids(spark, lake, d2) == ["e3"]

    # idempotent: a rerun finds the labels already right and rewrites nothing
    rewards.run(spark, lake, args(d2, lake.root), settings)
    again = {r["event_id"]: (r["reward"], r["minutes"], r["played"]) for r in spark.read.parquet(str(lake.rewards(d1))).collect()}
    assert again == after and json.loads(lake.metrics("rewards", d2).read_text())["relabelled"] == {}
    assert labelled_ids(spark, lake, d1, d2) == ["e1", "e2", "e3"]


def test_missing_play_partition_labels_nothing_that_needs_it(spark, lake, settings):
    imps, _, _ = cases()
    write_day(frame(spark, "impressions", [i for i in imps if i["ts"].date() == dt.date(2026, 3, 2)]), lake.clean("impressions", DS))
    rewards.run(spark, lake, args(DS, lake.root), settings)
    assert spark.read.parquet(str(lake.rewards(DS))).count() == 0
