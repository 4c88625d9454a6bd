"""Helpers shared by the local servers keyart starts (Spark Connect, serving, MLflow): a free
port to bind, and a polite stop."""

from __future__ import annotations

import signal
import socket
import subprocess


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now, for a server started on this machine.

    The operating system picks it (bind to port 0), so parallel tests and demos do not
    collide on a fixed number. Another process may still take it before the server binds:
    callers start their server promptly and wait for it to answer.
    """
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def stop_process(*procs: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM every process still running, wait up to ``timeout`` s for each, SIGKILL
    (and reap) the ones still there."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=timeout)
