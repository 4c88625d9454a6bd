"""The one feature specification, shared by Spark (training rows), export and serving.

A model row is one (member, title, artwork, context). Its feature vector is built from
*feature inputs*: plain columns that the features job writes for training rows and that
serving assembles for a page, and from the day's :class:`Vocabulary` (data, not code: the
features job learns it from the catalog, the bundle ships it in ``feature_spec.json``).
The functions here turn inputs into the float32 matrix, in the fixed order of
:data:`FEATURE_NAMES`; serving calls :func:`feature_matrix` (or its blocks, cached per
artwork) directly and Spark calls :func:`columnar_feature_matrix` through ``mapInArrow``: the
same blocks and the same sums in the same order over many rows at once (tested bit for bit
against :func:`feature_matrix`), so the arithmetic exists once.
:data:`FEATURE_SPEC_VERSION` changes when this arithmetic changes, not when a catalog adds a tag.

Feature inputs (:data:`INPUT_COLUMNS`):

=========================== ======================================================
member_known                1 if the member has a feature snapshot, else 0
member_is_kids              1 for a kids profile
member_log_plays_28d        log1p(plays in the 28 days up to the snapshot)
member_days_since_last_play days from last play to the snapshot end (capped)
affinity_tags               member's tags: 'genre:<g>' and 'cast:<c>'
affinity_values             time-decayed share of minutes watched per tag, in [0, 1]
response_tags               artwork tags the member was shown in the response window
response_values             the member's shrunk quality-play lift on them (:func:`response_lift`)
response_n                  impressions behind each value
member_factors              the member's vector of the snapshot day: ALS factors, then genre shares ([] = none)
device, local_hour, day_of_week, page_row, position      request context
art_tags                    the artwork's tags (any 'key:value' or bare flag; 'cast:<c>')
art_is_default              1 if it is the title's default artwork
title_genres                the title's genres
title_id                    the title (its ALS factors and mean artwork vector, from :class:`Embeddings`)
art_prior_mean              posterior mean quality-play rate of the artwork (segment 'all')
art_prior_n                 its effective number of impressions
art_prior_mean_seg          posterior mean for the member's segment (falls back to 'all')
title_prior_mean            mean of art_prior_mean over the title's artworks
=========================== ======================================================
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# The data contract's devices, in the order of the ctx_device_* one-hot columns.
from keyart.contracts import DEVICES

FEATURE_SPEC_VERSION = "3"

DAYS_SINCE_CAP = 365.0
SEGMENT_ALL = "all"
# Prior used where no posterior exists yet (first day, unseen title): Beta(1, 9), mean 0.1.
DEFAULT_PRIOR = (1.0, 9.0)

CAST_PREFIX = "cast:"
"""The data contract's artwork tag for a cast member shown (matched to the member's cast affinity)."""
GENRE_PREFIX = "genre:"
N_TAG_SLOTS = 24
"""Artwork tag columns: the catalog's most frequent tags, one column each (:class:`Vocabulary`)."""
N_TAG_BUCKETS = 8
"""Columns the other tags are hashed into (crc32 of the tag, modulo)."""
TAG_MIN_ARTWORKS = 5
"""A tag gets its own column only if at least this many artworks carry it."""
N_GENRE_SLOTS = 12
"""Member columns: the member's affinity for each of the catalog's most common title genres."""
RESPONSE_PRIOR_N = 10.0
"""Pseudo-impressions at the population's rate that a member's response to a tag is shrunk towards."""

def member_segment(is_kids: int | bool) -> str:
    """The prior segment a member belongs to."""
    return "profile=kids" if is_kids else "profile=adult"


MEMBER_FEATURES = (
    "member_known",
    "member_is_kids",
    "member_log_plays_28d",
    "member_days_since_last_play",
    *(f"member_genre_{j}" for j in range(N_GENRE_SLOTS)),
)
CONTEXT_FEATURES = (
    *(f"ctx_device_{d}" for d in DEVICES),
    "ctx_hour_sin",
    "ctx_hour_cos",
    "ctx_is_weekend",
    "ctx_page_row",
    "ctx_position",
)
ARTWORK_STATIC_FEATURES = (
    "art_is_default",
    "art_n_cast",
    *(f"art_tag_{i}" for i in range(N_TAG_SLOTS)),
    *(f"art_tag_bucket_{i}" for i in range(N_TAG_BUCKETS)),
)
ARTWORK_FEATURES = ARTWORK_STATIC_FEATURES + (
    "art_prior_mean",
    "art_prior_log_n",
    "art_prior_lift",
)
MATCH_FEATURES = (
    "match_cast_sum",
    "match_cast_max",
    "match_tag_genre",
    "match_title_genre",
    "resp_lift_sum",
    "resp_lift_max",
    "resp_log_n",
    "art_prior_mean_seg",
)
EMBEDDING_FEATURES = (
    "emb_member_title",
    "emb_member_artwork",
    "emb_artwork_lift",
    "emb_artwork_genres",
)
FEATURE_NAMES: tuple[str, ...] = MEMBER_FEATURES + CONTEXT_FEATURES + ARTWORK_FEATURES + MATCH_FEATURES + EMBEDDING_FEATURES
N_FEATURES = len(FEATURE_NAMES)
FEATURE_ROW_DTYPE = np.dtype("<f4")
"""A feature row as the training table stores it: one binary value of N_FEATURES
little-endian float32 (:func:`pack_rows`, :func:`unpack_rows`)."""
FEATURE_ROW_BYTES = N_FEATURES * FEATURE_ROW_DTYPE.itemsize
"""Bytes of one stored feature row."""

INPUT_COLUMNS = (
    "member_known", "member_is_kids", "member_log_plays_28d", "member_days_since_last_play",
    "affinity_tags", "affinity_values", "response_tags", "response_values", "response_n", "member_factors",
    "device", "local_hour", "day_of_week", "page_row", "position",
    "art_tags", "art_is_default", "title_genres", "title_id",
    "art_prior_mean", "art_prior_n", "art_prior_mean_seg", "title_prior_mean",
)

