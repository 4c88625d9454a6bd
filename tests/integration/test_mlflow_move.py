"""The default local MLflow store moves with keyart's home.

keyart's experiment on a local artifact root has the location ``keyart-artifacts:/``
(keyart/mlflow_store.py), so runs, logged models and registered versions record locations
relative to the artifact root. A home registered in one folder and moved whole to another
keeps working: through the MLflow client (runs' artifacts, ``models:/…@champion``), through
the gate (its table refresh downloads the champion from the moved store), and through an
``mlflow server`` started as ``make mlflow-ui`` starts it (what the UI requests). An
experiment created before, with an absolute ``file://`` location, keeps it and still works.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.parse
import urllib.request
from pathlib import Path

import mlflow
import pytest
from mlflow.entities import ViewType
from mlflow_fixtures import build_run_dir, chromium_dom, start_mlflow_server, stop_server

from keyart import bundle, cli, config, mlflow_store, registry
from keyart.config import Settings
from keyart.models.gate import KEPT, gate
from keyart.models.register import register_run

pytestmark = [pytest.mark.mlflow, pytest.mark.integration]

DAY1, DAY2 = "2026-11-02", "2026-11-03"


def _use_home(monkeypatch, home: Path) -> Settings:
    monkeypatch.setenv("KEYART_HOME", str(home))
    config.settings.cache_clear()
    return Settings()


def _locations(settings: Settings) -> dict[str, str]:
    """Every artifact location the store records: experiments (the Default one too), runs,
    logged models, and the registered versions' source and download URI."""
    client = registry.client(settings)
    exps = client.search_experiments(view_type=ViewType.ALL)
    ids = [e.experiment_id for e in exps]
    out = {f"experiment {e.name}": e.artifact_location for e in exps}
    out |= {f"run {r.info.run_name}": r.info.artifact_uri
            for r in client.search_runs(ids, run_view_type=ViewType.ALL)}
    out |= {f"logged model {m.model_id}": m.artifact_location for m in client.search_logged_models(ids)}
    for mv in registry.versions(settings):
        out[f"version {mv.version} source"] = mv.source
        out[f"version {mv.version} download"] = client.get_model_version_download_uri(mv.name, mv.version)
    return out


def _artifacts(client: mlflow.MlflowClient, run_id: str, path: str = "") -> set[str]:
    out: set[str] = set()
    for info in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, info.path) if info.is_dir else {info.path}
    return out


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as resp:
        assert resp.status == 200, url
        return resp.read()


