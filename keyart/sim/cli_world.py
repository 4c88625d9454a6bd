"""``keyart world``: create a simulated world (catalog, members, viewing history, ground truth)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from keyart.config import settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    s = settings()
    parser.add_argument("--out", type=Path, default=None, help=f"lake root to write (default {s.lake})")
    parser.add_argument("--seed", type=int, default=s.sim_seed, help="random seed (default %(default)s)")
    parser.add_argument("--titles", type=int, default=s.sim_titles, help="catalog size (default %(default)s)")
    parser.add_argument("--members", type=int, default=s.sim_members, help="number of members (default %(default)s)")
    parser.add_argument("--history-days", type=int, default=s.history_days,
                        help="days of viewing history before --start (default: the member features' window, %(default)s)")
    parser.add_argument("--start", default="2026-11-01", help="first day of simulated traffic (default %(default)s)")


def run(args: argparse.Namespace) -> int:
    from keyart.sim.world import World

    s = settings()
    out = args.out or s.lake
    t0 = time.perf_counter()
    world = World.build(
        seed=args.seed, n_titles=args.titles, n_members=args.members,
        history_days=args.history_days, start=args.start, quality_minutes=s.quality_play_minutes,
    )
    info = world.save(out)
    print(
        f"world seed={args.seed}: {info['titles']} titles, {info['artworks']} artworks, "
        f"{info['members']} members, {info['history_plays']} history plays "
        f"({args.history_days} days before {args.start}) -> {out} in {time.perf_counter() - t0:.1f}s"
    )
    return 0
