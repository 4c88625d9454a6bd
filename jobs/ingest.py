"""ingest: validate the day's raw impression and play logs into clean Parquet and a quarantine.

    spark-submit jobs/ingest.py --ds 2026-03-01 [--through 2026-03-28] [--lake LAKE] [--master URL]
    keyart job ingest --ds 2026-03-01

Reads ``raw/{impressions,plays}/ds=D/`` (``*.jsonl``/``*.json`` JSON Lines and/or
``*.parquet``), writes ``clean/{log}/ds=D/`` (contract columns, deduplicated),
``quarantine/{log}/ds=D/`` (reason, source_file, raw) and ``metrics/ingest/ds=D/metrics.json``.

JSON Lines are read as text, so a malformed line becomes a quarantined row ("malformed
JSON") instead of failing the job; Parquet rows are turned into the same JSON text, so one
validation path serves both. A row is quarantined, with the first reason that applies:

1. ``checksum mismatch``: the line carries serving's ``_crc32`` and it does not match
   (a torn or altered line). Lines without a checksum (older logs, your own) are checked
   like any other and counted as ``without_checksum``.
2. ``malformed JSON``.
3. ``<field>: expected string, got <JSON type>``: string, timestamp and date fields and
   the items of arrays of strings must be JSON strings, never cast (a numeric
   ``member_id`` 123 is not the id "123"). Numbers, booleans, arrays and objects are
   parsed strictly by the contract's types (``propensity must be a double, got high``).
4. The contract's checks (:mod:`keyart.contracts`: ids are whole strings, so "m1\n" is
   not an id; at most ``MAX_CANDIDATES`` candidates), then, for impressions, the shown
   ``artwork_id`` must be one of ``candidates`` (:func:`shown_reason`), and for those that carry
   ``candidate_probabilities`` (:func:`probability_reason`): one per candidate, each in
   [0, 1], summing to 1 within ``PROBABILITY_SUM_TOL``, and the shown artwork's equal to
   ``propensity`` exactly; then ``ts`` outside day D.
5. ``malformed JSON: duplicate key or too large to check`` (the types cannot be checked).
6. ``conflicting duplicate event_id``: impressions that share an event_id but differ in
   any field; every row of that event_id is quarantined (which one is true cannot be told).

Exact duplicates (same ``event_id`` and content for impressions, same
``(member_id, title_id, ts)`` for plays) are kept once and counted as duplicates. For every
log and day: ``read = clean + quarantined + duplicates`` (+ ``late`` for plays). A day without
raw files writes empty partitions and reports ``read = 0``; the DAG's data-quality gate
decides what that means.

Plays: a play delivered on D that started on one of the ``late_play_lookback_days`` days
before D is a late play, kept in ``clean/late_plays/ds=D/`` (rewards relabels with it); an
older one is quarantined. The deliverer's completeness marker ``raw/plays/ds=D/_COMPLETE``
(contracts.PLAYS_COMPLETE) is checked (valid, for D, at least its ``rows`` read) and copied to
``clean/plays/ds=D/_COMPLETE``; without it the day's plays count as incomplete (metrics
``plays.completeness`` says why) and rewards waits for them.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from keyart.config import Settings
from keyart.contracts import IMPRESSIONS, PLAYS, QUARANTINE_EXTRA, Contract, Field
from keyart.jobs.common import (
    contract_reason,
    day_range,
    main_for,
    reason_kind,
    text_schema,
    write_days_observed,
    write_metrics,
)
from keyart.lake import Lake, PlaysMarker, read_plays_marker, write_plays_marker

LOGS: dict[str, Contract] = {"impressions": IMPRESSIONS, "plays": PLAYS}
# Logs that accept rows of the lookback days before the partition's day (late arrivals).
LATE_LOGS = frozenset({"plays"})
# Logs whose key is a unique id: rows sharing it must be identical, else all are quarantined.
# (A play re-logged with other minutes under the same member, title and ts keeps the first.)
UNIQUE_KEY_LOGS = frozenset({"impressions"})
MALFORMED = "malformed JSON"
CHECKSUM_MISMATCH = "checksum mismatch"
UNCHECKABLE = "malformed JSON: duplicate key or too large to check"
PROBABILITY_SUM_TOL = 1e-5
"""Serving rounds candidate probabilities to 6 significant digits: their sum is within 5e-6 of 1."""
_CRC_HEAD = '{"_crc32":"'  # serving's line format (keyart.serving.event_log.frame)
_JSON_TYPE = {"string": "string", "timestamp": "string", "date": "string", "long": "number", "int": "number",
              "double": "number", "boolean": "boolean", "array<string>": "array", "array<double>": "array",
              "struct": "object"}
TEXT_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
# Microseconds survive the Parquet -> JSON text round trip (the default keeps milliseconds).
_TS_FORMAT = "yyyy-MM-dd'T'HH:mm:ss.SSSSSSXXX"
_CORRUPT = "_corrupt_record"
COUNTS = ("read", "clean", "quarantined", "duplicates", "without_checksum")

RAW_SCHEMA = T.StructType([
    T.StructField("ds", T.StringType(), False),
    T.StructField("source_file", T.StringType(), True),
    T.StructField("raw", T.StringType(), True),
])


@dataclass(frozen=True)
class Ingested:
    """The outcome of one log: clean rows, quarantined rows and per-day counts (all with ``ds``)."""

    classified: DataFrame
    clean: DataFrame
    quarantine: DataFrame
    counts: DataFrame
    reasons: DataFrame
    late: DataFrame | None = None
    """Valid rows that started on an earlier day within the lookback (``ds`` = delivery day)."""


def quarantine_schema() -> T.StructType:
    return T.StructType([T.StructField(f.name, T.StringType(), True) for f in QUARANTINE_EXTRA])


# ----------------------------------------------------------------------------------------
# extract
# ----------------------------------------------------------------------------------------

def extract(spark: SparkSession, lake: Lake, log: str, days: list[str]) -> tuple[DataFrame, dict[str, int]]:
    """Raw rows of ``log`` for ``days`` as ``(ds, source_file, raw)`` text, and files per day."""
    frames: list[DataFrame] = []
    files_per_day: dict[str, int] = {}
    text_files: list[str] = []
    for ds in days:
        folder = lake.raw(log, ds)
        if folder.name != f"ds={ds}":
            raise ValueError(f"raw partition {folder} of ds={ds} is not named ds={ds}")
        files = sorted(p for p in folder.glob("*") if p.is_file() and not p.name.startswith(("_", "."))) if folder.is_dir() else []
        text = [str(p) for p in files if p.name.endswith(TEXT_SUFFIXES)]
        parquet = [str(p) for p in files if p.name.endswith(".parquet")]
        files_per_day[ds] = len(text) + len(parquet)
        text_files += text
        if parquet:
            df = spark.read.parquet(*parquet)
            as_json = F.to_json(F.struct(*[F.col(c) for c in df.columns]), {"timestampFormat": _TS_FORMAT})
            frames.append(df.select(F.lit(ds).alias("ds"), F.col("_metadata.file_path").alias("source_file"), as_json.alias("raw")))
    if text_files:
        # every day's text files in one read (a 90-day history is one scan, not a 90-way
        # union to plan); each row's day is the ds= folder its file lies in
        df = spark.read.text(text_files).select(F.col("_metadata.file_path").alias("source_file"), F.col("value").alias("raw"))
        day = F.regexp_extract("source_file", r"/ds=(\d{4}-\d{2}-\d{2})/[^/]+$", 1)
        frames.insert(0, df.where(F.trim("raw") != "").select(day.alias("ds"), "source_file", "raw"))
    if not frames:
        return spark.createDataFrame([], RAW_SCHEMA), files_per_day
    out = frames[0]
    for df in frames[1:]:
        out = out.unionByName(df)
    return out, files_per_day


# ----------------------------------------------------------------------------------------
# transform
# ----------------------------------------------------------------------------------------

def has_checksum(raw: Column) -> Column:
    """True for a line in serving's checksummed format."""
    return F.substring(raw, 1, len(_CRC_HEAD)) == F.lit(_CRC_HEAD)


