"""What every Spark job shares: the session, ds partition I/O, metrics, contract checks, main().

A job module has ``extract(spark, lake, ds, ...)`` (reads), a pure ``transform(...)``
(DataFrames in, DataFrames out, no I/O), ``load(df, lake, ds)`` (writes) and
``main(argv)``, so ``spark-submit jobs/<name>.py --ds D`` runs it alone and
``keyart job <name> --ds D`` runs it through the CLI. Nothing here knows which master runs
it: the master comes from ``--master``, ``KEYART_SPARK_MASTER`` or spark-submit, or the job is a
Spark Connect client of ``KEYART_SPARK_REMOTE`` (a long-lived driver shared by every job).

Partitions are written by overwriting the exact ``ds=D`` folder (rows carry no ``ds``
column), so a rerun replaces its own day and nothing else; the session also sets
``partitionOverwriteMode=dynamic`` for writers that use ``partitionBy("ds")``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from pyspark.sql import Column, DataFrame, Observation, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from keyart.config import Settings
from keyart.contracts import ID_PATTERN, Contract, Field
from keyart.lake import Lake, fmt_ds, parse_ds, shift_ds

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------
# Session
# ----------------------------------------------------------------------------------------

def get_spark(
    app: str,
    master: str | None = None,
    shuffle_partitions: int | None = None,
    ui: bool | None = None,
    settings: Settings | None = None,
) -> SparkSession:
    """The SparkSession every job uses, configured from :class:`keyart.config.Settings`.

    ``master`` None keeps a master already given by spark-submit (``spark.master``) and
    otherwise uses ``settings.spark_master``; with ``settings.spark_remote`` set (and no
    ``master``) it is a Spark Connect session on that server instead (jobs/connect_server.py). Session time zone is UTC (every ts is UTC
    and ``to_date(ts)`` must give the partition day on any machine). ``ui`` None follows
    ``settings.spark_ui``; the driver's ports bind to ``settings.spark_bind_address``
    (:func:`driver_conf`).
    """
    s = settings or Settings()
    if master is None and s.spark_remote:
        return _connect_session(app, s, shuffle_partitions)
    # pyspark.pandas (used by pyspark.testing) refuses Arrow time zones without it.
    os.environ.setdefault("PYARROW_IGNORE_TIMEZONE", "1")
    builder = SparkSession.builder.appName(app)
    submitted = _submitted_master() if master is None else None
    if submitted is None:
        master = master or s.spark_master
        builder = builder.master(master)
    # Python workers run PYSPARK_PYTHON (default "python3", which may lack our packages).
    python = os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    # Spark's web UI binds to $SPARK_LOCAL_IP (0.0.0.0 without it): read by the JVM launched below.
    os.environ.setdefault("SPARK_LOCAL_IP", s.spark_bind_address)
    conf = {
        **session_conf(shuffle_partitions or s.spark_shuffle_partitions),
        **driver_conf(s, submitted or master, s.spark_ui if ui is None else ui),
        "spark.driver.memory": s.spark_driver_memory,
        "spark.pyspark.python": python,
        "spark.driver.extraJavaOptions": "-Duser.timezone=UTC",
        "spark.executor.extraJavaOptions": "-Duser.timezone=UTC",
    }
    for key, value in conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark


def _connect_session(app: str, s: Settings, shuffle_partitions: int | None) -> SparkSession:
    """A Spark Connect session on ``s.spark_remote`` with the jobs' runtime SQL settings.

    The server owns the driver (memory, UI, Python for its workers); the client sets only
    what a session may set."""
    from keyart.jobs.connect_server import require_reachable

    require_reachable(s.spark_remote)
    os.environ.setdefault("PYARROW_IGNORE_TIMEZONE", "1")
    builder = SparkSession.builder.remote(s.spark_remote).appName(app)
    spark = builder.create()
    for key, value in session_conf(shuffle_partitions or s.spark_shuffle_partitions).items():
        spark.conf.set(key, value)
    log.info("Spark Connect session %s on %s", app, s.spark_remote)
    return spark


def session_conf(shuffle_partitions: int) -> dict[str, str]:
    """The SQL settings every job session runs with (a Spark Connect session sets them too).

    ``shuffle_partitions`` is the most a shuffle is split into: adaptive execution coalesces
    small shuffles to fewer partitions of ``ADVISORY_PARTITION_BYTES`` (a day at demo size
    runs its shuffles as one task, a large day uses every core), and turns a join whose
    side turns out small into a broadcast join."""
    return {
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.sources.partitionOverwriteMode": "dynamic",
        "spark.sql.shuffle.partitions": str(shuffle_partitions),
        "spark.sql.adaptive.enabled": "true",
        "spark.sql.adaptive.coalescePartitions.enabled": "true",
        "spark.sql.adaptive.coalescePartitions.parallelismFirst": "false",
        "spark.sql.adaptive.advisoryPartitionSizeInBytes": ADVISORY_PARTITION_BYTES,
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.parquet.compression.codec": "snappy",
    }


ADVISORY_PARTITION_BYTES = "32m"
"""Target size of a shuffle partition after adaptive coalescing."""
LOCAL_MASTERS = ("local",)


def driver_conf(s: Settings, master: str | None, ui: bool) -> dict[str, str]:
    """Where the driver listens and who may talk to it (``docs/jobs.md``, Security).

    * RPC and block manager bind to and advertise ``s.spark_bind_address`` (127.0.0.1 by
      default: nothing of the driver is reachable from another machine);
    * the web UI is off unless ``ui``; when on it binds to ``$SPARK_LOCAL_IP``, which
      :func:`get_spark` sets to the same address before the JVM starts;
    * ``spark.authenticate``: on local masters always (Spark generates a secret per
      application); on a standalone master (``spark://``) with ``s.spark_authenticate_secret``
      (its master and workers must run with the same secret). Elsewhere the cluster's
      ``spark-defaults.conf`` decides (Kubernetes and YARN generate a secret themselves).
    """
    conf = {
        "spark.driver.bindAddress": s.spark_bind_address,
        "spark.driver.host": s.spark_bind_address,
        "spark.ui.enabled": "true" if ui else "false",
        "spark.ui.showConsoleProgress": "false",
    }
    if ui:
        conf["spark.ui.port"] = "0"  # a free port, never a fixed 4040 another application may hold
    if master and master.startswith(LOCAL_MASTERS):
        conf["spark.authenticate"] = "true"
    elif master and master.startswith("spark://") and s.spark_authenticate_secret:
        conf["spark.authenticate"] = "true"
        conf["spark.authenticate.secret"] = s.spark_authenticate_secret
    return conf


def _submitted_master() -> str | None:
    """The master spark-submit started this driver with (it launched the JVM), else None."""
    if "PYSPARK_GATEWAY_PORT" not in os.environ:
        return None
    from pyspark import SparkConf, SparkContext

    SparkContext._ensure_initialized()  # connects to spark-submit's JVM (already running)
    conf = SparkConf()
    return conf.get("spark.master") if conf.contains("spark.master") else None


# ----------------------------------------------------------------------------------------
# Partitions
# ----------------------------------------------------------------------------------------

def day_range(start: str, end: str | None = None) -> list[str]:
    """Every ds from ``start`` to ``end`` inclusive (just ``start`` when end is None)."""
    first, last = parse_ds(start), parse_ds(end or start)
    if last < first:
        raise ValueError(f"--through {fmt_ds(last)} is before --ds {fmt_ds(first)}")
    return [shift_ds(first, i) for i in range((last - first).days + 1)]


def has_data(path: Path) -> bool:
    """True if ``path`` is a folder holding at least one data file."""
    return path.is_dir() and any(
        p.is_file() and not p.name.startswith(("_", ".")) for p in path.rglob("*")
    )


def read_days(
    spark: SparkSession,
    folder_of: Callable[[str], Path],
    days: Iterable[str],
    schema: T.StructType,
    ds_column: str | None = None,
) -> DataFrame:
    """Union of the Parquet partitions of ``days`` that exist, in ``schema``.

    Missing days are skipped (an empty frame when none exist). With ``ds_column`` each
    row carries the date of the partition it came from.
    """
    frames = []
    for ds in days:
        path = folder_of(ds)
        if not has_data(path):
            continue
        df = spark.read.schema(schema).parquet(str(path))
        if ds_column:
            df = df.withColumn(ds_column, F.lit(ds).cast("date"))
        frames.append(df)
    if not frames:
        out_schema = T.StructType(schema.fields + ([T.StructField(ds_column, T.DateType())] if ds_column else []))
        return spark.createDataFrame([], out_schema)
    out = frames[0]
    for df in frames[1:]:
        out = out.unionByName(df)
    return out


def read_range(
    spark: SparkSession, base: Path, first: str, last: str, schema: T.StructType, ds_column: str = "ds"
) -> DataFrame:
    """Rows of the ``ds=`` partitions of ``base`` from ``first`` to ``last`` (pruned), with a date column."""
    full = T.StructType(schema.fields + [T.StructField("ds", T.DateType())])
    if not base.is_dir() or not any(p.name.startswith("ds=") for p in base.iterdir()):
        df = spark.createDataFrame([], full)
    else:
        df = spark.read.schema(full).option("basePath", str(base)).parquet(str(base))
    df = df.where(F.col("ds").between(F.lit(first).cast("date"), F.lit(last).cast("date")))
    return df.withColumnRenamed("ds", ds_column) if ds_column != "ds" else df


def read_table(spark: SparkSession, path: Path, contract: Contract) -> DataFrame:
    """A dimension table (catalog, members): Parquet files, or JSON Lines, in the contract schema."""
    schema = contract.spark_schema()
    if not path.exists():
        raise FileNotFoundError(f"{contract.name}: no table at {path}")
    files = [p for p in path.rglob("*") if p.is_file() and not p.name.startswith(("_", "."))]
    parquet = [str(p) for p in files if p.suffix == ".parquet"]
    jsonl = [str(p) for p in files if p.suffix in (".jsonl", ".json")]
    if parquet:
        return spark.read.schema(schema).parquet(*parquet)
    if jsonl:
        return spark.read.schema(schema).json(jsonl)
    return spark.createDataFrame([], schema)


def write_day(df: DataFrame, path: Path, files: int | None = None) -> None:
    """Overwrite the exact partition folder ``path`` (``.../ds=D``) with ``df`` as Parquet."""
    if files:
        df = df.coalesce(files)
    df.write.mode("overwrite").parquet(str(path))


# Rerun identity. Spark's Parquet is not byte-identical across reruns (file names carry a
# per-write UUID, footers may differ), so a partition's identity is its content: the number
# of rows and an order-independent hash of them, computed while the rows are written.
_ROW_HASHES = ("h64", "h32")


def _row_hashes(columns: Sequence[str]) -> list[Column]:
    """Two independent hashes of a row (xxHash64 and Murmur3 over every column and whether
    each is null, so a null cannot trade places with a value unnoticed)."""
    cols = [F.col(c) for c in columns] + [F.col(c).isNull() for c in columns]
    return [F.xxhash64(*cols).cast("decimal(38,0)"), F.hash(*cols).cast("decimal(38,0)")]


def content_exprs(columns: Sequence[str], where: Column | None = None, suffix: str = "") -> list[Column]:
    """Aggregates of a partition's identity (rows, h64, h32; with ``suffix`` on their names),
    over the rows where ``where`` holds (all when None). Order-independent: a decimal sum."""
    def only(c: Column) -> Column:
        return c if where is None else F.when(where, c)
    hashes = _row_hashes(columns)
    return [F.count(only(F.lit(1))).alias(f"rows{suffix}"),
            *[F.coalesce(F.sum(only(h)), F.lit(0).cast("decimal(38,0)")).alias(f"{n}{suffix}") for n, h in zip(_ROW_HASHES, hashes, strict=True)]]


def content_hash(rows: int, h64: Any, h32: Any) -> str:
    """The identity string of a partition from its :func:`content_exprs` figures."""
    digest = hashlib.sha256(f"{int(rows)}:{int(h64 or 0)}:{int(h32 or 0)}".encode()).hexdigest()[:32]
    return f"{int(rows)}:{digest}"


def partition_content(df: DataFrame) -> dict[str, Any]:
    """``{"rows", "content_hash"}`` of the rows of ``df`` (e.g. a partition read back)."""
    row = df.agg(*content_exprs(df.columns)).first()
    return {"rows": int(row["rows"]), "content_hash": content_hash(row["rows"], row["h64"], row["h32"])}


def write_day_observed(df: DataFrame, path: Path, files: int | None = None,
                       extra: Sequence[Column] = ()) -> dict[str, Any]:
    """:func:`write_day`, returning ``{"rows", "content_hash"}`` of what was written (and the
    ``extra`` aggregates, by name), computed in the same pass as the write."""
    observation = Observation(f"write-{path.name}-{uuid.uuid4().hex[:8]}")
    write_day(df.observe(observation, *content_exprs(df.columns), *extra), path, files)
    figures = dict(observation.get)
    if "rows" not in figures:
        # A Spark Connect write returns no observed metrics: the same aggregates over the
        # partition read back (same columns and types, so the same identity).
        back = df.sparkSession.read.parquet(str(path)).select(*df.columns)
        figures = back.agg(*content_exprs(df.columns), *extra).first().asDict()
    rows = int(figures.pop("rows"))
    return {"rows": rows, "content_hash": content_hash(rows, figures.pop("h64"), figures.pop("h32")), **figures}


def write_days_observed(df: DataFrame, base: Path, days: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Write the rows of ``df`` (with a string ``ds`` column) into ``base/ds=D`` for every D of
    ``days`` (dynamic overwrite; a day without rows gets an empty partition, so a rerun never
    leaves stale rows) and return each day's ``{"rows", "content_hash"}``.

    The figures come from one grouped aggregate over the rows written, a second pass over
    ``df`` (persist it if it is costly): observing the write would hash every row once per
    day (a 90-day history load hashed each row 90 times, in an aggregate too wide for code
    generation), a Spark Connect write returns no observed metrics, and a read-back would
    see a stale partition of a day that has no rows now."""
    columns = [c for c in df.columns if c != "ds"]
    out = df.where(F.col("ds").isin(list(days)))
    if len(days) > 1:
        out = out.repartition("ds")
    out.write.mode("overwrite").partitionBy("ds").parquet(str(base))
    figures: dict[str, Any] = {}
    for r in df.where(F.col("ds").isin(list(days))).groupBy("ds").agg(*content_exprs(columns)).collect():
        i = days.index(r["ds"])
        figures.update({f"rows_{i}": r["rows"], f"h64_{i}": r["h64"], f"h32_{i}": r["h32"]})
    for i in range(len(days)):
        figures.setdefault(f"rows_{i}", 0)
    result = {}
    for i, d in enumerate(days):
        rows = int(figures[f"rows_{i}"])
        result[d] = {"rows": rows, "content_hash": content_hash(rows, figures.get(f"h64_{i}"), figures.get(f"h32_{i}"))}
    write_empty_days(df.sparkSession.createDataFrame([], df.drop("ds").schema), base,
                     [d for d in days if result[d]["rows"] == 0])
    return result


def write_empty_days(empty: DataFrame, base: Path, days: Sequence[str]) -> None:
    """Overwrite ``base/ds=D`` with an empty partition (``empty``'s schema) for every D of ``days``.

    Spark writes the first; the others are copies of it (staged, then swapped in), so a
    90-day history whose impression log is empty costs one Spark write, not 90 (each a job
    of its own, ~0.4 s even when empty)."""
    if not days:
        return
    first = base / f"ds={days[0]}"
    write_day(empty, first, files=1)
    for d in days[1:]:
        path = base / f"ds={d}"
        staged = staging(path)
        shutil.rmtree(staged, ignore_errors=True)
        shutil.copytree(first, staged)
        swap_in(staged, path)


def staging(path: Path) -> Path:
    """A hidden sibling of partition ``path`` (readers skip names starting with ".") to write a
    new version of it into, when the new version is computed from the partition itself (Spark
    cannot overwrite what it is reading); :func:`swap_in` then replaces the partition."""
    return path.with_name(f".{path.name}.staging")


def swap_in(staged: Path, path: Path) -> None:
    """Replace the folder ``path`` with ``staged`` (two renames; the old copy is removed last)."""
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        path.rename(old)
    staged.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def conform(df: DataFrame, contract: Contract) -> DataFrame:
    """``df`` cast to the contract's columns, in contract order (extra columns dropped)."""
    schema = contract.spark_schema()
    return df.select(*[F.col(f.name).cast(relaxed(f.dataType)).alias(f.name) for f in schema.fields])


def relaxed(dtype: T.DataType) -> T.DataType:
    """``dtype`` with every array item and struct child nullable (Parquet reads them so)."""
    if isinstance(dtype, T.ArrayType):
        return T.ArrayType(relaxed(dtype.elementType), True)
    if isinstance(dtype, T.StructType):
        return T.StructType([T.StructField(f.name, relaxed(f.dataType), True) for f in dtype.fields])
    return dtype


def write_metrics(lake: Lake, step: str, ds: str, metrics: dict[str, Any]) -> Path:
    """Write ``metrics/<step>/ds=D/metrics.json`` (atomically) and return its path."""
    path = lake.metrics(step, ds)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"step": step, "ds": ds, **metrics}, indent=2, sort_keys=True, default=str))
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------------------
# Contract checks as Spark expressions (generated from keyart.contracts, never re-listed)
# ----------------------------------------------------------------------------------------