UNKNOWN_MEMBER = {
    "member_known": 0,
    "member_is_kids": 0,
    "member_log_plays_28d": 0.0,
    "member_days_since_last_play": DAYS_SINCE_CAP,
    "affinity_tags": [],
    "affinity_values": [],
    "response_tags": [],
    "response_values": [],
    "response_n": [],
    "member_factors": [],
}


def tag_bucket(tag: str) -> int:
    """The column of a tag outside the vocabulary's slots: stable across processes and machines."""
    return N_TAG_SLOTS + zlib.crc32(tag.encode("utf-8")) % N_TAG_BUCKETS


def _vectors(data: Any, rank: int, what: str) -> dict[str, tuple[float, ...]]:
    if not isinstance(data, Mapping):
        raise ValueError(f"embeddings: {what} is a mapping of name -> vector")
    out = {}
    for k, v in data.items():
        if not isinstance(v, (list, tuple)) or len(v) != rank:
            raise ValueError(f"embeddings: {what}[{k!r}] is not a vector of rank {rank}")
        out[str(k)] = tuple(float(x) for x in v)
    return out


@dataclass(frozen=True)
class Embeddings:
    """The catalog side of the day's embeddings, in the space of the members' vectors.

    A member's vector (the snapshot's ``member_factors``) is their ALS factors (implicit feedback on
    minutes played) followed by their minute share on each of the vocabulary's genres; ``rank`` is
    its length. ``titles``: each title's vector in that space (its ALS factors, then 1 / its number
    of genres on each of its genres). ``tags``: each artwork tag's *response direction*, the
    ridge regression of the quality-play residual (reward minus the tag's population rate) on
    the member's factors over the response window's impressions of artworks carrying it, so
    ``member . tags[t]`` is the member's predicted lift on that tag, for any vocabulary
    (cast tags included). An artwork's vector is the sum of its distinct tags' directions in
    tag order (:meth:`artwork_vector`); ``title_artworks`` is the mean of those vectors over
    each title's artworks, so ``member . (artwork - title_artworks)`` ranks the artworks of
    one title. ``tag_profiles``: each tag's *catalog genre profile*, the mean genre part of the
    title vectors of the artworks carrying it (0 on the ALS part), so ``member . profile`` is the
    member's taste for the genres a tag goes with in this catalog, whatever the tag is called
    (:meth:`artwork_profile`). Learned by the features job, shipped inside the :class:`Vocabulary`.
    """

    rank: int = 0
    titles: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    tags: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    title_artworks: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    tag_profiles: Mapping[str, tuple[float, ...]] = field(default_factory=dict)

    def title_vector(self, title_id: str | None) -> np.ndarray:
        """The title's vector, zeros when it has none: [rank] float64."""
        v = self.titles.get(title_id) if title_id is not None else None
        return np.zeros(self.rank) if v is None else np.asarray(v, dtype=np.float64)

    def artwork_vector(self, art_tags: Sequence[str]) -> np.ndarray:
        """Sum of the directions of the artwork's distinct tags, added in tag order: [rank] float64."""
        return self._tag_sum(self.tags, art_tags)

    def artwork_profile(self, art_tags: Sequence[str]) -> np.ndarray:
        """Sum of the catalog genre profiles of the artwork's distinct tags, in tag order: [rank] float64."""
        return self._tag_sum(self.tag_profiles, art_tags)

    def _tag_sum(self, vectors: Mapping[str, tuple[float, ...]], art_tags: Sequence[str]) -> np.ndarray:
        out = np.zeros(self.rank)
        seen: set[str] = set()
        for t in art_tags:
            if t in seen:
                continue
            seen.add(t)
            v = vectors.get(t)
            if v is not None:
                out = out + np.asarray(v, dtype=np.float64)
        return out

    def lift_vector(self, art_tags: Sequence[str], title_id: str | None) -> np.ndarray:
        """The artwork's vector minus its title's mean artwork vector (zeros when it has none): [rank] float64."""
        return self.artwork_vector(art_tags) - self.title_artwork_mean(title_id)

    def title_artwork_mean(self, title_id: str | None) -> np.ndarray:
        """The title's mean artwork vector, zeros when it has none: [rank] float64."""
        v = self.title_artworks.get(title_id) if title_id is not None else None
        return np.zeros(self.rank) if v is None else np.asarray(v, dtype=np.float64)

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank,
                "titles": {k: list(v) for k, v in sorted(self.titles.items())},
                "tags": {k: list(v) for k, v in sorted(self.tags.items())},
                "title_artworks": {k: list(v) for k, v in sorted(self.title_artworks.items())},
                "tag_profiles": {k: list(v) for k, v in sorted(self.tag_profiles.items())}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Embeddings:
        if not data:
            return cls()
        if not isinstance(data, Mapping) or not isinstance(data.get("rank", 0), int) or data.get("rank", 0) < 0:
            raise ValueError("embeddings are a mapping with an integer 'rank' >= 0")
        rank = int(data.get("rank", 0))
        return cls(rank, *(_vectors(data.get(k) or {}, rank, k) for k in ("titles", "tags", "title_artworks", "tag_profiles")))


def member_factor_matrix(factors: Any, rank: int) -> np.ndarray:
    """[n, rank] float64 of a member_factors column (:meth:`Ragged.of` forms): a row whose length is
    not ``rank`` (no factors, another fit) is zeros, as an unknown member's."""
    col = Ragged.of(factors)
    out = np.zeros((len(col), rank))
    if rank == 0 or len(col) == 0:
        return out
    ok = col.lengths == rank
    if ok.any():
        values = float_column(col.values)
        starts = col.offsets[:-1][ok]
        out[ok] = values[starts[:, None] + np.arange(rank)[None, :]]
    return out


