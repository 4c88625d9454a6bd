"""The champion alias in a real (SQLite) MLflow registry: resolve, download, swap on alias move."""

from __future__ import annotations

import sys

import pytest
from serving_fixtures import make_bundle

from keyart.config import load_settings
from keyart.serving.bundle_store import BundleStore

pytestmark = pytest.mark.mlflow


def register(client, name: str, run_exp: str, bundle_path, alias: str) -> str:
    run = client.create_run(run_exp)
    client.log_artifacts(run.info.run_id, str(bundle_path), artifact_path="bundle")
    client.set_terminated(run.info.run_id)
    mv = client.create_model_version(name, source=f"runs:/{run.info.run_id}/bundle", run_id=run.info.run_id)
    client.set_registered_model_alias(name, alias, mv.version)
    return str(mv.version)


def test_champion_alias_is_resolved_downloaded_and_followed(tmp_path, _isolated_home, lgbm_model, lgbm_model_b):
    from mlflow import MlflowClient

    s = load_settings()
    (s.home / "mlflow").mkdir(parents=True)
    store = BundleStore(s)
    assert store.poll_once() is False and store.current is None  # no registry yet: fallback, no side effect
    client = MlflowClient(tracking_uri=s.tracking_uri, registry_uri=s.tracking_uri)
    exp = client.create_experiment(s.mlflow_experiment, artifact_location=s.artifact_root)
    client.create_registered_model(s.registered_model)
    make_bundle(tmp_path / "b1", lgbm_model, "v1")
    make_bundle(tmp_path / "b2", lgbm_model_b, "v2")
    register(client, s.registered_model, exp, tmp_path / "b1", "champion")
    assert store.poll_once() is True and store.current.version == "v1"
    assert (s.home / "serving-cache" / f"{s.registered_model}-v1").is_dir()
    assert store.poll_once() is False  # alias unchanged: nothing reloaded
    register(client, s.registered_model, exp, tmp_path / "b2", "champion")
    assert store.poll_once() is True and store.current.version == "v2"
    assert "lightgbm" not in sys.modules or "keyart.serving" in sys.modules  # serving itself never imports it