def checksum_ok(raw: Column) -> Column:
    """A checksummed line's CRC-32 matches the object it carries: ``{`` + everything after
    the 21-character prefix ``{"_crc32":"xxxxxxxx",`` (see keyart.serving.event_log)."""
    start = len(_CRC_HEAD) + 1
    digits = F.substring(raw, start, 8)
    payload = F.concat(F.lit("{"), raw.substr(F.lit(start + 10), F.length(raw)))
    return (
        (F.substring(raw, start + 8, 2) == F.lit('",'))
        & digits.rlike("^[0-9a-f]{8}$")
        & (F.crc32(F.encode(payload, "UTF-8")) == F.conv(digits, 16, 10).cast("long"))
    )


def _json_type(schema: Column) -> Column:
    """The JSON type of a value from its ``schema_of_variant`` text."""
    return (F.when(schema == "STRING", "string").when(schema == "BOOLEAN", "boolean").when(schema == "VOID", "null")
            .when(schema.startswith("OBJECT"), "object").when(schema.startswith("ARRAY"), "array")
            .otherwise("number"))


def type_reasons(fields: tuple[Field, ...], variant: Column, prefix: str = "", path: str = "$") -> list[Column]:
    """Why a value's JSON type is not the contract's, where Spark's JSON reader would cast
    it instead of failing: a number, boolean, array or object in a string, timestamp or
    date field (123 would read as "123", a number as epoch seconds) or as an item of an
    array of strings. Numbers, booleans, arrays and objects themselves the reader parses
    strictly; the contract's checks report those, and absent or null values."""
    out: list[Column] = []
    for f in fields:
        name, here = prefix + f.name, f"{path}.{f.name}"
        if f.dtype == "struct":
            out.extend(type_reasons(f.children, variant, name + ".", here))
            continue
        if f.dtype == "array<double>" or _JSON_TYPE[f.dtype] not in ("string", "array"):
            continue  # arrays of numbers: an item that is not a number fails to parse (contract check)
        schema = F.schema_of_variant(F.try_variant_get(variant, here, "variant"))
        got = _json_type(schema)
        if f.dtype == "array<string>":
            out.append(F.when((got == "array") & ~schema.isin("ARRAY<STRING>", "ARRAY<VOID>"),
                              F.lit(f"{name}: expected an array of strings, got an item that is not a string")))
        else:
            out.append(F.when(schema.isNotNull() & ~got.isin("string", "null"),
                              F.concat(F.lit(f"{name}: expected string, got "), got)))
    return out


