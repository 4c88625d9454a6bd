"""Real runs of keyart_daily: ``airflow dags test`` on SQLite over a small simulated world.

Day D1 is the lake's first day of traffic: every task runs (``airflow dags test``), the model
training on the early part of D1 and evaluated on the late part (a cold start). Day D2 runs
the way production runs it: an API server, a scheduler and a DAG processor run as separate
processes, the day is triggered through the REST API with a login, the LocalExecutor's
workers report to the Execution API, and the task logs are read back through the REST API.
Then D1..D2 run again, as a backfill with ``--reprocess-behavior completed`` would: the
registry must end as it was.

    pytest tests/airflow/test_dag_run.py      # a few minutes on two cores
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from airflow_helpers import run_python

from keyart import pipeline
from keyart.demo import airflow_env
from keyart.net import free_port

pytestmark = [pytest.mark.slow, pytest.mark.spark, pytest.mark.mlflow, pytest.mark.timeout(1800)]

HISTORY_START, D1, D2 = "2026-09-25", "2026-10-01", "2026-10-02"  # in the past: Airflow refuses to backfill future dates
HISTORY_END = "2026-09-30"
VISITS = 150
SPARK_TASKS = ("ingest", "rewards", "features", "priors")
MODEL_TASKS = ("train", "evaluate", "export", "register", "promote")
ALL_TASKS = ("partition_date", "check_data_quality", "training_window", *SPARK_TASKS, *MODEL_TASKS)


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
    """A small world with a week of history and two days of random-policy traffic."""
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
    env.pop("KEYART_CONFIG", None)
    env.pop("AIRFLOW__CORE__EXECUTION_API_SERVER_URL", None)
    keyart(env, "world", "--out", str(lake), "--seed", "7", "--titles", "30", "--members", "500",
           "--history-days", "6", "--start", D1)  # fmt: skip
    keyart(env, "job", "ingest", "--ds", HISTORY_START, "--through", HISTORY_END)
    for ds in (D1, D2):
        keyart(env, "traffic", "--lake", str(lake), "--ds", ds, "--policy", "random",
               "--visits", str(VISITS))  # fmt: skip
    af_env = airflow_env.prepared_environ(home / "airflow", base=env)
    return {"home": home, "lake": lake, "env": af_env, "logs": home}


@pytest.fixture(scope="module")
def day1(world) -> dict[str, str]:
    return dags_test(D1, world["env"], world["logs"])


@pytest.fixture(scope="module")
def day2(world, day1) -> dict:
    """D2 triggered through the REST API of running Airflow services (scheduler + executor)."""
    # Only the triggered run: unpausing must not also schedule today's interval, a day with no data.
    env = {**world["env"], "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False"}
    services = airflow_env.AirflowServices(env, world["logs"] / "airflow-services")
    with services, services.client() as api:
        run = airflow_env.trigger_and_wait(api, D2, timeout=1500)
        base = f"/dags/{pipeline.DAG_ID}/dagRuns/{run['dag_run_id']}/taskInstances"
        tis = api.get(base).json()["task_instances"]
        states = {t["task_id"]: t["state"] for t in tis}
        logs = {task: api.get(f"{base}/{task}/logs/1", headers={"Accept": "application/json"})
                for task in ("ingest", "train", "promote")}
    if run["state"] != "success":
        scheduler = (world["logs"] / "airflow-services" / "airflow-scheduler.log").read_text()[-6000:]
        pytest.fail(f"triggered run of {D2} ended {run['state']}: {states}\nscheduler log tail:\n{scheduler}")
    return {"states": states, "run": run,
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


def test_backfill_rerun_leaves_the_registry_as_it_was(world, day2):
    before = registry_state(world["env"])
    for ds in (D1, D2):  # what `airflow backfill create ... --reprocess-behavior completed` runs
        dags_test(ds, world["env"], world["logs"])
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
