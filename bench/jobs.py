"""``keyart bench jobs``: each Spark job's cost per stage, at two sizes, with DuckDB as reference.

    keyart bench jobs [--impressions 1000000 3000000] [--json] [--master local[2]] [--skip features] [--keep DIR]
    keyart bench jobs --impressions 1000000 --keep DIR --reuse --skip ingest rewards priors   # one job, built lake

For each size N: builds a world with :mod:`keyart.sim` and two days of random-policy traffic
(D-1 and D, N/2 impressions each, 10 impressions a visit), ingests its 28 days of play
history (setup, timed apart), then runs on one Spark application: ingest (D-1..D), rewards,
features and priors for D. Every job runs under its own Spark job group, and its cost is
read back from the application's own REST API (``/api/v1/applications/<id>/jobs`` and
``/stages``, the UI bound to 127.0.0.1 on a free port): per Spark stage the tasks, wall
seconds (submission to completion), task seconds, rows read from files, rows written,
shuffle bytes and records written and read. Nothing is estimated.

Each size runs in its own interpreter (a fresh JVM: no size profits from the other's warm
JIT or page cache of Spark classes), one after the other; the figures are then compared:
seconds per million impressions of the four jobs at every size against the smallest.

The single-node reference runs DuckDB on the same clean Parquet: the same attribution
(latest impression before a play, inside the window, labelled on the day its window
closes) and the per-artwork aggregation (labelled, rewarded), against Spark doing exactly
that (``rewards.transform`` + the same aggregation); both must agree on the figures. Each
side runs ``REPEATS`` times in a row; the best and the first run are reported.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from keyart.lake import Lake, shift_ds

DS = "2026-11-02"
IMPRESSIONS_PER_VISIT = 10
JOBS = ("ingest", "rewards", "features", "priors")
REPEATS = 3
GROWTH_TARGET = 1.1
"""Seconds per million impressions at a larger size may be at most this multiple of the smallest size's."""
RATIO_TARGET = 4.0
"""Spark may take at most this multiple of DuckDB's time on attribution + aggregation."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--impressions", type=int, nargs="+", default=[1_000_000, 3_000_000],
                        help="impressions over the two traffic days, one run per value (default %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--master", default="local[2]", help="Spark master (default %(default)s)")
    parser.add_argument("--keep", type=Path, default=None, help="build the lakes under this folder and keep them (default: a temporary folder)")
    parser.add_argument("--skip", nargs="*", choices=JOBS, default=[], help="jobs not to run (their outputs are not needed by the others)")
    parser.add_argument("--reuse", action="store_true",
                        help="run on the lake an earlier --keep run left in --keep DIR (one size): no simulation, no history "
                             "ingest; with --skip, time one job alone (e.g. --skip ingest rewards priors)")
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
    built = {"history_plays": saved["history_plays"], "impressions": sum(d["impressions"] for d in days),
             "plays": sum(d["plays"] for d in days)}
    (root / LAKE_INFO).write_text(json.dumps(built))
    return built


LAKE_INFO = "bench-lake.json"
"""What :func:`build_lake` built, kept in the lake for ``--reuse``."""


# ----------------------------------------------------------------------------------------
# Cost per stage, from the Spark application's REST API
# ----------------------------------------------------------------------------------------

def _when(text: str | None) -> dt.datetime | None:
    """A time of Spark's REST API ("2026-12-03T11:14:52.123GMT")."""
    if not text:
        return None
    return dt.datetime.strptime(text.replace("GMT", "+0000"), "%Y-%m-%dT%H:%M:%S.%f%z")


def _seconds(start: str | None, end: str | None) -> float:
    a, b = _when(start), _when(end)
    return (b - a).total_seconds() if a and b else 0.0