def embedding_block(member_factors: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """[n, len(EMBEDDING_FEATURES)] float32: the member's factors ([n, k], or [k] for every row) dotted with
    ``vectors`` [n, 4, k]: per row the title vector, the artwork vector, the artwork minus its
    title's mean artwork vector and the artwork's catalog genre profile. float64 products added left to right over k from 0, so every
    path (this one function) gets the same bits."""
    u = np.asarray(member_factors, dtype=np.float64)
    v = np.asarray(vectors, dtype=np.float64)
    out = np.zeros(v.shape[:2])
    step = np.empty_like(out)
    for j in range(v.shape[2]):
        np.multiply(v[:, :, j], u[:, j, None] if u.ndim == 2 else u[j], out=step)
        out += step
    return out.astype(np.float32)


@dataclass(frozen=True)
class Vocabulary:
    """Which artwork tag owns each tag column and which genre each member genre column.

    Learned from the catalog by the features job every day (:func:`learn_vocabulary`), written
    as data and shipped in the bundle: the code lists no tag. ``tags[i]`` owns column
    ``art_tag_<i>`` ('' = free slot); every other non-cast tag counts in its hash bucket.
    """

    tags: tuple[str, ...] = ()
    genres: tuple[str, ...] = ()
    tag_artworks: Mapping[str, int] = field(default_factory=dict)
    genre_titles: Mapping[str, int] = field(default_factory=dict)
    embeddings: Embeddings = field(default_factory=Embeddings)

    def __post_init__(self) -> None:
        if len(self.tags) > N_TAG_SLOTS or len(self.genres) > N_GENRE_SLOTS:
            raise ValueError(f"a vocabulary has at most {N_TAG_SLOTS} tags and {N_GENRE_SLOTS} genres, "
                             f"got {len(self.tags)} and {len(self.genres)}")
        named = [t for t in self.tags if t]
        if len(set(named)) != len(named) or len(set(self.genres)) != len(self.genres):
            raise ValueError("a vocabulary lists a tag or genre twice")
        if any(t.startswith(CAST_PREFIX) for t in named):
            raise ValueError("cast tags are matched to the member, not given a column")

    @property
    def slot_of(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.tags) if t}

    def to_dict(self) -> dict[str, Any]:
        return {"tags": list(self.tags), "genres": list(self.genres),
                "tag_artworks": dict(sorted(self.tag_artworks.items())),
                "genre_titles": dict(sorted(self.genre_titles.items())),
                "embeddings": self.embeddings.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Vocabulary:
        """From :meth:`to_dict` output; None or {} is the empty vocabulary (every tag hashed)."""
        if not data:
            return cls()
        if not isinstance(data, Mapping) or not isinstance(data.get("tags", []), list) \
                or not isinstance(data.get("genres", []), list):
            raise ValueError("a vocabulary is a mapping with 'tags' and 'genres' lists")
        return cls(tuple(map(str, data.get("tags", []))), tuple(map(str, data.get("genres", []))),
                   {str(k): int(v) for k, v in (data.get("tag_artworks") or {}).items()},
                   {str(k): int(v) for k, v in (data.get("genre_titles") or {}).items()},
                   Embeddings.from_dict(data.get("embeddings")))


def learn_vocabulary(tag_artworks: Mapping[str, int], genre_titles: Mapping[str, int],
                     previous: Vocabulary | None = None) -> Vocabulary:
    """The day's vocabulary from catalog counts (artworks per tag, titles per genre).

    Slots are sticky so a column means the same on every day of a training window: a tag or
    genre keeps the slot it had in ``previous``; free slots go to the most frequent newcomers
    (ties by name). A tag needs :data:`TAG_MIN_ARTWORKS` artworks for a slot; ``cast:`` tags
    never take one (they are matched to the member's cast affinity).
    """
    previous = previous or Vocabulary()
    tags = list(previous.tags) + [""] * (N_TAG_SLOTS - len(previous.tags))
    ranked = sorted(((n, t) for t, n in tag_artworks.items()
                     if n >= TAG_MIN_ARTWORKS and not t.startswith(CAST_PREFIX) and t not in previous.slot_of),
                    key=lambda x: (-x[0], x[1]))
    fresh = iter(t for _, t in ranked)
    tags = [t or next(fresh, "") for t in tags]
    while tags and not tags[-1]:
        tags.pop()
    genres = list(previous.genres)
    genres += [g for _, g in sorted(((n, g) for g, n in genre_titles.items() if g not in genres),
                                    key=lambda x: (-x[0], x[1]))][: N_GENRE_SLOTS - len(genres)]
    return Vocabulary(tuple(tags), tuple(genres), dict(tag_artworks), dict(genre_titles))


def vocabulary_path(lake_root: str | Path, ds: str) -> Path:
    """Where the features job of ``ds`` writes the day's vocabulary."""
    return Path(lake_root) / "features" / "vocabulary" / f"ds={ds}" / "vocabulary.json"


def read_vocabulary(lake_root: str | Path, ds: str) -> Vocabulary:
    """The vocabulary of day ``ds``; FileNotFoundError when the features job has not written one."""
    return Vocabulary.from_dict(json.loads(vocabulary_path(lake_root, ds).read_text()))


def spec_dict(vocabulary: Vocabulary | None = None) -> dict[str, Any]:
    """The specification as data, with the vocabulary: shipped in every bundle and checked by serving."""
    return {
        "version": FEATURE_SPEC_VERSION,
        "features": list(FEATURE_NAMES),
        "inputs": list(INPUT_COLUMNS),
        "devices": list(DEVICES),
        "days_since_cap": DAYS_SINCE_CAP,
        "tag_slots": N_TAG_SLOTS,
        "tag_buckets": N_TAG_BUCKETS,
        "genre_slots": N_GENRE_SLOTS,
        "response_prior_n": RESPONSE_PRIOR_N,
        "vocabulary": (vocabulary or Vocabulary()).to_dict(),
    }


def response_lift(quality_plays, impressions, population_rate):
    """A member's shrunk lift over the population on a tag: (q - n p) / (n + RESPONSE_PRIOR_N).

    The member's quality-play rate on n impressions of artworks carrying the tag, shrunk
    towards the tag's population rate p with :data:`RESPONSE_PRIOR_N` pseudo-impressions,
    minus p. Plain operators only, so the features job applies it to Spark columns and a
    test to numpy arrays: one formula.
    """
    return (quality_plays - impressions * population_rate) / (impressions + RESPONSE_PRIOR_N)


# ---------------------------------------------------------------------------------------
# Blocks. Each returns float32 arrays; rows are aligned across blocks.
# ---------------------------------------------------------------------------------------

def member_block(known, is_kids, log_plays_28d, days_since_last_play, genre_affinity=None) -> np.ndarray:
    """[n, len(MEMBER_FEATURES)] from per-row member scalars and ``genre_affinity`` [n, N_GENRE_SLOTS]
    (:func:`genre_row` of each row; None = zeros)."""
    days = np.minimum(np.nan_to_num(np.asarray(days_since_last_play, dtype=np.float64), nan=DAYS_SINCE_CAP), DAYS_SINCE_CAP)
    known = np.asarray(known, dtype=np.float64)
    genres = np.zeros((len(known), N_GENRE_SLOTS)) if genre_affinity is None else np.asarray(genre_affinity, np.float64)
    return np.column_stack([
        known,
        np.asarray(is_kids, dtype=np.float64),
        np.nan_to_num(np.asarray(log_plays_28d, dtype=np.float64)),
        days,
        genres.reshape(len(known), N_GENRE_SLOTS),
    ]).astype(np.float32)


def genre_row(affinity: Mapping[str, float], vocabulary: Vocabulary) -> list[float]:
    """The member's affinity for each genre column of ``vocabulary``: [N_GENRE_SLOTS]."""
    row = [affinity.get(GENRE_PREFIX + g, 0.0) for g in vocabulary.genres]
    return row + [0.0] * (N_GENRE_SLOTS - len(row))


def context_block(device, local_hour, day_of_week, page_row, position) -> np.ndarray:
    """[n, len(CONTEXT_FEATURES)] from per-row request context."""
    device = np.asarray(device, dtype=object)
    hour = np.asarray(local_hour, dtype=np.float64)
    dow = np.asarray(day_of_week, dtype=np.float64)
    cols = [(device == d).astype(np.float64) for d in DEVICES]
    angle = 2.0 * math.pi * hour / 24.0
    cols += [
        np.sin(angle),
        np.cos(angle),
        (dow >= 5).astype(np.float64),
        np.asarray(page_row, dtype=np.float64),
        np.asarray(position, dtype=np.float64),
    ]
    return np.column_stack(cols).astype(np.float32)


def artwork_static(art_tags: Sequence[str], is_default: bool | int, vocabulary: Vocabulary | None = None) -> np.ndarray:
    """Tag-derived artwork features (no priors) for one artwork: [len(ARTWORK_STATIC_FEATURES)].

    Each distinct non-cast tag sets its vocabulary column to 1 or adds 1 to its hash bucket
    (:func:`tag_bucket`); ``art_n_cast`` counts the distinct ``cast:`` tags.
    """
    tags = set(art_tags)
    slot_of = (vocabulary or Vocabulary()).slot_of
    row = np.zeros(len(ARTWORK_STATIC_FEATURES), dtype=np.float64)
    row[0] = float(bool(is_default))
    for t in tags:
        if t.startswith(CAST_PREFIX):
            row[1] += 1.0
        elif t in slot_of:
            row[2 + slot_of[t]] = 1.0
        else:
            row[2 + tag_bucket(t)] += 1.0
    return row.astype(np.float32)


def prior_block(art_prior_mean, art_prior_n, title_prior_mean) -> np.ndarray:
    """[n, 3]: prior mean, log1p(effective n), lift of the artwork over its title's mean."""
    mean = np.asarray(art_prior_mean, dtype=np.float64)
    title = np.asarray(title_prior_mean, dtype=np.float64)
    return np.column_stack([mean, np.log1p(np.asarray(art_prior_n, dtype=np.float64)), mean - title]).astype(np.float32)


def match_row(affinity: Mapping[str, float], art_tags: Sequence[str], title_genres: Sequence[str]) -> tuple[float, float, float, float]:
    """Member x artwork match for one row: (cast sum, cast max, tag genre, title genre).

    Tag genre sums the member's affinity for ``genre:<value>`` over the artwork's non-cast
    ``key:value`` tags: a catalog whose tags name genres (any key) links them to taste; other
    values add nothing.
    """
    cast = [affinity.get(t, 0.0) for t in art_tags if t.startswith(CAST_PREFIX)]
    tag_genre = sum(affinity.get(GENRE_PREFIX + t.split(":", 1)[1], 0.0) for t in art_tags
                    if ":" in t and not t.startswith(CAST_PREFIX))
    genre = sum(affinity.get(GENRE_PREFIX + g, 0.0) for g in title_genres) / len(title_genres) if len(title_genres) else 0.0
    return (float(sum(cast)), float(max(cast)) if cast else 0.0, float(tag_genre), float(genre))


def response_map(tags: Sequence[str] | None, values: Sequence[float] | None,
                 n: Sequence[float] | None) -> dict[str, tuple[float, float]]:
    """Tag -> (lift, impressions) for entries with impressions > 0 (the last of a repeated tag wins)."""
    if tags is None or values is None or n is None:
        return {}
    as_list = lambda x: x.tolist() if isinstance(x, np.ndarray) else list(x)  # noqa: E731
    return {str(t): (float(v), float(k)) for t, v, k in zip(as_list(tags), as_list(values), as_list(n), strict=True) if k > 0}


def response_row(responses: Mapping[str, tuple[float, float]], art_tags: Sequence[str]) -> tuple[float, float, float]:
    """Member x artwork response for one row: (lift sum, lift max, impressions) over the
    artwork's tags (cast tags included, in tag order) the member has a response on; zeros if
    none. :func:`feature_matrix` takes log1p of the impressions (``resp_log_n``)."""
    hits = [responses[t] for t in art_tags if t in responses]
    if not hits:
        return (0.0, 0.0, 0.0)
    return (float(sum(h[0] for h in hits)), float(max(h[0] for h in hits)), float(sum(h[1] for h in hits)))


def prior_inputs(all_alpha, all_beta, all_n, seg_alpha, seg_beta, title_ids) -> dict[str, np.ndarray]:
    """The four prior feature inputs for candidate rows, from their Beta posteriors.

    ``all_*`` are the segment-'all' posterior of each row's artwork (NaN where none exists:
    :data:`DEFAULT_PRIOR` is used), ``seg_*`` the posterior of the member's segment (NaN
    where the segment has none: the 'all' mean is used). ``title_ids`` groups rows so
    ``title_prior_mean`` is the mean of ``art_prior_mean`` over each title's rows; callers
    pass one row per active artwork of the title (a page's candidates, or the catalog).
    """
    _, inverse = np.unique(np.asarray(title_ids, dtype=object), return_inverse=True)
    return prior_inputs_by_group(all_alpha, all_beta, all_n, seg_alpha, seg_beta, inverse)


def prior_inputs_by_group(all_alpha, all_beta, all_n, seg_alpha, seg_beta, group) -> dict[str, np.ndarray]:
    """:func:`prior_inputs` with the title groups given as integer ids [n] (any labels >= 0)
    instead of title ids: no sort of strings, the same values."""
    a = np.asarray(all_alpha, dtype=np.float64)
    b = np.asarray(all_beta, dtype=np.float64)
    missing = ~(np.isfinite(a) & np.isfinite(b)) | (a + b <= 0)
    a = np.where(missing, DEFAULT_PRIOR[0], a)
    b = np.where(missing, DEFAULT_PRIOR[1], b)
    n = np.where(missing, 0.0, np.nan_to_num(np.asarray(all_n, dtype=np.float64)))
    mean = a / (a + b)
    sa = np.asarray(seg_alpha, dtype=np.float64)
    sb = np.asarray(seg_beta, dtype=np.float64)
    seg_ok = np.isfinite(sa) & np.isfinite(sb) & (sa + sb > 0)
    seg_mean = np.where(seg_ok, sa / np.where(seg_ok, sa + sb, 1.0), mean)
    return {
        "art_prior_mean": mean,
        "art_prior_n": n,
        "art_prior_mean_seg": seg_mean,
        "title_prior_mean": group_mean(mean, np.asarray(group, dtype=np.int64)),
    }


def group_mean(values: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Each row's mean of ``values`` over the rows of its ``group`` (ids >= 0), summed in row order: [n]."""
    if not len(values):
        return values
    with np.errstate(invalid="ignore", divide="ignore"):  # ids that label no row divide 0 by 0, never read
        return (np.bincount(group, weights=values) / np.bincount(group))[group]


def affinity_map(tags: Sequence[str] | None, values: Sequence[float] | None) -> dict[str, float]:
    """Tag -> affinity (the last value of a repeated tag wins)."""
    if tags is None or values is None:
        return {}
    if isinstance(tags, np.ndarray) and isinstance(values, np.ndarray) and values.dtype.kind == "f":
        # Arrow/pandas cells: tolist() converts in C to str and float (iterating would box each element)
        return dict(zip(tags.tolist(), values.tolist(), strict=True))
    return dict(zip(map(str, tags), map(float, values), strict=True))


def feature_matrix(inputs: Mapping[str, Any], vocabulary: Vocabulary | None = None) -> np.ndarray:
    """The float32 feature matrix [n, N_FEATURES] for columnar feature inputs.

    ``inputs`` maps every name in :data:`INPUT_COLUMNS` to a sequence of length n
    (a pandas DataFrame works); ``vocabulary`` is the day's (None: empty, every tag hashed).
    Missing prior values (NaN) must be filled by the caller.
    """
    missing = [c for c in INPUT_COLUMNS if c not in inputs]
    if missing:
        raise KeyError(f"feature inputs lack columns {missing}")
    vocabulary = vocabulary or Vocabulary()
    n = len(inputs["art_tags"])
    aff_tags = list(inputs["affinity_tags"])
    aff_vals = list(inputs["affinity_values"])
    affinities = [affinity_map(aff_tags[i], aff_vals[i]) for i in range(n)]
    genre_aff = np.array([genre_row(a, vocabulary) for a in affinities], dtype=np.float64).reshape(n, N_GENRE_SLOTS)
    mem = member_block(inputs["member_known"], inputs["member_is_kids"], inputs["member_log_plays_28d"],
                       inputs["member_days_since_last_play"], genre_aff)
    ctx = context_block(inputs["device"], inputs["local_hour"], inputs["day_of_week"], inputs["page_row"], inputs["position"])
    art_tags = list(inputs["art_tags"])
    is_default = list(inputs["art_is_default"])
    static_of: dict[tuple, np.ndarray] = {}  # a day's rows repeat a few thousand artworks
    static = np.zeros((n, len(ARTWORK_STATIC_FEATURES)), np.float32)
    for i in range(n):
        tags_i = art_tags[i]
        key = (tuple(tags_i.tolist() if isinstance(tags_i, np.ndarray) else tags_i), bool(is_default[i]))
        row = static_of.get(key)
        if row is None:
            row = static_of[key] = artwork_static(key[0], key[1], vocabulary)
        static[i] = row
    pri = prior_block(inputs["art_prior_mean"], inputs["art_prior_n"], inputs["title_prior_mean"])
    genres = list(inputs["title_genres"])
    r_tags, r_vals, r_n = list(inputs["response_tags"]), list(inputs["response_values"]), list(inputs["response_n"])
    match = np.zeros((n, 7), dtype=np.float64)
    for i in range(n):
        tags_i = art_tags[i].tolist() if isinstance(art_tags[i], np.ndarray) else art_tags[i]
        match[i, :4] = match_row(affinities[i], tags_i, genres[i] if genres[i] is not None else ())
        match[i, 4:] = response_row(response_map(r_tags[i], r_vals[i], r_n[i]), tags_i)
    match[:, 6] = np.log1p(match[:, 6])
    seg = np.asarray(inputs["art_prior_mean_seg"], dtype=np.float32).reshape(n, 1)
    emb = vocabulary.embeddings
    factors = member_factor_matrix(inputs["member_factors"], emb.rank)
    title_ids = list(inputs["title_id"])
    vectors = np.zeros((n, 4, emb.rank))
    vectors_of: dict[tuple, np.ndarray] = {}
    for i in range(n):
        tags_i = art_tags[i].tolist() if isinstance(art_tags[i], np.ndarray) else art_tags[i]
        key = (tuple(tags_i), title_ids[i])
        row = vectors_of.get(key)
        if row is None:
            row = vectors_of[key] = np.array([emb.title_vector(title_ids[i]), emb.artwork_vector(tags_i),
                                              emb.lift_vector(tags_i, title_ids[i]), emb.artwork_profile(tags_i)]).reshape(4, emb.rank)
        vectors[i] = row
    out = np.hstack([mem, ctx, static, pri, match, seg, embedding_block(factors, vectors)]).astype(np.float32)
    assert out.shape[1] == N_FEATURES
    return out


# ---------------------------------------------------------------------------------------
# Columnar entry point: many impressions' candidate rows at once, for the features job.
# The same arithmetic as feature_matrix (tests/unit/test_feature_spec_columnar.py compares
# both bit for bit): blocks are reused, per-row dict look-ups become one sorted-key search.
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Ragged:
    """A list column flattened: row ``i`` holds ``values[offsets[i]:offsets[i + 1]]``.

    ``offsets`` is [n + 1] int64; ``values`` a numpy array or a pyarrow array (strings stay
    in Arrow, so encoding them costs no Python object per element).
    """

    offsets: np.ndarray
    values: Any

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @classmethod
    def of(cls, column: Any) -> Ragged:
        """From a Ragged, a pyarrow list array (null = empty) or a sequence of sequences (None = empty)."""
        if isinstance(column, Ragged):
            return column
        import pyarrow as pa
        import pyarrow.compute as pc

        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        if not isinstance(column, pa.Array):
            column = pa.array([None if v is None else (v.tolist() if isinstance(v, np.ndarray) else list(v)) for v in column])
        if pa.types.is_null(column.type):  # built from no rows or only None
            return cls(np.zeros(len(column) + 1, np.int64), pa.nulls(0))
        lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False).astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        return cls(offsets, pc.list_flatten(column))


MAX_PACKED_ROWS = (2**31 - 1) // FEATURE_ROW_BYTES
"""Rows one binary array can hold (its int32 offsets address at most 2 GiB)."""


def pack_rows(matrix: np.ndarray) -> Any:
    """A float32 matrix [n, N_FEATURES] as a pyarrow binary array, one value per row (the
    training table's ``features`` column; no copy beyond the little-endian float32 view).

    Binary, not a list of floats: Parquet writes a list element by element with its
    repetition levels, a binary value as one run of bytes. At 1M impressions (6.4M rows) the
    features job's stage that computes and writes them fell from 52-53 s to 37 s on two cores
    (docs/benchmarks.md, "Training rows as binary")."""
    import pyarrow as pa

    matrix = np.ascontiguousarray(matrix, dtype=FEATURE_ROW_DTYPE)
    if matrix.ndim != 2 or matrix.shape[1] != N_FEATURES:
        raise ValueError(f"feature rows must be [n, {N_FEATURES}], got {matrix.shape}")
    n = matrix.shape[0]
    if n > MAX_PACKED_ROWS:
        raise ValueError(f"{n} feature rows are too many for one binary array (at most {MAX_PACKED_ROWS}); pack them in slices")
    offsets = np.arange(0, (n + 1) * FEATURE_ROW_BYTES, FEATURE_ROW_BYTES, dtype=np.int32)
    return pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(matrix)])


