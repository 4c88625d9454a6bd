"""The one feature specification, shared by Spark (training rows), export and serving.

A model row is one (member, title, artwork, context). Its feature vector is built from
*feature inputs*: plain columns that the features job writes for training rows and that
serving assembles for a page. The functions here turn inputs into the float32 matrix, in
the fixed order of :data:`FEATURE_NAMES`; Spark calls :func:`feature_matrix` through
``mapInPandas`` and serving calls it (or its blocks, cached per artwork) directly, so the
arithmetic exists once.

Feature inputs (:data:`INPUT_COLUMNS`):

=========================== ======================================================
member_known                1 if the member has a feature snapshot, else 0
member_is_kids              1 for a kids profile
member_log_plays_28d        log1p(plays in the 28 days up to the snapshot)
member_days_since_last_play days from last play to the snapshot end (capped)
affinity_tags               member's tags: 'genre:<g>' and 'cast:<c>'
affinity_values             time-decayed share of minutes watched per tag, in [0, 1]
device, local_hour, day_of_week, page_row, position      request context
art_tags                    the artwork's tags ('cast:<c>', 'tone:<g>', flags)
art_is_default              1 if it is the title's default artwork
title_genres                the title's genres
art_prior_mean              posterior mean quality-play rate of the artwork (segment 'all')
art_prior_n                 its effective number of impressions
art_prior_mean_seg          posterior mean for the member's segment (falls back to 'all')
title_prior_mean            mean of art_prior_mean over the title's artworks
=========================== ======================================================
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# The data contract's devices, in the order of the ctx_device_* one-hot columns.
from keyart.contracts import DEVICES

FEATURE_SPEC_VERSION = "1"

TONES = (
    "action", "comedy", "drama", "romance", "thriller",
    "horror", "family", "animation", "documentary", "scifi",
)
FLAGS = ("closeup", "text_heavy", "group")
DAYS_SINCE_CAP = 365.0
SEGMENT_ALL = "all"
# Prior used where no posterior exists yet (first day, unseen title): Beta(1, 9), mean 0.1.
DEFAULT_PRIOR = (1.0, 9.0)


def member_segment(is_kids: int | bool) -> str:
    """The prior segment a member belongs to."""
    return "profile=kids" if is_kids else "profile=adult"


MEMBER_FEATURES = (
    "member_known",
    "member_is_kids",
    "member_log_plays_28d",
    "member_days_since_last_play",
)
CONTEXT_FEATURES = (
    *(f"ctx_device_{d}" for d in DEVICES),
    "ctx_hour_sin",
    "ctx_hour_cos",
    "ctx_is_weekend",
    "ctx_page_row",
    "ctx_position",
)
ARTWORK_FEATURES = (
    "art_is_default",
    "art_n_cast",
    *(f"art_flag_{f}" for f in FLAGS),
    *(f"art_tone_{t}" for t in TONES),
    "art_prior_mean",
    "art_prior_log_n",
    "art_prior_lift",
)
MATCH_FEATURES = (
    "match_cast_sum",
    "match_cast_max",
    "match_tone",
    "match_title_genre",
    "art_prior_mean_seg",
)
FEATURE_NAMES: tuple[str, ...] = MEMBER_FEATURES + CONTEXT_FEATURES + ARTWORK_FEATURES + MATCH_FEATURES
N_FEATURES = len(FEATURE_NAMES)

INPUT_COLUMNS = (
    "member_known", "member_is_kids", "member_log_plays_28d", "member_days_since_last_play",
    "affinity_tags", "affinity_values",
    "device", "local_hour", "day_of_week", "page_row", "position",
    "art_tags", "art_is_default", "title_genres",
    "art_prior_mean", "art_prior_n", "art_prior_mean_seg", "title_prior_mean",
)

UNKNOWN_MEMBER = {
    "member_known": 0,
    "member_is_kids": 0,
    "member_log_plays_28d": 0.0,
    "member_days_since_last_play": DAYS_SINCE_CAP,
    "affinity_tags": [],
    "affinity_values": [],
}


def spec_dict() -> dict[str, Any]:
    """The specification as data: shipped in every bundle and checked by serving."""
    return {
        "version": FEATURE_SPEC_VERSION,
        "features": list(FEATURE_NAMES),
        "inputs": list(INPUT_COLUMNS),
        "tones": list(TONES),
        "flags": list(FLAGS),
        "devices": list(DEVICES),
        "days_since_cap": DAYS_SINCE_CAP,
    }


# ---------------------------------------------------------------------------------------
# Blocks. Each returns float32 arrays; rows are aligned across blocks.
# ---------------------------------------------------------------------------------------

def member_block(known, is_kids, log_plays_28d, days_since_last_play) -> np.ndarray:
    """[n, len(MEMBER_FEATURES)] from per-row member scalars."""
    days = np.minimum(np.nan_to_num(np.asarray(days_since_last_play, dtype=np.float64), nan=DAYS_SINCE_CAP), DAYS_SINCE_CAP)
    return np.column_stack([
        np.asarray(known, dtype=np.float64),
        np.asarray(is_kids, dtype=np.float64),
        np.nan_to_num(np.asarray(log_plays_28d, dtype=np.float64)),
        days,
    ]).astype(np.float32)


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


def artwork_static(art_tags: Sequence[str], is_default: bool | int) -> np.ndarray:
    """Tag-derived artwork features (no priors) for one artwork: [2 + len(FLAGS) + len(TONES)]."""
    tags = set(art_tags)
    n_cast = sum(1 for t in tags if t.startswith("cast:"))
    flags = [1.0 if f in tags else 0.0 for f in FLAGS]
    tones = [1.0 if f"tone:{t}" in tags else 0.0 for t in TONES]
    return np.asarray([float(bool(is_default)), float(n_cast), *flags, *tones], dtype=np.float32)


def prior_block(art_prior_mean, art_prior_n, title_prior_mean) -> np.ndarray:
    """[n, 3]: prior mean, log1p(effective n), lift of the artwork over its title's mean."""
    mean = np.asarray(art_prior_mean, dtype=np.float64)
    title = np.asarray(title_prior_mean, dtype=np.float64)
    return np.column_stack([mean, np.log1p(np.asarray(art_prior_n, dtype=np.float64)), mean - title]).astype(np.float32)


