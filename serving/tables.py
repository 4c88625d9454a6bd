"""In-memory tables serving keeps per bundle: artworks (with cached feature blocks) and members.

Everything that does not depend on the request is computed once at bundle load: the
tag-derived artwork block (:func:`keyart.feature_spec.artwork_static` with the bundle's
vocabulary), the prior inputs
(:func:`keyart.feature_spec.prior_inputs` over the catalog), the member block of every member
and index arrays that turn member x artwork matching into numpy gathers. The page
assembly in :mod:`keyart.serving.page` reproduces :func:`keyart.feature_spec.feature_matrix`
exactly from these caches.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from keyart import catalog, feature_spec

SEGMENTS = (feature_spec.member_segment(0), feature_spec.member_segment(1))


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a Parquet file, a folder of Parquet files, or JSON-lines files."""
    path = Path(path)
    if path.is_file() and path.suffix != ".jsonl":
        return pq.read_table(path).to_pylist()
    files = [path] if path.is_file() else sorted(path.glob("*.parquet")) or sorted(path.glob("*.jsonl"))
    rows: list[dict[str, Any]] = []
    for f in files:
        if f.suffix == ".parquet":
            rows.extend(pq.read_table(f).to_pylist())
        else:
            import orjson

            rows.extend(orjson.loads(line) for line in f.read_bytes().splitlines() if line.strip())
    return rows


def _padded(lists: Sequence[Sequence[int]], pad: int) -> np.ndarray:
    width = max((len(x) for x in lists), default=0) or 1
    out = np.full((len(lists), width), pad, dtype=np.int64)
    for i, x in enumerate(lists):
        out[i, : len(x)] = x
    return out