def unpack_rows(column: Any) -> np.ndarray:
    """The float32 matrix [n, N_FEATURES] of a binary ``features`` column (:func:`pack_rows`).

    Refuses null rows and rows of another width (a table written by another spec version). A
    chunked column is read chunk by chunk: a binary array holds at most 2 GiB, so a large
    partition reads as several chunks that must not be combined."""
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        if column.num_chunks == 1:
            return unpack_rows(column.chunk(0))
        parts = [unpack_rows(chunk) for chunk in column.chunks]
        return np.concatenate(parts) if parts else np.zeros((0, N_FEATURES), np.float32)
    if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        raise TypeError(f"features column must be binary, got {column.type}")
    if column.null_count:
        raise ValueError(f"features column has {column.null_count} null rows")
    offset_type = np.int64 if pa.types.is_large_binary(column.type) else np.int32
    offsets = np.frombuffer(column.buffers()[1], dtype=offset_type)[column.offset: column.offset + len(column) + 1]
    if len(column) == 0:
        return np.zeros((0, N_FEATURES), np.float32)
    lengths = np.diff(offsets)
    if np.any(lengths != FEATURE_ROW_BYTES):
        bad = int(lengths[lengths != FEATURE_ROW_BYTES][0])
        raise ValueError(f"feature rows must have {N_FEATURES} values ({FEATURE_ROW_BYTES} bytes), found one of {bad} bytes")
    data = np.frombuffer(column.buffers()[2], dtype=np.uint8)[offsets[0]: offsets[-1]]
    return data.view(FEATURE_ROW_DTYPE).reshape(-1, N_FEATURES).astype(np.float32)


