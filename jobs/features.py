"""features: the member feature snapshot of day D and the training rows of the impressions labelled on D.

    spark-submit jobs/features.py --ds 2026-03-01 [--lake LAKE] [--master URL]
    keyart job features --ds 2026-03-01

Reads ``clean/plays`` (``history_days`` back), ``members``, ``catalog/{titles,artworks}``,
``rewards/ds=D``, ``features/members/ds=X`` and the priors serving decided with for X = each
labelled impression's day - 1 (``priors/ds=X``, or after a day the priors task did not run the
newest partition before it: :func:`served_priors`). Writes ``features/members/ds=D/`` and
``features/training/ds=D/`` (columns in docs/architecture.md) and
``metrics/features/ds=D/metrics.json``.

Also writes the day's tag vocabulary, ``features/vocabulary/ds=D/vocabulary.json``
(:func:`keyart.feature_spec.learn_vocabulary`): the catalog's tags counted over its artworks
and its genres over its titles, the frequent ones in sticky slots (yesterday's slots kept),
the other tags hashed into buckets. It reads ``rewards`` ``response_days`` back as well.

Member snapshot as of the end of D: per member, from plays in the ``history_days`` ending
D, each play weighted by ``minutes_played * 0.5 ** (age_days / affinity_half_life_days)``;
a tag's affinity is the weighted share of minutes on titles carrying it (``genre:<g>``,
``cast:<c>``). Its responses come from the labelled impressions of the ``response_days``
ending D (rewards partitions up to D only, so a snapshot recomputed later is the same): per
artwork tag shown, the member's impressions n, quality plays q and
:func:`keyart.feature_spec.response_lift` against the tag's population rate over the same
impressions.

Training rows: each labelled impression is joined once with the member snapshot of the
day before it (what serving had); a ``mapInArrow`` step then explodes its candidates, looks
each up in the day's priors, artworks, titles and vocabulary (small, collected once and
shipped with the function) and computes the ``features`` row with
:func:`keyart.feature_spec.columnar_feature_matrix`, equal bit for bit to
:func:`keyart.feature_spec.feature_matrix`, the arithmetic serving runs, stored as one binary
value of little-endian float32 (:func:`keyart.feature_spec.pack_rows`). A snapshot or
vocabulary that was never written is computed from the data.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from keyart import feature_spec
from keyart.config import Settings
from keyart.contracts import ARTWORKS, MEMBERS, PLAYS, PRIORS, REWARDS, TITLES
from keyart.jobs.common import (
    has_data,
    main_for,
    read_days,
    read_range,
    read_table,
    write_day,
    write_metrics,
)
from keyart.lake import Lake, parse_ds, previous_priors_day, shift_ds

log = logging.getLogger(__name__)

MEMBER_COLUMNS = ("member_id", "member_is_kids", "member_log_plays_28d", "member_days_since_last_play", "affinity_tags", "affinity_values",
                  "response_tags", "response_values", "response_n", "member_factors")
RESPONSE_DAYS = 28
"""Days of labelled impressions behind a member's tag responses."""
SNAPSHOT_SCHEMA = T.StructType([
    T.StructField("member_id", T.StringType(), False),
    T.StructField("member_is_kids", T.IntegerType(), False),
    T.StructField("member_log_plays_28d", T.DoubleType(), False),
    T.StructField("member_days_since_last_play", T.DoubleType(), False),
    T.StructField("affinity_tags", T.ArrayType(T.StringType(), False), False),
    T.StructField("affinity_values", T.ArrayType(T.DoubleType(), False), False),
    T.StructField("response_tags", T.ArrayType(T.StringType(), False), False),
    T.StructField("response_values", T.ArrayType(T.DoubleType(), False), False),
    T.StructField("response_n", T.ArrayType(T.DoubleType(), False), False),
    T.StructField("member_factors", T.ArrayType(T.DoubleType(), False), False),
])
ROW_COLUMNS = (
    "event_id", "impression_ds", "ts", "member_id", "title_id", "artwork_id", "is_logged",
    "logged_artwork_id", "propensity", "logging_probability", "policy", "model_version", "reward", "minutes", "played",
    "segment", "prior_alpha", "prior_beta", "prior_n",
)
_DAY_US = 86_400 * 1_000_000


def _setting(name: str) -> Any:
    """The documented default of a keyart.config setting (one place owns it)."""
    return Settings.model_fields[name].default


ALS_MAX_BLOCKS = 10
"""Spark ML ALS's own default block count: more only adds shuffle at the sizes the job fits."""


@dataclass(frozen=True)
class EmbeddingParams:
    """ALS and tag-direction settings (keyart.config: ``embedding_*``); rank 0 = no embeddings."""

    rank: int = _setting("embedding_rank")
    regularization: float = _setting("embedding_regularization")
    alpha: float = _setting("embedding_alpha")
    iterations: int = _setting("embedding_iterations")
    tag_ridge: float = _setting("embedding_tag_ridge")
    seed: int = 7
    # ALS user and item blocks: the deployment's shuffle partitions, at most ALS_MAX_BLOCKS.
    # Each block is a task of every iteration; at local[2] 10 blocks took twice as long as 2-4
    # (same data and factors' quality; the factors depend on the block count, as on the seed).
    blocks: int = min(_setting("spark_shuffle_partitions"), ALS_MAX_BLOCKS)

    @classmethod
    def from_settings(cls, settings: Settings) -> EmbeddingParams:
        return cls(settings.embedding_rank, settings.embedding_regularization, settings.embedding_alpha,
                   settings.embedding_iterations, settings.embedding_tag_ridge,
                   blocks=min(settings.spark_shuffle_partitions, ALS_MAX_BLOCKS))