class StageProfiler:
    """Runs steps under Spark job groups and reads their stages back from the REST API."""

    def __init__(self, spark):
        self.spark = spark
        self.sc = spark.sparkContext
        if not self.sc.uiWebUrl:
            raise RuntimeError("the stage profile needs the Spark UI's REST API: start the session with ui=True")
        self.base = f"{self.sc.uiWebUrl.rstrip('/')}/api/v1/applications/{self.sc.applicationId}"
        self.steps: dict[str, dict[str, Any]] = {}

    def _get(self, path: str) -> Any:
        with urllib.request.urlopen(self.base + path, timeout=60) as response:
            return json.load(response)

    def _drain(self) -> None:
        """Wait until the listener bus delivered every event to the status store the API reads."""
        with contextlib.suppress(Exception):
            self.sc._jsc.sc().listenerBus().waitUntilEmpty()

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        group = f"bench-{name}"
        self.sc.setJobGroup(group, name)
        started = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - started
            self.sc.setLocalProperty("spark.jobGroup.id", None)
            self.sc.setLocalProperty("spark.job.description", None)
            self._drain()
            self.steps[name] = {"seconds": round(seconds, 3), **self.profile(group)}

    def profile(self, group: str) -> dict[str, Any]:
        jobs = [j for j in self._get("/jobs") if j.get("jobGroup") == group]
        stage_ids = sorted({s for j in jobs for s in j.get("stageIds", [])})
        stages = []
        for data in self._get("/stages"):
            if data["stageId"] not in stage_ids or data.get("status") == "SKIPPED":
                continue
            stages.append({
                "stage": data["stageId"], "attempt": data.get("attemptId", 0), "name": data.get("name", ""),
                "tasks": data.get("numTasks", 0),
                "seconds": round(_seconds(data.get("submissionTime"), data.get("completionTime")), 3),
                "task_seconds": round(data.get("executorRunTime", 0) / 1000, 3),
                "rows_in": data.get("inputRecords", 0), "bytes_in": data.get("inputBytes", 0),
                "rows_out": data.get("outputRecords", 0), "bytes_out": data.get("outputBytes", 0),
                "shuffle_write_bytes": data.get("shuffleWriteBytes", 0), "shuffle_write_rows": data.get("shuffleWriteRecords", 0),
                "shuffle_read_bytes": data.get("shuffleReadBytes", 0),
            })
        stages.sort(key=lambda s: (s["stage"], s["attempt"]))
        total = {k: sum(s[k] for s in stages) for k in ("tasks", "task_seconds", "rows_in", "rows_out",
                                                        "shuffle_write_bytes", "shuffle_read_bytes")}
        total["task_seconds"] = round(total["task_seconds"], 3)
        return {"spark_jobs": len(jobs), "stages": len(stages), **total, "per_stage": stages}


# ----------------------------------------------------------------------------------------
# Attribution + aggregation: DuckDB and Spark on the same Parquet
# ----------------------------------------------------------------------------------------

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


def duckdb_attribution(lake: Lake, ds: str, window_hours: float, quality_minutes: float) -> tuple[list[float], dict[str, int]]:
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
    seconds = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        rows = con.execute(sql).fetchall()
        seconds.append(time.perf_counter() - started)
    con.close()
    return seconds, {"labelled": sum(r[1] for r in rows), "rewarded": int(sum(r[2] for r in rows)), "artworks": len(rows)}


def spark_attribution(spark, lake: Lake, ds: str, settings) -> tuple[list[float], dict[str, int]]:
    from pyspark.sql import functions as F

    from keyart.jobs import rewards

    seconds = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        inputs = rewards.extract(spark, lake, ds, settings)
        # the windows closing on ds only (no pending ones from earlier days), as the reference does
        params = rewards.RewardParams(ds, settings.attribution_window_hours, settings.quality_play_minutes,
                                      complete_from=inputs.complete_from)
        labelled = rewards.transform(inputs.impressions, inputs.plays, params)
        rows = labelled.groupBy("artwork_id").agg(F.count(F.lit(1)).alias("labelled"), F.sum("reward").alias("rewarded")).collect()
        seconds.append(time.perf_counter() - started)
    return seconds, {"labelled": sum(r[1] for r in rows), "rewarded": int(sum(r[2] for r in rows)), "artworks": len(rows)}


# ----------------------------------------------------------------------------------------
# One size
# ----------------------------------------------------------------------------------------

