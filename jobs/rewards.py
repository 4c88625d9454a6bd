"""rewards: label the impressions whose attribution window closed, once the plays are complete.

    spark-submit jobs/rewards.py --ds 2026-03-01 [--lake LAKE] [--master URL]
    keyart job rewards --ds 2026-03-01

Reads ``clean/impressions``, ``clean/plays`` with their completeness markers
(``clean/plays/ds=X/_COMPLETE``), ``clean/late_plays`` and the other ``rewards`` partitions
of the days around D; writes ``rewards/ds=D/`` (contracts.REWARDS), rewrites earlier
``rewards/ds=X/`` whose labels late plays changed, and ``metrics/rewards/ds=D/metrics.json``.

Attribution, with W = ``attribution_window_hours`` and Q = ``quality_play_minutes``:

* a play of title t by member m at time p is credited to the *latest* impression of t to
  m at or before p (ties: the larger event_id), if p < impression ts + W; so a play is
  credited to at most one impression and a play before every impression to none;
* an impression is labelled once its window [ts, ts + W) has closed *and* the play log is
  complete through ts + W (the markers of every day from ts's day on); its label is
  written by the run D whose day contains ts + W, or, when the plays were not complete
  then, by the first later run (within ``rewards_pending_days``) that finds them complete.
  Missing plays never make a negative: such an impression waits (``pending`` in the
  metrics, with the days whose plays are missing and why) and is dropped unlabelled
  (``expired``) if they never come. An impression already labelled in another partition is
  never labelled again, so each impression is labelled by exactly one run;
* minutes = the longest credited play (0 if none), reward = 1 if minutes >= Q,
  played = 1 if any play was credited;
* late plays (delivered on D, started on one of the ``late_play_lookback_days`` days
  before) count like any other: the labels they change in ``rewards/ds=X`` for X in
  [D - lookback, D - 1] are rewritten in place (same impressions, new labels), and the
  metrics count them (``relabelled``). Priors and training rows built from the old labels
  are not rewritten by this job (docs/jobs.md).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from keyart.config import Settings
from keyart.contracts import IMPRESSIONS, PLAYS, REWARDS
from keyart.jobs.common import (
    conform,
    day_range,
    has_data,
    main_for,
    read_days,
    staging,
    swap_in,
    write_day_observed,
    write_metrics,
)
from keyart.lake import Lake, day_bounds, fmt_ds, parse_ds, read_plays_marker, shift_ds

log = logging.getLogger(__name__)

LABELS = ("reward", "minutes", "played")


@dataclass(frozen=True)
class RewardParams:
    """Attribution settings for one run."""

    ds: str
    attribution_window_hours: float
    quality_play_minutes: float
    plays_through: dt.datetime | None = None
    """Plays are complete up to this instant (UTC) at most; default the end of ``ds``."""
    complete_from: Mapping[str, dt.datetime] | None = field(default=None, compare=False)
    """Per impression day s (YYYY-MM-DD): the plays are complete from the start of s up to this
    instant (:func:`complete_reach`). None: complete up to ``plays_through``; a day not in the
    mapping: not complete at all."""
    pending_days: int = 0
    """Windows that closed up to this many days before ``ds`` and are not labelled elsewhere are
    labelled by this run (when their plays are complete)."""

    @classmethod
    def from_settings(cls, ds: str, settings: Settings, plays_through: dt.datetime | None = None) -> RewardParams:
        return cls(ds, settings.attribution_window_hours, settings.quality_play_minutes, plays_through)

    @property
    def window_micros(self) -> int:
        return int(round(self.attribution_window_hours * 3600 * 1_000_000))

    @property
    def day_start(self) -> dt.datetime:
        return day_bounds(self.ds)[0]

    @property
    def day_end(self) -> dt.datetime:
        return day_bounds(self.ds)[1]

    @property
    def first_window_end(self) -> dt.datetime:
        """The earliest window end this run may label (the start of ds - pending_days)."""
        return self.day_start - dt.timedelta(days=self.pending_days)

    @property
    def horizon(self) -> dt.datetime:
        return min(self.day_end, self.plays_through) if self.plays_through else self.day_end


def window_days(window_hours: float) -> int:
    """k: a window that closes on day X opened on day X - k at the earliest."""
    return math.ceil(window_hours / 24.0)


def input_days(ds: str, window_hours: float) -> list[str]:
    """Days whose impressions and plays can touch a window that closes on ``ds``."""
    back = window_days(window_hours)
    return [shift_ds(ds, -i) for i in range(back, -1, -1)]


def _ts(value: dt.datetime) -> Column:
    """A timestamp literal from an aware datetime (independent of the process time zone)."""
    return F.lit(value.astimezone(dt.UTC))


def window_end(ts: Column, params: RewardParams) -> Column:
    return F.timestamp_micros(F.unix_micros(ts) + F.lit(params.window_micros))


def plays_complete(ts: Column, end: Column, params: RewardParams) -> Column:
    """True when the plays are complete through ``end`` for a window opened at ``ts``."""
    within = end <= _ts(params.horizon)
    if params.complete_from is None:
        return within
    if not params.complete_from:
        return F.lit(False)
    pairs = [c for day, reach in sorted(params.complete_from.items()) for c in (F.lit(day), _ts(reach))]
    reach = F.create_map(*pairs)[F.date_format(ts, "yyyy-MM-dd")]
    return within & F.coalesce(end <= reach, F.lit(False))


# ----------------------------------------------------------------------------------------
# completeness of the play log
# ----------------------------------------------------------------------------------------

def complete_reach(covered: Mapping[str, dt.datetime | None], days: list[str]) -> dict[str, dt.datetime]:
    """For each day s of ``days`` (consecutive, oldest first): how far the plays are complete
    from the start of s, walking forward while each day is covered to its end.

    ``covered[d]`` is the instant up to which the plays of d are complete (within d), None
    when d has no valid marker. The last day's reach is its own coverage.
    """
    out: dict[str, dt.datetime] = {}
    for i in range(len(days) - 1, -1, -1):
        d = days[i]
        start, end = day_bounds(d)
        cov = covered.get(d) or start
        out[d] = out[days[i + 1]] if cov >= end and i + 1 < len(days) else min(cov, end)
    return out


def read_completeness(lake: Lake, days: list[str]) -> tuple[dict[str, dt.datetime | None], dict[str, str]]:
    """Coverage of each day's clean plays (from ``clean/plays/ds=X/_COMPLETE``) and, for the days
    not covered to their end, why (ingest's reason when it recorded one)."""
    covered: dict[str, dt.datetime | None] = {}
    why: dict[str, str] = {}
    for d in days:
        marker, reason = read_plays_marker(lake.plays_marker(d, "clean"), d)
        covered[d] = marker.covered_until if marker else None
        if marker is None:
            ingest_reason = _ingest_completeness(lake, d).get("reason")
            if not lake.clean("plays", d).is_dir():
                why[d] = f"plays of {d} were not ingested"
            else:
                why[d] = f"plays of {d} are not complete: {ingest_reason or reason}"
        elif not marker.whole_day:
            why[d] = f"plays of {d} are complete only through {marker.covered_until.isoformat()}"
    return covered, why


def _ingest_completeness(lake: Lake, ds: str) -> dict[str, Any]:
    try:
        return json.loads(lake.metrics("ingest", ds).read_text()).get("plays", {}).get("completeness") or {}
    except (OSError, ValueError, AttributeError):
        return {}


def first_window_end_day(lake: Lake, ds: str, pending_days: int) -> str:
    """The earliest window-end day this run must consider: ``ds`` when the run of the day
    before recorded nothing pending, else the oldest pending day it recorded (at least
    ``ds - pending_days``); ``ds - pending_days`` when that run left no metrics."""
    first = shift_ds(ds, -pending_days)
    if pending_days <= 0:
        return ds
    try:
        before = json.loads(lake.metrics("rewards", shift_ds(ds, -1)).read_text())
    except (OSError, ValueError):
        return first
    if not isinstance(before.get("pending"), int):
        return first
    if before["pending"] == 0:
        return ds
    oldest = before.get("pending_since")
    return max(first, oldest) if isinstance(oldest, str) else first


# ----------------------------------------------------------------------------------------
# extract
# ----------------------------------------------------------------------------------------

@dataclass
class Inputs:
    """What one run reads."""

    impressions: DataFrame
    plays: DataFrame
    labelled_elsewhere: DataFrame
    complete_from: dict[str, dt.datetime]
    incomplete: dict[str, str]
    first_end_day: str
    late_today: int
    relabel_from: dt.datetime | None
    """Labels of earlier partitions for impressions at or after this instant are recomputed
    (late plays were delivered today); None: no relabelling."""


def read_plays(spark: SparkSession, lake: Lake, days: list[str], lookback_days: int) -> DataFrame:
    """Clean plays that started on ``days``, with the late plays of those days delivered up to
    ``lookback_days`` later (a play delivered twice is kept once, the on-time copy first)."""
    schema = PLAYS.spark_schema()
    plays = read_days(spark, lambda d: lake.clean("plays", d), days, schema)
    if lookback_days <= 0:
        return plays
    deliveries = [d for d in day_range(shift_ds(days[0], 1), shift_ds(days[-1], lookback_days)) if has_data(lake.late_plays(d))]
    if not deliveries:
        return plays
    late = read_days(spark, lake.late_plays, deliveries, schema, ds_column="_delivered")
    late = late.where(F.to_date("ts").between(F.lit(days[0]).cast("date"), F.lit(days[-1]).cast("date")))
    both = plays.withColumn("_delivered", F.lit(None).cast("date")).unionByName(late)
    first = Window.partitionBy(*PLAYS.key).orderBy(F.col("_delivered").asc_nulls_first())
    return both.withColumn("_n", F.row_number().over(first)).where(F.col("_n") == 1).drop("_n", "_delivered")


def extract(spark: SparkSession, lake: Lake, ds: str, settings: Settings) -> Inputs:
    """Impressions, plays, completeness and the labels of other runs this run needs."""
    k = window_days(settings.attribution_window_hours)
    first_end = first_window_end_day(lake, ds, settings.rewards_pending_days)
    lookback = settings.late_play_lookback_days
    late_today = 0
    relabel_from = None
    first_day = shift_ds(first_end, -k)
    if lookback > 0 and has_data(lake.late_plays(ds)):
        late_today = spark.read.schema(PLAYS.spark_schema()).parquet(str(lake.late_plays(ds))).count()
        # a play that started on D - lookback can only be credited to impressions from D - lookback - k on
        relabel_start = shift_ds(ds, -lookback - k)
        relabel_from = day_bounds(relabel_start)[0]
        first_day = min(first_day, relabel_start)
    days = day_range(first_day, ds)
    impressions = read_days(spark, lambda d: lake.clean("impressions", d), days, IMPRESSIONS.spark_schema())
    plays = read_plays(spark, lake, days, lookback)
    covered, incomplete = read_completeness(lake, days)
    others = [d for d in day_range(first_end, shift_ds(ds, settings.rewards_pending_days)) if d != ds]
    labelled = read_days(spark, lake.rewards, others, REWARDS.spark_schema()).select("event_id")
    return Inputs(impressions, plays, labelled, complete_reach(covered, days), incomplete, first_end, late_today, relabel_from)


# ----------------------------------------------------------------------------------------
# transform
# ----------------------------------------------------------------------------------------

def attribute(impressions: DataFrame, plays: DataFrame, params: RewardParams) -> DataFrame:
    """Every impression (its columns) with ``minutes``, the longest play credited to it (null
    if none), and ``n_plays``, the number of plays credited to it. Pure.

    One shuffle and no join: impressions and plays of a (member, title) are one time line,
    ordered by ts with an impression before a play at the same instant (tᵢ ≤ p) and impressions
    of the same instant by event_id. A play belongs to the last impression before it on that
    line (the latest, ties to the larger event_id), credited if it started inside that
    impression's window: since every window is W long, when the latest impression's window
    does not hold the play no earlier one does."""
    key = ["member_id", "title_id"]
    imps = impressions.select(*impressions.columns, F.lit(False).alias("_is_play"), F.lit(None).cast("double").alias("_minutes"))
    play = plays.select(*key, "ts", F.lit(True).alias("_is_play"), F.col("minutes_played").alias("_minutes"))
    line = imps.unionByName(play, allowMissingColumns=True)
    before = Window.partitionBy(*key).orderBy("ts", "_is_play", "event_id").rowsBetween(Window.unboundedPreceding, Window.currentRow)
    line = line.select(
        "*",
        F.last("event_id", ignorenulls=True).over(before).alias("_imp"),
        F.last(F.when(~F.col("_is_play"), F.col("ts")), ignorenulls=True).over(before).alias("_imp_ts"),
    )
    credited = F.col("_is_play") & F.col("_imp_ts").isNotNull() & (F.col("ts") < window_end(F.col("_imp_ts"), params))
    same_impression = Window.partitionBy(*key, "_imp")
    line = line.select(
        "*",
        F.max(F.when(credited, F.col("_minutes"))).over(same_impression).alias("minutes"),
        F.count(F.when(credited, F.lit(1))).over(same_impression).alias("n_plays"),
    )
    return line.where(~F.col("_is_play")).select(*impressions.columns, "minutes", "n_plays")


def credited_plays(impressions: DataFrame, plays: DataFrame, params: RewardParams) -> DataFrame:
    """Per impression that got credit: ``event_id, minutes, n_plays`` (longest credited play)."""
    return attribute(impressions.select("event_id", "member_id", "title_id", "ts"), plays, params).where(F.col("n_plays") > 0) \
        .select("event_id", "minutes", "n_plays")


def closed_windows(impressions: DataFrame, params: RewardParams, labelled_elsewhere: DataFrame | None = None) -> DataFrame:
    """Impressions whose window closed in [first_window_end, end of ds) and that no other run
    labelled, with ``complete`` (the plays reach the window end) and ``window_end``."""
    end = window_end(F.col("ts"), params)
    closed = impressions.where((end >= _ts(params.first_window_end)) & (end < _ts(params.day_end)))
    if labelled_elsewhere is not None:
        closed = closed.join(labelled_elsewhere.select("event_id"), on="event_id", how="left_anti")
    return closed.withColumn("window_end", end).withColumn("complete", plays_complete(F.col("ts"), end, params))


def label(impressions: DataFrame, credit: DataFrame | None, params: RewardParams) -> DataFrame:
    """``impressions`` with their labels (contracts.REWARDS columns): from ``credit``
    (:func:`credited_plays`), or, when None, from the ``minutes`` and ``n_plays`` columns
    :func:`attribute` gave them."""
    labelled = impressions if credit is None else impressions.join(credit, on="event_id", how="left")
    minutes = F.coalesce(F.col("minutes"), F.lit(0.0))
    labelled = labelled.select(
        *[F.col(c) for c in IMPRESSIONS.columns],
        F.to_date("ts").alias("impression_ds"),
        (minutes >= F.lit(params.quality_play_minutes)).cast("int").alias("reward"),
        minutes.alias("minutes"),
        (F.coalesce(F.col("n_plays"), F.lit(0)) > 0).cast("int").alias("played"),
    )
    return conform(labelled, REWARDS)


def transform(impressions: DataFrame, plays: DataFrame, params: RewardParams,
              labelled_elsewhere: DataFrame | None = None) -> DataFrame:
    """Labelled impressions (contracts.REWARDS columns) of run ``params.ds``: the windows closing
    on ds, and those that closed in the ``pending_days`` before and were not labelled
    elsewhere, whose plays are complete. Pure.

    Every impression read takes part in the attribution (a later one, even still open, takes
    the credit of a play from an earlier one); only the ready ones are labelled."""
    attributed = attribute(impressions.select(*IMPRESSIONS.columns), plays, params)
    ready = closed_windows(attributed, params, labelled_elsewhere).where(F.col("complete"))
    return label(ready, None, params)


def relabel(previous: DataFrame, impressions: DataFrame, plays: DataFrame, params: RewardParams,
            since: dt.datetime) -> DataFrame:
    """``previous`` labelled rows (with ``labelled_ds``) and their labels recomputed from
    ``plays``, for the rows whose impression is at or after ``since`` (the others keep theirs):
    REWARDS columns + ``labelled_ds`` + ``old_reward``, ``old_minutes``, ``old_played``. Pure."""
    credit = credited_plays(impressions, plays, params)
    old = previous.select(*[F.col(c) for c in REWARDS.columns if c not in LABELS], "labelled_ds",
                          *[F.col(c).alias(f"old_{c}") for c in LABELS])
    new = label(old.where(F.col("ts") >= _ts(since)).select(*IMPRESSIONS.columns), credit, params)
    joined = old.join(new.select("event_id", *LABELS), on="event_id", how="left")
    return joined.select(
        *[F.coalesce(F.col(c), F.col(f"old_{c}")).alias(c) if c in LABELS else F.col(c) for c in REWARDS.columns],
        "labelled_ds", *[f"old_{c}" for c in LABELS],
    )


# ----------------------------------------------------------------------------------------
# metrics and load
# ----------------------------------------------------------------------------------------

def label_exprs(params: RewardParams) -> list[Column]:
    """Aggregates of a run's labelled rows for its metrics (computed while they are written)."""
    return [
        F.count(F.lit(1)).alias("labelled"), F.sum("reward").alias("rewarded"), F.sum("played").alias("played"),
        F.sum("minutes").alias("minutes"),
        F.sum(F.when(window_end(F.col("ts"), params) < _ts(params.day_start), 1).otherwise(0)).alias("labelled_late"),
    ]


def label_figures(row: Mapping[str, Any]) -> dict[str, Any]:
    labelled = int(row["labelled"] or 0)
    rewarded = int(row["rewarded"] or 0)
    return {
        "labelled": labelled,
        "labelled_after_waiting": int(row["labelled_late"] or 0),
        "rewarded": rewarded,
        "played": int(row["played"] or 0),
        "minutes": float(row["minutes"] or 0.0),
        "take_rate": rewarded / labelled if labelled else None,
    }


def window_figures(impressions: DataFrame, params: RewardParams, labelled_anywhere: DataFrame | None = None,
                   expiring_day: str | None = None) -> dict[str, Any]:
    """Windows still open at the end of ds, and closed windows still waiting for complete plays
    (not labelled anywhere): ``pending`` by window-end day, or ``expired`` (closed on
    ``expiring_day``, default ds - pending_days: this run was their last chance). One pass."""
    end = window_end(F.col("ts"), params)
    imps = impressions.select("event_id", "ts")
    if labelled_anywhere is not None:
        done = labelled_anywhere.select("event_id").distinct().withColumn("_done", F.lit(True))
        imps = imps.join(done, "event_id", "left")
    else:
        imps = imps.withColumn("_done", F.lit(None).cast("boolean"))
    closed = (end >= _ts(params.first_window_end)) & (end < _ts(params.day_end))
    waiting = closed & F.col("_done").isNull() & ~plays_complete(F.col("ts"), end, params)
    rows = imps.groupBy(F.when(waiting, F.to_date(end)).alias("day")).agg(
        F.count(F.lit(1)).alias("n"), F.sum(F.when(end >= _ts(params.day_end), 1).otherwise(0)).alias("open")).collect()
    by_day = {fmt_ds(r["day"]): int(r["n"]) for r in rows if r["day"] is not None}
    expired = by_day.pop(expiring_day or fmt_ds(params.first_window_end.date()), 0)
    return {
        "still_open": sum(int(r["open"] or 0) for r in rows),
        "pending": sum(by_day.values()),
        "pending_by_window_end": dict(sorted(by_day.items())),
        "pending_since": min(by_day) if by_day else None,
        "expired": expired,
    }


def metrics(rewards: DataFrame, impressions: DataFrame, params: RewardParams,
            labelled_anywhere: DataFrame | None = None, expiring_day: str | None = None) -> dict[str, Any]:
    """Counts for the DAG: labelled, rewarded, played, take rate (:func:`label_figures`),
    windows still open and closed windows still waiting (:func:`window_figures`).
    ``labelled_anywhere``: event ids labelled by any run, this one included."""
    return {
        **label_figures(rewards.agg(*label_exprs(params)).first().asDict()),
        **window_figures(impressions, params, labelled_anywhere, expiring_day),
        **_parameters(params),
    }


def _parameters(params: RewardParams) -> dict[str, Any]:
    return {"attribution_window_hours": params.attribution_window_hours,
            "quality_play_minutes": params.quality_play_minutes, "pending_days": params.pending_days}


def load(rewards: DataFrame, lake: Lake, ds: str, params: RewardParams | None = None) -> dict[str, Any]:
    """Write ``rewards/ds=D``; returns its rows and content hash (and, with ``params``, the
    :func:`label_exprs` figures), computed while writing."""
    return write_day_observed(rewards, lake.rewards(ds), extra=label_exprs(params) if params else ())


def apply_relabels(spark: SparkSession, lake: Lake, inputs: Inputs, params: RewardParams,
                   lookback_days: int) -> dict[str, dict[str, Any]]:
    """Recompute the labels of the partitions late plays can touch and rewrite those that
    changed; per rewritten day: rows changed, the change in rewarded and played, and the
    rewritten partition's content hash."""
    if inputs.relabel_from is None:
        return {}
    # late plays started on ds - lookback at the earliest: only runs from then on labelled windows they fall in
    days = [d for d in day_range(shift_ds(params.ds, -lookback_days), shift_ds(params.ds, -1)) if has_data(lake.rewards(d))]
    if not days:
        return {}
    previous = read_days(spark, lake.rewards, days, REWARDS.spark_schema(), ds_column="labelled_ds")
    fresh = relabel(previous, inputs.impressions, inputs.plays, params, inputs.relabel_from)
    fresh = fresh.persist()
    try:
        differs = F.lit(False)
        for c in LABELS:
            differs = differs | (F.col(c) != F.col(f"old_{c}"))
        changed = {
            fmt_ds(r["labelled_ds"]): {"rows": int(r["rows"]), "rewarded_delta": int(r["dr"]), "played_delta": int(r["dp"])}
            for r in fresh.where(differs).groupBy("labelled_ds").agg(
                F.count(F.lit(1)).alias("rows"), F.sum(F.col("reward") - F.col("old_reward")).alias("dr"),
                F.sum(F.col("played") - F.col("old_played")).alias("dp"),
            ).collect()
        }
        # every changed day is written aside before any is swapped in: the rows still come
        # from the partitions as they were
        staged = {}
        for day in sorted(changed):
            part = fresh.where(F.col("labelled_ds") == F.lit(day).cast("date"))
            staged[day] = staging(lake.rewards(day))
            shutil.rmtree(staged[day], ignore_errors=True)
            changed[day]["content_hash"] = write_day_observed(conform(part, REWARDS), staged[day])["content_hash"]
        for day, path in staged.items():
            swap_in(path, lake.rewards(day))
            log.info("rewards ds=%s: late plays changed %s labels of rewards/ds=%s", params.ds, changed[day]["rows"], day)
    finally:
        fresh.unpersist()
    return changed


def run(spark: SparkSession, lake: Lake, args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    ds = args.ds
    inputs = extract(spark, lake, ds, settings)
    pending_days = (parse_ds(ds) - parse_ds(inputs.first_end_day)).days
    params = RewardParams(ds, settings.attribution_window_hours, settings.quality_play_minutes,
                          complete_from=inputs.complete_from, pending_days=pending_days)
    written = load(transform(inputs.impressions, inputs.plays, params, inputs.labelled_elsewhere), lake, ds, params)
    relabelled = apply_relabels(spark, lake, inputs, params, settings.late_play_lookback_days)
    expiring = shift_ds(ds, -settings.rewards_pending_days)
    # what this run labelled had complete plays: no waiting window is among them, so the
    # windows still waiting are those not labelled elsewhere (no re-read of what was written)
    figures = {
        **label_figures(written),
        **window_figures(inputs.impressions, params, inputs.labelled_elsewhere, expiring_day=expiring),
        **_parameters(params),
        "output": {"rows": written["rows"], "content_hash": written["content_hash"]},
    }
    k = window_days(settings.attribution_window_hours)
    waiting = list(figures["pending_by_window_end"]) + ([expiring] if figures["expired"] else [])
    # the days whose plays the waiting windows (or, with none, today's windows) need
    first_needed = shift_ds(min(waiting, default=ds), -k)
    figures["plays_incomplete"] = {d: why for d, why in sorted(inputs.incomplete.items()) if d >= first_needed}
    figures["plays_complete_through"] = inputs.complete_from[shift_ds(ds, -k)].isoformat()
    figures["pending_reason"] = (
        "windows closed but the play log is not complete through their end: " + "; ".join(figures["plays_incomplete"].values())
        if figures["pending"] or figures["expired"] else None
    )
    figures["late_plays"] = inputs.late_today
    figures["late_play_lookback_days"] = settings.late_play_lookback_days
    figures["relabelled"] = {d: {k: v for k, v in c.items() if k != "content_hash"} for d, c in relabelled.items()}
    figures["relabelled_content"] = {d: c["content_hash"] for d, c in relabelled.items()}
    figures["relabelled_rows"] = sum(v["rows"] for v in relabelled.values())
    if figures["pending"] or figures["expired"]:
        log.warning("rewards ds=%s: %d impressions wait for complete plays, %d expired: %s", ds, figures["pending"],
                    figures["expired"], figures["pending_reason"])
    write_metrics(lake, "rewards", ds, figures)
    return figures


def main(argv: list[str] | None = None) -> int:
    return main_for("rewards", __doc__, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