@dataclass
class ArtworkTable:
    """Active artworks grouped by title, with every per-artwork feature cached.

    Attributes (N artworks, V tags in the matching vocabulary)
    ----------------------------------------------------------
    artwork_ids, index : ids and id -> row
    title_ids, title_index, title_rows : titles, id -> title index, rows of each title
    default_row : [n_titles] row of each title's default artwork (its first if none)
    static : [N, len(ARTWORK_STATIC_FEATURES)] float32 artwork_static blocks
    prior_mean, prior_log_n : [N] float64 segment-'all' prior inputs
    prior_mean_seg : segment -> [N] float64 ``art_prior_mean_seg``
    policy_alpha, policy_beta, policy_n : [N] the segment-'all' Beta posterior for the policy
    model_mean : [N] the bundle model's mean score on each artwork (priors.parquet ``model_mean``,
        NaN where unknown), read by the ``residual`` prior blend (keyart.policy.blend_scores)
    vocab : tag -> column of the member affinity vector (column V is a constant 0)
    cast_idx, tag_genre_idx, genre_idx : [N, *] padded vocabulary columns for match_row
    cast_count, genre_count : [N] number of real entries in cast_idx / genre_idx
    vocabulary : the bundle's feature vocabulary (tag and genre columns)
    resp_vocab : artwork tag -> column of the member response vectors (column W is padding)
    resp_idx, resp_count : [N, *] each artwork's tags as response columns, in tag order; [N] how many
    emb_vectors : [N, 4, k] float64 each artwork's title vector, artwork vector, artwork minus its
        title's mean artwork vector and catalog genre profile (:class:`keyart.feature_spec.Embeddings`, k = its rank)
    """

    artwork_ids: list[str]
    index: dict[str, int]
    title_of: np.ndarray
    title_ids: list[str]
    title_index: dict[str, int]
    title_rows: list[np.ndarray]
    default_row: np.ndarray
    static: np.ndarray
    prior_mean: np.ndarray
    prior_log_n: np.ndarray
    prior_mean_seg: dict[str, np.ndarray]
    policy_alpha: np.ndarray
    policy_beta: np.ndarray
    policy_n: np.ndarray
    vocab: dict[str, int]
    cast_idx: np.ndarray
    cast_count: np.ndarray
    tag_genre_idx: np.ndarray
    genre_idx: np.ndarray
    genre_count: np.ndarray
    vocabulary: feature_spec.Vocabulary
    resp_vocab: dict[str, int]
    resp_idx: np.ndarray
    resp_count: np.ndarray
    emb_vectors: np.ndarray = field(default_factory=lambda: np.zeros((0, 4, 0)))
    model_mean: np.ndarray | None = None
    # [N] first and last day (date ordinals, keyart.catalog) each artwork may be shown. A bundle
    # carries the artworks that start within its export horizon and a server runs for days, so
    # activity is resolved per request.
    active_from_day: np.ndarray | None = None
    active_to_day: np.ndarray | None = None

    def active_rows(self, title: int, day: dt.date) -> np.ndarray:
        """Rows of ``title`` that may be shown on ``day``."""
        rows = self.title_rows[title]
        if self.active_from_day is None or self.active_to_day is None:
            return rows
        return rows[catalog.active_on(self.active_from_day[rows], self.active_to_day[rows], day.toordinal())]

    def is_active(self, rows: np.ndarray, day: dt.date) -> np.ndarray:
        """Which of ``rows`` may be shown on ``day``."""
        if self.active_from_day is None or self.active_to_day is None:
            return np.ones(len(rows), dtype=bool)
        return catalog.active_on(self.active_from_day[rows], self.active_to_day[rows], day.toordinal())

    @property
    def n_vocab(self) -> int:
        return len(self.vocab)

    @property
    def n_resp(self) -> int:
        return len(self.resp_vocab)

    @classmethod
    def build(cls, artworks: Iterable[Mapping[str, Any]], priors: Iterable[Mapping[str, Any]] = (),
              vocabulary: feature_spec.Vocabulary | None = None) -> ArtworkTable:
        """From artwork rows (artwork_id, title_id, tags, is_default[, title_genres]), PRIORS rows
        and the bundle's vocabulary (None: empty, every tag hashed)."""
        vocabulary = vocabulary or feature_spec.Vocabulary()
        priors = list(priors)
        arts = sorted(artworks, key=lambda r: (str(r["title_id"]), str(r["artwork_id"])))
        ids = [str(a["artwork_id"]) for a in arts]
        if len(set(ids)) != len(ids):
            raise ValueError("artworks table has duplicate artwork ids")
        index = {a: i for i, a in enumerate(ids)}
        title_ids: list[str] = []
        title_index: dict[str, int] = {}
        title_of = np.empty(len(arts), dtype=np.int64)
        for i, a in enumerate(arts):
            tid = str(a["title_id"])
            if tid not in title_index:
                title_index[tid] = len(title_ids)
                title_ids.append(tid)
            title_of[i] = title_index[tid]
        title_rows = [np.flatnonzero(title_of == t) for t in range(len(title_ids))]
        default_row = np.array([
            next((int(r) for r in rows if arts[r].get("is_default")), int(rows[0])) for rows in title_rows
        ], dtype=np.int64)
        tags = [list(a.get("tags") or ()) for a in arts]
        genres = [list(a.get("title_genres") or ()) for a in arts]
        static = (np.vstack([feature_spec.artwork_static(t, bool(a.get("is_default")), vocabulary)
                             for t, a in zip(tags, arts, strict=True)])
                  if arts else np.zeros((0, len(feature_spec.ARTWORK_STATIC_FEATURES)), np.float32))

        # priors: NaN where missing, exactly as the features job hands them to prior_inputs
        post: dict[tuple[str, str], tuple[float, float, float]] = {
            (str(p["artwork_id"]), str(p["segment"])): (float(p["alpha"]), float(p["beta"]), float(p["n_impressions"]))
            for p in priors
        }
        nan3 = (np.nan, np.nan, np.nan)
        means = {str(p["artwork_id"]): _float_or_nan(p.get("model_mean")) for p in priors
                 if str(p["segment"]) == feature_spec.SEGMENT_ALL}
        all_p = np.array([post.get((a, feature_spec.SEGMENT_ALL), nan3) for a in ids], dtype=np.float64).reshape(-1, 3)
        seg_mean: dict[str, np.ndarray] = {}
        inputs: dict[str, np.ndarray] = {}
        for seg in SEGMENTS:
            seg_p = np.array([post.get((a, seg), nan3) for a in ids], dtype=np.float64).reshape(-1, 3)
            inputs = feature_spec.prior_inputs(all_p[:, 0], all_p[:, 1], all_p[:, 2], seg_p[:, 0], seg_p[:, 1], title_of)
            seg_mean[seg] = inputs["art_prior_mean_seg"]
        mean = inputs["art_prior_mean"] if ids else np.zeros(0)
        n = inputs["art_prior_n"] if ids else np.zeros(0)
        missing = ~(np.isfinite(all_p[:, 0]) & np.isfinite(all_p[:, 1])) | (all_p[:, 0] + all_p[:, 1] <= 0)
        alpha = np.where(missing, feature_spec.DEFAULT_PRIOR[0], all_p[:, 0])
        beta = np.where(missing, feature_spec.DEFAULT_PRIOR[1], all_p[:, 1])

        vocab: dict[str, int] = {}

        def col(tag: str) -> int:
            return vocab.setdefault(tag, len(vocab))

        cast = [[col(t) for t in ts if t.startswith(feature_spec.CAST_PREFIX)] for ts in tags]
        tag_genre = [[col(feature_spec.GENRE_PREFIX + t.split(":", 1)[1]) for t in ts
                      if ":" in t and not t.startswith(feature_spec.CAST_PREFIX)] for ts in tags]
        genre = [[col(feature_spec.GENRE_PREFIX + g) for g in gs] for gs in genres]
        pad = len(vocab)
        resp_vocab: dict[str, int] = {}
        resp = [[resp_vocab.setdefault(t, len(resp_vocab)) for t in ts] for ts in tags]
        emb = vocabulary.embeddings
        emb_vectors = np.array([(emb.title_vector(str(a["title_id"])), emb.artwork_vector(ts), emb.lift_vector(ts, str(a["title_id"])),
                                 emb.artwork_profile(ts))
                                for ts, a in zip(tags, arts, strict=True)], dtype=np.float64).reshape(len(arts), 4, emb.rank)
        return cls(
            artwork_ids=ids, index=index, title_of=title_of, title_ids=title_ids, title_index=title_index,
            title_rows=title_rows, default_row=default_row, static=static,
            prior_mean=np.asarray(mean, np.float64), prior_log_n=np.log1p(np.asarray(n, np.float64)),
            prior_mean_seg=seg_mean, policy_alpha=alpha, policy_beta=beta, policy_n=np.asarray(n, np.float64),
            vocab=vocab, cast_idx=_padded(cast, pad), cast_count=np.array([len(c) for c in cast], np.int64),
            tag_genre_idx=_padded(tag_genre, pad), genre_idx=_padded(genre, pad),
            genre_count=np.array([len(g) for g in genres], np.int64),
            vocabulary=vocabulary, resp_vocab=resp_vocab, resp_idx=_padded(resp, len(resp_vocab)),
            resp_count=np.array([len(r) for r in resp], np.int64), emb_vectors=emb_vectors,
            model_mean=np.array([means.get(a, np.nan) for a in ids], dtype=np.float64),
            active_from_day=catalog.ordinals((a.get("active_from") for a in arts), catalog.ALWAYS),
            active_to_day=catalog.ordinals((a.get("active_to") for a in arts), catalog.OPEN_ENDED),
        )


