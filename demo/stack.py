"""The production topology on this machine, from real services: ``make up`` / ``make down``.

    keyart stack up     [--state-dir var/stack] [--name keyart] [--free-ports] [--no-world] [--clock wall|sim]
    keyart stack status [--json]
    keyart stack down   [--purge]

``up`` starts, each the way an operator starts it and every one bound to 127.0.0.1:

* PostgreSQL: the machine's server when one answers (databases and roles for Airflow and
  MLflow are created when missing), else a cluster of its own under the state dir;
* ``mlflow server`` on PostgreSQL, artifacts proxied by the server into the state dir;
* a Spark standalone master and two workers from the pyspark install (``spark-class``),
  RPC authentication on (``spark.authenticate`` with a generated secret shared by the
  master, the workers and every spark-submit, in ``spark-defaults.conf``, mode 600);
* Airflow ``api-server``, ``scheduler`` and ``dag-processor`` on PostgreSQL with the
  LocalExecutor, the simple auth manager with a generated password, the Execution API URL
  set, and ``KEYART_SPARK_MASTER=spark://…`` so the DAG's Spark tasks run on the master;
* two ``keyart serve`` replicas (one generated event-signing secret and API key, shared),
  following ``models:/keyart-artwork@champion`` on the MLflow server;
* HAProxy in front of the replicas, health-checking ``/readyz``.

Every setting of every component comes from one generated file, ``<state>/stack.env``
(mode 600; secrets and passwords are generated there, never kept in the repository). Each
started process has a pid file under ``<state>/run`` and a log under ``<state>/logs``;
``down`` stops exactly those (their process groups), then any process still carrying this
stack's id in its environment (a task or an executor that left the group). ``up`` is
idempotent: it starts only what is not running. ``down --purge`` also drops the databases
and roles and deletes the state dir.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
ENV_FILE = "stack.env"
PG_ADMIN_USER = "postgres"
REDIS_URL = "redis://127.0.0.1:6379/0"

# Default ports: none clashes with `make serve` (8080), `make mlflow-ui` (5000) or
# `make airflow-ui` (8090), so those can run beside the stack.
DEFAULT_PORTS: dict[str, int] = {
    "PG": 5432,
    "MLFLOW": 5001,
    "AIRFLOW": 8091,
    "SPARK_MASTER": 7077,
    "SPARK_MASTER_UI": 8081,
    "SPARK_WORKER_1_UI": 8082,
    "SPARK_WORKER_2_UI": 8083,
    "SERVE_1": 8181,
    "SERVE_2": 8182,
    "BALANCER": 8180,
    "BALANCER_STATS": 8404,
}
REPLICAS = ("1", "2")
WORKERS = ("1", "2")

# Settings of the shared online state of serving (priors and reward de-duplication in
# Redis). The replicas get each of them only when keyart.config.Settings has the field, so
# the stack works before and after serving learns to use Redis.
ONLINE_STATE_SETTINGS = {
    "serve_online_state": "redis",
    "serve_redis_url": "{redis_url}",
    "serve_redis_prefix": "keyart:{name}:",
}

# Inherited variables that would change what a component does are not passed on: the
# stack's own file is the one source of settings.
_DROP_PREFIXES = ("KEYART_", "AIRFLOW", "MLFLOW_", "SPARK_", "PYSPARK_")


class StackError(RuntimeError):
    """The stack cannot be brought up (a missing program, a component that did not start)."""


# ---------------------------------------------------------------------------------------
# The settings file
# ---------------------------------------------------------------------------------------

def default_state_dir() -> Path:
    from keyart.config import Settings

    return Settings().home / "stack"


def env_path(state: Path) -> Path:
    return state / ENV_FILE


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by the owner only (created 600, never wider)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def read_env(state: Path) -> dict[str, str]:
    """The stack's settings file as a dict (``KEY=value`` lines, shell-quoted values)."""
    env: dict[str, str] = {}
    for line in env_path(state).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition("=")
        parts = shlex.split(value) if value else [""]
        env[key] = parts[0] if parts else ""
    return env


def _ident(name: str) -> str:
    ident = re.sub(r"[^a-z0-9_]", "_", name.lower())
    if not ident or not ident[0].isalpha():
        raise StackError(f"stack name {name!r} must start with a letter (it names databases and roles)")
    return ident[:40]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _free_ports(count: int) -> list[int]:
    """``count`` distinct ports nothing listens on, below the kernel's ephemeral range (a
    port from that range, kept in stack.env, could be some client's by the next ``up``)."""
    import random

    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    candidates = list(range(max(10000, low - 12000), low))
    random.SystemRandom().shuffle(candidates)
    ports = [port for port in candidates[: count * 20] if _port_free(port)][:count]
    if len(ports) < count:
        raise StackError("could not find enough free ports")
    return ports