def bench(root: Path, impressions: int, master: str, seed: int, skip: tuple[str, ...] = (), reuse: bool = False) -> dict[str, Any]:
    from keyart.config import Settings
    from keyart.jobs import features, ingest, priors, rewards
    from keyart.jobs.common import day_range, get_spark

    settings = Settings()
    lake = Lake(root)
    t0 = time.perf_counter()
    if reuse:
        data = json.loads((root / LAKE_INFO).read_text())
        timings: dict[str, float] = {}
        history: list[str] = []  # ingested when the lake was built
    else:
        data = build_lake(root, impressions, seed)
        timings = {"simulate": time.perf_counter() - t0}
        history = sorted(p.name[3:] for p in (root / "raw" / "plays").glob("ds=*") if p.name[3:] < shift_ds(DS, -1))

    def job_args(ds: str, through: str | None = None) -> argparse.Namespace:
        return argparse.Namespace(ds=ds, through=through, lake=str(root), master=master, shuffle_partitions=None)

    chain_start = time.perf_counter()
    spark = get_spark("keyart-bench-jobs", master=master, ui=True, settings=settings)
    try:
        timings["session_start"] = time.perf_counter() - chain_start
        profiler = StageProfiler(spark)
        modules = {"ingest": ingest, "rewards": rewards, "features": features, "priors": priors}
        steps = [(name, modules[name], job_args(shift_ds(DS, -1), DS) if name == "ingest" else job_args(DS))
                 for name in JOBS if name not in skip]
        if history:
            with profiler.step("ingest_history"):
                ingest.run(spark, lake, job_args(history[0], history[-1]), settings)
        for name, module, a in steps:
            with profiler.step(name):
                module.run(spark, lake, a, settings)
        for name, step in profiler.steps.items():
            timings[name] = step["seconds"]
        timings["jobs"] = sum(timings[name] for name, _, _ in steps)
        timings["chain"] = timings["session_start"] + timings["jobs"]
        spark_s, spark_figures = spark_attribution(spark, lake, DS, settings)
    finally:
        spark.stop()
    duck_s, duck_figures = duckdb_attribution(lake, DS, settings.attribution_window_hours, settings.quality_play_minutes)
    ingest_metrics = {d: json.loads(lake.metrics("ingest", d).read_text())["impressions"]["clean"] for d in day_range(shift_ds(DS, -1), DS)}
    features_metrics = lake.metrics("features", DS)
    millions = data["impressions"] / 1e6
    return {
        "master": master, "impressions": data["impressions"], "plays": data["plays"], "history_plays": data["history_plays"],
        "history_days": len(history), "clean_impressions": ingest_metrics, "skipped": list(skip), "reused_lake": reuse,
        "labelled": spark_figures["labelled"], "rewarded": spark_figures["rewarded"],
        "training_rows": json.loads(features_metrics.read_text())["training_rows"] if features_metrics.exists() else None,
        "seconds": {k: round(v, 2) for k, v in timings.items()},
        "seconds_per_million": {"jobs": round(timings["jobs"] / millions, 2), "chain": round(timings["chain"] / millions, 2)},
        "profile": profiler.steps,
        "attribution": {"spark_seconds": round(min(spark_s), 3), "duckdb_seconds": round(min(duck_s), 3),
                        "spark_first_seconds": round(spark_s[0], 3), "duckdb_first_seconds": round(duck_s[0], 3),
                        "spark_over_duckdb": round(min(spark_s) / min(duck_s), 2) if min(duck_s) else None,
                        "target": RATIO_TARGET, "repeats": REPEATS,
                        "agree": spark_figures == duck_figures, "spark": spark_figures, "duckdb": duck_figures},
        "load_average": list(os.getloadavg()),
    }


# ----------------------------------------------------------------------------------------
# Several sizes, one interpreter each
# ----------------------------------------------------------------------------------------

def bench_in_child(root: Path, impressions: int, master: str, seed: int, skip: tuple[str, ...]) -> dict[str, Any]:
    """:func:`bench` for one size in a fresh interpreter (and so a fresh JVM)."""
    argv = [sys.executable, "-c", "import sys; from keyart.cli import main; sys.exit(main(sys.argv[1:]))",
            "bench", "jobs", "--impressions", str(impressions), "--master", master, "--seed", str(seed),
            "--keep", str(root), "--json", *(["--skip", *skip] if skip else [])]
    done = subprocess.run(argv, stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode not in (0, 1) or not done.stdout.strip():
        raise RuntimeError(f"bench jobs at {impressions:,} impressions failed with exit code {done.returncode}")
    return json.loads(done.stdout)["sizes"][0]


def growth(sizes: list[dict[str, Any]]) -> dict[str, Any]:
    """Seconds per million impressions at each size over the smallest size's."""
    base = min(sizes, key=lambda r: r["impressions"])
    out: dict[str, Any] = {"base_impressions": base["impressions"], "target": GROWTH_TARGET, "ratios": {}}
    for r in sizes:
        per_job = {}
        for name in ("ingest", "rewards", "features", "priors", "jobs"):
            a, b = base["seconds"].get(name), r["seconds"].get(name)
            if a and b is not None:
                per_job[name] = round((b / r["impressions"]) / (a / base["impressions"]), 2)
        out["ratios"][str(r["impressions"])] = per_job
    largest = max(sizes, key=lambda r: r["impressions"])
    ratio = out["ratios"][str(largest["impressions"])].get("jobs")
    out["within_target"] = ratio is not None and ratio <= GROWTH_TARGET
    return out


def run_sizes(root: Path, sizes: list[int], master: str, seed: int, skip: tuple[str, ...], reuse: bool = False) -> dict[str, Any]:
    if reuse and len(sizes) != 1:
        raise SystemExit("--reuse runs one size, on the lake of --keep")
    if len(sizes) == 1:
        results = [bench(root, sizes[0], master, seed, skip, reuse)]
    else:
        results = [bench_in_child(root / f"n{n}", n, master, seed, skip) for n in sizes]
    out: dict[str, Any] = {"sizes": results}
    if len(results) > 1:
        out["growth"] = growth(results)
    return out


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}k" if n >= 1e3 else str(n)


