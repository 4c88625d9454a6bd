"""What a reviewer sees: the registered version's page in the MLflow UI (a real ``mlflow
server``, rendered by headless Chromium) shows the gate's decision and reason; artifacts
are stored as ``mlflow-artifacts:/`` locations, so the artifact store can move.

Needs Debian's ``chromium`` (``.ci/run`` installs it).
"""

from __future__ import annotations

import html
import shutil
from pathlib import Path

import pytest
from mlflow_fixtures import build_run_dir, chromium_dom, start_artifact_server, stop_server

from keyart import bundle, registry
from keyart.config import Settings
from keyart.models.gate import gate
from keyart.models.register import STATUS_CHAMPION, register_run

pytestmark = [pytest.mark.mlflow, pytest.mark.integration, pytest.mark.browser]

DAY1 = "2026-11-02"


@pytest.fixture
def served_store(tmp_path: Path, monkeypatch):
    """A SQLite-backed mlflow server that serves artifacts from ``tmp/store-a``; keyart logs
    through it with ``mlflow-artifacts:/keyart``."""
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    server = start_artifact_server(db, tmp_path / "store-a", tmp_path / "server.log")
    monkeypatch.setenv("KEYART_MLFLOW_TRACKING_URI", server.url)
    monkeypatch.setenv("KEYART_MLFLOW_ARTIFACT_ROOT", "mlflow-artifacts:/keyart")
    from keyart import config

    config.settings.cache_clear()
    holder = {"server": server, "db": db}
    yield holder
    stop_server(holder["server"].proc)


def test_version_page_shows_the_decision_and_artifacts_move(served_store, tmp_path: Path) -> None:
    settings = Settings()
    build_run_dir(settings.lake, DAY1, seed=1, rich=True)
    reg = register_run(DAY1, settings)
    result = gate(DAY1, settings)
    assert result.decision == "promoted"

    # Movable artifact locations: the server resolves mlflow-artifacts:/ against its destination.
    client = registry.client(settings)
    run = client.get_run(reg.run_id)
    assert client.get_experiment(run.info.experiment_id).artifact_location == "mlflow-artifacts:/keyart"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/keyart/")
    model = client.get_logged_model(run.outputs.model_outputs[0].model_id)
    assert model.artifact_location.startswith("mlflow-artifacts:/keyart/")
    assert not any("file:" in loc for loc in (run.info.artifact_uri, model.artifact_location))

    # The version page, as a reviewer opens it: the decision and its reason are on it.
    url = f"{served_store['server'].url}/#/models/{settings.registered_model}/versions/{reg.version}"
    shot = tmp_path / "version.png"
    dom = html.unescape(chromium_dom(url, screenshot=shot))
    (tmp_path / "version.html").write_text(dom)
    assert f"Gate decision for ds={DAY1}: promoted, now the champion" in dom, dom[-3000:]
    assert registry.get_version(reg.version, settings).tags["keyart.gate.reason"] == result.reason
    assert f"Reason: {result.reason}" in dom
    assert shot.is_file() and shot.stat().st_size > 10_000

    # Move the artifact store and point a new server at it: everything still downloads.
    stop_server(served_store["server"].proc)
    shutil.move(tmp_path / "store-a", tmp_path / "moved" / "store-b")
    served_store["server"] = start_artifact_server(served_store["db"], tmp_path / "moved" / "store-b",
                                                   tmp_path / "server.log")
    import os

    os.environ["KEYART_MLFLOW_TRACKING_URI"] = served_store["server"].url  # restored by monkeypatch
    from keyart import config

    config.settings.cache_clear()
    moved = Settings()
    shutil.rmtree(registry.bundle_cache_dir(moved), ignore_errors=True)
    champion = registry.get_champion_version(moved)
    assert registry.get_version(champion, moved).tags[registry.TAG_STATUS] == STATUS_CHAMPION
    path = registry.download_bundle(champion, moved)
    assert bundle.verify(path).version
    card = Path(registry.client(moved).download_artifacts(reg.run_id, "model_card.md", str(tmp_path))).read_text()
    assert "## Decision" in card and result.reason in card
