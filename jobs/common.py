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
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from pyspark.sql import Column, DataFrame, SparkSession
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
    ui: bool = True,
    settings: Settings | None = None,
) -> SparkSession:
    """The SparkSession every job uses, configured from :class:`keyart.config.Settings`.

    ``master`` None keeps a master already given by spark-submit (``spark.master``) and
    otherwise uses ``settings.spark_master``; with ``settings.spark_remote`` set (and no
    ``master``) it is a Spark Connect session on that server instead (jobs/connect_server.py). Session time zone is UTC (every ts is UTC
    and ``to_date(ts)`` must give the partition day on any machine).
    """
    s = settings or Settings()
    if master is None and s.spark_remote:
        return _connect_session(app, s, shuffle_partitions)
    # pyspark.pandas (used by pyspark.testing) refuses Arrow time zones without it.
    os.environ.setdefault("PYARROW_IGNORE_TIMEZONE", "1")
    builder = SparkSession.builder.appName(app)
    if master is not None:
        builder = builder.master(master)
    elif not _master_given_by_submit():
        builder = builder.master(s.spark_master)
    # Python workers run PYSPARK_PYTHON (default "python3", which may lack our packages).
    python = os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    conf = {
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.sources.partitionOverwriteMode": "dynamic",
        "spark.sql.shuffle.partitions": str(shuffle_partitions or s.spark_shuffle_partitions),
        "spark.driver.memory": s.spark_driver_memory,
        "spark.ui.enabled": "true" if ui else "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.parquet.compression.codec": "snappy",
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
    for key, value in {
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.sources.partitionOverwriteMode": "dynamic",
        "spark.sql.shuffle.partitions": str(shuffle_partitions or s.spark_shuffle_partitions),
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.parquet.compression.codec": "snappy",
    }.items():
        spark.conf.set(key, value)
    log.info("Spark Connect session %s on %s", app, s.spark_remote)
    return spark


def _master_given_by_submit() -> bool:
    """True when spark-submit started this driver with a master (it launched the JVM)."""
    if "PYSPARK_GATEWAY_PORT" not in os.environ:
        return False
    from pyspark import SparkConf, SparkContext

    SparkContext._ensure_initialized()  # connects to spark-submit's JVM (already running)
    return SparkConf().contains("spark.master")


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