@dataclass(frozen=True)
class SnapshotParams:
    ds: str
    history_days: int
    affinity_half_life_days: float
    response_days: int = RESPONSE_DAYS
    embeddings: EmbeddingParams = EmbeddingParams()

    @classmethod
    def from_settings(cls, ds: str, settings: Settings) -> SnapshotParams:
        return cls(ds, settings.history_days, settings.affinity_half_life_days, embeddings=EmbeddingParams.from_settings(settings))

    def on(self, ds: str) -> SnapshotParams:
        return replace(self, ds=ds)


def _end_us(ds: str) -> Column:
    """Microseconds since the epoch at the end of day ``ds`` (UTC)."""
    return F.unix_micros(F.to_timestamp(F.lit(shift_ds(ds, 1))))


def _segment(is_kids: Column) -> Column:
    return F.when(is_kids == 1, F.lit(feature_spec.member_segment(True))).otherwise(F.lit(feature_spec.member_segment(False)))


# ----------------------------------------------------------------------------------------
# member snapshot
# ----------------------------------------------------------------------------------------

def tag_responses(labelled: DataFrame, artworks: DataFrame, params: SnapshotParams) -> DataFrame:
    """Per (member, artwork tag shown): quality plays ``q``, impressions ``n`` and the tag's population
    rate ``p``, as of the end of ``params.ds``. Pure.

    ``labelled`` holds REWARDS rows with their partition day as ``labelled_ds``; only
    partitions up to ``params.ds`` and impressions of the ``response_days`` ending it count,
    each impression once with its latest label.
    """
    from pyspark.sql import Window

    day = F.lit(params.ds).cast("date")
    shown = labelled.where((F.col("labelled_ds") <= day) & (F.col("impression_ds") <= day)
                           & (F.col("impression_ds") > F.date_sub(day, params.response_days)))
    # a late play relabels an impression in a later partition: the latest label counts, once
    latest = Window.partitionBy("event_id").orderBy(F.col("labelled_ds").desc())
    shown = shown.withColumn("_k", F.row_number().over(latest)).where(F.col("_k") == 1).drop("_k")
    tags = artworks.select("artwork_id", F.explode(F.array_distinct("tags")).alias("tag"))
    per = (shown.select("member_id", "artwork_id", F.col("reward").cast("double").alias("r"))
           .join(F.broadcast(tags), "artwork_id")
           .groupBy("member_id", "tag").agg(F.sum("r").alias("q"), F.count(F.lit(1)).cast("double").alias("n")))
    population = per.groupBy("tag").agg((F.sum("q") / F.sum("n")).alias("p"))
    return per.join(F.broadcast(population), "tag")


def member_responses(responses: DataFrame) -> DataFrame:
    """Per member: ``resp`` = sorted array of (tag, value, n) from :func:`tag_responses`. Pure."""
    lift = feature_spec.response_lift(F.col("q"), F.col("n"), F.col("p"))
    return responses.groupBy("member_id").agg(F.array_sort(F.collect_list(F.struct("tag", lift.alias("value"), "n"))).alias("resp"))


def weighted_plays(plays: DataFrame, params: SnapshotParams) -> DataFrame:
    """Plays of the ``history_days`` ending ``params.ds`` with their age and weight
    ``w = minutes_played * 0.5 ** (age_days / affinity_half_life_days)``. Pure."""
    end = _end_us(params.ds)
    age_days = (end - F.unix_micros("ts")) / F.lit(float(_DAY_US))
    recent = plays.where((age_days > 0) & (age_days <= params.history_days)).select(
        "member_id", "title_id", "minutes_played", age_days.alias("age_days")
    )
    return recent.withColumn("w", F.col("minutes_played") * F.pow(F.lit(0.5), F.col("age_days") / F.lit(params.affinity_half_life_days)))


# ----------------------------------------------------------------------------------------
# embeddings
# ----------------------------------------------------------------------------------------

def member_title_factors(weighted: DataFrame, params: EmbeddingParams) -> tuple[DataFrame, dict[str, tuple[float, ...]]] | None:
    """Spark ML ALS on the implicit (member, title) matrix: rating ``log1p(sum of w)`` per pair, confidence
    ``1 + alpha * rating``. Returns (member_id, member_factors array<double>) and title -> factors, or
    None when there is nothing to fit (rank 0, no plays). Deterministic for a seed and input."""
    from pyspark.ml.feature import IndexToString, StringIndexer
    from pyspark.ml.recommendation import ALS

    if params.rank == 0:
        return None
    # read by both indexers, the fit and its checks: computed once
    pairs = weighted.groupBy("member_id", "title_id").agg(F.log1p(F.sum("w")).alias("rating")).where(F.col("rating") > 0).cache()
    if pairs.isEmpty():
        pairs.unpersist()
        return None
    members = StringIndexer(inputCol="member_id", outputCol="u", stringOrderType="alphabetAsc").fit(pairs)
    titles = StringIndexer(inputCol="title_id", outputCol="i", stringOrderType="alphabetAsc").fit(pairs)
    data = titles.transform(members.transform(pairs)).select(
        F.col("u").cast("int").alias("u"), F.col("i").cast("int").alias("i"), "rating")
    model = ALS(rank=params.rank, maxIter=params.iterations, regParam=params.regularization, alpha=params.alpha,
                implicitPrefs=True, userCol="u", itemCol="i", ratingCol="rating", seed=params.seed,
                numUserBlocks=params.blocks, numItemBlocks=params.blocks,
                nonnegative=False, coldStartStrategy="drop").fit(data)
    to_member = IndexToString(inputCol="idx", outputCol="member_id", labels=members.labelsArray[0])
    factors = to_member.transform(model.userFactors.select(F.col("id").cast("double").alias("idx"), "features")).select(
        "member_id", F.transform("features", lambda x: x.cast("double")).alias("member_factors"))
    labels = titles.labelsArray[0]
    title_factors = {labels[r["id"]]: tuple(float(x) for x in r["features"]) for r in model.itemFactors.collect()}
    pairs.unpersist()  # the model holds its own factors
    return factors, title_factors


