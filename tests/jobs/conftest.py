from __future__ import annotations

import shutil

import pytest

from keyart.config import Settings
from keyart.lake import Lake


@pytest.fixture
def lake(tmp_path) -> Lake:
    return Lake(tmp_path / "lake")


@pytest.fixture
def settings():
    return Settings()


@pytest.fixture(scope="session")
def chain_reference(spark, tmp_path_factory) -> dict[str, Lake]:
    """The two-day job chain's inputs and, run once in local mode, its outputs: the reference
    every other way of running the chain (standalone master, Spark Connect) must equal.

    ``inputs`` is never written to: copy it (``jobs_fixtures.copy_inputs``) before running on it."""
    from jobs_fixtures import build_lake, run_local

    root = tmp_path_factory.mktemp("chain-reference")
    inputs, local = Lake(root / "inputs"), Lake(root / "local")
    with pytest.MonkeyPatch.context() as mp:  # the job defaults, whatever the shell says
        mp.delenv("KEYART_CONFIG", raising=False)
        mp.delenv("KEYART_SPARK_REMOTE", raising=False)
        mp.setenv("KEYART_HOME", str(root / "home"))
        settings = Settings()
    build_lake(spark, inputs)
    shutil.copytree(inputs.root, local.root)
    run_local(spark, local, settings)
    return {"inputs": inputs, "local": local}

