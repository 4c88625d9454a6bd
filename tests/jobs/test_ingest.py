"""ingest: contract validation, quarantine with reasons, dedupe, counts, files, reruns."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
from jobs_fixtures import args, impression, iso, jsonl, play
from pyspark.sql import functions as F
from pyspark.testing import assertDataFrameEqual

from keyart.contracts import IMPRESSIONS, MAX_CANDIDATES, PLAYS
from keyart.jobs import ingest
from keyart.serving.event_log import frame

DS = "2026-03-02"


def raw_frame(spark, lines, ds=DS, source="f.jsonl"):
    return spark.createDataFrame([(ds, source, line) for line in lines], ingest.RAW_SCHEMA)


def good_impression(event_id="e1", when="2026-03-02 10:00", **kw):
    row = impression(event_id, when, **kw)
    row["ts"] = iso(when)
    return row


def line(row):
    return json.dumps(row)


def reasons_of(result):
    return {r["raw"]: r["reason"] for r in result.quarantine.collect()}


def test_impression_violations_are_quarantined_with_a_reason_naming_the_field(spark):
    ok = good_impression("e1")
    bad = {
        "not json at all {": "malformed JSON",
        "[1, 2]": "malformed JSON",
        line({**good_impression("e2"), "propensity": 1.5}): "propensity must be <= 1.0",
        line({**good_impression("e3"), "propensity": "high"}): "propensity must be a double",
        line({k: v for k, v in good_impression("e4").items() if k != "member_id"}): "member_id is missing (null)",
        line({**good_impression("e5"), "member_id": "bad id!"}): "member_id is not a valid id",
        line({**good_impression("e6"), "context": {**ok["context"], "device": "fridge"}}): "context.device must be one of",
        line({**good_impression("e7"), "context": {**ok["context"], "local_hour": 24}}): "context.local_hour must be <= 23",
        line({**good_impression("e8"), "candidates": []}): "candidates must have at least 1 items",
        line({**good_impression("e9"), "candidates": ["ok", "no way"]}): "candidates has an item that is not a valid id",
        line({**good_impression("e10"), "ts": "yesterday"}): "ts must be a timestamp",
        line(good_impression("e11", when="2026-03-03 00:00")): "ts is not in day 2026-03-02",
        line(good_impression("e12", artwork="t1-a7")): "artwork_id must be one of candidates",
    }
    result = ingest.transform(raw_frame(spark, [line(ok), *bad]), IMPRESSIONS)
    got = reasons_of(result)
    assert set(got) == set(bad)
    for raw, expected in bad.items():
        assert got[raw].startswith(expected), (got[raw], expected)
    assert [r["event_id"] for r in result.clean.collect()] == ["e1"]
    counts = result.counts.first().asDict()
    assert counts == {"ds": DS, "read": 14, "clean": 1, "quarantined": 13, "duplicates": 0, "without_checksum": 14}


def test_duplicate_event_ids_are_kept_once_and_counted(spark):
    rows = [line(good_impression("e1")), line(good_impression("e1")), line(good_impression("e2")), line(good_impression("e1"))]
    result = ingest.transform(raw_frame(spark, rows), IMPRESSIONS)
    assert sorted(r["event_id"] for r in result.clean.collect()) == ["e1", "e2"]
    c = result.counts.first()
    assert (c["read"], c["clean"], c["quarantined"], c["duplicates"]) == (4, 2, 0, 2)


def test_plays_dedupe_on_member_title_ts(spark):
    p = {**play("m1", "t1", "2026-03-02 10:00", 30), "ts": iso("2026-03-02 10:00")}
    rows = [line(p), line({**p, "minutes_played": 31.0}), line({**p, "ts": iso("2026-03-02 10:01")}),
            line({**p, "minutes_played": -1.0})]
    result = ingest.transform(raw_frame(spark, rows), PLAYS)
    assert result.clean.count() == 2
    assert [r["reason"] for r in result.quarantine.collect()] == ["minutes_played must be >= 0, got -1.0"]
    c = result.counts.first()
    assert c["read"] == c["clean"] + c["quarantined"] + c["duplicates"] == 4
    assert c["duplicates"] == 1


def test_clean_rows_have_the_contract_schema(spark):
    result = ingest.transform(raw_frame(spark, [line(good_impression("e1"))]), IMPRESSIONS)
    assert result.clean.drop("ds").schema.simpleString() == IMPRESSIONS.spark_schema().simpleString()
    row = result.clean.first()
    assert row["context"]["device"] == "tv" and row["candidates"] == ["t1-a0", "t1-a1"]


def write_raw(lake, log, ds, rows_jsonl=(), extra_lines=(), parquet_rows=None):
    folder = lake.raw(log, ds)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "part-0.jsonl").write_text(jsonl(rows_jsonl) + "".join(x + "\n" for x in extra_lines))
    if parquet_rows is not None:
        contract = IMPRESSIONS if log == "impressions" else PLAYS
        table = pa.Table.from_pylist(parquet_rows, schema=contract.arrow_schema())
        pq.write_table(table, folder / "part-1.parquet")


def test_run_reads_jsonl_and_parquet_writes_partitions_metrics_and_reruns_identically(spark, lake, settings):
    imps = [impression("e1", "2026-03-02 10:00"), impression("e2", "2026-03-02 11:00")]
    write_raw(lake, "impressions", DS, imps + [imps[0]], extra_lines=["{broken"],
              parquet_rows=[impression("e3", "2026-03-02 12:00:00.123456"), impression("e1", "2026-03-02 10:00")])
    write_raw(lake, "plays", DS, [play("m1", "t1", "2026-03-02 10:30", 40), play("m1", "t1", "2026-03-03 00:10", 5)])
    ingest.run(spark, lake, args(DS, lake.root), settings)
    first = spark.read.parquet(str(lake.clean("impressions", DS))).orderBy("event_id")
    assert [r["event_id"] for r in first.collect()] == ["e1", "e2", "e3"]
    micro = first.where(F.col("event_id") == "e3").first()["ts"]
    assert micro.microsecond == 123456
    metrics = json.loads(lake.metrics("ingest", DS).read_text())
    assert metrics["impressions"] | {"reasons": None} == {"read": 6, "clean": 3, "quarantined": 1, "duplicates": 2,
                                                          "without_checksum": 6, "balanced": True, "files": 2,
                                                          "reasons": None}
    assert metrics["impressions"]["reasons"] == {"malformed JSON": 1}
    assert metrics["plays"]["quarantined"] == 1 and metrics["plays"]["clean"] == 1
    q = spark.read.parquet(str(lake.quarantine("plays", DS))).first()
    assert q["reason"].startswith("ts is not in day") and q["source_file"].endswith("part-0.jsonl") and '"m1"' in q["raw"]

    snapshot = spark.createDataFrame(first.collect(), first.schema)
    ingest.run(spark, lake, args(DS, lake.root), settings)
    assertDataFrameEqual(spark.read.parquet(str(lake.clean("impressions", DS))), snapshot)
    assert json.loads(lake.metrics("ingest", DS).read_text()) == metrics


def test_missing_day_writes_empty_partitions_and_range_runs_in_one_go(spark, lake, settings):
    write_raw(lake, "impressions", "2026-03-01", [impression("e0", "2026-03-01 09:00")])
    write_raw(lake, "plays", "2026-03-01", [play("m1", "t1", "2026-03-01 09:30", 20)])
    ingest.run(spark, lake, args("2026-03-01", lake.root, through="2026-03-02"), settings)
    assert spark.read.parquet(str(lake.clean("impressions", "2026-03-01"))).count() == 1
    assert spark.read.schema(IMPRESSIONS.spark_schema()).parquet(str(lake.clean("impressions", "2026-03-02"))).count() == 0
    assert lake.quarantine("plays", "2026-03-02").is_dir()
    m = json.loads(lake.metrics("ingest", "2026-03-02").read_text())
    assert m["impressions"]["read"] == 0 and m["impressions"]["files"] == 0 and m["impressions"]["balanced"]
    # a rerun after the raw data changed leaves no stale rows behind
    (lake.raw("impressions", "2026-03-01") / "part-0.jsonl").write_text("")
    ingest.run(spark, lake, args("2026-03-01", lake.root), settings)
    assert spark.read.schema(IMPRESSIONS.spark_schema()).parquet(str(lake.clean("impressions", "2026-03-01"))).count() == 0


def counts_of(result) -> tuple[int, int, int, int]:
    c = result.counts.first()
    assert c["read"] == c["clean"] + c["quarantined"] + c["duplicates"]
    return c["read"], c["clean"], c["quarantined"], c["duplicates"]


def test_json_types_are_checked_not_cast(spark):
    ok = good_impression("e0")
    bad = {
        line({**good_impression("e1"), "member_id": 123}): "member_id: expected string, got number",
        line({**good_impression("e2"), "title_id": True}): "title_id: expected string, got boolean",
        line({**good_impression("e3"), "ts": 1772445600}): "ts: expected string, got number",
        line({**good_impression("e4"), "candidates": "t1-a0"}): "candidates must be a array<string>, got t1-a0",
        line({**good_impression("e5"), "candidates": ["t1-a0", 7]}): "candidates: expected an array of strings",
        line({**good_impression("e6"), "context": "tv"}): "context must be a struct, got tv",
        line({**good_impression("e7"), "context": {**ok["context"], "local_hour": "20"}}): "context.local_hour must be a int, got 20",
        line({**good_impression("e8"), "context": {**ok["context"], "device": ["tv"]}}): "context.device: expected string, got array",
        line({**good_impression("e9"), "propensity": "0.5"}): "propensity must be a double, got 0.5",
        line({**good_impression("e10"), "context": {**ok["context"], "country": 49}}): "context.country: expected string, got number",
        line({**good_impression("e11"), "policy": {"name": "random"}}): "policy: expected string, got object",
    }
    result = ingest.transform(raw_frame(spark, [line(ok), *bad]), IMPRESSIONS)
    got = reasons_of(result)
    for raw, expected in bad.items():
        assert got[raw].startswith(expected), (got[raw], expected)
    assert [r["event_id"] for r in result.clean.collect()] == ["e0"]
    assert counts_of(result) == (12, 1, 11, 0)


def test_ids_are_whole_strings_and_candidates_are_bounded(spark):
    bad = {
        line({**good_impression("e1"), "member_id": "m000501\n"}): "member_id is not a valid id",
        line({**good_impression("e2"), "artwork_id": "t1-a0\n"}): "artwork_id is not a valid id",
        line({**good_impression("e3"), "candidates": ["t1-a0", "t1-a1\n"]}): "candidates has an item that is not a valid id",
        line({**good_impression("e4"), "candidates": [f"t1-a{i}" for i in range(400_001)]}):
            "candidates must have at most 1000 items, got 400001",
        line({**good_impression("e5"), "candidates": [f"t1-a{i}" for i in range(MAX_CANDIDATES + 1)]}):
            f"candidates must have at most {MAX_CANDIDATES} items",
    }
    at_most = good_impression("e6", candidates=[f"t1-a{i}" for i in range(MAX_CANDIDATES)])
    result = ingest.transform(raw_frame(spark, [*bad, line(at_most)]), IMPRESSIONS)
    got = reasons_of(result)
    for raw, expected in bad.items():
        assert got[raw].startswith(expected), (got[raw][:80], expected)
    assert [r["event_id"] for r in result.clean.collect()] == ["e6"]
    assert counts_of(result) == (6, 1, 5, 0)


def test_conflicting_duplicates_are_quarantined_exact_ones_counted(spark):
    a = good_impression("e1", artwork="t1-a0", propensity=0.5)
    forged = good_impression("e1", artwork="t1-a1", propensity=0.99)
    b = good_impression("e2")
    rows = [line(a), line(forged), line(a), line(b), json.dumps(b, indent=None, separators=(",", ":")), line(good_impression("e3"))]
    result = ingest.transform(raw_frame(spark, rows), IMPRESSIONS)
    reasons = [r["reason"] for r in result.quarantine.collect()]
    assert reasons == ["conflicting duplicate event_id"] * 3  # neither version of e1 can be trusted
    assert sorted(r["event_id"] for r in result.clean.collect()) == ["e2", "e3"]
    assert counts_of(result) == (6, 2, 3, 1)  # e2 twice (other spacing, same content): one duplicate
    metrics_kinds = {r["kind"]: r["count"] for r in result.reasons.collect()}
    assert metrics_kinds == {"conflicting duplicate event_id": 3}


def test_checksummed_lines_are_verified(spark):
    def framed(row) -> str:
        return frame(json.dumps(row, separators=(",", ":")).encode()).decode()

    good = framed(good_impression("e1"))
    tampered = framed(good_impression("e2")).replace('"propensity":0.5', '"propensity":0.9')
    torn = framed(good_impression("e3"))[:60]
    unicode_ok = framed(good_impression("e4", ctx={"device": "tv", "country": "Ünï", "local_hour": 1,
                                                   "day_of_week": 1, "page_row": 0, "position": 0}))
    bad_digits = framed(good_impression("e5")).replace('{"_crc32":"', '{"_crc32":"+', 1)
    old_format = line(good_impression("e6"))
    duplicate_keys = '{"event_id":"e7",' + line(good_impression("e7"))[1:]
    rows = [good, tampered, torn, unicode_ok, bad_digits, old_format, duplicate_keys]
    result = ingest.transform(raw_frame(spark, rows), IMPRESSIONS)
    got = reasons_of(result)
    assert got == {tampered: "checksum mismatch", torn: "checksum mismatch", bad_digits: "checksum mismatch",
                   duplicate_keys: ingest.UNCHECKABLE}
    assert sorted(r["event_id"] for r in result.clean.collect()) == ["e1", "e4", "e6"]
    c = result.counts.first()
    assert (c["read"], c["clean"], c["quarantined"], c["duplicates"], c["without_checksum"]) == (7, 3, 4, 0, 2)


def test_serving_log_lines_ingest_clean(spark, tmp_path):
    from keyart.serving.event_log import JsonlLog

    log = JsonlLog(tmp_path / "raw", "impressions")
    rows = [good_impression(f"e{i}") for i in range(5)]
    log.append_sync(DS, b"".join(json.dumps(r).encode() + b"\n" for r in rows))
    log.close()
    (path,) = (tmp_path / "raw" / f"ds={DS}").glob("*.jsonl")
    text = path.read_text().splitlines()
    with path.open("a") as f:
        f.write(text[0][:50])  # a crash mid-write of an unacknowledged page
    raw = spark.createDataFrame([(DS, str(path), x) for x in path.read_text().splitlines()], ingest.RAW_SCHEMA)
    result = ingest.transform(raw, IMPRESSIONS)
    assert sorted(r["event_id"] for r in result.clean.collect()) == [f"e{i}" for i in range(5)]
    assert [r["reason"] for r in result.quarantine.collect()] == ["checksum mismatch"]
    assert result.counts.first()["without_checksum"] == 0
