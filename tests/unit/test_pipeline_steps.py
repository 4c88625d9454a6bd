"""The daily pipeline's step table and the pure helpers its DAG tasks call (no Airflow needed)."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from keyart import pipeline


def test_step_table_is_the_documented_chain():
    assert pipeline.DAG_ID == "keyart_daily"
    spark = [c for s in pipeline.STEPS if s.kind == "spark" for c in s.commands]
    model = [c for s in pipeline.STEPS if s.kind == "model" for c in s.commands]
    assert spark == list(pipeline.SPARK_JOBS)
    assert model == list(pipeline.MODEL_STEPS)
    assert len({s.task_id for s in pipeline.STEPS}) == len(pipeline.STEPS)
    seen: set[str] = set()
    for step in pipeline.STEPS:  # listed in an order the DAG can run them
        assert set(step.upstream) <= seen, step.task_id
        assert step.doc, step.task_id
        seen.add(step.task_id)


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


def test_spark_submit_uses_the_installed_jobs_and_configured_master(monkeypatch):
    from pathlib import Path

    import keyart.jobs

    monkeypatch.setenv("KEYART_SPARK_MASTER", "spark://cluster:7077")
    argv = pipeline.spark_submit_argv("rewards", "2026-03-01")
    assert Path(argv[0]).name == "spark-submit"
    assert argv[argv.index("--master") + 1] == "spark://cluster:7077"
    assert argv[-3:] == [str(Path(keyart.jobs.__file__).parent / "rewards.py"), "--ds", "2026-03-01"]
    with pytest.raises(ValueError, match="unknown Spark job"):
        pipeline.spark_submit_argv("nope", "2026-03-01")


def test_a_failing_spark_submit_fails_the_step(monkeypatch, capfd):
    # a master nobody understands: spark-submit itself refuses it (a real JVM start)
    monkeypatch.setenv("KEYART_SPARK_MASTER", "not-a-master://x")
    with pytest.raises(RuntimeError, match="spark-submit of ingest for ds=2026-03-01 exited with"):
        pipeline.run_spark_job("ingest", "2026-03-01")
    assert "spark-submit --master not-a-master://x" in capfd.readouterr().out


def test_a_connect_job_with_no_server_fails_at_once(monkeypatch):
    from keyart.net import free_port

    monkeypatch.setenv("KEYART_SPARK_REMOTE", f"sc://127.0.0.1:{free_port()}")
    with pytest.raises(ConnectionError, match="no Spark Connect server listens"):
        pipeline.run_spark_job("rewards", "2026-03-01")


def test_model_step_runs_in_process_and_fails_with_the_exit_code(capsys):
    with pytest.raises(ValueError, match="unknown model step"):
        pipeline.run_model_step("fit", "2026-03-01")
    # nothing registered in this (empty) home: the gate refuses with exit code 1
    with pytest.raises(RuntimeError, match=r"keyart gate --ds 2026-03-01 exited with 1"):
        pipeline.run_model_step("gate", "2026-03-01")
    assert "$ keyart gate --ds 2026-03-01" in capsys.readouterr().out


def test_last_line_value():
    assert pipeline.last_line_value('{"version": "3"}') == {"version": "3"}
    assert pipeline.last_line_value("/lake/x") == "/lake/x"
