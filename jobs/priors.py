"""priors: the Beta posterior of the quality-play rate per (title, artwork, segment) at the end of D.

    spark-submit jobs/priors.py --ds 2026-03-01 [--lake LAKE] [--master URL]
    keyart job priors --ds 2026-03-01

Reads the newest priors partition before D (``priors/ds=D-g``, g <= ``prior_max_gap_days``;
absent on the first day), ``rewards/ds=D``, ``catalog/artworks`` and ``members``; writes
``priors/ds=D/`` (contracts.PRIORS) and ``metrics/priors/ds=D``.

For every active artwork a and segment s in {all, profile=adult, profile=kids}, with
d = 0.5 ** (1 / prior_half_life_days):

1. warm start: the previous partition's (alpha, beta, n) times d ** g: yesterday's times d,
   and after a day the job did not run the record is decayed over the gap, not lost;
2. evidence: today's labelled impressions of a in s, each weighted w = 1 / (K * propensity)
   (K candidates; w = 1 under a uniform logging policy). The weighted mean
   r_w = sum(w r) / sum(w) estimates a's rate as if it had been shown in every context, and
   it counts as e = (sum w)^2 / sum(w^2) impressions (Kish's effective sample size: c under
   uniform logging, fewer the more the weights vary): S = e * r_w, F = e - S;
   alpha += S, beta += F, n += e. So the posterior is as sure as the day's evidence is, and
   accumulates day after day as a non-contextual Thompson sampler's would;
3. an artwork without yesterday's ``all`` row starts from an empirical-Bayes prior: the
   method of moments over the posterior means p_i of its title's artworks with data
   (catalog-wide when the title has fewer than two): mean m, variance v,
   alpha + beta = m (1 - m) / v - 1, clipped to [1, EB_MAX_ESS], so a new artwork gets a row
   before it has a single impression. Where no artwork of the catalog has a posterior with
   data (a lake's first day, or a day after one without priors), the prior is estimated from
   the day's evidence instead (:func:`evidence_moments`): the title's pooled rate (the
   catalog's where the title has no evidence) with the strength the spread of the artworks'
   rates within titles implies once their binomial noise is taken out. DEFAULT_PRIOR only
   where nothing has data at all: a prior's scale comes from the catalog's own rates;
4. a segment row exists once the segment has data; while its alpha + beta is below
   ``prior_min_segment_impressions`` the missing mass is filled with the artwork's ``all``
   mean, so a thin segment falls back to the artwork prior and a rich one follows its data;
5. alpha + beta is capped at ``prior_max_ess`` (alpha, beta and n scaled together).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from keyart import catalog, feature_spec
from keyart.config import Settings
from keyart.contracts import ARTWORKS, MEMBERS, PRIORS, REWARDS
from keyart.jobs.common import (
    conform,
    main_for,
    read_days,
    read_table,
    write_day_observed,
    write_metrics,
)
from keyart.lake import Lake, parse_ds, previous_priors_day

EB_MAX_ESS = 20.0
"""Cap on the strength of an empirical-Bayes prior: a new artwork must be able to move fast."""
_MEAN_CLIP = (1e-3, 1.0 - 1e-3)
_EXACT = "decimal(38,18)"
SEGMENTS = (feature_spec.SEGMENT_ALL, feature_spec.member_segment(False), feature_spec.member_segment(True))


@dataclass(frozen=True)
class PriorParams:
    ds: str
    half_life_days: float
    max_ess: float
    min_segment_impressions: float
    eb_max_ess: float = EB_MAX_ESS
    gap_days: int = 1
    """Days between D and the priors partition ``previous`` was read from."""

    @property
    def decay(self) -> float:
        """Per day."""
        return 0.5 ** (1.0 / self.half_life_days)

    @property
    def carry(self) -> float:
        """What is left of the previous partition's evidence after ``gap_days``."""
        return self.decay ** self.gap_days

    @classmethod
    def from_settings(cls, ds: str, settings: Settings, gap_days: int = 1) -> PriorParams:
        return cls(ds, settings.prior_half_life_days, settings.prior_max_ess, float(settings.prior_min_segment_impressions),
                   gap_days=gap_days)


def active_artworks(artworks: DataFrame, ds: str) -> DataFrame:
    """``title_id, artwork_id`` of the artworks that may be shown on ``ds``."""
    return artworks.where(F.expr(catalog.active_sql(ds))).select("title_id", "artwork_id")


