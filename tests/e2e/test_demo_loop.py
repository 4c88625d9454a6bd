"""The whole loop, shortened: world -> random day 0 -> DAG -> endpoint -> traffic -> DAG -> ... -> report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(1500)


def test_demo_runs_two_days_through_the_real_dag_and_endpoint(tmp_path):
    home = tmp_path / "home"
    reports = tmp_path / "reports"
    env = dict(os.environ, KEYART_HOME=str(home), KEYART_SPARK_MASTER="local[2]")
    env.pop("KEYART_LAKE_ROOT", None)
    keyart = str(Path(sys.executable).parent / "keyart")
    proc = subprocess.run(
        [keyart, "demo", "--days", "2", "--visits", "1500", "--titles", "30", "--members", "800",
         "--reports", str(reports)],
        env=env, capture_output=True, text=True, timeout=1400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads((reports / "demo.json").read_text())
    days = result["days"]
    assert [d["ds"] for d in days] == ["2026-11-01", "2026-11-02", "2026-11-03"]
    assert days[0]["model_version"] == "random"
    # after the first DAG run a registered model serves, not the default-artwork fallback
    assert all(d["model_version"] not in ("random", "default", "None") for d in days[1:]), days
    for d in days:
        assert d["random"] <= d["oracle"]
        assert 0 < d["served"] <= d["oracle"] + 1e-12
    # the impressions of served days are the endpoint's own log
    lake = home / "lake"
    for d in days[1:]:
        logged = list((lake / "raw" / "impressions" / f"ds={d['ds']}").glob("*.jsonl"))
        assert logged and not any(p.name == "traffic-random.jsonl" for p in logged)
    report = (reports / "demo.md").read_text()
    assert "Take rate per day" in report and "take_rate.png" in report
    # OPE beside the truth on each run's own held-out impressions (the first run: the late part)
    ope = result["ope"]
    assert {r["run"] for r in ope} == {"2026-11-01", "2026-11-02"}
    for r in ope:
        ev = json.loads((home / "lake" / "runs" / f"ds={r['run']}" / "evaluation.json").read_text())
        assert r["impressions"] == ev["n_impressions"] and r["heldout_ds"] == ev["heldout_ds"]
        assert r["heldout_part"] == ("late" if r["run"] == "2026-11-01" else "all")
        assert 0 < r["true"] < 1
    assert "intervals hold the true value" in report
    assert (reports / "take_rate.png").stat().st_size > 0
    # which artwork each taste got on the last day, beside the oracle on the same impressions
    shares = result["shares"]
    assert set(shares) <= {"good_will_hunting", "pulp_fiction", "the_lost_kite"} and shares, shares
    for title, groups in shares.items():
        assert groups, title
        for grp, g in groups.items():
            assert g["impressions"] > 0
            assert sum(g["served"].values()) == pytest.approx(1.0, abs=0.01)
            assert sum(g["oracle"].values()) == pytest.approx(1.0, abs=0.01)
            assert 0 < g["served_value"] <= g["oracle_value"] + 1e-12, (title, grp, g)
    assert "Which artwork each taste got" in report
    # the DAG ran through the Airflow scheduler for both served days' previous days, each run
    # showing the day it processed, its task logs where the Airflow UI reads them
    runs = json.loads((reports / "dag-runs.json").read_text())
    assert [r["ds"] for r in runs] == ["2026-11-01", "2026-11-02"]
    for r in runs:
        assert r["state"] == "success" and r["logical_date"].startswith(r["ds"]), r
        assert set(r["tasks"]) == {"ingest", "check_data_quality", "rewards", "features", "priors", "training_window",
                                   "train", "promote"}, r
        assert all(t["state"] == "success" for t in r["tasks"].values()), r
        assert 0 < r["seconds"] < 1200, r  # the run's own duration, not the time since its logical date
        train_logs = list((home / "airflow" / "logs").rglob(f"run_id={r['run_id']}/task_id=train/attempt=*.log"))
        assert train_logs and "trained on" in train_logs[0].read_text(), r
    # the DAG ran for both served days' previous days and a champion exists
    assert (lake / "runs" / "ds=2026-11-01" / "bundle" / "manifest.json").exists()
    assert (lake / "runs" / "ds=2026-11-02" / "bundle" / "manifest.json").exists()
