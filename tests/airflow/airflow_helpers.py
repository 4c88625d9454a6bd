"""Helpers shared by the Airflow tests (a plain module: conftest names can collide)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DAG_FILE = REPO / "dags" / "keyart_daily.py"


def run_python(code: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (clean sys.modules), failing loudly on error."""
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, text=True, capture_output=True, timeout=timeout
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    return proc