def _tag_moments(batches: Iterator[pa.RecordBatch], rank: int) -> Iterator[pa.RecordBatch]:
    """Per tag of a partition, one ``stats`` array: sum n, sum n u u^T (row-major), sum (q - n p) u."""
    import pyarrow.compute as pc

    sums: dict[str, np.ndarray] = {}
    for batch in batches:
        if not batch.num_rows:
            continue
        encoded = pc.dictionary_encode(batch.column("tag"))
        codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        q = feature_spec.float_column(batch.column("q"))
        n = feature_spec.float_column(batch.column("n"))
        p = feature_spec.float_column(batch.column("p"))
        u = feature_spec.member_factor_matrix(batch.column("member_factors"), rank)
        resid = q - n * p
        order = np.argsort(codes, kind="stable")
        bounds = np.searchsorted(codes[order], np.arange(len(encoded.dictionary) + 1))
        for k, tag in enumerate(encoded.dictionary.to_pylist()):
            rows = order[bounds[k]:bounds[k + 1]]
            if not len(rows):
                continue
            ur = u[rows]
            stats = np.concatenate([[n[rows].sum()], ((ur * n[rows, None]).T @ ur).ravel(), ur.T @ resid[rows]])
            sums[tag] = sums[tag] + stats if tag in sums else stats
    if sums:
        names = sorted(sums)
        values = [sums[t].tolist() for t in names]
        yield pa.RecordBatch.from_arrays([pa.array(names, pa.string()), pa.array(values, pa.list_(pa.float64()))],
                                         names=["tag", "stats"])


def tag_directions(responses: DataFrame, factors: DataFrame, params: EmbeddingParams) -> dict[str, tuple[float, ...]]:
    """Each tag's response direction: the ridge regression of the residual ``q - n p`` on the member factors,
    rows weighted by ``n`` (one row per impression), penalty ``tag_ridge`` pseudo-impressions of an
    average member (the mean of ``u u^T`` over impressions): ``v = (sum n u u^T + lambda I)^-1 sum (q - n p) u``."""
    rank = params.rank
    joined = responses.join(factors, "member_id").select("tag", "q", "n", "p", "member_factors")
    schema = T.StructType([T.StructField("tag", T.StringType()), T.StructField("stats", T.ArrayType(T.DoubleType()))])
    parts = joined.mapInArrow(lambda it: _tag_moments(it, rank), schema).collect()
    sums: dict[str, np.ndarray] = {}
    for r in parts:
        stats = np.asarray(r["stats"], dtype=np.float64)
        sums[r["tag"]] = sums[r["tag"]] + stats if r["tag"] in sums else stats
    if not sums:
        return {}
    total_n = sum(s[0] for s in sums.values())
    gram = sum(s[1:1 + rank * rank] for s in sums.values()).reshape(rank, rank)
    scale = float(np.trace(gram)) / rank / max(total_n, 1.0)  # an average impression's mean diagonal of u u^T
    lam = params.tag_ridge * max(scale, 1e-12)
    out = {}
    for tag in sorted(sums):
        s = sums[tag]
        a = s[1:1 + rank * rank].reshape(rank, rank) + lam * np.eye(rank)
        out[tag] = tuple(float(x) for x in np.linalg.solve(a, s[1 + rank * rank:]))
    return out


def title_artwork_means(artworks: list[Any], embeddings: feature_spec.Embeddings) -> dict[str, tuple[float, ...]]:
    """Each title's mean artwork vector (:meth:`keyart.feature_spec.Embeddings.artwork_vector`) over its
    catalog artworks (rows with ``title_id`` and ``tags``)."""
    vectors: dict[str, list[np.ndarray]] = {}
    for r in artworks:
        vectors.setdefault(r["title_id"], []).append(embeddings.artwork_vector(r["tags"] or []))
    return {t: tuple(float(x) for x in np.mean(vs, axis=0)) for t, vs in sorted(vectors.items())}


def tag_genre_profiles(artworks: list[Any], embeddings: feature_spec.Embeddings, als_rank: int) -> dict[str, tuple[float, ...]]:
    """Each tag's catalog genre profile: the mean genre part of the title vectors of the artworks carrying
    it (0 on the ``als_rank`` ALS dimensions); rows with ``title_id`` and ``tags``."""
    found: dict[str, list[np.ndarray]] = {}
    for r in artworks:
        v = embeddings.title_vector(r["title_id"])
        v[:als_rank] = 0.0
        for tag in dict.fromkeys(r["tags"] or []):
            found.setdefault(tag, []).append(v)
    return {t: tuple(float(x) for x in np.mean(vs, axis=0)) for t, vs in sorted(found.items())}


