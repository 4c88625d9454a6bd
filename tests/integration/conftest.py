"""Integration fixtures: a real ``mlflow server`` backed by the local PostgreSQL.

PostgreSQL must run on 127.0.0.1:5432 (user ``postgres``, trust auth); ``.ci/run`` starts
it. If it is not reachable the tests that need it *fail* with a message saying so: a
skipped registry test would hide a broken deployment path.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from postgres_helpers import fresh_database

SERVER_START_TIMEOUT_S = 90.0


@pytest.fixture
def postgres_db() -> Iterator[str]:
    """A fresh, empty database ``keyart_test_<random>``, dropped afterwards; yields its URI."""
    with fresh_database("The MLflow registry integration test") as uri:
        yield uri


@pytest.fixture
def mlflow_server(postgres_db: str, tmp_path: Path) -> Iterator[str]:
    """``mlflow server`` on a random local port over ``postgres_db``; yields its http URI."""
    from mlflow_fixtures import start_mlflow_server, stop_server  # (LightGBM, ONNX: load when used)

    # the server creates ./mlruns where it runs: its own folder, not the checkout or the test's
    cwd = tmp_path / "mlflow-server-cwd"
    cwd.mkdir()
    server = start_mlflow_server(["--backend-store-uri", postgres_db,
                                  "--default-artifact-root", (tmp_path / "server-artifacts").as_uri()],
                                 tmp_path / "mlflow-server.log", cwd=cwd, timeout_s=SERVER_START_TIMEOUT_S)
    try:
        yield server.url
    finally:
        stop_server(server.proc)
