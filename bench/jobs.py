"""``keyart bench jobs``: wall time of each Spark job and of the chain on a simulated lake, with DuckDB as reference.

    keyart bench jobs --impressions 1000000 [--json] [--master local[2]] [--keep LAKE]

Builds a world with :mod:`keyart.sim` and two days of random-policy traffic (D-1 and D,
half of ``--impressions`` each, 10 impressions a visit), ingests its 28 days of play
history (setup, timed apart), then times on one Spark application: ingest (D-1..D),
rewards, features and priors for D, and the whole chain including the session start.
The single-node reference runs DuckDB on the same clean Parquet: the same attribution
(latest impression before a play, inside the window, labelled on the day its window
closes) and the per-artwork aggregation (labelled, rewarded), against Spark doing exactly
that (``rewards.transform`` + the same aggregation); both must agree on the figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from keyart.lake import Lake, shift_ds

DS = "2026-11-02"
IMPRESSIONS_PER_VISIT = 10


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--impressions", type=int, default=1_000_000, help="impressions over the two traffic days (default %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--master", default="local[2]", help="Spark master (default %(default)s)")
    parser.add_argument("--keep", type=Path, default=None, help="build the lake here and keep it (default: a temporary folder)")
    parser.add_argument("--seed", type=int, default=7)


def build_lake(root: Path, impressions: int, seed: int) -> dict[str, Any]:
    """A simulated world plus traffic for D-1 and D (random policy)."""
    from keyart.sim.choosers import RandomChooser
    from keyart.sim.traffic import simulate_day
    from keyart.sim.world import World

    world = World.build(seed=seed, start=shift_ds(DS, -1), history_days=28)
    saved = world.save(root)
    visits = max(1, impressions // (2 * IMPRESSIONS_PER_VISIT))
    days = [simulate_day(world, d, RandomChooser(), visits=visits, seed=seed, lake_root=root) for d in (shift_ds(DS, -1), DS)]
    return {"history_plays": saved["history_plays"], "impressions": sum(d["impressions"] for d in days),
            "plays": sum(d["plays"] for d in days)}


ATTRIBUTION_SQL = """
WITH imp AS (SELECT event_id, member_id, title_id, artwork_id, ts, ts + to_microseconds({w_us}) AS imp_end
             FROM read_parquet({imp_files})),
     play AS (SELECT member_id, title_id, ts AS play_ts, minutes_played FROM read_parquet({play_files})),
     credit AS (
         SELECT event_id, max(minutes_played) AS minutes FROM (
             SELECT i.event_id, p.minutes_played,
                    row_number() OVER (PARTITION BY p.member_id, p.title_id, p.play_ts ORDER BY i.ts DESC, i.event_id DESC) AS rk
             FROM play p JOIN imp i ON p.member_id = i.member_id AND p.title_id = i.title_id
                                    AND i.ts <= p.play_ts AND p.play_ts < i.imp_end)
         WHERE rk = 1 GROUP BY event_id),
     labelled AS (
         SELECT i.artwork_id, CAST(coalesce(c.minutes, 0) >= {q} AS INTEGER) AS reward
         FROM imp i LEFT JOIN credit c USING (event_id)
         WHERE i.imp_end >= TIMESTAMPTZ '{start}' AND i.imp_end < TIMESTAMPTZ '{end}')
SELECT artwork_id, count(*) AS labelled, sum(reward) AS rewarded FROM labelled GROUP BY artwork_id
"""


def duckdb_attribution(lake: Lake, ds: str, window_hours: float, quality_minutes: float) -> tuple[float, dict[str, int]]:
    import duckdb

    from keyart.jobs.rewards import input_days

    days = input_days(ds, window_hours)

    def files(log: str) -> str:
        return "[" + ", ".join(f"'{p}'" for d in days for p in sorted(lake.clean(log, d).glob("*.parquet"))) + "]"

    sql = ATTRIBUTION_SQL.format(
        w_us=int(window_hours * 3600e6), imp_files=files("impressions"), play_files=files("plays"), q=quality_minutes,
        start=f"{ds} 00:00:00+00", end=f"{shift_ds(ds, 1)} 00:00:00+00",
    )
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.execute("SET threads = 2")
    started = time.perf_counter()
    rows = con.execute(sql).fetchall()
    seconds = time.perf_counter() - started
    con.close()
    return seconds, {"labelled": sum(r[1] for r in rows), "rewarded": int(sum(r[2] for r in rows)), "artworks": len(rows)}


def spark_attribution(spark, lake: Lake, ds: str, settings) -> tuple[float, dict[str, int]]:
    from pyspark.sql import functions as F

    from keyart.jobs import rewards

    started = time.perf_counter()
    inputs = rewards.extract(spark, lake, ds, settings)
    # the windows closing on ds only (no pending ones from earlier days), as the reference does
    params = rewards.RewardParams(ds, settings.attribution_window_hours, settings.quality_play_minutes,
                                  complete_from=inputs.complete_from)
    labelled = rewards.transform(inputs.impressions, inputs.plays, params)
    rows = labelled.groupBy("artwork_id").agg(F.count(F.lit(1)).alias("labelled"), F.sum("reward").alias("rewarded")).collect()
    seconds = time.perf_counter() - started
    return seconds, {"labelled": sum(r[1] for r in rows), "rewarded": int(sum(r[2] for r in rows)), "artworks": len(rows)}


def bench(root: Path, impressions: int, master: str, seed: int) -> dict[str, Any]:
    from keyart.config import Settings
    from keyart.jobs import features, ingest, priors, rewards
    from keyart.jobs.common import day_range, get_spark

    settings = Settings()
    lake = Lake(root)
    t0 = time.perf_counter()
    data = build_lake(root, impressions, seed)
    timings: dict[str, float] = {"simulate": time.perf_counter() - t0}
    history = sorted(p.name[3:] for p in (root / "raw" / "plays").glob("ds=*") if p.name[3:] < shift_ds(DS, -1))

    def job_args(ds: str, through: str | None = None) -> argparse.Namespace:
        return argparse.Namespace(ds=ds, through=through, lake=str(root), master=master, shuffle_partitions=None)

    chain_start = time.perf_counter()
    spark = get_spark("keyart-bench-jobs", master=master, ui=False, settings=settings)
    try:
        timings["session_start"] = time.perf_counter() - chain_start
        steps = [("ingest", ingest, job_args(shift_ds(DS, -1), DS)), ("rewards", rewards, job_args(DS)),
                 ("features", features, job_args(DS)), ("priors", priors, job_args(DS))]
        if history:
            t = time.perf_counter()
            ingest.run(spark, lake, job_args(history[0], history[-1]), settings)
            timings["ingest_history"] = time.perf_counter() - t
        for name, module, a in steps:
            t = time.perf_counter()
            module.run(spark, lake, a, settings)
            timings[name] = time.perf_counter() - t
        timings["chain"] = time.perf_counter() - chain_start - timings.get("ingest_history", 0.0)
        spark_s, spark_figures = spark_attribution(spark, lake, DS, settings)
    finally:
        spark.stop()
    duck_s, duck_figures = duckdb_attribution(lake, DS, settings.attribution_window_hours, settings.quality_play_minutes)
    ingest_metrics = {d: json.loads(lake.metrics("ingest", d).read_text())["impressions"]["clean"] for d in day_range(shift_ds(DS, -1), DS)}
    return {
        "master": master, "impressions": data["impressions"], "plays": data["plays"], "history_plays": data["history_plays"],
        "history_days": len(history), "clean_impressions": ingest_metrics,
        "labelled": spark_figures["labelled"], "rewarded": spark_figures["rewarded"],
        "training_rows": json.loads(lake.metrics("features", DS).read_text())["training_rows"],
        "seconds": {k: round(v, 2) for k, v in timings.items()},
        "attribution": {"spark_seconds": round(spark_s, 2), "duckdb_seconds": round(duck_s, 3),
                        "spark_over_duckdb": round(spark_s / duck_s, 1) if duck_s else None,
                        "agree": spark_figures == duck_figures, "spark": spark_figures, "duckdb": duck_figures},
    }


def render(result: dict[str, Any]) -> str:
    s = result["seconds"]
    a = result["attribution"]
    lines = [
        f"keyart bench jobs: {result['impressions']:,} impressions, {result['plays']:,} plays, "
        f"{result['history_plays']:,} history plays ({result['history_days']} days), master {result['master']}",
        f"labelled {result['labelled']:,} impressions on {DS}, {result['rewarded']:,} rewarded; {result['training_rows']:,} training rows",
        "",
        f"{'step':<28}{'seconds':>10}",
    ]
    for key in ("simulate", "ingest_history", "session_start", "ingest", "rewards", "features", "priors", "chain"):
        if key in s:
            label = {"chain": "whole chain (session + 4 jobs)", "ingest": "ingest (2 traffic days)"}.get(key, key)
            lines.append(f"{label:<28}{s[key]:>10.2f}")
    lines += [
        "",
        f"{'attribution + aggregation':<28}{'seconds':>10}",
        f"{'spark ' + result['master']:<28}{a['spark_seconds']:>10.2f}",
        f"{'duckdb (2 threads)':<28}{a['duckdb_seconds']:>10.3f}",
        f"{'ratio spark / duckdb':<28}{a['spark_over_duckdb']:>10}",
        f"same figures: {a['agree']} (labelled {a['duckdb']['labelled']:,}, rewarded {a['duckdb']['rewarded']:,})",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    root = args.keep or Path(tempfile.mkdtemp(prefix="keyart-bench-jobs-"))
    try:
        result = bench(root, args.impressions, args.master, args.seed)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0 if result["attribution"]["agree"] else 1
