"""The simulated world: catalog, members, viewing history and the ground truth.

>>> world = World.build(seed=7, n_titles=200, n_members=20_000)   # doctest: +SKIP
>>> world.save("var/lake")                                         # doctest: +SKIP
>>> visits = world.visits("2026-11-01", 20_000)                    # doctest: +SKIP
>>> world.expected_value(visits, world.oracle_choice(visits))       # doctest: +SKIP

Everything is a pure function of the seed. The pipeline only ever reads the contract
tables ``save`` writes; ``<lake>/sim/`` (the ground truth) is for traffic and benchmarks.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from keyart.config import settings
from keyart.contracts import ARTWORKS, DEVICES, MEMBERS, TITLES
from keyart.lake import Lake, fmt_ds, parse_ds
from keyart.sim import io
from keyart.sim.catalog import Catalog, build_catalog, render_tags
from keyart.sim.history import sample_history
from keyart.sim.names import TAG_VOCABULARIES
from keyart.sim.population import Members, build_members
from keyart.sim.truth import GroundTruth, TruthParams
from keyart.sim.visits import PAGE_ROWS, ROW_LENGTH, Visits, generate_visits

_EPOCH = dt.date(1970, 1, 1)
FORMAT_VERSION = 1
STREAM_CATALOG, STREAM_MEMBERS, STREAM_HISTORY, STREAM_TAGS, STREAM_VISITS = 1, 2, 3, 4, 10


@dataclass(frozen=True)
class WorldConfig:
    """How a world was made (stored with it)."""

    seed: int = 7
    n_titles: int = 200
    n_members: int = 20_000
    # as long as the member features' default window (settings.history_days), so their
    # taste affinities see a full window from the first simulated day, as in a real lake
    history_days: int = 90
    start: str = "2026-11-01"
    quality_minutes: float = 15.0
    # how the artworks' tags are written (keyart.sim.names.TAG_VOCABULARIES); the same seed
    # gives the same members, titles, artworks and ground truth under either
    tag_vocabulary: str = "default"


def _day(n: int) -> dt.date:
    return _EPOCH + dt.timedelta(days=int(n))


class World:
    """Catalog, members and the ground-truth play model, with exact policy valuation."""

    def __init__(
        self,
        catalog: Catalog,
        members: Members,
        config: WorldConfig,
        params: TruthParams | None = None,
        history: dict[str, np.ndarray] | None = None,
    ) -> None:
        self.catalog = catalog
        self.members = members
        self.config = config
        self.params = params or TruthParams()
        self.truth = GroundTruth(catalog, members, self.params)
        self.history = history

    # ---- construction ------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        seed: int = 7,
        n_titles: int = 200,
        n_members: int = 20_000,
        history_days: int = 90,
        start: str | dt.date = "2026-11-01",
        quality_minutes: float = 15.0,
        params: TruthParams | None = None,
        tag_vocabulary: str = "default",
    ) -> World:
        """Generate a world; the same arguments always give the same world."""
        day = parse_ds(start)
        config = WorldConfig(seed, n_titles, n_members, history_days, fmt_ds(day), quality_minutes, tag_vocabulary)
        launch = day - dt.timedelta(days=history_days + 180)
        catalog = build_catalog(np.random.default_rng([seed, STREAM_CATALOG]), n_titles, launch, day)
        render_tags(catalog, tag_vocabulary, np.random.default_rng([seed, STREAM_TAGS]))
        members = build_members(np.random.default_rng([seed, STREAM_MEMBERS]), n_members, catalog.actor_home, day, history_days)
        world = cls(catalog, members, config, params)
        world.history = sample_history(world.truth, np.random.default_rng([seed, STREAM_HISTORY]), day, history_days)
        return world

    # ---- lookups -------------------------------------------------------------------------
    @cached_property
    def _title_pos(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.catalog.title_ids)}

    @cached_property
    def _art_pos(self) -> dict[str, int]:
        return {a: i for i, a in enumerate(self.catalog.art_ids)}

    @cached_property
    def _member_pos(self) -> dict[str, int]:
        return {m: i for i, m in enumerate(self.members.member_ids)}

    def title_index(self, title_id: str) -> int:
        return self._title_pos[title_id]

    def artwork_index(self, artwork_id: str) -> int:
        return self._art_pos[artwork_id]

    def member_index(self, member_id: str) -> int:
        return self._member_pos[member_id]

    # ---- ground truth --------------------------------------------------------------------
    def p_play(self, member_idx, artwork_idx, device, local_hour, day_of_week, page_row, position) -> np.ndarray:
        """P(play) from the ground truth; arguments broadcast together (device: codes or names)."""
        return self.truth.p_play(member_idx, artwork_idx, device, local_hour, day_of_week, page_row, position)

    def expected_quality_play(
        self, member_idx, artwork_idx, device, local_hour, day_of_week, page_row, position,
        quality_minutes: float | None = None,
    ) -> np.ndarray:
        """Exact E[quality play] = P(play) * P(minutes >= quality_minutes | play)."""
        q = self.config.quality_minutes if quality_minutes is None else quality_minutes
        return self.truth.expected_quality_play(member_idx, artwork_idx, device, local_hour, day_of_week, page_row, position, q)

    # ---- visits and policy valuation -------------------------------------------------------
    def visits(self, ds: str | dt.date, n: int, seed: int | None = None, rows: int = PAGE_ROWS, row_length: int = ROW_LENGTH) -> Visits:
        """``n`` visits on day ``ds``; deterministic in (world seed or ``seed``, ds)."""
        day_no = (parse_ds(ds) - _EPOCH).days
        rng = np.random.default_rng([self.config.seed if seed is None else seed, STREAM_VISITS, day_no])
        return generate_visits(self.truth, ds, n, rng, rows, row_length)

    def candidate_values(self, visits: Visits, quality_minutes: float | None = None) -> np.ndarray:
        """[V, P, K] expected quality play of every candidate (0 where padded)."""
        ctx = {k: v[..., None] for k, v in visits.slot_context().items()}
        cand = visits.candidates
        vals = self.expected_quality_play(
            ctx["member_idx"], np.clip(cand, 0, None), ctx["device"], ctx["local_hour"], ctx["day_of_week"],
            ctx["page_row"], ctx["position"], quality_minutes,
        )
        return np.where(cand >= 0, vals, 0.0)

    def oracle_choice(self, visits: Visits, quality_minutes: float | None = None) -> np.ndarray:
        """[V, P] artwork index with the highest expected quality play for each slot."""
        vals = np.where(visits.candidates >= 0, self.candidate_values(visits, quality_minutes), -1.0)
        k = vals.argmax(-1)
        return np.take_along_axis(visits.candidates, k[..., None], -1)[..., 0]

    def default_choice(self, visits: Visits) -> np.ndarray:
        """[V, P] the default artwork of each slot's title."""
        is_def = self.catalog.art_is_default[np.clip(visits.candidates, 0, None)] & (visits.candidates >= 0)
        return np.take_along_axis(visits.candidates, is_def.argmax(-1)[..., None], -1)[..., 0]

    def expected_value(self, visits: Visits, chosen_artwork_idx: np.ndarray, quality_minutes: float | None = None) -> float:
        """Expected take rate (quality plays per impression) of the decisions ``chosen_artwork_idx`` [V, P]."""
        chosen = np.asarray(chosen_artwork_idx)
        if chosen.shape != visits.titles.shape:
            raise ValueError(f"chosen_artwork_idx must have shape {visits.titles.shape}, got {chosen.shape}")
        if np.any(self.catalog.art_title[chosen] != visits.titles):
            raise ValueError("a chosen artwork does not belong to its slot's title")
        ctx = visits.slot_context()
        vals = self.expected_quality_play(
            ctx["member_idx"], chosen, ctx["device"], ctx["local_hour"], ctx["day_of_week"],
            ctx["page_row"], ctx["position"], quality_minutes,
        )
        return float(vals.mean())

    def expected_value_of_probs(self, visits: Visits, probs: np.ndarray, quality_minutes: float | None = None) -> float:
        """Expected take rate of a stochastic policy: ``probs`` [V, P, K] over ``visits.candidates``."""
        vals = self.candidate_values(visits, quality_minutes)
        return float((np.where(visits.candidates >= 0, probs, 0.0) * vals).sum(-1).mean())

    def random_value(self, visits: Visits, quality_minutes: float | None = None) -> float:
        """Expected take rate of the uniform random policy on ``visits``."""
        vals = self.candidate_values(visits, quality_minutes)
        return float((vals.sum(-1) / visits.n_candidates).mean())

    # ---- persistence ---------------------------------------------------------------------
    def save(self, lake_root: str | Path) -> dict[str, Any]:
        """Write the contract tables, the history play log and ``sim/`` ground truth."""
        lake = Lake(lake_root)
        cat, mem = self.catalog, self.members
        io.write_table(lake.titles, "titles", TITLES, {
            "title_id": cat.title_ids, "name": cat.title_names, "genres": cat.title_genres,
            "cast": cat.title_cast, "maturity_rating": cat.title_rating,
        })
        io.write_table(lake.artworks, "artworks", ARTWORKS, {
            "artwork_id": cat.art_ids, "title_id": [cat.title_ids[t] for t in cat.art_title],
            "tags": cat.art_tags, "is_default": cat.art_is_default.tolist(),
            "active_from": [_day(d) for d in cat.art_active_from], "active_to": [None] * cat.n_artworks,
        })
        io.write_table(lake.members, "members", MEMBERS, {
            "member_id": mem.member_ids, "country": mem.country, "language": mem.language,
            "profile": mem.profile, "signup_date": [_day(d) for d in mem.signup],
        })
        n_history = self._save_history(lake) if self.history is not None else 0
        self._save_truth(lake.root / "sim")
        return {
            "titles": cat.n_titles, "artworks": cat.n_artworks, "members": mem.n_members,
            "history_plays": n_history, "lake": str(lake.root),
        }

    def _save_history(self, lake: Lake) -> int:
        for old in lake.root.glob("raw/plays/ds=*/history.jsonl"):
            old.unlink()
        h, cat, mem = self.history, self.catalog, self.members
        assert h is not None
        days = h["ts"].astype("datetime64[D]")
        ts = io.iso_z(h["ts"])
        minutes = h["minutes"].tolist()
        bounds = np.flatnonzero(np.diff(days.astype(np.int64))) + 1
        starts = np.concatenate([[0], bounds])
        ends = np.concatenate([bounds, [len(ts)]])
        for lo, hi in zip(starts.tolist(), ends.tolist(), strict=True):
            if hi <= lo:
                continue
            rows = (
                {
                    "member_id": mem.member_ids[h["member_idx"][i]], "title_id": cat.title_ids[h["title_idx"][i]],
                    "ts": ts[i], "minutes_played": minutes[i], "device": DEVICES[h["device"][i]],
                }
                for i in range(lo, hi)
            )
            io.write_jsonl(lake.raw("plays", str(days[lo])) / "history.jsonl", rows)
        return len(ts)

    def _save_truth(self, folder: Path) -> None:
        arrays: dict[str, np.ndarray] = {}
        lists: dict[str, Any] = {}
        for prefix, obj in (("catalog", self.catalog), ("members", self.members)):
            for f in dataclasses.fields(obj):
                value = getattr(obj, f.name)
                if isinstance(value, np.ndarray):
                    arrays[f"{prefix}.{f.name}"] = value
                else:
                    lists[f"{prefix}.{f.name}"] = value
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / ".world.npz.tmp.npz"
        np.savez_compressed(tmp, **arrays)
        tmp.replace(folder / "world.npz")
        io.write_json(folder / "world.json", {
            "format_version": FORMAT_VERSION,
            "config": dataclasses.asdict(self.config),
            "params": self.params.to_dict(),
            "lists": lists,
        })

    @classmethod
    def load(cls, lake_root: str | Path) -> World:
        """Restore a world saved by :meth:`save` (without its history, which is in the lake)."""
        folder = Path(lake_root) / "sim"
        if not (folder / "world.json").exists():
            raise FileNotFoundError(f"no simulated world in {folder} (run `keyart world --out {lake_root}` first)")
        meta = json.loads((folder / "world.json").read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{folder}/world.json has format {meta.get('format_version')}, expected {FORMAT_VERSION}")
        with np.load(folder / "world.npz") as npz:
            arrays = {k: npz[k] for k in npz.files}
        parts = {}
        for prefix, klass in (("catalog", Catalog), ("members", Members)):
            kwargs = {}
            for f in dataclasses.fields(klass):
                key = f"{prefix}.{f.name}"
                kwargs[f.name] = arrays[key] if key in arrays else meta["lists"][key]
            parts[prefix] = klass(**kwargs)
        params = meta["params"]
        params = TruthParams(**{k: tuple(map(tuple, v)) if k == "flag_device" else tuple(v) if isinstance(v, list) else v for k, v in params.items()})
        return cls(parts["catalog"], parts["members"], WorldConfig(**meta["config"]), params)


# --- command line ----------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    s = settings()
    parser.add_argument("--out", type=Path, default=None, help=f"lake root to write (default {s.lake})")
    parser.add_argument("--seed", type=int, default=s.sim_seed, help="random seed (default %(default)s)")
    parser.add_argument("--titles", type=int, default=s.sim_titles, help="catalog size (default %(default)s)")
    parser.add_argument("--members", type=int, default=s.sim_members, help="number of members (default %(default)s)")
    parser.add_argument("--history-days", type=int, default=s.history_days,
                        help="days of viewing history before --start (default: the member features' window, %(default)s)")
    parser.add_argument("--start", default="2026-11-01", help="first day of simulated traffic (default %(default)s)")
    parser.add_argument("--tag-vocabulary", choices=TAG_VOCABULARIES, default="default",
                        help="how artwork tags are written: default, or unseen (other keys, values and flags; "
                             "same ground truth)")


def run(args: argparse.Namespace) -> int:
    s = settings()
    out = args.out or s.lake
    t0 = time.perf_counter()
    world = World.build(
        seed=args.seed, n_titles=args.titles, n_members=args.members,
        history_days=args.history_days, start=args.start, quality_minutes=s.quality_play_minutes,
        tag_vocabulary=args.tag_vocabulary,
    )
    info = world.save(out)
    print(
        f"world seed={args.seed}: {info['titles']} titles, {info['artworks']} artworks, "
        f"{info['members']} members, {info['history_plays']} history plays "
        f"({args.history_days} days before {args.start}) -> {out} in {time.perf_counter() - t0:.1f}s"
    )
    return 0
