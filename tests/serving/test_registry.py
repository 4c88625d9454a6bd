"""The model serving loads: the champion alias in a real (SQLite) MLflow registry (resolve,
download, swap on alias move), the one download cache it shares with keyart.registry, and
the one ONNX scorer it shares with export's parity check."""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import onnxruntime as ort
import pytest
from serving_fixtures import make_bundle

from keyart import bundle, feature_spec, registry, scoring
from keyart.bench import synthetic
from keyart.config import Settings
from keyart.policy import PolicyConfig
from keyart.serving.bundle_store import BundleStore, load_bundle


def register(client, name: str, run_exp: str, bundle_path, alias: str) -> str:
    run = client.create_run(run_exp)
    client.log_artifacts(run.info.run_id, str(bundle_path), artifact_path="bundle")
    client.set_terminated(run.info.run_id)
    mv = client.create_model_version(name, source=f"runs:/{run.info.run_id}/bundle", run_id=run.info.run_id)
    client.set_registered_model_alias(name, alias, mv.version)
    return str(mv.version)


def new_registry(s: Settings):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=s.tracking_uri, registry_uri=s.tracking_uri)
    exp = client.create_experiment(s.mlflow_experiment, artifact_location=s.artifact_root)
    client.create_registered_model(s.registered_model)
    return client, exp


@pytest.mark.mlflow
def test_champion_alias_is_resolved_downloaded_and_followed(tmp_path, _isolated_home, lgbm_model, lgbm_model_b):
    s = Settings()
    db = s.home / "mlflow" / "mlflow.db"
    assert s.tracking_uri == f"sqlite:///{db}"
    (s.home / "mlflow").mkdir(parents=True)
    store = BundleStore(s)
    assert store.uri == registry.champion_uri(s)
    assert store.poll_once() is False and store.current is None  # no registry yet: fallback...
    assert not db.exists()  # ...and no registry created as a side effect
    client, exp = new_registry(s)
    make_bundle(tmp_path / "b1", lgbm_model, "v1")
    make_bundle(tmp_path / "b2", lgbm_model_b, "v2")
    register(client, s.registered_model, exp, tmp_path / "b1", "champion")
    assert store.poll_once() is True and store.current.version == "v1"
    assert store.current.path == registry.bundle_cache_dir(s) / f"{s.registered_model}-v1"
    assert store.current.source == f"models:/{s.registered_model}/1"
    assert store.poll_once() is False  # alias unchanged: nothing reloaded
    register(client, s.registered_model, exp, tmp_path / "b2", "champion")
    assert store.poll_once() is True and store.current.version == "v2"
    assert "lightgbm" not in sys.modules or "keyart.serving" in sys.modules  # serving itself never imports it


@pytest.mark.mlflow
def test_missing_alias_is_no_model_and_registry_errors_keep_serving(tmp_path, _isolated_home, lgbm_model,
                                                                    monkeypatch):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INTERNAL_ERROR

    s = Settings()
    client, exp = new_registry(s)
    events: list[str] = []
    missing = BundleStore(s, f"models:/{s.registered_model}@nosuch", on_event=lambda e, f: events.append(e))
    assert missing.poll_once() is False and missing.current is None
    assert "bundle_resolve_failed" not in events and "fallback_mode" in events

    make_bundle(tmp_path / "b1", lgbm_model, "v1")
    register(client, s.registered_model, exp, tmp_path / "b1", "champion")
    events.clear()
    store = BundleStore(s, on_event=lambda e, f: events.append(e))
    assert store.poll_once() is True

    def unreachable(*args, **kwargs):
        raise MlflowException("registry unreachable", error_code=INTERNAL_ERROR)

    monkeypatch.setattr(registry, "client", unreachable)
    with pytest.raises(MlflowException):
        registry.resolve(store.uri, s)
    assert store.poll_once() is False and store.current.version == "v1"  # keeps serving
    assert events[-1] == "bundle_resolve_failed"


@pytest.mark.mlflow
def test_serving_and_evaluation_share_one_download_cache(tmp_path, _isolated_home, lgbm_model, monkeypatch):
    import mlflow.artifacts

    s = Settings()
    client, exp = new_registry(s)
    make_bundle(tmp_path / "b1", lgbm_model, "v1")
    register(client, s.registered_model, exp, tmp_path / "b1", "champion")
    downloads: list[str] = []
    real = mlflow.artifacts.download_artifacts

    def counting(*args, **kwargs):
        downloads.append(kwargs.get("artifact_uri"))
        return real(*args, **kwargs)

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", counting)
    path = registry.champion_bundle_path(s)  # what offline evaluation values as the champion
    assert downloads == [f"models:/{s.registered_model}/1"]
    assert path == registry.bundle_cache_dir(s) / f"{s.registered_model}-v1"
    store = BundleStore(s)
    assert store.poll_once() is True and store.current.path == path
    assert len(downloads) == 1  # serving reused evaluation's copy
    assert registry.champion_bundle_path(s) == path and len(downloads) == 1

    (path / bundle.PRIORS_FILE).write_bytes(b"damaged")  # a damaged cached copy is downloaded again
    assert registry.champion_bundle_path(s) == path and len(downloads) == 2
    assert bundle.verify(path).version == "v1"
    assert [p.name for p in registry.bundle_cache_dir(s).iterdir()] == [path.name]  # no temporary folders left


