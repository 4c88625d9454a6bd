"""common: contract checks generated from keyart.contracts, partitions, day ranges."""

from __future__ import annotations

import json

import pytest
from pyspark.sql import functions as F

from keyart.contracts import ARTWORKS, TITLES
from keyart.jobs import common


def reasons(spark, contract, rows):
    df = spark.createDataFrame([(json.dumps(r),) for r in rows], "raw string")
    parsed = df.select(F.from_json("raw", contract.spark_schema()).alias("row"), F.from_json("raw", common.text_schema(contract.fields)).alias("text"))
    return [r[0] for r in parsed.select(common.contract_reason(contract, F.col("row"), F.col("text"))).collect()]


def test_reasons_follow_the_contract_fields_in_order(spark):
    ok = {"artwork_id": "t1-a0", "title_id": "t1", "tags": ["x"], "is_default": True, "active_from": "2026-01-01", "active_to": None}
    got = reasons(spark, ARTWORKS, [
        ok,
        {**ok, "is_default": "yes"},
        {**ok, "active_from": "soon"},
        {**ok, "active_to": "later"},
        {**ok, "tags": ["x", None]},
        {**ok, "title_id": None, "is_default": "yes"},   # the first violated field is reported
    ])
    assert got[0] is None
    assert got[1].startswith("is_default must be a boolean")
    assert got[2].startswith("active_from must be a date")
    assert got[3].startswith("active_to must be a date")
    assert got[4] == "tags has a null item"
    assert got[5] == "title_id is missing (null)"


def test_array_minimum_and_allowed_values(spark):
    ok = {"title_id": "t1", "name": "T", "genres": ["drama"], "cast": [], "maturity_rating": "PG"}
    got = reasons(spark, TITLES, [{**ok, "genres": []}, {**ok, "maturity_rating": "X"}])
    assert got[0] == "genres must have at least 1 items, got 0"
    assert got[1].startswith("maturity_rating must be one of")


def test_day_range():
    assert common.day_range("2026-02-27", "2026-03-01") == ["2026-02-27", "2026-02-28", "2026-03-01"]
    assert common.day_range("2026-03-01") == ["2026-03-01"]
    with pytest.raises(ValueError, match="before"):
        common.day_range("2026-03-02", "2026-03-01")


def test_write_metrics(lake):
    path = common.write_metrics(lake, "ingest", "2026-03-01", {"read": 3})
    assert json.loads(path.read_text()) == {"step": "ingest", "ds": "2026-03-01", "read": 3}
