"""``keyart demo``: the closed loop on embedded defaults, ending in a report.

1. a Spark Connect server is started for the Spark jobs to share (``--spark submit``: every
   job is its own spark-submit application instead) and Airflow (API server, scheduler, DAG
   processor on ``<KEYART_HOME>/airflow``) starts beside it; a simulated world (catalog,
   members, 90 days of viewing history, the member features' window) is written to the lake
   and the history is ingested;
2. day 0 is served by uniform-random exploration (logged, as a production cold start);
3. for each following day the real Airflow DAG ``keyart_daily`` runs for the previous day,
   triggered through Airflow's REST API as the schedule would run it (logical date = that
   day) and run by the scheduler, so its task logs are in the Airflow UI
   (``make airflow-ui`` afterwards); the running endpoint (``keyart serve``) picks up the new
   ``@champion``, and ``keyart traffic`` sends the day's visits to it over HTTP, so the
   impressions are the endpoint's own log and the plays land in the play log;
4. a report (Markdown + PNG) under ``reports/`` compares, per day, the served policy with
   random, the non-contextual bandit and the oracle (from the simulator's ground truth),
   puts the OPE estimates beside true values, and shows which artwork each taste got.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from keyart.config import Settings
from keyart.lake import Lake, shift_ds
from keyart.net import free_port

DEFAULT_DAYS = 5
DEFAULT_VISITS = 8000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--days", type=int, default=DEFAULT_DAYS, help="days served by the endpoint after day 0")
    parser.add_argument("--visits", type=int, default=DEFAULT_VISITS, help="visits per day (10 titles each)")
    parser.add_argument("--titles", type=int, default=None, help="catalog size (default: config sim_titles)")
    parser.add_argument("--members", type=int, default=None, help="members (default: config sim_members)")
    parser.add_argument("--seed", type=int, default=None, help="world seed (default: config sim_seed)")
    parser.add_argument("--start", default="2026-11-01", help="day 0")
    parser.add_argument("--port", type=int, default=0, help="endpoint port (0: a free one)")
    parser.add_argument("--reports", default="reports", help="report folder")
    parser.add_argument("--keep-state", action="store_true", help="do not wipe the lake, MLflow store and Airflow home first")
    parser.add_argument("--spark", choices=("connect", "submit"), default="connect",
                        help="connect: the Spark jobs are clients of one Spark Connect server started for the demo "
                             "(default); submit: every job is its own spark-submit application")


class Progress:
    """One progress bar over the demo's steps, naming the day and step."""

    def __init__(self, total: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="step", dynamic_ncols=True, file=sys.stderr)
        self.log: list[tuple[str, float]] = []

    def step(self, label: str):
        bar, log = self.bar, self.log

        class _Step:
            def __enter__(self_inner):
                bar.set_description(label)
                self_inner.t0 = time.perf_counter()
                return self_inner

            def __exit__(self_inner, exc_type, exc, tb):
                log.append((label, time.perf_counter() - self_inner.t0))
                if exc_type is None:
                    bar.update(1)
                return False

        return _Step()

    def close(self) -> None:
        self.bar.close()


