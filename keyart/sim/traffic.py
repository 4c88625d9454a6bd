"""One simulated day of traffic: visits, decisions, and the plays they cause.

Files written for day D (all rewritten, never appended, on a rerun):

    raw/impressions/ds=D/traffic-random.jsonl   (random chooser only; the endpoint logs its own)
    raw/plays/ds=D/traffic-D.jsonl              plays that started on D
    raw/plays/ds=D+1/traffic-D.jsonl            plays caused on D that started after midnight UTC
    raw/plays/ds=D/_COMPLETE                    the play log's completeness marker: every play that
                                                started on D is delivered (contracts.PLAYS_COMPLETE)
    sim/traffic/ds=D.json                       the day's summary, with ground-truth take rates
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from keyart.config import settings
from keyart.contracts import DEVICES
from keyart.lake import Lake, fmt_ds, mark_plays_delivered, parse_ds, read_plays_marker, shift_ds
from keyart.sim import io
from keyart.sim.choosers import Chooser, ChooserError, Decisions
from keyart.sim.visits import Visits
from keyart.sim.world import World

log = logging.getLogger(__name__)

DEFAULT_VISITS = 20_000
ORGANIC_RATE = 0.05
"""Organic plays (search, continue watching) per visit, not caused by an impression."""
STREAM_CHOOSER, STREAM_PLAYS = 20, 21
_EPOCH = dt.date(1970, 1, 1)


DELAY_MIX = (0.65, 0.30, 0.05)
"""Shares of play delays that are immediate (0.2 + Exp(2) min), browsing (5 + Exp(45) min) and
later (uniform 3-8 h)."""


def play_delays_ms(rng: np.random.Generator, n: int) -> np.ndarray:
    """Delay from impression to play start: mostly minutes, sometimes hours."""
    kind = rng.choice(3, size=n, p=list(DELAY_MIX))
    minutes = np.where(
        kind == 0, 0.2 + rng.exponential(2.0, n),
        np.where(kind == 1, 5.0 + rng.exponential(45.0, n), rng.uniform(180.0, 480.0, n)),
    )
    return (minutes * 60_000).astype(np.int64)


def p_delay_within(hours: float) -> float:
    """Exact P(play delay <= ``hours``) under :func:`play_delays_ms`: the share of quality plays
    an attribution window of that length can see."""
    m = hours * 60.0
    immediate = 1.0 - np.exp(-max(m - 0.2, 0.0) / 2.0)
    browsing = 1.0 - np.exp(-max(m - 5.0, 0.0) / 45.0)
    later = min(max((m - 180.0) / 300.0, 0.0), 1.0)
    return float(np.dot(DELAY_MIX, (immediate, browsing, later)))


def _check_decisions(world: World, visits: Visits, d: Decisions) -> None:
    if d.artwork_idx.shape != visits.titles.shape:
        raise ChooserError(f"decisions have shape {d.artwork_idx.shape}, expected {visits.titles.shape}")
    ok = (d.artwork_idx[..., None] == visits.candidates).any(-1) & (d.artwork_idx >= 0)
    if not ok.all():
        raise ChooserError(f"{int((~ok).sum())} decisions are not candidates of their slot")
    if not ((d.propensity > 0) & (d.propensity <= 1)).all():
        raise ChooserError("propensities must lie in (0, 1]")


def simulate_day(
    world: World,
    ds: str | dt.date,
    chooser: Chooser,
    visits: int | Visits = DEFAULT_VISITS,
    seed: int | None = None,
    lake_root: str | Path | None = None,
    send_rewards: bool = False,
    attribution_window_hours: float = 4.0,
    organic_rate: float = ORGANIC_RATE,
) -> dict[str, Any]:
    """Simulate day ``ds`` against ``chooser``; write its files under ``lake_root`` if given.

    Parameters
    ----------
    visits
        A number of visits to draw (``world.visits(ds, n, seed)``) or prepared visits.
    seed
        Seeds visits, decisions and plays (default: the world's seed); the same seed gives
        the same files.
    send_rewards
        Post ``/v1/reward`` for quality plays starting within ``attribution_window_hours``
        of their impression (only for choosers that have ``send_rewards``). The day is then
        decided one hour of visits at a time, and before each hour the rewards of plays that
        started before it are posted (the rest at the end), so the endpoint's online priors
        see rewards arrive during the day as they would in production.

    Returns
    -------
    dict
        The summary, also written to ``<lake>/sim/traffic/ds=D.json``.
    """
    t0 = time.perf_counter()
    day = parse_ds(ds)
    ds = fmt_ds(day)
    seed = world.config.seed if seed is None else int(seed)
    day_no = (day - _EPOCH).days
    if isinstance(visits, int):
        visits = world.visits(ds, visits, seed)
    elif visits.ds != ds:
        raise ValueError(f"visits are for {visits.ds}, not {ds}")
    chooser_rng = np.random.default_rng([seed, STREAM_CHOOSER, day_no])
    rng = np.random.default_rng([seed, STREAM_PLAYS, day_no])  # impression plays (one batch), organic plays
    q = world.config.quality_minutes
    window_ms = attribution_window_hours * 3_600_000
    sender = None
    if send_rewards:
        sender = getattr(chooser, "send_rewards", None)
        if sender is None:
            raise ChooserError(f"chooser {chooser.name!r} cannot receive rewards (use an endpoint URL)")
    if sender is None:
        # one batch: decide every visit, then draw every play
        decisions = chooser.choose(world, visits, chooser_rng)
        _check_decisions(world, visits, decisions)
        plays = _impression_plays(world, visits, decisions, np.arange(visits.n_visits), rng)
        rewards = None
    else:
        # hour by hour, as an endpoint sees a day: the rewards of plays that started before
        # an hour begins are posted before that hour's pages are decided
        decisions, plays, rewards = _interleaved(world, visits, chooser, sender, chooser_rng, seed, day_no, window_ms)
    vi, si, art, members, minutes, delay, play_ts = plays
    # organic plays: a title off the page, chosen by taste, at any time of the day
    org_v = rng.choice(visits.n_visits, size=rng.poisson(organic_rate * visits.n_visits))
    org_titles = _organic_titles(world, visits, org_v, rng)
    org_members = visits.member_idx[org_v]
    org_minutes = world.truth.sample_minutes(rng, org_members, title_idx=org_titles)
    org_ts = np.datetime64(ds, "ms") + rng.integers(0, 86_400_000, org_v.shape[0]).astype("timedelta64[ms]")

    all_members = np.concatenate([members, org_members])
    all_titles = np.concatenate([world.catalog.art_title[art], org_titles])
    all_ts = np.concatenate([play_ts, org_ts])
    all_minutes = np.concatenate([minutes, org_minutes])
    all_device = np.concatenate([visits.device[vi], visits.device[org_v]])
    next_day = all_ts >= np.datetime64(shift_ds(ds, 1), "ms")

    quality = minutes >= q
    in_window = delay <= window_ms

    summary: dict[str, Any] = {
        "ds": ds,
        "policy": chooser.name,
        "seed": seed,
        "visits": visits.n_visits,
        "impressions": visits.n_slots,
        "plays": int(all_ts.shape[0]),
        "plays_from_impressions": int(vi.shape[0]),
        "organic_plays": int(org_v.shape[0]),
        "plays_next_day": int(next_day.sum()),
        "quality_plays": int(quality.sum()),
        "quality_plays_in_window": int((quality & in_window).sum()),
        "observed_take_rate": float(quality.sum() / max(visits.n_slots, 1)),
        "expected_take_rate": {
            "served": world.expected_value(visits, decisions.artwork_idx),
            "random": world.random_value(visits),
            "default": world.expected_value(visits, world.default_choice(visits)),
            "oracle": world.expected_value(visits, world.oracle_choice(visits)),
        },
        "model_versions": {str(k): int(c) for k, c in zip(*np.unique(decisions.model_version.astype(str), return_counts=True), strict=True)},
        "quality_minutes": q,
    }
    if rewards is not None:
        summary["rewards"] = rewards
    if lake_root is not None:
        lake = Lake(lake_root)
        if not chooser.logs_impressions:
            summary["files"] = {"impressions": str(_write_impressions(lake, world, visits, decisions, chooser.name))}
        else:
            stale = lake.raw("impressions", ds) / "traffic-random.jsonl"
            if stale.exists():
                log.warning("removing %s: the endpoint logs this day's impressions", stale)
                stale.unlink()
        plays = {
            "member_idx": all_members, "title_idx": all_titles, "ts": all_ts,
            "minutes": all_minutes, "device": all_device,
        }
        summary.setdefault("files", {})["plays"] = [str(f) for f in _write_plays(lake, world, ds, plays, next_day)]
        # Every play that started on D is now delivered: D's own, and those of D-1 that crossed
        # midnight (written by D-1's run). The next day's partition is not complete yet; if it
        # was already marked (a rerun of D), its row count is brought up to date.
        mark_plays_delivered(lake, ds)
        later, _ = read_plays_marker(lake.plays_marker(shift_ds(ds, 1)), shift_ds(ds, 1))
        if later is not None:
            mark_plays_delivered(lake, shift_ds(ds, 1), later.delivered_through)
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    if lake_root is not None:
        io.write_json(Lake(lake_root).root / "sim" / "traffic" / f"ds={ds}.json", summary)
    return summary


Plays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _impression_plays(world: World, visits: Visits, decisions: Decisions, rows: np.ndarray,
                      rng: np.random.Generator) -> Plays:
    """Plays caused by the impressions of visits ``rows`` (decisions indexed like ``visits``):
    (visit, slot, artwork, member, minutes, delay ms, play ts), visit indices global."""
    ctx = visits.slot_context()
    r = rows
    p = world.p_play(ctx["member_idx"][r], decisions.artwork_idx[r], ctx["device"][r], ctx["local_hour"][r],
                     ctx["day_of_week"][r], ctx["page_row"][r], ctx["position"][r])
    played = rng.random(p.shape) < p
    vi, si = np.nonzero(played)
    vi = r[vi]
    art = decisions.artwork_idx[vi, si]
    members = visits.member_idx[vi]
    minutes = world.truth.sample_minutes(rng, members, art_idx=art)
    delay = play_delays_ms(rng, vi.shape[0])
    play_ts = visits.ts[vi] + delay.astype("timedelta64[ms]")
    return vi, si, art, members, minutes, delay, play_ts


def _interleaved(world: World, visits: Visits, chooser: Chooser, sender, chooser_rng: np.random.Generator,
                 seed: int, day_no: int, window_ms: float) -> tuple[Decisions, Plays, dict[str, int]]:
    """Decide the day one hour at a time; before each hour, post the rewards (quality plays
    inside the attribution window) of plays that started before it; the rest at the end."""
    q = world.config.quality_minutes
    v, slots = visits.titles.shape
    decisions = Decisions.empty(v, slots)
    day0 = np.datetime64(visits.ds, "ms")
    bounds = np.searchsorted(visits.ts, day0 + np.arange(25) * np.timedelta64(3_600_000, "ms"))
    bounds[0], bounds[-1] = 0, v
    parts: list[Plays] = []
    pending: list[tuple[np.datetime64, str, float]] = []
    counts = {"sent": 0, "rejected": 0}

    def post(until) -> None:
        nonlocal pending
        pending.sort(key=lambda e: e[0])
        due = [e for e in pending if until is None or e[0] < until]
        pending = pending[len(due):]
        if due:
            iso = io.iso_z(np.array([e[0] for e in due], dtype="datetime64[ms]"))
            got = sender([(eid, minutes, t) for (_, eid, minutes), t in zip(due, iso, strict=True)])
            for k in counts:
                counts[k] += int(got.get(k, 0))

    for hour in range(24):
        a, b = int(bounds[hour]), int(bounds[hour + 1])
        if a >= b:
            continue
        post(visits.ts[a])
        rows = np.arange(a, b)
        part = visits.subset(slice(a, b))
        d = chooser.choose(world, part, chooser_rng)
        _check_decisions(world, part, d)
        decisions.artwork_idx[a:b], decisions.propensity[a:b], decisions.event_id[a:b] = d.artwork_idx, d.propensity, d.event_id
        decisions.model_version[a:b], decisions.policy[a:b] = d.model_version, d.policy
        pl = _impression_plays(world, visits, decisions, rows, np.random.default_rng([seed, STREAM_PLAYS, day_no, hour]))
        parts.append(pl)
        vi, si, _, _, minutes, delay, play_ts = pl
        keep = np.flatnonzero((minutes >= q) & (delay <= window_ms))
        pending.extend(zip(list(play_ts[keep]), decisions.event_id[vi[keep], si[keep]].tolist(),
                           minutes[keep].tolist(), strict=True))
    post(None)
    if not parts:  # no visits: empty arrays of the right dtypes
        parts.append(_impression_plays(world, visits, decisions, np.arange(0), np.random.default_rng(0)))
    plays = tuple(np.concatenate([pl[k] for pl in parts]) for k in range(7))
    return decisions, plays, counts  # type: ignore[return-value]


def _organic_titles(world: World, visits: Visits, org_v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    cat = world.catalog
    m = visits.member_idx[org_v]
    logit = world.truth.title_logit(m[:, None], np.arange(cat.n_titles)[None, :])
    on_page = np.zeros(logit.shape, dtype=bool)
    np.put_along_axis(on_page, visits.titles[org_v], True, 1)
    keys = np.where(on_page, -np.inf, logit + rng.gumbel(size=logit.shape))
    return keys.argmax(1) if keys.shape[0] else np.zeros(0, dtype=np.int64)


def _write_impressions(lake: Lake, world: World, visits: Visits, d: Decisions, name: str) -> Path:
    cat, mem = world.catalog, world.members
    ts = io.iso_z(visits.ts)
    cand_ids: dict[int, list[str]] = {}

    def cands(i: int, j: int) -> list[str]:
        t = int(visits.titles[i, j])
        if t not in cand_ids:
            c = visits.candidates[i, j]
            cand_ids[t] = [cat.art_ids[a] for a in c[c >= 0].tolist()]
        return cand_ids[t]

    art, prop, eid = d.artwork_idx.tolist(), d.propensity.tolist(), d.event_id.tolist()
    titles = visits.titles.tolist()
    rows_, pos_ = visits.page_row.tolist(), visits.position.tolist()

    def rows():
        for i in range(visits.n_visits):
            m = int(visits.member_idx[i])
            base = {"device": DEVICES[int(visits.device[i])], "country": mem.country[m],
                    "local_hour": int(visits.local_hour[i]), "day_of_week": int(visits.day_of_week[i])}
            for j in range(len(titles[i])):
                yield {
                    "event_id": eid[i][j], "ts": ts[i], "member_id": mem.member_ids[m],
                    "title_id": cat.title_ids[titles[i][j]], "artwork_id": cat.art_ids[art[i][j]],
                    "candidates": cands(i, j), "propensity": prop[i][j],
                    "model_version": str(d.model_version[i]), "policy": str(d.policy[i]),
                    "context": {**base, "page_row": rows_[j], "position": pos_[j]},
                }

    path = lake.raw("impressions", visits.ds) / f"traffic-{name}.jsonl"
    io.write_jsonl(path, rows())
    return path


def _write_plays(lake: Lake, world: World, ds: str, plays: dict[str, np.ndarray], next_day: np.ndarray) -> list[Path]:
    cat, mem = world.catalog, world.members
    order = np.argsort(plays["ts"], kind="stable")
    ts = io.iso_z(plays["ts"][order])
    member, title = plays["member_idx"][order].tolist(), plays["title_idx"][order].tolist()
    minutes, device = plays["minutes"][order].tolist(), plays["device"][order].tolist()
    later = next_day[order]
    written = []
    for target, mask in ((ds, ~later), (shift_ds(ds, 1), later)):
        path = lake.raw("plays", target) / f"traffic-{ds}.jsonl"
        idx = np.flatnonzero(mask).tolist()
        if not idx:
            if path.exists():
                path.unlink()
            continue
        io.write_jsonl(path, (
            {"member_id": mem.member_ids[member[i]], "title_id": cat.title_ids[title[i]], "ts": ts[i],
             "minutes_played": minutes[i], "device": DEVICES[device[i]]}
            for i in idx
        ))
        written.append(path)
    return written


# --- command line ----------------------------------------------------------------------

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
    from keyart.sim.choosers import HttpChooser, RandomChooser

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
