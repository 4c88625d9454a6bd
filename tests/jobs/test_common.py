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


# ----------------------------------------------------------------------------------------
# rerun identity: content hashes
# ----------------------------------------------------------------------------------------

def test_content_hash_ignores_order_and_sees_every_change(spark):
    rows = [("a", 1, 0.5, None), ("b", 2, None, "x"), ("c", 3, 1.5, "y")]
    schema = "id string, n int, v double, s string"
    base = common.partition_content(spark.createDataFrame(rows, schema))
    assert base["rows"] == 3
    assert common.partition_content(spark.createDataFrame(rows[::-1], schema).repartition(3)) == base
    for changed in (
        [("a", 1, 0.5, None), ("b", 2, None, "x"), ("c", 3, 1.5000001, "y")],   # a value
        [("a", 1, None, None), *rows[1:]],                                      # a value made null
        rows + [rows[0]],                                                        # a duplicated row
        rows[:2],                                                                # a missing row
    ):
        assert common.partition_content(spark.createDataFrame(changed, schema)) != base
    # a null cannot trade places with a value
    three = "a string, b string, c string"
    assert (common.partition_content(spark.createDataFrame([("p", None, "q")], three))
            != common.partition_content(spark.createDataFrame([("p", "q", None)], three)))


def test_write_day_observed_reports_what_was_written(spark, tmp_path):
    df = spark.createDataFrame([(i, f"m{i % 7}", i / 3) for i in range(50)], "i long, m string, x double")
    path = tmp_path / "t" / "ds=2026-03-01"
    written = common.write_day_observed(df, path, extra=[F.sum("i").alias("total")])
    assert written["rows"] == 50 and written["total"] == sum(range(50))
    back = spark.read.parquet(str(path))
    assert common.partition_content(back) == {"rows": 50, "content_hash": written["content_hash"]}
    again = common.write_day_observed(df.repartition(4), path)   # another layout, other file names
    assert again == {"rows": 50, "content_hash": written["content_hash"]}


def test_write_days_observed_hashes_each_day_and_empties_days_without_rows(spark, tmp_path):
    df = spark.createDataFrame([("2026-03-01", "a"), ("2026-03-01", "b"), ("2026-03-02", "c")], "ds string, v string")
    stale = tmp_path / "ds=2026-03-03"
    common.write_day(spark.createDataFrame([("old",)], "v string"), stale)
    got = common.write_days_observed(df, tmp_path, ["2026-03-01", "2026-03-02", "2026-03-03"])
    assert {d: g["rows"] for d, g in got.items()} == {"2026-03-01": 2, "2026-03-02": 1, "2026-03-03": 0}
    for d, figures in got.items():
        back = spark.read.schema("v string").parquet(str(tmp_path / f"ds={d}"))
        assert common.partition_content(back)["content_hash"] == figures["content_hash"]


# ----------------------------------------------------------------------------------------
# where the driver listens
# ----------------------------------------------------------------------------------------

def test_driver_conf_binds_loopback_authenticates_and_keeps_the_ui_off():
    from keyart.config import Settings

    s = Settings()
    local = common.driver_conf(s, "local[2]", ui=False)
    assert local["spark.driver.bindAddress"] == local["spark.driver.host"] == "127.0.0.1"
    assert local["spark.ui.enabled"] == "false" and local["spark.authenticate"] == "true"
    assert "spark.authenticate.secret" not in local   # Spark generates one per local application
    assert common.driver_conf(s, "local[2]", ui=True)["spark.ui.port"] == "0"
    # a standalone master authenticates with the shared secret, and only with one
    assert "spark.authenticate" not in common.driver_conf(s, "spark://127.0.0.1:7077", ui=False)
    secret = "s" * 32
    standalone = common.driver_conf(Settings(spark_authenticate_secret=secret), "spark://127.0.0.1:7077", ui=False)
    assert standalone["spark.authenticate"] == "true" and standalone["spark.authenticate.secret"] == secret
    wider = common.driver_conf(Settings(spark_bind_address="10.0.0.5"), "local[2]", ui=False)
    assert wider["spark.driver.bindAddress"] == "10.0.0.5"
    with pytest.raises(ValueError, match="at least 16"):
        Settings(spark_authenticate_secret="short")


def listening(port: int) -> set[str]:
    """Addresses a TCP port listens on, from /proc/net/tcp{,6}."""
    import ipaddress

    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, _, hex_port = local.partition(":")
            if state != "0A" or int(hex_port, 16) != port:
                continue
            raw = bytes.fromhex(addr)
            # the kernel prints each 32-bit word in host (little-endian) order
            words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            ip = ipaddress.ip_address(words) if width == 8 else ipaddress.IPv6Address(words)
            found.add(str(ip.ipv4_mapped or ip) if width == 32 else str(ip))
    return found


def test_session_listens_on_loopback_only_and_authenticates(spark):
    conf = spark.sparkContext.getConf()
    assert conf.get("spark.authenticate") == "true"
    assert conf.get("spark.ui.enabled") == "false" and spark.sparkContext.uiWebUrl is None
    driver_port = int(conf.get("spark.driver.port"))
    block_port = spark.sparkContext._jsc.sc().env().blockManager().blockManagerId().port()
    for port in (driver_port, block_port):
        assert listening(port) == {"127.0.0.1"}, port


def test_spark_ui_when_on_listens_on_loopback_only(tmp_path):
    """The UI in a fresh driver (its own process: one SparkContext per JVM)."""
    import os
    import subprocess
    import sys

    code = (
        "from keyart.jobs.common import get_spark\n"
        "s = get_spark('ui-probe', master='local[1]', ui=True)\n"
        "print(s.sparkContext.uiWebUrl, flush=True)\n"
        "import sys; sys.stdin.readline()\n"
        "s.stop()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "SPARK_LOCAL_IP"}
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env, cwd=tmp_path)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), url
        port = int(url.rsplit(":", 1)[1])
        assert listening(port) == {"127.0.0.1"}
    finally:
        proc.communicate("\n", timeout=120)
