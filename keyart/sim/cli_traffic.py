"""``keyart traffic``: simulate one day of visits against the random policy or the endpoint."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from keyart.config import settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    s = settings()
    parser.add_argument("--lake", type=Path, default=None, help=f"lake root holding the world (default {s.lake})")
    parser.add_argument("--ds", required=True, help="the day to simulate, YYYY-MM-DD (UTC)")
    parser.add_argument("--policy", default="random", help="'random', or the endpoint URL, e.g. http://127.0.0.1:8080")
    parser.add_argument("--visits", type=int, default=s.sim_visits_per_day, help="visits in the day (default %(default)s)")
    parser.add_argument("--seed", type=int, default=None, help="seed (default: the world's seed)")
    parser.add_argument("--send-rewards", action="store_true", help="POST /v1/reward for quality plays (endpoint only)")
    parser.add_argument("--timeout", type=float, default=10.0, help="HTTP timeout in seconds (default %(default)s)")
    parser.add_argument("--workers", type=int, default=8, help="concurrent HTTP requests (default %(default)s)")


def run(args: argparse.Namespace) -> int:
    from keyart.sim.choosers import ChooserError, HttpChooser, RandomChooser
    from keyart.sim.traffic import simulate_day
    from keyart.sim.world import World

    s = settings()
    lake = args.lake or s.lake
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    if args.policy == "random":
        chooser = RandomChooser()
        if args.send_rewards:
            print("keyart traffic: --send-rewards needs an endpoint URL as --policy", file=sys.stderr)
            return 2
    elif args.policy.startswith(("http://", "https://")):
        chooser = HttpChooser(args.policy, timeout=args.timeout, workers=args.workers)
    else:
        print(f"keyart traffic: --policy must be 'random' or an http(s) URL, got {args.policy!r}", file=sys.stderr)
        return 2
    try:
        world = World.load(lake)
        summary = simulate_day(
            world, args.ds, chooser, visits=args.visits, seed=args.seed, lake_root=lake,
            send_rewards=args.send_rewards, attribution_window_hours=s.attribution_window_hours,
        )
    except (FileNotFoundError, ChooserError, ValueError) as exc:
        print(f"keyart traffic: {exc}", file=sys.stderr)
        return 1
    e = summary["expected_take_rate"]
    print(
        f"traffic {summary['ds']} policy={args.policy}: {summary['visits']} visits, "
        f"{summary['impressions']} impressions, {summary['plays']} plays "
        f"({summary['plays_next_day']} next day), {summary['quality_plays']} quality plays; "
        f"expected take rate served={e['served']:.4f} random={e['random']:.4f} "
        f"default={e['default']:.4f} oracle={e['oracle']:.4f} ({summary['seconds']:.1f}s)"
    )
    return 0
