"""DagBag integrity of dags/keyart_daily.py: it parses, cheaply, into the step table's tasks."""

from __future__ import annotations

import json

import pytest
from airflow_helpers import REPO, run_python

from keyart import pipeline

HEAVY_MODULES = ("pyspark", "lightgbm", "mlflow", "onnxruntime", "onnx", "pandas", "sklearn")

# Parse the dags folder the way the scheduler does, in a fresh interpreter, and report what
# the test needs as JSON (the DagBag and sys.modules of *that* process).
PARSE = """
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1] if len(sys.argv) > 1 else {folder!r}, include_examples=False)
dag = bag.dags.get({dag_id!r})
out = {{
    "import_errors": {{str(k): str(v) for k, v in bag.import_errors.items()}},
    "dag_ids": sorted(bag.dags),
    "heavy": sorted(m for m in sys.modules if m.split(".")[0] in {heavy!r}),
}}
if dag is not None:
    out.update(
        tags=sorted(dag.tags),
        catchup=dag.catchup,
        max_active_runs=dag.max_active_runs,
        has_doc=bool(dag.doc_md),
        schedule=type(dag.timetable).__name__,
        params=sorted(dag.params),
        tasks={{
            t.task_id: {{
                "upstream": sorted(t.upstream_task_ids),
                "retries": t.retries,
                "backoff": t.retry_exponential_backoff,
                "depends_on_past": t.depends_on_past,
                "type": type(t).__name__,
            }}
            for t in dag.tasks
        }},
    )
print("DAGBAG_JSON=" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def parsed(tmp_path_factory) -> dict:
    import os

    from keyart.demo import airflow_env

    home = tmp_path_factory.mktemp("airflow-parse")
    env = airflow_env.airflow_environ(home, base=os.environ)
    code = PARSE.format(folder=str(REPO / "dags"), heavy=set(HEAVY_MODULES), dag_id=pipeline.DAG_ID)
    proc = run_python(code, env, timeout=60)
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("DAGBAG_JSON="))
    return json.loads(line.removeprefix("DAGBAG_JSON="))


def test_no_import_errors(parsed):
    assert parsed["import_errors"] == {}
    assert parsed["dag_ids"] == [pipeline.DAG_ID]


def test_nothing_heavy_imported_at_parse_time(parsed):
    assert parsed["heavy"] == [], f"parsing the DAG imported {parsed['heavy']}"


def test_dag_settings(parsed):
    assert parsed["tags"] and "keyart" in parsed["tags"]
    assert parsed["catchup"] is False
    assert parsed["max_active_runs"] == 1
    assert parsed["has_doc"]
    assert parsed["schedule"] == "CronDataIntervalTimetable"
    assert "ds" in parsed["params"]


def test_task_graph_is_the_step_table(parsed):
    tasks = parsed["tasks"]
    assert set(tasks) == {step.task_id for step in pipeline.STEPS}
    for step in pipeline.STEPS:
        assert tasks[step.task_id]["upstream"] == sorted(step.upstream), step.task_id
    # the order the day needs: Spark chain, the two branches joined before training, publish last
    assert tasks["ingest"]["upstream"] == []
    assert tasks["check_data_quality"]["upstream"] == ["ingest"]
    assert tasks["rewards"]["upstream"] == ["check_data_quality"]
    assert tasks["features"]["upstream"] == tasks["priors"]["upstream"] == ["rewards"]
    assert tasks["training_window"]["upstream"] == ["features"]
    assert tasks["train"]["upstream"] == ["priors", "training_window"]
    assert tasks["promote"]["upstream"] == ["train"]


def test_graph_is_readable(parsed):
    """No task wired to every other (the partition date is resolved by each task from its
    run), a handful of boxes, and a fork where two steps do not depend on each other."""
    tasks = parsed["tasks"]
    assert len(tasks) <= 8
    downstream = {t: [u for u, v in tasks.items() if t in v["upstream"]] for t in tasks}
    assert max(len(d) for d in downstream.values()) <= 2
    assert max(len(v["upstream"]) for v in tasks.values()) <= 2
    assert [t for t, d in downstream.items() if not d] == ["promote"]
    assert sorted(downstream["rewards"]) == ["features", "priors"]


def test_tasks_run_in_the_task_process(parsed):
    """Spark and model steps are Python tasks (no shell, no fresh interpreter per step)."""
    types = {t: v["type"] for t, v in parsed["tasks"].items()}
    assert types["training_window"] == "_ShortCircuitDecoratedOperator"
    assert {t for t, kind in types.items() if kind != "_PythonDecoratedOperator"} == {"training_window"}


def test_retries_with_backoff(parsed):
    tasks = parsed["tasks"]
    no_retry = {"check_data_quality", "training_window"}  # retrying cannot help
    for task_id, t in tasks.items():
        if task_id in no_retry:
            assert t["retries"] == 0, task_id
        else:
            assert t["retries"] == 2, task_id
            assert t["backoff"] >= 2, task_id
    # days chain through yesterday's priors and the registry: a backfill must run in order
    assert {t for t, v in tasks.items() if v["depends_on_past"]} == {"priors", "promote"}


def test_api_calls_are_retried_while_the_server_answers_5xx():
    """A REST call that lands while the scheduler writes SQLite can fail with 500 ("database
    is locked") and leave nothing behind: the demo's trigger, unpause and reads try again."""
    from types import SimpleNamespace

    from keyart.demo.airflow_env import _retry_5xx

    answers = iter([500, 503, 200])
    calls = []

    def call():
        calls.append(1)
        return SimpleNamespace(status_code=next(answers))

    assert _retry_5xx(call, pause_s=0).status_code == 200 and len(calls) == 3
    assert _retry_5xx(lambda: SimpleNamespace(status_code=409), pause_s=0).status_code == 409  # not retried
    failing = []
    assert _retry_5xx(lambda: failing.append(1) or SimpleNamespace(status_code=500), attempts=4, pause_s=0).status_code == 500
    assert len(failing) == 4


def test_the_metadata_database_is_migrated_once_per_connection(tmp_path, monkeypatch):
    """``migrate`` runs ``airflow db migrate`` once per home and database: the set-up and the
    services' launch share one migration; another database, or a deleted SQLite file, migrates
    again; the marker holds no password."""
    from keyart.demo import airflow_env

    runs = []
    monkeypatch.setattr(airflow_env.subprocess, "run", lambda argv, env, **kw: runs.append(
        (argv[1:], env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])))
    home = tmp_path / "airflow"
    pg = {"AIRFLOW_HOME": str(home), "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "postgresql+psycopg2://u:secret@h/db1"}
    airflow_env.migrate(pg)
    airflow_env.migrate(pg)
    assert runs == [(["db", "migrate"], pg["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])]
    assert "secret" not in (home / airflow_env._MIGRATED_MARKER).read_text()
    other = {**pg, "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "postgresql+psycopg2://u:secret@h/db2"}
    airflow_env.migrate(other)
    assert len(runs) == 2
    lite = {"AIRFLOW_HOME": str(home), "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}"}
    airflow_env.migrate(lite)
    (home / "airflow.db").write_bytes(b"")  # what the real migrate would have created
    airflow_env.migrate(lite)
    assert len(runs) == 3
    (home / "airflow.db").unlink()
    airflow_env.migrate(lite)
    assert len(runs) == 4