def evidence(rewards: DataFrame, members: DataFrame) -> DataFrame:
    """Importance-weighted ``(artwork_id, segment, s, f, n)`` of the day's labels, n the weights'
    effective sample size. Pure."""
    seg = F.when(F.col("profile") == "kids", F.lit(feature_spec.member_segment(True))).otherwise(F.lit(feature_spec.member_segment(False)))
    rows = rewards.join(members.select("member_id", "profile"), "member_id", "left").select(
        "artwork_id", "reward",
        (F.lit(1.0) / (F.size("candidates") * F.col("propensity"))).alias("w"),
        F.explode(F.array(F.lit(feature_spec.SEGMENT_ALL), seg)).alias("segment"),
    )
    agg = rows.groupBy("artwork_id", "segment").agg(
        exact_sum(F.col("w")).alias("sw"), exact_sum(F.col("w") * F.col("w")).alias("sww"),
        exact_sum(F.col("w") * F.col("reward")).alias("swr"),
    )
    ess = F.col("sw") * F.col("sw") / F.col("sww")
    agg = agg.withColumn("n", ess)
    s = F.col("n") * F.col("swr") / F.col("sw")
    return agg.select("artwork_id", "segment", s.alias("s"), (F.col("n") - s).alias("f"), "n")


def exact_sum(c: Column) -> Column:
    """Sum in exact decimal arithmetic: the same rows give the same result bit for bit whatever
    order the shuffle delivers them in (a double sum depends on it), so a rerun is identical."""
    return F.sum(c.cast(_EXACT)).cast("double")


def _mean(alpha: str = "alpha", beta: str = "beta") -> Column:
    return F.col(alpha) / (F.col(alpha) + F.col(beta))


def _moments_ess(m: Column, v: Column, eb_max_ess: float) -> Column:
    """alpha + beta of the Beta with mean ``m`` and variance ``v`` (m (1 - m) / v - 1), clipped to
    [1, ``eb_max_ess``]; ``eb_max_ess`` where ``v`` is not positive."""
    raw = F.when(v > 0, m * (1 - m) / v - 1).otherwise(F.lit(eb_max_ess))
    return F.least(F.greatest(raw, F.lit(1.0)), F.lit(eb_max_ess))


def evidence_moments(evidence: DataFrame, params: PriorParams) -> tuple[DataFrame, DataFrame]:
    """Empirical-Bayes moments from one day's evidence ``(title_id, s, n)`` per artwork: for a
    catalog without posteriors. Pure.

    Returns ``(title_id, em)``, each title's pooled rate sum(s) / sum(n), and one row ``(cem,
    eess)``: the catalog's pooled rate and the prior strength. The strength is the method of
    moments for a beta-binomial, pooled within titles (an artwork's prior centres on its
    title, so the spread that matters is within titles): over the titles with at least two
    artworks with evidence, v = (sum_t S_t - sum_t m_t (1 - m_t) (k_t - 1)) / sum_t (N_t -
    sum_i n_i^2 / N_t), with S_t = sum_i n_i (p_i - m_t)^2 the weighted spread of the rates p_i
    = s_i / n_i around the title's m_t, N_t = sum_i n_i and k_t its artworks: the observed
    spread less what binomial noise alone would give. alpha + beta = m (1 - m) / v - 1 at the
    catalog's rate m, clipped to [1, ``eb_max_ess``]; ``eb_max_ess`` when the rates spread no
    more than noise; null when no title has two artworks with evidence.
    """
    ev = evidence.where(F.col("n") > 0)
    per_title = ev.groupBy("title_id").agg(
        exact_sum(F.col("s")).alias("ts"), exact_sum(F.col("n")).alias("tn"),
        exact_sum(F.col("n") * F.col("n")).alias("tnn"), exact_sum(F.col("s") * F.col("s") / F.col("n")).alias("tss"),
        F.count(F.lit(1)).alias("k"),
    )
    m_t = F.col("ts") / F.col("tn")
    spread = F.greatest(F.col("tss") - F.col("tn") * m_t * m_t, F.lit(0.0))  # sum_i n_i (p_i - m_t)^2
    within = per_title.where(F.col("k") >= 2).select(
        spread.alias("S"), (m_t * (1 - m_t) * (F.col("k") - 1)).alias("noise"),
        (F.col("tn") - F.col("tnn") / F.col("tn")).alias("c"),
    )
    pooled = per_title.agg((exact_sum(F.col("ts")) / exact_sum(F.col("tn"))).alias("cem")).crossJoin(
        within.agg(*(exact_sum(F.col(c)).alias(c) for c in ("S", "noise", "c"))))
    v = (F.col("S") - F.col("noise")) / F.col("c")
    eess = F.when(F.col("c") > 0, _moments_ess(F.col("cem"), v, params.eb_max_ess))
    return per_title.select("title_id", m_t.alias("em")), pooled.select("cem", eess.alias("eess"))


