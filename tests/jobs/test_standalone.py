"""The job chain on a Spark standalone master (started here from the pyspark install) = local mode."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyspark
import pytest
from jobs_fixtures import args, artwork, frame, impression, jsonl, member, play, title
from pyspark.testing import assertDataFrameEqual

from keyart.jobs import features, ingest, priors, rewards
from keyart.lake import mark_plays_delivered
from keyart.net import free_port

pytestmark = pytest.mark.slow
D1, D2 = "2026-03-01", "2026-03-02"
REPO = Path(__file__).resolve().parents[2]


def build_lake(spark, lake) -> None:
    frame(spark, "titles", [title("t1", ["drama"], ["a"]), title("t2", ["comedy"])]).write.parquet(str(lake.titles))
    frame(spark, "artworks", [artwork("t1-a0", "t1", ["cast:a", "tone:drama"], True), artwork("t1-a1", "t1", ["tone:comedy"]),
                              artwork("t2-a0", "t2", ["closeup"], True)]).write.parquet(str(lake.artworks))
    frame(spark, "members", [member(f"m{i}", "kids" if i % 3 == 0 else "adult") for i in range(6)]).write.parquet(str(lake.members))
    for ds in (D1, D2):
        imps, plays = [], []
        for i in range(30):
            m, t = f"m{i % 6}", ("t1" if i % 2 else "t2")
            cands = ["t1-a0", "t1-a1"] if t == "t1" else ["t2-a0"]
            when = f"{ds} {(i * 47) % 24:02d}:{i % 60:02d}"
            imps.append(impression(f"{ds}-e{i}", when, member=m, title=t, artwork=cands[i % len(cands)], candidates=cands,
                                   propensity=1.0 / len(cands)))
            if i % 3:
                plays.append(play(m, t, f"{ds} {(i * 47) % 24:02d}:{min(59, i % 60 + 20):02d}", float(i)))
        for log, rows in (("impressions", imps), ("plays", plays)):
            folder = lake.raw(log, ds)
            folder.mkdir(parents=True)
            (folder / "part-0.jsonl").write_text(jsonl(rows) + "{not json\n")
        mark_plays_delivered(lake, ds)  # the play log of the day is complete: its windows may close


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


def run_local(spark, lake, settings) -> None:
    ingest.run(spark, lake, args(D1, lake.root, through=D2), settings)
    for job in (rewards, features, priors):
        job.run(spark, lake, args(D2, lake.root), settings)


def test_chain_on_standalone_master_matches_local_mode(spark, tmp_path, settings, standalone):
    from keyart.lake import Lake

    url, env, ui = standalone
    local, remote = Lake(tmp_path / "local"), Lake(tmp_path / "remote")
    build_lake(spark, local)
    shutil.copytree(local.root, remote.root)
    run_local(spark, local, settings)

    submit = str(Path(pyspark.__file__).parent / "bin" / "spark-submit")
    common = ["--lake", str(remote.root), "--shuffle-partitions", "2"]
    subprocess.run([submit, "--master", url, str(REPO / "jobs" / "ingest.py"), "--ds", D1, "--through", D2, *common],
                   env=env, check=True, cwd=tmp_path, capture_output=True)
    subprocess.run([sys.executable, "-m", "keyart.cli", "job", "rewards", "features", "priors", "--ds", D2, "--master", url, *common],
                   env=env, check=True, cwd=tmp_path, capture_output=True)

    state = json.load(urllib.request.urlopen(f"http://127.0.0.1:{ui}/json/", timeout=5))
    assert len(state["completedapps"]) == 2, "both applications ran on the standalone master"

    assert_same_outputs(spark, local, remote)


def assert_same_outputs(spark, local, remote) -> None:
    """Every output of the chain in ``remote`` equals the one in ``local``, row for row."""

    def read(lake, path):
        df = spark.read.parquet(str(path(lake)))
        return df.drop("source_file")   # holds the lake root, which differs

    for path in (lambda lk: lk.clean("impressions", D2), lambda lk: lk.quarantine("plays", D1), lambda lk: lk.rewards(D2),
                 lambda lk: lk.member_features(D2), lambda lk: lk.training(D2), lambda lk: lk.priors(D2)):
        expected = read(local, path)
        assert expected.count() > 0
        assertDataFrameEqual(read(remote, path), expected)
    assert json.loads(remote.metrics("ingest", D2).read_text()) == json.loads(local.metrics("ingest", D2).read_text())