def _bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB" if n >= 2**10 else f"{n} B"


def render_size(result: dict[str, Any]) -> list[str]:
    s = result["seconds"]
    a = result["attribution"]
    lines = [
        f"== {result['impressions']:,} impressions, {result['plays']:,} plays, {result['history_plays']:,} history plays "
        f"({result['history_days']} days), master {result['master']}, load average "
        + " ".join(f"{x:.2f}" for x in result["load_average"]),
        f"labelled {result['labelled']:,} impressions on {DS}, {result['rewarded']:,} rewarded"
        + (f"; {result['training_rows']:,} training rows" if result["training_rows"] is not None else ""),
        "",
        f"{'step':<24}{'seconds':>9}{'s / 1M':>8}{'jobs':>6}{'stages':>7}{'tasks':>7}{'task s':>8}{'rows in':>9}"
        f"{'rows out':>10}{'shuffle w':>11}{'shuffle r':>11}",
    ]
    millions = result["impressions"] / 1e6
    for key in ("simulate", "session_start", "ingest_history", *JOBS, "jobs", "chain"):
        if key not in s:
            continue
        label = {"chain": "chain (session + jobs)", "jobs": "jobs", "ingest": "ingest (2 traffic days)",
                 "ingest_history": "ingest history (setup)"}.get(key, key)
        p = result["profile"].get(key)
        per_m = f"{s[key] / millions:>8.2f}" if key in (*JOBS, "jobs", "chain") else " " * 8
        row = f"{label:<24}{s[key]:>9.2f}{per_m}"
        if p:
            row += (f"{p['spark_jobs']:>6}{p['stages']:>7}{p['tasks']:>7}{p['task_seconds']:>8.1f}{_count(p['rows_in']):>9}"
                    f"{_count(p['rows_out']):>10}{_bytes(p['shuffle_write_bytes']):>11}{_bytes(p['shuffle_read_bytes']):>11}")
        lines.append(row)
    lines += ["", "costliest stages (wall seconds):"]
    for key in JOBS:
        p = result["profile"].get(key)
        if not p:
            continue
        top = sorted(p["per_stage"], key=lambda st: -st["seconds"])[:3]
        lines.append(f"  {key:<10}" + "; ".join(
            f"#{st['stage']} {st['seconds']:.2f}s {st['tasks']}t in {_count(st['rows_in'])} out {_count(st['rows_out'])} "
            f"shuffle {_bytes(st['shuffle_write_bytes'])}" for st in top))
    lines += [
        "",
        f"attribution + aggregation (best of {a['repeats']}; first run in brackets)",
        f"  spark {result['master']:<16}{a['spark_seconds']:>8.3f} s  ({a['spark_first_seconds']:.3f})",
        f"  duckdb (2 threads)      {a['duckdb_seconds']:>8.3f} s  ({a['duckdb_first_seconds']:.3f})",
        f"  spark / duckdb          {a['spark_over_duckdb']:>8}    (target <= {a['target']})",
        f"  same figures: {a['agree']} (labelled {a['duckdb']['labelled']:,}, rewarded {a['duckdb']['rewarded']:,})",
    ]
    return lines


def render(out: dict[str, Any]) -> str:
    lines: list[str] = []
    for result in out["sizes"]:
        lines += ["", *render_size(result)] if lines else render_size(result)
    g = out.get("growth")
    if g:
        lines += ["", f"seconds per million impressions over the {g['base_impressions']:,}-impression run (target <= {g['target']}):"]
        for size, ratios in g["ratios"].items():
            lines.append(f"  {int(size):>11,}  " + "  ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
        lines.append(f"  within target: {g['within_target']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.reuse and not (args.keep and (args.keep / LAKE_INFO).is_file()):
        raise SystemExit(f"--reuse needs --keep DIR holding a lake built by bench jobs ({LAKE_INFO})")
    root = args.keep or Path(tempfile.mkdtemp(prefix="keyart-bench-jobs-"))
    try:
        out = run_sizes(root, args.impressions, args.master, args.seed, tuple(args.skip), args.reuse)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(out, indent=2) if args.json else render(out))
    return 0 if all(r["attribution"]["agree"] for r in out["sizes"]) else 1