def shown_reason(row: Column) -> Column:
    """Why an impression's shown artwork cannot have been drawn from its candidates: it is
    not among them (null if it is, or if either field is missing: the contract says that)."""
    return F.when(row["candidates"].isNotNull() & row["artwork_id"].isNotNull()
                  & ~F.array_contains(row["candidates"], row["artwork_id"]),
                  F.lit("artwork_id must be one of candidates"))


def probability_reason(row: Column) -> Column:
    """Why an impression's ``candidate_probabilities`` do not describe the distribution it
    was drawn from (null if they do, or if the row has none)."""
    probs, cands = row["candidate_probabilities"], row["candidates"]
    total = F.aggregate(probs, F.lit(0.0), lambda acc, x: acc + x)
    shown = F.get(probs, F.array_position(cands, row["artwork_id"]).cast("int") - 1)
    name = "candidate_probabilities"
    return (
        F.when(probs.isNull(), F.lit(None).cast("string"))
        .when(F.size(probs) != F.size(cands), F.format_string(f"{name} must have one value per candidate, got %d for %d",
                                                               F.size(probs), F.size(cands)))
        .when(F.exists(probs, lambda x: x.isNull() | F.isnan(x) | (x < 0) | (x > 1)), F.lit(f"{name} must be numbers in [0, 1]"))
        .when(F.abs(total - 1.0) > PROBABILITY_SUM_TOL, F.concat(F.lit(f"{name} must sum to 1, got "), total.cast("string")))
        .when(shown.isNotNull() & (shown != row["propensity"]),
              F.concat(F.lit(f"propensity must equal the shown artwork's {name} entry, got "), _clip_num(row["propensity"]),
                       F.lit(" vs "), _clip_num(shown)))
    )


def _clip_num(col: Column) -> Column:
    return F.substring(col.cast("string"), 1, 24)


