"""DagBag integrity of dags/keyart_daily.py, and the DAG's small pure helpers."""

from __future__ import annotations

import datetime as dt
import json
import runpy

import pytest
from airflow_helpers import DAG_FILE, REPO, run_python

HEAVY_MODULES = ("pyspark", "lightgbm", "mlflow", "onnxruntime", "onnx", "pandas", "sklearn")

EXPECTED_ORDER = [
    "partition_date", "ingest", "check_data_quality", "rewards", "features", "priors",
    "training_window", "train", "evaluate", "export", "register", "promote",
]  # fmt: skip

# Parse the dags folder the way the scheduler does, in a fresh interpreter, and report what
# the test needs as JSON (the DagBag and sys.modules of *that* process).
PARSE = """
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1] if len(sys.argv) > 1 else {folder!r}, include_examples=False)
dag = bag.dags.get("keyart_daily")
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
    code = PARSE.format(folder=str(REPO / "dags"), heavy=set(HEAVY_MODULES))
    proc = run_python(code, env, timeout=60)
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("DAGBAG_JSON="))
    return json.loads(line.removeprefix("DAGBAG_JSON="))


def test_no_import_errors(parsed):
    assert parsed["import_errors"] == {}
    assert parsed["dag_ids"] == ["keyart_daily"]


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


# --- the DAG module's helpers, run in this process --------------------------------------------


@pytest.fixture(scope="module")
def dag_module() -> dict:
    return runpy.run_path(str(DAG_FILE))


UTC = dt.UTC


@pytest.mark.parametrize(
    ("param", "logical", "run_after", "expected"),
    [
        ("2026-03-02", dt.datetime(2026, 1, 1, tzinfo=UTC), None, "2026-03-02"),
        (None, dt.datetime(2026, 3, 1, tzinfo=UTC), dt.datetime(2026, 3, 2, 0, 5, tzinfo=UTC), "2026-03-01"),
        ("", dt.datetime(2026, 3, 1, 23, 0, tzinfo=UTC), None, "2026-03-01"),
        (None, None, dt.datetime(2026, 3, 2, 9, 30, tzinfo=UTC), "2026-03-01"),
    ],
)
def test_resolve_ds(dag_module, param, logical, run_after, expected):
    assert dag_module["resolve_ds"](param, logical, run_after) == expected


@pytest.mark.parametrize(
    ("param", "match"),
    [("2026-13-01", "YYYY-MM-DD"), ("yesterday", "YYYY-MM-DD")],
)
def test_resolve_ds_rejects_bad_param(dag_module, param, match):
    with pytest.raises(ValueError, match=match):
        dag_module["resolve_ds"](param, None, None)


def test_resolve_ds_needs_some_date(dag_module):
    with pytest.raises(ValueError, match="pass the ds param"):
        dag_module["resolve_ds"](None, None, None)


def _metrics(imp_read, imp_q, plays_read=10, plays_q=0, reasons=None):
    return {
        "step": "ingest",
        "ds": "2026-03-01",
        "impressions": {"read": imp_read, "clean": imp_read - imp_q, "quarantined": imp_q,
                        "duplicates": 0, "reasons": reasons or {}},
        "plays": {"read": plays_read, "clean": plays_read - plays_q, "quarantined": plays_q,
                  "duplicates": 0},
    }  # fmt: skip


def test_quality_gate_passes_a_normal_day(dag_module):
    summary = dag_module["check_ingest_metrics"](_metrics(1000, 10), "2026-03-01", 0.05)
    assert summary["impressions"]["read"] == 1000
    assert summary["impressions"]["quarantine_rate"] == pytest.approx(0.01)
    json.dumps(summary)  # small and serialisable: it goes to XCom


@pytest.mark.parametrize(
    ("metrics", "match"),
    [
        (_metrics(0, 0), "no impressions were read for ds=2026-03-01"),
        (_metrics(100, 6, reasons={"propensity out of range": 6}),
         r"impressions: 6 of 100 rows quarantined \(6.00%\) > max_quarantine_rate 5.00%.*propensity out of range"),
        (_metrics(100, 0, plays_read=50, plays_q=10), r"plays: 10 of 50 rows quarantined"),
        ({"step": "ingest", "ds": "2026-03-01"}, "no impressions were read"),
    ],
)  # fmt: skip
def test_quality_gate_fails_with_a_clear_message(dag_module, metrics, match):
    with pytest.raises(ValueError, match=match):
        dag_module["check_ingest_metrics"](metrics, "2026-03-01", 0.05)


def test_spark_command_uses_the_installed_jobs_and_configured_master(dag_module, monkeypatch):
    import keyart.jobs

    monkeypatch.setenv("KEYART_SPARK_MASTER", "spark://cluster:7077")
    monkeypatch.delenv("KEYART_SPARK_REMOTE", raising=False)
    command = dag_module["spark_job_command"]("rewards", "2026-03-01")
    jobs_dir = str(__import__("pathlib").Path(keyart.jobs.__file__).parent)
    assert "spark-submit --master spark://cluster:7077 " in command
    assert f"{jobs_dir}/rewards.py --ds 2026-03-01" in command
    assert command.rstrip().endswith("rewards/ds=2026-03-01")  # XCom: the output path


def test_spark_command_with_a_connect_server_runs_the_job_file_as_its_client(dag_module, monkeypatch):
    import sys

    import keyart.jobs

    monkeypatch.setenv("KEYART_SPARK_REMOTE", "sc://spark-connect:15002")
    command = dag_module["spark_job_command"]("features", "2026-03-01")
    jobs_dir = str(__import__("pathlib").Path(keyart.jobs.__file__).parent)
    assert "spark-submit" not in command  # no JVM of its own: the server runs the plans
    assert command.startswith(f"{sys.executable} {jobs_dir}/features.py --ds 2026-03-01 && echo ")
    assert command.rstrip().endswith("training/ds=2026-03-01")


def test_model_command_passes_ds_and_echoes_output(dag_module):
    command = dag_module["keyart_command"]("train", "2026-03-01")
    assert "-m keyart.cli train --ds 2026-03-01" in command
    assert command.endswith("runs/ds=2026-03-01/model.txt")
    register = dag_module["keyart_command"]("register", "2026-03-01")
    assert "echo" not in register  # its printed JSON line is the XCom
    assert dag_module["last_line_value"]('{"version": "3"}') == {"version": "3"}
    assert dag_module["last_line_value"]("/lake/x") == "/lake/x"