def text_schema(fields: Sequence[Field]) -> T.StructType:
    """Every field as a string: parsing JSON with it yields each value's raw text."""
    return T.StructType([T.StructField(f.name, T.StringType()) for f in fields])


def _clip(col: Column) -> Column:
    return F.substring(col.cast("string"), 1, 40)


def _num(value: float) -> str:
    return repr(value)


def field_reasons(field: Field, typed: Column, raw: Column, prefix: str = "") -> list[Column]:
    """Expressions giving why one value violates ``field`` (null where valid).

    ``typed`` is the value parsed in the contract type, ``raw`` its JSON text (null when
    the key is absent or JSON null). A value present in ``raw`` but null in ``typed`` did
    not parse as the contract type. Reasons start with the field name, like
    :meth:`keyart.contracts.Field.check`.
    """
    name = prefix + field.name
    out: list[Column] = []

    def when(cond: Column, message: Column | str) -> None:
        msg = F.concat(F.lit(name + " "), message if isinstance(message, Column) else F.lit(message))
        out.append(F.when(cond, msg))

    if field.nullable:
        when(typed.isNull() & raw.isNotNull(), F.concat(F.lit(f"must be a {field.dtype}, got "), _clip(raw)))
    else:
        when(raw.isNull(), "is missing (null)")
        when(typed.isNull(), F.concat(F.lit(f"must be a {field.dtype}, got "), _clip(raw)))
    t = field.dtype
    if t == "string":
        if field.is_id:
            when(~typed.rlike(ID_PATTERN), F.concat(F.lit("is not a valid id, got "), _clip(typed)))
        if field.allowed is not None:
            when(~typed.isin(*field.allowed), F.concat(F.lit(f"must be one of {list(field.allowed)}, got "), _clip(typed)))
    elif t in ("long", "int", "double"):
        if t == "double":
            when(F.isnan(typed) | typed.isin(float("inf"), float("-inf")), F.concat(F.lit("must be finite, got "), _clip(typed)))
        if field.minimum is not None:
            when(typed < F.lit(field.minimum), F.concat(F.lit(f"must be >= {_num(field.minimum)}, got "), _clip(typed)))
        if field.maximum is not None:
            when(typed > F.lit(field.maximum), F.concat(F.lit(f"must be <= {_num(field.maximum)}, got "), _clip(typed)))
    elif t == "array<string>":
        when(F.exists(typed, lambda x: x.isNull()), "has a null item")
        if field.is_id:
            when(F.exists(typed, lambda x: ~x.rlike(ID_PATTERN)), "has an item that is not a valid id")
        if field.minimum is not None:
            when(F.size(typed) < F.lit(int(field.minimum)), F.concat(F.lit(f"must have at least {int(field.minimum)} items, got "), F.size(typed).cast("string")))
        if field.maximum is not None:
            when(F.size(typed) > F.lit(int(field.maximum)), F.concat(F.lit(f"must have at most {int(field.maximum)} items, got "), F.size(typed).cast("string")))
    elif t == "struct":
        raw_children = F.from_json(raw, text_schema(field.children))
        for child in field.children:
            out.extend(field_reasons(child, typed[child.name], raw_children[child.name], prefix=name + "."))
    return out