def eb_priors(posteriors: DataFrame, titles: DataFrame, params: PriorParams,
              evidence: DataFrame | None = None) -> DataFrame:
    """Empirical-Bayes ``(title_id, eb_alpha, eb_beta)`` for ``titles`` from the ``all`` posteriors with data.

    Moments over the title's artworks; the catalog's where the title has fewer than two. Where
    the catalog has no posterior with data, from ``evidence`` ``(title_id, s, n)``, the day's
    per-artwork evidence (:func:`evidence_moments`); :data:`DEFAULT_PRIOR` only where neither
    has anything. Pure.
    """
    src = posteriors.where(F.col("n_impressions") > 0).select("title_id", _mean().alias("p"))

    def moments(df: DataFrame, *keys: str) -> DataFrame:
        grouped = df.groupBy(*keys) if keys else df.groupBy()
        return grouped.agg(F.count(F.lit(1)).alias("c"), F.avg("p").alias("m"), F.var_pop("p").alias("v"))

    def ess(c: Column, m: Column, v: Column) -> Column:
        return F.when(c >= 2, _moments_ess(m, v, params.eb_max_ess))

    title = moments(src, "title_id").select("title_id", F.col("c").alias("tc"), F.col("m").alias("tm"), ess(F.col("c"), F.col("m"), F.col("v")).alias("tess"))
    cat = moments(src).select(F.col("c").alias("cc"), F.col("m").alias("cm"), ess(F.col("c"), F.col("m"), F.col("v")).alias("cess"))
    default_mean = feature_spec.DEFAULT_PRIOR[0] / sum(feature_spec.DEFAULT_PRIOR)
    default_ess = min(sum(feature_spec.DEFAULT_PRIOR), params.eb_max_ess)
    titles = titles.select("title_id").distinct().join(title, "title_id", "left").crossJoin(cat)
    if evidence is None:
        titles = titles.select("*", *(F.lit(None).cast("double").alias(c) for c in ("em", "cem", "eess")))
    else:
        em, pooled = evidence_moments(evidence, params)
        titles = titles.join(em, "title_id", "left").crossJoin(pooled)
    no_posteriors = F.coalesce(F.col("cc"), F.lit(0)) < 1
    m = F.coalesce(F.when(F.col("tc") >= 1, F.col("tm")), F.when(F.col("cc") >= 1, F.col("cm")),
                   F.when(no_posteriors, F.coalesce(F.col("em"), F.col("cem"))), F.lit(default_mean))
    m = F.least(F.greatest(m, F.lit(_MEAN_CLIP[0])), F.lit(_MEAN_CLIP[1]))
    e = F.coalesce(F.col("tess"), F.col("cess"), F.when(no_posteriors, F.col("eess")), F.lit(default_ess))
    return titles.select("title_id", (m * e).alias("eb_alpha"), ((1 - m) * e).alias("eb_beta"))


def cap(df: DataFrame, max_ess: float) -> DataFrame:
    """Scale alpha, beta and n_impressions so alpha + beta <= max_ess."""
    k = F.least(F.lit(1.0), F.lit(max_ess) / (F.col("alpha") + F.col("beta")))
    return df.withColumn("_k", k).select(
        *[c for c in df.columns if c not in ("alpha", "beta", "n_impressions")],
        (F.col("alpha") * F.col("_k")).alias("alpha"), (F.col("beta") * F.col("_k")).alias("beta"),
        (F.col("n_impressions") * F.col("_k")).alias("n_impressions"),
    )