def _run(argv: list[str], env: dict[str, str], what: str, log_path: Path) -> None:
    """Run a command, output to a log file; raise with the log's tail when it fails."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(argv)}\n")
        log.flush()
        proc = subprocess.run(argv, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-40:])
        raise RuntimeError(f"{what} failed (exit {proc.returncode}); log {log_path}:\n{tail}")


class Endpoint:
    """``keyart serve`` in a subprocess, polling the registry's champion alias."""

    def __init__(self, env: dict[str, str], port: int, log_path: Path):
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(log_path, "a")  # noqa: SIM115 - closed in stop()
        bin_dir = Path(sys.executable).parent
        self.proc = subprocess.Popen(
            [str(bin_dir / "keyart"), "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )

    def health(self) -> dict[str, Any] | None:
        try:
            r = httpx.get(self.url + "/readyz", timeout=2.0)
            return r.json() if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None

    def wait_ready(self, timeout: float = 120.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"keyart serve exited with {self.proc.returncode}; see {self.log.name}")
            h = self.health()
            if h is not None:
                return h
            time.sleep(0.5)
        raise TimeoutError(f"keyart serve not healthy after {timeout:.0f} s; see {self.log.name}")

    def wait_version(self, source: str | None, timeout: float = 180.0) -> dict[str, Any]:
        """Wait until the endpoint serves the bundle from ``source`` (models:/<name>/<version>; None: no model)."""
        deadline = time.monotonic() + timeout
        h: dict[str, Any] = {}
        while time.monotonic() < deadline:
            h = self.wait_ready(timeout=max(1.0, deadline - time.monotonic()))
            if h.get("source") == source:
                return h
            time.sleep(0.5)
        raise TimeoutError(f"endpoint serves {h.get('source')!r}, not {source!r}; see {self.log.name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def _dag_run(api, ds: str, day: int, services) -> dict[str, Any]:
    """Trigger keyart_daily for ``ds`` and wait; the run's task durations. Raises with the failed
    tasks' log tails (the full logs are in the Airflow UI)."""
    from keyart.demo import airflow_env

    run = airflow_env.trigger_and_wait(api, ds, run_id=f"demo__{ds}", note=f"keyart demo day {day}: ds={ds}")
    tasks = airflow_env.run_tasks(api, run["dag_run_id"])
    failed = {t: ti["state"] for t, ti in tasks.items() if ti["state"] not in ("success", "skipped")}
    if run["state"] != "success" or failed:
        tails = []
        for task_id, state in failed.items():
            if state == "failed":
                text = airflow_env.task_log(api, run["dag_run_id"], task_id, tasks[task_id].get("try_number") or 1)
                tails.append(f"--- {task_id} ---\n" + "\n".join(text.splitlines()[-30:]))
        raise RuntimeError(f"DAG run for {ds} ended {run['state']}: {failed}; task logs in the Airflow UI "
                           f"({services.url}, make airflow-ui) and {services.home / 'logs'}\n" + "\n".join(tails))
    return {"ds": ds, "run_id": run["dag_run_id"], "state": run["state"], "logical_date": run.get("logical_date"),
            "run_after": run.get("run_after"),
            "seconds": _seconds(run.get("start_date"), run.get("end_date")),
            "tasks": {t: {"state": ti["state"], "seconds": _seconds(ti.get("start_date"), ti.get("end_date"))}
                      for t, ti in tasks.items()}}


def _seconds(start: str | None, end: str | None) -> float | None:
    import datetime as dt

    if not start or not end:
        return None
    return round((dt.datetime.fromisoformat(end) - dt.datetime.fromisoformat(start)).total_seconds(), 1)


def _champion_source(settings) -> str | None:
    from keyart import registry

    v = registry.get_champion_version(settings)
    return None if v is None else f"models:/{settings.registered_model}/{v}"


def run(args: argparse.Namespace) -> int:
    import logging

    from keyart.demo import airflow_env
    from keyart.demo.report import DayResult, noncontextual_value, write_report
    from keyart.jobs.connect_server import ConnectServer
    from keyart.sim.choosers import HttpChooser, RandomChooser
    from keyart.sim.traffic import simulate_day
    from keyart.sim.world import World

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would bury the progress bar
    settings = Settings()
    lake = Lake(settings.lake)
    home = settings.home
    logs = home / "demo-logs"
    if not args.keep_state:
        for sub in (settings.lake, home / "mlflow", home / "airflow", home / "serving", logs):
            shutil.rmtree(sub, ignore_errors=True)
    logs.mkdir(parents=True, exist_ok=True)
    titles = args.titles or settings.sim_titles
    members = args.members or settings.sim_members
    seed = settings.sim_seed if args.seed is None else args.seed
    days = [shift_ds(args.start, k) for k in range(args.days + 1)]
    port = args.port or free_port()

    env = dict(os.environ)
    env.update({"KEYART_HOME": str(home), "KEYART_LAKE_ROOT": str(settings.lake),
                "KEYART_SERVE_POLL_SECONDS": env.get("KEYART_SERVE_POLL_SECONDS", "2"),
                # simulated days keep simulated time: the endpoint stamps decisions and ages
                # rewards with the simulator's clock
                "KEYART_SERVE_CLIENT_CLOCK": "true",
                # a fresh event-signing secret per run: `keyart serve` refuses the default
                "KEYART_SERVE_EVENT_SECRET": secrets.token_hex(32),
                "PYSPARK_PYTHON": sys.executable})
    bin_dir = Path(sys.executable).parent
    keyart_bin = str(bin_dir / "keyart")
    if args.spark == "submit":
        env.pop("KEYART_SPARK_REMOTE", None)
    own_server = args.spark == "connect" and not settings.spark_remote  # else: the jobs' own KEYART_SPARK_REMOTE
    # world, history ingest, day 0, endpoint, report, Airflow; three per served day; the Connect server
    progress = Progress(total=6 + 3 * args.days + own_server)
    results: list[DayResult] = []
    endpoint: Endpoint | None = None
    spark_server = None
    services: airflow_env.AirflowServices | None = None
    api = None
    dag_runs: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    try:
        if own_server:  # its JVM starts while the world is built
            spark_server = ConnectServer(settings, log_path=logs / "spark-connect.log", env=env, cwd=logs).launch()
            env["KEYART_SPARK_REMOTE"] = spark_server.url  # the DAG's Spark tasks are its clients
        # Airflow starts beside the world too: a port of its own (a running `make airflow-ui` on
        # the same home is not disturbed), and only the runs the demo triggers (no schedule).
        airflow = airflow_env.prepared_environ(home / "airflow", base={
            **{k: v for k, v in env.items() if k != "AIRFLOW__CORE__EXECUTION_API_SERVER_URL"},
            "AIRFLOW__API__PORT": str(free_port()), "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False"})
        services = airflow_env.AirflowServices(airflow, home / "airflow" / "logs" / "services").launch()
        with progress.step("world: catalog, members, viewing history"):
            world = World.build(seed=seed, n_titles=titles, n_members=members, start=args.start)
            world.save(settings.lake)
        if spark_server is not None:
            with progress.step(f"Spark Connect server for the jobs ({spark_server.url})"):
                spark_server.wait_ready()
        with progress.step(f"ingest the {world.config.history_days}-day viewing history (Spark)"):
            _run([keyart_bin, "job", "ingest", "--ds", shift_ds(args.start, -world.config.history_days),
                  "--through", shift_ds(args.start, -1)], env, "history ingest", logs / "ingest-history.log")
        with progress.step(f"day 0 {days[0]}: uniform-random exploration"):
            visits = world.visits(days[0], args.visits, seed)
            summary = simulate_day(world, days[0], RandomChooser(), visits=visits, seed=seed, lake_root=settings.lake,
                                   attribution_window_hours=settings.attribution_window_hours)
            results.append(DayResult.from_summary(summary, model_version="random", noncontextual=None))
        with progress.step(f"Airflow: API server, scheduler, DAG processor ({services.url})"):
            services.wait_ready()
            api = services.client()
        with progress.step("start the endpoint"):
            endpoint = Endpoint(env, port, logs / "serve.log")
            endpoint.wait_ready()
        for k in range(1, args.days + 1):
            ds_prev, ds = days[k - 1], days[k]
            with progress.step(f"day {k} {ds}: keyart_daily for {ds_prev} (Airflow scheduler)"):
                dag_runs.append(_dag_run(api, ds_prev, k, services))
            with progress.step(f"day {k} {ds}: endpoint picks up @champion"):
                health = endpoint.wait_version(_champion_source(settings))
            with progress.step(f"day {k} {ds}: traffic through the endpoint"):
                visits = world.visits(ds, args.visits, seed)
                summary = simulate_day(world, ds, HttpChooser(endpoint.url), visits=visits, seed=seed,
                                       lake_root=settings.lake, send_rewards=True,
                                       attribution_window_hours=settings.attribution_window_hours)
                nc = noncontextual_value(world, visits, lake.priors(ds_prev), settings)
                results.append(DayResult.from_summary(summary, model_version=str(health.get("model_version")), noncontextual=nc))
        with progress.step("report"):
            report = write_report(Path(args.reports), world, lake, results, days, endpoint_url=endpoint.url,
                                  settings=settings, step_times=progress.log)
            (Path(args.reports) / "dag-runs.json").write_text(json.dumps(dag_runs, indent=1))
    finally:
        progress.close()
        if api is not None:
            try:  # nothing is scheduled later for days without data (make airflow-ui on this home)
                airflow_env.pause(api)
            except Exception:  # noqa: BLE001 - cleanup must go on
                pass
            api.close()
        if services is not None:
            services.stop()
        if endpoint is not None:
            endpoint.stop()
        if spark_server is not None:
            spark_server.stop()
    minutes = (time.perf_counter() - t_start) / 60
    print(report.read_text())
    print(f"\nDemo finished in {minutes:.1f} min. Report: {report}")
    print(json.dumps({"report": str(report), "minutes": round(minutes, 2)}))
    return 0