def float_column(values: Any) -> np.ndarray:
    """float64 numpy view of a numeric column (pyarrow nulls become NaN)."""
    if getattr(values, "null_count", 0) == len(values) and hasattr(values, "type"):  # pyarrow, all null
        return np.full(len(values), np.nan)
    if hasattr(values, "to_numpy") and not isinstance(values, np.ndarray):
        try:
            return np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float64)
        except TypeError:  # pandas
            return np.asarray(values.to_numpy(), dtype=np.float64)
    return np.asarray(values, dtype=np.float64)


class _Keys:
    """The strings an artwork-side look-up can ask a member for, numbered 0..K-1."""

    def __init__(self, strings: set[str]):
        import pyarrow as pa

        self.names = sorted(strings)
        self.index = {s: i for i, s in enumerate(self.names)}
        self.arrow = pa.array(self.names, pa.string())

    def __len__(self) -> int:
        return len(self.names)

    def ids(self, strings: Any) -> np.ndarray:
        """Key id of each string, -1 for strings no look-up asks for."""
        import pyarrow as pa
        import pyarrow.compute as pc

        if not isinstance(strings, (pa.Array, pa.ChunkedArray)):
            strings = pa.array(strings.tolist() if isinstance(strings, np.ndarray) else list(strings), pa.string())
        if len(strings) == 0 or strings.null_count == len(strings):
            return np.full(len(strings), -1, np.int64)
        found = pc.index_in(strings, value_set=self.arrow)
        return pc.fill_null(found, -1).to_numpy(zero_copy_only=False).astype(np.int64)

    def matrix(self, rows: Sequence[Sequence[str]]) -> tuple[np.ndarray, np.ndarray]:
        """([len(rows), width] key ids padded with -1, [len(rows)] count) of string lists, order kept."""
        width = max([len(r) for r in rows] + [1])
        out = np.full((len(rows), width), -1, dtype=np.int64)
        for i, r in enumerate(rows):
            out[i, :len(r)] = [self.index[s] for s in r]
        return out, np.array([len(r) for r in rows], dtype=np.int64)