def generate_env(state: Path, name: str = "keyart", free_ports: bool = False,
                 pg_port: int | None = None) -> dict[str, str]:
    """Every setting of every component, with fresh secrets: the content of ``stack.env``."""
    from keyart.demo import airflow_env

    state = state.resolve()
    ident = _ident(name)
    ports = dict(DEFAULT_PORTS)
    if free_ports:
        chosen = _free_ports(len(ports) - 1)
        ports.update({key: port for key, port in zip([k for k in ports if k != "PG"], chosen, strict=True)})
    if pg_port:
        ports["PG"] = pg_port
    p = {key: str(port) for key, port in ports.items()}
    airflow_home = state / "airflow"
    af_db, af_user, af_pw = f"{ident}_airflow", f"{ident}_airflow", secrets.token_hex(16)
    ml_db, ml_user, ml_pw = f"{ident}_mlflow", f"{ident}_mlflow", secrets.token_hex(16)
    pg = f"{HOST}:{p['PG']}"

    from cryptography.fernet import Fernet  # an Airflow dependency

    env: dict[str, str] = {
        # the stack itself
        "KEYART_STACK_NAME": name,
        "KEYART_STACK_ID": secrets.token_hex(8),  # every process of the stack carries it
        "KEYART_STACK_DIR": str(state),
        **{f"STACK_PORT_{key}": value for key, value in p.items()},
        "STACK_PG_HOST": HOST,
        "STACK_PG_ADMIN_USER": PG_ADMIN_USER,
        "STACK_AIRFLOW_DB": af_db, "STACK_AIRFLOW_DB_USER": af_user, "STACK_AIRFLOW_DB_PASSWORD": af_pw,
        "STACK_MLFLOW_DB": ml_db, "STACK_MLFLOW_DB_USER": ml_user, "STACK_MLFLOW_DB_PASSWORD": ml_pw,
        "STACK_REDIS_URL": REDIS_URL,
        "STACK_BALANCER_STATS_PASSWORD": secrets.token_urlsafe(18),
        "STACK_SPARK_WORKER_CORES": "1",
        "STACK_SPARK_WORKER_MEMORY": "2g",
        # spark.authenticate: the master, the workers and every submitting client share it
        # (spark-defaults.conf, mode 600; secret files are refused outside Kubernetes)
        "STACK_SPARK_AUTH_SECRET": secrets.token_hex(32),
        "SPARK_DAEMON_MEMORY": "512m",
        # keyart (every component and every task)
        "KEYART_HOME": str(state),
        "KEYART_LAKE_ROOT": str(state / "lake"),
        "KEYART_MLFLOW_TRACKING_URI": f"http://{HOST}:{p['MLFLOW']}",
        "KEYART_MLFLOW_ARTIFACT_ROOT": "mlflow-artifacts:/keyart",
        "KEYART_SPARK_MASTER": f"spark://{HOST}:{p['SPARK_MASTER']}",
        "KEYART_SPARK_DRIVER_MEMORY": "1g",
        "KEYART_SPARK_SHUFFLE_PARTITIONS": "4",
        "KEYART_SERVE_MODEL_URI": "models:/keyart-artwork@champion",
        "KEYART_SERVE_EVENT_SECRET": secrets.token_hex(32),
        "KEYART_SERVE_API_KEYS": secrets.token_urlsafe(32),
        "KEYART_SERVE_POLL_SECONDS": "10",
        # the replicas stamp decisions and rewards with their own clock (production); `up
        # --clock sim` lets a simulation (keyart demo --stack over several days) send its own
        "KEYART_SERVE_CLIENT_CLOCK": "false",
        # Spark: the driver (spark-submit of the DAG's tasks) and the daemons
        "SPARK_LOCAL_IP": HOST,
        "SPARK_CONF_DIR": str(state / "spark" / "conf"),
        "PYSPARK_PYTHON": sys.executable,
        # MLflow server (read by `mlflow server` itself: no password on a command line)
        "MLFLOW_BACKEND_STORE_URI": f"postgresql://{ml_user}:{ml_pw}@{pg}/{ml_db}",
        "MLFLOW_ARTIFACTS_DESTINATION": (state / "mlflow" / "artifacts").as_uri(),
    }
    # Airflow: the project's settings (DAG folder, auth manager, Execution API URL, ...) on
    # PostgreSQL instead of SQLite, with generated keys.
    af = airflow_env.airflow_environ(airflow_home, base={"AIRFLOW__API__PORT": p["AIRFLOW"],
                                                        "KEYART_HOME": str(state)})
    env.update({k: v for k, v in af.items() if k.startswith("AIRFLOW")})
    env.update({
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"postgresql+psycopg2://{af_user}:{af_pw}@{pg}/{af_db}",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "2",
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__API__BASE_URL": f"http://{HOST}:{p['AIRFLOW']}",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://{HOST}:{p['AIRFLOW']}/execution/",
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
        "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
        "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode(),
        # a scheduler or DAG processor late with its heartbeat on a loaded 2-core machine is
        # busy, not dead: Airflow's health reports it unhealthy after 90 s instead of 30
        "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_THRESHOLD": "90",
        "AIRFLOW__DAG_PROCESSOR__HEALTH_CHECK_THRESHOLD": "90",
    })
    return env


def write_env(state: Path, env: Mapping[str, str]) -> Path:
    lines = [
        "# keyart stack: every setting of every component (keyart stack up reads it; generated once).",
        "# Secrets and passwords are generated here: keep this file private (mode 600).",
        "# In a shell: set -a; . " + str(env_path(state)) + "; set +a",
    ]
    lines += [f"{key}={shlex.quote(value)}" for key, value in env.items()]
    path = env_path(state)
    _write_private(path, "\n".join(lines) + "\n")
    return path


def _later_settings() -> dict[str, str]:
    """Settings added to stack.env after some stacks were created: given to those on ``up``."""
    return {"STACK_SPARK_AUTH_SECRET": secrets.token_hex(32), "KEYART_SERVE_CLIENT_CLOCK": "false"}


def load_or_create_env(state: Path, name: str = "keyart", free_ports: bool = False,
                       pg_port: int | None = None) -> dict[str, str]:
    if env_path(state).exists():
        env = read_env(state)
        if env.get("KEYART_STACK_NAME") != name and name != "keyart":
            raise StackError(f"{state} holds stack {env.get('KEYART_STACK_NAME')!r}, not {name!r}")
        added = {key: value for key, value in _later_settings().items() if key not in env}
        if added:  # a settings file written before these settings existed
            env.update(added)
            write_env(state, env)
        return env
    if not free_ports:
        busy = [f"{key}={port}" for key, port in DEFAULT_PORTS.items() if key != "PG" and not _port_free(port)]
        if busy:
            raise StackError(f"ports already in use: {', '.join(busy)}; stop what uses them or pass --free-ports")
    env = generate_env(state, name, free_ports, pg_port)
    write_env(state, env)
    return env


