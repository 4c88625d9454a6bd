"""The play log's completeness marker (keyart.lake), the simulator writing it, and the
data-quality band on plays per impression and the quality-play rate (keyart.pipeline)."""

from __future__ import annotations

import copy
import datetime as dt
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from keyart import pipeline
from keyart.contracts import PLAYS
from keyart.lake import (
    Lake,
    PlaysMarker,
    mark_plays_delivered,
    parse_plays_marker,
    raw_rows,
    read_plays_marker,
)
from keyart.sim.choosers import RandomChooser
from keyart.sim.traffic import simulate_day
from keyart.sim.world import World

DS = "2026-03-02"


# --- the marker ---------------------------------------------------------------------------

def test_marker_is_parsed_validated_and_clamped_to_its_day():
    marker, why = parse_plays_marker('{"ds": "2026-03-02", "delivered_through": "2026-03-03T06:00:00Z", "rows": 7}', DS)
    assert why is None and marker.rows == 7 and marker.whole_day
    assert marker.covered_until == dt.datetime(2026, 3, 3, tzinfo=dt.UTC)
    partial, _ = parse_plays_marker('{"ds": "2026-03-02", "delivered_through": "2026-03-02T18:30:00"}', DS)
    assert partial.rows is None and not partial.whole_day and partial.covered_until.hour == 18
    for text, reason in (
        ("{not json", "is not JSON"),
        ('{"ds": "2026-03-02"}', "delivered_through is missing"),
        ('{"ds": "2026-03-02", "delivered_through": "soon"}', "delivered_through must be an ISO-8601"),
        ('{"ds": "2026-03-02", "delivered_through": "2026-03-03T00:00:00Z", "rows": -1}', "rows must be >= 0"),
        ('{"ds": "2026-03-01", "delivered_through": "2026-03-02T00:00:00Z"}', "is for ds=2026-03-01, not 2026-03-02"),
    ):
        marker, why = parse_plays_marker(text, DS)
        assert marker is None and why.startswith(reason), (text, why)


def test_mark_plays_delivered_counts_rows_as_ingest_reads_them(tmp_path):
    lake = Lake(tmp_path)
    folder = lake.raw("plays", DS)
    folder.mkdir(parents=True)
    (folder / "a.jsonl").write_text('{"x": 1}\n\n   \n{"x": 2}\n{"x": 3}')  # blank lines are skipped
    pq.write_table(pa.Table.from_pylist([], schema=PLAYS.arrow_schema()), folder / "b.parquet")
    assert raw_rows(folder) == 3
    mark_plays_delivered(lake, DS)
    marker, why = read_plays_marker(lake.plays_marker(DS), DS)
    assert why is None and marker == PlaysMarker(DS, dt.datetime(2026, 3, 3, tzinfo=dt.UTC), 3)
    assert raw_rows(folder) == 3  # the marker itself is not a row
    assert read_plays_marker(lake.plays_marker("2026-03-03"), "2026-03-03")[1].startswith("no completeness marker")


def test_simulated_traffic_marks_each_day_it_completes(tmp_path):
    world = World.build(seed=3, n_titles=12, n_members=60, history_days=1, start=DS)
    world.save(tmp_path)
    lake = Lake(tmp_path)
    simulate_day(world, DS, RandomChooser(), visits=80, lake_root=tmp_path)
    marker, why = read_plays_marker(lake.plays_marker(DS), DS)
    assert why is None and marker.whole_day and marker.rows == raw_rows(lake.raw("plays", DS)) > 0
    assert not lake.plays_marker("2026-03-03").exists()  # only the plays that crossed midnight so far
    simulate_day(world, "2026-03-03", RandomChooser(), visits=80, lake_root=tmp_path)
    nxt, _ = read_plays_marker(lake.plays_marker("2026-03-03"), "2026-03-03")
    assert nxt.rows == raw_rows(lake.raw("plays", "2026-03-03"))
    # rerunning the earlier day rewrites its spill into the next partition: the count follows
    simulate_day(world, DS, RandomChooser(), visits=40, seed=9, lake_root=tmp_path)
    again, _ = read_plays_marker(lake.plays_marker("2026-03-03"), "2026-03-03")
    assert again.rows == raw_rows(lake.raw("plays", "2026-03-03"))


# --- the data-quality band ------------------------------------------------------------------