class CatalogBlocks:
    """Artworks and titles encoded once for :func:`columnar_feature_matrix` (one day's vocabulary).

    ``art_tags[a]`` / ``art_is_default[a]`` describe artwork row ``a`` and ``title_genres[t]``
    title row ``t``; callers add a row of no tags / no genres for ids the catalog lacks, as
    the job's left joins do. Per artwork it holds :func:`artwork_static` and the key ids of
    its cast tags, of the ``genre:<value>`` of its other ``key:value`` tags and of all its
    tags (responses), each in tag order with repeats kept, as :func:`match_row` and
    :func:`response_row` iterate them.
    """

    def __init__(self, art_tags: Sequence[Sequence[str]], art_is_default: Sequence[Any],
                 title_genres: Sequence[Sequence[str]], vocabulary: Vocabulary | None = None,
                 title_ids: Sequence[str | None] | None = None):
        self.vocabulary = vocabulary or Vocabulary()
        tags = [[str(t) for t in (ts if ts is not None else ())] for ts in art_tags]
        genres = [[str(g) for g in (gs if gs is not None else ())] for gs in title_genres]
        cast = [[t for t in ts if t.startswith(CAST_PREFIX)] for ts in tags]
        tag_genre = [[GENRE_PREFIX + t.split(":", 1)[1] for t in ts if ":" in t and not t.startswith(CAST_PREFIX)] for ts in tags]
        title_keys = [[GENRE_PREFIX + g for g in gs] for gs in genres]
        vocab_keys = [GENRE_PREFIX + g for g in self.vocabulary.genres]
        self.keys = _Keys({s for rows in (tags, tag_genre, title_keys) for r in rows for s in r} | set(vocab_keys))
        self.static = np.array([artwork_static(ts, bool(d), self.vocabulary) for ts, d in zip(tags, art_is_default, strict=True)],
                               dtype=np.float32).reshape(len(tags), len(ARTWORK_STATIC_FEATURES))
        self.cast, self.cast_count = self.keys.matrix(cast)
        self.tag_genre, _ = self.keys.matrix(tag_genre)
        self.tags, _ = self.keys.matrix(tags)
        self.title_genres, self.title_genre_count = self.keys.matrix(title_keys)
        self.vocab_genres = np.array([self.keys.index[k] for k in vocab_keys] + [-1] * (N_GENRE_SLOTS - len(vocab_keys)),
                                     dtype=np.int64)
        # embeddings: each artwork's vector and profile, each title's vector and mean artwork vector
        emb = self.vocabulary.embeddings
        self.rank = emb.rank
        ids = list(title_ids) if title_ids is not None else [None] * len(genres)
        self.title_vectors = np.array([emb.title_vector(t) for t in ids], dtype=np.float64).reshape(len(ids), emb.rank)
        self.title_art_mean = np.array([emb.title_artwork_mean(t) for t in ids], dtype=np.float64).reshape(len(ids), emb.rank)
        self.art_vectors = np.array([emb.artwork_vector(ts) for ts in tags], dtype=np.float64).reshape(len(tags), emb.rank)
        self.art_profiles = np.array([emb.artwork_profile(ts) for ts in tags], dtype=np.float64).reshape(len(tags), emb.rank)