# ---------------------------------------------------------------------------------------
# Components
# ---------------------------------------------------------------------------------------

@dataclass
class Component:
    name: str
    what: str
    argv: list[str]
    probe: Callable[[], bool]
    url: str = ""
    env: dict[str, str] = field(default_factory=dict)
    stop_signal: int = signal.SIGTERM
    prepare: Callable[[], None] | None = None


def _bin(name: str) -> str:
    from keyart.pipeline import venv_bin

    try:
        return venv_bin(name)
    except FileNotFoundError as exc:
        raise StackError(str(exc)) from exc


def _haproxy_bin() -> str:
    found = shutil.which("haproxy") or (os.path.exists("/usr/sbin/haproxy") and "/usr/sbin/haproxy")
    if not found:
        raise StackError("HAProxy is not installed: apt-get install haproxy")
    return found


PROBE_TIMEOUT_S = 10.0
"""A health request's timeout: on a loaded 2-core machine a Python server may take seconds."""


def _http_status(url: str, timeout: float = PROBE_TIMEOUT_S, headers: Mapping[str, str] | None = None) -> int | None:
    req = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, ValueError):
        return None


def _http_json(url: str, timeout: float = PROBE_TIMEOUT_S) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return json.loads(resp.read())
    except (OSError, ValueError):
        return None


def port_open(port: int, host: str = HOST, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def redis_ping(url: str = REDIS_URL, timeout: float = 1.0) -> bool:
    """PING the Redis of ``url`` (plain RESP on a socket: no client library needed)."""
    rest = url.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = rest.rpartition("@")[2].partition(":")
    try:
        with socket.create_connection((host or HOST, int(port or 6379)), timeout=timeout) as s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def airflow_health(env: Mapping[str, str]) -> dict:
    return _http_json(f"http://{HOST}:{env['STACK_PORT_AIRFLOW']}/api/v2/monitor/health") or {}


def spark_master_state(env: Mapping[str, str]) -> dict:
    return _http_json(f"http://{HOST}:{env['STACK_PORT_SPARK_MASTER_UI']}/json/") or {}


def _spark_worker_alive(env: Mapping[str, str], ui_port: str) -> bool:
    for worker in spark_master_state(env).get("workers", []):
        if worker.get("state") == "ALIVE" and str(worker.get("webuiaddress", "")).endswith(f":{ui_port}"):
            return True
    return False


def online_state_settings(env: Mapping[str, str]) -> dict[str, str]:
    """The ``KEYART_SERVE_*`` variables of serving's shared online state that this keyart
    knows (see ONLINE_STATE_SETTINGS): none until serving has the fields."""
    from keyart.config import Settings

    fields = Settings.model_fields
    values = {"redis_url": env.get("STACK_REDIS_URL", REDIS_URL), "name": env["KEYART_STACK_NAME"]}
    return {f"KEYART_{key.upper()}": template.format(**values)
            for key, template in ONLINE_STATE_SETTINGS.items() if key in fields}


def haproxy_config(env: Mapping[str, str], replicas: tuple[str, ...] = REPLICAS) -> str:
    """HAProxy in front of the replicas: round robin, /readyz health checks, and a failed
    connection or a replica that dies before answering is retried on the other one."""
    state = Path(env["KEYART_STACK_DIR"])
    servers = "\n".join(
        f"    server serve-{r} {HOST}:{env[f'STACK_PORT_SERVE_{r}']} check inter 1s fall 2 rise 2"
        for r in replicas
    )
    return f"""\
# Generated by keyart stack up from {env_path(state)}; regenerated on every up.
global
    maxconn 4096
    stats socket {state / 'haproxy' / 'admin.sock'} mode 600 level admin
    log stdout format raw local0 notice

defaults
    mode http
    log global
    option dontlognull
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    # a replica busy with a burst answers /readyz late: a check fails on 5 s of silence,
    # not 2 (a dead replica refuses connections at once and is retried elsewhere anyway)
    timeout check 5s
    # A request that could not reach a replica, or whose replica died before answering,
    # is sent again to the other replica (L7 retry; the body is buffered for it). A retried
    # page may leave an impression in the dead replica's log that was never acknowledged:
    # the log's contract already allows that (docs/serving.md).
    retries 2
    option redispatch 1
    retry-on conn-failure empty-response 503

frontend keyart
    bind {HOST}:{env['STACK_PORT_BALANCER']}
    option http-buffer-request
    default_backend serving

backend serving
    balance roundrobin
    option httpchk
    http-check send meth GET uri /readyz
    http-check expect status 200
    http-response set-header X-Keyart-Replica %s
{servers}

listen stats
    bind {HOST}:{env['STACK_PORT_BALANCER_STATS']}
    stats enable
    stats uri /
    stats refresh 5s
    stats auth admin:{env['STACK_BALANCER_STATS_PASSWORD']}
"""


def haproxy_servers(env: Mapping[str, str]) -> dict[str, str]:
    """server name -> status (UP, DOWN, ...) from HAProxy's admin socket."""
    sock_path = Path(env["KEYART_STACK_DIR"]) / "haproxy" / "admin.sock"
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2)
            s.connect(str(sock_path))
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    except OSError:
        return {}
    lines = data.decode().splitlines()
    if not lines or not lines[0].startswith("# "):
        return {}
    header = lines[0][2:].split(",")
    out = {}
    for line in lines[1:]:
        row = dict(zip(header, line.split(","), strict=False))
        if row.get("pxname") == "serving" and row.get("svname") not in ("FRONTEND", "BACKEND"):
            out[row["svname"]] = row.get("status", "")
    return out


