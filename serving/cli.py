"""``keyart serve``: run the artwork-selection endpoint with uvicorn.

    keyart serve                                  # models:/keyart-artwork@champion
    keyart serve --bundle var/lake/runs/ds=2026-03-01/bundle --port 8080 --workers 2

Every worker is a process with its own ONNX session (one intra-op thread), bundle poller,
online priors and log files. Settings come from keyart.config (``KEYART_SERVE_*``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from keyart import config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--model-uri", help="models:/<name>@<alias>, models:/<name>/<version> or a bundle path "
                                         "(default: serve_model_uri, else the champion alias)")
    src.add_argument("--bundle", help="serve this bundle folder (polled for changes)")
    parser.add_argument("--host", help="bind address (default serve_host)")
    parser.add_argument("--port", type=int, help="port (default serve_port)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    uri = args.bundle or args.model_uri
    if uri and not uri.startswith("models:/"):
        uri = str(Path(uri.removeprefix("file://")).absolute())  # keep symlinks: they are swapped
    if uri:
        # workers are separate processes: hand the choice over through the environment
        os.environ["KEYART_SERVE_MODEL_URI"] = str(uri)
        config.settings.cache_clear()
    s = config.settings()
    uvicorn.run("keyart.serving.app:create_app", factory=True, host=args.host or s.serve_host,
                port=args.port if args.port is not None else s.serve_port, workers=max(1, args.workers),
                loop="uvloop", http="httptools", access_log=False, lifespan="on",
                timeout_graceful_shutdown=10, log_level="info")
    return 0
