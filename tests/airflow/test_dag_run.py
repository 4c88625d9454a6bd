"""Real runs of keyart_daily over a small simulated world.

Day D1 is the lake's first day of traffic: ``airflow dags test`` runs every task in-process,
the Spark tasks as ``spark-submit`` applications, the model training on the early part of D1
and evaluated on the late part (a cold start). Day D2 runs the way production and the demo
run it: an API server, a scheduler and a DAG processor as separate processes, the day
triggered through the REST API with a login, the LocalExecutor's workers reporting to the
Execution API, the Spark tasks as clients of one Spark Connect server; the task logs are
read back through the REST API. Then D1..D2 run again as a real backfill
(``--reprocess-behavior completed``, run by the scheduler): the registry must end as it was.
Airflow's metadata database is PostgreSQL, as deployed (``make up``): on SQLite a REST call
that lands while the scheduler writes can fail with "database is locked".

    pytest tests/airflow/test_dag_run.py      # a few minutes on two cores
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from airflow_helpers import run_python
from postgres_helpers import fresh_database

from keyart import pipeline
from keyart.config import Settings
from keyart.demo import airflow_env
from keyart.jobs.connect_server import ConnectServer
from keyart.net import free_port

pytestmark = [pytest.mark.slow, pytest.mark.spark, pytest.mark.mlflow, pytest.mark.timeout(1800)]

HISTORY_START, D1, D2 = "2026-09-25", "2026-10-01", "2026-10-02"  # in the past: Airflow refuses to backfill future dates
HISTORY_END = "2026-09-30"
VISITS = 150
ALL_TASKS = tuple(step.task_id for step in pipeline.STEPS)


def keyart(env: dict[str, str], *args: str, timeout: float = 600) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "keyart.cli", *args],
        env=env, text=True, capture_output=True, timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, f"keyart {' '.join(args)} failed:\n{proc.stderr[-4000:]}"
    return proc.stdout


def dags_test(ds: str, env: dict[str, str], log_dir: Path) -> dict[str, str]:
    """One real DAG run for ``ds``; returns task_id -> state (the output is kept in log_dir)."""
    proc = airflow_env.dags_test(ds, env, timeout=1500, capture=True)
    log = log_dir / f"dags-test-{ds}-{len(list(log_dir.glob('dags-test-*')))}.log"
    log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    states = airflow_env.task_states(ds, env)
    failed = {t: s for t, s in states.items() if s not in ("success", "skipped")}
    assert proc.returncode == 0 and not failed, (
        f"airflow dags test keyart_daily {ds} -> rc {proc.returncode}, states {states}; "
        f"log {log}:\n{_failure_excerpt(proc.stdout + proc.stderr)}"
    )
    return states


def _failure_excerpt(text: str, width: int = 6000) -> str:
    marks = [i for i in (text.find("Traceback"), text.find("[error")) if i >= 0]
    start = max(min(marks) - 500, 0) if marks else max(len(text) - width, 0)
    return text[start : start + width]


REGISTRY_STATE = """
import json
from keyart.config import Settings
from keyart import registry
s = Settings()
c = registry.client(s)
versions = c.search_model_versions(f"name = '{s.registered_model}'")
model = c.get_registered_model(s.registered_model)
print("REGISTRY=" + json.dumps({
    "versions": sorted((int(v.version), v.tags.get("keyart.ds"), registry.version_kind(v.tags)) for v in versions),
    "aliases": dict(sorted(model.aliases.items())),
}))
"""


def registry_state(env: dict[str, str]) -> dict:
    out = run_python(REGISTRY_STATE, env, timeout=180).stdout
    return json.loads(next(ln for ln in out.splitlines() if ln.startswith("REGISTRY="))[9:])


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A small world with a week of history and two days of random-policy traffic, and a Spark
    Connect server (started while the world is built) for the scheduler-run days."""
    home = tmp_path_factory.mktemp("keyart-dag")
    lake = home / "lake"
    env = {
        **os.environ,
        "KEYART_HOME": str(home),
        "KEYART_SPARK_MASTER": "local[2]",
        "KEYART_SPARK_SHUFFLE_PARTITIONS": "2",
        "KEYART_SPARK_DRIVER_MEMORY": "1g",
        "PYSPARK_PYTHON": sys.executable,
        # a port of its own, so a running `make airflow-ui` or another test is never reached
        "AIRFLOW__API__PORT": str(free_port()),
    }
    for name in ("KEYART_CONFIG", "KEYART_SPARK_REMOTE", "AIRFLOW__CORE__EXECUTION_API_SERVER_URL"):
        env.pop(name, None)
    with fresh_database("tests/airflow/test_dag_run.py (Airflow's metadata database)", "postgresql+psycopg2") as airflow_db:
        server = ConnectServer(Settings(spark_master="local[2]", spark_driver_memory="1g", spark_shuffle_partitions=2),
                               log_path=home / "spark-connect.log", env=env, cwd=home).launch()
        try:
            keyart(env, "world", "--out", str(lake), "--seed", "7", "--titles", "30", "--members", "500",
                   "--history-days", "6", "--start", D1)  # fmt: skip
            server.wait_ready()
            remote = {**env, "KEYART_SPARK_REMOTE": server.url}
            keyart(remote, "job", "ingest", "--ds", HISTORY_START, "--through", HISTORY_END)
            for ds in (D1, D2):
                keyart(env, "traffic", "--lake", str(lake), "--ds", ds, "--policy", "random",
                       "--visits", str(VISITS))  # fmt: skip
            af_env = airflow_env.prepared_environ(home / "airflow", base=env, database=airflow_db)
            yield {"home": home, "lake": lake, "env": af_env, "logs": home, "spark_remote": server.url}
        finally:
            server.stop()


