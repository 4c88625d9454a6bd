"""The job chain on a Spark standalone master (started here from the pyspark install) = local mode
(the local-mode run is the session's ``chain_reference``, shared with test_connect.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyspark
import pytest
from jobs_fixtures import CHAIN_D1, CHAIN_D2, assert_same_outputs, copy_inputs

from keyart.net import free_port

pytestmark = pytest.mark.slow
D1, D2 = CHAIN_D1, CHAIN_D2
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def standalone(tmp_path):
    """A master and one worker from pyspark's own bin/spark-class; yields the master URL."""
    home = Path(pyspark.__file__).parent
    env = {**os.environ, "SPARK_HOME": str(home), "SPARK_WORKER_DIR": str(tmp_path / "work"), "SPARK_LOCAL_IP": "127.0.0.1",
           "PYSPARK_PYTHON": sys.executable, "SPARK_NO_DAEMONIZE": "1"}
    port, ui = free_port(), free_port()
    url = f"spark://127.0.0.1:{port}"
    spark_class = str(home / "bin" / "spark-class")
    procs = [subprocess.Popen([spark_class, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", str(port),
                               "--webui-port", str(ui)], env=env, stdout=open(tmp_path / "master.log", "w"), stderr=subprocess.STDOUT)]
    try:
        procs.append(subprocess.Popen([spark_class, "org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1", "--cores", "2",
                                       "--memory", "2g", "--webui-port", str(free_port()), url],
                                      env=env, stdout=open(tmp_path / "worker.log", "w"), stderr=subprocess.STDOUT))
        deadline = time.time() + 120
        while True:
            try:
                state = json.load(urllib.request.urlopen(f"http://127.0.0.1:{ui}/json/", timeout=2))
                if state.get("aliveworkers", 0) >= 1:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError("standalone worker did not register: " + (tmp_path / "worker.log").read_text()[-2000:])
            time.sleep(1)
        yield url, env, ui
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in reversed(procs):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def test_chain_on_standalone_master_matches_local_mode(spark, tmp_path, chain_reference, standalone):
    url, env, ui = standalone
    remote = copy_inputs(chain_reference, tmp_path / "remote")

    submit = str(Path(pyspark.__file__).parent / "bin" / "spark-submit")
    common = ["--lake", str(remote.root), "--shuffle-partitions", "2"]
    subprocess.run([submit, "--master", url, str(REPO / "jobs" / "ingest.py"), "--ds", D1, "--through", D2, *common],
                   env=env, check=True, cwd=tmp_path, capture_output=True)
    subprocess.run([sys.executable, "-m", "keyart.cli", "job", "rewards", "features", "priors", "--ds", D2, "--master", url, *common],
                   env=env, check=True, cwd=tmp_path, capture_output=True)

    state = json.load(urllib.request.urlopen(f"http://127.0.0.1:{ui}/json/", timeout=5))
    assert len(state["completedapps"]) == 2, "both applications ran on the standalone master"

    assert_same_outputs(spark, chain_reference["local"], remote)
