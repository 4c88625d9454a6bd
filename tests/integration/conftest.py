"""Integration fixtures: a real ``mlflow server`` backed by the local PostgreSQL.

PostgreSQL must run on 127.0.0.1:5432 (user ``postgres``, trust auth); ``.ci/run`` starts
it. If it is not reachable the tests that need it *fail* with a message saying so: a
skipped registry test would hide a broken deployment path.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyart.net import free_port

PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}
SERVER_START_TIMEOUT_S = 90.0


def _pg_admin():
    import psycopg2

    try:
        conn = psycopg2.connect(dbname="postgres", connect_timeout=5, **PG)
    except psycopg2.OperationalError as exc:
        pytest.fail(
            f"PostgreSQL is not reachable at {PG['host']}:{PG['port']} as user {PG['user']} ({exc}). "
            "The MLflow registry integration test needs it: start it (`.ci/run` does, or "
            "`pg_ctlcluster <version> main start`).",
            pytrace=False,
        )
    conn.autocommit = True
    return conn


@pytest.fixture
def postgres_db() -> Iterator[str]:
    """A fresh, empty database ``keyart_test_<random>``, dropped afterwards; yields its URI."""
    name = f"keyart_test_{secrets.token_hex(4)}"
    conn = _pg_admin()
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://{PG['user']}@{PG['host']}:{PG['port']}/{name}"
    finally:
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()


def _wait_healthy(url: str, proc: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}",
                        pytrace=False)
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"mlflow server not healthy after {SERVER_START_TIMEOUT_S:.0f}s:\n"
                f"{log_path.read_text()[-4000:]}", pytrace=False)


@pytest.fixture
def mlflow_server(postgres_db: str, tmp_path: Path) -> Iterator[str]:
    """``mlflow server`` on a random local port over ``postgres_db``; yields its http URI."""
    port = free_port()
    log_path = tmp_path / "mlflow-server.log"
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", postgres_db,
        "--default-artifact-root", (tmp_path / "server-artifacts").as_uri(),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--allowed-hosts", f"127.0.0.1:{port},localhost:{port}",
    ]
    # the server creates ./mlruns where it runs: its own folder, not the checkout or the test's
    cwd = tmp_path / "mlflow-server-cwd"
    cwd.mkdir()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy(), cwd=cwd,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, log_path)
        yield url
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server and its uvicorn workers (the session it leads, started above)."""
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue
