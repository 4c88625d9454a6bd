"""A kept champion does not freeze what serving knows (SQLite registry).

Day 1's model becomes champion. On days 2 and 3 the challengers are clearly worse and the
gate keeps day 1's model, yet each day serving gets that model, byte for byte, with the
day's priors, member snapshot and catalog: an artwork launched after day 1 gets an
empirical-Bayes prior, members first seen on day 2 are known, and the endpoint's bundle
store follows the alias to the refreshed bundle.
"""

from __future__ import annotations

import pandas as pd
import pytest
from mlflow_fixtures import Champion, build_run_dir

from keyart import bundle, registry
from keyart.config import Settings
from keyart.models.gate import KEPT, PROMOTED, gate, gate_inputs
from keyart.models.register import register_run
from keyart.serving.bundle_store import BundleStore

pytestmark = pytest.mark.mlflow

DAY1, DAY2, DAY3 = "2026-11-02", "2026-11-03", "2026-11-04"
NEW = "t0001-new"  # launched after the champion's day, within day 2's export horizon


def _prior(bundle_dir, artwork_id: str) -> pd.Series:
    priors = pd.read_parquet(bundle_dir / bundle.PRIORS_FILE)
    rows = priors[(priors["artwork_id"] == artwork_id) & (priors["segment"] == "all")]
    assert len(rows) == 1, artwork_id
    return rows.iloc[0]


def test_a_kept_champion_serves_each_days_tables(_isolated_home):
    s = Settings()
    store = BundleStore(s)  # what the endpoint runs: follows models:/keyart-artwork@champion

    _, day1 = build_run_dir(s.lake, DAY1, seed=1)
    register_run(DAY1, s)
    assert gate(DAY1, s).decision == PROMOTED
    assert store.poll_once() and store.current.version == day1.bundle_version
    assert NEW not in store.current.artworks.index

    # Day 2: a worse challenger; the catalog has an artwork starting on day 3.
    build_run_dir(s.lake, DAY2, seed=2, quality="bad", champion=day1, launches={NEW: DAY3})
    register_run(DAY2, s)
    day2 = gate(DAY2, s)
    assert day2.decision == KEPT and day2.published == day2.champion == "3", day2
    refresh = registry.get_version("3", s)
    assert refresh.tags[registry.TAG_KIND] == registry.KIND_REFRESH
    assert refresh.tags[registry.TAG_MODEL_FROM] == "1" and refresh.tags[registry.TAG_TABLES_DS] == DAY2
    assert registry.get_challenger_version(s) == "2"  # challenger stays on the trained version

    day1_dir, day2_dir = registry.download_bundle("1", s), registry.download_bundle("3", s)
    assert (day2_dir / bundle.MODEL_FILE).read_bytes() == (day1_dir / bundle.MODEL_FILE).read_bytes()
    manifest = bundle.verify(day2_dir)
    assert manifest["kind"] == "table_refresh" and manifest["ds"] == manifest["priors_ds"] == DAY2
    assert manifest["model_origin"]["registry_version"] == "1"
    assert manifest["model_origin"]["ds"] == DAY1 and manifest["model_origin"]["bundle_version"] == day1.bundle_version
    assert manifest["parity"]["probe_rows"] == 16 and manifest["parity"]["probe_max_abs_diff"] <= 1e-5
    assert manifest["row_counts"]["priors_filled"] == 1

    # The new artwork's prior is its title's empirical Bayes, not the flat Beta(1, 9).
    new = _prior(day2_dir, NEW)
    title = pd.read_parquet(day2_dir / bundle.PRIORS_FILE).query("title_id == 't0001' and artwork_id != @NEW")
    title_mean = (title["alpha"] / (title["alpha"] + title["beta"])).mean()
    assert new["alpha"] / (new["alpha"] + new["beta"]) == pytest.approx(title_mean)
    assert new["alpha"] / (new["alpha"] + new["beta"]) < 0.07 and new["n_impressions"] == 0

    # The endpoint follows the alias: day 2's members and the new artwork, day 1's model.
    assert store.poll_once() and store.current.version == f"{day1.bundle_version}+tables.{DAY2}"
    assert store.current.priors_ds == DAY2
    i = store.current.artworks.index[NEW]
    assert store.current.artworks.policy_alpha[i] == pytest.approx(new["alpha"])
    assert store.current.members.get(f"m-{DAY2}") is not store.current.members.unknown

    # Rerunning the gate (a retry) adds nothing and moves nothing.
    assert gate(DAY2, s).recorded_earlier and gate(DAY2, s, force=True).published == "3"
    assert [str(v.version) for v in registry.versions(s)] == ["3", "2", "1"]
    assert store.poll_once() is False

    # Day 3: evaluated against the refreshed champion (the same model: not stale), kept
    # again; the refresh names the trained version, not the refresh it replaces.
    refreshed = Champion(day1.booster, f"{day1.bundle_version}+tables.{DAY2}")  # what evaluate loads
    build_run_dir(s.lake, DAY3, seed=3, quality="bad", champion=refreshed, launches={NEW: DAY3})
    register_run(DAY3, s)
    day3 = gate(DAY3, s)
    assert day3.decision == KEPT and "re-run evaluate" not in day3.reason, day3
    assert day3.champion == "5" and registry.get_version("5", s).tags[registry.TAG_MODEL_FROM] == "1"
    assert bundle.verify(registry.download_bundle("5", s)).version == f"{day1.bundle_version}+tables.{DAY3}"
    assert registry.get_version("5", s).tags["keyart.refreshed_champion"] == "3"
    # the gate pooled day 3's difference with day 2's, both measured against day 1's model
    inputs = gate_inputs("4", s)
    assert inputs.today.heldout_ds == DAY2 and [e.heldout_ds for e in inputs.previous] == [DAY1]
    assert inputs.champion_model == inputs.eval_champion_model == registry.model_identity(
        registry.get_version("1", s).tags)

    # A backfill of day 2 never moves the alias back to older tables.
    assert gate(DAY2, s, force=True).published == "5"
    assert registry.get_champion_version(s) == "5"
    assert store.poll_once() and store.current.priors_ds == DAY3


