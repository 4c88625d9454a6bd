"""Network helpers shared by the local servers keyart starts (Spark Connect, serving, MLflow)."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now, for a server started on this machine.

    The operating system picks it (bind to port 0), so parallel tests and demos do not
    collide on a fixed number. Another process may still take it before the server binds:
    callers start their server promptly and wait for it to answer.
    """
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
