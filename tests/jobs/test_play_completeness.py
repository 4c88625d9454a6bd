"""ingest: the play log's completeness marker is checked and carried to the clean side."""

from __future__ import annotations

import datetime as dt
import json

from jobs_fixtures import args, jsonl, play

from keyart.jobs import ingest
from keyart.lake import PlaysMarker, read_plays_marker, write_plays_marker


def deliver(lake, day, rows, marker: str | None = None):
    folder = lake.raw("plays", day)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "part-0.jsonl").write_text(jsonl(rows))
    if marker is not None:
        (folder / "_COMPLETE").write_text(marker)


def test_ingest_carries_a_valid_marker_and_says_why_a_day_is_incomplete(spark, lake, settings):
    days = ["2026-03-01", "2026-03-02", "2026-03-03", "2026-03-04", "2026-03-05"]
    one = [play("m1", "t1", "2026-03-01 10:00", 40), play("m2", "t1", "2026-03-01 11:00", 3)]
    deliver(lake, days[0], one, json.dumps({"ds": days[0], "delivered_through": "2026-03-02T00:00:00Z", "rows": 2}))
    # a torn upload: the marker promises more rows than arrived
    deliver(lake, days[1], [play("m1", "t1", "2026-03-02 10:00", 40)],
            json.dumps({"ds": days[1], "delivered_through": "2026-03-03T00:00:00Z", "rows": 5}))
    # no marker (an outage), and a stale clean marker from an earlier ingest of the day
    deliver(lake, days[2], [])
    write_plays_marker(lake.plays_marker(days[2], "clean"), PlaysMarker(days[2], dt.datetime(2026, 3, 4, tzinfo=dt.UTC)))
    # complete only through the afternoon; rows not given
    deliver(lake, days[3], [play("m1", "t1", "2026-03-04 10:00", 40)],
            json.dumps({"ds": days[3], "delivered_through": "2026-03-04T15:00:00Z"}))
    # a marker copied from another day
    deliver(lake, days[4], [play("m1", "t1", "2026-03-05 10:00", 40)],
            json.dumps({"ds": days[0], "delivered_through": "2026-03-02T00:00:00Z", "rows": 1}))

    ingest.run(spark, lake, args(days[0], lake.root, through=days[-1]), settings)

    def completeness(day):
        return json.loads(lake.metrics("ingest", day).read_text())["plays"]["completeness"]

    m = json.loads(lake.metrics("ingest", days[0]).read_text())["plays"]
    assert m["quality"] == 1 and m["late"] == 0 and m["balanced"]
    assert completeness(days[0]) == {"complete": True, "delivered_through": "2026-03-02T00:00:00.000000Z", "reason": None}
    marker, why = read_plays_marker(lake.plays_marker(days[0], "clean"), days[0])
    assert why is None and marker.whole_day and marker.rows == 2

    assert not completeness(days[1])["complete"] and "says 5 rows were delivered, ingest read 1" in completeness(days[1])["reason"]
    assert "no completeness marker" in completeness(days[2])["reason"]
    assert not lake.plays_marker(days[2], "clean").exists()  # the stale one is gone
    partial = completeness(days[3])
    assert not partial["complete"] and partial["delivered_through"] == "2026-03-04T15:00:00.000000Z"
    marker, _ = read_plays_marker(lake.plays_marker(days[3], "clean"), days[3])
    assert marker.covered_until == dt.datetime(2026, 3, 4, 15, tzinfo=dt.UTC) and not marker.whole_day
    assert "is for ds=2026-03-01, not 2026-03-05" in completeness(days[4])["reason"]
    for day in days[1:3] + days[4:]:
        assert not lake.plays_marker(day, "clean").exists()
