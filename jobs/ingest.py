"""ingest: validate the day's raw impression and play logs into clean Parquet and a quarantine.

    spark-submit jobs/ingest.py --ds 2026-03-01 [--through 2026-03-28] [--lake LAKE] [--master URL]
    keyart job ingest --ds 2026-03-01

Reads ``raw/{impressions,plays}/ds=D/`` (``*.jsonl``/``*.json`` JSON Lines and/or
``*.parquet``), writes ``clean/{log}/ds=D/`` (contract columns, deduplicated),
``quarantine/{log}/ds=D/`` (reason, source_file, raw) and ``metrics/ingest/ds=D/metrics.json``.

JSON Lines are read as text, so a malformed line becomes a quarantined row ("malformed
JSON") instead of failing the job; Parquet rows are turned into the same JSON text, so one
validation path serves both. Checks come from :mod:`keyart.contracts`; a row whose ``ts``
is not in day D is quarantined too. Duplicates (same ``event_id`` for impressions, same
``(member_id, title_id, ts)`` for plays) are kept once. For every log and day:
``read = clean + quarantined + duplicates``. A day without raw files writes empty
partitions and reports ``read = 0``; the DAG's data-quality gate decides what that means.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from keyart.config import Settings
from keyart.contracts import IMPRESSIONS, PLAYS, QUARANTINE_EXTRA, Contract
from keyart.jobs.common import (
    contract_reason,
    day_range,
    main_for,
    reason_kind,
    text_schema,
    write_day,
    write_metrics,
)
from keyart.lake import Lake

LOGS: dict[str, Contract] = {"impressions": IMPRESSIONS, "plays": PLAYS}
MALFORMED = "malformed JSON"
TEXT_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
# Microseconds survive the Parquet -> JSON text round trip (the default keeps milliseconds).
_TS_FORMAT = "yyyy-MM-dd'T'HH:mm:ss.SSSSSSXXX"
_CORRUPT = "_corrupt_record"

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


def quarantine_schema() -> T.StructType:
    return T.StructType([T.StructField(f.name, T.StringType(), True) for f in QUARANTINE_EXTRA])


# ----------------------------------------------------------------------------------------
# extract
# ----------------------------------------------------------------------------------------

def extract(spark: SparkSession, lake: Lake, log: str, days: list[str]) -> tuple[DataFrame, dict[str, int]]:
    """Raw rows of ``log`` for ``days`` as ``(ds, source_file, raw)`` text, and files per day."""
    frames: list[DataFrame] = []
    files_per_day: dict[str, int] = {}
    for ds in days:
        folder = lake.raw(log, ds)
        files = sorted(p for p in folder.glob("*") if p.is_file() and not p.name.startswith(("_", "."))) if folder.is_dir() else []
        text = [str(p) for p in files if p.name.endswith(TEXT_SUFFIXES)]
        parquet = [str(p) for p in files if p.name.endswith(".parquet")]
        files_per_day[ds] = len(text) + len(parquet)
        if text:
            df = spark.read.text(text).select(F.col("_metadata.file_path").alias("source_file"), F.col("value").alias("raw"))
            frames.append(df.where(F.trim("raw") != "").select(F.lit(ds).alias("ds"), "source_file", "raw"))
        if parquet:
            df = spark.read.parquet(*parquet)
            as_json = F.to_json(F.struct(*[F.col(c) for c in df.columns]), {"timestampFormat": _TS_FORMAT})
            frames.append(df.select(F.lit(ds).alias("ds"), F.col("_metadata.file_path").alias("source_file"), as_json.alias("raw")))
    if not frames:
        return spark.createDataFrame([], RAW_SCHEMA), files_per_day
    out = frames[0]
    for df in frames[1:]:
        out = out.unionByName(df)
    return out, files_per_day


# ----------------------------------------------------------------------------------------
# transform
# ----------------------------------------------------------------------------------------

def classify(raw: DataFrame, contract: Contract) -> DataFrame:
    """Each raw row with its parsed ``row`` struct, ``reason`` (null = valid) and ``is_duplicate``."""
    text = T.StructType(text_schema(contract.fields).fields + [T.StructField(_CORRUPT, T.StringType())])
    parsed = raw.select(
        "ds", "source_file", "raw",
        F.from_json("raw", contract.spark_schema()).alias("row"),
        F.from_json("raw", text, {"columnNameOfCorruptRecord": _CORRUPT}).alias("text"),
    )
    malformed = F.col("raw").isNull() | F.col("text").isNull() | F.col(f"text.{_CORRUPT}").isNotNull()
    ts = F.col("row.ts")
    off_day = F.when(
        F.to_date(ts) != F.to_date("ds"),
        F.concat(F.lit("ts is not in day "), F.col("ds"), F.lit(", got "), F.date_format(ts, "yyyy-MM-dd'T'HH:mm:ss'Z'")),
    )
    reason = F.when(malformed, F.lit(MALFORMED)).otherwise(F.coalesce(contract_reason(contract, F.col("row"), F.col("text")), off_day))
    classified = parsed.withColumn("reason", reason).drop("text")
    key = [F.col(f"row.{k}") for k in contract.key]
    first = Window.partitionBy(F.col("ds"), F.col("reason").isNull(), *key).orderBy("source_file", "raw")
    dup = F.col("reason").isNull() & (F.row_number().over(first) > 1)
    return classified.withColumn("is_duplicate", dup)


def transform(raw: DataFrame, contract: Contract) -> Ingested:
    """Split raw rows into clean (contract columns + ds), quarantine and per-day counts. Pure."""
    classified = classify(raw, contract)
    clean = classified.where(F.col("reason").isNull() & ~F.col("is_duplicate")).select("ds", *[F.col(f"row.{c}").alias(c) for c in contract.columns])
    quarantine = classified.where(F.col("reason").isNotNull()).select("ds", "reason", "source_file", "raw")
    counts = classified.groupBy("ds").agg(
        F.count(F.lit(1)).alias("read"),
        F.sum(F.when(F.col("reason").isNull() & ~F.col("is_duplicate"), 1).otherwise(0)).alias("clean"),
        F.sum(F.when(F.col("reason").isNotNull(), 1).otherwise(0)).alias("quarantined"),
        F.sum(F.when(F.col("is_duplicate"), 1).otherwise(0)).alias("duplicates"),
    )
    reasons = quarantine.groupBy("ds", reason_kind(F.col("reason")).alias("kind")).count()
    return Ingested(classified=classified, clean=clean, quarantine=quarantine, counts=counts, reasons=reasons)


# ----------------------------------------------------------------------------------------
# load
# ----------------------------------------------------------------------------------------

def load(spark: SparkSession, result: Ingested, lake: Lake, log: str, contract: Contract, days: list[str]) -> dict[str, dict[str, Any]]:
    """Write clean and quarantine partitions for every day of ``days``; return per-day counts.

    Days present in the rows are written with ``partitionBy("ds")`` (dynamic overwrite);
    a day with no rows gets an empty partition, so a rerun never leaves stale rows behind.
    """
    result.classified.persist()
    try:
        counts = {r["ds"]: {k: int(r[k] or 0) for k in ("read", "clean", "quarantined", "duplicates")} for r in result.counts.collect()}
        reasons: dict[str, dict[str, int]] = {}
        for r in result.reasons.collect():
            reasons.setdefault(r["ds"], {})[r["kind"]] = int(r["count"])
        for df, base, schema, n in (
            (result.clean, lake.clean(log), contract.spark_schema(), "clean"),
            (result.quarantine, lake.quarantine(log, days[0]).parent, quarantine_schema(), "quarantined"),
        ):
            with_rows = [d for d in days if counts.get(d, {}).get(n, 0) > 0]
            if with_rows:
                out = df.where(F.col("ds").isin(with_rows))
                if len(with_rows) > 1:
                    out = out.repartition("ds")
                out.write.mode("overwrite").partitionBy("ds").parquet(str(base))
            for d in days:
                if d not in with_rows:
                    write_day(spark.createDataFrame([], schema), base / f"ds={d}", files=1)
    finally:
        result.classified.unpersist()
    out: dict[str, dict[str, Any]] = {}
    for d in days:
        c = counts.get(d, {"read": 0, "clean": 0, "quarantined": 0, "duplicates": 0})
        c["balanced"] = c["read"] == c["clean"] + c["quarantined"] + c["duplicates"]
        c["reasons"] = dict(sorted(reasons.get(d, {}).items(), key=lambda kv: -kv[1])[:20])
        out[d] = c
    return out


def run(spark: SparkSession, lake: Lake, args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    """Ingest every log for ``args.ds`` .. ``args.through`` and write one metrics file per day."""
    days = day_range(args.ds, args.through)
    per_day: dict[str, dict[str, Any]] = {d: {} for d in days}
    for log, contract in LOGS.items():
        raw, files = extract(spark, lake, log, days)
        counts = load(spark, transform(raw, contract), lake, log, contract, days)
        for d in days:
            per_day[d][log] = {**counts[d], "files": files.get(d, 0)}
    for d in days:
        write_metrics(lake, "ingest", d, per_day[d])
    return {"days": len(days), "read": {log: sum(per_day[d][log]["read"] for d in days) for log in LOGS}}


def main(argv: list[str] | None = None) -> int:
    return main_for("ingest", __doc__, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
