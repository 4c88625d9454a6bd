"""A project-local Airflow: one AIRFLOW_HOME, this repository's ``dags/``, SQLite metadata.

Used by the tests, the demo and the make targets, so they all run the same DAG the same way::

    python -m keyart.demo.airflow_env env              # print the environment (for `eval`/make)
    python -m keyart.demo.airflow_env migrate          # `airflow db migrate`, once per home
    python -m keyart.demo.airflow_env run -- airflow standalone
    python -m keyart.demo.airflow_env dags-test 2026-01-05 [--conf '{"ds": "2026-01-05"}']

AIRFLOW_HOME is ``<KEYART_HOME>/airflow`` unless given; an ``AIRFLOW_HOME`` already in the
environment is deliberately ignored, so a personal Airflow setup is never touched. This
module does not import Airflow: it runs the ``airflow`` command of this interpreter's
environment in a subprocess.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from keyart.pipeline import DAG_ID

DEFAULT_API_PORT = 8090  # keyart serve uses 8080, Airflow's default
ADMIN_USER = "admin"
_MIGRATED_MARKER = ".keyart-db-migrated"


def repo_dags_folder() -> Path:
    """The repository's ``dags/`` (keyart is installed in editable mode from the repository)."""
    folder = Path(__file__).resolve().parent.parent / "dags"
    if not (folder / "keyart_daily.py").exists():
        raise FileNotFoundError(
            f"{folder / 'keyart_daily.py'} not found: run from a source checkout (pip install -e .)"
        )
    return folder


def passwords_file(airflow_home: str | Path) -> Path:
    """Where the simple auth manager keeps the generated passwords (JSON user -> password)."""
    return Path(airflow_home) / "simple_auth_manager_passwords.json.generated"


def admin_password(airflow_home: str | Path) -> str | None:
    """The generated password of the ``admin`` user, once the API server has started."""
    path = passwords_file(airflow_home)
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get(ADMIN_USER)


def default_airflow_home() -> Path:
    from keyart.config import Settings

    return Settings().home / "airflow"


def airflow_environ(
    airflow_home: str | Path | None = None,
    base: Mapping[str, str] | None = None,
    dags_folder: str | Path | None = None,
    database: str | None = None,
) -> dict[str, str]:
    """The environment for ``airflow`` commands: ``base`` (default os.environ) plus the project
    settings. KEYART_* variables pass through, so the tasks see the same keyart settings.

    ``database`` is the metadata database's SQLAlchemy URI; by default SQLite in the Airflow
    home (WAL mode, Airflow's own setting). SQLite serialises writers, and a transaction that
    read before another process wrote fails with "database is locked" instead of waiting:
    with an API server, a scheduler and a DAG processor writing at once, an API call
    can fail now and then. Deployments and the tests of the running services use PostgreSQL
    (``make up``; tests/airflow/test_dag_run.py)."""
    home = Path(airflow_home).resolve() if airflow_home else default_airflow_home()
    env = dict(os.environ if base is None else base)
    bin_dir = str(Path(sys.executable).parent)
    port = env.get("AIRFLOW__API__PORT", str(DEFAULT_API_PORT))
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(Path(dags_folder or repo_dags_folder()).resolve()),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": database or sqlite_uri(home),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            # Two cores and SQLite: one task at a time is all the box can take anyway.
            "AIRFLOW__CORE__PARALLELISM": env.get("AIRFLOW__CORE__PARALLELISM", "2"),
            "AIRFLOW__API__HOST": env.get("AIRFLOW__API__HOST", "127.0.0.1"),
            "AIRFLOW__API__PORT": port,
            # Task workers reach the API server's Execution API here; left to Airflow it is
            # http://localhost:8080/execution/ whatever port the API server listens on, and
            # every scheduled task is killed before it logs a line.
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": env.get(
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL", f"http://127.0.0.1:{port}/execution/"
            ),
            # A login even on one machine: the API can change connections and variables.
            # The password of `admin` is generated into AIRFLOW_HOME on first start
            # (`python -m keyart.demo.airflow_env login` prints it).
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": env.get(
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS", "False"
            ),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": env.get(
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS", f"{ADMIN_USER}:admin"
            ),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords_file(home)),
            "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
            # The venv's console scripts (spark-submit, keyart) first on PATH.
            "PATH": bin_dir + os.pathsep + env.get("PATH", ""),
        }
    )
    if "KEYART_HOME" not in env:
        from keyart.config import Settings

        env["KEYART_HOME"] = str(Settings().home)
    return env