def day_metrics(impressions=1000, plays=300, quality=60, complete=True, reason=None):
    return {
        "step": "ingest",
        "impressions": {"read": impressions, "clean": impressions, "quarantined": 0, "duplicates": 0},
        "plays": {"read": plays, "clean": plays, "quarantined": 0, "duplicates": 0, "late": 0, "quality": quality,
                  "completeness": {"complete": complete, "delivered_through": None, "reason": reason}},
    }


HISTORY = [day_metrics(1000, 290, 58), day_metrics(1200, 360, 72), day_metrics(900, 270, 54), day_metrics(1000, 310, 62)]


def check(today, history=HISTORY, **kw):
    return pipeline.check_ingest_metrics(today, DS, 0.05, history=history, **kw)


def test_band_passes_a_normal_day_and_reports_it():
    summary = check(day_metrics(1100, 340, 66))
    band = summary["band"]
    assert band["plays_per_impression"]["days"] == 4 and band["plays_per_impression"]["median"] == pytest.approx(0.3)
    assert band["quality_play_rate"]["low"] == pytest.approx(0.5 * band["quality_play_rate"]["median"])
    assert summary["plays"]["complete"] is True
    json.dumps(summary)


@pytest.mark.parametrize(
    ("today", "match"),
    [
        # plays marked complete but a third of them missing: labels would be mostly zeros
        (day_metrics(1000, 100, 20), r"plays: plays per impression 0\.1000 is outside the band \[0\.1500, 0\.6000\] "
                                     r"\(0\.5x to 2x the median 0\.3000 of the 4 days before\): the play log looks "
                                     r"incomplete or broken although marked complete"),
        # plays delivered twice over: inflated take rate
        (day_metrics(1000, 300, 150), r"plays: quality plays per impression 0\.1500 is outside .*duplicated or inflated"),
    ],
)
def test_band_fails_a_day_out_of_band_with_a_clear_reason(today, match):
    with pytest.raises(ValueError, match=r"data-quality gate failed for ds=2026-03-02: " + match):
        check(today)


def test_no_band_without_enough_comparable_history():
    short = [day_metrics(), day_metrics(), day_metrics(plays=0, quality=0, complete=False), day_metrics(impressions=0, plays=50)]
    summary = check(day_metrics(1000, 30, 3), history=short)  # a tenth of normal, but nothing to compare with
    assert summary["band"]["plays_per_impression"] == {"value": 0.03, "median": None, "days": 2}
    with pytest.raises(ValueError, match="plays per impression"):
        check(day_metrics(1000, 30, 3), history=short, band_min_days=2)


def test_a_day_without_complete_plays_is_not_banded_but_reported():
    outage = day_metrics(1000, 0, 0, complete=False, reason="no completeness marker at raw/plays/ds=2026-03-02/_COMPLETE")
    summary = check(outage)  # rewards waits for the plays; the gate does not fail on the missing marker
    assert summary["plays"]["complete"] is False and "no completeness marker" in summary["plays"]["incomplete_reason"]
    assert "band" not in summary


def test_thresholds_are_settings(monkeypatch, tmp_path):
    lake = Lake(tmp_path)
    for back, m in enumerate(HISTORY, start=1):
        path = lake.metrics("ingest", (dt.date(2026, 3, 2) - dt.timedelta(days=back)).isoformat())
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(m))
    today = lake.metrics("ingest", DS)
    today.parent.mkdir(parents=True)
    today.write_text(json.dumps(day_metrics(1000, 130, 26)))  # 0.43x the median
    monkeypatch.setenv("KEYART_LAKE_ROOT", str(tmp_path))
    with pytest.raises(ValueError, match="plays per impression 0.1300 is outside"):
        pipeline.data_quality(DS)
    monkeypatch.setenv("KEYART_DQ_BAND_LOW", "0.4")
    assert pipeline.data_quality(DS)["band"]["plays_per_impression"]["days"] == 4
    monkeypatch.setenv("KEYART_DQ_BAND_MIN_DAYS", "5")
    monkeypatch.setenv("KEYART_DQ_BAND_LOW", "0.5")
    assert pipeline.data_quality(DS)["band"]["plays_per_impression"]["median"] is None


def test_history_metrics_are_not_mutated():
    history = copy.deepcopy(HISTORY)
    check(day_metrics(), history=history)
    assert history == HISTORY