class _MemberTable:
    """One value per (member row, key): sorted codes ``row * K + key`` and their values."""

    def __init__(self, codes: np.ndarray, values: list[np.ndarray], n_keys: int):
        self.codes, self.values, self.n_keys = codes, values, n_keys

    @classmethod
    def build(cls, keys: _Keys, tags: Ragged, values: list[Ragged], keep=None) -> _MemberTable:
        """From a member's (tag, value...) lists: entries ``keep`` passes, the last of a repeated tag winning."""
        for v in values:
            if not np.array_equal(v.lengths, tags.lengths):
                raise ValueError("a member's tag and value lists differ in length")
        rows = np.repeat(np.arange(len(tags), dtype=np.int64), tags.lengths)
        key = keys.ids(tags.values)
        vals = [float_column(v.values) for v in values]
        ok = key >= 0
        if keep is not None:
            ok &= keep(*vals)
        codes = rows[ok] * (len(keys) + 1) + key[ok]
        vals = [v[ok] for v in vals]
        # np.unique keeps the first occurrence: searching the reversed entries keeps the last
        unique, first = np.unique(codes[::-1], return_index=True)
        last = len(codes) - 1 - first
        return cls(unique, [v[last] for v in vals], len(keys) + 1)

    def gather(self, rows: np.ndarray, key_ids: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """(found [R, W], values [R, W] each, 0.0 where not found) for member ``rows`` [R] and keys [R, W] (-1: none)."""
        codes = rows[:, None] * self.n_keys + key_ids
        if len(self.codes) == 0:
            found = np.zeros(codes.shape, dtype=bool)
            return found, [np.zeros(codes.shape) for _ in self.values]
        at = np.minimum(np.searchsorted(self.codes, codes), len(self.codes) - 1)
        found = (self.codes[at] == codes) & (key_ids >= 0)
        return found, [np.where(found, v[at], 0.0) for v in self.values]


def _sum_in_order(values: np.ndarray) -> np.ndarray:
    """Row sums added left to right from 0 as Python's ``sum`` does (zeros in padding change nothing): [R]."""
    out = np.zeros(values.shape[0], dtype=np.float64)
    for j in range(values.shape[1]):
        out += values[:, j]
    return out


def _max_where(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Row max over ``mask``, 0.0 for rows where nothing is masked: [R]."""
    if values.shape[1] == 0:
        return np.zeros(values.shape[0])
    return np.where(mask.any(axis=1), np.where(mask, values, -np.inf).max(axis=1), 0.0)


def columnar_feature_matrix(blocks: CatalogBlocks, members: Mapping[str, Any], row_member: np.ndarray,
                            row_artwork: np.ndarray, row_title: np.ndarray, priors: Mapping[str, Any]) -> np.ndarray:
    """The float32 matrix [R, N_FEATURES] of R candidate rows, equal to :func:`feature_matrix` of the same rows.

    Parameters
    ----------
    blocks : the catalog and vocabulary (:class:`CatalogBlocks`).
    members : [M] member-and-context inputs: ``member_known``, ``member_is_kids``,
        ``member_log_plays_28d``, ``member_days_since_last_play``, the six member list columns
        of :data:`INPUT_COLUMNS` (:meth:`Ragged.of` forms; None = empty) and the five context
        columns. One row per impression in the features job: member work happens once per row.
    row_member, row_artwork, row_title : [R] the member row, artwork row and title row of every
        candidate row.
    priors : [R] ``art_prior_mean``, ``art_prior_n``, ``art_prior_mean_seg``, ``title_prior_mean``.
    """
    row_member = np.asarray(row_member, dtype=np.int64)
    row_artwork = np.asarray(row_artwork, dtype=np.int64)
    row_title = np.asarray(row_title, dtype=np.int64)
    n_members = len(members["member_known"])
    keys = blocks.keys
    affinity = _MemberTable.build(keys, Ragged.of(members["affinity_tags"]), [Ragged.of(members["affinity_values"])])
    responses = _MemberTable.build(keys, Ragged.of(members["response_tags"]),
                                   [Ragged.of(members["response_values"]), Ragged.of(members["response_n"])],
                                   keep=lambda _, n: n > 0)
    member_rows = np.arange(n_members, dtype=np.int64)
    _, (genre_aff,) = affinity.gather(member_rows, np.broadcast_to(blocks.vocab_genres, (n_members, N_GENRE_SLOTS)))
    mem = member_block(float_column(members["member_known"]), float_column(members["member_is_kids"]),
                       float_column(members["member_log_plays_28d"]), float_column(members["member_days_since_last_play"]), genre_aff)
    device = members["device"]
    device = device.to_numpy(zero_copy_only=False) if hasattr(device, "to_numpy") and not isinstance(device, np.ndarray) else device
    ctx = context_block(device, float_column(members["local_hour"]), float_column(members["day_of_week"]),
                        float_column(members["page_row"]), float_column(members["position"]))

    n = len(row_member)
    out = np.empty((n, N_FEATURES), dtype=np.float32)
    c = 0
    for block in (mem[row_member], ctx[row_member], blocks.static[row_artwork],
                  prior_block(float_column(priors["art_prior_mean"]), float_column(priors["art_prior_n"]),
                              float_column(priors["title_prior_mean"]))):
        out[:, c:c + block.shape[1]] = block
        c += block.shape[1]
    match = np.zeros((n, 7), dtype=np.float64)
    cast_ids = blocks.cast[row_artwork]
    _, (cast,) = affinity.gather(row_member, cast_ids)
    match[:, 0] = _sum_in_order(cast)
    real = np.arange(cast_ids.shape[1])[None, :] < blocks.cast_count[row_artwork][:, None]
    match[:, 1] = _max_where(cast, real)
    _, (tag_genre,) = affinity.gather(row_member, blocks.tag_genre[row_artwork])
    match[:, 2] = _sum_in_order(tag_genre)
    _, (genre,) = affinity.gather(row_member, blocks.title_genres[row_title])
    count = blocks.title_genre_count[row_title]
    with np.errstate(invalid="ignore", divide="ignore"):
        match[:, 3] = np.where(count > 0, _sum_in_order(genre) / np.maximum(count, 1), 0.0)
    hit, (lift, imps) = responses.gather(row_member, blocks.tags[row_artwork])
    match[:, 4] = _sum_in_order(lift)
    match[:, 5] = _max_where(lift, hit)
    match[:, 6] = np.log1p(_sum_in_order(imps))
    out[:, c:c + 7] = match
    out[:, c + 7] = np.asarray(float_column(priors["art_prior_mean_seg"]), dtype=np.float32)
    c += 8
    factors = member_factor_matrix(members["member_factors"], blocks.rank)[row_member]
    arts = blocks.art_vectors[row_artwork]
    # the artwork's vector minus its title's mean, as Embeddings.lift_vector
    out[:, c:] = embedding_block(factors, np.stack([blocks.title_vectors[row_title], arts, arts - blocks.title_art_mean[row_title],
                                                    blocks.art_profiles[row_artwork]], axis=1))
    assert c + len(EMBEDDING_FEATURES) == N_FEATURES
    return out