_LOCAL_SETTINGS = """\
# Generated by keyart.demo.airflow_env for this AIRFLOW_HOME; imported by Airflow at start-up.
from keyart.demo.airflow_env import patch_airflow_runtime, preload_task_modules

patch_airflow_runtime()
preload_task_modules()
"""


def preload_task_modules() -> list[str]:
    """In the scheduler, import what keyart's tasks import (``keyart.pipeline.TASK_MODULES``:
    the Spark jobs and the Connect client, LightGBM, MLflow, ONNX) before it starts the
    LocalExecutor, whose worker processes fork every task process from it: each task then
    starts with them loaded instead of paying seconds of imports (the pre-fork warm-up of
    ``gunicorn --preload``). Nothing runs at import: no Spark session, thread pool or
    connection exists before the fork. Other Airflow processes (API server, DAG processor,
    ``dags test``) skip it; ``KEYART_AIRFLOW_PRELOAD=0`` turns it off. Returns what it imported."""
    import importlib

    if os.environ.get("KEYART_AIRFLOW_PRELOAD", "1") == "0" or sys.argv[1:2] != ["scheduler"]:
        return []
    from keyart.pipeline import TASK_MODULES

    for name in TASK_MODULES:
        importlib.import_module(name)
    return list(TASK_MODULES)


def patch_airflow_runtime() -> None:
    """Work around two Airflow 3.2.2 defects in this dependency set (see docs/airflow.md)."""
    patch_pydantic_callable_discriminator()
    patch_in_process_api_lifetime()


def patch_pydantic_callable_discriminator() -> None:
    """Let ``Field(discriminator=<callable>)`` mean ``Discriminator(<callable>)``.

    Airflow 3.2.2's execution API declares ``TIStateUpdate`` with a callable in
    ``Field(discriminator=...)``, which pydantic 2.11-2.14 reads as a field name, so building
    the API (``airflow dags test``, ``api-server``, ``standalone``) fails with "Model
    'TITerminalStatePayload' needs a discriminator field". Wrapping the callable is what the
    declaration means. Remove once Airflow declares ``Discriminator(...)`` itself.
    """
    from pydantic import Discriminator
    from pydantic._internal import _discriminated_union

    original = _discriminated_union.apply_discriminator
    if getattr(original, "_keyart_patched", False):
        return

    def apply_discriminator(schema, discriminator, definitions=None):
        if callable(discriminator) and not isinstance(discriminator, Discriminator):
            discriminator = Discriminator(discriminator)
        return original(schema, discriminator, definitions)

    apply_discriminator._keyart_patched = True  # type: ignore[attr-defined]
    _discriminated_union.apply_discriminator = apply_discriminator


_LIVE_IN_PROCESS_APIS: list = []


def patch_in_process_api_lifetime() -> None:
    """Keep every in-process Execution API object alive for the life of the process.

    ``airflow dags test`` serves the Execution API in-process: it enters the app's lifespan and
    keeps the exit stack only on the ``InProcessExecutionAPI`` object, which nothing references
    once the client is built. When it is collected the lifespan exits, and svcs (>= 26) then
    removes ``app.state.svcs_registry``: the first task fails with "'State' object has no
    attribute 'svcs_registry'".
    """

    def keep_alive(supervisor) -> None:
        original = supervisor.in_process_api_server
        if getattr(original, "_keyart_patched", False):
            return

        def in_process_api_server():
            api = original()
            _LIVE_IN_PROCESS_APIS.append(api)
            return api

        in_process_api_server._keyart_patched = True  # type: ignore[attr-defined]
        supervisor.in_process_api_server = in_process_api_server

    _after_import("airflow.sdk.execution_time.supervisor", keep_alive)


def _after_import(module_name: str, patch) -> None:
    """Call ``patch(module)`` once ``module_name`` is imported (now, if it already is)."""
    import importlib.abc
    import importlib.machinery

    if module_name in sys.modules:
        patch(sys.modules[module_name])
        return

    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if fullname != module_name:
                return None
            spec = importlib.machinery.PathFinder.find_spec(fullname, path)
            if spec is None or spec.loader is None:
                return spec
            exec_module = spec.loader.exec_module

            def exec_then_patch(module):
                exec_module(module)
                patch(module)

            spec.loader.exec_module = exec_then_patch  # type: ignore[method-assign]
            return spec

    sys.meta_path.insert(0, _Finder())