@pytest.mark.browser
def test_moved_home_keeps_runs_models_and_versions(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    old_home = tmp_path / "before" / "var"
    settings = _use_home(monkeypatch, old_home)

    # Day 1 in the old home, through the commands the DAG runs: promoted (the first champion).
    _, day1 = build_run_dir(settings.lake, DAY1, seed=1, rich=True)
    assert cli.main(["register", "--ds", DAY1]) == 0
    assert cli.main(["gate", "--ds", DAY1]) == 0
    assert registry.get_champion_version(settings) == "1"
    before = _locations(settings)
    assert {"experiment keyart", "experiment Default", f"run ds={DAY1}", "version 1 download"} <= set(before)
    assert before["experiment keyart"] == mlflow_store.ROOT_URI
    assert before["experiment Default"] == f"{mlflow_store.ROOT_URI}0"
    for what, loc in before.items():
        assert loc.startswith((mlflow_store.ROOT_URI, "models:/m-")), (what, loc)
    run1_id = registry.get_version("1", settings).run_id
    assert mlflow_store.to_path(before[f"run ds={DAY1}"]) == \
        old_home / "mlflow" / "artifacts" / run1_id / "artifacts"
    card_before = (old_home / "mlflow" / "artifacts" / run1_id / "artifacts" / "model_card.md").read_text()

    # Move the whole folder; nothing is left at the old path.
    shutil.move(tmp_path / "before", tmp_path / "after")
    new_home = tmp_path / "after" / "var"
    assert not old_home.exists()
    moved = _use_home(monkeypatch, new_home)
    shutil.rmtree(registry.bundle_cache_dir(moved), ignore_errors=True)  # bundles below come from the store

    # The run's artifacts, the champion, and the logged model, through the MLflow client.
    client = registry.client(moved)
    run1 = client.get_run(run1_id)
    assert {"model_card.md", "train.json", "bundle/manifest.json", "plots/calibration.png"} <= \
        _artifacts(client, run1_id)
    card = Path(client.download_artifacts(run1_id, "model_card.md", str(tmp_path))).read_text()
    assert card == card_before and "**promoted**" in card
    champ = Path(mlflow.artifacts.download_artifacts(f"models:/{moved.registered_model}@champion",
                                                     dst_path=str(tmp_path / "champ1")))
    assert bundle.verify(champ).version == day1.bundle_version
    model_id = run1.outputs.model_outputs[0].model_id
    assert "onnx" in mlflow.models.get_model_info(f"models:/{model_id}").flavors

    # Day 2 in the moved home: a worse model, kept; the gate's table refresh downloads the
    # champion's bundle from the moved store and registers a new version next to it.
    build_run_dir(moved.lake, DAY2, seed=2, quality="bad", champion=day1, rich=True)
    reg2 = register_run(DAY2, moved)
    result = gate(DAY2, moved)
    assert result.decision == KEPT and result.published == "3", result
    champ = Path(mlflow.artifacts.download_artifacts(f"models:/{moved.registered_model}@champion",
                                                     dst_path=str(tmp_path / "champ3")))
    refreshed = bundle.verify(champ)
    assert refreshed["model_origin"]["registry_version"] == "1" and refreshed["priors_ds"] == DAY2
    assert (champ / bundle.MODEL_FILE).read_bytes() == (registry.download_bundle("1", moved) / bundle.MODEL_FILE).read_bytes()

    # No recorded location names a folder: neither the old home nor the new one.
    after = _locations(moved)
    assert {f"run ds={DAY2}", "version 3 download"} <= set(after)
    for what, loc in after.items():
        assert str(tmp_path) not in loc and "file:" not in loc, (what, loc)
    assert mlflow_store.to_path(client.get_run(reg2.run_id).info.artifact_uri).is_dir()

    # `make mlflow-ui`'s server on the moved store (KEYART_HOME in its environment): what the
    # UI requests for a run's artifacts, a logged model's files and a version's model.
    server = start_mlflow_server(["--backend-store-uri", moved.tracking_uri,
                                  "--default-artifact-root", str(new_home / "mlflow" / "artifacts")],
                                 tmp_path / "ui.log", cwd=tmp_path / "after" / "var" / "mlflow", timeout_s=300)
    try:
        api = f"{server.url}/ajax-api/2.0/mlflow"
        listing = json.loads(_get(f"{api}/artifacts/list?run_id={run1_id}"))
        assert {"model_card.md", "plots", "train.json"} <= {f["path"] for f in listing["files"]}
        assert _get(f"{server.url}/get-artifact?path=model_card.md&run_uuid={run1_id}").decode() == card
        files = json.loads(_get(f"{api}/logged-models/{model_id}/artifacts/directories"))["files"]
        assert {"MLmodel", "model.onnx", "manifest.json"} <= {f["path"] for f in files}
        name = urllib.parse.quote(moved.registered_model)
        mlmodel = _get(f"{server.url}/model-versions/get-artifact?name={name}&version=3&path=MLmodel").decode()
        assert "onnx" in mlmodel
        # and the run's artifact view as a browser renders it
        exp_id = run1.info.experiment_id
        dom = chromium_dom(f"{server.url}/#/experiments/{exp_id}/runs/{run1_id}/artifacts")
        assert "model_card.md" in dom and "train.json" in dom, dom[-3000:]
    finally:
        stop_server(server.proc)


def test_an_experiment_with_an_absolute_location_keeps_it(tmp_path: Path, monkeypatch) -> None:
    """A store made before locations were relative: keyart uses its experiment as it is."""
    monkeypatch.chdir(tmp_path)
    settings = _use_home(monkeypatch, tmp_path / "var")
    root = (tmp_path / "var" / "mlflow" / "artifacts").resolve()
    root.mkdir(parents=True)
    registry.client(settings).create_experiment(settings.mlflow_experiment, artifact_location=root.as_uri())

    _, day1 = build_run_dir(settings.lake, DAY1, seed=1)
    reg = register_run(DAY1, settings)
    assert gate(DAY1, settings).decision == "promoted"
    run = registry.client(settings).get_run(reg.run_id)
    assert run.info.artifact_uri == f"{root.as_uri()}/{reg.run_id}/artifacts"
    path = mlflow.artifacts.download_artifacts(f"models:/{settings.registered_model}@champion",
                                               dst_path=str(tmp_path / "champ"))
    assert bundle.verify(Path(path)).version == day1.bundle_version


@pytest.mark.parametrize("uri", ["keyart-artifacts:/../outside", "keyart-artifacts:/1/../../x",
                                 "keyart-artifacts://host/1", "file:///tmp/x"])
def test_a_location_cannot_leave_the_artifact_root(uri: str, tmp_path: Path) -> None:
    with pytest.raises(mlflow.exceptions.MlflowException, match="artifact"):
        mlflow_store.to_path(uri, tmp_path)


def test_the_scheme_registers_whatever_is_imported_first(tmp_path: Path) -> None:
    """MLflow loads the plugin while importing its artifact store: importing keyart's module
    first must not leave the scheme unregistered (a circular import warns and drops it)."""
    import subprocess
    import sys

    code = ("import keyart.mlflow_store\n"
            "from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository\n"
            "print(get_artifact_repository('keyart-artifacts:/1/r/artifacts').artifact_dir)\n")
    done = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    home = Path(os.environ["KEYART_HOME"])
    assert done.stdout.strip() == str(home.resolve() / "mlflow" / "artifacts" / "1" / "r" / "artifacts")