def fit_embeddings(weighted: DataFrame, shares: DataFrame, titles: DataFrame, genres: Sequence[str],
                   responses: DataFrame | None, artworks: DataFrame | None, params: EmbeddingParams,
                   cached: list[DataFrame] | None = None) -> tuple[DataFrame | None, feature_spec.Embeddings]:
    """The day's member vectors (member_id, member_factors) and :class:`keyart.feature_spec.Embeddings`.

    A member's vector is their ALS factors (:func:`member_title_factors`, ``params.rank``) followed by
    their minute share on each of ``genres`` (the day's vocabulary genres, from ``shares``: member_id,
    tag, value); a title's is its ALS factors followed by ``1 / len(genres of the title)`` on its
    genres. Tag directions (:func:`tag_directions`) are fitted on the whole vector, so a tag learns
    both which members' plays and which genre tastes it speaks to, under any tag name. (None,
    empty) when there is nothing to fit: rank 0 and no genres, or no plays. The member vectors are
    cached (read by the fit and the snapshot) and added to ``cached`` for the caller to release.
    """
    genres = list(genres) if params.rank else []
    t0 = time.perf_counter()
    fitted = member_title_factors(weighted, params)
    t_als = time.perf_counter() - t0
    if fitted is None and not genres:
        return None, feature_spec.Embeddings()
    k = params.rank if fitted is not None else 0
    dim = k + len(genres)
    zeros = lambda n: F.array_repeat(F.lit(0.0), n)  # noqa: E731
    genre_vec = (shares.where(F.col("tag").isin([feature_spec.GENRE_PREFIX + g for g in genres]))
                 .groupBy("member_id").agg(F.map_from_entries(F.collect_list(F.struct("tag", "value"))).alias("gm"))
                 .select("member_id", F.array(*[F.coalesce(F.col("gm")[feature_spec.GENRE_PREFIX + g], F.lit(0.0))
                                                for g in genres]).alias("g")))
    if fitted is not None:
        als, title_als = fitted
        vectors = als.join(genre_vec, "member_id", "full_outer").select(
            "member_id", F.concat(F.coalesce("member_factors", zeros(k)), F.coalesce("g", zeros(len(genres)))).alias("member_factors"))
    else:
        title_als = {}
        vectors = genre_vec.select("member_id", F.col("g").alias("member_factors"))
    vectors = vectors.cache()
    if cached is not None:
        cached.append(vectors)
    title_vectors = {}
    for r in titles.select("title_id", "genres").collect():
        own = list(dict.fromkeys(r["genres"] or []))
        tail = [1.0 / len(own) if g in own else 0.0 for g in genres] if own else [0.0] * len(genres)
        title_vectors[r["title_id"]] = tuple(title_als.get(r["title_id"], (0.0,) * k)) + tuple(tail)
    rank_params = replace(params, rank=dim)
    t0 = time.perf_counter()
    tags = tag_directions(responses, vectors, rank_params) if responses is not None else {}
    log.info("embeddings: ALS rank %d in %.1fs, %d tag directions (rank %d) in %.1fs",
             k, t_als, len(tags), dim, time.perf_counter() - t0)
    emb = feature_spec.Embeddings(dim, title_vectors, tags)
    if artworks is not None:
        rows = artworks.select("title_id", "tags").collect()
        emb = replace(emb, title_artworks=title_artwork_means(rows, emb),
                      tag_profiles=tag_genre_profiles(rows, emb, k) if genres else {})
    return vectors, emb


def member_snapshot(plays: DataFrame, titles: DataFrame, members: DataFrame, params: SnapshotParams,
                    labelled: DataFrame | None = None, artworks: DataFrame | None = None,
                    genres: Sequence[str] = (), cached: list[DataFrame] | None = None,
                    ) -> tuple[DataFrame, feature_spec.Embeddings]:
    """One row per member (SNAPSHOT_SCHEMA) as of the end of ``params.ds``, and the day's embeddings
    (:func:`fit_embeddings` with ``genres``, the day's vocabulary genres: the members' vectors are in
    the snapshot, the catalog side goes in the vocabulary). Pure but for the fit, which runs when called.

    ``labelled`` (REWARDS rows with ``labelled_ds``) and ``artworks`` give the responses and the
    tag directions; without them every member's responses are empty and no tag has a direction.
    The frames it caches are added to ``cached``: release them once the snapshot is written.
    """
    weighted = weighted_plays(plays, params)
    activity = weighted.groupBy("member_id").agg(
        F.sum(F.when(F.col("age_days") <= 28, 1).otherwise(0)).alias("plays_28d"),
        F.min("age_days").alias("days_since"),
        F.sum("w").alias("w_total"),
    )
    tags = titles.select(
        "title_id",
        F.array_distinct(F.concat(
            F.transform("genres", lambda g: F.concat(F.lit("genre:"), g)),
            F.transform(F.coalesce("cast", F.array().cast("array<string>")), lambda c: F.concat(F.lit("cast:"), c)),
        )).alias("tags"),
    )
    shares = (
        weighted.join(F.broadcast(tags), "title_id")
        .select("member_id", F.explode("tags").alias("tag"), "w")
        .groupBy("member_id", "tag").agg(F.sum("w").alias("w"))
        .join(activity.select("member_id", "w_total"), "member_id")
        .select("member_id", "tag", F.when(F.col("w_total") > 0, F.col("w") / F.col("w_total")).otherwise(0.0).alias("value"))
    )
    per_tag = shares.groupBy("member_id").agg(F.array_sort(F.collect_list(F.struct("tag", "value"))).alias("aff"))
    empty_str = F.array().cast("array<string>")
    empty_dbl = F.array().cast("array<double>")
    snap = members.select("member_id", (F.col("profile") == "kids").cast("int").alias("member_is_kids")).join(activity, "member_id", "left").join(per_tag, "member_id", "left")
    # read by the snapshot and the tag directions: computed once
    responses = tag_responses(labelled, artworks, params).cache() if labelled is not None and artworks is not None else None
    if responses is not None:
        if cached is not None:
            cached.append(responses)
        snap = snap.join(member_responses(responses), "member_id", "left")
    else:
        snap = snap.withColumn("resp", F.lit(None).cast("array<struct<tag:string,value:double,n:double>>"))
    factors, embeddings = fit_embeddings(weighted, shares, titles, genres, responses, artworks, params.embeddings, cached)
    if factors is not None:
        snap = snap.join(factors, "member_id", "left")
    else:
        snap = snap.withColumn("member_factors", F.lit(None).cast("array<double>"))
    return snap.select(
        "member_id",
        F.coalesce("member_is_kids", F.lit(0)).alias("member_is_kids"),
        F.log1p(F.coalesce("plays_28d", F.lit(0)).cast("double")).alias("member_log_plays_28d"),
        F.least(F.coalesce("days_since", F.lit(feature_spec.DAYS_SINCE_CAP)), F.lit(feature_spec.DAYS_SINCE_CAP)).cast("double").alias("member_days_since_last_play"),
        F.coalesce(F.col("aff.tag"), empty_str).alias("affinity_tags"),
        F.coalesce(F.col("aff.value"), empty_dbl).alias("affinity_values"),
        F.coalesce(F.col("resp.tag"), empty_str).alias("response_tags"),
        F.coalesce(F.col("resp.value"), empty_dbl).alias("response_values"),
        F.coalesce(F.col("resp.n"), empty_dbl).alias("response_n"),
        F.coalesce(F.col("member_factors"), empty_dbl).alias("member_factors"),
    ), embeddings


