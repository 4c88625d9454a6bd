"""The daily pipeline's step table and the pure helpers its DAG tasks call (no Airflow needed)."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from keyart import pipeline


def test_step_table_is_the_documented_chain():
    assert pipeline.DAG_ID == "keyart_daily"
    assert [s.command for s in pipeline.STEPS if s.kind == "spark"] == list(pipeline.SPARK_JOBS)
    assert [s.command for s in pipeline.STEPS if s.kind == "model"] == list(pipeline.MODEL_STEPS)
    assert len({s.task_id for s in pipeline.STEPS}) == len(pipeline.STEPS)


UTC = dt.UTC


@pytest.mark.parametrize(
    ("param", "logical", "run_after", "expected"),
    [
        ("2026-03-02", dt.datetime(2026, 1, 1, tzinfo=UTC), None, "2026-03-02"),
        (None, dt.datetime(2026, 3, 1, tzinfo=UTC), dt.datetime(2026, 3, 2, 0, 5, tzinfo=UTC), "2026-03-01"),
        ("", dt.datetime(2026, 3, 1, 23, 0, tzinfo=UTC), None, "2026-03-01"),
        (None, None, dt.datetime(2026, 3, 2, 9, 30, tzinfo=UTC), "2026-03-01"),
        # the trigger form's "now": that day is not over, so the last complete day
        (None, dt.datetime(2026, 3, 2, 9, 30, tzinfo=UTC), dt.datetime(2026, 3, 2, 9, 30, tzinfo=UTC), "2026-03-01"),
        # a past day triggered later (airflow dags test D, a REST trigger with logical date D)
        (None, dt.datetime(2026, 3, 1, tzinfo=UTC), dt.datetime(2026, 3, 5, 12, 0, tzinfo=UTC), "2026-03-01"),
    ],
)
def test_resolve_ds(param, logical, run_after, expected):
    assert pipeline.resolve_ds(param, logical, run_after) == expected


@pytest.mark.parametrize(
    ("param", "match"),
    [("2026-13-01", "YYYY-MM-DD"), ("yesterday", "YYYY-MM-DD")],
)
def test_resolve_ds_rejects_bad_param(param, match):
    with pytest.raises(ValueError, match=match):
        pipeline.resolve_ds(param, None, None)


def test_resolve_ds_needs_some_date():
    with pytest.raises(ValueError, match="pass the ds param"):
        pipeline.resolve_ds(None, None, None)


def _metrics(imp_read, imp_q, plays_read=10, plays_q=0, reasons=None):
    return {
        "step": "ingest",
        "ds": "2026-03-01",
        "impressions": {"read": imp_read, "clean": imp_read - imp_q, "quarantined": imp_q,
                        "duplicates": 0, "reasons": reasons or {}},
        "plays": {"read": plays_read, "clean": plays_read - plays_q, "quarantined": plays_q,
                  "duplicates": 0},
    }  # fmt: skip


def test_quality_gate_passes_a_normal_day():
    summary = pipeline.check_ingest_metrics(_metrics(1000, 10), "2026-03-01", 0.05)
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
def test_quality_gate_fails_with_a_clear_message(metrics, match):
    with pytest.raises(ValueError, match=match):
        pipeline.check_ingest_metrics(metrics, "2026-03-01", 0.05)


def test_spark_command_uses_the_installed_jobs_and_configured_master(monkeypatch):
    import keyart.jobs

    monkeypatch.setenv("KEYART_SPARK_MASTER", "spark://cluster:7077")
    monkeypatch.delenv("KEYART_SPARK_REMOTE", raising=False)
    command = pipeline.spark_job_command("rewards", "2026-03-01")
    jobs_dir = str(__import__("pathlib").Path(keyart.jobs.__file__).parent)
    assert "spark-submit --master spark://cluster:7077 " in command
    assert f"{jobs_dir}/rewards.py --ds 2026-03-01" in command
    assert command.rstrip().endswith("rewards/ds=2026-03-01")  # XCom: the output path


def test_spark_command_with_a_connect_server_runs_the_job_file_as_its_client(monkeypatch):
    import sys

    import keyart.jobs

    monkeypatch.setenv("KEYART_SPARK_REMOTE", "sc://spark-connect:15002")
    command = pipeline.spark_job_command("features", "2026-03-01")
    jobs_dir = str(__import__("pathlib").Path(keyart.jobs.__file__).parent)
    assert "spark-submit" not in command  # no JVM of its own: the server runs the plans
    assert command.startswith(f"{sys.executable} {jobs_dir}/features.py --ds 2026-03-01 && echo ")
    assert command.rstrip().endswith("training/ds=2026-03-01")


def test_model_command_passes_ds_and_echoes_output():
    command = pipeline.keyart_command("train", "2026-03-01")
    assert "-m keyart.cli train --ds 2026-03-01" in command
    assert command.endswith("runs/ds=2026-03-01/model.txt")
    register = pipeline.keyart_command("register", "2026-03-01")
    assert "echo" not in register  # its printed JSON line is the XCom
    assert pipeline.last_line_value('{"version": "3"}') == {"version": "3"}
    assert pipeline.last_line_value("/lake/x") == "/lake/x"