def test_a_gate_interrupted_before_publishing_publishes_on_its_retry(_isolated_home, monkeypatch):
    from keyart.models import export

    s = Settings()
    _, day1 = build_run_dir(s.lake, DAY1, seed=1)
    register_run(DAY1, s)
    gate(DAY1, s)
    build_run_dir(s.lake, DAY2, seed=2, quality="bad", champion=day1)
    register_run(DAY2, s)

    def lost(*args, **kwargs):
        raise OSError("lake unreachable")

    with monkeypatch.context() as m:
        m.setattr(export, "refresh_bundle", lost)
        with pytest.raises(OSError, match="lake unreachable"):
            gate(DAY2, s)
    tags = registry.get_version("2", s).tags
    assert tags["keyart.gate.decision"] == KEPT and "keyart.gate.published" not in tags
    assert registry.get_champion_version(s) == "1"

    retry = gate(DAY2, s)  # what Airflow's retry runs
    assert retry.recorded_earlier and retry.decision == KEPT and retry.published == "3"
    assert registry.get_champion_version(s) == "3"
    assert registry.get_version("2", s).tags["keyart.gate.published"] == "3"
    assert gate(DAY2, s).published == "3" and [str(v.version) for v in registry.versions(s)] == ["3", "2", "1"]


def test_a_day_whose_export_was_refused_keeps_the_champion_with_the_days_tables(_isolated_home, capsys):
    """The export refused day 2's model (parity): nothing is registered for day 2, the gate
    keeps day 1's model and serving gets it with day 2's tables, the reason on the refresh."""
    import json
    import shutil

    from keyart.cli import main
    from keyart.lake import Lake

    s = Settings()
    store = BundleStore(s)
    _, day1 = build_run_dir(s.lake, DAY1, seed=1)
    register_run(DAY1, s)
    assert gate(DAY1, s).decision == PROMOTED
    run_dir, _ = build_run_dir(s.lake, DAY2, seed=2, champion=day1, launches={NEW: DAY3})
    shutil.rmtree(Lake(s.lake).bundle_dir(DAY2))  # what a refused export leaves: no bundle ...
    (run_dir / bundle.EXPORT_REFUSED_FILE).write_text(json.dumps(  # ... and its record
        {"ds": DAY2, "reason": "ONNX parity failed: max |dp| = 0.002 (limit 1e-05)", "parity": {"passed": False}}))

    assert main(["register", "--ds", DAY2]) == 0
    registered = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert registered["version"] is None and "parity failed" in registered["refused"]
    assert [str(v.version) for v in registry.versions(s)] == ["1"]

    assert main(["gate", "--ds", DAY2]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["version"] is None and result["decision"] == KEPT
    assert "was not exported" in result["reason"] and result["published"] == result["champion"] == "2"
    refresh = registry.get_version("2", s)
    assert refresh.tags[registry.TAG_KIND] == registry.KIND_REFRESH and refresh.tags[registry.TAG_TABLES_DS] == DAY2
    assert refresh.tags[registry.TAG_MODEL_FROM] == "1"
    assert "parity failed" in (refresh.description or "") + json.dumps(dict(refresh.tags))
    assert store.poll_once() and store.current.priors_ds == DAY2 and NEW in store.current.artworks.index

    # the demo report's gate table keeps the day, saying why it has no challenger
    from keyart.demo.report import gate_story

    story = gate_story(s)
    assert [(g["ds"], g["version"], g["decision"], g["champion_after"], g["model_from"]) for g in story] == [
        (DAY1, "1", PROMOTED, "1", "1"), (DAY2, None, KEPT, "2", "1")]
    assert "was not exported" in story[1]["reason"]

    # a rerun (Airflow retry) adds nothing
    assert gate(DAY2, s).published == "2" and [str(v.version) for v in registry.versions(s)] == ["2", "1"]
    # a day with neither a version nor a refusal is still an error
    with pytest.raises(registry.RegistryError, match="no version"):
        gate(DAY3, s)