def write_local_settings(airflow_home: str | Path) -> Path:
    """``<AIRFLOW_HOME>/config/airflow_local_settings.py`` applying the compatibility patch."""
    path = Path(airflow_home) / "config" / "airflow_local_settings.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != _LOCAL_SETTINGS:
        path.write_text(_LOCAL_SETTINGS)
    return path


def airflow_bin() -> str:
    local = Path(sys.executable).parent / "airflow"
    return str(local) if local.exists() else "airflow"


def sqlite_uri(home: Path) -> str:
    """The default metadata database: SQLite in the Airflow home."""
    return f"sqlite:///{home / 'airflow.db'}"


def migrate(env: Mapping[str, str]) -> None:
    """``airflow db migrate`` once per AIRFLOW_HOME and metadata database: a marker file in the
    home records the connection it migrated, so a second call for the same database (the
    set-up, then the services' launch) does not migrate again, and another database does."""
    home = Path(env["AIRFLOW_HOME"])
    write_local_settings(home)
    marker = home / _MIGRATED_MARKER
    conn = env.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", sqlite_uri(home))
    sqlite_file = conn.removeprefix("sqlite:///") if conn.startswith("sqlite:///") else None
    done = marker.exists() and marker.read_text().strip() == _marker_text(conn)
    if done and (sqlite_file is None or Path(sqlite_file).exists()):
        return
    home.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [airflow_bin(), "db", "migrate"], env=dict(env), check=True, stdout=subprocess.DEVNULL
    )
    marker.write_text(_marker_text(conn) + "\n")


def _marker_text(conn: str) -> str:
    """What the marker says for a connection: its digest, so no password is written to disk."""
    return "airflow db migrate done: " + hashlib.sha256(conn.encode()).hexdigest()


def prepared_environ(airflow_home: str | Path | None = None, **kwargs) -> dict[str, str]:
    """``airflow_environ`` with the metadata database migrated."""
    env = airflow_environ(airflow_home, **kwargs)
    migrate(env)
    return env


def dags_test(
    ds: str,
    env: Mapping[str, str],
    conf: Mapping[str, object] | None = None,
    timeout: float | None = None,
    capture: bool = False,
) -> subprocess.CompletedProcess:
    """``airflow dags test keyart_daily <ds>``: one real DAG run, in-process on the metadata DB."""
    argv = [airflow_bin(), "dags", "test", DAG_ID, ds]
    if conf:
        argv += ["--conf", json.dumps(dict(conf))]
    return subprocess.run(
        argv, env=dict(env), timeout=timeout, text=True, capture_output=capture, check=False
    )


def task_states(ds_or_run_id: str, env: Mapping[str, str]) -> dict[str, str]:
    """task_id -> state of the keyart_daily run for a logical date or run id."""
    out = subprocess.run(
        [airflow_bin(), "tasks", "states-for-dag-run", DAG_ID, ds_or_run_id, "-o", "json"],
        env=dict(env),
        text=True,
        capture_output=True,
        check=True,
    ).stdout
    # Airflow may log before the JSON: take the line that is the JSON list.
    for line in reversed(out.splitlines()):
        if line.startswith("[{") or line.strip() == "[]":
            return {row["task_id"]: row["state"] for row in json.loads(line)}
    raise ValueError(f"no task states in the output of states-for-dag-run:\n{out[-2000:]}")


