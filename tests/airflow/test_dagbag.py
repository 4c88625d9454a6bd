"""DagBag integrity of dags/keyart_daily.py: it parses, cheaply, into the step table's tasks."""

from __future__ import annotations

import json

import pytest
from airflow_helpers import REPO, run_python

from keyart import pipeline

HEAVY_MODULES = ("pyspark", "lightgbm", "mlflow", "onnxruntime", "onnx", "pandas", "sklearn")

EXPECTED_ORDER = [step.task_id for step in pipeline.STEPS]

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


def test_task_graph_is_the_expected_chain(parsed):
    tasks = parsed["tasks"]
    assert set(tasks) == set(EXPECTED_ORDER)
    assert tasks["partition_date"]["upstream"] == []
    for before, after in zip(EXPECTED_ORDER[1:], EXPECTED_ORDER[2:], strict=False):
        assert before in tasks[after]["upstream"], f"{before} must run before {after}"
    # every task gets the partition date from partition_date, explicitly
    for task_id in EXPECTED_ORDER[1:]:
        assert "partition_date" in tasks[task_id]["upstream"], task_id


def test_retries_with_backoff(parsed):
    tasks = parsed["tasks"]
    no_retry = {"partition_date", "check_data_quality", "training_window"}  # retrying cannot help
    for task_id, t in tasks.items():
        if task_id in no_retry:
            assert t["retries"] == 0, task_id
        else:
            assert t["retries"] == 2, task_id
            assert t["backoff"] >= 2, task_id
    # days chain through yesterday's priors and the registry: a backfill must run in order
    assert {t for t, v in tasks.items() if v["depends_on_past"]} == {"priors", "register", "promote"}