def _float_or_nan(value: Any) -> float:
    try:
        return float(value) if value is not None else np.nan
    except (TypeError, ValueError):
        return np.nan


def not_expired(row: Mapping[str, Any], day: dt.date) -> bool:
    """Whether a catalog artwork row may still be shown on ``day`` or later (retired rows are
    dropped at load; the per-request check is :meth:`ArtworkTable.active_rows`)."""
    frm = catalog.to_ordinal(row.get("active_from"), catalog.ALWAYS)
    to = catalog.to_ordinal(row.get("active_to"), catalog.OPEN_ENDED)
    return bool(catalog.active_between(np.array([frm]), np.array([to]), day.toordinal(), catalog.OPEN_ENDED)[0])


@dataclass(frozen=True)
class Member:
    """One member's request-independent inputs."""

    block: np.ndarray          # [len(MEMBER_FEATURES)] float32 member_block row
    segment: str
    aff_cols: np.ndarray       # vocabulary columns of the member's affinities
    aff_vals: np.ndarray       # their values (float64)
    resp_cols: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # response columns (n > 0)
    resp_vals: np.ndarray = field(default_factory=lambda: np.zeros(0))           # their lifts (float64)
    resp_n: np.ndarray = field(default_factory=lambda: np.zeros(0))              # their impressions
    factors: np.ndarray | None = None  # [k] float64 member vector: ALS factors, genre shares (None: unknown, or none)


