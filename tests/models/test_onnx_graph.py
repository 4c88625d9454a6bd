"""The exported graph: the converter's TreeEnsembleClassifier as a regressor of the margin + Sigmoid.

onnxruntime runs the regressor form of the same trees faster (docs/benchmarks.md, serving);
these tests check that the rewrite gives the classifier's probabilities on every kind of row
(NaN, zero, the split thresholds), that export and the synthetic bundle ship that form, and
that a graph of any other shape is refused rather than rewritten into something else.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import lightgbm as lgb
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from keyart import bundle
from keyart.bench import synthetic
from keyart.feature_spec import N_FEATURES
from keyart.models import export
from keyart.scoring import OnnxScorer


@pytest.fixture(scope="module")
def booster() -> lgb.Booster:
    rng = np.random.default_rng(3)
    X = rng.random((6000, N_FEATURES)).astype(np.float32)
    X[rng.random(X.shape) < 0.2] = 0.0
    X[rng.random(X.shape) < 0.05] = np.nan
    y = (rng.random(6000) < 1 / (1 + np.exp(-(np.nan_to_num(X[:, :5]).sum(1) - 2.5)))).astype(float)
    return lgb.train({"objective": "binary", "num_leaves": 15, "min_data_in_leaf": 20, "verbose": -1,
                      "seed": 1, "deterministic": True, "num_threads": 1}, lgb.Dataset(X, y), num_boost_round=60)


def _rows(booster: lgb.Booster) -> np.ndarray:
    """Random rows, zeros, NaNs and every split threshold of the booster on its feature."""
    rng = np.random.default_rng(11)
    X = rng.random((2000, N_FEATURES)).astype(np.float32)
    X[rng.random(X.shape) < 0.2] = 0.0
    X[rng.random(X.shape) < 0.05] = np.nan
    feats, thrs = export.split_thresholds(booster)
    finite = np.abs(thrs) < 3e38  # LightGBM's "everything" split at 1e300 has no float32
    feats, thrs = feats[finite], thrs[finite]
    on = np.repeat(X[:1], len(feats), axis=0)
    on[np.arange(len(feats)), feats] = thrs.astype(np.float32)
    return np.concatenate([X, on])


def test_the_regressor_form_gives_the_classifiers_probabilities(booster):
    classifier = export.converted_graph(booster)
    assert [n.op_type for n in classifier.graph.node][0] == "TreeEnsembleClassifier"
    rewritten = export.regressor_graph(classifier)
    assert [n.op_type for n in rewritten.graph.node] == ["TreeEnsembleRegressor", "Sigmoid", "Sub", "Concat"]
    X = _rows(booster)
    before = OnnxScorer(classifier.SerializeToString()).predict_proba(X)
    after = OnnxScorer(rewritten.SerializeToString()).predict_proba(X)
    assert after.shape == before.shape == (len(X), 2) and after.dtype == np.float32
    assert np.max(np.abs(after - before)) <= 2.5e-7  # the sigmoid's last float32 bit
    assert np.max(np.abs(after.sum(axis=1) - 1.0)) <= 1.2e-7


def test_export_ships_the_regressor_form_within_parity_of_lightgbm(booster):
    model = export.booster_to_onnx(booster)
    assert [n.op_type for n in model.graph.node] == ["TreeEnsembleRegressor", "Sigmoid", "Sub", "Concat"]
    assert [o.name for o in model.graph.output] == [bundle.OUTPUT_NAME]
    X = _rows(booster)
    onnx_p = OnnxScorer(model.SerializeToString()).predict(X).astype(np.float64)
    assert np.max(np.abs(onnx_p - booster.predict(X))) <= export.MAX_ABS_DIFF


def test_the_opsets_are_listed_in_one_order_whatever_the_converter_gave(booster):
    """onnxmltools lists the opsets in the order of a Python set of (domain, version), which
    string hashing varies from one process to the next; the shipped graph sorts them."""
    converted = export.converted_graph(booster)
    reversed_ = onnx.ModelProto()
    reversed_.CopyFrom(converted)
    opsets = list(reversed_.opset_import)[::-1]
    del reversed_.opset_import[:]
    reversed_.opset_import.extend(opsets)
    assert [o.domain for o in reversed_.opset_import] != [o.domain for o in converted.opset_import]
    assert export.regressor_graph(reversed_).SerializeToString() == export.regressor_graph(converted).SerializeToString()


def test_the_same_booster_gives_the_same_bytes_in_another_process(booster, tmp_path):
    """Re-exporting a day (a retry, a backfill) must give the same bundle. With CPython 3.11
    and this onnxmltools, hash seeds 0 and 20 make the converter list the opsets in opposite
    orders."""
    model_file = tmp_path / "model.txt"
    booster.save_model(str(model_file))
    script = ("import hashlib, sys, lightgbm\n"
              "from keyart.models.export import booster_to_onnx\n"
              "b = lightgbm.Booster(model_file=sys.argv[1])\n"
              "print(hashlib.sha256(booster_to_onnx(b).SerializeToString()).hexdigest())\n")
    digests = {subprocess.run([sys.executable, "-c", script, str(model_file)], check=True, capture_output=True, text=True,
                              env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout.strip() for seed in (0, 20)}
    here = hashlib.sha256(export.booster_to_onnx(lgb.Booster(model_file=str(model_file))).SerializeToString()).hexdigest()
    assert digests == {here}


def test_the_synthetic_bundle_model_has_the_exported_form():
    model = onnx.load_from_string(synthetic.tree_ensemble_onnx(seed=1, n_trees=3, depth=2))
    assert [n.op_type for n in model.graph.node] == ["TreeEnsembleRegressor", "Sigmoid", "Sub", "Concat"]


def _with(model: onnx.ModelProto, **changes) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    clf = next(n for n in out.graph.node if n.op_type == "TreeEnsembleClassifier")
    for name, value in changes.items():
        kept = [a for a in clf.attribute if a.name != name]
        del clf.attribute[:]
        clf.attribute.extend(kept + [helper.make_attribute(name, value)])
    return out


def test_a_graph_of_another_shape_is_refused(booster):
    classifier = export.converted_graph(booster)
    with pytest.raises(ValueError, match="post_transform"):
        export.regressor_graph(_with(classifier, post_transform="NONE"))
    n_weights = len(next(helper.get_attribute_value(a) for n in classifier.graph.node for a in n.attribute
                         if a.name == "class_ids"))
    with pytest.raises(ValueError, match="class ids"):
        export.regressor_graph(_with(classifier, class_ids=[0] * (n_weights - 1) + [1]))
    with pytest.raises(ValueError, match="not carried over"):
        export.regressor_graph(_with(classifier, base_values=[0.5]))
    # a tail that scales the probabilities is not the converter's * 1
    scaled = onnx.ModelProto()
    scaled.CopyFrom(classifier)
    for t in scaled.graph.initializer:
        if t.name in {i for n in scaled.graph.node if n.op_type == "Mul" for i in n.input}:
            t.CopyFrom(numpy_helper.from_array(np.array(2.0, np.float32).reshape(numpy_helper.to_array(t).shape), t.name))
    assert any(n.op_type == "Mul" for n in scaled.graph.node)  # the converter's tail has one
    with pytest.raises(ValueError, match=r"\* 1 tail"):
        export.regressor_graph(scaled)
    # two ensembles (or none) is not a single classifier
    with pytest.raises(ValueError, match="one TreeEnsembleClassifier"):
        export.regressor_graph(export.regressor_graph(classifier))
