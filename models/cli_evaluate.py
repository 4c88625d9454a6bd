"""``keyart evaluate --ds D``: value candidate, champion, logging and baselines offline.

Writes ``runs/ds=D/evaluation.json`` (see :mod:`keyart.models.evaluate`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from keyart.config import settings
from keyart.lake import Lake, fmt_ds
from keyart.models.evaluate import evaluate_run, summary_table
from keyart.policy import PolicyConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ds", required=True, type=fmt_ds, help="run date YYYY-MM-DD")
    parser.add_argument("--lake", type=Path, default=None, help="lake root (default: config)")
    parser.add_argument("--run-dir", type=Path, default=None, help="default: <lake>/runs/ds=D")
    parser.add_argument("--champion-bundle", type=Path, default=None,
                        help="bundle to value as champion (default: the registry's champion, if any)")
    parser.add_argument("--n-boot", type=int, default=200, help="bootstrap replicates")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    s = settings()
    out = evaluate_run(Lake(args.lake or s.lake), args.ds, PolicyConfig.from_settings(s), run_dir=args.run_dir,
                       champion_bundle=args.champion_bundle, n_boot=args.n_boot, seed=args.seed)
    print(summary_table(out))
    return 0