def classify(raw: DataFrame, contract: Contract, late_lookback_days: int = 0) -> DataFrame:
    """Each raw row with its parsed ``row`` struct, ``reason`` (null = valid), ``is_duplicate``,
    ``is_late`` (valid, started 1..``late_lookback_days`` days before ``ds``; logs of
    ``LATE_LOGS`` only) and ``checksummed`` (the line carried a checksum)."""
    text = T.StructType(text_schema(contract.fields).fields + [T.StructField(_CORRUPT, T.StringType())])
    parsed = raw.select(
        "ds", "source_file", "raw",
        F.from_json("raw", contract.spark_schema()).alias("row"),
        F.from_json("raw", text, {"columnNameOfCorruptRecord": _CORRUPT}).alias("text"),
        F.try_parse_json("raw").alias("variant"),
        has_checksum(F.col("raw")).alias("checksummed"),
    )
    malformed = F.col("raw").isNull() | F.col("text").isNull() | F.col(f"text.{_CORRUPT}").isNotNull()
    ts = F.col("row.ts")
    lookback = late_lookback_days if contract.name in LATE_LOGS else 0
    days_late = F.datediff(F.to_date("ds"), F.to_date(ts))
    in_lookback = (days_late >= 1) & (days_late <= lookback) if lookback > 0 else F.lit(False)
    too_late = F.lit(f" (more than late_play_lookback_days={lookback} days late)") if lookback > 0 else F.lit("")
    off_day = F.when(
        (F.to_date(ts) != F.to_date("ds")) & ~in_lookback,
        F.concat(F.lit("ts is not in day "), F.col("ds"), F.when(days_late > lookback, too_late).otherwise(F.lit("")),
                 F.lit(", got "), F.date_format(ts, "yyyy-MM-dd'T'HH:mm:ss'Z'")),
    )
    variant = F.col("variant")
    reason = (
        F.when(F.col("checksummed") & ~F.coalesce(checksum_ok(F.col("raw")), F.lit(False)), F.lit(CHECKSUM_MISMATCH))
        .when(malformed, F.lit(MALFORMED))
        .otherwise(F.coalesce(
            *type_reasons(contract.fields, variant),
            contract_reason(contract, F.col("row"), F.col("text")),
            shown_reason(F.col("row")) if contract.name == "impressions" else F.lit(None).cast("string"),
            probability_reason(F.col("row")) if contract.name == "impressions" else F.lit(None).cast("string"),
            off_day,
            F.when(variant.isNull(), F.lit(UNCHECKABLE)),
        ))
    )
    classified = parsed.withColumn("reason", reason).drop("text", "variant")
    key = [F.col(f"row.{k}") for k in contract.key]
    valid = F.col("reason").isNull()
    # one window (one shuffle, one sort) gives both the order of duplicates and, for logs with
    # a unique key, whether rows sharing it differ: two independent hashes of the parsed row
    # (every field at full precision) that vary within the key
    first = Window.partitionBy(F.col("ds"), valid, *key).orderBy("source_file", "raw")
    rank = F.row_number().over(first).alias("_rank")
    if contract.name in UNIQUE_KEY_LOGS:
        same_key = first.rowsBetween(Window.unboundedPreceding, Window.unboundedFollowing)
        differs = F.lit(False)
        for content in (F.xxhash64(F.col("row")), F.hash(F.col("row"))):
            differs = differs | (F.min(content).over(same_key) != F.max(content).over(same_key))
        classified = classified.select("*", rank, (valid & differs).alias("_conflict")).withColumn(
            "reason", F.when(F.col("_conflict"), F.lit(f"conflicting duplicate {', '.join(contract.key)}")).otherwise(F.col("reason")))
        classified = classified.drop("_conflict")
    else:
        classified = classified.select("*", rank)
    # a conflicting row is no longer valid, so never a duplicate; the others keep their rank
    valid = F.col("reason").isNull()
    return (classified.withColumn("is_duplicate", valid & (F.col("_rank") > 1))
            .withColumn("is_late", valid & F.coalesce(in_lookback, F.lit(False))).drop("_rank"))


def transform(raw: DataFrame, contract: Contract, late_lookback_days: int = 0, quality_minutes: float | None = None) -> Ingested:
    """Split raw rows into clean (contract columns + ds), quarantine and per-day counts. Pure.

    For logs of ``LATE_LOGS`` valid rows that started 1..``late_lookback_days`` days before
    ``ds`` go to ``late`` (counted as ``late``); with ``quality_minutes`` the counts also hold
    ``quality``, the clean plays of at least that many minutes."""
    classified = classify(raw, contract, late_lookback_days)
    ok = F.col("reason").isNull() & ~F.col("is_duplicate")
    columns = [F.col(f"row.{c}").alias(c) for c in contract.columns]
    clean = classified.where(ok & ~F.col("is_late")).select("ds", *columns)
    late = classified.where(ok & F.col("is_late")).select("ds", *columns) if contract.name in LATE_LOGS else None
    quarantine = classified.where(F.col("reason").isNotNull()).select("ds", "reason", "source_file", "raw")
    extra = []
    if late is not None:
        extra.append(F.sum(F.when(ok & F.col("is_late"), 1).otherwise(0)).alias("late"))
    if quality_minutes is not None:
        quality = ok & ~F.col("is_late") & (F.col("row.minutes_played") >= F.lit(float(quality_minutes)))
        extra.append(F.sum(F.when(quality, 1).otherwise(0)).alias("quality"))
    counts = classified.groupBy("ds").agg(
        F.count(F.lit(1)).alias("read"),
        F.sum(F.when(ok & ~F.col("is_late"), 1).otherwise(0)).alias("clean"),
        F.sum(F.when(F.col("reason").isNotNull(), 1).otherwise(0)).alias("quarantined"),
        F.sum(F.when(F.col("is_duplicate"), 1).otherwise(0)).alias("duplicates"),
        F.sum(F.when(F.col("checksummed"), 0).otherwise(1)).alias("without_checksum"),
        *extra,
    )
    reasons = quarantine.groupBy("ds", reason_kind(F.col("reason")).alias("kind")).count()
    return Ingested(classified=classified, clean=clean, quarantine=quarantine, counts=counts, reasons=reasons, late=late)