@pytest.fixture(scope="module")
def day1(world) -> dict[str, str]:
    """D1 by ``airflow dags test``, its Spark tasks as spark-submit applications."""
    return dags_test(D1, world["env"], world["logs"])


@pytest.fixture(scope="module")
def services(world, day1):
    """The Airflow an operator runs, its Spark tasks clients of the module's Connect server."""
    # Only triggered runs: unpausing must not also schedule today's interval, a day with no data.
    env = {**world["env"], "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False", "KEYART_SPARK_REMOTE": world["spark_remote"]}
    with airflow_env.AirflowServices(env, world["logs"] / "airflow-services") as running, running.client() as api:
        yield running, api


def _scheduler_tail(world) -> str:
    return (world["logs"] / "airflow-services" / "airflow-scheduler.log").read_text()[-6000:]


@pytest.fixture(scope="module")
def day2(world, services) -> dict:
    """D2 triggered through the REST API of running Airflow services (scheduler + executor)."""
    running, api = services
    run = airflow_env.trigger_and_wait(api, D2, timeout=1500)
    tasks = airflow_env.run_tasks(api, run["dag_run_id"])
    states = {t: ti["state"] for t, ti in tasks.items()}
    base = f"/dags/{pipeline.DAG_ID}/dagRuns/{run['dag_run_id']}/taskInstances"
    logs = {task: api.get(f"{base}/{task}/logs/1", headers={"Accept": "application/json"})
            for task in ("ingest", "train", "promote")}
    if run["state"] != "success":
        pytest.fail(f"triggered run of {D2} ended {run['state']}: {states}\nscheduler log tail:\n{_scheduler_tail(world)}")
    return {"states": states, "run": run, "tasks": tasks,
            "logs": {task: (r.status_code, json.dumps(r.json())) for task, r in logs.items()}}


def _has_parquet(path: Path) -> bool:
    return path.is_dir() and any(path.rglob("*.parquet"))


def test_first_day_runs_every_task_on_a_cold_start(world, day1):
    assert day1 == {task_id: "success" for task_id in ALL_TASKS}
    train = json.loads((world["lake"] / "runs" / f"ds={D1}" / "train.json").read_text())
    assert train["cold_start_split"] is True and train["window"]["days"] == [D1]


