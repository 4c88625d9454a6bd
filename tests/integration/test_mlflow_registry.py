"""MLflow tracking + registry + promotion gate, on SQLite and on an mlflow server over PostgreSQL.

Two training days: day 1 is a good model (no champion yet, so it is promoted), day 2 a
model trained on shuffled labels (clearly worse on the held-out day: the gate keeps day 1's
model and publishes it with day 2's tables as a table refresh). Then a reviewer promotes
day 2 anyway and rolls back.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from mlflow_fixtures import build_run_dir

from keyart import bundle, cli, feature_spec, mlflow_store, registry
from keyart.config import Settings
from keyart.models.gate import KEPT, gate
from keyart.models.promote import promote_version
from keyart.models.register import (
    STATUS_CHAMPION,
    STATUS_FORMER,
    STATUS_NOT_PROMOTED,
    STATUS_ROLLED_BACK,
    register_run,
)
from keyart.models.rollback import rollback_champion

pytestmark = pytest.mark.mlflow

DAY1, DAY2 = "2026-11-02", "2026-11-03"


@pytest.fixture(params=["sqlite", "postgres-server"])
def backend(request, monkeypatch, _isolated_home: Path) -> str:
    """Tracking URI configuration for the test: the sqlite default or a real server."""
    if request.param == "postgres-server":
        uri = request.getfixturevalue("mlflow_server")
        monkeypatch.setenv("KEYART_MLFLOW_TRACKING_URI", uri)
    from keyart import config

    config.settings.cache_clear()
    return request.param


def _artifacts(client: mlflow.MlflowClient, run_id: str, path: str = "") -> set[str]:
    out: set[str] = set()
    for info in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, info.path) if info.is_dir else {info.path}
    return out


def _status(version: str, settings: Settings) -> str:
    return registry.get_version(version, settings).tags[registry.TAG_STATUS]


AIRFLOW_ENV = {"AIRFLOW_CTX_DAG_ID": "keyart_daily", "AIRFLOW_CTX_DAG_RUN_ID": "scheduled__2026-11-03T00:00:00+00:00",
               "AIRFLOW_CTX_TASK_ID": "register", "AIRFLOW_CTX_TRY_NUMBER": "2"}


def test_two_days_gate_promote_rollback(backend: str, _isolated_home: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory (no ./mlruns)
    settings = Settings()
    assert settings.tracking_uri.startswith("http" if backend == "postgres-server" else "sqlite:///")
    lake = settings.lake

    # Day 1: a good model, no champion yet -> promoted. Through the CLI, as the DAG calls it.
    _, day1 = build_run_dir(lake, DAY1, seed=1, rich=True)
    assert cli.main(["register", "--ds", DAY1]) == 0
    assert cli.main(["gate", "--ds", DAY1]) == 0
    assert registry.get_champion_version(settings) == "1"
    assert registry.get_challenger_version(settings) == "1"
    assert _status("1", settings) == STATUS_CHAMPION
    assert registry.get_version("1", settings).description.startswith("**Gate decision for ds=2026-11-02: promoted")

    # Retry / backfill of the same ds: no second version, gate returns its recorded decision.
    again = register_run(DAY1, settings)
    assert (again.version, again.created) == ("1", False)
    assert gate(DAY1, settings).recorded_earlier
    # A retrained bundle for the same day (other bytes) keeps the day's version unless replaced.
    build_run_dir(lake, DAY1, seed=3, rich=True)
    kept = register_run(DAY1, settings)
    assert (kept.version, kept.created) == ("1", False)
    assert [str(v.version) for v in registry.versions(settings)] == ["1"]

    # Day 2: a deliberately worse model, evaluated against day 1's champion -> kept, and the
    # champion's model goes on serving with day 2's tables (version 3, a table refresh).
    build_run_dir(lake, DAY2, seed=2, quality="bad", champion=day1, rich=True)
    for key, value in AIRFLOW_ENV.items():  # as Airflow exports them to a task's environment
        monkeypatch.setenv(key, value)
    reg2 = register_run(DAY2, settings)
    pending = registry.get_version(reg2.version, settings)
    assert "awaiting `keyart gate`" in pending.description and _status(reg2.version, settings) == "registered"
    assert (reg2.version, reg2.created) == ("2", True)
    result = gate(DAY2, settings)
    assert result.decision == KEPT and "hard block" in result.reason, result
    assert result.published == "3" and result.champion == "3"
    assert registry.get_champion_version(settings) == "3"
    assert registry.get_challenger_version(settings) == "2"
    assert [str(v.version) for v in registry.versions(settings)] == ["3", "2", "1"]
    mv3 = registry.get_version("3", settings)
    assert mv3.tags[registry.TAG_KIND] == registry.KIND_REFRESH and mv3.tags[registry.TAG_MODEL_FROM] == "1"
    assert mv3.tags[registry.TAG_TABLES_DS] == DAY2 and mv3.tags[registry.TAG_MODEL_DS] == DAY1
    assert mv3.tags["keyart.promoted_by"] == "gate" and "kept the champion" in mv3.tags["keyart.promotion_reason"]
    assert registry.model_identity(mv3.tags) == registry.model_identity(registry.get_version("1", settings).tags)
    # rerunning the gate (an Airflow retry) and forcing a new decision add nothing
    assert gate(DAY2, settings).recorded_earlier
    forced = gate(DAY2, settings, force=True)
    assert forced.published == "3" and "already serves the tables of 2026-11-03" in forced.publish_note
    assert [str(v.version) for v in registry.versions(settings)] == ["3", "2", "1"]
    assert str(registry.versions_for_ds(DAY2, settings)[0].version) == reg2.version

    client = registry.client(settings)
    mv2 = registry.get_version("2", settings)
    run2 = client.get_run(reg2.run_id)
    params, metrics, tags = run2.data.params, run2.data.metrics, run2.data.tags
    assert params["feature_spec_version"] == feature_spec.FEATURE_SPEC_VERSION
    assert params["lgb.learning_rate"] == "0.1" and params["policy.name"] == "squarecb"
    assert params["data.window_start"] == "2026-10-30" and params["data.heldout_ds"] == "2026-11-02"
    assert params["rows.train"] == "3000"
    for key in ("ope.candidate.snips.lo", "ope.candidate.ips.hi",
                "ope.champion.snips.estimate", "ope.logging.replay.estimate",
                "difference.candidate_minus_champion.snips.lo",
                "ope.random.snips.estimate", "ope.noncontextual.snips.estimate",
                "lift.candidate.snips.estimate", "onnx_parity_error", "train.valid.auc",
                "timing.train.fit_s", "timing.evaluate.ope_s", "timing.register_s", "gate.promoted"):
        assert key in metrics, key
    assert metrics["gate.promoted"] == 0.0
    gate_est = settings.promotion_estimator
    assert gate_est == "dr" and tags["keyart.gate.estimator"] == gate_est
    for est in ("snips", gate_est):  # clearly worse by every estimator; the gate reads its own
        assert metrics[f"difference.candidate_minus_champion.{est}.hi"] < 0.0
    assert metrics["gate.difference_lo"] == metrics[f"difference.candidate_minus_champion.{gate_est}.lo"]
    assert tags["keyart.gate.decision"] == KEPT and "hard block" in tags["keyart.gate.reason"]
    assert tags["keyart.gate.reason"].startswith(f"{gate_est} challenger - champion")
    assert tags["keyart.gate.published"] == "3"
    evidence = json.loads(registry.get_version("2", settings).tags["keyart.gate.evidence"])
    assert evidence["heldout_ds"] == DAY1
    assert evidence["champion_model"] == registry.model_identity(registry.get_version("1", settings).tags)
    # fewer flat metrics: the baselines' bounds, other policies' lifts and row counts stay in the files
    assert not any(k.startswith(("rows.", "parity.", "lift.random", "ope.logging.snips.lo")) for k in metrics)
    assert len(metrics) < 100, len(metrics)
    assert "keyart.report_notes" not in tags  # every plot was drawn
    arts = _artifacts(client, reg2.run_id)
    assert {"model_card.md", "train.json", "evaluation.json", "feature_spec.json", "comparison.json",
            "bundle/manifest.json", "plots/take_rate_by_policy.png", "plots/feature_importance.png",
            "plots/calibration.png", "plots/per_title_lift.png", "plots/artwork_share.png",
            "plots/challenger_vs_champion.png"} <= arts
    run1 = client.get_run(registry.get_version("1", settings).run_id)
    assert "challenger vs champion: no paired difference" in run1.data.tags["keyart.report_notes"]
    # the comparison table: challenger and champion per estimator, the paired difference, -delta
    table = json.loads(Path(client.download_artifacts(reg2.run_id, "comparison.json", str(tmp_path))).read_text())
    col = {c: i for i, c in enumerate(table["columns"])}
    snips = next(r for r in table["data"] if r[col["estimator"]] == "snips")
    # (an MLflow table keeps 10 significant digits)
    assert snips[col["difference_hi"]] == pytest.approx(metrics["difference.candidate_minus_champion.snips.hi"], rel=1e-9)
    assert snips[col["difference_hi"]] < 0
    assert snips[col["champion_estimate"]] == pytest.approx(metrics["ope.champion.snips.estimate"], rel=1e-9)
    assert snips[col["minus_delta"]] == pytest.approx(-0.05 * metrics["ope.champion.snips.estimate"])
    assert {r[col["estimator"]] for r in table["data"] if r[col["gate_reads"]]} == {gate_est}
    # the model card (the run description) opens with the gate's decision, rewritten after it ran
    card = tags["mlflow.note.content"]
    assert card.index("## Decision") < card.index("## Challenger vs champion") < card.index("## Identity")
    assert "**kept**" in card and "hard block" in card and "Pending" not in card
    card_file = Path(client.download_artifacts(reg2.run_id, "model_card.md", str(tmp_path / "card"))).read_text()
    assert card_file.startswith(card[:200]) and "**kept**" in card_file
    # lineage: the data as MLflow datasets, the Airflow task that registered the run
    inputs = {d.dataset.name: {t.key: t.value for t in d.tags} for d in run2.inputs.dataset_inputs}
    assert set(inputs) == {f"training ds={d}" for d in ("2026-10-30", "2026-10-31", "2026-11-01", DAY1)}
    assert inputs[f"training ds={DAY1}"]["mlflow.data.context"] == "heldout"
    assert inputs["training ds=2026-10-30"]["mlflow.data.context"] == "training"
    assert inputs["training ds=2026-10-30"]["keyart.rows"] == "64"
    source = json.loads(next(d.dataset for d in run2.inputs.dataset_inputs if d.dataset.name.endswith(DAY1)).source)
    assert source["uri"] == f"file://{(Path(lake) / 'features/training' / f'ds={DAY1}').resolve()}"
    assert tags["keyart.airflow.run_id"] == AIRFLOW_ENV["AIRFLOW_CTX_DAG_RUN_ID"]
    assert tags["keyart.airflow.dag_id"] == "keyart_daily" and tags["keyart.airflow.try_number"] == "2"
    assert mv2.tags["keyart.airflow.run_id"] == AIRFLOW_ENV["AIRFLOW_CTX_DAG_RUN_ID"]
    assert mv2.tags["keyart.gate.airflow.run_id"] == AIRFLOW_ENV["AIRFLOW_CTX_DAG_RUN_ID"]
    # the decision on the version: description and status; the champion's status follows the alias
    assert mv2.description.startswith(f"**Gate decision for ds={DAY2}: not promoted")
    assert mv2.tags["keyart.gate.reason"] in mv2.description and "Champion after the gate: version 3" in mv2.description
    assert [_status(v, settings) for v in ("1", "2", "3")] == [STATUS_FORMER, STATUS_NOT_PROMOTED, STATUS_CHAMPION]
    assert registry.get_version("3", settings).description.startswith(f"**Table refresh for ds={DAY2}**")
    # artifacts live under the configured root, never under the working directory, and the
    # recorded locations are relative to that root (keyart/mlflow_store.py)
    exp = client.get_experiment(run2.info.experiment_id)
    root = registry.artifact_location(settings)
    assert root == mlflow_store.ROOT_URI
    assert exp.artifact_location == root and run2.info.artifact_uri.startswith(root)
    run2_dir = mlflow_store.to_path(run2.info.artifact_uri)
    assert run2_dir == Path(settings.artifact_root).resolve() / reg2.run_id / "artifacts"
    assert (run2_dir / "model_card.md").is_file()
    if backend == "sqlite":
        default = client.get_experiment("0")
        assert default.artifact_location.startswith(root), default.artifact_location
    assert not (tmp_path / "mlruns").exists()

    # Lineage and gate decision on the version.
    assert mv2.run_id == reg2.run_id and mv2.tags["keyart.source_run"] == reg2.run_id
    assert json.loads(mv2.tags["keyart.data_partitions"]) == {
        "training": ["2026-10-30", "2026-10-31", "2026-11-01"], "heldout": "2026-11-02"}
    assert mv2.tags["keyart.logging_policy"] == '["random"]'
    assert mv2.tags["keyart.eval_champion_bundle"] == day1.bundle_version
    assert mv2.tags["keyart.gate.decision"] == KEPT

    # What serving loads: the champion alias downloads to a complete, verified bundle: day 1's
    # model, byte for byte, with day 2's tables.
    champ_dir = Path(mlflow.artifacts.download_artifacts(f"models:/{settings.registered_model}@champion"))
    refreshed = bundle.verify(champ_dir)
    assert refreshed.version == f"{day1.bundle_version}+tables.{DAY2}"
    assert refreshed["model_origin"]["registry_version"] == "1" and refreshed["priors_ds"] == DAY2
    day1_dir = registry.download_bundle("1", settings)
    assert (champ_dir / bundle.MODEL_FILE).read_bytes() == (day1_dir / bundle.MODEL_FILE).read_bytes()
    assert (champ_dir / bundle.MEMBERS_FILE).read_bytes() != (day1_dir / bundle.MEMBERS_FILE).read_bytes()
    chall_dir = mlflow.artifacts.download_artifacts(f"models:/{settings.registered_model}@challenger")
    assert bundle.verify(Path(chall_dir)).version != day1.bundle_version
    cached = registry.champion_bundle_path(settings)
    assert cached is not None and bundle.verify(cached).version == refreshed.version
    assert cached == registry.bundle_cache_dir(settings) / f"{settings.registered_model}-v3"
    assert registry.resolve(registry.champion_uri(settings), settings).identity == \
        f"models:/{settings.registered_model}/3"
    info = mlflow.models.get_model_info(f"models:/{settings.registered_model}/1")
    assert "onnx" in info.flavors
    assert info.signature.inputs.input_names() == [bundle.INPUT_NAME]
    assert info.saved_input_example_info is not None

    # Reviewer override, then rollback restores the previous champion (day 1's model with
    # day 2's tables); a further rollback would only reach the same model with older tables.
    assert promote_version("2", reason="online A/B favours it", by="reviewer", settings=settings) == "3"
    assert registry.get_champion_version(settings) == "2"
    assert registry.get_version("2", settings).tags["keyart.promoted_by"] == "reviewer"
    assert [_status(v, settings) for v in ("2", "3")] == [STATUS_CHAMPION, STATUS_FORMER]
    assert "Promoted to champion by reviewer" in registry.get_version("2", settings).description
    assert cli.main(["rollback", "--reason", "take rate dropped", "--by", "oncall"]) == 0
    assert registry.get_champion_version(settings) == "3"
    assert registry.get_version("2", settings).tags["keyart.rollback_reason"] == "take rate dropped"
    assert client.get_run(reg2.run_id).data.tags["keyart.override.rolled_back_by"] == "oncall"
    assert [_status(v, settings) for v in ("2", "3")] == [STATUS_ROLLED_BACK, STATUS_CHAMPION]
    with pytest.raises(registry.RegistryError, match="nothing to roll back"):
        rollback_champion("again", by="oncall", settings=settings)
    assert cli.main(["promote", "2", "--reason", "retry"]) == 0
    assert registry.champion_history(settings) == ["1", "3", "2"]

