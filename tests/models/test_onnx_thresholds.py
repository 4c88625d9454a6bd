"""The ONNX export routes float32 rows down the same branches as LightGBM, on the thresholds too.

The tree ensemble in ONNX compares float32 features with float32 thresholds; LightGBM keeps
double thresholds. A threshold whose nearest float32 lies above it sends a feature equal to
that float32 left in ONNX and right in LightGBM. These tests build a booster with such a
split and check the export, the threshold rewrite and the parity check's boundary rows.
"""

from __future__ import annotations

import lightgbm as lgb
import numpy as np
import onnxmltools
import pytest
from onnxmltools.convert.common.data_types import FloatTensorType

from keyart import bundle
from keyart.feature_spec import N_FEATURES
from keyart.models import export
from keyart.policy import PolicyConfig
from keyart.scoring import OnnxScorer

# two adjacent float32 values whose midpoint (a double) rounds *up* to the upper one:
# a has an odd mantissa, so the tie goes to b, which is even
A = np.nextafter(np.float32(1.0), np.float32(2.0))
B = np.nextafter(A, np.float32(2.0))


@pytest.fixture(scope="module")
def edge_booster() -> tuple[lgb.Booster, np.ndarray]:
    """A booster whose first split separates A from B on feature 0 (label = feature 0 is B)."""
    rng = np.random.default_rng(7)
    n = 4000
    X = rng.random((n, N_FEATURES)).astype(np.float32)
    upper = rng.random(n) < 0.5
    X[:, 0] = np.where(upper, B, A)
    y = (upper ^ (rng.random(n) < 0.1)).astype(np.float64)
    booster = lgb.train({"objective": "binary", "verbose": -1, "num_leaves": 4, "min_data_in_leaf": 20,
                         "seed": 1, "deterministic": True, "num_threads": 1},
                        lgb.Dataset(X, y), num_boost_round=5)
    return booster, X


def test_the_edge_booster_has_a_threshold_whose_nearest_float32_lies_above_it(edge_booster):
    booster, _ = edge_booster
    feats, thrs = export.split_thresholds(booster)
    t = thrs[feats == 0]
    assert len(t) and np.all((A < t) & (t < B))
    assert np.all(t.astype(np.float32) == B)  # rounded to nearest, the threshold becomes B


def test_float32_floor_is_the_largest_float32_at_or_below():
    rng = np.random.default_rng(0)
    t = np.concatenate([rng.normal(0, 10, 5000), rng.random(5000), [0.0, -0.0, 1e-35, 1.0, float(A) + 1e-12,
                                                                     (float(A) + float(B)) / 2, 3.4e38, 1e300, -1e300]])
    f = export._float32_floor(t)
    assert np.all(f.astype(np.float32).astype(np.float64) == f)  # float32-exact
    assert np.all(f <= t)
    finite = np.isfinite(f)
    with np.errstate(over="ignore"):  # the largest float32's next is inf
        above = np.nextafter(f[finite].astype(np.float32), np.float32(np.inf)).astype(np.float64)
    assert np.all(above > t[finite])  # and the next float32 up is above t


def test_the_rewritten_booster_scores_every_float32_row_as_the_original(edge_booster):
    booster, X = edge_booster
    rewritten, moved = export.float32_thresholds(booster)
    assert moved > 0
    _, thrs = export.split_thresholds(rewritten)
    assert np.all(thrs.astype(np.float32).astype(np.float64) == thrs)
    rows = np.concatenate([X[:500], export.boundary_rows(booster, X)])
    np.testing.assert_array_equal(rewritten.predict(rows), booster.predict(rows))


def test_a_booster_with_float32_thresholds_is_returned_as_is(edge_booster):
    booster, _ = edge_booster
    rewritten, _ = export.float32_thresholds(booster)
    again, moved = export.float32_thresholds(rewritten)
    assert moved == 0 and again is rewritten


def test_the_export_agrees_with_lightgbm_on_the_threshold_where_plain_conversion_does_not(edge_booster):
    booster, X = edge_booster
    on_edge = X[:50].copy()
    on_edge[:, 0] = B
    native = booster.predict(on_edge)
    plain = onnxmltools.convert_lightgbm(booster, initial_types=[(bundle.INPUT_NAME, FloatTensorType([None, N_FEATURES]))],
                                         zipmap=False, target_opset=export.TARGET_OPSET)
    import onnxruntime

    assert bundle.OUTPUT_NAME in {o.name for o in plain.graph.output}
    sess = onnxruntime.InferenceSession(plain.SerializeToString(), providers=["CPUExecutionProvider"])
    plain_p = sess.run([bundle.OUTPUT_NAME], {bundle.INPUT_NAME: on_edge})[0][:, 1]
    assert np.max(np.abs(plain_p - native)) > 1e-2  # the converter alone routes B the other way
    exported = OnnxScorer(export.booster_to_onnx(booster).SerializeToString()).predict(on_edge)
    assert np.max(np.abs(exported.astype(np.float64) - native)) <= export.MAX_ABS_DIFF


