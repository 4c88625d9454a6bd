"""Feature assembly for one page: the float32 matrix keyart.feature_spec.feature_matrix would build.

A page is a flat array of candidate rows (artwork rows of an :class:`ArtworkTable`)
grouped by title with ``offsets`` ([T + 1], as in :mod:`keyart.policy`). Per-artwork
blocks come from the table's caches; only the member x artwork match, the context and
the title prior mean depend on the request, and they are numpy gathers. Sums run column
by column in tag order so every value is bit-identical to :func:`keyart.feature_spec.match_row`
(tests/serving/test_page.py checks the whole matrix against feature_matrix).
"""

from __future__ import annotations

import functools

import numpy as np

from keyart import feature_spec
from keyart.serving.tables import ArtworkTable, Member

N_MEMBER = len(feature_spec.MEMBER_FEATURES)
N_CONTEXT = len(feature_spec.CONTEXT_FEATURES)
N_STATIC = len(feature_spec.ARTWORK_STATIC_FEATURES)
C_MEMBER = 0
C_CONTEXT = C_MEMBER + N_MEMBER
C_STATIC = C_CONTEXT + N_CONTEXT
C_PRIOR = C_STATIC + N_STATIC
C_MATCH = C_PRIOR + 3
C_RESP = C_MATCH + 4
C_SEG = C_RESP + 3
C_EMB = C_SEG + 1
C_PAGE_ROW = C_CONTEXT + feature_spec.CONTEXT_FEATURES.index("ctx_page_row")
C_POSITION = C_CONTEXT + feature_spec.CONTEXT_FEATURES.index("ctx_position")
assert C_EMB + len(feature_spec.EMBEDDING_FEATURES) == feature_spec.N_FEATURES
assert feature_spec.FEATURE_NAMES[C_RESP] == "resp_lift_sum" and feature_spec.FEATURE_NAMES[C_SEG] == "art_prior_mean_seg"


def _sequential_sum(values: np.ndarray) -> np.ndarray:
    """Row sums added left to right (as Python's sum does), not pairwise: [R]."""
    out = values[:, 0].copy()
    for j in range(1, values.shape[1]):
        out += values[:, j]
    return out


@functools.lru_cache(maxsize=1024)
def _context_row(device: str, local_hour: int, day_of_week: int) -> np.ndarray:
    """:func:`keyart.feature_spec.context_block` of one (device, hour, day), placement 0:
    [N_CONTEXT] float32 (read-only: it is shared)."""
    row = feature_spec.context_block([device], [local_hour], [day_of_week], [0], [0])[0]
    row.flags.writeable = False
    return row


def affinity_vector(table: ArtworkTable, member: Member) -> np.ndarray:
    """The member's affinity per vocabulary column, plus a trailing constant 0: [V + 1]."""
    aff = np.zeros(table.n_vocab + 1, dtype=np.float64)
    aff[member.aff_cols] = member.aff_vals
    return aff


def page_matrix(table: ArtworkTable, member: Member, device: str, local_hour: int, day_of_week: int,
                page_row: np.ndarray, position: np.ndarray, rows: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Feature matrix [R, N_FEATURES] float32 of a page.

    Parameters
    ----------
    table, member : the bundle's artwork table and the member's cached inputs.
    device, local_hour, day_of_week : request context.
    page_row, position : [T] placement of every title on the page.
    rows : [R] artwork row of every candidate; ``offsets`` [T + 1] groups them by title.
    """
    n_titles = len(offsets) - 1
    sizes = np.diff(offsets)
    gid = np.repeat(np.arange(n_titles), sizes)
    x = np.empty((len(rows), feature_spec.N_FEATURES), dtype=np.float32)
    x[:, C_MEMBER:C_CONTEXT] = member.block
    # device, hour and day are the page's: one context row, then each title's placement
    x[:, C_CONTEXT:C_STATIC] = _context_row(device, local_hour, day_of_week)
    x[:, C_PAGE_ROW] = page_row[gid]
    x[:, C_POSITION] = position[gid]
    x[:, C_STATIC:C_PRIOR] = table.static[rows]

    mean = table.prior_mean[rows]
    # the title's mean over the page's candidates, summed in row order like prior_inputs
    title_mean = (np.bincount(gid, weights=mean, minlength=n_titles) / np.bincount(gid, minlength=n_titles))[gid]
    x[:, C_PRIOR] = mean
    x[:, C_PRIOR + 1] = table.prior_log_n[rows]
    x[:, C_PRIOR + 2] = mean - title_mean

    aff = affinity_vector(table, member)
    cast = aff[table.cast_idx[rows]]
    x[:, C_MATCH] = _sequential_sum(cast)
    has_cast = table.cast_count[rows] > 0
    width = np.arange(cast.shape[1])
    real = width[None, :] < table.cast_count[rows][:, None]
    x[:, C_MATCH + 1] = np.where(has_cast, np.where(real, cast, -np.inf).max(axis=1), 0.0)
    x[:, C_MATCH + 2] = _sequential_sum(aff[table.tag_genre_idx[rows]])
    n_genres = table.genre_count[rows]
    genre_sum = _sequential_sum(aff[table.genre_idx[rows]])
    x[:, C_MATCH + 3] = np.where(n_genres > 0, genre_sum / np.maximum(n_genres, 1), 0.0)
    # responses: the member's lift and impressions per response column (padding column 0, absent)
    lift = np.zeros(table.n_resp + 1, dtype=np.float64)
    imps = np.zeros(table.n_resp + 1, dtype=np.float64)
    lift[member.resp_cols] = member.resp_vals
    imps[member.resp_cols] = member.resp_n
    idx = table.resp_idx[rows]
    x[:, C_RESP] = _sequential_sum(lift[idx])
    hit = (np.arange(idx.shape[1])[None, :] < table.resp_count[rows][:, None]) & (imps[idx] > 0)
    x[:, C_RESP + 1] = np.where(hit.any(axis=1), np.where(hit, lift[idx], -np.inf).max(axis=1), 0.0)
    x[:, C_RESP + 2] = np.log1p(_sequential_sum(imps[idx]))
    x[:, C_SEG] = table.prior_mean_seg[member.segment][rows]
    # embeddings: 0 without factors (as feature_matrix's dot products of zeros)
    if member.factors is None or table.emb_vectors.shape[2] == 0:
        x[:, C_EMB:] = 0.0
    else:
        x[:, C_EMB:] = feature_spec.embedding_block(member.factors, np.take(table.emb_vectors, rows, axis=0))
    return x