# ----------------------------------------------------------------------------------------
# training rows
# ----------------------------------------------------------------------------------------

IMPRESSION_COLUMNS = (
    "event_id", "impression_ds", "ts", "member_id", "title_id", "logged_artwork_id", "propensity", "policy",
    "model_version", "reward", "minutes", "played",
)
CONTEXT_COLUMNS = ("device", "local_hour", "day_of_week", "page_row", "position")


def impression_inputs(rewards: DataFrame, snapshots: DataFrame) -> DataFrame:
    """One row per labelled impression: its candidates, context and the member's snapshot of the
    day before the impression, joined once per impression (unknown members get
    :data:`keyart.feature_spec.UNKNOWN_MEMBER`). Pure.

    ``snapshots`` has SNAPSHOT_SCHEMA columns plus ``snapshot_ds``.
    """
    base = rewards.select(
        "event_id", "impression_ds", "ts", "member_id", "title_id", "candidates", "candidate_probabilities",
        F.col("artwork_id").alias("logged_artwork_id"), "propensity", "policy", "model_version", "reward", "minutes", "played",
        *[F.col(f"context.{c}").alias(c) for c in CONTEXT_COLUMNS],
    ).withColumn("known_ds", F.date_sub("impression_ds", 1))
    snap = snapshots.select(*MEMBER_COLUMNS, F.col("snapshot_ds").alias("known_ds"), F.lit(1).alias("member_known"))
    rows = base.join(snap, ["member_id", "known_ds"], "left")
    unknown = feature_spec.UNKNOWN_MEMBER
    kinds = {"affinity_tags": "array<string>", "affinity_values": "array<double>", "response_tags": "array<string>",
             "response_values": "array<double>", "response_n": "array<double>", "member_factors": "array<double>"}
    # snapshots written before responses (factors) existed read them as null
    member = [F.coalesce(name, F.array().cast(kind)).alias(name) for name, kind in kinds.items()]
    return rows.select(
        *IMPRESSION_COLUMNS, "candidates", "candidate_probabilities", *CONTEXT_COLUMNS, "known_ds",
        F.coalesce("member_known", F.lit(0)).alias("member_known"),
        F.coalesce("member_is_kids", F.lit(unknown["member_is_kids"])).alias("member_is_kids"),
        *[F.coalesce(name, F.lit(float(unknown[name]))).alias(name) for name in ("member_log_plays_28d", "member_days_since_last_play")],
        *member,
    ).withColumn("segment", _segment(F.col("member_is_kids")))


def feature_inputs(rewards: DataFrame, snapshots: DataFrame, priors: DataFrame, artworks: DataFrame, titles: DataFrame) -> DataFrame:
    """The candidate rows' inputs as Spark columns: :func:`impression_inputs` exploded, with each
    candidate's priors (null where missing), artwork tags and title genres. Pure.

    The job itself explodes inside :func:`add_features` (the member lists ride once per
    impression, not per candidate); this view is what those rows hold, for inspection and
    tests (tests/jobs/test_features.py checks the training rows against it).
    """
    rows = impression_inputs(rewards, snapshots).select(
        "*", F.posexplode("candidates").alias("candidate_pos", "artwork_id"))
    # the logging policy's probability of this candidate, as served (null in older logs)
    rows = (rows.withColumn("logging_probability", F.get("candidate_probabilities", F.col("candidate_pos")))
            .withColumn("is_logged", F.col("artwork_id") == F.col("logged_artwork_id"))
            .drop("candidate_pos", "candidate_probabilities", "candidates"))
    pri = priors.select(F.col("prior_ds").alias("known_ds"), "artwork_id", "segment", "alpha", "beta", "n_impressions")
    all_rows = pri.where(F.col("segment") == feature_spec.SEGMENT_ALL).select(
        "known_ds", "artwork_id", F.col("alpha").alias("prior_alpha"), F.col("beta").alias("prior_beta"), F.col("n_impressions").alias("prior_n")
    )
    seg_rows = pri.where(F.col("segment") != feature_spec.SEGMENT_ALL).select(
        "known_ds", "artwork_id", "segment", F.col("alpha").alias("seg_alpha"), F.col("beta").alias("seg_beta")
    )
    rows = rows.join(F.broadcast(all_rows), ["known_ds", "artwork_id"], "left").join(
        F.broadcast(seg_rows), ["known_ds", "artwork_id", "segment"], "left")
    art = artworks.select("artwork_id", F.col("tags").alias("art_tags"), F.col("is_default").cast("int").alias("art_is_default"))
    rows = rows.join(F.broadcast(art), "artwork_id", "left").join(F.broadcast(titles.select("title_id", F.col("genres").alias("title_genres"))), "title_id", "left")
    return rows.select(
        *ROW_COLUMNS, "known_ds", "seg_alpha", "seg_beta", "member_known", *MEMBER_COLUMNS[1:], *CONTEXT_COLUMNS,
        F.coalesce("art_tags", F.array().cast("array<string>")).alias("art_tags"),
        F.coalesce("art_is_default", F.lit(0)).alias("art_is_default"),
        F.coalesce("title_genres", F.array().cast("array<string>")).alias("title_genres"),
    )