class AirflowServices:
    """The Airflow an operator runs, on the project home: ``airflow api-server``, ``airflow
    scheduler`` and ``airflow dag-processor`` as separate processes (LocalExecutor), bound to
    127.0.0.1 with a login. Scheduled and triggered runs go through the scheduler and the
    Execution API, which ``airflow dags test`` never exercises.

    Use as a context manager; :meth:`client` returns an authenticated httpx client of the
    REST API (``/api/v2``).
    """

    # The scheduler's task-log server would bind every interface (port 8793): the API server
    # reads the task logs from AIRFLOW_HOME/logs on this machine instead.
    COMPONENTS = (("api-server",), ("scheduler", "--skip-serve-logs"), ("dag-processor",))

    def __init__(self, env: Mapping[str, str], log_dir: str | Path):
        self.env = dict(env)
        self.home = Path(self.env["AIRFLOW_HOME"])
        self.port = int(self.env["AIRFLOW__API__PORT"])
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_dir = Path(log_dir)
        self.procs: list[subprocess.Popen] = []

    def start(self, timeout: float = 180) -> AirflowServices:
        """Launch the three processes and wait until the API answers with a login."""
        return self.launch().wait_ready(timeout)

    def launch(self) -> AirflowServices:
        """Launch without waiting (their start-up overlaps the caller's work)."""
        migrate(self.env)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for args in self.COMPONENTS:
            out = open(self.log_dir / f"airflow-{args[0]}.log", "ab")  # noqa: SIM115 - lives with the process
            self.procs.append(subprocess.Popen([airflow_bin(), *args], env=self.env, stdout=out,
                                               stderr=subprocess.STDOUT, start_new_session=True))
        return self

    def wait_ready(self, timeout: float = 180) -> AirflowServices:
        import time

        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [p.args for p in self.procs if p.poll() is not None]
            if dead:
                self.stop()
                raise RuntimeError(f"Airflow component exited at start-up: {dead}; logs in {self.log_dir}")
            try:
                if httpx.get(f"{self.url}/api/v2/monitor/health", timeout=2).status_code == 200 \
                        and admin_password(self.home):
                    return self
            except httpx.TransportError:
                pass
            time.sleep(1)
        self.stop()
        raise TimeoutError(f"the Airflow API server did not answer on {self.url} in {timeout:.0f}s; logs in {self.log_dir}")

    def token(self) -> str:
        import httpx

        resp = httpx.post(f"{self.url}/auth/token", json={"username": ADMIN_USER, "password": admin_password(self.home)},
                          timeout=30)
        resp.raise_for_status()
        return resp.json()["access_token"]

    def client(self):
        import httpx

        return httpx.Client(base_url=f"{self.url}/api/v2", headers={"Authorization": f"Bearer {self.token()}"},
                            timeout=30)

    def stop(self) -> None:
        import signal

        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        self.procs.clear()

    def __enter__(self) -> AirflowServices:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def trigger_and_wait(client, ds: str, timeout: float = 1800, run_id: str | None = None, note: str | None = None) -> dict:
    """Trigger ``keyart_daily`` for ``ds`` through the REST API and wait for it to end; return
    the final dag run.

    The run is the one the schedule would make for day ``ds``: logical date and data interval
    start ``ds``, run after the interval's end (the UI lists and sorts runs by it), the ``ds``
    param set. It is created before the DAG is unpaused for it, so a scheduler on its schedule
    finds the day's run there and does not make its own for the same interval. When a run of
    that logical date exists already (the schedule's, or an earlier trigger), it is cleared and
    waited for: the day runs again on the data there now. Pass the client to :func:`pause`
    afterwards when nothing else should be scheduled."""
    import datetime as dt
    import time

    deadline = time.monotonic() + timeout
    while client.get(f"/dags/{DAG_ID}").status_code != 200:  # the dag processor has not parsed it yet
        if time.monotonic() > deadline:
            raise TimeoutError(f"{DAG_ID} never appeared in the API")
        time.sleep(1)
    start = f"{ds}T00:00:00Z"
    end = (dt.date.fromisoformat(ds) + dt.timedelta(days=1)).isoformat() + "T00:00:00Z"
    body = {"dag_run_id": run_id or f"keyart__{ds}", "logical_date": start, "data_interval_start": start,
            "data_interval_end": end, "run_after": end, "conf": {"ds": ds}}
    if note:
        body["note"] = note
    resp = _retry_5xx(lambda: client.post(f"/dags/{DAG_ID}/dagRuns", json=body))
    if resp.status_code == 409:  # a run of this logical date or run id exists (maybe a retried POST's): run it again
        run_id = _existing_run(client, start, body["dag_run_id"])
        if run_id is None:
            raise RuntimeError(f"triggering {DAG_ID} for {ds} was refused (409) and no run of {start} is listed: "
                               f"{resp.text[:500]}")
        client.post(f"/dags/{DAG_ID}/dagRuns/{run_id}/clear", json={"dry_run": False}).raise_for_status()
    elif resp.status_code >= 400:
        raise RuntimeError(f"triggering {DAG_ID} for {ds} was refused ({resp.status_code}): {resp.text[:500]}")
    else:
        run_id = resp.json()["dag_run_id"]
    _retry_5xx(lambda: client.patch(f"/dags/{DAG_ID}", json={"is_paused": False})).raise_for_status()
    time.sleep(1)  # a cleared run is queued again on the scheduler's next loop
    while True:
        resp = _retry_5xx(lambda: client.get(f"/dags/{DAG_ID}/dagRuns/{run_id}"))
        resp.raise_for_status()
        run = resp.json()
        if run["state"] in ("success", "failed"):
            return run
        if time.monotonic() > deadline:
            raise TimeoutError(f"run {run_id} still {run['state']} after {timeout:.0f}s")
        time.sleep(1)


