"""A long-lived Spark Connect server for the daily jobs.

    keyart spark-connect [--host 127.0.0.1] [--port 15002]

Started by ``spark-submit``, every job pays for a JVM, a SparkContext and a cold JIT before
its first row: on one machine that is most of a small day's job time. With
``KEYART_SPARK_REMOTE=sc://host:port`` the jobs are Spark Connect clients of one running
driver instead (the server of this module, or any Spark Connect endpoint of a cluster):
each job opens its own session (its own SQL settings and temporary state), sends its plans
and reads the results; the code of the jobs is the same.

The server is ``org.apache.spark.sql.connect.service.SparkConnectServer`` from the pyspark
wheel's own jars, on ``spark_master`` with ``spark_driver_memory``. Its Python workers
(``mapInPandas`` in the features job) run this interpreter, so they import the same keyart.
It binds to loopback by default; anything wider needs ``spark.connect.authenticate.token``
(or a gateway in front), since a Connect client can run code on the driver.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from keyart.config import Settings
from keyart.net import free_port

log = logging.getLogger(__name__)

SERVER_CLASS = "org.apache.spark.sql.connect.service.SparkConnectServer"
DEFAULT_PORT = 15002


def spark_submit_bin() -> str:
    """The ``spark-submit`` installed next to this interpreter (the pyspark wheel's)."""
    local = Path(sys.executable).parent / "spark-submit"
    return str(local) if local.exists() else "spark-submit"


def server_argv(settings: Settings, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> list[str]:
    """The ``spark-submit`` command line of a Connect server with the jobs' driver settings."""
    conf = {
        "spark.connect.grpc.binding.address": host,
        "spark.connect.grpc.binding.port": str(port),
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.sources.partitionOverwriteMode": "dynamic",
        "spark.sql.shuffle.partitions": str(settings.spark_shuffle_partitions),
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.parquet.compression.codec": "snappy",
        "spark.ui.showConsoleProgress": "false",
        "spark.pyspark.python": sys.executable,
        "spark.driver.extraJavaOptions": "-Duser.timezone=UTC",
        "spark.executor.extraJavaOptions": "-Duser.timezone=UTC",
    }
    argv = [spark_submit_bin(), "--class", SERVER_CLASS, "--name", "keyart-spark-connect",
            "--master", settings.spark_master, "--driver-memory", settings.spark_driver_memory]
    for key, value in conf.items():
        argv += ["--conf", f"{key}={value}"]
    return [*argv, "spark-internal"]


def server_environ(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The server's environment: its Python workers and spark-submit use this interpreter."""
    env = dict(os.environ if base is None else base)
    env["PYSPARK_PYTHON"] = sys.executable
    env["PYSPARK_DRIVER_PYTHON"] = sys.executable
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def remote_address(url: str) -> tuple[str, int]:
    """(host, port) of a Spark Connect URL ``sc://host[:port][/;param=value...]``."""
    if not url.startswith("sc://"):
        raise ValueError(f"a Spark Connect URL starts with sc://, got {url!r}")
    netloc = url[len("sc://"):].split("/", 1)[0].split(";", 1)[0]
    if netloc.startswith("["):  # [IPv6]:port
        host, _, rest = netloc[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        host, _, port = netloc.partition(":")
    return host or "localhost", int(port) if port else DEFAULT_PORT


def require_reachable(url: str, timeout: float = 5.0) -> None:
    """Raise ConnectionError now, with what to do, when nothing listens at ``url``.

    (The Connect client itself would retry with back-off for minutes before failing.)"""
    host, port = remote_address(url)
    if not port_open(host, port, timeout=timeout):
        raise ConnectionError(
            f"no Spark Connect server listens at {url} (KEYART_SPARK_REMOTE): start one with "
            f"`keyart spark-connect --port {port}`, or unset KEYART_SPARK_REMOTE to run the job "
            f"with its own Spark driver"
        )


class ConnectServer:
    """A Spark Connect server in a child process (its own process group), for the demo and tests.

    ``url`` is what ``KEYART_SPARK_REMOTE`` takes. ``stop()`` ends the JVM (SIGTERM, then SIGKILL).
    """

    def __init__(self, settings: Settings | None = None, host: str = "127.0.0.1", port: int | None = None,
                 log_path: Path | None = None, env: Mapping[str, str] | None = None, cwd: Path | None = None):
        self.settings = settings or Settings()
        self.host = host
        self.port = port or free_port()
        self.url = f"sc://{host}:{self.port}"
        self.log_path = log_path
        self._log: IO[str] | None = None
        self._env = server_environ(env)
        self._cwd = cwd
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180.0) -> ConnectServer:
        """Launch the server and wait until it listens."""
        return self.launch().wait_ready(timeout)

    def launch(self) -> ConnectServer:
        """Launch the server without waiting (JVM start-up overlaps the caller's work)."""
        if port_open(self.host, self.port):
            raise RuntimeError(f"port {self.port} on {self.host} is already in use: cannot start a Spark Connect server there")
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "a")  # noqa: SIM115 - closed in stop()
        out = self._log if self._log is not None else subprocess.DEVNULL
        self.proc = subprocess.Popen(server_argv(self.settings, self.host, self.port), env=self._env, cwd=self._cwd,
                                     stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def wait_ready(self, timeout: float = 180.0) -> ConnectServer:
        if self.proc is None:
            raise RuntimeError("the Spark Connect server was not launched")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._close_log()
                where = f"; see {self.log_path}" if self.log_path else ""
                raise RuntimeError(f"Spark Connect server exited with {self.proc.returncode} before listening{where}")
            if port_open(self.host, self.port):
                log.info("Spark Connect server listening at %s (pid %d)", self.url, self.proc.pid)
                return self
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"Spark Connect server not listening on {self.url} after {timeout:.0f} s")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=timeout)
            except ProcessLookupError:
                pass
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> ConnectServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")


def run(args: argparse.Namespace) -> int:
    """Run the server in the foreground until it ends (Ctrl-C stops it)."""
    settings = Settings()
    argv = server_argv(settings, args.host, args.port)
    print(f"Spark Connect server on sc://{args.host}:{args.port} (master {settings.spark_master}); "
          f"point the jobs at it with KEYART_SPARK_REMOTE=sc://{args.host}:{args.port}", file=sys.stderr)
    return subprocess.call(argv, env=server_environ())
