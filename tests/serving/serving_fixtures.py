"""Serving fixtures: test bundles with a real (tiny) LightGBM model converted to ONNX.

The tables come from :mod:`keyart.bench.synthetic`; the model is LightGBM trained on
random float32 rows and converted as models/export does (``zipmap=False``, opset 15,
input ``features``, only the ``probabilities`` output kept).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from keyart import bundle, feature_spec
from keyart.bench import faults, synthetic

REPO = Path(__file__).resolve().parents[2]


def app_client(uri, secret: str, rng=None, **overrides):
    """A TestClient on the endpoint app for the bundle at ``uri`` (None: cold start), its
    event-signing secret ``secret`` unless the overrides set one; no bundle polling."""
    from fastapi.testclient import TestClient

    from keyart.config import Settings
    from keyart.serving.app import create_app

    overrides.setdefault("serve_event_secret", secret)
    return TestClient(create_app(Settings(**overrides), model_uri=str(uri) if uri else None, rng=rng, poll=False))


def served_page(path, req: dict, policy_name: str, secret: str, seed: int = 42, **overrides):
    """POST ``req`` to an app on the bundle at ``path`` under ``policy_name`` (and other settings
    ``overrides``) with a seeded generator; return the answer, the prepared page and its bundle,
    and the policy's probabilities recomputed from the same scores (the generator's first use)."""
    from keyart import policy
    from keyart.serving.schemas import ArtworkRequest

    with app_client(path, secret, rng=np.random.default_rng(seed), policy=policy_name, **overrides) as c:
        got = c.post("/v1/artwork", json=req).json()
        svc = c.app.state.runtime.service
        p = svc.prepare(ArtworkRequest.model_validate(req))
        b = p.bundle
        scores = b.score(svc.features(p))
    rng = np.random.default_rng(seed)
    residual = b.policy.prior_blend == "residual"
    probs = policy.probabilities(b.policy, scores, p.offsets, b.artworks.policy_alpha[p.rows],
                                 b.artworks.policy_beta[p.rows], b.artworks.policy_n[p.rows], rng=rng,
                                 model_mean=b.artworks.model_mean[p.rows] if residual else None)
    return got, p, b, probs, rng


def log_rows(root: Path) -> list[dict]:
    """Every row of the JSON-lines logs under ``root``, checksums verified."""
    import orjson

    from keyart.serving.event_log import read_lines

    rows = []
    for f in sorted(Path(root).rglob("*.jsonl")):
        for payload in read_lines(f):
            assert payload is not None, f"{f}: a line fails its checksum"
            rows.append(orjson.loads(payload))
    return rows


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


# A real ``keyart serve`` subprocess on 127.0.0.1: the one the fault benchmark starts.
Server = faults.Server


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