def test_every_task_succeeds_and_writes_its_outputs(world, day2):
    states = day2["states"]
    assert states == {task_id: "success" for task_id in ALL_TASKS}
    assert day2["run"]["run_type"] == "manual" and day2["run"]["conf"] == {"ds": D2}

    lake = world["lake"]
    for log in ("impressions", "plays"):
        assert _has_parquet(lake / "clean" / log / f"ds={D2}"), log
    metrics = json.loads((lake / "metrics" / "ingest" / f"ds={D2}" / "metrics.json").read_text())
    assert metrics["impressions"]["read"] > 0
    assert _has_parquet(lake / "rewards" / f"ds={D2}")
    assert _has_parquet(lake / "features" / "training" / f"ds={D2}")
    assert _has_parquet(lake / "features" / "members" / f"ds={D2}")
    assert _has_parquet(lake / "priors" / f"ds={D2}")
    run_dir = lake / "runs" / f"ds={D2}"
    for name in ("model.txt", "train.json", "evaluation.json", "bundle/manifest.json", "bundle/model.onnx"):
        assert (run_dir / name).is_file(), name

    state = registry_state(world["env"])
    assert [ds for _, ds, kind in state["versions"] if kind == "trained"] == [D1, D2], state
    assert "champion" in state["aliases"], state  # D1's version had no champion to beat
    # promoted or kept, the champion serves D2's tables (D2's model, or a table refresh)
    champion = {str(v): ds for v, ds, _ in state["versions"]}[str(state["aliases"]["champion"])]
    assert champion == D2, state


def test_task_logs_of_a_scheduled_run_are_readable_through_the_rest_api(day2):
    for task, (status, content) in day2["logs"].items():
        assert status == 200, (task, content[:500])
    assert f"ingest/ds={D2}" in day2["logs"]["ingest"][1]  # the job's last line: its output partition
    assert "trained on" in day2["logs"]["train"][1]
    assert "champion" in day2["logs"]["promote"][1]


def test_a_triggered_run_shows_its_day(day2):
    """Logical date, data interval and run-after are those of the scheduled run of D2, and its
    duration is the run's own (not the time since the logical date)."""
    run = day2["run"]
    assert run["logical_date"].startswith(D2) and run["data_interval_start"].startswith(D2)
    assert run["run_after"].startswith("2026-10-03") and run["data_interval_end"].startswith("2026-10-03")
    seconds = (dt.datetime.fromisoformat(run["end_date"]) - dt.datetime.fromisoformat(run["start_date"])).total_seconds()
    assert 0 < seconds < 1500, run
    tasks = day2["tasks"]
    for branch in ("features", "priors"):  # both branches start once rewards has ended
        assert tasks[branch]["start_date"] >= tasks["rewards"]["end_date"], tasks


def test_backfill_rerun_leaves_the_registry_as_it_was(world, services, day2):
    """A real backfill of D1..D2 (``--reprocess-behavior completed``), run by the scheduler."""
    running, api = services
    before = registry_state(world["env"])
    resp = api.post("/backfills", json={"dag_id": pipeline.DAG_ID, "from_date": f"{D1}T00:00:00Z",
                                        "to_date": f"{D2}T00:00:00Z", "reprocess_behavior": "completed",
                                        "max_active_runs": 1})
    assert resp.status_code == 200, resp.text
    backfill = resp.json()
    deadline = time.monotonic() + 1500
    while backfill.get("completed_at") is None:
        assert time.monotonic() < deadline, f"backfill not done: {backfill}\n{_scheduler_tail(world)}"
        time.sleep(2)
        backfill = api.get(f"/backfills/{backfill['id']}").json()
    runs = api.get(f"/dags/{pipeline.DAG_ID}/dagRuns", params={"order_by": "logical_date"}).json()["dag_runs"]
    assert [(r["logical_date"][:10], r["state"]) for r in runs] == [(D1, "success"), (D2, "success")], runs
    for r in runs:  # every task ran again, by the backfill
        tasks = airflow_env.run_tasks(api, r["dag_run_id"])
        assert {t: ti["state"] for t, ti in tasks.items()} == {t: "success" for t in ALL_TASKS}, r["dag_run_id"]
        assert all(ti["try_number"] >= 2 for ti in tasks.values()), tasks
    assert registry_state(world["env"]) == before


def test_backfill_plans_the_days_oldest_first(world, day1):
    proc = subprocess.run(
        [airflow_env.airflow_bin(), "backfill", "create", "--dag-id", pipeline.DAG_ID,
         "--from-date", D1, "--to-date", D2, "--reprocess-behavior", "completed", "--dry-run"],
        env=world["env"], text=True, capture_output=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    planned = [ln.split("|")[1].strip()[:10] for ln in proc.stdout.splitlines() if ln.startswith("| 20")]
    assert planned == [D1, D2]
