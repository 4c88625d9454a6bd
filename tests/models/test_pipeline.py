"""train -> evaluate -> export on the synthetic lake: run outputs, parity, bundle checks."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from keyart import bundle
from keyart.feature_spec import N_FEATURES
from keyart.lake import heldout_day, labelled_days, shift_ds, training_days
from keyart.models import export as export_mod
from keyart.models.evaluate import evaluate_run
from keyart.models.export import (
    ParityError,
    booster_to_onnx,
    export_bundle,
    parity_check,
    parity_sample,
)
from keyart.policy import PolicyConfig
from keyart.scoring import OnnxScorer

FIRST = "2026-03-01"


@pytest.fixture
def run(trained_run, tmp_path):
    """A private copy of the trained lake (tests may publish or corrupt bundles)."""
    lake_src, ds = trained_run
    shutil.copytree(lake_src.root, tmp_path / "lake")
    from keyart.lake import Lake

    return Lake(tmp_path / "lake"), ds


def test_window_excludes_the_heldout_day(lake_template):
    last = shift_ds(FIRST, 3)
    assert labelled_days(lake_template, last) == [shift_ds(FIRST, i) for i in range(4)]
    assert heldout_day(lake_template, last) == last
    assert heldout_day(lake_template, "2030-01-01") == last
    assert training_days(lake_template, last, 7) == [shift_ds(FIRST, i) for i in range(3)]
    assert training_days(lake_template, last, 1) == [shift_ds(FIRST, 2)]
    with pytest.raises(FileNotFoundError, match="no training partitions"):
        heldout_day(lake_template, "2020-01-01")
    with pytest.raises(ValueError, match="window_days must be >= 1"):
        training_days(lake_template, last, 0)


def test_train_writes_model_and_train_json(run):
    lake, ds = run
    info = json.loads((lake.run_dir(ds) / "train.json").read_text())
    assert (lake.run_dir(ds) / "model.txt").is_file()
    assert info["heldout_ds"] == ds and ds not in info["window"]["days"]
    assert info["metrics"]["valid"]["auc"] > 0.65
    assert info["rows"]["train"] + info["rows"]["valid"] == 3 * 1500


def test_evaluate_values_every_policy(run):
    lake, ds = run
    out = evaluate_run(lake, ds, PolicyConfig(), n_boot=50)
    saved = json.loads((lake.run_dir(ds) / "evaluation.json").read_text())
    assert saved["policies"].keys() == {"candidate", "logging", "random", "noncontextual"}
    assert saved["champion"]["source"] in ("no registry module", "no champion registered") \
        or saved["champion"]["source"].startswith("registry lookup failed")
    for policy, by_est in out["policies"].items():
        assert by_est.keys() == {"replay", "ips", "snips", "dr"}, policy
        for iv in by_est.values():
            assert iv["lo"] <= iv["estimate"] <= iv["hi"] or policy == "candidate"
    # the logs are uniform, so "random" under IPS is exactly the on-policy mean
    assert out["policies"]["random"]["ips"]["estimate"] == pytest.approx(out["policies"]["logging"]["ips"]["estimate"])
    assert out["lift"]["candidate"]["dr"]["lo"] > 0  # the model beats uniform logging
    assert out["n_impressions"] == 1500


def test_export_publishes_a_verified_bundle_with_parity(run):
    lake, ds = run
    manifest = export_bundle(lake, ds, PolicyConfig(prior_blend="mix"))  # the loop below re-exports residual
    bdir = lake.bundle_dir(ds)
    assert bundle.verify(bdir).version == manifest.version
    parity = manifest["parity"]
    assert parity["passed"] and parity["max_abs_diff"] <= 1e-5 and parity["greedy_agreement"] == 1.0
    assert manifest["training_window"]["days"] == [shift_ds(FIRST, i) for i in range(3)]
    model = onnx.load(bdir / "model.onnx")
    assert [i.name for i in model.graph.input] == ["features"]
    assert [o.name for o in model.graph.output] == ["probabilities"]
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[1].dim_value == N_FEATURES
    scorer = OnnxScorer(bdir)
    proba = scorer.predict_proba(np.random.default_rng(0).random((7, N_FEATURES)))
    assert proba.shape == (7, 2) and proba.dtype == np.float32
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-6)
    import pandas as pd

    arts = pd.read_parquet(bdir / "artworks.parquet")
    assert "title_genres" in arts.columns
    assert not arts["artwork_id"].str.endswith("-a4").any()  # expired artworks are left out
    assert not list(lake.run_dir(ds).glob(".bundle-*"))

    # the residual blend's model means: the ONNX model's mean score per artwork over the
    # held-out day's candidate rows, on the segment-'all' rows
    priors = pd.read_parquet(bdir / "priors.parquet")
    X, _, rows = parity_sample(lake, ds, 10**9)
    want = pd.Series(scorer.predict(X).astype(np.float64)).groupby(rows["artwork_id"].to_numpy()).mean()
    is_all = priors["segment"] == "all"
    got = priors[is_all].set_index("artwork_id")["model_mean"]
    shown = got.index.intersection(want.index)
    assert len(shown) == len(want) > 0
    np.testing.assert_allclose(got[shown].to_numpy(), want[shown].to_numpy(), rtol=1e-12)
    assert priors.loc[~is_all, "model_mean"].isna().all()
    assert got.drop(shown).isna().all()  # artworks the day did not show: unknown
    assert manifest["row_counts"]["model_means"] == len(want)

    # champion = the bundle just exported: it must value exactly like the candidate, under either blend
    for cfg in (PolicyConfig(prior_blend="mix"), PolicyConfig(prior_blend="residual")):
        if cfg.prior_blend == "residual":
            manifest = export_bundle(lake, ds, cfg)
            assert manifest["policy"]["prior_blend"] == "residual"
        out = evaluate_run(lake, ds, cfg, champion_bundle=bdir, n_boot=20)
        assert out["champion"]["bundle_version"] == manifest.version
        for est in ("ips", "snips", "dr"):
            assert out["policies"]["champion"][est]["estimate"] == pytest.approx(
                out["policies"]["candidate"][est]["estimate"], abs=1e-5)


@pytest.mark.parametrize("damage", ["flip_byte", "delete_file", "spec_version", "bad_manifest"])
def test_a_corrupt_bundle_is_refused(run, damage):
    lake, ds = run
    export_bundle(lake, ds, PolicyConfig())
    bdir = lake.bundle_dir(ds)
    if damage == "flip_byte":
        data = bytearray((bdir / "model.onnx").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (bdir / "model.onnx").write_bytes(bytes(data))
        match = "does not match its checksum"
    elif damage == "delete_file":
        (bdir / "priors.parquet").unlink()
        match = "missing priors.parquet"
    elif damage == "spec_version":
        m = json.loads((bdir / "manifest.json").read_text())
        m["feature_spec_version"] = "999"
        (bdir / "manifest.json").write_text(json.dumps(m))
        match = "built for feature spec 999"
    else:
        (bdir / "manifest.json").write_text("{not json")
        match = "not valid JSON"
    with pytest.raises(bundle.BundleError, match=match):
        bundle.verify(bdir)


def test_parity_failure_publishes_nothing(run, monkeypatch):
    lake, ds = run
    real = OnnxScorer.predict

    def skewed(self, X):
        return real(self, X) + 1e-3

    monkeypatch.setattr(export_mod.OnnxScorer, "predict", skewed)
    with pytest.raises(ParityError, match="parity failed"):
        export_bundle(lake, ds, PolicyConfig())
    assert not lake.bundle_dir(ds).exists()
    assert not list(lake.run_dir(ds).glob(".bundle-*"))
    refusal = bundle.read_export_refusal(lake.run_dir(ds))
    assert refusal["ds"] == ds and "parity failed" in refusal["reason"]
    assert refusal["parity"]["passed"] is False and refusal["parity"]["max_abs_diff"] > 1e-5


def test_a_refused_export_exits_3_and_the_daily_task_goes_on_with_the_refusal(run, monkeypatch):
    from keyart import config, pipeline
    from keyart.cli import main

    lake, ds = run
    monkeypatch.setenv("KEYART_LAKE_ROOT", str(lake.root))
    config.settings.cache_clear()
    real = OnnxScorer.predict
    with monkeypatch.context() as m:
        m.setattr(export_mod.OnnxScorer, "predict", lambda self, X: real(self, X) + 1e-3)
        assert main(["export", "--ds", ds]) == bundle.EXIT_EXPORT_REFUSED
        value = pipeline.run_model_step("export", ds)
    assert "parity failed" in value["refused"]
    # the model exported by a later attempt clears the record
    assert main(["export", "--ds", ds]) == 0
    assert bundle.read_export_refusal(lake.run_dir(ds)) is None and lake.bundle_dir(ds).is_dir()
    # any other failure still fails the task
    (lake.run_dir(ds) / "model.txt").write_text("not a model")
    import lightgbm as lgb

    with pytest.raises(lgb.basic.LightGBMError):
        pipeline.run_model_step("export", ds)
    config.settings.cache_clear()


def test_parity_check_fails_beyond_its_tolerance(run):
    import lightgbm as lgb

    lake, ds = run
    booster = lgb.Booster(model_file=str(lake.run_dir(ds) / "model.txt"))
    model = booster_to_onnx(booster).SerializeToString()
    X, offsets, rows = export_mod.parity_sample(lake, ds, 200)
    prior = (rows["prior_alpha"].to_numpy(), rows["prior_beta"].to_numpy(), rows["prior_n"].to_numpy())
    ok = parity_check(booster, model, X, offsets, *prior, PolicyConfig())
    assert ok["passed"] and ok["impressions"] == 200
    with pytest.raises(ParityError, match="max"):
        parity_check(booster, model, X, offsets, *prior, PolicyConfig(), max_abs_diff=0.0 - 1e-12)


def test_cold_start_trains_early_part_and_evaluates_late_part_of_the_first_day(lake_template, tmp_path):
    from keyart.lake import Lake
    from keyart.models.data import read_training, time_split_rows
    from keyart.models.train import train_run

    shutil.copytree(lake_template.root, tmp_path / "lake")
    lake = Lake(tmp_path / "lake")
    assert training_days(lake, FIRST, 7) == [FIRST]  # nothing before the first labelled day
    table = read_training(lake, [FIRST], columns=["event_id", "ts"])
    early, late = time_split_rows(table, "train"), time_split_rows(table, "heldout")
    assert early.num_rows + late.num_rows == table.num_rows
    assert not set(early.column("event_id").to_pylist()) & set(late.column("event_id").to_pylist())
    assert max(early.column("ts").to_pylist()) <= min(late.column("ts").to_pylist())
    with pytest.raises(ValueError, match="train"):
        time_split_rows(table, "both")

    info = train_run(lake, FIRST, 7)
    assert info["cold_start_split"] is True and info["window"]["days"] == [FIRST]
    out = evaluate_run(lake, FIRST, PolicyConfig(), n_boot=20)
    assert out["heldout_part"] == "late"
    assert out["n_impressions"] == late.group_by("event_id").aggregate([]).num_rows


def test_retraining_and_reexporting_a_day_gives_the_same_model_bytes(lake_template, tmp_path):
    from keyart.lake import Lake
    from keyart.models.train import train_run

    shutil.copytree(lake_template.root, tmp_path / "lake")
    lake = Lake(tmp_path / "lake")
    ds = shift_ds(FIRST, 3)
    digests = set()
    for _ in range(2):
        train_run(lake, ds, 7)
        export_bundle(lake, ds, PolicyConfig())
        digests.add(bundle.read_manifest(lake.bundle_dir(ds))["files"]["model.onnx"])
    assert len(digests) == 1