def in_rotation(env: Mapping[str, str]) -> bool:
    """Whether HAProxy sends traffic to every replica: each is UP ("UP 1/2", one failed
    check of the two that take it out, is still in rotation; "DOWN 1/2", rising, is not)."""
    servers = haproxy_servers(env)
    return len(servers) == len(REPLICAS) and all(v.split(" ")[0] == "UP" for v in servers.values())


def spark_defaults(env: Mapping[str, str]) -> str:
    return f"""\
# Generated by keyart stack up: read by the master, the workers and spark-submit of the DAG's tasks.
spark.master                 {env['KEYART_SPARK_MASTER']}
spark.driver.host            {HOST}
spark.driver.bindAddress     {HOST}
spark.executor.memory        1g
spark.executor.cores         1
spark.cores.max              {len(WORKERS) * int(env['STACK_SPARK_WORKER_CORES'])}
spark.pyspark.python         {env['PYSPARK_PYTHON']}
# RPC authentication between the master, the workers, the drivers and their executors:
# one shared secret, generated into stack.env (this file is mode 600, like stack.env)
spark.authenticate           true
spark.authenticate.secret    {env['STACK_SPARK_AUTH_SECRET']}
"""


def components(env: Mapping[str, str]) -> list[Component]:
    """Every process the stack starts, in start order (stopped in the reverse order)."""
    from keyart.demo import airflow_env

    state = Path(env["KEYART_STACK_DIR"])
    port = {key[len("STACK_PORT_"):]: value for key, value in env.items() if key.startswith("STACK_PORT_")}
    out: list[Component] = []

    if env.get("STACK_PG_MANAGED") == "1":
        pg_bin = Path(env["STACK_PG_BINDIR"])
        argv = [str(pg_bin / "postgres"), "-D", str(state / "postgres" / "data"), "-p", port["PG"],
                "-c", f"listen_addresses={HOST}", "-c", f"unix_socket_directories={state / 'postgres'}"]
        out.append(Component("postgres", "PostgreSQL (started by the stack)", _as_postgres_user(argv),
                             lambda: _pg_ready(env), f"postgresql://{HOST}:{port['PG']}",
                             stop_signal=signal.SIGINT))

    out.append(Component(
        "mlflow", "MLflow tracking server + registry (PostgreSQL; artifacts proxied)",
        [_bin("mlflow"), "server", "--host", HOST, "--port", port["MLFLOW"], "--workers", "1",
         "--allowed-hosts", f"{HOST}:{port['MLFLOW']},localhost:{port['MLFLOW']}"],
        lambda: _http_status(f"http://{HOST}:{port['MLFLOW']}/health") == 200,
        f"http://{HOST}:{port['MLFLOW']}"))

    spark_class = _bin("spark-class")
    out.append(Component(
        "spark-master", "Spark standalone master",
        [spark_class, "org.apache.spark.deploy.master.Master", "--host", HOST, "--port", port["SPARK_MASTER"],
         "--webui-port", port["SPARK_MASTER_UI"]],
        lambda: spark_master_state(env).get("status") == "ALIVE",
        f"{env['KEYART_SPARK_MASTER']} (UI http://{HOST}:{port['SPARK_MASTER_UI']})",
        prepare=lambda: _write_spark_conf(env)))
    for w in WORKERS:
        ui = port[f"SPARK_WORKER_{w}_UI"]
        out.append(Component(
            f"spark-worker-{w}", f"Spark worker {w}",
            [spark_class, "org.apache.spark.deploy.worker.Worker", "--host", HOST, "--webui-port", ui,
             "--cores", env["STACK_SPARK_WORKER_CORES"], "--memory", env["STACK_SPARK_WORKER_MEMORY"],
             "--work-dir", str(state / "spark" / f"work-{w}"), env["KEYART_SPARK_MASTER"]],
            lambda ui=ui: _spark_worker_alive(env, ui), f"http://{HOST}:{ui}"))

    airflow = airflow_env.airflow_bin()
    api = f"http://{HOST}:{port['AIRFLOW']}"
    out.append(Component("airflow-api-server", "Airflow API server (UI, REST API, Execution API)",
                         [airflow, "api-server", "--host", HOST, "--port", port["AIRFLOW"]],
                         lambda: _http_status(f"{api}/api/v2/monitor/health") == 200, api))
    out.append(Component("airflow-scheduler", "Airflow scheduler (LocalExecutor)",
                         # its task-log server would bind every interface; the API server reads
                         # the task logs from AIRFLOW_HOME/logs on this machine instead
                         [airflow, "scheduler", "--skip-serve-logs"],
                         lambda: airflow_health(env).get("scheduler", {}).get("status") == "healthy"))
    out.append(Component("airflow-dag-processor", "Airflow DAG processor", [airflow, "dag-processor"],
                         lambda: airflow_health(env).get("dag_processor", {}).get("status") == "healthy"))

    keyart = _bin("keyart")
    online = online_state_settings(env)
    for r in REPLICAS:
        p = port[f"SERVE_{r}"]
        out.append(Component(
            f"serve-{r}", f"serving replica {r} (keyart serve)",
            [keyart, "serve", "--host", HOST, "--port", p],
            lambda p=p: _http_status(f"http://{HOST}:{p}/readyz") == 200, f"http://{HOST}:{p}",
            env={"KEYART_SERVE_PORT": p, **online}))

    cfg = state / "haproxy" / "haproxy.cfg"
    out.append(Component(
        "balancer", "HAProxy in front of the replicas (health checks on /readyz)",
        [_haproxy_bin(), "-db", "-f", str(cfg)],
        lambda: _http_status(f"http://{HOST}:{port['BALANCER']}/readyz") == 200 and in_rotation(env),
        f"http://{HOST}:{port['BALANCER']}", prepare=lambda: _write_haproxy(env, cfg)))
    return out