def _list_entries(table: pa.Table, names: Sequence[str], types: Sequence[pa.DataType]) -> tuple[np.ndarray, list[pa.Array]]:
    """The elements of aligned list columns ``names`` as (row index [E], flat values per column),
    over the rows where every one of them is present (a row missing any has no entries). A
    column the table lacks counts as missing; lists of one row must have equal lengths."""
    n = table.num_rows
    cols = [table.column(c).combine_chunks().cast(pa.list_(t)) if c in table.column_names else pa.nulls(n, pa.list_(t))
            for c, t in zip(names, types, strict=True)]
    valid = [c.is_valid().to_numpy(zero_copy_only=False) for c in cols]
    present = np.logical_and.reduce(valid) if valid else np.ones(n, bool)
    lengths = [pc.fill_null(pc.list_value_length(c), 0).to_numpy().astype(np.int64) for c in cols]
    if any((ln != lengths[0])[present].any() for ln in lengths[1:]):
        raise ValueError(f"member rows whose {'/'.join(names)} lists differ in length")
    rows = np.repeat(np.arange(n), np.where(present, lengths[0], 0))
    flat = []
    for c, ok, ln in zip(cols, valid, lengths, strict=True):
        values = c.flatten()   # the elements of every non-null list, in row order
        keep = np.repeat(present[ok], ln[ok])
        flat.append(values.filter(pa.array(keep)) if not keep.all() else values)
    return rows, flat


def _last_wins(rows: np.ndarray, tags: pa.Array, *lookups: Mapping[str, int]) -> tuple[np.ndarray, ...]:
    """Per row, each distinct tag once in the order it first appears, with the position of its
    last occurrence (a dict built from the row's pairs): (rows, positions, then per lookup the
    tag's value there, -1 where it has none)."""
    encoded = pc.dictionary_encode(pc.fill_null(tags, "None"))
    names = encoded.dictionary.to_pylist()
    code = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    key = rows * max(len(names), 1) + code
    _, first = np.unique(key, return_index=True)
    _, last_rev = np.unique(key[::-1], return_index=True)
    last = len(key) - 1 - last_rev
    order = np.argsort(first, kind="stable")
    kept = code[last[order]]
    mapped = [np.array([lookup.get(t, -1) for t in names] + [-1], np.int64)[kept] for lookup in lookups]
    return (rows[first[order]], last[order], *mapped)


def _floats(a: pa.Array) -> np.ndarray:
    if a.null_count:
        raise ValueError("member rows with a null inside a value list")
    return a.to_numpy(zero_copy_only=False).astype(np.float64)


def _csr(n: int, rows: np.ndarray, *values: np.ndarray) -> tuple[np.ndarray, ...]:
    """Row pointers [n + 1] for entries already grouped by row, and the values."""
    return (np.r_[0, np.cumsum(np.bincount(rows, minlength=n))], *values)