def _retry_5xx(call, attempts: int = 5, pause_s: float = 1.0):
    """``call()`` (an HTTP request to the API server) again while it answers 5xx, at most
    ``attempts`` times; the last answer. On the SQLite metadata database a request that lands
    while the scheduler writes can fail with "database is locked" (500) and leave nothing
    behind; the calls retried here are a trigger (a second one that finds the first's run
    gets 409 and clears it instead), an unpause and a read."""
    import time

    for _ in range(attempts - 1):
        resp = call()
        if resp.status_code < 500:
            return resp
        time.sleep(pause_s)
    return call()


def _existing_run(client, logical_date: str, run_id: str) -> str | None:
    """The id of the run with this run id, else of the run of this logical date."""
    if client.get(f"/dags/{DAG_ID}/dagRuns/{run_id}").status_code == 200:
        return run_id
    resp = client.get(f"/dags/{DAG_ID}/dagRuns", params={"logical_date_gte": logical_date,
                                                          "logical_date_lte": logical_date})
    resp.raise_for_status()
    runs = resp.json()["dag_runs"]
    return runs[0]["dag_run_id"] if runs else None


def pause(client) -> None:
    """Pause ``keyart_daily`` (nothing is scheduled until someone unpauses it)."""
    client.patch(f"/dags/{DAG_ID}", json={"is_paused": True}).raise_for_status()


def run_tasks(client, run_id: str) -> dict[str, dict]:
    """task_id -> the task instance (state, start, end, duration, try number) of one run."""
    tis = client.get(f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances").json()["task_instances"]
    return {t["task_id"]: t for t in tis}


def task_log(client, run_id: str, task_id: str, try_number: int = 1) -> str:
    """The text of one task try's log, read through the REST API (what the UI shows)."""
    resp = client.get(f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}",
                      headers={"Accept": "application/json"})
    resp.raise_for_status()
    content = resp.json().get("content")
    if isinstance(content, list):  # structured log: one record per line
        return "\n".join(str(r.get("event", r)) if isinstance(r, dict) else str(r) for r in content)
    return str(content or "")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m keyart.demo.airflow_env", description=__doc__.splitlines()[0])
    parser.add_argument("--airflow-home", help="default <KEYART_HOME>/airflow")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="print the environment as shell exports")
    sub.add_parser("migrate", help="airflow db migrate (once)")
    run = sub.add_parser("run", help="run a command in the project Airflow environment")
    run.add_argument("cmd", nargs=argparse.REMAINDER)
    sub.add_parser("up", help="api-server + scheduler + dag-processor on 127.0.0.1 until Ctrl-C; prints the URL and login")
    sub.add_parser("login", help="print the UI login (after the first start)")
    test = sub.add_parser("dags-test", help="airflow dags test keyart_daily DS")
    test.add_argument("ds")
    test.add_argument("--conf", help="JSON run conf, e.g. '{\"ds\": \"2026-01-05\"}'")
    args = parser.parse_args(argv)

    env = airflow_environ(args.airflow_home)
    if args.command == "env":
        import shlex

        for key in sorted(k for k in env if k.startswith(("AIRFLOW", "KEYART_")) or k == "PATH"):
            print(f"export {key}={shlex.quote(env[key])}")
        return 0
    if args.command == "login":
        password = admin_password(env["AIRFLOW_HOME"])
        print(f"user {ADMIN_USER}, password {password}" if password else "no password yet: start Airflow once (up)")
        return 0 if password else 1
    migrate(env)
    if args.command == "up":
        import time

        with AirflowServices(env, Path(env["AIRFLOW_HOME"]) / "logs" / "services") as services:
            print(f"Airflow UI: {services.url}  (user {ADMIN_USER}, password {admin_password(services.home)}); "
                  f"component logs in {services.log_dir}. Ctrl-C stops it.", flush=True)
            try:
                while all(p.poll() is None for p in services.procs):
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
        return 0
    if args.command == "migrate":
        print(f"Airflow metadata ready in {env['AIRFLOW_HOME']}")
        return 0
    if args.command == "run":
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        if not cmd:
            parser.error("run needs a command, e.g. run -- airflow standalone")
        os.execvpe(cmd[0], cmd, env)
    conf = json.loads(args.conf) if args.conf else None
    return dags_test(args.ds, env, conf=conf).returncode


if __name__ == "__main__":
    sys.exit(main())
