"""Serving fixtures: test bundles with a real (tiny) LightGBM model converted to ONNX.

The tables come from :mod:`keyart.bench.synthetic`; the model is LightGBM trained on
random float32 rows and converted as models/export does (``zipmap=False``, opset 15,
input ``features``, only the ``probabilities`` output kept).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from keyart import bundle, feature_spec
from keyart.bench import synthetic
from keyart.net import free_port

REPO = Path(__file__).resolve().parents[2]


def lightgbm_onnx(seed: int = 0, n_trees: int = 20) -> bytes:
    """A tiny LightGBM classifier on random data, as ONNX with one ``probabilities`` output."""
    import lightgbm as lgb
    import onnxmltools
    from onnxmltools.convert.common.data_types import FloatTensorType

    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, size=(800, feature_spec.N_FEATURES)).astype(np.float32)
    y = (x[:, 0] + x[:, 20] + rng.normal(0, 0.3, len(x)) > 1.0).astype(int)
    model = lgb.LGBMClassifier(n_estimators=n_trees, num_leaves=15, verbose=-1, random_state=seed).fit(x, y)
    onx = onnxmltools.convert_lightgbm(model, initial_types=[(bundle.INPUT_NAME, FloatTensorType([None, feature_spec.N_FEATURES]))],
                                       zipmap=False, target_opset=15)
    keep = [o for o in onx.graph.output if o.name == bundle.OUTPUT_NAME]
    assert keep, [o.name for o in onx.graph.output]
    del onx.graph.output[:]
    onx.graph.output.extend(keep)
    return onx.SerializeToString()


@pytest.fixture(scope="session")
def lgbm_model() -> bytes:
    return lightgbm_onnx(0)


@pytest.fixture(scope="session")
def lgbm_model_b() -> bytes:
    return lightgbm_onnx(1)


def make_bundle(path: Path, model: bytes, version: str, seed: int = 0) -> synthetic.SyntheticWorld:
    """A verified bundle of 30 titles x 8 artworks and 300 members."""
    return synthetic.write_bundle(path, seed=seed, version=version, model_bytes=model,
                                  n_titles=30, per_title=8, n_members=300)


@pytest.fixture()
def bundle_dir(tmp_path: Path, lgbm_model: bytes) -> tuple[Path, synthetic.SyntheticWorld]:
    world = make_bundle(tmp_path / "bundle-v1", lgbm_model, "v1")
    return tmp_path / "bundle-v1", world


def page(world: synthetic.SyntheticWorld, n_titles: int = 5, member: str | None = None,
         explicit: bool = True, per_title: int | None = None) -> dict:
    """A request body for the first ``n_titles`` titles of a synthetic world."""
    titles = []
    for i, tid in enumerate(world.title_ids[:n_titles]):
        slot = {"title_id": tid, "page_row": i // 10, "position": i % 10}
        if explicit:
            slot["candidates"] = world.artworks_of[tid][:per_title]
        titles.append(slot)
    return {"member_id": member or world.member_ids[0],
            "context": {"device": "tv", "country": "US", "local_hour": 20, "day_of_week": 5},
            "titles": titles}


class Server:
    """A real ``keyart serve`` subprocess on 127.0.0.1."""

    def __init__(self, env: dict[str, str], args: list[str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "keyart.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port), *args],
            env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("server did not become ready")

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill9()


@pytest.fixture()
def serve_env(tmp_path: Path, _isolated_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"KEYART_HOME": str(_isolated_home), "KEYART_SERVE_POLL_SECONDS": "0.3",
                "KEYART_SERVE_EVENT_SECRET": "serving-tests-event-secret-" + "0" * 40})
    return env


@pytest.fixture()
def server_factory(serve_env: dict[str, str]) -> Iterator:
    started: list[Server] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Server:
        s = Server(env or serve_env, list(args))
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()
