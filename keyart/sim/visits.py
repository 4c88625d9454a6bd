"""A day's visits as arrays: who visits, when, on which device, and which page they see.

Benchmarks generate one :class:`Visits` with :meth:`keyart.sim.world.World.visits` and
feed it to several policies, so every policy is valued on exactly the same requests.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass

import numpy as np

from keyart.lake import fmt_ds, parse_ds
from keyart.sim.names import DEVICE_SHARE, HOUR_WEIGHTS_ADULT, HOUR_WEIGHTS_KIDS
from keyart.sim.truth import GroundTruth

PAGE_ROWS = 2
ROW_LENGTH = 5
PRIMARY_DEVICE_SHARE = 0.75
_EPOCH = dt.date(1970, 1, 1)
_H_ADULT = np.asarray(HOUR_WEIGHTS_ADULT) / np.sum(HOUR_WEIGHTS_ADULT)
_H_KIDS = np.asarray(HOUR_WEIGHTS_KIDS) / np.sum(HOUR_WEIGHTS_KIDS)


@dataclass
class Visits:
    """One day's page requests, aligned arrays (V visits, P = rows x positions slots, K candidates).

    Attributes
    ----------
    ds : str
        The UTC day of every ``ts``.
    member_idx : ndarray [V]
    device : ndarray [V]
        Index into ``keyart.contracts.DEVICES``.
    local_hour, day_of_week : ndarray [V]
        Member-local hour (0-23) and weekday (0 = Monday).
    ts : ndarray [V] datetime64[ms]
        Request time, UTC (naive), sorted.
    titles : ndarray [V, P]
        Title index shown at every slot.
    page_row, position : ndarray [P]
        Row and position of every slot (the same layout for every visit).
    candidates : ndarray [V, P, K]
        Active artwork indices of the slot's title, padded with -1.
    """

    ds: str
    member_idx: np.ndarray
    device: np.ndarray
    local_hour: np.ndarray
    day_of_week: np.ndarray
    ts: np.ndarray
    titles: np.ndarray
    page_row: np.ndarray
    position: np.ndarray
    candidates: np.ndarray

    @property
    def n_visits(self) -> int:
        return int(self.member_idx.shape[0])

    @property
    def n_slots(self) -> int:
        return int(self.titles.size)

    @property
    def n_candidates(self) -> np.ndarray:
        """[V, P] number of active candidates per slot."""
        return (self.candidates >= 0).sum(-1)

    def subset(self, index) -> Visits:
        """The visits at ``index`` (an index array or a slice), with the same page layout."""
        return dataclasses.replace(self, **{f: getattr(self, f)[index] for f in
                                            ("member_idx", "device", "local_hour", "day_of_week", "ts", "titles", "candidates")})

    def slot_context(self) -> dict[str, np.ndarray]:
        """Member and context arrays broadcast to [V, P], as GroundTruth methods take them."""
        shape = self.titles.shape
        return {
            "member_idx": np.broadcast_to(self.member_idx[:, None], shape),
            "device": np.broadcast_to(self.device[:, None], shape),
            "local_hour": np.broadcast_to(self.local_hour[:, None], shape),
            "day_of_week": np.broadcast_to(self.day_of_week[:, None], shape),
            "page_row": np.broadcast_to(self.page_row[None, :], shape),
            "position": np.broadcast_to(self.position[None, :], shape),
        }


def local_seconds(rng: np.random.Generator, is_kids: np.ndarray) -> np.ndarray:
    """Seconds after local midnight, drawn from the adult or kids hour profile."""
    n = is_kids.shape[0]
    hours = np.where(is_kids, rng.choice(24, size=n, p=_H_KIDS), rng.choice(24, size=n, p=_H_ADULT))
    return hours * 3600 + rng.integers(0, 3600, n)


def draw_devices(rng: np.random.Generator, primary: np.ndarray) -> np.ndarray:
    """The member's primary device most of the time, another one otherwise."""
    other = rng.choice(len(DEVICE_SHARE), size=primary.shape[0], p=np.asarray(DEVICE_SHARE))
    return np.where(rng.random(primary.shape[0]) < PRIMARY_DEVICE_SHARE, primary, other).astype(np.int8)


def generate_visits(
    truth: GroundTruth,
    ds: str | dt.date,
    n: int,
    rng: np.random.Generator,
    rows: int = PAGE_ROWS,
    row_length: int = ROW_LENGTH,
) -> Visits:
    """Draw ``n`` visits on UTC day ``ds`` (members who signed up by then, by activity).

    Pages hold ``rows * row_length`` distinct titles drawn by popularity and, mildly, by
    the member's genre taste (kids profiles see titles rated for kids when there are enough).
    """
    day = parse_ds(ds)
    cat, mem = truth.catalog, truth.members
    n_slots = rows * row_length
    if n_slots > cat.n_titles:
        raise ValueError(f"a page of {n_slots} titles needs at least that many titles, catalog has {cat.n_titles}")
    day_no = (day - _EPOCH).days
    weight = mem.activity * (mem.signup <= day_no)
    if weight.sum() <= 0:
        raise ValueError(f"no member has signed up by {fmt_ds(day)}")
    member_idx = rng.choice(mem.n_members, size=n, p=weight / weight.sum())
    kids = mem.is_kids[member_idx]
    device = draw_devices(rng, mem.device[member_idx])
    # local time -> UTC within the day; the local date can be the day before or after
    offset_s = mem.utc_offset_min[member_idx].astype(np.int64) * 60
    utc_s = (local_seconds(rng, kids) - offset_s) % 86400
    order = np.argsort(utc_s, kind="stable")
    member_idx, kids, device, offset_s, utc_s = member_idx[order], kids[order], device[order], offset_s[order], utc_s[order]
    local_s = utc_s + offset_s
    local_hour = ((local_s // 3600) % 24).astype(np.int64)
    day_of_week = ((day.weekday() + np.floor_divide(local_s, 86400)) % 7).astype(np.int64)
    ts = np.datetime64(fmt_ds(day), "ms") + (utc_s * 1000 + rng.integers(0, 1000, n)).astype("timedelta64[ms]")
    # page titles: Gumbel top-k over log popularity + taste
    score = cat.title_appeal[None, :] + 0.5 * truth.params.w_title_genre * truth.genre_match[member_idx]
    kid_ok = cat.title_kid_friendly
    if kid_ok.sum() >= n_slots:
        score = np.where(kids[:, None] & ~kid_ok[None, :], -np.inf, score)
    else:
        score = score - 3.0 * (kids[:, None] & ~kid_ok[None, :])
    keys = score + rng.gumbel(size=score.shape)
    top = np.argpartition(-keys, n_slots - 1, axis=1)[:, :n_slots]
    top = np.take_along_axis(top, np.argsort(-np.take_along_axis(keys, top, 1), axis=1), 1)
    slots = np.arange(n_slots)
    candidates = cat.candidate_matrix(day)[top]
    return Visits(
        ds=fmt_ds(day),
        member_idx=member_idx,
        device=device,
        local_hour=local_hour,
        day_of_week=day_of_week,
        ts=ts,
        titles=top,
        page_row=slots // row_length,
        position=slots % row_length,
        candidates=candidates,
    )
