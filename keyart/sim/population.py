"""The simulated members: profiles and their latent tastes."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np

from keyart.sim.names import ADULT_TASTE_ALPHA, COUNTRIES, GENRES, KIDS_TASTE_ALPHA, NAMED_ACTORS

KIDS_SHARE = 0.15
MAX_FAVOURITES = 8
DEVICE_PRIMARY_ADULT = np.array([0.45, 0.25, 0.15, 0.15])  # tv, mobile, web, tablet
DEVICE_PRIMARY_KIDS = np.array([0.40, 0.10, 0.05, 0.45])


@dataclass
class Members:
    """Member profiles (the ``members`` contract) and their latent tastes.

    Attributes
    ----------
    member_ids, country, language, profile
        Contract columns; ``signup`` is days since epoch.
    is_kids : ndarray [M] bool
    theta : ndarray [M, G]
        Genre taste, a Dirichlet draw (rows sum to 1).
    tau : ndarray [M, A] float32
        Actor taste: 0 for most actors, 0.6-1.4 for the member's few favourites.
    activity : ndarray [M]
        Mean plays per day; also the member's share of visits.
    device : ndarray [M]
        Index (into ``keyart.contracts.DEVICES``) of the primary device.
    utc_offset_min : ndarray [M]
        Minutes from UTC to local time (from the country).
    """

    member_ids: list[str]
    country: list[str]
    language: list[str]
    profile: list[str]
    signup: np.ndarray
    is_kids: np.ndarray
    theta: np.ndarray
    tau: np.ndarray
    activity: np.ndarray
    device: np.ndarray
    utc_offset_min: np.ndarray

    @property
    def n_members(self) -> int:
        return len(self.member_ids)


def build_members(
    rng: np.random.Generator,
    n_members: int,
    actor_home: np.ndarray,
    start: dt.date,
    history_days: int,
) -> Members:
    """Generate ``n_members`` profiles with tastes correlated across genres and actors.

    Favourite actors are drawn with probability proportional to the member's taste for
    the actor's home genre, so comedy fans tend to like comedians.
    """
    m = n_members
    is_kids = rng.random(m) < KIDS_SHARE
    a_adult = np.array([ADULT_TASTE_ALPHA[g] for g in GENRES])
    a_kids = np.array([KIDS_TASTE_ALPHA[g] for g in GENRES])
    theta = np.where(is_kids[:, None], rng.dirichlet(a_kids, m), rng.dirichlet(a_adult, m))
    theta = np.clip(theta, 1e-6, None)
    theta /= theta.sum(1, keepdims=True)
    # favourite actors: Gumbel top-k over P(actor) ~ taste for the actor's home genre
    n_actors = len(actor_home)
    fame = np.ones(n_actors)
    fame[: len(NAMED_ACTORS)] = 3.0
    logp = np.log(theta[:, actor_home] + 0.01) + np.log(fame)[None, :]
    keys = logp + rng.gumbel(size=(m, n_actors))
    kmax = min(MAX_FAVOURITES, n_actors)
    top = np.argpartition(-keys, kmax - 1, axis=1)[:, :kmax]
    n_fav = np.minimum(rng.poisson(np.where(is_kids, 1.5, 2.5)), kmax)
    # rank the top-k by key so the first n_fav are the strongest
    order = np.argsort(-np.take_along_axis(keys, top, 1), axis=1)
    top = np.take_along_axis(top, order, 1)
    keep = np.arange(kmax)[None, :] < n_fav[:, None]
    tau = np.zeros((m, n_actors), dtype=np.float32)
    rows = np.repeat(np.arange(m), kmax).reshape(m, kmax)
    tau[rows[keep], top[keep]] = rng.uniform(0.6, 1.4, int(keep.sum()))
    # profiles
    codes = list(COUNTRIES)
    w = np.array([COUNTRIES[c][0] for c in codes])
    cidx = rng.choice(len(codes), size=m, p=w / w.sum())
    country = [codes[i] for i in cidx]
    language = []
    u = rng.random(m)
    for i, c in enumerate(country):
        langs = COUNTRIES[c][2]
        cum = np.cumsum([share for _, share in langs])
        language.append(langs[min(int(np.searchsorted(cum, u[i], side="right")), len(langs) - 1)][0])
    offset = np.array([COUNTRIES[c][1] for c in country], dtype=np.int32)
    epoch = dt.date(1970, 1, 1)
    hist0 = (start - epoch).days - history_days
    old0 = (dt.date(2019, 1, 1) - epoch).days
    kind = rng.choice(3, size=m, p=[0.92, 0.05, 0.03])
    signup = np.where(
        kind == 0, rng.integers(old0, hist0, m),
        np.where(kind == 1, rng.integers(hist0, hist0 + history_days, m), rng.integers(hist0 + history_days, hist0 + history_days + 30, m)),
    )
    activity = rng.lognormal(np.log(0.45), 0.8, m) * np.where(is_kids, 1.2, 1.0)
    device = np.where(
        is_kids, rng.choice(4, size=m, p=DEVICE_PRIMARY_KIDS), rng.choice(4, size=m, p=DEVICE_PRIMARY_ADULT)
    ).astype(np.int8)
    return Members(
        member_ids=[f"m{i:06d}" for i in range(m)],
        country=country,
        language=language,
        profile=["kids" if k else "adult" for k in is_kids],
        signup=signup.astype(np.int64),
        is_kids=is_kids,
        theta=theta,
        tau=tau,
        activity=activity,
        device=device,
        utc_offset_min=offset,
    )
