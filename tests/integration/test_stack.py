"""The production topology on this machine (``make up`` / ``make down``), end to end.

One stack for the module, on free ports, its own databases (``<name>_airflow``,
``<name>_mlflow`` on the machine's PostgreSQL) and its own state dir; torn down with
``down --purge`` whatever happens, and then no process carrying the stack's id may be left.

* every component comes up healthy, listening on 127.0.0.1 only, with a login on Airflow
  and an API key on serving;
* two replicas answer through HAProxy;
* the replicas share their online state in Redis: a reward posted to one and its duplicate
  posted to the other is refused (409), and the shared counts and evidence equal, key by
  key, one process folding every replica's logs;
* kill -9 of one replica under a bounded load: the balancer keeps answering and every
  acknowledged decision is in the replicas' impression logs; ``up`` brings the replica back
  and returns only once every component is healthy in one pass;
* a day of ``keyart demo --stack --days 1``: the history ingested on the standalone master,
  yesterday's ``keyart_daily`` triggered through the Airflow API and run by the stack's
  scheduler (its run in the PostgreSQL metadata), the Spark jobs applications of the
  authenticated standalone master, the model steps against the MLflow server; the gate names
  a champion, both replicas pick it up, and today's traffic goes through the balancer;
* ``down`` stops everything it started.

    pytest -m stack          # ~10 min on an idle 2-core machine (PostgreSQL + haproxy needed)
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from keyart.demo import airflow_env
from keyart.demo import stack as stk

pytestmark = [pytest.mark.stack, pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(3600)]

TODAY = dt.datetime.now(dt.UTC).date()
DAY = (TODAY - dt.timedelta(days=1)).isoformat()  # the demo's day 0: the DAG runs for it, today is served
# The world: the fixture writes it before `up` (a replica is ready with a catalog) and the
# demo writes the same one again (same seed and sizes); small, since only the path matters.
WORLD = {"seed": "7", "titles": "30", "members": "500", "history-days": "6"}
VISITS = "150"
SPARK_JOBS = ("ingest", "rewards", "features", "priors")
CONTEXT = {"device": "tv", "country": "US", "local_hour": 20, "day_of_week": 4}


def driver(*args: str, timeout: float = 1500) -> subprocess.CompletedProcess:
    """The command `make up` / `make down` run."""
    return subprocess.run([sys.executable, "-m", "keyart.demo.stack", *args], text=True, capture_output=True,
                          timeout=timeout, env=_clean_environ())


def _clean_environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("KEYART_", "AIRFLOW"))}


def keyart(env: dict[str, str], *args: str, timeout: float = 1200) -> str:
    proc = subprocess.run([sys.executable, "-m", "keyart.cli", *args], env=env, text=True, capture_output=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"keyart {' '.join(args)} failed:\n{proc.stderr[-4000:]}"
    return proc.stdout


class Stack:
    def __init__(self, state: Path):
        self.state = state
        self.env = stk.read_env(state)
        self.port = {k[len("STACK_PORT_"):]: int(v) for k, v in self.env.items() if k.startswith("STACK_PORT_")}
        self.balancer = f"http://127.0.0.1:{self.port['BALANCER']}"
        self.key = {"X-API-Key": self.env["KEYART_SERVE_API_KEYS"]}

    @property
    def process_env(self) -> dict[str, str]:
        return stk.process_environ(self.env)

    def pid(self, component: str) -> int:
        record = stk.running(self.state, component)
        assert record is not None, f"{component} is not running"
        return record["pid"]

    def airflow(self) -> httpx.Client:
        url = f"http://127.0.0.1:{self.port['AIRFLOW']}"
        password = airflow_env.admin_password(self.env["AIRFLOW_HOME"])
        resp = httpx.post(f"{url}/auth/token", json={"username": "admin", "password": password}, timeout=60)
        resp.raise_for_status()
        return httpx.Client(base_url=f"{url}/api/v2", timeout=60,
                            headers={"Authorization": f"Bearer {resp.json()['access_token']}"})

    def page(self, member: str, titles: list[str]) -> dict:
        return {"member_id": member, "context": CONTEXT,
                "titles": [{"title_id": t, "page_row": 0, "position": i} for i, t in enumerate(titles)]}


def _catalog(lake: Path) -> tuple[list[str], list[str]]:
    import pyarrow.parquet as pq

    titles = sorted(set(pq.read_table(lake / "catalog" / "artworks").column("title_id").to_pylist()))
    members = pq.read_table(lake / "members").column("member_id").to_pylist()
    return titles, members


def _logged_event_ids(lake: Path) -> set[str]:
    """Every event id in the replicas' impression logs (a torn last line of a killed process
    was never acknowledged and is skipped)."""
    ids = set()
    for path in (lake / "raw" / "impressions").glob("ds=*/impressions-*.jsonl"):
        for line in path.read_bytes().splitlines():
            try:
                ids.add(json.loads(line)["event_id"])
            except (ValueError, KeyError):
                continue
    return ids


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    state = tmp_path_factory.mktemp("stack") / "state"
    name = f"kst{secrets.token_hex(3)}"
    lake = state / "lake"
    world_env = {**_clean_environ(), "KEYART_HOME": str(state), "KEYART_LAKE_ROOT": str(lake)}
    # A small world whose first traffic day is yesterday: the day the DAG will run.
    keyart(world_env, "world", "--out", str(lake), *[a for k, v in WORLD.items() for a in (f"--{k}", v)],
           "--start", DAY)
    stack_id = None
    try:
        up = driver("up", "--state-dir", str(state), "--name", name, "--free-ports", "--timeout", "900")
        if stk.env_path(state).exists():
            stack_id = stk.read_env(state)["KEYART_STACK_ID"]
        assert up.returncode == 0, f"stack up failed:\n{up.stdout[-3000:]}\n{up.stderr[-6000:]}"
        yield Stack(state)
    finally:
        if stack_id is not None:
            down = driver("down", "--state-dir", str(state), "--purge", timeout=600)
            left = stk.stack_processes(stack_id)
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            assert down.returncode == 0, down.stderr[-3000:]
            assert not left, f"processes left after down --purge: {left}"


def _listening_sockets(pids: list[int]) -> list[tuple[int, str]]:
    """(pid, local address) of every listening TCP socket the pids hold."""
    inodes: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes[target[8:-1]] = pid
        except OSError:
            continue
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # LISTEN
                found.append((inodes[cols[9]], cols[1]))
    return found


LOOPBACK = ("0100007F:", "00000000000000000000000001000000:", "0000000000000000FFFF00000100007F:")


def test_every_component_is_up_on_loopback_with_its_login(stack):
    report = stk.status(stack.state)
    assert report["up"], json.dumps(report, indent=2)
    assert set(report["balancer_servers"].values()) == {"UP"} and len(report["balancer_servers"]) == 2
    assert stk.env_path(stack.state).stat().st_mode & 0o777 == 0o600

    sockets = _listening_sockets(stk.stack_processes(stack.env["KEYART_STACK_ID"]))
    assert sockets
    wide = [(pid, addr) for pid, addr in sockets if not addr.startswith(LOOPBACK)]
    assert not wide, f"listening beyond loopback: {wide}"

    api = f"http://127.0.0.1:{stack.port['AIRFLOW']}"
    assert httpx.get(f"{api}/api/v2/dags", timeout=30).status_code == 401  # no all-admins
    assert httpx.post(f"{api}/auth/token", json={"username": "admin", "password": "wrong"}, timeout=30).status_code in (401, 403)
    with stack.airflow() as client:
        assert client.get("/dags").status_code == 200
        config = client.get("/monitor/health").json()
    assert config["scheduler"]["status"] == "healthy"


def test_two_replicas_answer_through_the_balancer(stack):
    titles, members = _catalog(Path(stack.env["KEYART_LAKE_ROOT"]))
    seen = []
    with httpx.Client(base_url=stack.balancer, headers=stack.key, timeout=30) as client:
        for i in range(12):
            resp = client.post("/v1/artwork", json=stack.page(members[i], titles[:8]))
            assert resp.status_code == 200, resp.text
            assert len(resp.json()["decisions"]) == 8
            seen.append(resp.headers["x-keyart-replica"])
        assert client.post("/v1/artwork", json=stack.page(members[0], titles[:2]),
                           headers={"X-API-Key": "not-the-key-not-the-key"}).status_code == 401
    assert set(seen) == {"serve-1", "serve-2"}, seen


def test_a_duplicate_reward_on_the_other_replica_is_refused(stack):
    if not stk.online_state_settings(stack.env):
        pytest.skip("serving keeps its online state per process (no shared-state settings in keyart.config yet)")
    titles, members = _catalog(Path(stack.env["KEYART_LAKE_ROOT"]))
    a, b = (f"http://127.0.0.1:{stack.port[f'SERVE_{r}']}" for r in stk.REPLICAS)
    decision = httpx.post(f"{a}/v1/artwork", json=stack.page(members[1], titles[:3]), headers=stack.key,
                          timeout=30).json()["decisions"][0]
    reward = {"event_id": decision["event_id"], "reward": 1, "minutes": 30.0}
    assert httpx.post(f"{a}/v1/reward", json=reward, headers=stack.key, timeout=30).status_code == 200
    assert httpx.post(f"{b}/v1/reward", json=reward, headers=stack.key, timeout=30).status_code == 409


def _online_prefix(stack) -> str:
    return stk.ONLINE_STATE_SETTINGS["serve_redis_prefix"].format(name=stack.env["KEYART_STACK_NAME"])


def test_the_replicas_count_what_one_process_counts(stack):
    """Pages through the balancer, rewards posted to either replica and each one's duplicate
    to the other: the shared online state, read back from Redis as a replica reads it, holds
    key by key the counts and evidence of one process folding every replica's logs, and
    every reward is in the reward log once. (Before the kill test: an impression logged by
    a replica killed before it reached Redis was never acknowledged, and is in the log only.)"""
    if not stk.online_state_settings(stack.env):
        pytest.skip("serving keeps its online state per process (no shared-state settings in keyart.config yet)")
    from keyart.config import Settings
    from keyart.serving.rewards import LocalState, LogTail, RedisState

    lake = Path(stack.env["KEYART_LAKE_ROOT"])
    titles, members = _catalog(lake)
    replicas = [f"http://127.0.0.1:{stack.port[f'SERVE_{r}']}" for r in stk.REPLICAS]
    decisions, answered_by, rewarded = [], set(), 0
    with httpx.Client(headers=stack.key, timeout=30) as client:
        for i in range(30):
            resp = client.post(f"{stack.balancer}/v1/artwork", json=stack.page(members[20 + i], titles[i % 20: i % 20 + 5]))
            assert resp.status_code == 200, resp.text
            answered_by.add(resp.headers["x-keyart-replica"])
            decisions += resp.json()["decisions"]
        for j, d in enumerate(decisions[::3]):
            first, second = replicas[j % 2], replicas[1 - j % 2]
            reward = {"event_id": d["event_id"], "reward": int(j % 4 != 3), "minutes": 20.0}
            assert client.post(f"{first}/v1/reward", json=reward).status_code == 200
            assert client.post(f"{second}/v1/reward", json=reward).status_code == 409
            rewarded += reward["reward"]
    assert answered_by == {"serve-1", "serve-2"}

    window_s = Settings.model_fields["attribution_window_hours"].default * 3600
    shared = RedisState.from_url(stack.env["STACK_REDIS_URL"], _online_prefix(stack), window_s, window_s + 3600)
    shared.sync()
    one = LocalState(window_s, window_s + 3600, logs=[(LogTail(lake / "raw" / "impressions", "impressions"), "impressions"),
                                                       (LogTail(lake / "raw" / "rewards", "rewards"), "rewards")])
    one.sync()
    one._advance(shared.clock_ms, set())  # the replicas' shared clock (they move it to the wall clock)
    keys = sorted(one.keys())
    assert keys and sorted(shared.keys()) == keys
    for k in keys:
        assert shared.counts(k) == one.counts(k), k
        assert shared.evidence(k) == pytest.approx(one.evidence(k), rel=1e-9, abs=1e-9), k
    assert sum(shared.counts(k)[1] for k in keys if k[2] == "all") >= rewarded > 0
    ids = [json.loads(line)["event_id"] for path in (lake / "raw" / "rewards").glob("ds=*/rewards-*.jsonl")
           for line in path.read_bytes().splitlines() if line.strip()]
    assert len(ids) == len(set(ids)) >= len(decisions[::3])


def test_kill_9_of_a_replica_under_load_loses_no_acknowledged_decision(stack):
    """A request the dead replica had already begun to answer cannot be retried (its headers
    went out): it fails, unacknowledged, and there is at most one such request per client.
    Everything else, including what was sent to the dead replica before HAProxy marked it
    down, is answered by the other replica; every acknowledged decision is in a log."""
    lake = Path(stack.env["KEYART_LAKE_ROOT"])
    titles, members = _catalog(lake)
    clients = 3
    acked: list[str] = []
    errors: list[tuple[float, str]] = []
    after_kill: list[str] = []
    killed_at: list[float] = []
    stop = threading.Event()
    lock = threading.Lock()
    deadline = time.monotonic() + 120  # bounded in time and in count

    def load(worker: int) -> None:
        with httpx.Client(base_url=stack.balancer, headers=stack.key, timeout=30) as client:
            for i in range(600):
                if stop.is_set() or time.monotonic() > deadline:
                    return
                try:
                    resp = client.post("/v1/artwork", json=stack.page(members[(worker * 600 + i) % len(members)],
                                                                      titles[i % 20: i % 20 + 6]))
                except httpx.HTTPError as exc:
                    with lock:
                        errors.append((time.monotonic(), repr(exc)))
                    continue
                with lock:
                    if resp.status_code != 200:
                        errors.append((time.monotonic(), f"{resp.status_code} {resp.text[:200]}"))
                        continue
                    acked.extend(d["event_id"] for d in resp.json()["decisions"])
                    if killed_at:
                        after_kill.append(resp.headers.get("x-keyart-replica", ""))

    victim = stack.pid("serve-1")
    threads = [threading.Thread(target=load, args=(w,)) for w in range(clients)]
    for t in threads:
        t.start()
    try:
        while len(acked) < 300 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(victim, signal.SIGKILL)
        killed_at.append(time.monotonic())
        # keep the load on until the survivor has answered plenty after the kill
        until = time.monotonic() + 30
        while time.monotonic() < min(until, deadline) and len(after_kill) < 150:
            time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
        # bring the replica back whatever happened, so the tests after this one have two
        again = driver("up", "--state-dir", str(stack.state), "--timeout", "600")

    kill = killed_at[0]
    print(f"kill -9 under load: {len(acked)} decisions acknowledged, {len(after_kill)} pages answered after "
          f"the kill, {len(errors)} failed: {[(round(t - kill, 2), e) for t, e in errors]}")
    assert len(after_kill) >= 50, f"the balancer answered only {len(after_kill)} pages after the kill; errors {errors[:5]}"
    assert set(after_kill[-20:]) == {"serve-2"}, after_kill[-20:]
    late = [(round(t - kill, 2), e) for t, e in errors if t > kill + 3]
    assert not late, f"requests failed through the balancer after the failover: {late[:5]}"
    assert len(errors) <= clients, f"more failures than requests in flight at the kill: {errors}"
    missing = set(acked) - _logged_event_ids(lake)
    assert not missing, f"{len(missing)} of {len(acked)} acknowledged decisions are in no impression log"

    # `up` again started what was not running: the replica is back, the rest was kept
    assert again.returncode == 0, again.stderr[-4000:]
    assert "started  serve-1" in again.stdout and "started  mlflow" not in again.stdout, again.stdout
    report = stk.status(stack.state)
    assert report["up"], f"{json.dumps(report, indent=2)}\n{again.stdout}"


def test_a_demo_day_runs_through_the_scheduler_on_the_spark_master_and_reaches_the_replicas(stack, tmp_path):
    """``keyart demo --stack --days 1``: what an operator runs after ``make up``."""
    reports = tmp_path / "reports"
    t0 = time.monotonic()
    demo = subprocess.run([sys.executable, "-m", "keyart.cli", "demo", "--stack", "--state-dir", str(stack.state),
                           "--days", "1", "--visits", VISITS, *[a for k, v in WORLD.items() for a in (f"--{k}", v)],
                           "--reports", str(reports)],
                          env=_clean_environ(), text=True, capture_output=True, timeout=3000)
    print(f"keyart demo --stack --days 1: {time.monotonic() - t0:.0f} s")
    if demo.returncode != 0:
        scheduler = (stack.state / "logs" / "airflow-scheduler.log").read_text()[-4000:]
        pytest.fail(f"keyart demo --stack failed:\n{demo.stdout[-3000:]}\n{demo.stderr[-6000:]}\n"
                    f"scheduler log:\n{scheduler}")
    assert "Demo finished on the stack" in demo.stdout, demo.stdout[-2000:]
    # The replicas stamp the wall clock, so the demo serves the UTC day it runs on: TODAY, or the
    # next day when the module's import and the demo fall on either side of midnight.
    result = json.loads((reports / "demo.json").read_text())
    day0, served_day = [dt.date.fromisoformat(d["ds"]) for d in result["days"]]
    assert served_day in (TODAY, TODAY + dt.timedelta(days=1)) and day0 == served_day - dt.timedelta(days=1), result["days"]
    day = day0.isoformat()

    # yesterday's run, triggered through the API and run by the stack's scheduler
    (run,) = json.loads((reports / "dag-runs.json").read_text())
    assert run["ds"] == day and run["state"] == "success" and run["logical_date"].startswith(day), run
    assert run["run_type"] == "manual", run
    assert set(run["tasks"]) == {"ingest", "check_data_quality", "rewards", "features", "priors", "training_window",
                                 "train", "promote"}, run
    assert all(t["state"] == "success" for t in run["tasks"].values()), run
    with stack.airflow() as client:
        listed = client.get(f"/dags/keyart_daily/dagRuns/{run['run_id']}").json()
        assert listed["state"] == "success", listed
        assert client.get("/dags/keyart_daily").json()["is_paused"] is True  # as the stack created it
    # ... recorded in the stack's PostgreSQL metadata database
    import psycopg2

    e = stack.env
    with psycopg2.connect(host="127.0.0.1", port=int(e["STACK_PORT_PG"]), dbname=e["STACK_AIRFLOW_DB"],
                          user=e["STACK_AIRFLOW_DB_USER"], password=e["STACK_AIRFLOW_DB_PASSWORD"]) as conn:
        with conn.cursor() as cur:
            cur.execute("SELECT state, run_type FROM dag_run WHERE dag_id = 'keyart_daily' AND run_id = %s",
                        (run["run_id"],))
            assert cur.fetchall() == [("success", "manual")]
    conn.close()

    # the run's Spark tasks (ingest, rewards, features, priors) were applications of the
    # standalone master, which authenticates them (spark.authenticate with the stack's secret)
    assert run["spark_master"] == e["KEYART_SPARK_MASTER"]
    apps = [a["name"] for a in run["spark_apps"] if a["state"] == "FINISHED"]
    for job in SPARK_JOBS:
        assert any(name.startswith(f"keyart-{job}") for name in apps), (job, run["spark_apps"])
    master = stk.spark_master_state(e)
    assert len([w for w in master["workers"] if w["state"] == "ALIVE"]) == 2
    conf = Path(e["SPARK_CONF_DIR"]) / "spark-defaults.conf"
    assert conf.stat().st_mode & 0o777 == 0o600
    assert f"spark.authenticate.secret    {e['STACK_SPARK_AUTH_SECRET']}" in conf.read_text()
    for daemon in ("spark-master", *[f"spark-worker-{w}" for w in stk.WORKERS]):
        assert "authentication enabled" in (stack.state / "logs" / f"{daemon}.log").read_text(), daemon

    # the gate named a champion on the MLflow server, and both replicas serve it
    mlflow = f"http://127.0.0.1:{stack.port['MLFLOW']}"
    alias = httpx.get(f"{mlflow}/api/2.0/mlflow/registered-models/alias",
                      params={"name": "keyart-artwork", "alias": "champion"}, timeout=30)
    assert alias.status_code == 200, alias.text
    registered = alias.json()["model_version"]
    tags = {t["key"]: t["value"] for t in registered.get("tags", [])}
    if "keyart.bundle_version" not in tags:
        got = httpx.get(f"{mlflow}/api/2.0/mlflow/model-versions/get",
                        params={"name": "keyart-artwork", "version": registered["version"]}, timeout=30)
        tags = {t["key"]: t["value"] for t in got.json()["model_version"].get("tags", [])}
    version = tags["keyart.bundle_version"]  # what a decision's model_version names
    assert version.startswith(day), (version, day)
    titles, members = _catalog(Path(e["KEYART_LAKE_ROOT"]))
    served: dict[str, str] = {}
    deadline = time.monotonic() + 60  # the demo waited for both already
    with httpx.Client(base_url=stack.balancer, headers=stack.key, timeout=30) as client:
        while time.monotonic() < deadline:
            resp = client.post("/v1/artwork", json=stack.page(members[2], titles[:4]))
            assert resp.status_code == 200, resp.text
            served[resp.headers["x-keyart-replica"]] = resp.json()["model_version"]
            if len(served) == 2 and set(served.values()) == {version}:
                break
            time.sleep(0.5)
    assert served == {"serve-1": version, "serve-2": version}, served

    # the demo's report: day 0 random, today served by that champion through the balancer
    assert result["topology"] == "stack"
    assert result["days"][0]["model_version"] == "random"
    assert result["days"][1]["model_version"] == version
    assert result["days"][1]["impressions"] > 0
    served_today = _logged_event_ids(Path(e["KEYART_LAKE_ROOT"]))  # the replicas' own logs
    assert len(served_today) >= result["days"][1]["impressions"]
    report = (reports / "demo.md").read_text()
    assert "Ran on the stack" in report and stack.balancer in report


def test_down_stops_everything_it_started(stack):
    pids = [stack.pid(c.name) for c in stk.components(stack.env)]
    proc = driver("down", "--state-dir", str(stack.state), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not stk.stack_processes(stack.env["KEYART_STACK_ID"])
    alive = [pid for pid in pids if Path(f"/proc/{pid}").exists()
             and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
    assert not alive, alive
    assert not list((stack.state / "run").glob("*.json"))
    for port in stack.port.values():
        if port != stack.port["PG"]:
            assert not stk.port_open(port), f"port {port} still open"
    status = driver("status", "--state-dir", str(stack.state))
    assert status.returncode == 3 and "DOWN" in status.stdout, status.stdout