@pytest.mark.mlflow
def test_a_cached_copy_of_another_registrys_version_is_downloaded_again(tmp_path, _isolated_home, lgbm_model,
                                                                        lgbm_model_b):
    """A registry created again under the same home (``make demo`` twice, a re-created tracking
    database) numbers its versions from 1 again: the cache must not hand out the old store's
    version 1 for the new one's. Versions keyart registers record their bundle's checksum."""
    first = Settings()
    client, exp = new_registry(first)
    make_bundle(tmp_path / "b1", lgbm_model, "first")
    v = register(client, first.registered_model, exp, tmp_path / "b1", "champion")
    client.set_model_version_tag(first.registered_model, v, registry.TAG_SHA, registry.bundle_checksum(tmp_path / "b1"))
    assert bundle.verify(registry.champion_bundle_path(first)).version == "first"

    # the same home, a new tracking store whose version 1 is another bundle
    second = Settings(mlflow_tracking_uri=f"sqlite:///{tmp_path / 'again.db'}",
                      mlflow_artifact_root=str(tmp_path / "again-artifacts"))
    assert registry.bundle_cache_dir(second) == registry.bundle_cache_dir(first)
    client, exp = new_registry(second)
    make_bundle(tmp_path / "b2", lgbm_model_b, "second")
    v = register(client, second.registered_model, exp, tmp_path / "b2", "champion")
    assert v == "1"
    client.set_model_version_tag(second.registered_model, v, registry.TAG_SHA, registry.bundle_checksum(tmp_path / "b2"))
    path = registry.champion_bundle_path(second)
    assert bundle.verify(path).version == "second"
    store = BundleStore(second)
    assert store.poll_once() is True and store.current.version == "second"  # what the endpoint serves
    assert [p.name for p in registry.bundle_cache_dir(second).iterdir()] == [path.name]  # nothing left aside

    # fetch checks a copy against the checksum resolve read with the version (no second read)
    found = registry.resolve(registry.champion_uri(second), second)
    assert found.checksum == registry.bundle_checksum(tmp_path / "b2")
    assert registry.fetch(found, second) == path
    with pytest.raises(registry.RegistryError, match="not the one the version records"):
        registry.fetch(dataclasses.replace(found, checksum="f" * 64), second)
    assert not path.exists()

    # a version whose artifacts are not the bundle it records is refused, not cached
    client.set_model_version_tag(second.registered_model, v, registry.TAG_SHA, "0" * 64)
    with pytest.raises(registry.RegistryError, match="not the one the version records"):
        registry.download_bundle(v, second)
    assert not path.exists()


@pytest.mark.mlflow
def test_a_running_endpoint_follows_a_registry_created_again_under_the_same_uri(tmp_path, _isolated_home, lgbm_model,
                                                                                lgbm_model_b):
    """While the endpoint runs, its tracking database is replaced by another store's (a backup
    restored with SQLite's backup API) whose version 1 is another bundle. The version number
    alone says nothing changed; the checksum the version records does, so the endpoint loads
    the new bundle."""
    import sqlite3

    s = Settings()
    (s.home / "mlflow").mkdir(parents=True)
    client, exp = new_registry(s)
    make_bundle(tmp_path / "b1", lgbm_model, "first")
    v = register(client, s.registered_model, exp, tmp_path / "b1", "champion")
    client.set_model_version_tag(s.registered_model, v, registry.TAG_SHA, registry.bundle_checksum(tmp_path / "b1"))
    store = BundleStore(s)
    assert store.poll_once() is True and store.current.version == "first"
    assert store.poll_once() is False

    other = Settings(mlflow_tracking_uri=f"sqlite:///{tmp_path / 'again.db'}")
    client, exp = new_registry(other)
    make_bundle(tmp_path / "b2", lgbm_model_b, "second")
    v = register(client, other.registered_model, exp, tmp_path / "b2", "champion")
    assert v == "1"
    client.set_model_version_tag(other.registered_model, v, registry.TAG_SHA, registry.bundle_checksum(tmp_path / "b2"))
    src, dst = sqlite3.connect(tmp_path / "again.db"), sqlite3.connect(s.home / "mlflow" / "mlflow.db")
    src.backup(dst)  # in place, while the endpoint's pooled connections stay open
    src.close(), dst.close()
    assert store.poll_once() is True and store.current.version == "second"
    assert store.current.source == f"models:/{s.registered_model}/1" and store.current.registry_version == "1"
    assert store.poll_once() is False  # nothing changed since: nothing reloaded


def test_export_parity_runs_the_session_serving_runs(tmp_path, monkeypatch):
    import lightgbm as lgb

    from keyart.models import export

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, size=(400, feature_spec.N_FEATURES)).astype(np.float32)
    y = (x[:, 0] + x[:, 20] > 1.0).astype(int)
    booster = lgb.train({"objective": "binary", "num_leaves": 7, "verbose": -1}, lgb.Dataset(x, y),
                        num_boost_round=10)
    model_bytes = export.booster_to_onnx(booster).SerializeToString()

    built: list[scoring.OnnxScorer] = []

    class Recording(scoring.OnnxScorer):
        def __init__(self, model):
            super().__init__(model)
            built.append(self)

    monkeypatch.setattr(export, "OnnxScorer", Recording)
    ones = np.ones(len(x))
    figures = export.parity_check(booster, model_bytes, x, np.arange(0, len(x) + 1, 4), ones, ones,
                                  np.zeros(len(x)), PolicyConfig())
    assert figures["passed"]
    (parity,) = built

    synthetic.write_bundle(tmp_path / "b", model_bytes=model_bytes, version="v1", n_titles=10, n_members=20)
    served = load_bundle(tmp_path / "b", "test", Settings())
    assert type(served.scorer) is scoring.OnnxScorer
    for session in (parity.session, served.scorer.session):
        opts = session.get_session_options()
        assert (opts.intra_op_num_threads, opts.inter_op_num_threads, opts.execution_mode) == \
            (1, 1, ort.ExecutionMode.ORT_SEQUENTIAL)
        assert session.get_providers() == list(scoring.PROVIDERS)
    np.testing.assert_array_equal(parity.predict(x), served.score(x))
