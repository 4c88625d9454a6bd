"""Shared fixtures. Suites live in folders and are marked by folder, so each runs alone:

    pytest -m "not spark and not airflow and not e2e"   # fast unit suites
    pytest tests/jobs        (marker spark)      pytest tests/serving  (marker serving)
    pytest tests/airflow     (marker airflow)    pytest tests/e2e      (marker e2e)
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

FOLDER_MARKS = {
    "jobs": ("spark",),
    "models": (),
    "serving": ("serving",),
    "airflow": ("airflow", "integration"),
    "integration": ("integration",),
    "e2e": ("e2e", "slow"),
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = Path(str(item.fspath)).parts
        if "tests" not in parts:
            continue
        folder = parts[parts.index("tests") + 1] if parts.index("tests") + 1 < len(parts) else ""
        for mark in FOLDER_MARKS.get(folder, ()):
            item.add_marker(getattr(pytest.mark, mark))


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Every test gets its own KEYART_HOME, so nothing writes into the work tree."""
    home = tmp_path_factory.mktemp("keyart-home")
    monkeypatch.setenv("KEYART_HOME", str(home))
    monkeypatch.delenv("KEYART_CONFIG", raising=False)
    monkeypatch.delenv("KEYART_SPARK_REMOTE", raising=False)
    from keyart import config

    config.settings.cache_clear()
    yield home
    config.settings.cache_clear()


@pytest.fixture(scope="session")
def spark():
    """One local SparkSession for the whole run (JVM start-up costs seconds)."""
    from keyart.jobs.common import get_spark

    os.environ.setdefault("PYSPARK_PYTHON", os.sys.executable)
    session = get_spark("keyart-tests", master="local[1]", shuffle_partitions=1, ui=False)
    yield session
    session.stop()