@dataclass
class Catalog:
    """The artworks, titles, priors and vocabularies a batch of impressions is looked up in.

    Small (one row per artwork, title and prior), collected once on the driver and shipped
    to the Python workers with the function: the broadcast side of every candidate row.
    Index ``len(artwork_ids)`` / ``len(title_ids)`` is an id the catalog lacks (no tags, no
    genres), as the left joins of :func:`feature_inputs` give.
    """

    artwork_ids: Any  # pyarrow string array
    title_ids: Any
    blocks: dict[str, feature_spec.CatalogBlocks]  # by known day ("" = no vocabulary written)
    priors: dict[tuple[str, str], tuple[np.ndarray, np.ndarray, np.ndarray]]  # (day, segment) -> alpha, beta, n [A + 1]

    @classmethod
    def collect(cls, priors: DataFrame, artworks: DataFrame, titles: DataFrame,
                vocabularies: dict[str, feature_spec.Vocabulary] | None = None) -> Catalog:
        import pyarrow as pa

        arts = artworks.select("artwork_id", "tags", F.col("is_default").cast("int").alias("is_default")).collect()
        tits = titles.select("title_id", "genres").collect()
        art_of = {r["artwork_id"]: i for i, r in enumerate(arts)}
        tags = [r["tags"] or [] for r in arts] + [[]]
        defaults = [r["is_default"] or 0 for r in arts] + [0]
        genres = [r["genres"] or [] for r in tits] + [[]]
        vocabularies = vocabularies or {}
        title_ids = [r["title_id"] for r in tits] + [None]
        blocks = {day: feature_spec.CatalogBlocks(tags, defaults, genres, vocabulary, title_ids)
                  for day, vocabulary in [("", None), *vocabularies.items()]}
        table: dict[tuple[str, str], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for r in priors.select("prior_ds", "artwork_id", "segment", "alpha", "beta", "n_impressions").collect():
            if r["artwork_id"] not in art_of:
                continue  # a posterior of an artwork no longer in the catalog: no candidate row finds it either
            key = (r["prior_ds"].isoformat(), r["segment"])
            if key not in table:
                table[key] = tuple(np.full(len(arts) + 1, np.nan) for _ in range(3))
            for array, value in zip(table[key], (r["alpha"], r["beta"], r["n_impressions"]), strict=True):
                array[art_of[r["artwork_id"]]] = np.nan if value is None else value
        return cls(pa.array([r["artwork_id"] for r in arts], pa.string()), pa.array([r["title_id"] for r in tits], pa.string()),
                   blocks, table)

    def prior(self, day: str, segment: str, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(alpha, beta, n) of artwork rows on ``day`` for ``segment``: NaN where there is no posterior."""
        found = self.priors.get((day, segment))
        if found is None:
            return tuple(np.full(len(rows), np.nan) for _ in range(3))
        return tuple(a[rows] for a in found)


def _index(values, ids) -> np.ndarray:
    """Position of each string of ``values`` in ``ids``, ``len(ids)`` where absent."""
    import pyarrow.compute as pc

    if len(values) == 0:
        return np.zeros(0, np.int64)
    return pc.fill_null(pc.index_in(values, value_set=ids), len(ids)).to_numpy(zero_copy_only=False).astype(np.int64)


def training_batch(batch: pa.RecordBatch, catalog: Catalog) -> Iterator[pa.RecordBatch]:
    """Rows of :func:`impression_inputs` -> training rows (:func:`training_schema`), one per candidate.

    Member lists are encoded once per impression; artwork, title and prior look-ups are
    array gathers; the matrix is :func:`keyart.feature_spec.columnar_feature_matrix`, equal to
    :func:`keyart.feature_spec.feature_matrix` of the same rows. An impression's candidates
    stay together, so ``title_prior_mean`` is the mean over its candidates in candidate order.
    """
    import pyarrow.compute as pc

    days = np.datetime_as_string(batch.column("known_ds").to_numpy(zero_copy_only=False).astype("datetime64[D]"), unit="D")
    distinct = np.unique(days)
    for day in distinct:
        part = batch.take(pa.array(np.flatnonzero(days == day))) if len(distinct) > 1 else batch
        cand = feature_spec.Ragged.of(part.column("candidates"))
        row_imp = np.repeat(np.arange(part.num_rows, dtype=np.int64), cand.lengths)
        pos = np.arange(len(row_imp), dtype=np.int64) - cand.offsets[row_imp]
        artwork_id = cand.values
        row_art = _index(artwork_id, catalog.artwork_ids)
        row_title = _index(part.column("title_id"), catalog.title_ids)[row_imp]
        # the 'all' posterior and the member segment's (NaN where none)
        alpha, beta, n = catalog.prior(str(day), feature_spec.SEGMENT_ALL, row_art)
        seg_alpha, seg_beta = np.full(len(row_imp), np.nan), np.full(len(row_imp), np.nan)
        segment = part.column("segment").to_numpy(zero_copy_only=False)[row_imp]
        for seg in np.unique(segment):
            rows = np.flatnonzero(segment == seg)
            sa, sb, _ = catalog.prior(str(day), str(seg), row_art[rows])
            seg_alpha[rows], seg_beta[rows] = sa, sb
        priors = feature_spec.prior_inputs_by_group(alpha, beta, n, seg_alpha, seg_beta, row_imp)
        members = {name: part.column(name) for name in (*feature_spec.UNKNOWN_MEMBER, *CONTEXT_COLUMNS)}
        blocks = catalog.blocks.get(str(day), catalog.blocks[""])
        matrix = feature_spec.columnar_feature_matrix(blocks, members, row_imp, row_art, row_title, priors)
        # the logging policy's probability of each candidate (null where not logged)
        probs = feature_spec.Ragged.of(part.column("candidate_probabilities"))
        logged = pos < probs.lengths[row_imp]
        values = feature_spec.float_column(probs.values)
        at = np.minimum(probs.offsets[row_imp] + pos, max(len(values) - 1, 0))
        probability = np.where(logged, values[at] if len(values) else np.nan, np.nan)
        missing = np.isnan(alpha) | np.isnan(beta)
        taken = {name: part.column(name).take(pa.array(row_imp)) for name in (*IMPRESSION_COLUMNS, "segment")}
        columns = {
            **taken,
            "artwork_id": artwork_id,
            "is_logged": pc.equal(artwork_id, taken["logged_artwork_id"]),
            "logging_probability": pa.array(probability, pa.float64(), mask=np.isnan(probability)),
            "prior_alpha": pa.array(np.where(missing, feature_spec.DEFAULT_PRIOR[0], alpha)),
            "prior_beta": pa.array(np.where(missing, feature_spec.DEFAULT_PRIOR[1], beta)),
            "prior_n": pa.array(np.where(missing, 0.0, n)),
        }
        features = feature_spec.pack_rows(matrix)
        yield pa.RecordBatch.from_arrays([columns[c] for c in ROW_COLUMNS] + [features], names=[*ROW_COLUMNS, "features"])


def training_schema(inputs_schema: T.StructType) -> T.StructType:
    fields = {f.name: f for f in inputs_schema.fields}
    types = {"artwork_id": T.StringType(), "is_logged": T.BooleanType(), "logging_probability": T.DoubleType(),
             "prior_alpha": T.DoubleType(), "prior_beta": T.DoubleType(), "prior_n": T.DoubleType()}
    out = [T.StructField(c, types[c] if c in types else fields[c].dataType, True) for c in ROW_COLUMNS]
    # N_FEATURES little-endian float32 per row (feature_spec.pack_rows): Parquet writes it as one run of bytes
    return T.StructType(out + [T.StructField("features", T.BinaryType(), False)])


def add_features(impressions: DataFrame, catalog: Catalog) -> DataFrame:
    """Training rows from :func:`impression_inputs`: candidates exploded and ``features`` computed
    by keyart.feature_spec through mapInArrow, one batch of impressions at a time. Pure."""
    schema = training_schema(impressions.schema)

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            if batch.num_rows:
                yield from training_batch(batch, catalog)

    return impressions.mapInArrow(run, schema)


def transform(rewards: DataFrame, snapshots: DataFrame, priors: DataFrame, artworks: DataFrame, titles: DataFrame,
              vocabularies: dict[str, feature_spec.Vocabulary] | None = None) -> DataFrame:
    """Training rows (docs/architecture.md, features/training); ``vocabularies`` by known day.

    Pure but for collecting the catalog side (artworks, titles, priors: small) to the driver."""
    catalog = Catalog.collect(priors, artworks, titles, vocabularies)
    return add_features(impression_inputs(rewards, snapshots), catalog)


def catalog_counts(artworks: DataFrame, titles: DataFrame) -> tuple[dict[str, int], dict[str, int]]:
    """(artworks per tag, titles per genre) of the catalog: what a vocabulary is learned from."""
    tags = artworks.select("artwork_id", F.explode(F.array_distinct("tags")).alias("tag")).groupBy("tag").count().collect()
    genres = titles.select("title_id", F.explode(F.array_distinct("genres")).alias("genre")).groupBy("genre").count().collect()
    return {r["tag"]: int(r["count"]) for r in tags}, {r["genre"]: int(r["count"]) for r in genres}


def vocabulary_for(lake: Lake, ds: str, counts: tuple[dict[str, int], dict[str, int]],
                   reuse: bool = True) -> feature_spec.Vocabulary:
    """The vocabulary of ``ds``: the written one (``reuse``), else learned from ``counts`` with the
    slots of the latest vocabulary written before ``ds``."""
    path = feature_spec.vocabulary_path(lake.root, ds)
    if reuse and path.is_file():
        return feature_spec.read_vocabulary(lake.root, ds)
    base = path.parent.parent
    earlier = sorted(p.name[3:] for p in base.glob("ds=*") if p.name[3:] < ds and (p / path.name).is_file()) if base.is_dir() else []
    previous = feature_spec.read_vocabulary(lake.root, earlier[-1]) if earlier else None
    return feature_spec.learn_vocabulary(*counts, previous=previous)


def write_vocabulary(vocabulary: feature_spec.Vocabulary, lake: Lake, ds: str) -> None:
    path = feature_spec.vocabulary_path(lake.root, ds)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(vocabulary.to_dict(), indent=2, sort_keys=True))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------
# extract / load / run
# ----------------------------------------------------------------------------------------

@dataclass
class Inputs:
    plays: DataFrame
    titles: DataFrame
    artworks: DataFrame
    members: DataFrame
    rewards: DataFrame
    priors: DataFrame
    snapshot_days: list[str]
    labelled: DataFrame | None = None


def served_priors(spark: SparkSession, lake: Lake, known_days: Sequence[str], max_gap_days: int) -> DataFrame:
    """Per known day k (``prior_ds`` = k), the priors the bundle served on k + 1 was exported
    with: ``priors/ds=k``, or, when the priors task did not run on k (so neither did export,
    and serving kept the bundle before), the newest partition before it, at most
    ``max_gap_days`` before k + 1, as :func:`keyart.lake.previous_priors_day` finds for the
    priors job itself. Empty when there is none."""
    frames = []
    for k in known_days:
        source = previous_priors_day(lake, shift_ds(k, 1), max_gap_days)
        if source is not None:
            frames.append(read_days(spark, lake.priors, [source], PRIORS.spark_schema())
                          .withColumn("prior_ds", F.lit(k).cast("date")))
    if not frames:
        return read_days(spark, lake.priors, [], PRIORS.spark_schema(), ds_column="prior_ds")
    return functools.reduce(DataFrame.unionByName, frames)


def extract(spark: SparkSession, lake: Lake, ds: str, history_days: int, response_days: int,
            prior_max_gap_days: int) -> Inputs:
    rewards = read_days(spark, lake.rewards, [ds], REWARDS.spark_schema())
    days = sorted({r[0].isoformat() for r in rewards.select("impression_ds").distinct().collect()})
    known_days = sorted({shift_ds(d, -1) for d in days})
    first = min([ds, *known_days])
    plays = read_range(spark, lake.clean("plays"), shift_ds(first, -history_days), ds, PLAYS.spark_schema())
    priors = served_priors(spark, lake, known_days, prior_max_gap_days)
    labelled = read_range(spark, lake.rewards(), shift_ds(first, -response_days), ds, REWARDS.spark_schema(), ds_column="labelled_ds")
    return Inputs(
        plays=plays, titles=read_table(spark, lake.titles, TITLES), artworks=read_table(spark, lake.artworks, ARTWORKS),
        members=read_table(spark, lake.members, MEMBERS), rewards=rewards, priors=priors, snapshot_days=known_days,
        labelled=labelled,
    )


def snapshots_for(spark: SparkSession, lake: Lake, inputs: Inputs, params: SnapshotParams,
                  vocabularies: dict[str, feature_spec.Vocabulary], cached: list[DataFrame] | None = None) -> DataFrame:
    """Snapshots of ``inputs.snapshot_days``: the written one, else computed from the plays (its
    embeddings then go into that day's entry of ``vocabularies``, which is updated in place, and
    the frames it caches into ``cached``)."""
    frames = []
    for day in inputs.snapshot_days:
        if has_data(lake.member_features(day)):
            # a snapshot written before a column existed reads it as null (impression_inputs fills it)
            snap = spark.read.schema(SNAPSHOT_SCHEMA).parquet(str(lake.member_features(day)))
        else:
            snap, embeddings = member_snapshot(inputs.plays, inputs.titles, inputs.members, params.on(day), inputs.labelled,
                                               inputs.artworks, vocabularies[day].genres, cached)
            vocabularies[day] = replace(vocabularies[day], embeddings=embeddings)
        frames.append(snap.withColumn("snapshot_ds", F.lit(day).cast("date")))
    if not frames:
        return spark.createDataFrame([], T.StructType(SNAPSHOT_SCHEMA.fields + [T.StructField("snapshot_ds", T.DateType())]))
    out = frames[0]
    for df in frames[1:]:
        out = out.unionByName(df)
    return out


def load(snapshot: DataFrame, training: DataFrame, lake: Lake, ds: str) -> None:
    write_day(snapshot, lake.member_features(ds))
    write_day(training, lake.training(ds))


def run(spark: SparkSession, lake: Lake, args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    params = SnapshotParams.from_settings(args.ds, settings)
    parse_ds(args.ds)
    inputs = extract(spark, lake, args.ds, params.history_days, params.response_days, settings.prior_max_gap_days)
    counts = catalog_counts(inputs.artworks, inputs.titles)
    vocabularies = {day: vocabulary_for(lake, day, counts) for day in inputs.snapshot_days}
    # today's is learned afresh from today's catalog on top of the slots before it (a rerun gives the same)
    vocabulary = vocabulary_for(lake, args.ds, counts, reuse=False)
    # frames cached for the embedding fit, released once the snapshot and training rows are written
    # (a Spark Connect server outlives the job)
    cached: list[DataFrame] = []
    snapshot, embeddings = member_snapshot(inputs.plays, inputs.titles, inputs.members, params, inputs.labelled, inputs.artworks,
                                           vocabulary.genres, cached)
    vocabulary = replace(vocabulary, embeddings=embeddings)
    snapshots = snapshots_for(spark, lake, inputs, params, vocabularies, cached)
    training = transform(inputs.rewards, snapshots, inputs.priors, inputs.artworks, inputs.titles, vocabularies)
    load(snapshot, training, lake, args.ds)
    for frame in cached:
        frame.unpersist()
    write_vocabulary(vocabulary, lake, args.ds)
    written = spark.read.parquet(str(lake.training(args.ds)))
    row = written.agg(
        F.count(F.lit(1)).alias("rows"), F.sum(F.col("is_logged").cast("int")).alias("impressions"),
    ).first()
    figures = {
        "members": spark.read.parquet(str(lake.member_features(args.ds))).count(),
        "training_rows": int(row["rows"] or 0),
        "training_impressions": int(row["impressions"] or 0),
        "snapshot_days_used": inputs.snapshot_days,
        "n_features": feature_spec.N_FEATURES,
        "feature_spec_version": feature_spec.FEATURE_SPEC_VERSION,
        "vocabulary_tags": sum(1 for t in vocabulary.tags if t),
        "vocabulary_genres": len(vocabulary.genres),
        "catalog_tags": len(counts[0]),
        "embedding_rank": embeddings.rank,
        "embedding_titles": len(embeddings.titles),
        "embedding_tags": len(embeddings.tags),
    }
    write_metrics(lake, "features", args.ds, figures)
    return figures


def main(argv: list[str] | None = None) -> int:
    return main_for("features", __doc__, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())


