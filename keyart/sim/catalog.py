"""The simulated catalog: actors, titles and their candidate artworks.

Artworks of a title are contiguous (``title_art_offsets``), so the candidates of title
``t`` are the artwork indices ``title_art_offsets[t]:title_art_offsets[t + 1]``.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np

from keyart.sim.names import (
    ADULT_RATINGS,
    ART_FLAGS,
    CAMPAIGN_LABELS,
    FIRST_NAMES,
    GENRE_CATALOG_SHARE,
    GENRES,
    KIDS_GENRES,
    KIDS_RATINGS,
    LAST_NAMES,
    NAMED_ACTORS,
    NAMED_TITLES,
    TAG_VOCABULARIES,
    TITLE_ADJECTIVES,
    TITLE_NOUNS,
    UNSEEN_FLAG_TAGS,
    UNSEEN_TONE_TAGS,
    G,
)

N_GENERATED_ACTORS = 300
CLICKBAIT_RATE = 0.12
NEW_ART_RATE = 0.06
_SHARE = np.array([GENRE_CATALOG_SHARE[g] for g in GENRES])
_SHARE = _SHARE / _SHARE.sum()


@dataclass
class Catalog:
    """Titles, actors and artworks, with the latent artwork attributes.

    Attributes
    ----------
    actor_ids, actor_home
        Cast ids and the genre index each actor mostly plays in.
    title_ids, title_names, title_genres, title_cast, title_rating
        What the ``titles`` contract holds.
    title_genre_w : ndarray [T, G]
        Genre weights of each title (rows sum to 1; the primary genre weighs most).
    title_cast_m : ndarray [T, A]
        1 where the actor is in the title's cast.
    title_appeal, title_runtime : ndarray [T]
        Latent base appeal (logit scale) and runtime in minutes.
    title_art_offsets : ndarray [T + 1]
        Artwork index range of every title.
    art_ids, art_tags, art_title, art_is_default, art_active_from
        What the ``artworks`` contract holds (``art_active_from`` as days since epoch).
    art_tone : ndarray [N]
        Genre index of the artwork's ``tone:`` tag.
    art_cast : ndarray [N, C]
        Actor indices shown on the artwork, padded with -1.
    art_flags : ndarray [N, len(ART_FLAGS)]
        The artwork's flags (closeup, text_heavy, group) as 0/1.
    art_clickbait : ndarray [N]
        Latent, untagged: raises P(play), cuts minutes watched.
    art_idio : ndarray [N]
        Latent per-artwork appeal not explained by tags (logit scale).
    """

    actor_ids: list[str]
    actor_home: np.ndarray
    title_ids: list[str]
    title_names: list[str]
    title_genres: list[list[str]]
    title_cast: list[list[str]]
    title_rating: list[str]
    title_genre_w: np.ndarray
    title_cast_m: np.ndarray
    title_appeal: np.ndarray
    title_runtime: np.ndarray
    title_art_offsets: np.ndarray
    art_ids: list[str]
    art_tags: list[list[str]]
    art_title: np.ndarray
    art_is_default: np.ndarray
    art_active_from: np.ndarray
    art_tone: np.ndarray
    art_cast: np.ndarray
    art_flags: np.ndarray
    art_clickbait: np.ndarray
    art_idio: np.ndarray

    @property
    def n_titles(self) -> int:
        return len(self.title_ids)

    @property
    def n_artworks(self) -> int:
        return len(self.art_ids)

    @property
    def title_kid_friendly(self) -> np.ndarray:
        """[T] bool: rated for kids profiles."""
        return np.array([r in KIDS_RATINGS for r in self.title_rating])

    def title_index(self, title_id: str) -> int:
        return self.title_ids.index(title_id)

    def artwork_index(self, artwork_id: str) -> int:
        return self.art_ids.index(artwork_id)

    def artworks_of(self, title_idx: int) -> np.ndarray:
        """Artwork indices of one title."""
        return np.arange(self.title_art_offsets[title_idx], self.title_art_offsets[title_idx + 1])

    def candidate_matrix(self, day: dt.date | None = None) -> np.ndarray:
        """[T, Kmax] artwork indices per title (active on ``day`` if given), padded with -1."""
        counts = np.diff(self.title_art_offsets)
        kmax = int(counts.max())
        k = np.arange(kmax)
        cand = self.title_art_offsets[:-1, None] + k[None, :]
        valid = k[None, :] < counts[:, None]
        cand = np.where(valid, cand, -1)
        if day is not None:
            active = self.art_active_from <= _epoch_day(day)
            ok = valid & active[np.clip(cand, 0, None)]
            # keep active ones first, then pad
            order = np.argsort(~ok, axis=1, kind="stable")
            cand = np.where(np.take_along_axis(ok, order, 1), np.take_along_axis(cand, order, 1), -1)
        return cand


def _epoch_day(day: dt.date) -> int:
    return (day - dt.date(1970, 1, 1)).days


def _title_name(rng: np.random.Generator, used: set[str]) -> str:
    for _ in range(1000):
        name = f"The {rng.choice(TITLE_ADJECTIVES)} {rng.choice(TITLE_NOUNS)}"
        if name not in used:
            used.add(name)
            return name
    name = f"{name} {len(used)}"
    used.add(name)
    return name


def build_catalog(rng: np.random.Generator, n_titles: int, launch: dt.date, start: dt.date) -> Catalog:
    """Generate a catalog of ``n_titles`` titles (the named titles included).

    Parameters
    ----------
    rng
        Seeded generator; the catalog is a pure function of its state.
    n_titles
        Total number of titles, at least ``len(NAMED_TITLES) + 1``.
    launch
        ``active_from`` of the original artworks.
    start
        First simulated traffic day; a few artworks become active some days after it.
    """
    if n_titles < len(NAMED_TITLES) + 1:
        raise ValueError(f"need at least {len(NAMED_TITLES) + 1} titles, got {n_titles}")
    ng = len(GENRES)
    # ---- actors -----------------------------------------------------------------------
    combos = [f"{f}_{last}" for f in FIRST_NAMES for last in LAST_NAMES]
    pick = rng.choice(len(combos), size=N_GENERATED_ACTORS, replace=False)
    actor_ids = list(NAMED_ACTORS) + [combos[i] for i in pick]
    actor_home = np.array([G[h] for h in NAMED_ACTORS.values()] + list(rng.choice(ng, N_GENERATED_ACTORS, p=_SHARE)))
    star = rng.lognormal(0.0, 0.7, len(actor_ids))
    star[: len(NAMED_ACTORS)] = 0.0  # named actors are placed explicitly below
    # ---- titles -----------------------------------------------------------------------
    names, genres, casts, ratings, appeal, runtime = [], [], [], [], [], []
    ids: list[str] = []
    for nt in NAMED_TITLES:
        ids.append(nt.title_id)
        names.append(nt.name)
        genres.append(list(nt.genres))
        casts.append(list(nt.cast))
        ratings.append(nt.rating)
        appeal.append(nt.appeal)
        runtime.append(nt.runtime)
    used = set(names)
    n_gen = n_titles - len(NAMED_TITLES)
    for i in range(n_gen):
        primary = int(rng.choice(ng, p=_SHARE))
        pool = [G[g] for g in (*KIDS_GENRES, "comedy", "action")] if GENRES[primary] in KIDS_GENRES else list(range(ng))
        pool = [g for g in pool if g != primary]
        w = _SHARE[pool] / _SHARE[pool].sum()
        n_sec = int(rng.choice(3, p=[0.3, 0.5, 0.2]))
        sec = list(rng.choice(pool, size=n_sec, replace=False, p=w)) if n_sec else []
        g_list = [GENRES[primary]] + [GENRES[int(s)] for s in sec]
        kid_ok = GENRES[primary] in KIDS_GENRES and not {"horror", "thriller"} & set(g_list)
        soft = {"comedy", "romance", "documentary"} >= set(g_list)
        if kid_ok:
            rating = str(rng.choice(KIDS_RATINGS))
        elif soft and rng.random() < 0.4:
            rating = str(rng.choice(("PG", "TV-PG")))
        else:
            rating = str(rng.choice(ADULT_RATINGS))
        n_cast = int(rng.integers(1, 3)) if GENRES[primary] == "documentary" else int(rng.integers(3, 7))
        home_ok = np.isin(actor_home, [G[g] for g in g_list]) & (star > 0)
        p_cast = np.where(home_ok, star * 4.0, star)
        cast = list(rng.choice(len(actor_ids), size=n_cast, replace=False, p=p_cast / p_cast.sum()))
        ids.append(f"t{i + 1:04d}")
        names.append(_title_name(rng, used))
        genres.append(g_list)
        casts.append([actor_ids[c] for c in cast])
        ratings.append(rating)
        appeal.append(float(rng.normal(0.0, 0.5)))
        runtime.append(float(rng.uniform(40, 60)) if GENRES[primary] == "documentary" else float(rng.uniform(80, 160)))
    # named actors also appear in a few generated titles of their home genre
    n_named = len(NAMED_TITLES)
    for actor, home in NAMED_ACTORS.items():
        fits = [t for t in range(n_named, n_titles) if home in genres[t] and actor not in casts[t]]
        if not fits:
            fits = [t for t in range(n_named, n_titles) if actor not in casts[t]]
        for t in rng.permutation(fits)[:3]:
            casts[int(t)].insert(int(rng.integers(0, 2)), actor)
    a_index = {a: i for i, a in enumerate(actor_ids)}
    genre_w = np.zeros((n_titles, ng))
    cast_m = np.zeros((n_titles, len(actor_ids)), dtype=np.float32)
    for t in range(n_titles):
        g_list = genres[t]
        genre_w[t, G[g_list[0]]] = 0.6 if len(g_list) > 1 else 1.0
        for g in g_list[1:]:
            genre_w[t, G[g]] += 0.4 / (len(g_list) - 1)
        cast_m[t, [a_index[a] for a in casts[t]]] = 1.0
    # ---- artworks ---------------------------------------------------------------------
    art = _build_artworks(rng, ids, genres, casts, a_index, launch, start)
    return Catalog(
        actor_ids=actor_ids, actor_home=actor_home.astype(np.int16),
        title_ids=ids, title_names=names, title_genres=genres, title_cast=casts, title_rating=ratings,
        title_genre_w=genre_w, title_cast_m=cast_m,
        title_appeal=np.asarray(appeal), title_runtime=np.asarray(runtime),
        **art,
    )


def _build_artworks(rng, ids, genres, casts, a_index, launch: dt.date, start: dt.date) -> dict:
    named = {nt.title_id: nt for nt in NAMED_TITLES}
    rows: list[tuple[str, list[str], bool, bool, float, int]] = []  # id, tags, default, cb, idio, from
    offsets = [0]
    for t, tid in enumerate(ids):
        if tid in named:
            for na in named[tid].artworks:
                rows.append((f"{tid}-{na.suffix}", list(na.tags), na.is_default, False, 0.0, _epoch_day(launch)))
            offsets.append(len(rows))
            continue
        g_list, cast = genres[t], casts[t]
        k = int(rng.integers(4, 13))
        default_cast = cast[:2] if len(cast) > 1 and rng.random() < 0.4 else cast[:1]
        flags = ["group"] if len(default_cast) > 1 else (["closeup"] if default_cast and rng.random() < 0.5 else [])
        tags = [f"cast:{c}" for c in default_cast] + [f"tone:{g_list[0]}"] + flags
        rows.append((f"{tid}-a0", tags, True, False, float(rng.normal(0, 0.1)), _epoch_day(launch)))
        billing = 1.0 / (np.arange(len(cast)) + 1.0)
        for j in range(1, k):
            if rng.random() < 0.7:
                tone = str(rng.choice(g_list))
            else:
                others = [g for g in GENRES if g not in g_list]
                tone = str(rng.choice(others)) if others else g_list[0]
            n_c = min(len(cast), int(rng.choice(3, p=[0.25, 0.55, 0.2])))
            shown = list(rng.choice(len(cast), size=n_c, replace=False, p=billing / billing.sum())) if n_c else []
            fl = []
            if rng.random() < (0.5 if n_c == 1 else 0.1):
                fl.append("closeup")
            if rng.random() < (0.5 if n_c == 0 else 0.2):
                fl.append("text_heavy")
            if rng.random() < (0.6 if n_c >= 2 else 0.05):
                fl.append("group")
            tags = [f"cast:{cast[int(c)]}" for c in sorted(shown)] + [f"tone:{tone}"] + fl
            cb = bool(rng.random() < CLICKBAIT_RATE)
            new = rng.random() < NEW_ART_RATE
            active = _epoch_day(start) + int(rng.integers(3, 22)) if new else _epoch_day(launch)
            rows.append((f"{tid}-a{j}", tags, False, cb, float(rng.normal(0, 0.15)), active))
        offsets.append(len(rows))
    n = len(rows)
    offsets_a = np.asarray(offsets, dtype=np.int64)
    art_title = np.repeat(np.arange(len(ids)), np.diff(offsets_a))
    tone = np.zeros(n, dtype=np.int16)
    cast_lists = []
    flags_m = np.zeros((n, len(ART_FLAGS)), dtype=np.int8)
    for i, (_, tags, *_rest) in enumerate(rows):
        tone[i] = next(G[x[5:]] for x in tags if x.startswith("tone:"))
        cast_lists.append([a_index[x[5:]] for x in tags if x.startswith("cast:")])
        for f, flag in enumerate(ART_FLAGS):
            flags_m[i, f] = flag in tags
    cmax = max(1, max(len(c) for c in cast_lists))
    art_cast = np.full((n, cmax), -1, dtype=np.int32)
    for i, c in enumerate(cast_lists):
        art_cast[i, : len(c)] = c
    return dict(
        title_art_offsets=offsets_a,
        art_ids=[r[0] for r in rows],
        art_tags=[r[1] for r in rows],
        art_title=art_title,
        art_is_default=np.array([r[2] for r in rows]),
        art_active_from=np.array([r[5] for r in rows], dtype=np.int64),
        art_tone=tone,
        art_cast=art_cast,
        art_flags=flags_m,
        art_clickbait=np.array([r[3] for r in rows]),
        art_idio=np.array([r[4] for r in rows]),
    )


CAMPAIGN_RATE = 0.3


def render_tags(catalog: Catalog, vocabulary: str, rng: np.random.Generator) -> None:
    """Rewrite ``catalog.art_tags`` in another tag vocabulary (in place); the latent attributes
    (``art_tone``, ``art_cast``, ``art_flags``) and so the ground truth stay the same.

    ``default`` leaves the tags as built. ``unseen`` writes each tone as its
    :data:`~keyart.sim.names.UNSEEN_TONE_TAGS` tag, each flag as its
    :data:`~keyart.sim.names.UNSEEN_FLAG_TAGS` tag, keeps ``cast:<id>`` (the data contract's link
    to the title's cast) and adds a campaign label to :data:`CAMPAIGN_RATE` of the artworks.
    """
    if vocabulary not in TAG_VOCABULARIES:
        raise ValueError(f"unknown tag vocabulary {vocabulary!r}; one of {TAG_VOCABULARIES}")
    if vocabulary == "default":
        return
    tagged = []
    for i, tags in enumerate(catalog.art_tags):
        out = [t for t in tags if t.startswith("cast:")]
        out.append(UNSEEN_TONE_TAGS[GENRES[int(catalog.art_tone[i])]])
        out += [UNSEEN_FLAG_TAGS[f] for j, f in enumerate(ART_FLAGS) if catalog.art_flags[i, j]]
        if rng.random() < CAMPAIGN_RATE:
            out.append(str(rng.choice(CAMPAIGN_LABELS)))
        tagged.append(out)
    catalog.art_tags = tagged
