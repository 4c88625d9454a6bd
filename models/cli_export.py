"""``keyart export --ds D``: ONNX bundle with a parity check; refuses to publish on failure."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from keyart.config import settings
from keyart.lake import Lake, fmt_ds
from keyart.models.export import ParityError, export_bundle
from keyart.policy import PolicyConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ds", required=True, type=fmt_ds, help="run date YYYY-MM-DD")
    parser.add_argument("--lake", type=Path, default=None, help="lake root (default: config)")
    parser.add_argument("--run-dir", type=Path, default=None, help="default: <lake>/runs/ds=D")
    parser.add_argument("--parity-impressions", type=int, default=2000)


def run(args: argparse.Namespace) -> int:
    s = settings()
    try:
        manifest = export_bundle(Lake(args.lake or s.lake), args.ds, PolicyConfig.from_settings(s),
                                 run_dir=args.run_dir, n_parity=args.parity_impressions)
    except ParityError as exc:
        print(f"export refused: {exc}", file=sys.stderr)
        return 1
    p = manifest["parity"]
    print(f"bundle {manifest.version}: parity max |dp| {p['max_abs_diff']:.2e} over {p['rows']} rows, "
          f"greedy agreement {p['greedy_agreement']:.4f}")
    return 0