def match_row(affinity: Mapping[str, float], art_tags: Sequence[str], title_genres: Sequence[str]) -> tuple[float, float, float, float]:
    """Member x artwork match for one row: (cast sum, cast max, tone, title genre)."""
    cast = [affinity.get(t, 0.0) for t in art_tags if t.startswith("cast:")]
    tone = sum(affinity.get("genre:" + t[5:], 0.0) for t in art_tags if t.startswith("tone:"))
    genre = sum(affinity.get("genre:" + g, 0.0) for g in title_genres) / len(title_genres) if len(title_genres) else 0.0
    return (float(sum(cast)), float(max(cast)) if cast else 0.0, float(tone), float(genre))


def prior_inputs(all_alpha, all_beta, all_n, seg_alpha, seg_beta, title_ids) -> dict[str, np.ndarray]:
    """The four prior feature inputs for candidate rows, from their Beta posteriors.

    ``all_*`` are the segment-'all' posterior of each row's artwork (NaN where none exists:
    :data:`DEFAULT_PRIOR` is used), ``seg_*`` the posterior of the member's segment (NaN
    where the segment has none: the 'all' mean is used). ``title_ids`` groups rows so
    ``title_prior_mean`` is the mean of ``art_prior_mean`` over each title's rows; callers
    pass one row per active artwork of the title (a page's candidates, or the catalog).
    """
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
    titles = np.asarray(title_ids, dtype=object)
    _, inverse = np.unique(titles, return_inverse=True)
    title_mean = (np.bincount(inverse, weights=mean) / np.bincount(inverse))[inverse] if len(mean) else mean
    return {
        "art_prior_mean": mean,
        "art_prior_n": n,
        "art_prior_mean_seg": seg_mean,
        "title_prior_mean": title_mean,
    }


def affinity_map(tags: Sequence[str] | None, values: Sequence[float] | None) -> dict[str, float]:
    """Tag -> affinity (the last value of a repeated tag wins)."""
    if tags is None or values is None:
        return {}
    if isinstance(tags, np.ndarray) and isinstance(values, np.ndarray) and values.dtype.kind == "f":
        # Arrow/pandas cells: tolist() converts in C to str and float (iterating would box each element)
        return dict(zip(tags.tolist(), values.tolist(), strict=True))
    return dict(zip(map(str, tags), map(float, values), strict=True))


def feature_matrix(inputs: Mapping[str, Any]) -> np.ndarray:
    """The float32 feature matrix [n, N_FEATURES] for columnar feature inputs.

    ``inputs`` maps every name in :data:`INPUT_COLUMNS` to a sequence of length n
    (a pandas DataFrame works). Missing prior values (NaN) must be filled by the caller.
    """
    missing = [c for c in INPUT_COLUMNS if c not in inputs]
    if missing:
        raise KeyError(f"feature inputs lack columns {missing}")
    n = len(inputs["art_tags"])
    mem = member_block(inputs["member_known"], inputs["member_is_kids"], inputs["member_log_plays_28d"], inputs["member_days_since_last_play"])
    ctx = context_block(inputs["device"], inputs["local_hour"], inputs["day_of_week"], inputs["page_row"], inputs["position"])
    art_tags = list(inputs["art_tags"])
    is_default = list(inputs["art_is_default"])
    static_of: dict[tuple, np.ndarray] = {}  # a day's rows repeat a few thousand artworks
    static = np.zeros((n, 2 + len(FLAGS) + len(TONES)), np.float32)
    for i in range(n):
        tags_i = art_tags[i]
        key = (tuple(tags_i.tolist() if isinstance(tags_i, np.ndarray) else tags_i), bool(is_default[i]))
        row = static_of.get(key)
        if row is None:
            row = static_of[key] = artwork_static(key[0], key[1])
        static[i] = row
    pri = prior_block(inputs["art_prior_mean"], inputs["art_prior_n"], inputs["title_prior_mean"])
    aff_tags = list(inputs["affinity_tags"])
    aff_vals = list(inputs["affinity_values"])
    genres = list(inputs["title_genres"])
    match = np.zeros((n, 4), dtype=np.float32)
    for i in range(n):
        match[i] = match_row(affinity_map(aff_tags[i], aff_vals[i]), art_tags[i], genres[i] if genres[i] is not None else ())
    seg = np.asarray(inputs["art_prior_mean_seg"], dtype=np.float32).reshape(n, 1)
    out = np.hstack([mem, ctx, static, pri, match, seg]).astype(np.float32)
    assert out.shape[1] == N_FEATURES
    return out
