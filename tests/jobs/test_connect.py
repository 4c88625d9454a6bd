"""The job chain as Spark Connect clients of one long-lived server = local mode (the session's
``chain_reference``, shared with test_standalone.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from jobs_fixtures import CHAIN_D1 as D1
from jobs_fixtures import CHAIN_D2 as D2
from jobs_fixtures import assert_same_outputs, copy_inputs

from keyart.config import Settings
from keyart.jobs import connect_server
from keyart.net import free_port

pytestmark = pytest.mark.slow


def test_server_command_binds_loopback_with_the_jobs_driver_settings():
    settings = Settings(spark_master="local[2]", spark_driver_memory="3g")
    argv = connect_server.server_argv(settings, port=15999)
    assert argv[argv.index("--class") + 1] == connect_server.SERVER_CLASS
    assert argv[argv.index("--master") + 1] == "local[2]"
    assert argv[argv.index("--driver-memory") + 1] == "3g"
    confs = {argv[i + 1].split("=", 1)[0]: argv[i + 1].split("=", 1)[1] for i, a in enumerate(argv) if a == "--conf"}
    assert confs["spark.connect.grpc.binding.address"] == "127.0.0.1"
    assert confs["spark.connect.grpc.binding.port"] == "15999"
    assert confs["spark.sql.session.timeZone"] == "UTC"
    assert confs["spark.pyspark.python"] == sys.executable  # mapInPandas workers import this keyart
    assert argv[-1] == "spark-internal"


@pytest.mark.parametrize(("url", "address"), [
    ("sc://127.0.0.1:15010", ("127.0.0.1", 15010)),
    ("sc://spark-connect/;token=abc", ("spark-connect", 15002)),
    ("sc://host:443/;use_ssl=true", ("host", 443)),
    ("sc://[::1]:15003", ("::1", 15003)),
])
def test_remote_address_of_a_connect_url(url, address):
    assert connect_server.remote_address(url) == address


def test_a_job_pointed_at_no_server_fails_at_once_and_says_what_to_do(tmp_path):
    from keyart.jobs.common import get_spark

    url = f"sc://127.0.0.1:{free_port()}"
    with pytest.raises(ConnectionError, match="no Spark Connect server listens at .*keyart spark-connect"):
        get_spark("keyart-test", settings=Settings(spark_remote=url))


def test_a_dead_server_is_reported_not_waited_for(tmp_path):
    server = connect_server.ConnectServer(Settings(spark_driver_memory="not-a-size"), log_path=tmp_path / "server.log")
    with pytest.raises(RuntimeError, match="exited with"):
        server.start(timeout=120)
    assert not server.alive()


def test_chain_as_connect_clients_matches_local_mode(spark, tmp_path, chain_reference):
    remote = copy_inputs(chain_reference, tmp_path / "remote")

    server = connect_server.ConnectServer(Settings(spark_master="local[2]"), log_path=tmp_path / "server.log", cwd=tmp_path)
    with server:
        env = {**os.environ, "KEYART_SPARK_REMOTE": server.url}
        common = ["--lake", str(remote.root), "--shuffle-partitions", "2"]
        jobs = Path(connect_server.__file__).parent
        # as the DAG runs them: the job files, with no JVM of their own
        runs = [subprocess.run([sys.executable, str(jobs / "ingest.py"), "--ds", D1, "--through", D2, *common],
                               env=env, cwd=tmp_path, capture_output=True, text=True)]
        for job in ("rewards", "features", "priors"):
            runs.append(subprocess.run([sys.executable, str(jobs / f"{job}.py"), "--ds", D2, *common],
                                       env=env, cwd=tmp_path, capture_output=True, text=True))
        for proc in runs:
            assert proc.returncode == 0, proc.stderr[-3000:]
            assert "Spark Connect session keyart-" in proc.stderr and server.url in proc.stderr
            assert "Running Spark version" not in proc.stderr  # no SparkContext in the client
        assert server.alive()
    assert not server.alive()

    assert_same_outputs(spark, chain_reference["local"], remote)