def _write_spark_conf(env: Mapping[str, str]) -> None:
    conf = Path(env["SPARK_CONF_DIR"])
    conf.mkdir(parents=True, exist_ok=True)
    _write_private(conf / "spark-defaults.conf", spark_defaults(env))


def _write_haproxy(env: Mapping[str, str], cfg: Path) -> None:
    _write_private(cfg, haproxy_config(env))
    check = subprocess.run([_haproxy_bin(), "-c", "-q", "-f", str(cfg)], capture_output=True, text=True)
    if check.returncode != 0:
        raise StackError(f"HAProxy refuses {cfg}: {check.stdout}{check.stderr}")


# ---------------------------------------------------------------------------------------
# PostgreSQL
# ---------------------------------------------------------------------------------------

def _pg_connect(env: Mapping[str, str], dbname: str = "postgres", timeout: int = 3):
    import psycopg2

    return psycopg2.connect(host=env["STACK_PG_HOST"], port=int(env["STACK_PORT_PG"]),
                            user=env["STACK_PG_ADMIN_USER"], dbname=dbname, connect_timeout=timeout)


def _pg_ready(env: Mapping[str, str]) -> bool:
    try:
        _pg_connect(env, timeout=2).close()
        return True
    except Exception:  # noqa: BLE001 - any failure means "not ready"
        return False


def _pg_bindir() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise StackError("no PostgreSQL answers and none is installed: apt-get install postgresql "
                     "(or start one on 127.0.0.1 and set STACK_PORT_PG)")