def transform(previous: DataFrame, rewards: DataFrame, artworks: DataFrame, members: DataFrame, params: PriorParams) -> DataFrame:
    """Today's priors (contracts.PRIORS) from the previous partition's (``params.gap_days`` before),
    today's labels and the catalog. Pure."""
    d = params.carry
    active = active_artworks(artworks, params.ds)
    carried = previous.join(active.select("artwork_id"), "artwork_id").select(
        "artwork_id", "segment", (F.col("alpha") * d).alias("ca"), (F.col("beta") * d).alias("cb"), (F.col("n_impressions") * d).alias("cn")
    )
    ev = evidence(rewards, members)

    def updated(df: DataFrame) -> DataFrame:
        return df.select(
            "title_id", "artwork_id", "segment",
            (F.col("ca") + F.coalesce("s", F.lit(0.0))).alias("alpha"),
            (F.col("cb") + F.coalesce("f", F.lit(0.0))).alias("beta"),
            (F.col("cn") + F.coalesce("n", F.lit(0.0))).alias("n_impressions"),
        )

    all_ev = ev.where(F.col("segment") == feature_spec.SEGMENT_ALL).drop("segment")
    all_rows = active.join(carried.where(F.col("segment") == feature_spec.SEGMENT_ALL).drop("segment"), "artwork_id", "left").join(all_ev, "artwork_id", "left")
    all_rows = all_rows.withColumn("segment", F.lit(feature_spec.SEGMENT_ALL))
    known = cap(updated(all_rows.where(F.col("ca").isNotNull())), params.max_ess)
    eb = eb_priors(known, active, params, evidence=active.join(all_ev, "artwork_id").select("title_id", "s", "n"))
    new = all_rows.where(F.col("ca").isNull()).join(eb, "title_id", "left").select(
        "title_id", "artwork_id", "segment", "s", "f", "n",
        F.col("eb_alpha").alias("ca"), F.col("eb_beta").alias("cb"), F.lit(0.0).alias("cn"),
    )
    all_post = known.unionByName(cap(updated(new), params.max_ess))

    seg_ev = ev.where(F.col("segment") != feature_spec.SEGMENT_ALL)
    seg_carried = carried.where(F.col("segment") != feature_spec.SEGMENT_ALL)
    seg_rows = seg_carried.join(seg_ev, ["artwork_id", "segment"], "full").join(active, "artwork_id").select(
        "title_id", "artwork_id", "segment", F.coalesce("ca", F.lit(0.0)).alias("ca"), F.coalesce("cb", F.lit(0.0)).alias("cb"),
        F.coalesce("cn", F.lit(0.0)).alias("cn"), "s", "f", "n",
    )
    seg_post = updated(seg_rows).join(all_post.select("artwork_id", _mean().alias("m_all")), "artwork_id")
    fill = F.greatest(F.lit(0.0), F.lit(params.min_segment_impressions) - F.col("alpha") - F.col("beta"))
    seg_post = seg_post.select(
        "title_id", "artwork_id", "segment",
        (F.col("alpha") + fill * F.col("m_all")).alias("alpha"),
        (F.col("beta") + fill * (1 - F.col("m_all"))).alias("beta"),
        "n_impressions",
    )
    return conform(all_post.unionByName(cap(seg_post, params.max_ess)), PRIORS)


def extract(spark: SparkSession, lake: Lake, ds: str, previous_ds: str | None) -> tuple[DataFrame, DataFrame, DataFrame, DataFrame]:
    previous = read_days(spark, lake.priors, [previous_ds] if previous_ds else [], PRIORS.spark_schema())
    rewards = read_days(spark, lake.rewards, [ds], REWARDS.spark_schema())
    return previous, rewards, read_table(spark, lake.artworks, ARTWORKS), read_table(spark, lake.members, MEMBERS)


def segment_exprs() -> list[Column]:
    """Per segment: rows, mean posterior mean and mean alpha + beta (computed while writing)."""
    out = []
    for i, seg in enumerate(SEGMENTS):
        here = F.col("segment") == F.lit(seg)
        out += [F.count(F.when(here, F.lit(1))).alias(f"seg{i}_rows"), F.avg(F.when(here, _mean())).alias(f"seg{i}_mean"),
                F.avg(F.when(here, F.col("alpha") + F.col("beta"))).alias(f"seg{i}_ess")]
    return out


def load(priors: DataFrame, lake: Lake, ds: str) -> dict[str, Any]:
    """Write ``priors/ds=D``; returns its rows, content hash and :func:`segment_exprs` figures."""
    return write_day_observed(priors, lake.priors(ds), extra=segment_exprs())


def run(spark: SparkSession, lake: Lake, args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    previous_ds = previous_priors_day(lake, args.ds, settings.prior_max_gap_days)
    gap = (parse_ds(args.ds) - parse_ds(previous_ds)).days if previous_ds else 1
    params = PriorParams.from_settings(args.ds, settings, gap_days=gap)
    previous, rewards, artworks, members = extract(spark, lake, args.ds, previous_ds)
    written = load(transform(previous, rewards, artworks, members, params), lake, args.ds)
    by_seg = {seg: {"rows": int(written[f"seg{i}_rows"]), "mean": float(written[f"seg{i}_mean"] or 0.0),
                    "ess": float(written[f"seg{i}_ess"] or 0.0)}
              for i, seg in enumerate(SEGMENTS) if written[f"seg{i}_rows"]}
    figures = {"segments": by_seg, "warm_started": previous_ds is not None, "warm_start_ds": previous_ds,
               "warm_start_gap_days": gap if previous_ds else None, "decay": params.decay, "max_ess": params.max_ess,
               "output": {"rows": written["rows"], "content_hash": written["content_hash"]}}
    write_metrics(lake, "priors", args.ds, figures)
    return figures


def main(argv: list[str] | None = None) -> int:
    return main_for("priors", __doc__, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
