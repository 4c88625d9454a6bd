"""``keyart job NAME [NAME ...] --ds D``: run Spark jobs for one day (in order, one Spark application).

    keyart job ingest --ds 2026-03-01 --through 2026-03-28
    keyart job rewards features priors --ds 2026-03-28 --master spark://127.0.0.1:7077

The same jobs run alone with ``spark-submit jobs/<name>.py --ds D``.
"""

from __future__ import annotations

import argparse
import importlib
import logging

from keyart.config import Settings
from keyart.jobs.common import add_common_arguments, get_spark, run_job
from keyart.pipeline import SPARK_JOBS

JOBS = SPARK_JOBS
log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("jobs", nargs="+", choices=JOBS, metavar="JOB", help=f"one or more of {', '.join(JOBS)}")
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if args.through and args.jobs != ["ingest"]:
        raise SystemExit("--through is supported by ingest only")
    settings = Settings()
    spark = get_spark(f"keyart-{'-'.join(args.jobs)}", master=args.master, shuffle_partitions=args.shuffle_partitions, settings=settings)
    try:
        for name in args.jobs:
            module = importlib.import_module(f"keyart.jobs.{name}")
            run_job(name, module.run, args, spark=spark)
    finally:
        spark.stop()
    return 0
