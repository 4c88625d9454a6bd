"""``keyart bench NAME``: benchmarks that print their figures (``--json`` for JSON).

Benchmarks are not tests: they measure on this machine and print ratios against a
baseline measured in the same run. Each lives beside the code it measures.
"""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {
    "jobs": ("keyart.jobs.bench", "Spark job wall times vs a DuckDB single-node reference"),
    "learning": ("keyart.models.bench", "policy value from ground truth and OPE interval coverage"),
    "serving": ("keyart.serving.bench", "endpoint throughput/latency vs the in-process floor"),
    "loop": ("keyart.loop_bench", "the closed loop over days vs random, non-contextual and VW"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name, (module_name, help_text) in BENCHMARKS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError:
            p.set_defaults(_missing=True)
            continue
        module.add_arguments(p)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "_missing", False):
        print(f"keyart bench {args.benchmark}: not available in this build ({args._module} is missing)")
        return 2
    return int(importlib.import_module(args._module).run(args) or 0)
