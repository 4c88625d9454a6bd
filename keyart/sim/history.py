"""Viewing history before the first simulated day, consistent with the latent tastes.

Members choose titles with probability proportional to exp(title logit): base appeal,
genre match and cast match, so the member features the pipeline builds from this history
(``genre:`` and ``cast:`` affinities) reflect each member's latent taste.
"""

from __future__ import annotations

import datetime as dt

import numpy as np

from keyart.sim.truth import GroundTruth
from keyart.sim.visits import draw_devices, local_seconds

_EPOCH = dt.date(1970, 1, 1)
_CHUNK = 50_000


def sample_history(
    truth: GroundTruth, rng: np.random.Generator, start: dt.date, days: int
) -> dict[str, np.ndarray]:
    """Plays in the ``days`` UTC days before ``start``.

    Returns
    -------
    dict
        Aligned arrays ``member_idx``, ``title_idx``, ``ts`` (datetime64[ms], UTC, sorted),
        ``minutes``, ``device``.
    """
    cat, mem = truth.catalog, truth.members
    first = (start - _EPOCH).days - days
    active_from = np.maximum(mem.signup, first)
    active_days = np.clip(first + days - active_from, 0, None)
    n_plays = rng.poisson(mem.activity * active_days)
    member_idx = np.repeat(np.arange(mem.n_members), n_plays)
    total = member_idx.shape[0]
    # title choice: softmax over titles of the member's title logit
    all_titles = np.arange(cat.n_titles)
    kid_block = ~cat.title_kid_friendly
    title_idx = np.empty(total, dtype=np.int64)
    for lo in range(0, total, _CHUNK):
        mi = member_idx[lo : lo + _CHUNK]
        logit = truth.title_logit(mi[:, None], all_titles[None, :])
        logit = logit - 4.0 * (mem.is_kids[mi][:, None] & kid_block[None, :])
        w = np.exp(logit - logit.max(1, keepdims=True))
        cum = np.cumsum(w, axis=1)
        u = rng.random(mi.shape[0]) * cum[:, -1]
        title_idx[lo : lo + _CHUNK] = np.minimum((cum < u[:, None]).sum(1), cat.n_titles - 1)
    # when: a day after signup, a local time of day, kept inside the window in UTC
    day_no = active_from[member_idx] + (rng.random(total) * active_days[member_idx]).astype(np.int64)
    offset_s = mem.utc_offset_min[member_idx].astype(np.int64) * 60
    secs = day_no * 86400 + local_seconds(rng, mem.is_kids[member_idx]) - offset_s
    lo_s, hi_s = first * 86400, (first + days) * 86400
    secs = np.where(secs < lo_s, secs + 86400, np.where(secs >= hi_s, secs - 86400, secs))
    ts = (secs * 1000 + rng.integers(0, 1000, total)).astype("datetime64[ms]")
    device = draw_devices(rng, mem.device[member_idx])
    minutes = truth.sample_minutes(rng, member_idx, title_idx=title_idx)
    order = np.argsort(ts, kind="stable")
    return {
        "member_idx": member_idx[order],
        "title_idx": title_idx[order],
        "ts": ts[order],
        "minutes": minutes[order],
        "device": device[order],
    }
