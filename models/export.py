"""Export the reward model to ONNX and write the serving bundle, after a parity check.

The LightGBM booster (``runs/ds=D/model.txt``) is converted with
``onnxmltools.convert_lightgbm(zipmap=False, target_opset=15)``; the label output is
stripped and the converter's TreeEnsembleClassifier rewritten as a TreeEnsembleRegressor of
the same trees followed by Sigmoid (:func:`regressor_graph`, the faster form
in onnxruntime), so the graph maps input ``features`` float32 [N, N_FEATURES] to the single
output ``probabilities`` float32 [N, 2]. The policy's arithmetic (blend with priors,
inverse-gap weighting, floor) is a few vector operations in :mod:`keyart.policy` and
runs in numpy on both sides; only the trees are in the graph.

Parity: on candidate rows of the held-out day the ONNX probabilities must match the
native booster's within ``max_abs_diff`` (1e-5) and the greedy policy must choose the
same artwork for every impression. On failure :class:`ParityError` is raised and no
bundle is published: files are assembled in a staging folder and moved into
``runs/ds=D/bundle`` only after the check and :func:`keyart.bundle.verify` pass. The
manifest keeps a probe (a few parity rows and the native model's scores) so the model can
be checked again later without LightGBM: serving does before a swap, and so does
:func:`refresh_bundle`.

The tables (:func:`write_tables`) are the same for a new model and for a table refresh:
the priors of D (every artwork the bundle may serve has an ``all`` row,
:func:`bundle_priors`), the member snapshot of D, and the artworks active from D through the
export horizon. :func:`refresh_bundle` puts them next to an existing bundle's model.onnx,
byte for byte, when the gate keeps the champion.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import shutil
import sys
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import onnx
import onnxmltools
import onnxruntime
import pandas as pd
import pyarrow as pa
from onnx import helper, numpy_helper
from onnxmltools.convert.common.data_types import FloatTensorType

from keyart import bundle, catalog, feature_spec
from keyart.config import settings
from keyart.lake import Lake, fmt_ds, heldout_day, parse_ds, shift_ds
from keyart.models.data import feature_array, pages_from_frame, read_table_dir, read_training
from keyart.policy import PolicyConfig, blend_scores, group_argmax
from keyart.scoring import OnnxScorer

log = logging.getLogger(__name__)

TARGET_OPSET = 15
MAX_ABS_DIFF = 1e-5
PROBE_ROWS = 16
KIND_MODEL, KIND_REFRESH = "model", "table_refresh"


class ParityError(bundle.BundleError):
    """The ONNX model disagrees with the native model: the bundle is not published."""

    def __init__(self, message: str, figures: Mapping[str, Any] | None = None):
        super().__init__(message)
        self.figures = dict(figures or {})


def _record_refusal(run_dir: Path, ds: str, exc: ParityError) -> None:
    bundle.write_export_refusal(run_dir, {"ds": ds, "reason": str(exc), "parity": exc.figures,
                                          "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")})


def _float32_floor(values: np.ndarray) -> np.ndarray:
    """The largest float32 at or below each float64 value (as float64, so it prints exactly)."""
    values = np.asarray(values, dtype=np.float64)
    with np.errstate(over="ignore"):
        f32 = values.astype(np.float32)
    over = f32.astype(np.float64) > values
    f32[over] = np.nextafter(f32[over], np.float32(-np.inf), dtype=np.float32)
    return f32.astype(np.float64)


def float32_thresholds(booster: lgb.Booster) -> tuple[lgb.Booster, int]:
    """The booster with every numeric split threshold ``t`` replaced by the largest float32
    ``t'`` <= ``t``; returns (booster, thresholds moved).

    The ONNX tree ensemble keeps thresholds as float32 and compares float32 features; the
    converter rounds each double threshold to the *nearest* float32. When that rounds up, a
    feature equal to the rounded value (a float32 between the double threshold and its
    rounding, i.e. exactly it) goes left in ONNX and right in LightGBM: one leaf's worth of
    score apart, on data the parity sample may or may not contain. For a float32 ``x``,
    ``x <= t`` if and only if ``x <= t'``, so the returned booster scores every float32 row
    exactly as the original does, and its thresholds convert to float32 without rounding.
    Categorical splits (decision_type bit 0) keep their thresholds: those index category sets.
    """
    lines = booster.model_to_string().split("\n")
    moved, pending = 0, None  # pending: the index of this tree's threshold= line
    for i, line in enumerate(lines):
        if line.startswith("Tree="):
            if pending is not None:
                raise ValueError("unexpected LightGBM model text: threshold= without decision_type=")
        elif line.startswith("threshold="):
            pending = i
        elif line.startswith("decision_type="):
            if pending is None:
                # LightGBM writes threshold= before decision_type=; anything else is a format
                # this function does not know, and guessing could change the model
                raise ValueError("unexpected LightGBM model text: decision_type= without threshold=")
            fields = lines[pending].split("=", 1)[1].split()
            decision = np.array(line.split("=", 1)[1].split(), dtype=np.int64)
            if len(decision) != len(fields):
                raise ValueError("unexpected LightGBM model text: threshold= and decision_type= differ in length")
            t = np.array(fields, dtype=np.float64)
            numeric = (decision & 1) == 0
            floor = np.where(numeric, _float32_floor(t), t)
            changed = numeric & (floor != t)
            if changed.any():
                moved += int(changed.sum())
                lines[pending] = "threshold=" + " ".join(
                    repr(float(v)) if c else f for v, c, f in zip(floor, changed, fields, strict=True))
            pending = None
    if not moved:
        return booster, 0
    # tree_sizes= gives each tree's length in bytes, for parallel loading; the edited trees
    # have other lengths, and without the line LightGBM finds the trees by their headers
    lines = [line for line in lines if not line.startswith("tree_sizes=")]
    return lgb.Booster(model_str="\n".join(lines)), moved


def split_thresholds(booster: lgb.Booster) -> tuple[np.ndarray, np.ndarray]:
    """(feature index, threshold) of every distinct numeric split of the booster."""
    feats, thrs = [], []
    for tree in booster.dump_model()["tree_info"]:
        stack = [tree["tree_structure"]]
        while stack:
            node = stack.pop()
            if "split_feature" not in node:
                continue
            if node.get("decision_type") == "<=":
                feats.append(int(node["split_feature"]))
                thrs.append(float(node["threshold"]))
            stack.extend((node["left_child"], node["right_child"]))
    if not feats:
        return np.zeros(0, np.int64), np.zeros(0, np.float64)
    pairs = np.unique(np.stack([np.asarray(feats, np.float64), np.asarray(thrs, np.float64)], axis=1), axis=0)
    return pairs[:, 0].astype(np.int64), pairs[:, 1]


LGBM_ZERO = 1.0000000180025095e-35
"""LightGBM's ``kZeroThreshold``: its predictor reads a feature of magnitude at or below it as
0 (and splits zero from non-zero at +-this value)."""


def boundary_rows(booster: lgb.Booster, X: np.ndarray, seed: int = 0) -> np.ndarray:
    """float32 rows that sit on the split thresholds: for every distinct numeric split
    (feature f, threshold t), a row of ``X`` (drawn at random) with f set to the float32
    nearest t and to the float32 on either side of it. These are the values where float32
    and float64 comparisons can part ways; the parity check scores them on both sides.

    A value of magnitude at or below :data:`LGBM_ZERO` is written as 0.0: LightGBM reads such
    a feature as zero whatever its sign or size (the ONNX graph compares it as it is), so
    LightGBM's own thresholds at +-LGBM_ZERO are probed with 0.0 and the float32 just
    beyond, the values that occur."""
    feats, thrs = split_thresholds(booster)
    if not len(feats) or not len(X):
        return np.zeros((0, X.shape[1] if X.ndim == 2 else feature_spec.N_FEATURES), np.float32)
    with np.errstate(over="ignore"):
        near = thrs.astype(np.float32)
    values = np.concatenate([np.nextafter(near, np.float32(-np.inf)), near, np.nextafter(near, np.float32(np.inf))])
    values[np.abs(values) <= LGBM_ZERO] = 0.0
    cols = np.tile(feats, 3)
    rng = np.random.default_rng(seed)
    rows = np.array(X[rng.integers(0, len(X), size=len(values))], dtype=np.float32)
    rows[np.arange(len(values)), cols] = values
    return rows[np.isfinite(values)]


def booster_to_onnx(booster: lgb.Booster) -> onnx.ModelProto:
    """The booster as the graph a bundle ships: :func:`converted_graph`'s classifier as a
    regressor of the margin + Sigmoid, 15-40% less time per call in onnxruntime
    (:func:`regressor_graph`); the parity check compares what is shipped
    with the native booster."""
    return regressor_graph(converted_graph(booster))


def converted_graph(booster: lgb.Booster) -> onnx.ModelProto:
    """Convert the booster (onnxmltools' TreeEnsembleClassifier); keep only the
    ``probabilities`` output [N, 2].

    Thresholds go through :func:`float32_thresholds` first, so the float32 graph routes every
    float32 row down the same branches as the native model."""
    n = booster.num_feature()
    if n != feature_spec.N_FEATURES:
        raise ValueError(f"booster has {n} features, the feature spec {feature_spec.N_FEATURES}")
    booster, _ = float32_thresholds(booster)
    model = onnxmltools.convert_lightgbm(
        booster, initial_types=[(bundle.INPUT_NAME, FloatTensorType([None, n]))],
        zipmap=False, target_opset=TARGET_OPSET)
    graph = model.graph
    outputs = [o for o in graph.output if o.name == bundle.OUTPUT_NAME]
    if len(outputs) != 1:
        raise ValueError(f"converter gave outputs {[o.name for o in graph.output]}, none named {bundle.OUTPUT_NAME!r}")
    del graph.output[:]
    graph.output.extend(outputs)
    # prune nodes that no longer feed the remaining output (the label branch)
    needed, keep = {bundle.OUTPUT_NAME}, []
    for node in reversed(list(graph.node)):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    del graph.node[:]
    graph.node.extend(reversed(keep))
    used = {i for node in graph.node for i in node.input}
    inits = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    model.producer_name = "keyart"
    # The converter names the graph with a random uuid; a fixed name makes the same booster
    # give the same bytes, so re-exporting a day (retry, backfill) is the same bundle.
    graph.name = "keyart_reward_model"
    onnx.checker.check_model(model)
    return model


_TREE_ATTRS = ("nodes_treeids", "nodes_nodeids", "nodes_featureids", "nodes_values", "nodes_modes",
               "nodes_truenodeids", "nodes_falsenodeids", "nodes_missing_value_tracks_true",
               "nodes_hitrates")
_WEIGHT_ATTRS = ("treeids", "nodeids", "weights")


def regressor_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model``'s binary logistic TreeEnsembleClassifier as a TreeEnsembleRegressor of the
    same trees (the margin, summed) followed by ``Sigmoid`` and ``Concat(1 - p, p)``.

    ``model`` must map ``features`` to ``probabilities`` through one TreeEnsembleClassifier
    with class labels [0, 1], every leaf weight on class 0 and ``post_transform`` LOGISTIC
    (what onnxmltools makes of a LightGBM binary booster), optionally followed by Identity
    and multiplications by the constant 1; anything else raises :class:`ValueError`.
    Probabilities agree with the classifier's to float32 rounding (the sigmoid's last bit).
    """
    graph = model.graph
    trees = [n for n in graph.node if n.op_type == "TreeEnsembleClassifier"]
    if len(trees) != 1 or [i.name for i in graph.input] != [bundle.INPUT_NAME] or list(trees[0].input) != [bundle.INPUT_NAME]:
        raise ValueError("need one TreeEnsembleClassifier reading the input "
                         f"{bundle.INPUT_NAME!r}, got nodes {[n.op_type for n in graph.node]}")
    clf = trees[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in clf.attribute}
    if list(attrs.get("classlabels_int64s", [])) != [0, 1] or set(attrs.get("class_ids", [])) != {0} \
            or attrs.get("post_transform") != b"LOGISTIC":
        raise ValueError("need a binary classifier with every leaf weight on class 0 and post_transform "
                         f"LOGISTIC, got labels {attrs.get('classlabels_int64s')}, class ids "
                         f"{sorted(set(attrs.get('class_ids', [])))}, {attrs.get('post_transform')!r}")
    unknown = set(attrs) - {*_TREE_ATTRS, *(f"class_{a}" for a in _WEIGHT_ATTRS), "class_ids",
                            "classlabels_int64s", "post_transform"}
    if unknown:
        raise ValueError(f"classifier attributes not carried over: {sorted(unknown)}")
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    probs = clf.output[1]
    for node in graph.node:  # the converter's tail: Identity, then * 1
        if node is clf:
            continue
        if node.op_type == "Identity" and list(node.input) == [probs]:
            probs = node.output[0]
        elif node.op_type == "Mul" and probs in node.input and len(node.input) == 2 \
                and np.all(consts.get(next(i for i in node.input if i != probs), np.nan) == 1.0):
            probs = node.output[0]
        else:
            raise ValueError(f"node {node.op_type} {list(node.input)} -> {list(node.output)} is not "
                             "the classifier's Identity / * 1 tail")
    if [o.name for o in graph.output] != [bundle.OUTPUT_NAME] or probs != bundle.OUTPUT_NAME:
        raise ValueError(f"the classifier's probabilities must be the only output {bundle.OUTPUT_NAME!r}")
    regressor = helper.make_node(
        "TreeEnsembleRegressor", [bundle.INPUT_NAME], ["margin"], domain="ai.onnx.ml", n_targets=1,
        aggregate_function="SUM", post_transform="NONE",
        **{k: attrs[k] for k in _TREE_ATTRS if k in attrs},
        **{f"target_{a}": attrs[f"class_{a}"] for a in _WEIGHT_ATTRS}, target_ids=attrs["class_ids"])
    nodes = [regressor, helper.make_node("Sigmoid", ["margin"], ["p1"]),
             helper.make_node("Sub", ["one", "p1"], ["p0"]),
             helper.make_node("Concat", ["p0", "p1"], [bundle.OUTPUT_NAME], axis=1)]
    out = helper.make_model(
        helper.make_graph(nodes, graph.name, list(graph.input), list(graph.output),
                          initializer=[helper.make_tensor("one", onnx.TensorProto.FLOAT, [], [1.0])]),
        # sorted: the converter lists the opsets in set order, which varies between processes
        opset_imports=sorted(model.opset_import, key=lambda o: o.domain), ir_version=model.ir_version,
        producer_name=model.producer_name, producer_version=model.producer_version)
    onnx.checker.check_model(out)
    return out


def parity_check(booster: lgb.Booster, model_bytes: bytes, X: np.ndarray, offsets: np.ndarray,
                 prior_alpha: np.ndarray, prior_beta: np.ndarray, prior_n: np.ndarray,
                 cfg: PolicyConfig, max_abs_diff: float = MAX_ABS_DIFF) -> dict[str, Any]:
    """Compare native and ONNX scores on candidate rows grouped into impressions.

    Parameters
    ----------
    X : [n, N_FEATURES] float32 candidate rows; ``offsets`` [T + 1] groups them.
    prior_alpha, prior_beta, prior_n : [n] priors (the greedy choice uses blended scores).

    Returns the figures; raises :class:`ParityError` if |dp| > max_abs_diff anywhere or
    the greedy choice differs for any impression, save a near tie: where ONNX picks another
    artwork whose native score is within 2 * max_abs_diff of the native best (two scores
    each allowed max_abs_diff can swap such a pair; float32 summation in the graph does,
    about once in 10^4 impressions). Those are counted (``greedy_near_ties``), not refused.
    """
    native = booster.predict(np.asarray(X, dtype=np.float32))
    scorer = OnnxScorer(model_bytes)
    exported = scorer.predict(X).astype(np.float64)
    diff = np.abs(native - exported)
    edges = boundary_rows(booster, np.asarray(X, dtype=np.float32))
    edge_diff = (np.abs(booster.predict(edges) - scorer.predict(edges).astype(np.float64))
                 if len(edges) else np.zeros(0))
    s_native = blend_scores(native, prior_alpha, prior_beta, prior_n, cfg.prior_blend_n0)
    s_onnx = blend_scores(exported, prior_alpha, prior_beta, prior_n, cfg.prior_blend_n0)
    pick_native, pick_onnx = group_argmax(s_native, offsets), group_argmax(s_onnx, offsets)
    same = pick_native == pick_onnx
    near_tie = ~same & (s_native[pick_native] - s_native[pick_onnx] <= 2.0 * max_abs_diff)
    figures = {"rows": int(len(X)), "impressions": int(len(offsets) - 1),
               "max_abs_diff": float(diff.max()) if len(diff) else 0.0,
               "mean_abs_diff": float(diff.mean()) if len(diff) else 0.0,
               "greedy_agreement": float(same.mean()) if len(same) else 1.0,
               "greedy_near_ties": int(near_tie.sum()),
               "boundary_rows": int(len(edges)),
               "boundary_max_abs_diff": float(edge_diff.max()) if len(edge_diff) else 0.0,
               "tolerance": max_abs_diff}
    figures["passed"] = bool(figures["max_abs_diff"] <= max_abs_diff and (same | near_tie).all()
                             and figures["boundary_max_abs_diff"] <= max_abs_diff)
    if not figures["passed"]:
        raise ParityError(f"ONNX parity failed: max |dp| = {figures['max_abs_diff']:.3g} "
                          f"(limit {max_abs_diff:g}), greedy agreement {figures['greedy_agreement']:.4f}, "
                          f"max |dp| on {figures['boundary_rows']} split-threshold rows "
                          f"{figures['boundary_max_abs_diff']:.3g}", figures)
    return figures


def parity_sample(lake: Lake, ds: str, n_impressions: int = 2000, seed: int = 0):
    """Candidate rows of up to ``n_impressions`` held-out impressions: (X, offsets, rows)."""
    day = heldout_day(lake, ds)
    cols = ["event_id", "member_id", "artwork_id", "is_logged", "reward", "propensity",
            "prior_alpha", "prior_beta", "prior_n", "features"]
    table = read_training(lake, [day], columns=cols)
    events = np.unique(table.column("event_id").to_numpy())
    rng = np.random.default_rng(seed)
    pick = rng.choice(events, size=min(n_impressions, len(events)), replace=False)
    keep = pd.Series(table.column("event_id").to_numpy()).isin(set(pick)).to_numpy()
    table = table.filter(pa.array(keep))
    frame = table.drop_columns(["features"]).to_pandas()
    frame["_row"] = np.arange(len(frame))
    pages, rows = pages_from_frame(frame)
    X = feature_array(table.column("features"))[rows["_row"].to_numpy()]
    return X, pages.offsets, rows


EXPORT_HORIZON_DAYS = 7
"""A bundle also carries the artworks that start within this many days after its serving day,
so a champion that stays in place (the gate kept it) still knows them; serving resolves which
are active on each request's day."""


def active_artworks(lake: Lake, ds: str) -> pd.DataFrame:
    """Artworks active on any day from ds to ds + 1 + EXPORT_HORIZON_DAYS, with their title's genres."""
    arts = read_table_dir(lake.artworks)
    titles = read_table_dir(lake.titles)[["title_id", "genres"]].rename(columns={"genres": "title_genres"})
    day, nxt = parse_ds(ds), parse_ds(shift_ds(ds, 1 + EXPORT_HORIZON_DAYS))
    active = catalog.active_between(catalog.ordinals(arts["active_from"], catalog.ALWAYS),
                                    catalog.ordinals(arts["active_to"], catalog.OPEN_ENDED),
                                    day.toordinal(), nxt.toordinal())
    out = arts[active].merge(titles, on="title_id", how="left")
    if out["title_genres"].isna().any():
        raise ValueError("artworks reference titles missing from the catalog")
    return out.reset_index(drop=True)


EB_MAX_ESS = 20.0
"""Cap on the strength of an empirical-Bayes prior, the priors job's (keyart.jobs.priors.EB_MAX_ESS;
models may not import jobs, a test keeps the two equal)."""
_MEAN_CLIP = (1e-3, 1.0 - 1e-3)


def _eb_ess(count: int, mean: float, var: float) -> float | None:
    """Method-of-moments alpha + beta from ``count`` posterior means; None under two."""
    if count < 2:
        return None
    raw = mean * (1.0 - mean) / var - 1.0 if var > 0 else EB_MAX_ESS
    return float(min(max(raw, 1.0), EB_MAX_ESS))


def bundle_priors(priors: pd.DataFrame, artworks: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """The priors a bundle ships: ``priors`` (contracts.PRIORS rows of its day) plus an ``all``
    row for every artwork of ``artworks`` that has none; returns (rows, number added).

    The priors job gives a row to every artwork active on its day; a bundle also carries the
    artworks that start within the export horizon, and without a row serving would score
    them with the flat default Beta(1, 9), whose mean (0.10) is about twice a realistic take
    rate and would make a new artwork its title's argmax. The added row is the priors job's
    empirical-Bayes start (keyart.jobs.priors, rule 3): the method of moments over the
    posterior means of the title's artworks with data (the whole catalog's when the title
    has fewer than two), alpha + beta clipped to [1, EB_MAX_ESS], ``n_impressions`` 0.
    """
    priors = priors.drop(columns=[c for c in priors.columns if c == "ds"]).reset_index(drop=True)
    is_all = priors["segment"] == feature_spec.SEGMENT_ALL
    missing = artworks.loc[~artworks["artwork_id"].isin(priors.loc[is_all, "artwork_id"]), ["title_id", "artwork_id"]]
    if missing.empty:
        return priors, 0
    known = priors[is_all & (priors["n_impressions"] > 0)]
    p = (known["alpha"] / (known["alpha"] + known["beta"])).to_numpy(dtype=np.float64)
    by_title = pd.DataFrame({"title_id": known["title_id"].to_numpy(), "p": p}).groupby("title_id")["p"]
    # population moments (var_pop, as Spark's var_pop in the priors job)
    title_stats = {t: (len(v), float(v.mean()), float(v.var(ddof=0))) for t, v in by_title}
    cat = (len(p), float(p.mean()) if len(p) else 0.0, float(p.var()) if len(p) else 0.0)
    default_mean = feature_spec.DEFAULT_PRIOR[0] / sum(feature_spec.DEFAULT_PRIOR)
    default_ess = min(sum(feature_spec.DEFAULT_PRIOR), EB_MAX_ESS)
    rows = []
    for title_id, artwork_id in missing.itertuples(index=False):
        tc, tm, tv = title_stats.get(title_id, (0, 0.0, 0.0))
        mean = tm if tc >= 1 else cat[1] if cat[0] >= 1 else default_mean
        mean = min(max(mean, _MEAN_CLIP[0]), _MEAN_CLIP[1])
        ess = _eb_ess(tc, tm, tv) or _eb_ess(*cat) or default_ess
        rows.append({"title_id": title_id, "artwork_id": artwork_id, "segment": feature_spec.SEGMENT_ALL,
                     "alpha": mean * ess, "beta": (1.0 - mean) * ess, "n_impressions": 0.0})
    added = pd.DataFrame(rows).astype({c: priors[c].dtype for c in ("alpha", "beta", "n_impressions")
                                       if c in priors.columns})
    return pd.concat([priors, added], ignore_index=True), len(rows)


def day_vocabulary(lake: Lake, ds: str) -> feature_spec.Vocabulary:
    """The features job's vocabulary of ``ds``: the tag and genre columns of rows built with the
    member snapshot of ``ds``, so serving builds them alike. A lake whose features job wrote
    none (a hand-made lake) gets the empty vocabulary, every tag hashed, with a warning."""
    try:
        return feature_spec.read_vocabulary(lake.root, ds)
    except FileNotFoundError:
        print(f"warning: no feature vocabulary for {ds}; the bundle carries the empty one", file=sys.stderr)
        return feature_spec.Vocabulary()


MEAN_SAMPLE_IMPRESSIONS = 20_000
"""Held-out impressions whose candidate rows give each artwork's model mean (:func:`model_means`)."""


def model_means(lake: Lake, ds: str, model_bytes: bytes, n_impressions: int = MEAN_SAMPLE_IMPRESSIONS) -> dict[str, float]:
    """The model's mean score per artwork over the candidate rows of up to ``n_impressions``
    impressions of the held-out day of ``ds``: the ``model_mean`` the ``residual`` prior blend
    reads (keyart.policy.blend_scores), scored by the ONNX model serving runs.

    Without readable candidate rows for the day (none written, or a table without the
    columns) it gives none, says so in the log, and the bundle's ``row_counts.model_means``
    is 0: the residual blend then corrects nothing, and nothing else depends on them."""
    try:
        X, _, rows = parity_sample(lake, ds, n_impressions, seed=1)
    except (OSError, pa.ArrowInvalid, KeyError, ValueError) as exc:
        log.warning("model means for %s: no candidate rows to score (%s: %s)", ds, type(exc).__name__, exc)
        return {}
    if not len(X):
        return {}
    q = OnnxScorer(model_bytes).predict(X).astype(np.float64)
    means = pd.Series(q).groupby(rows["artwork_id"].astype(str).to_numpy()).mean()
    return {str(k): float(v) for k, v in means.items()}


def write_tables(lake: Lake, ds: str, out: Path, means: Mapping[str, float] | None = None) -> dict[str, int]:
    """priors.parquet, members.parquet and artworks.parquet of day ``ds`` into ``out``: what
    a bundle serving from ``ds`` on needs (a new model's and a table refresh's alike).

    priors.parquet's ``model_mean`` is ``means`` (the bundle's model's, :func:`model_means`) on
    each artwork's segment-``all`` row, NaN elsewhere and for artworks ``means`` lacks."""
    arts = active_artworks(lake, ds)
    arts.to_parquet(out / bundle.ARTWORKS_FILE, index=False)
    priors, filled = bundle_priors(read_table_dir(lake.priors(ds)), arts)
    is_all = priors["segment"] == feature_spec.SEGMENT_ALL
    priors["model_mean"] = np.where(is_all, priors["artwork_id"].astype(str).map(dict(means or {})).astype(np.float64), np.nan)
    priors.to_parquet(out / bundle.PRIORS_FILE, index=False)
    members = read_table_dir(lake.member_features(ds))
    members.drop(columns=[c for c in members.columns if c == "ds"]).to_parquet(out / bundle.MEMBERS_FILE, index=False)
    return {"priors": len(priors), "priors_filled": filled, "members": len(members), "artworks": len(arts),
            "model_means": int(np.isfinite(priors["model_mean"].to_numpy(dtype=np.float64)).sum())}


def probe_block(X: np.ndarray, native: np.ndarray, n: int = PROBE_ROWS) -> dict[str, Any]:
    """Manifest probe: the first ``n`` parity rows and the native model's P(quality play)."""
    return {"features": np.asarray(X[:n], dtype=np.float32).tolist(),
            "scores": [float(v) for v in np.asarray(native[:n], dtype=np.float64)], "source": "lightgbm"}


def check_probe(model_bytes: bytes, probe: dict[str, Any] | None, max_abs_diff: float = MAX_ABS_DIFF) -> dict[str, Any]:
    """Score a manifest probe with the ONNX model; :class:`ParityError` if any score moved by
    more than ``max_abs_diff``. Without a probe (bundles exported before probes) there is
    nothing to compare: the figures say so."""
    if not probe or not probe.get("features"):
        return {"probe_rows": 0, "probe_max_abs_diff": None}
    want = np.asarray(probe["scores"], dtype=np.float64)
    got = OnnxScorer(model_bytes).predict(np.asarray(probe["features"], dtype=np.float32)).astype(np.float64)
    worst = float(np.max(np.abs(got - want))) if got.shape == want.shape else float("inf")
    if not worst <= max_abs_diff:
        raise ParityError(f"the model no longer scores its probe: max |dp| = {worst:.3g} (limit {max_abs_diff:g})")
    return {"probe_rows": int(len(want)), "probe_max_abs_diff": worst}


def _publish(staging: Path, final: Path) -> None:
    """Replace ``final`` with the verified ``staging`` folder."""
    if final.exists():
        old = final.parent / f".{final.name}-old-{dt.datetime.now(dt.UTC):%Y%m%d%H%M%S%f}"
        final.rename(old)
        shutil.rmtree(old)
    staging.rename(final)


def export_bundle(lake: Lake, ds: str, policy: PolicyConfig, run_dir: Path | None = None,
                  n_parity: int = 2000) -> bundle.Manifest:
    """Convert ``runs/ds=D/model.txt``, check parity and publish ``runs/ds=D/bundle``.

    A parity failure raises :class:`ParityError` after writing :data:`keyart.bundle.EXPORT_REFUSED_FILE` to the run
    directory; an earlier bundle of the day, if any, is left as it was (it is not this model's)."""
    run_dir = Path(run_dir) if run_dir else lake.run_dir(ds)
    booster = lgb.Booster(model_file=str(run_dir / "model.txt"))
    train_info = json.loads((run_dir / "train.json").read_text()) if (run_dir / "train.json").is_file() else {}
    model = booster_to_onnx(booster)
    model_bytes = model.SerializeToString()
    X, offsets, rows = parity_sample(lake, ds, n_parity)
    try:
        parity = parity_check(booster, model_bytes, X, offsets, rows["prior_alpha"].to_numpy(),
                              rows["prior_beta"].to_numpy(), rows["prior_n"].to_numpy(), policy)
    except ParityError as exc:
        _record_refusal(run_dir, ds, exc)
        raise
    final = run_dir / "bundle"
    staging = run_dir / f".bundle-staging-{dt.datetime.now(dt.UTC):%Y%m%d%H%M%S%f}"
    staging.mkdir(parents=True)
    try:
        (staging / bundle.MODEL_FILE).write_bytes(model_bytes)
        (staging / bundle.SPEC_FILE).write_text(json.dumps(feature_spec.spec_dict(day_vocabulary(lake, ds)), indent=2))
        counts = write_tables(lake, ds, staging, model_means(lake, ds, model_bytes))
        evaluation = run_dir / "evaluation.json"
        metrics = {"train": train_info.get("metrics", {})}
        if evaluation.is_file():
            metrics["evaluation"] = json.loads(evaluation.read_text()).get("policies", {})
        digest = bundle.sha256(staging / bundle.MODEL_FILE)[:10]
        bundle.write_manifest(
            staging, bundle_version=f"{ds}.{digest}", kind=KIND_MODEL,
            created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), ds=ds, priors_ds=ds,
            training_window=train_info.get("window", {}), heldout_ds=train_info.get("heldout_ds"),
            policy=asdict(policy), metrics=metrics, parity=parity,
            probe=probe_block(X, booster.predict(X[:PROBE_ROWS])), row_counts=counts,
            model={"format": "onnx", "target_opset": TARGET_OPSET, "trees": booster.num_trees()},
            versions={"lightgbm": lgb.__version__, "onnx": onnx.__version__,
                      "onnxmltools": onnxmltools.__version__, "onnxruntime": onnxruntime.__version__})
        manifest = bundle.verify(staging)
        _publish(staging, final)
        (run_dir / bundle.EXPORT_REFUSED_FILE).unlink(missing_ok=True)  # an earlier attempt's, for another model
        return manifest
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def refresh_bundle(lake: Lake, ds: str, model_bundle: Path, out: Path, policy: PolicyConfig,
                   origin: dict[str, Any]) -> bundle.Manifest:
    """A bundle of the model in ``model_bundle`` with the tables of ``ds``, published at ``out``.

    model.onnx is copied byte for byte and checked twice before anything is published: its
    sha256 must be the one ``model_bundle``'s manifest records, and it must still score the
    manifest's probe within MAX_ABS_DIFF (the parity export established). The tables come
    from :func:`write_tables`, exactly as export writes them. The manifest keeps the model's
    own record (training window, held-out day, metrics, parity, probe) and says where the
    model comes from (``model_origin``: registry version, bundle version, ds, model sha256 as
    given in ``origin``) and which day the tables are (``ds``, ``priors_ds``, ``tables_ds``).
    """
    model_bundle, out = Path(model_bundle), Path(out)
    source = bundle.verify(model_bundle)
    model_bytes = (model_bundle / bundle.MODEL_FILE).read_bytes()
    model_sha = hashlib.sha256(model_bytes).hexdigest()
    if model_sha != source["files"][bundle.MODEL_FILE]:
        raise ParityError(f"{model_bundle}: model.onnx is not the model its manifest records")
    probe = source.get("probe")
    check = check_probe(model_bytes, probe)
    source_origin = source.get("model_origin") or {}
    origin = {"bundle_version": source_origin.get("bundle_version", source.version),
              "ds": source_origin.get("ds", source.get("ds")), **origin, "model_sha256": model_sha}
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}-staging-{dt.datetime.now(dt.UTC):%Y%m%d%H%M%S%f}"
    staging.mkdir()
    try:
        (staging / bundle.MODEL_FILE).write_bytes(model_bytes)
        (staging / bundle.SPEC_FILE).write_text(json.dumps(feature_spec.spec_dict(day_vocabulary(lake, ds)), indent=2))
        counts = write_tables(lake, ds, staging, model_means(lake, ds, model_bytes))
        parity = {**(source.get("parity") or {}), **check, "model_sha256_unchanged": True}
        bundle.write_manifest(
            staging, bundle_version=f"{origin['bundle_version']}+tables.{ds}", kind=KIND_REFRESH,
            created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            ds=ds, priors_ds=ds, tables_ds=ds, model_origin=origin,
            training_window=source.get("training_window", {}), heldout_ds=source.get("heldout_ds"),
            policy=asdict(policy), metrics=source.get("metrics", {}), parity=parity,
            **({"probe": probe} if probe else {}), row_counts=counts, model=source.get("model", {}),
            versions={**(source.get("versions") or {}), "onnxruntime": onnxruntime.__version__})
        manifest = bundle.verify(staging)
        if (staging / bundle.MODEL_FILE).read_bytes() != model_bytes:
            raise ParityError(f"{staging}: model.onnx changed while the bundle was assembled")
        _publish(staging, out)
        return manifest
    finally:
        if staging.exists():
            shutil.rmtree(staging)


# --- command line ----------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ds", required=True, type=fmt_ds, help="run date YYYY-MM-DD")
    parser.add_argument("--lake", type=Path, default=None, help="lake root (default: config)")
    parser.add_argument("--run-dir", type=Path, default=None, help="default: <lake>/runs/ds=D")
    parser.add_argument("--parity-impressions", type=int, default=2000)


def run(args: argparse.Namespace) -> int:
    s = settings()
    try:
        manifest = export_bundle(Lake(args.lake or s.lake), args.ds, PolicyConfig.from_settings(s),
                                 run_dir=args.run_dir, n_parity=args.parity_impressions)
    except ParityError as exc:
        print(f"export refused: {exc}", file=sys.stderr)
        return bundle.EXIT_EXPORT_REFUSED
    p = manifest["parity"]
    print(f"bundle {manifest.version}: parity max |dp| {p['max_abs_diff']:.2e} over {p['rows']} rows, "
          f"greedy agreement {p['greedy_agreement']:.4f}")
    return 0