def test_parity_check_scores_the_split_thresholds_and_refuses_a_model_that_parts_there(edge_booster):
    booster, X = edge_booster
    sample = X[:40].copy()
    sample[:, 0] = A  # the sample itself never sits on the threshold's float32
    offsets = np.arange(0, len(sample) + 1, 4)
    ones = np.ones(len(sample))
    good = export.booster_to_onnx(booster).SerializeToString()
    figures = export.parity_check(booster, good, sample, offsets, ones, ones, ones, PolicyConfig())
    assert figures["passed"] and figures["boundary_rows"] >= 3 and figures["boundary_max_abs_diff"] <= export.MAX_ABS_DIFF
    plain = onnxmltools.convert_lightgbm(booster, initial_types=[(bundle.INPUT_NAME, FloatTensorType([None, N_FEATURES]))],
                                         zipmap=False, target_opset=export.TARGET_OPSET)
    with pytest.raises(export.ParityError, match="split-threshold rows"):
        export.parity_check(booster, plain.SerializeToString(), sample, offsets, ones, ones, ones, PolicyConfig())


def test_splits_between_zero_and_non_zero_are_probed_as_lightgbm_reads_them():
    """LightGBM splits zero from non-zero at +-1e-35 and reads any |x| <= 1e-35 as 0: the
    boundary rows use 0.0 there, so a faithful export passes and the rows still tell zero
    from the smallest values beyond it."""
    rng = np.random.default_rng(3)
    n = 4000
    X = rng.random((n, N_FEATURES)).astype(np.float32)
    X[:, 1] = np.where(rng.random(n) < 0.5, 0.0, -rng.random(n)).astype(np.float32)
    y = ((X[:, 1] == 0) ^ (rng.random(n) < 0.1)).astype(np.float64)
    booster = lgb.train({"objective": "binary", "verbose": -1, "num_leaves": 4, "seed": 1, "deterministic": True,
                         "num_threads": 1}, lgb.Dataset(X, y), num_boost_round=5)
    feats, thrs = export.split_thresholds(booster)
    assert np.any((feats == 1) & (np.abs(thrs) <= export.LGBM_ZERO))  # LightGBM's zero split
    edges = export.boundary_rows(booster, X)
    col = edges[:, 1]
    assert np.all((col == 0) | (np.abs(col) > export.LGBM_ZERO)) and np.any(col == 0)
    model = export.booster_to_onnx(booster).SerializeToString()
    offsets = np.arange(0, 41, 4)
    ones = np.ones(40)
    figures = export.parity_check(booster, model, X[:40], offsets, ones, ones, ones, PolicyConfig())
    assert figures["passed"] and figures["boundary_max_abs_diff"] <= export.MAX_ABS_DIFF


def _fake_onnx(monkeypatch, bump_row: int, bump: float):
    """Make the exported scores the native ones, float32-rounded, plus ``bump`` on one row."""
    real = OnnxScorer.predict

    def bumped(self, X):
        out = real(self, X).astype(np.float64)
        if len(out) > bump_row:
            out[bump_row] += bump
        return out.astype(np.float32)

    monkeypatch.setattr(export.OnnxScorer, "predict", bumped)


@pytest.mark.parametrize("bump, passes", [(4e-6, True), (3e-3, False)])
def test_a_greedy_flip_between_tied_artworks_is_a_near_tie_not_a_refusal(edge_booster, monkeypatch, bump, passes):
    """Two candidates with the same row score the same natively; a score moved within the
    tolerance may swap them (counted as a near tie), one moved beyond it is refused."""
    booster, X = edge_booster
    rows = np.repeat(X[:10], 2, axis=0)  # 10 impressions of two identical candidates
    offsets = np.arange(0, 21, 2)
    ones = np.ones(len(rows))
    model = export.booster_to_onnx(booster).SerializeToString()
    _fake_onnx(monkeypatch, bump_row=1, bump=bump)  # the second candidate of the first impression
    if passes:
        figures = export.parity_check(booster, model, rows, offsets, ones, ones, ones, PolicyConfig())
        assert figures["passed"] and figures["greedy_near_ties"] == 1 and figures["greedy_agreement"] == 0.9
    else:
        with pytest.raises(export.ParityError, match="greedy agreement 0.9000"):
            export.parity_check(booster, model, rows, offsets, ones, ones, ones, PolicyConfig())
