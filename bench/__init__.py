"""``keyart bench NAME``: benchmarks that print their figures (``--json`` for JSON).

Benchmarks are not tests: they measure on this machine and print ratios against a
baseline measured in the same run. They live in this package, outside the shipped job,
model and serving modules, and each is imported only when asked for.
"""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {
    "jobs": ("keyart.bench.jobs", "Spark job wall times vs a DuckDB single-node reference"),
    "learning": ("keyart.bench.learning", "policy value from ground truth and OPE interval coverage"),
    "serving": ("keyart.bench.serving", "endpoint throughput/latency vs the in-process floor"),
    "loop": ("keyart.bench.loop", "the closed loop over days vs random, non-contextual and VW"),
    "faults": ("keyart.bench.faults", "bad input, kill -9, disk full, bad bundles, registry outage, bad raw logs"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("benchmark", choices=sorted(BENCHMARKS),
                        help="; ".join(f"{k}: {v[1]}" for k, v in BENCHMARKS.items()))
    parser.add_argument("options", nargs=argparse.REMAINDER, help="the benchmark's own options (--help lists them)")


def run(args: argparse.Namespace) -> int:
    module_name, help_text = BENCHMARKS[args.benchmark]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"keyart bench {args.benchmark}", description=help_text)
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(args.options)) or 0)
