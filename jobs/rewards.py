"""rewards: label the impressions whose attribution window closed on day D.

    spark-submit jobs/rewards.py --ds 2026-03-01 [--lake LAKE] [--master URL]
    keyart job rewards --ds 2026-03-01

Reads ``clean/impressions`` and ``clean/plays`` for days D-k..D (k = ceil(window / 24 h)),
writes ``rewards/ds=D/`` (contracts.REWARDS) and ``metrics/rewards/ds=D/metrics.json``.

Attribution, with W = ``attribution_window_hours`` and Q = ``quality_play_minutes``:

* a play of title t by member m at time p is credited to the *latest* impression of t to
  m at or before p (ties: the larger event_id), if p < impression ts + W; so a play is
  credited to at most one impression and a play before every impression to none;
* an impression is labelled by the run D whose day contains its window end ts + W (and
  only if the plays reach that far), so each impression is labelled exactly once, by a
  stateless run that sees every play of its window; an impression whose window is still
  open stays unlabelled (it is not a negative);
* minutes = the longest credited play (0 if none), reward = 1 if minutes >= Q,
  played = 1 if any play was credited.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
from dataclasses import dataclass
from typing import Any

from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from keyart.config import Settings
from keyart.contracts import IMPRESSIONS, PLAYS, REWARDS
from keyart.jobs.common import conform, main_for, read_days, write_day, write_metrics
from keyart.lake import Lake, parse_ds, shift_ds


@dataclass(frozen=True)
class RewardParams:
    """Attribution settings for one run."""

    ds: str
    attribution_window_hours: float
    quality_play_minutes: float
    plays_through: dt.datetime | None = None
    """Plays are complete up to this instant (UTC); default the end of ``ds``."""

    @classmethod
    def from_settings(cls, ds: str, settings: Settings, plays_through: dt.datetime | None = None) -> RewardParams:
        return cls(ds, settings.attribution_window_hours, settings.quality_play_minutes, plays_through)

    @property
    def window_micros(self) -> int:
        return int(round(self.attribution_window_hours * 3600 * 1_000_000))

    @property
    def day_start(self) -> dt.datetime:
        return dt.datetime.combine(parse_ds(self.ds), dt.time(), tzinfo=dt.UTC)

    @property
    def day_end(self) -> dt.datetime:
        return self.day_start + dt.timedelta(days=1)

    @property
    def horizon(self) -> dt.datetime:
        return min(self.day_end, self.plays_through) if self.plays_through else self.day_end


def input_days(ds: str, window_hours: float) -> list[str]:
    """Days whose impressions and plays can touch a window that closes on ``ds``."""
    back = math.ceil(window_hours / 24.0)
    return [shift_ds(ds, -i) for i in range(back, -1, -1)]


def _ts(value: dt.datetime) -> Column:
    """A timestamp literal from an aware datetime (independent of the process time zone)."""
    return F.lit(value.astimezone(dt.UTC))


def window_end(ts: Column, params: RewardParams) -> Column:
    return F.timestamp_micros(F.unix_micros(ts) + F.lit(params.window_micros))


def extract(spark: SparkSession, lake: Lake, ds: str, window_hours: float) -> tuple[DataFrame, DataFrame, dt.datetime | None]:
    """Clean impressions and plays of the input days, and how far the plays reach."""
    days = input_days(ds, window_hours)
    impressions = read_days(spark, lambda d: lake.clean("impressions", d), days, IMPRESSIONS.spark_schema())
    plays = read_days(spark, lambda d: lake.clean("plays", d), days, PLAYS.spark_schema())
    # Without day D's play partition (ingest writes one even when empty) the windows
    # closing on D are not complete: label nothing rather than label too early.
    plays_through = None if lake.clean("plays", ds).is_dir() else dt.datetime.combine(parse_ds(ds), dt.time(), tzinfo=dt.UTC)
    return impressions, plays, plays_through


def credited_plays(impressions: DataFrame, plays: DataFrame, params: RewardParams) -> DataFrame:
    """Per impression that got credit: ``event_id, minutes, n_plays`` (longest credited play)."""
    imp = impressions.select(
        "event_id", "member_id", "title_id", F.col("ts").alias("imp_ts"), window_end(F.col("ts"), params).alias("imp_end")
    )
    play = plays.select("member_id", "title_id", F.col("ts").alias("play_ts"), "minutes_played")
    joined = play.join(imp, on=["member_id", "title_id"]).where((F.col("imp_ts") <= F.col("play_ts")) & (F.col("play_ts") < F.col("imp_end")))
    latest = Window.partitionBy("member_id", "title_id", "play_ts").orderBy(F.col("imp_ts").desc(), F.col("event_id").desc())
    credited = joined.withColumn("_rank", F.row_number().over(latest)).where(F.col("_rank") == 1)
    return credited.groupBy("event_id").agg(F.max("minutes_played").alias("minutes"), F.count(F.lit(1)).alias("n_plays"))


def transform(impressions: DataFrame, plays: DataFrame, params: RewardParams) -> DataFrame:
    """Labelled impressions (contracts.REWARDS columns) for the windows closing on ``params.ds``. Pure."""
    end = window_end(F.col("ts"), params)
    closing = impressions.where((end >= _ts(params.day_start)) & (end < _ts(params.day_end)) & (end <= _ts(params.horizon)))
    credit = credited_plays(impressions, plays, params)
    labelled = closing.join(credit, on="event_id", how="left").select(
        *[F.col(c) for c in IMPRESSIONS.columns],
        F.to_date("ts").alias("impression_ds"),
        (F.coalesce(F.col("minutes"), F.lit(0.0)) >= F.lit(params.quality_play_minutes)).cast("int").alias("reward"),
        F.coalesce(F.col("minutes"), F.lit(0.0)).alias("minutes"),
        F.col("n_plays").isNotNull().cast("int").alias("played"),
    )
    return conform(labelled, REWARDS)


def metrics(rewards: DataFrame, impressions: DataFrame, params: RewardParams) -> dict[str, Any]:
    """Counts for the DAG: labelled, rewarded, played, windows still open, take rate."""
    row = rewards.agg(
        F.count(F.lit(1)).alias("labelled"), F.sum("reward").alias("rewarded"), F.sum("played").alias("played"),
        F.sum("minutes").alias("minutes"),
    ).first()
    still_open = impressions.where(window_end(F.col("ts"), params) >= _ts(params.horizon)).count()
    labelled = int(row["labelled"] or 0)
    rewarded = int(row["rewarded"] or 0)
    return {
        "labelled": labelled,
        "rewarded": rewarded,
        "played": int(row["played"] or 0),
        "minutes": float(row["minutes"] or 0.0),
        "take_rate": rewarded / labelled if labelled else None,
        "still_open": still_open,
        "attribution_window_hours": params.attribution_window_hours,
        "quality_play_minutes": params.quality_play_minutes,
        "plays_through": params.horizon.isoformat(),
    }


def load(rewards: DataFrame, lake: Lake, ds: str) -> None:
    write_day(rewards, lake.rewards(ds))


def run(spark: SparkSession, lake: Lake, args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    impressions, plays, plays_through = extract(spark, lake, args.ds, settings.attribution_window_hours)
    params = RewardParams.from_settings(args.ds, settings, plays_through)
    rewards = transform(impressions, plays, params)
    load(rewards, lake, args.ds)
    written = spark.read.schema(REWARDS.spark_schema()).parquet(str(lake.rewards(args.ds)))
    figures = metrics(written, impressions, params)
    write_metrics(lake, "rewards", args.ds, figures)
    return figures


def main(argv: list[str] | None = None) -> int:
    return main_for("rewards", __doc__, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