# ----------------------------------------------------------------------------------------
# load
# ----------------------------------------------------------------------------------------

def load(spark: SparkSession, result: Ingested, lake: Lake, log: str, contract: Contract, days: list[str]) -> dict[str, dict[str, Any]]:
    """Write clean, quarantine (and late) partitions for every day of ``days``; return per-day counts,
    with ``output``: each written partition's rows and content hash (computed while writing).

    Days are written with ``partitionBy("ds")`` (dynamic overwrite); a day with no rows gets
    an empty partition, so a rerun never leaves stale rows behind.
    """
    result.classified.persist()
    keys = [c for c in result.counts.columns if c != "ds"]
    try:
        counts = {r["ds"]: {k: int(r[k] or 0) for k in keys} for r in result.counts.collect()}
        reasons: dict[str, dict[str, int]] = {}
        for r in result.reasons.collect():
            reasons.setdefault(r["ds"], {})[r["kind"]] = int(r["count"])
        outputs = [(result.clean, lake.clean(log), f"clean/{log}"),
                   (result.quarantine, lake.quarantine(log, days[0]).parent, f"quarantine/{log}")]
        if result.late is not None:
            outputs.append((result.late, lake.late_plays(), "clean/late_plays"))
        written = {name: write_days_observed(df, base, days) for df, base, name in outputs}
    finally:
        result.classified.unpersist()
    out: dict[str, dict[str, Any]] = {}
    for d in days:
        c = counts.get(d, dict.fromkeys(keys, 0))
        c["balanced"] = c["read"] == c["clean"] + c.get("late", 0) + c["quarantined"] + c["duplicates"]
        c["reasons"] = dict(sorted(reasons.get(d, {}).items(), key=lambda kv: -kv[1])[:20])
        c["output"] = {name: figures[d] for name, figures in written.items()}
        out[d] = c
    return out


def run(spark: SparkSession, lake: Lake, args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    """Ingest every log for ``args.ds`` .. ``args.through`` and write one metrics file per day."""
    days = day_range(args.ds, args.through)
    per_day: dict[str, dict[str, Any]] = {d: {} for d in days}
    for log, contract in LOGS.items():
        raw, files = extract(spark, lake, log, days)
        quality = settings.quality_play_minutes if log == "plays" else None
        counts = load(spark, transform(raw, contract, settings.late_play_lookback_days, quality), lake, log, contract, days)
        for d in days:
            output = counts[d].pop("output")
            per_day[d][log] = {**counts[d], "files": files.get(d, 0)}
            per_day[d].setdefault("output", {}).update(output)
    for d in days:
        per_day[d]["plays"]["completeness"] = carry_plays_marker(lake, d, per_day[d]["plays"])
        write_metrics(lake, "ingest", d, per_day[d])
    return {"days": len(days), "read": {log: sum(per_day[d][log]["read"] for d in days) for log in LOGS}}


def carry_plays_marker(lake: Lake, ds: str, counts: dict[str, Any]) -> dict[str, Any]:
    """Check the deliverer's ``raw/plays/ds=D/_COMPLETE`` against what was read and write
    ``clean/plays/ds=D/_COMPLETE`` (rows = clean rows) when it holds; remove a stale one when
    it does not. Returns the ``completeness`` figures of the day's metrics."""
    source = lake.plays_marker(ds)
    marker, why = read_plays_marker(source, ds)
    if marker is not None and marker.rows is not None and counts["read"] < marker.rows:
        # a torn or still-running upload: the marker promises rows that are not there
        marker, why = None, f"{source} says {marker.rows} rows were delivered, ingest read {counts['read']}"
    target = lake.plays_marker(ds, "clean")
    if marker is None:
        target.unlink(missing_ok=True)
        return {"complete": False, "delivered_through": None, "reason": why}
    write_plays_marker(target, PlaysMarker(marker.ds, marker.delivered_through, counts["clean"]))
    through = marker.delivered_through.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return {"complete": marker.whole_day, "delivered_through": through,
            "reason": None if marker.whole_day else f"{source} covers the day only through {through}"}


def main(argv: list[str] | None = None) -> int:
    return main_for("ingest", __doc__, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
