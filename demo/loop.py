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

``keyart demo --stack`` runs the same loop on the production topology ``make up`` started
(demo/stack.py) instead of starting anything: the days are triggered through the Airflow
API of the stack's scheduler (PostgreSQL, LocalExecutor, the Spark jobs on the standalone
master), the traffic goes through HAProxy to the serving replicas (online state in Redis,
``@champion`` from the MLflow server), with the stack's credentials. Only where the loop
runs differs (:class:`Embedded`, :class:`OnStack`); the loop itself is :func:`run`'s. The
stack must be up (``make up``): the demo neither starts nor stops it, and wipes nothing of
it. Its days end today: the replicas stamp decisions with their own clock, so on the
default wall clock one served day (today) is what they can serve; ``keyart stack up
--clock sim`` lets them take the simulator's time, and then any number of days.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from keyart.config import Settings
from keyart.lake import Lake, shift_ds
from keyart.net import free_port, stop_process

DEFAULT_DAYS = 5
DEFAULT_VISITS = 8000


class DemoError(RuntimeError):
    """The demo cannot run where it was asked to (the stack is not up, say)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--days", type=int, default=None,
                        help=f"days served by the endpoint after day 0 (default {DEFAULT_DAYS}; with --stack on the "
                             "replicas' wall clock, 1)")
    parser.add_argument("--visits", type=int, default=DEFAULT_VISITS, help="visits per day (10 titles each)")
    parser.add_argument("--titles", type=int, default=None, help="catalog size (default: config sim_titles)")
    parser.add_argument("--members", type=int, default=None, help="members (default: config sim_members)")
    parser.add_argument("--seed", type=int, default=None, help="world seed (default: config sim_seed)")
    parser.add_argument("--history-days", type=int, default=None,
                        help="days of viewing history before day 0 (default: the member features' window, 90)")
    parser.add_argument("--start", default=None, help="day 0 (default 2026-11-01; with --stack, DAYS days before today)")
    parser.add_argument("--port", type=int, default=0, help="endpoint port (0: a free one)")
    parser.add_argument("--reports", default="reports", help="report folder")
    parser.add_argument("--keep-state", action="store_true", help="do not wipe the lake, MLflow store and Airflow home first")
    parser.add_argument("--spark", choices=("connect", "submit"), default="connect",
                        help="connect: the Spark jobs are clients of one Spark Connect server started for the demo "
                             "(default); submit: every job is its own spark-submit application")
    parser.add_argument("--stack", action="store_true",
                        help="run on the stack `make up` started (Airflow scheduler, Spark master, MLflow server, "
                             "serving replicas behind HAProxy) instead of starting its own; the stack must be up")
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="with --stack: the stack's state dir (default <KEYART_HOME>/stack, as make up)")


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

    def chooser(self):
        from keyart.sim.choosers import HttpChooser

        return HttpChooser(self.url)

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()


def _readyz(url: str) -> dict[str, Any] | None:
    try:
        r = httpx.get(url + "/readyz", timeout=5.0)
        return r.json() if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


def _keyed_chooser(url: str, api_key: str, include_ts: bool):
    """The simulator's HTTP chooser sending the stack's API key with every request."""
    from keyart.sim.choosers import HttpChooser

    class KeyedHttpChooser(HttpChooser):
        def _client(self):
            client = super()._client()
            client.headers["X-API-Key"] = api_key
            return client

    return KeyedHttpChooser(url, include_ts=include_ts)


class StackEndpoint:
    """The stack's serving: pages and rewards through the balancer with the stack's API key;
    readiness and the served ``@champion`` checked on every replica (each loads it itself)."""

    def __init__(self, stack_env: dict[str, str], log_dir: Path):
        from keyart.demo import stack as stk

        self.url = f"http://127.0.0.1:{stack_env['STACK_PORT_BALANCER']}"
        self.replicas = {f"serve-{r}": f"http://127.0.0.1:{stack_env[f'STACK_PORT_SERVE_{r}']}" for r in stk.REPLICAS}
        self.api_key = stack_env["KEYART_SERVE_API_KEYS"].split(",")[0].strip()
        # on the wall clock the replicas refuse a request's ts (and stamp it themselves)
        self.include_ts = stk.serving_clock(stack_env) == "sim"
        self.log_dir = log_dir

    def _wait(self, done: Callable[[dict[str, dict[str, Any] | None]], bool], timeout: float, what: str
              ) -> dict[str, dict[str, Any] | None]:
        deadline = time.monotonic() + timeout
        while True:
            health = {name: _readyz(url) for name, url in self.replicas.items()}
            if done(health):
                return health
            if time.monotonic() > deadline:
                raise TimeoutError(f"serving replicas not {what} after {timeout:.0f} s: "
                                   f"{ {n: h and h.get('source') for n, h in health.items()} }; logs in {self.log_dir}")
            time.sleep(1.0)

    def wait_ready(self, timeout: float = 120.0) -> dict[str, Any]:
        health = self._wait(lambda h: all(v is not None for v in h.values()), timeout, "ready")
        return next(iter(health.values()))  # type: ignore[return-value]

    def wait_version(self, source: str | None, timeout: float = 180.0) -> dict[str, Any]:
        """Wait until every replica serves the bundle from ``source`` (models:/<name>/<version>)."""
        health = self._wait(lambda h: all(v is not None and v.get("source") == source for v in h.values()),
                            timeout, f"serving {source}")
        return next(iter(health.values()))  # type: ignore[return-value]

    def chooser(self):
        return _keyed_chooser(self.url, self.api_key, self.include_ts)

    def stop(self) -> None:  # the stack's, not the demo's
        pass


class Embedded:
    """Where ``keyart demo`` runs by default: on KEYART_HOME, with what it starts itself (a
    Spark Connect server, Airflow's API server, scheduler and DAG processor, one endpoint),
    all stopped at the end. The lake, MLflow store and Airflow home are wiped first."""

    kind = "embedded"

    def __init__(self, args: argparse.Namespace, settings: Settings, logs: Path):
        self.args, self.settings, self.logs = args, settings, logs
        home = settings.home
        if not args.keep_state:
            for sub in (settings.lake, home / "mlflow", home / "airflow", home / "serving", logs):
                shutil.rmtree(sub, ignore_errors=True)
        env = dict(os.environ)
        env.update({"KEYART_HOME": str(home), "KEYART_LAKE_ROOT": str(settings.lake),
                    "KEYART_SERVE_POLL_SECONDS": env.get("KEYART_SERVE_POLL_SECONDS", "2"),
                    # simulated days keep simulated time: the endpoint stamps decisions and ages
                    # rewards with the simulator's clock
                    "KEYART_SERVE_CLIENT_CLOCK": "true",
                    # a fresh event-signing secret per run: `keyart serve` refuses the default
                    "KEYART_SERVE_EVENT_SECRET": secrets.token_hex(32),
                    "PYSPARK_PYTHON": sys.executable})
        if args.spark == "submit":
            env.pop("KEYART_SPARK_REMOTE", None)
        self.env = env
        self.own_server = args.spark == "connect" and not settings.spark_remote  # else: the jobs' own KEYART_SPARK_REMOTE
        self.setup_steps = 2 + self.own_server
        self.spark_server = None
        self.services = None
        self.endpoint: Endpoint | None = None
        self.dag_was_paused = True

    def launch(self) -> None:
        """Start the Spark Connect server and Airflow: their start-up overlaps the world's build."""
        from keyart.demo import airflow_env
        from keyart.jobs.connect_server import ConnectServer

        if self.own_server:
            self.spark_server = ConnectServer(self.settings, log_path=self.logs / "spark-connect.log", env=self.env,
                                              cwd=self.logs).launch()
            self.env["KEYART_SPARK_REMOTE"] = self.spark_server.url  # the DAG's Spark tasks are its clients
        # a port of its own (a running `make airflow-ui` on the same home is not disturbed), and
        # only the runs the demo triggers (no schedule)
        home = self.settings.home
        airflow = airflow_env.prepared_environ(home / "airflow", base={
            **{k: v for k, v in self.env.items() if k != "AIRFLOW__CORE__EXECUTION_API_SERVER_URL"},
            "AIRFLOW__API__PORT": str(free_port()), "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False"})
        self.services = airflow_env.AirflowServices(airflow, home / "airflow" / "logs" / "services").launch()

    def after_world(self, progress: Progress) -> None:
        if self.spark_server is not None:
            with progress.step(f"Spark Connect server for the jobs ({self.spark_server.url})"):
                self.spark_server.wait_ready()

    def ready(self, progress: Progress):
        """Airflow answering and the endpoint started: (Airflow services, REST client, endpoint)."""
        with progress.step(f"Airflow: API server, scheduler, DAG processor ({self.services.url})"):
            self.services.wait_ready()
            api = self.services.client()
        with progress.step("start the endpoint"):
            self.endpoint = Endpoint(self.env, self.args.port or free_port(), self.logs / "serve.log")
            self.endpoint.wait_ready()
        return self.services, api, self.endpoint

    def after_run(self, record: dict[str, Any]) -> None:
        pass

    def describe(self) -> list[str]:
        spark = (f"one Spark Connect server ({self.env['KEYART_SPARK_REMOTE']})" if self.env.get("KEYART_SPARK_REMOTE")
                 else f"spark-submit on {self.settings.spark_master}")
        return [f"Ran on embedded defaults under `{self.settings.home}`: the DAG triggered through the REST API of "
                f"an Airflow the demo started (SQLite metadata, LocalExecutor), its Spark jobs on {spark}, MLflow on "
                f"`{self.settings.tracking_uri}`, one `keyart serve` endpoint."]

    def where_next(self) -> list[str]:
        return ["- `make mlflow-ui` — every daily run: params, OPE metrics, plots, the model card; the "
                "`keyart-artwork` registered model with its `champion` / `challenger` aliases.",
                "- `make airflow-ui` — the `keyart_daily` DAG and its runs, task by task, with logs.",
                f"- `make serve` — the endpoint (this demo's ran at {self.endpoint.url if self.endpoint else '-'}); "
                "`POST /v1/artwork`, `/metrics`, `/docs`."]

    def stop(self) -> None:
        if self.services is not None:
            self.services.stop()
        if self.endpoint is not None:
            self.endpoint.stop()
        if self.spark_server is not None:
            self.spark_server.stop()


class OnStack:
    """Where ``keyart demo --stack`` runs: the stack ``make up`` started, used as it is (its
    settings, URLs and credentials from its stack.env). Nothing is started, stopped or wiped."""

    kind = "stack"
    setup_steps = 1

    def __init__(self, args: argparse.Namespace):
        from keyart.demo import stack as stk

        state = (args.state_dir or stk.default_state_dir()).resolve()
        hint = f"start it with `make up` (or keyart stack up --state-dir {state}), then run keyart demo --stack again"
        if not stk.env_path(state).exists():
            raise DemoError(f"no stack in {state}: {hint}")
        report = stk.status(state)
        if not report["up"]:
            down = [name for name, row in report["components"].items() if not row["healthy"]]
            raise DemoError(f"the stack in {state} is not up ({', '.join(down) or 'nothing runs'}): {hint}")
        self.state = state
        self.stack_env = stk.read_env(state)
        self.clock = stk.serving_clock(self.stack_env)
        self.env = stk.process_environ(self.stack_env)
        # this process reads the stack's settings too (its lake, MLflow server, Airflow home)
        for key in [k for k in os.environ if k.startswith(stk._DROP_PREFIXES)]:
            del os.environ[key]
        os.environ.update(self.stack_env)
        from keyart import config

        config.settings.cache_clear()
        self.services = None
        self.endpoint: StackEndpoint | None = None
        self.seen_apps: set[str] = set()
        self.dag_was_paused = True

    def launch(self) -> None:
        pass

    def after_world(self, progress: Progress) -> None:
        pass

    def ready(self, progress: Progress):
        from keyart.demo import airflow_env

        env = self.stack_env
        self.services = airflow_env.AirflowServices(self.env, self.state / "logs")
        with progress.step(f"stack: Airflow API login, replicas behind {self.balancer}"):
            api = self.services.client()
            dag = api.get(f"/dags/{airflow_env.DAG_ID}")
            self.dag_was_paused = dag.status_code != 200 or bool(dag.json().get("is_paused", True))
            self.endpoint = StackEndpoint(env, self.state / "logs")
            self.endpoint.wait_ready()
        self.seen_apps = {a["id"] for a in self._apps()}
        return self.services, api, self.endpoint

    @property
    def balancer(self) -> str:
        return f"http://127.0.0.1:{self.stack_env['STACK_PORT_BALANCER']}"

    def _apps(self) -> list[dict[str, Any]]:
        from keyart.demo import stack as stk

        return stk.spark_master_state(self.stack_env).get("completedapps", [])

    def after_run(self, record: dict[str, Any]) -> None:
        """The Spark applications the run's tasks ran on the standalone master."""
        apps = [a for a in self._apps() if a["id"] not in self.seen_apps]
        self.seen_apps |= {a["id"] for a in apps}
        record["spark_master"] = self.stack_env["KEYART_SPARK_MASTER"]
        record["spark_apps"] = sorted(({"id": a["id"], "name": a["name"], "state": a["state"]} for a in apps),
                                      key=lambda a: a["id"])

    def describe(self) -> list[str]:
        from keyart.demo import stack as stk

        e = self.stack_env
        replicas = ", ".join(f"serve-{r} (127.0.0.1:{e[f'STACK_PORT_SERVE_{r}']})" for r in stk.REPLICAS)
        return [f"Ran on the stack `{e['KEYART_STACK_NAME']}` (`make up`, state `{self.state}`): traffic through "
                f"HAProxy at {self.balancer} to the serving replicas {replicas}, sharing their online state in "
                f"Redis ({e.get('STACK_REDIS_URL', stk.REDIS_URL)}), on the {self.clock} clock; each day's "
                f"`keyart_daily` triggered through the Airflow API of the stack's scheduler "
                f"(http://127.0.0.1:{e['STACK_PORT_AIRFLOW']}, PostgreSQL metadata, "
                f"{e.get('AIRFLOW__CORE__EXECUTOR', 'LocalExecutor')}), its Spark jobs on the standalone master "
                f"{e['KEYART_SPARK_MASTER']}; the replicas follow `@champion` on the MLflow server "
                f"{e['KEYART_MLFLOW_TRACKING_URI']}."]

    def where_next(self) -> list[str]:
        e = self.stack_env
        return [f"- MLflow: {e['KEYART_MLFLOW_TRACKING_URI']} — the runs and the `keyart-artwork` registry.",
                f"- Airflow: http://127.0.0.1:{e['STACK_PORT_AIRFLOW']} — `keyart_daily`'s runs with task logs "
                "(`keyart stack up` prints the login).",
                f"- Spark master: http://127.0.0.1:{e['STACK_PORT_SPARK_MASTER_UI']} — the jobs' applications.",
                f"- Serving: {self.balancer} (HAProxy), `keyart stack status` for every component."]

    def stop(self) -> None:  # the stack keeps running: `make down` stops it
        pass


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
                           f"({services.url}) and {services.home / 'logs'}\n" + "\n".join(tails))
    return {"ds": ds, "run_id": run["dag_run_id"], "state": run["state"], "logical_date": run.get("logical_date"),
            "run_after": run.get("run_after"), "run_type": run.get("run_type"),
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
    import datetime as dt
    import logging

    from keyart.demo import airflow_env
    from keyart.demo.report import DayResult, noncontextual_value, write_report
    from keyart.sim.choosers import RandomChooser
    from keyart.sim.traffic import simulate_day
    from keyart.sim.world import World

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would bury the progress bar
    try:
        target = OnStack(args) if args.stack else None
    except DemoError as exc:
        print(f"keyart demo --stack: {exc}", file=sys.stderr)
        return 2
    settings = Settings()
    lake = Lake(settings.lake)
    logs = settings.home / "demo-logs"
    if target is None:
        target = Embedded(args, settings, logs)
    logs.mkdir(parents=True, exist_ok=True)
    n_days = args.days
    if target.kind == "stack":
        if n_days is None:
            n_days = DEFAULT_DAYS if target.clock == "sim" else 1
        # the days end today: on the wall clock the replicas log what they serve under today
        today_start = (dt.datetime.now(dt.UTC).date() - dt.timedelta(days=n_days)).isoformat()
        if target.clock == "wall" and (n_days > 1 or args.start not in (None, today_start)):
            print(f"keyart demo --stack: the stack's replicas stamp decisions with the wall clock, so the one day "
                  f"they can serve is today (--days 1, no --start); for other simulated days let them take the "
                  f"simulator's time: keyart stack up --state-dir {target.state} --clock sim (restarts the two "
                  "replicas)", file=sys.stderr)
            return 2
        start = args.start or today_start
    else:
        n_days = DEFAULT_DAYS if n_days is None else n_days
        start = args.start or "2026-11-01"
    titles = args.titles or settings.sim_titles
    members = args.members or settings.sim_members
    seed = settings.sim_seed if args.seed is None else args.seed
    days = [shift_ds(start, k) for k in range(n_days + 1)]
    env = target.env
    keyart_bin = str(Path(sys.executable).parent / "keyart")
    # world, history ingest, day 0, report; the target's own; three per served day
    progress = Progress(total=4 + target.setup_steps + 3 * n_days)
    results: list[DayResult] = []
    api = None
    dag_runs: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    try:
        target.launch()
        with progress.step("world: catalog, members, viewing history"):
            build = {} if args.history_days is None else {"history_days": args.history_days}
            world = World.build(seed=seed, n_titles=titles, n_members=members, start=start, **build)
            world.save(settings.lake)
        target.after_world(progress)
        with progress.step(f"ingest the {world.config.history_days}-day viewing history (Spark)"):
            _run([keyart_bin, "job", "ingest", "--ds", shift_ds(start, -world.config.history_days),
                  "--through", shift_ds(start, -1)], env, "history ingest", logs / "ingest-history.log")
        with progress.step(f"day 0 {days[0]}: uniform-random exploration"):
            visits = world.visits(days[0], args.visits, seed)
            summary = simulate_day(world, days[0], RandomChooser(), visits=visits, seed=seed, lake_root=settings.lake,
                                   attribution_window_hours=settings.attribution_window_hours)
            results.append(DayResult.from_summary(summary, model_version="random", noncontextual=None))
        services, api, endpoint = target.ready(progress)
        chooser = endpoint.chooser()
        for k in range(1, n_days + 1):
            ds_prev, ds = days[k - 1], days[k]
            with progress.step(f"day {k} {ds}: keyart_daily for {ds_prev} (Airflow scheduler)"):
                dag_runs.append(_dag_run(api, ds_prev, k, services))
                target.after_run(dag_runs[-1])
            with progress.step(f"day {k} {ds}: endpoint picks up @champion"):
                health = endpoint.wait_version(_champion_source(settings))
            with progress.step(f"day {k} {ds}: traffic through the endpoint"):
                visits = world.visits(ds, args.visits, seed)
                summary = simulate_day(world, ds, chooser, visits=visits, seed=seed,
                                       lake_root=settings.lake, send_rewards=True,
                                       attribution_window_hours=settings.attribution_window_hours)
                nc = noncontextual_value(world, visits, lake.priors(ds_prev), settings)
                results.append(DayResult.from_summary(summary, model_version=str(health.get("model_version")), noncontextual=nc))
        with progress.step("report"):
            report = write_report(Path(args.reports), world, lake, results, days, endpoint_url=endpoint.url,
                                  settings=settings, step_times=progress.log, ran_on=target.describe(),
                                  where_next=target.where_next(), topology=target.kind)
            (Path(args.reports) / "dag-runs.json").write_text(json.dumps(dag_runs, indent=1))
    finally:
        progress.close()
        if api is not None:
            try:  # nothing is scheduled later for days without data (as the DAG was, on the stack)
                if target.dag_was_paused:
                    airflow_env.pause(api)
            except Exception:  # noqa: BLE001 - cleanup must go on
                pass
            api.close()
        target.stop()
    minutes = (time.perf_counter() - t_start) / 60
    print(report.read_text())
    where = "on the stack" if target.kind == "stack" else "on embedded defaults"
    print(f"\nDemo finished {where} in {minutes:.1f} min. Report: {report}")
    print(json.dumps({"report": str(report), "minutes": round(minutes, 2), "topology": target.kind}))
    return 0