def _as_postgres_user(argv: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run it as the ``postgres`` system user."""
    if os.geteuid() != 0:
        return argv
    return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--", *argv]


def _init_managed_postgres(env: dict[str, str]) -> None:
    """A PostgreSQL cluster of the stack's own under <state>/postgres (trust auth on
    127.0.0.1 and a private socket directory), when no server answers."""
    state = Path(env["KEYART_STACK_DIR"])
    bindir = _pg_bindir()
    data = state / "postgres" / "data"
    env["STACK_PG_MANAGED"] = "1"
    env["STACK_PG_BINDIR"] = str(bindir)
    write_env(state, env)
    if (data / "PG_VERSION").exists():
        return
    data.mkdir(parents=True, exist_ok=True)
    os.chmod(data.parent, 0o700)
    if os.geteuid() == 0:
        shutil.chown(data.parent, "postgres", "postgres")
        shutil.chown(data, "postgres", "postgres")
    subprocess.run(_as_postgres_user([str(bindir / "initdb"), "-D", str(data), "-U", PG_ADMIN_USER,
                                      "--auth=trust", "-E", "UTF8"]),
                   check=True, stdout=subprocess.DEVNULL)


def ensure_databases(env: Mapping[str, str]) -> None:
    """Roles and databases for Airflow and MLflow (created when missing; the password is
    (re)set to the one in stack.env)."""
    from psycopg2 import sql

    conn = _pg_connect(env)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            for kind in ("AIRFLOW", "MLFLOW"):
                db, user, pw = (env[f"STACK_{kind}_DB"], env[f"STACK_{kind}_DB_USER"],
                                env[f"STACK_{kind}_DB_PASSWORD"])
                cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (user,))
                verb = "ALTER" if cur.fetchone() else "CREATE"
                cur.execute(sql.SQL(verb + " ROLE {} WITH LOGIN PASSWORD %s").format(sql.Identifier(user)), (pw,))
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,))
                if not cur.fetchone():
                    cur.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(db), sql.Identifier(user)))
    finally:
        conn.close()


def drop_databases(env: Mapping[str, str]) -> None:
    from psycopg2 import sql

    conn = _pg_connect(env)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            for kind in ("AIRFLOW", "MLFLOW"):
                cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(env[f"STACK_{kind}_DB"])))
                cur.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(env[f"STACK_{kind}_DB_USER"])))
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------
# Processes: pid files, start, stop
# ---------------------------------------------------------------------------------------

def _proc_start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22: start time in clock ticks since boot


def _pid_file(state: Path, name: str) -> Path:
    return state / "run" / f"{name}.json"


def running(state: Path, name: str) -> dict | None:
    """The pid record of a component whose process is still the one the stack started."""
    path = _pid_file(state, name)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if _proc_start_time(record["pid"]) != record["start_time"]:
        return None
    try:
        if Path(f"/proc/{record['pid']}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return None
    except OSError:
        return None
    return record


def process_environ(env: Mapping[str, str], extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A component's environment: this machine's, less any keyart/Airflow/MLflow/Spark
    setting inherited from the caller, plus the stack's file (and the component's own)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(_DROP_PREFIXES)}
    base.update(env)
    base.update(extra or {})
    base["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    return base


def start_component(state: Path, env: Mapping[str, str], comp: Component) -> dict:
    if comp.prepare is not None:
        comp.prepare()
    logs = state / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / f"{comp.name}.log", "ab") as out:
        out.write(f"\n=== {dt.datetime.now(dt.UTC).isoformat()} keyart stack starts {comp.name}: "
                  f"{shlex.join(comp.argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(comp.argv, env=process_environ(env, comp.env), cwd=state, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    record = {"name": comp.name, "pid": proc.pid, "pgid": proc.pid, "start_time": _proc_start_time(proc.pid),
              "argv": comp.argv, "stop_signal": int(comp.stop_signal)}
    path = _pid_file(state, comp.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    return record


def _group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs (zombies do not count: a component started
    by this same process is reaped here)."""
    try:
        os.waitpid(pgid, os.WNOHANG)
    except ChildProcessError:
        pass
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat[2]) == pgid and stat[0] != "Z":
            return True
    return False


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_component(state: Path, name: str, timeout: float = 30.0) -> str | None:
    """Stop a component's process group (its stop signal, then SIGKILL after ``timeout``);
    None if it was not running, else how it ended and how long it took."""
    path = _pid_file(state, name)
    record = running(state, name)
    outcome = None
    if record is not None:
        t0 = time.monotonic()
        outcome = "stopped"
        pgid = record["pgid"]
        if record.get("stop_signal", signal.SIGTERM) != signal.SIGTERM:
            try:
                os.kill(record["pid"], record["stop_signal"])  # e.g. PostgreSQL's fast shutdown
            except ProcessLookupError:
                pass
        else:
            _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _group_alive(pgid):
            outcome = "killed (SIGKILL)"
            _signal_group(pgid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while _group_alive(pgid) and time.monotonic() < deadline:
                time.sleep(0.1)
        outcome += f" in {time.monotonic() - t0:.1f} s"
    path.unlink(missing_ok=True)
    return outcome


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def stack_processes(stack_id: str, except_groups: frozenset[int] = frozenset()) -> list[int]:
    """Live processes whose environment carries this stack's id (all the stack started and
    their children), except this process, its ancestors and the given process groups."""
    marker = f"KEYART_STACK_ID={stack_id}".encode()
    skip = _ancestors()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in skip:
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if stat[0] != "Z" and int(stat[2]) not in except_groups:
                    found.append(int(entry.name))
        except OSError:
            continue
    return sorted(found)


_REPORTED_HEALTHY: dict[str, set[str]] = {}


def _wait_healthy(comps: list[Component], state: Path, timeout: float, say: Callable[[str], None]) -> None:
    """Wait until every component is healthy *at once*: one pass in which every probe
    passes. A component healthy earlier is probed again, because health depends on other
    components (the balancer's on HAProxy seeing the replicas, which a replica restarted
    after HAProxy's last check has not caught up with yet)."""
    reported = _REPORTED_HEALTHY.setdefault(str(state), set())
    deadline = time.monotonic() + timeout
    while True:
        failing = []
        for comp in comps:
            if running(state, comp.name) is None:
                raise StackError(f"{comp.name} exited at start-up; the end of {state / 'logs' / (comp.name + '.log')}:\n"
                                 f"{_tail(state / 'logs' / (comp.name + '.log'))}")
            if comp.probe():
                if comp.name not in reported:
                    say(f"  healthy  {comp.name}")
                    reported.add(comp.name)
            else:
                failing.append(comp.name)
        if not failing:
            return
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {n}:\n{_tail(state / 'logs' / (n + '.log'))}" for n in failing)
            raise StackError(f"not healthy after {timeout:.0f}s: {', '.join(failing)}\n{tails}")
        time.sleep(1)


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


# ---------------------------------------------------------------------------------------
# up / down / status
# ---------------------------------------------------------------------------------------

def _airflow_prepare(env: Mapping[str, str]) -> None:
    """Local settings (compatibility patches), the admin password, ``airflow db migrate``."""
    from keyart.demo import airflow_env

    home = Path(env["AIRFLOW_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    airflow_env.write_local_settings(home)
    pw_file = Path(env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"])
    if not pw_file.exists():
        _write_private(pw_file, json.dumps({airflow_env.ADMIN_USER: secrets.token_urlsafe(16)}))
    marker = home / f".keyart-db-migrated-{env['STACK_AIRFLOW_DB']}"
    if not marker.exists():
        proc = subprocess.run([airflow_env.airflow_bin(), "db", "migrate"], env=process_environ(env),
                              cwd=env["KEYART_STACK_DIR"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise StackError(f"airflow db migrate failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
        marker.write_text("airflow db migrate done\n")


def _world(env: Mapping[str, str], say: Callable[[str], None]) -> subprocess.Popen | None:
    """A small simulated world in the stack's lake when it has no catalog (serving is ready
    only with a catalog or a model), started in the background."""
    lake = Path(env["KEYART_LAKE_ROOT"])
    if (lake / "catalog" / "artworks").exists():
        return None
    today = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    say(f"  no catalog in {lake}: creating a simulated world (keyart world, traffic from {today})")
    logs = Path(env["KEYART_STACK_DIR"]) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    out = open(logs / "world.log", "ab")  # noqa: SIM115 - closed by the caller's wait
    return subprocess.Popen([_bin("keyart"), "world", "--out", str(lake), "--titles", "30", "--members", "2000",
                             "--history-days", "14", "--start", today],
                            env=process_environ(env), cwd=env["KEYART_STACK_DIR"], stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)


CLOCKS = {"wall": "false", "sim": "true"}
"""``up --clock``: the value of KEYART_SERVE_CLIENT_CLOCK the replicas run with."""


def serving_clock(env: Mapping[str, str]) -> str:
    """``wall`` (the replicas stamp every decision and reward themselves) or ``sim`` (they
    take a request's ``ts``: a simulation or a log replay)."""
    return "sim" if env.get("KEYART_SERVE_CLIENT_CLOCK", "false").lower() == "true" else "wall"


def up(state: Path, name: str = "keyart", free_ports: bool = False, world: bool = True,
       timeout: float = 600.0, pg_port: int | None = None, say: Callable[[str], None] = print,
       clock: str | None = None) -> dict[str, str]:
    """Start every component not running yet, wait until each is healthy; return the env.
    ``clock`` (wall/sim) changes the replicas' clock in stack.env and restarts them."""
    state = state.resolve()
    state.mkdir(parents=True, exist_ok=True)
    env = load_or_create_env(state, name, free_ports, pg_port)
    say(f"keyart stack {env['KEYART_STACK_NAME']!r}: state {state}, settings {env_path(state)}")
    if clock is not None and serving_clock(env) != clock:
        env["KEYART_SERVE_CLIENT_CLOCK"] = CLOCKS[clock]
        write_env(state, env)
        for r in REPLICAS:
            if stop_component(state, f"serve-{r}"):
                say(f"  stopped  serve-{r} (its clock is now {clock})")
    for sub in ("lake", "mlflow/artifacts", "spark", "haproxy", "logs", "run"):
        (state / sub).mkdir(parents=True, exist_ok=True)

    if env.get("STACK_PG_MANAGED") != "1" and not _pg_ready(env):
        say(f"  no PostgreSQL answers on {HOST}:{env['STACK_PORT_PG']}: starting one under {state / 'postgres'}")
        _init_managed_postgres(env)
    comps = components(env)
    by_name = {c.name: c for c in comps}
    started: list[Component] = []

    def start(names: list[str]) -> None:
        for n in names:
            if running(state, n) is None:
                start_component(state, env, by_name[n])
                started.append(by_name[n])
                say(f"  started  {n}")
            else:
                say(f"  running  {n}")

    if "postgres" in by_name:
        start(["postgres"])
        _wait_healthy([by_name["postgres"]], state, 60, say)
    ensure_databases(env)
    world_proc = _world(env, say) if world else None
    start(["mlflow", "spark-master", *[f"spark-worker-{w}" for w in WORKERS]])
    airflow = ["airflow-api-server", "airflow-scheduler", "airflow-dag-processor"]
    if any(running(state, n) is None for n in airflow):
        say("  airflow db migrate (first start only) ...")
        _airflow_prepare(env)
    start(airflow)
    # the replicas resolve @champion on the MLflow server at start-up
    _wait_healthy([by_name["mlflow"]], state, timeout, say)
    if world_proc is not None:
        if world_proc.wait() != 0:
            raise StackError(f"keyart world failed; see {state / 'logs' / 'world.log'}")
    if not redis_ping(env.get("STACK_REDIS_URL", REDIS_URL)) and online_state_settings(env):
        raise StackError(f"serving keeps its online state in Redis, and none answers at {env['STACK_REDIS_URL']}")
    serve = [f"serve-{r}" for r in REPLICAS]
    start([*serve, "balancer"])
    _wait_healthy(comps, state, timeout, say)
    return env


def down(state: Path, purge: bool = False, say: Callable[[str], None] = print) -> list[int]:
    """Stop what ``up`` started (reverse order), then any process left with this stack's id;
    returns the pids of such leftovers. ``purge`` also drops the databases and the state dir."""
    state = state.resolve()
    if not env_path(state).exists():
        say(f"no stack in {state}")
        return []
    env = read_env(state)
    try:
        comps = components(env)
    except StackError:
        comps = []
    names = [c.name for c in comps] or [p.stem for p in (state / "run").glob("*.json")]
    for name in reversed(names):
        if name == "postgres":
            continue
        outcome = stop_component(state, name)
        if outcome:
            say(f"  {name}: {outcome}")
    # a PostgreSQL of the stack's own is stopped last (its databases may be dropped first)
    pg = running(state, "postgres")
    keep = frozenset({pg["pgid"]}) if pg else frozenset()
    leftovers = stack_processes(env["KEYART_STACK_ID"], keep)
    for pid in leftovers:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 15
    while stack_processes(env["KEYART_STACK_ID"], keep) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in stack_processes(env["KEYART_STACK_ID"], keep):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if leftovers:
        say(f"  stopped  {len(leftovers)} process(es) the components had left behind: {leftovers}")
    if purge and env.get("STACK_PG_MANAGED") != "1" and _pg_ready(env):
        drop_databases(env)
        say(f"  dropped  databases {env['STACK_AIRFLOW_DB']}, {env['STACK_MLFLOW_DB']} and their roles")
    outcome = stop_component(state, "postgres", timeout=60)
    if outcome:
        say(f"  postgres: {outcome}")
    if purge:
        _purge_redis(env)
        shutil.rmtree(state, ignore_errors=True)
        say(f"  removed  {state}")
    return leftovers


def _purge_redis(env: Mapping[str, str]) -> None:
    """Delete this stack's keys in Redis (serving's online state, when it keeps it there)."""
    try:
        import redis
    except ImportError:
        return
    try:
        client = redis.Redis.from_url(env.get("STACK_REDIS_URL", REDIS_URL), socket_timeout=2)
        prefix = ONLINE_STATE_SETTINGS["serve_redis_prefix"].format(name=env["KEYART_STACK_NAME"])
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
    except Exception:  # noqa: BLE001 - purge is best effort for Redis
        pass


def _probe(comp: Component, attempts: int = 3, pause_s: float = 1.0) -> bool:
    """A running component's health: its probe passes within ``attempts`` tries (one slow
    answer on a loaded machine, or a heartbeat just late, is not a component down)."""
    for attempt in range(attempts):
        if comp.probe():
            return True
        if attempt + 1 < attempts:
            time.sleep(pause_s)
    return False


def status(state: Path) -> dict:
    """Every component: running (the pid the stack started is alive), healthy, URL."""
    state = state.resolve()
    if not env_path(state).exists():
        return {"state": str(state), "components": {}, "up": False}
    env = read_env(state)
    rows = {}
    for comp in components(env):
        record = running(state, comp.name)
        rows[comp.name] = {"what": comp.what, "pid": record["pid"] if record else None,
                           "running": record is not None, "healthy": bool(record) and _probe(comp),
                           "url": comp.url}
    rows["redis"] = {"what": "Redis (the machine's)", "pid": None, "running": None,
                     "healthy": redis_ping(env.get("STACK_REDIS_URL", REDIS_URL)), "url": env.get("STACK_REDIS_URL")}
    if env.get("STACK_PG_MANAGED") != "1":
        rows["postgres"] = {"what": "PostgreSQL (the machine's)", "pid": None, "running": None,
                            "healthy": _pg_ready(env), "url": f"postgresql://{HOST}:{env['STACK_PORT_PG']}"}
    started = [r for r in rows.values() if r["running"] is not None]
    return {"state": str(state), "name": env["KEYART_STACK_NAME"], "components": rows,
            "balancer_servers": haproxy_servers(env),
            "up": bool(started) and all(r["running"] and r["healthy"] for r in started)}


def logins(env: Mapping[str, str]) -> list[str]:
    """What `up` prints: every URL and how to log in."""
    from keyart.demo import airflow_env

    p = {key[len("STACK_PORT_"):]: value for key, value in env.items() if key.startswith("STACK_PORT_")}
    airflow_pw = airflow_env.admin_password(env["AIRFLOW_HOME"])
    state = Path(env["KEYART_STACK_DIR"])
    return [
        f"  serving (balancer)   http://{HOST}:{p['BALANCER']}   POST /v1/artwork, /v1/reward with header "
        f"X-API-Key: $KEYART_SERVE_API_KEYS (in {env_path(state)})",
        *[f"  serving replica {r}    http://{HOST}:{p[f'SERVE_{r}']}   (/readyz, /metrics, /docs)" for r in REPLICAS],
        f"  HAProxy stats        http://{HOST}:{p['BALANCER_STATS']}/   user admin, password "
        f"{env['STACK_BALANCER_STATS_PASSWORD']}",
        f"  Airflow              http://{HOST}:{p['AIRFLOW']}   user {airflow_env.ADMIN_USER}, password {airflow_pw}"
        "   (keyart_daily is created paused: unpause it to run on its schedule)",
        f"  MLflow               http://{HOST}:{p['MLFLOW']}   (no login: loopback only)",
        f"  Spark master         {env['KEYART_SPARK_MASTER']}   UI http://{HOST}:{p['SPARK_MASTER_UI']}, workers "
        + ", ".join(f"http://{HOST}:{p[f'SPARK_WORKER_{w}_UI']}" for w in WORKERS),
        f"  PostgreSQL           {HOST}:{p['PG']}   databases {env['STACK_AIRFLOW_DB']} (user "
        f"{env['STACK_AIRFLOW_DB_USER']}), {env['STACK_MLFLOW_DB']} (user {env['STACK_MLFLOW_DB_USER']}); "
        "passwords in the settings file",
        f"  serving clock        {serving_clock(env)}   (keyart stack up --clock wall|sim)",
        f"  Redis                {env.get('STACK_REDIS_URL', REDIS_URL)}"
        + ("" if online_state_settings(env) else "   (serving does not use it yet)"),
        f"  logs                 {state / 'logs'}",
    ]


# ---------------------------------------------------------------------------------------
# Command line: `keyart stack ...`, `python -m keyart.demo.stack ...`, make up / make down
# ---------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("up", "down", "status"))
    parser.add_argument("--state-dir", type=Path, help="default <KEYART_HOME>/stack (var/stack under make)")
    parser.add_argument("--name", default="keyart", help="names the databases, roles and Redis keys (default keyart)")
    parser.add_argument("--free-ports", action="store_true",
                        help="up, first time: pick free ports instead of the defaults (kept in stack.env)")
    parser.add_argument("--pg-port", type=int, help="up, first time: PostgreSQL port (default 5432); when nothing "
                        "answers there, the stack starts its own server on it")
    parser.add_argument("--no-world", action="store_true", help="up: do not create a simulated world in an empty lake")
    parser.add_argument("--clock", choices=tuple(CLOCKS), help="up: the replicas' clock, kept in stack.env (default "
                        "wall: they stamp decisions themselves; sim: they accept a request's ts, for keyart demo "
                        "--stack over several simulated days); a change restarts the replicas")
    parser.add_argument("--timeout", type=float, default=600.0, help="up: seconds to wait for health (default 600)")
    parser.add_argument("--purge", action="store_true", help="down: also drop the databases, roles and the state dir")
    parser.add_argument("--json", action="store_true", help="status: as JSON")


def run(args: argparse.Namespace) -> int:
    state = (args.state_dir or default_state_dir()).resolve()
    if args.action == "up":
        t0 = time.monotonic()
        try:
            env = up(state, name=args.name, free_ports=args.free_ports, world=not args.no_world,
                     timeout=args.timeout, pg_port=args.pg_port, say=lambda m: print(m, flush=True),
                     clock=args.clock)
        except StackError as exc:
            print(f"keyart stack up: {exc}\n(stop what did start with: keyart stack down --state-dir {state})",
                  file=sys.stderr)
            return 1
        print(f"keyart stack is up ({time.monotonic() - t0:.0f} s):")
        print("\n".join(logins(env)))
        print(f"Stop it with `make down` (or keyart stack down --state-dir {state}).")
        return 0
    if args.action == "down":
        down(state, purge=args.purge, say=lambda m: print(m, flush=True))
        return 0
    report = status(state)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        if not report["components"]:
            print(f"no stack in {state}")
            return 3
        for name, row in report["components"].items():
            mark = "up" if row["healthy"] else ("running" if row["running"] else "DOWN")
            pid = f"pid {row['pid']}" if row["pid"] else ("external" if row["running"] is None else "-")
            print(f"{name:24s} {mark:8s} {pid:12s} {row['url']}")
        if report["balancer_servers"]:
            print("balancer sees: " + ", ".join(f"{k} {v}" for k, v in report["balancer_servers"].items()))
    return 0 if report["up"] else 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m keyart.demo.stack", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