class MemberTable:
    """The member snapshot shipped with the bundle, keyed by member_id.

    Built with Arrow from the snapshot's columns (a Table, or rows as dicts): each member's
    affinities and responses are slices of flat arrays, with the semantics of
    :func:`keyart.feature_spec.affinity_map` / :func:`~keyart.feature_spec.response_map`
    (the last value of a repeated tag wins; responses with impressions > 0)."""

    def __init__(self, rows: pa.Table | Sequence[Mapping[str, Any]], vocab: Mapping[str, int],
                 vocabulary: feature_spec.Vocabulary | None = None, resp_vocab: Mapping[str, int] | None = None):
        vocabulary = vocabulary or feature_spec.Vocabulary()
        resp_vocab = resp_vocab or {}
        table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(list(rows))
        n = table.num_rows

        def scalar(name: str, fill: float) -> np.ndarray:
            if name not in table.column_names:
                return np.full(n, fill)
            return pc.fill_null(table.column(name).cast(pa.float64()), fill).to_numpy()

        kids = scalar("member_is_kids", 0.0)
        # affinities: every tag in the matching vocabulary, and the genre columns of the block
        a_rows, (a_tags, a_vals) = _list_entries(table, ("affinity_tags", "affinity_values"), (pa.string(), pa.float64()))
        genre_slot = {feature_spec.GENRE_PREFIX + g: i for i, g in enumerate(vocabulary.genres)}
        a_rows, a_last, slot, col = _last_wins(a_rows, a_tags, genre_slot, vocab)
        a_vals = _floats(a_vals)[a_last]
        genres = np.zeros((n, feature_spec.N_GENRE_SLOTS))
        genres[a_rows[slot >= 0], slot[slot >= 0]] = a_vals[slot >= 0]
        self._block = feature_spec.member_block(
            np.ones(n), kids, scalar("member_log_plays_28d", np.nan), scalar("member_days_since_last_play", np.nan), genres,
        ) if n else np.zeros((0, len(feature_spec.MEMBER_FEATURES)), np.float32)
        known = col >= 0
        self._aff = _csr(n, a_rows[known], col[known], a_vals[known])
        # responses with impressions > 0, in the response vocabulary
        r_rows, (r_tags, r_vals, r_n) = _list_entries(table, ("response_tags", "response_values", "response_n"),
                                                      (pa.string(), pa.float64(), pa.float64()))
        r_nv = _floats(r_n)
        seen = r_nv > 0
        r_rows, r_last, rcol = _last_wins(r_rows[seen], r_tags.filter(pa.array(seen)), resp_vocab)
        r_vals, r_nv = _floats(r_vals)[seen][r_last], r_nv[seen][r_last]
        shown = rcol >= 0
        self._resp = _csr(n, r_rows[shown], rcol[shown], r_vals[shown], r_nv[shown])
        self._kids = kids.astype(bool)
        # member vectors of the bundle's rank (a row of another length, or none, has none)
        rank = vocabulary.embeddings.rank
        if rank and "member_factors" in table.column_names:
            factors = table.column("member_factors").combine_chunks()
            self._has_factors = (pc.fill_null(pc.list_value_length(factors), 0).to_numpy(zero_copy_only=False) == rank)
            self._factors = feature_spec.member_factor_matrix(factors, rank)
        else:
            self._has_factors = np.zeros(n, bool)
            self._factors = np.zeros((n, rank))
        ids = table.column("member_id").to_pylist() if n else []
        self._rows: dict[str, int] = {str(m): i for i, m in enumerate(ids)}
        u = feature_spec.UNKNOWN_MEMBER
        self.unknown = Member(
            feature_spec.member_block([u["member_known"]], [u["member_is_kids"]], [u["member_log_plays_28d"]],
                                  [u["member_days_since_last_play"]])[0],
            feature_spec.member_segment(u["member_is_kids"]), np.zeros(0, np.int64), np.zeros(0, np.float64))

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, member_id: str) -> Member:
        """The member's inputs, or :data:`keyart.feature_spec.UNKNOWN_MEMBER`'s."""
        i = self._rows.get(member_id)
        if i is None:
            return self.unknown
        ptr, cols, vals = self._aff
        a, b = ptr[i], ptr[i + 1]
        rptr, rcols, rvals, rn = self._resp
        c, d = rptr[i], rptr[i + 1]
        return Member(self._block[i], feature_spec.member_segment(self._kids[i]), cols[a:b], vals[a:b],
                      rcols[c:d], rvals[c:d], rn[c:d], self._factors[i] if self._has_factors[i] else None)