def contract_reason(contract: Contract, typed: Column, raw: Column) -> Column:
    """The first violation of ``contract`` in a row (null if valid), in contract field order.

    ``typed`` is the row parsed with ``contract.spark_schema()``, ``raw`` the row parsed
    with :func:`text_schema` (each value's JSON text).
    """
    reasons: list[Column] = []
    for f in contract.fields:
        reasons.extend(field_reasons(f, typed[f.name], raw[f.name]))
    return F.coalesce(*reasons)


def reason_kind(reason: Column) -> Column:
    """Spark twin of :func:`keyart.contracts.reason_kind`: field and kind, value dropped."""
    return F.trim(F.substring_index(F.substring_index(reason, ",", 1), " got ", 1))


# ----------------------------------------------------------------------------------------
# main()
# ----------------------------------------------------------------------------------------

def job_parser(name: str, doc: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"keyart job {name}", description=(doc or "").strip().splitlines()[0] if doc else None)
    add_common_arguments(parser)
    return parser


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ds", required=True, help="partition day YYYY-MM-DD")
    parser.add_argument("--through", default=None, help="last day of a range (jobs that support it)")
    parser.add_argument("--lake", default=None, help="lake root (default: settings)")
    parser.add_argument("--master", default=None, help="Spark master URL (default: spark-submit's, else settings)")
    parser.add_argument("--shuffle-partitions", type=int, default=None, dest="shuffle_partitions")


JobRunner = Callable[[SparkSession, Lake, argparse.Namespace, Settings], dict[str, Any]]


def run_job(name: str, runner: JobRunner, args: argparse.Namespace, spark: SparkSession | None = None) -> int:
    """Run ``runner`` for ``args.ds`` (or each day to ``args.through``) in one Spark application."""
    settings = Settings()
    lake = Lake(args.lake or settings.lake)
    own = spark is None
    spark = spark or get_spark(f"keyart-{name}", master=args.master, shuffle_partitions=args.shuffle_partitions, settings=settings)
    try:
        started = time.perf_counter()
        result = runner(spark, lake, args, settings)
        log.info("job %s ds=%s done in %.1fs: %s", name, args.ds, time.perf_counter() - started, json.dumps(result, default=str)[:400])
    finally:
        if own:
            spark.stop()
    return 0


def main_for(name: str, doc: str | None, runner: Callable[..., dict[str, Any]], argv: Sequence[str] | None = None) -> int:
    """The ``main(argv)`` of a job module: parse ``--ds`` and friends, run, stop the session."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = job_parser(name, doc).parse_args(list(sys.argv[1:] if argv is None else argv))
    return run_job(name, runner, args)
