"""Export the reward model to ONNX and write the serving bundle, after a parity check.

The LightGBM booster (``runs/ds=D/model.txt``) is converted with
``onnxmltools.convert_lightgbm(zipmap=False, target_opset=15)``; the label output is
stripped so the graph maps input ``features`` float32 [N, N_FEATURES] to the single
output ``probabilities`` float32 [N, 2]. The policy's arithmetic (blend with priors,
inverse-gap weighting, floor) is a few vector operations in :mod:`keyart.policy` and
runs in numpy on both sides; only the trees are in the graph.

Parity: on candidate rows of the held-out day the ONNX probabilities must match the
native booster's within ``max_abs_diff`` (1e-5) and the greedy policy must choose the
same artwork for every impression. On failure :class:`ParityError` is raised and no
bundle is published: files are assembled in a staging folder and moved into
``runs/ds=D/bundle`` only after the check and :func:`keyart.bundle.verify` pass.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
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
from onnxmltools.convert.common.data_types import FloatTensorType

from keyart import bundle, feature_spec
from keyart.config import settings
from keyart.lake import Lake, fmt_ds, parse_ds, shift_ds
from keyart.models.data import (
    feature_array,
    heldout_day,
    pages_from_frame,
    read_table_dir,
    read_training,
)
from keyart.policy import PolicyConfig, blend_scores, group_argmax
from keyart.scoring import OnnxScorer

TARGET_OPSET = 15
MAX_ABS_DIFF = 1e-5


class ParityError(bundle.BundleError):
    """The ONNX model disagrees with the native model: the bundle is not published."""


def booster_to_onnx(booster: lgb.Booster) -> onnx.ModelProto:
    """Convert the booster; keep only the ``probabilities`` output [N, 2]."""
    n = booster.num_feature()
    if n != feature_spec.N_FEATURES:
        raise ValueError(f"booster has {n} features, the feature spec {feature_spec.N_FEATURES}")
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


def parity_check(booster: lgb.Booster, model_bytes: bytes, X: np.ndarray, offsets: np.ndarray,
                 prior_alpha: np.ndarray, prior_beta: np.ndarray, prior_n: np.ndarray,
                 cfg: PolicyConfig, max_abs_diff: float = MAX_ABS_DIFF) -> dict[str, Any]:
    """Compare native and ONNX scores on candidate rows grouped into impressions.

    Parameters
    ----------
    X : [n, N_FEATURES] float32 candidate rows; ``offsets`` [T + 1] groups them.
    prior_alpha, prior_beta, prior_n : [n] priors (the greedy choice uses blended scores).

    Returns the figures; raises :class:`ParityError` if |dp| > max_abs_diff anywhere or
    the greedy choice differs for any impression.
    """
    native = booster.predict(np.asarray(X, dtype=np.float32))
    exported = OnnxScorer(model_bytes).predict(X).astype(np.float64)
    diff = np.abs(native - exported)
    s_native = blend_scores(native, prior_alpha, prior_beta, prior_n, cfg.prior_blend_n0)
    s_onnx = blend_scores(exported, prior_alpha, prior_beta, prior_n, cfg.prior_blend_n0)
    same = group_argmax(s_native, offsets) == group_argmax(s_onnx, offsets)
    figures = {"rows": int(len(X)), "impressions": int(len(offsets) - 1),
               "max_abs_diff": float(diff.max()) if len(diff) else 0.0,
               "mean_abs_diff": float(diff.mean()) if len(diff) else 0.0,
               "greedy_agreement": float(same.mean()) if len(same) else 1.0,
               "tolerance": max_abs_diff}
    figures["passed"] = bool(figures["max_abs_diff"] <= max_abs_diff and same.all())
    if not figures["passed"]:
        raise ParityError(f"ONNX parity failed: max |dp| = {figures['max_abs_diff']:.3g} "
                          f"(limit {max_abs_diff:g}), greedy agreement {figures['greedy_agreement']:.4f}")
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
    # Compare as timestamps: an all-null active_to column has no .dt.date to compare with dates.
    start = pd.to_datetime(arts["active_from"])
    end = pd.to_datetime(arts["active_to"])
    active = (start <= pd.Timestamp(nxt)) & (end.isna() | (end >= pd.Timestamp(day)))
    out = arts[active.to_numpy()].merge(titles, on="title_id", how="left")
    if out["title_genres"].isna().any():
        raise ValueError("artworks reference titles missing from the catalog")
    return out.reset_index(drop=True)


def _copy_table(src: Path, dst: Path) -> int:
    frame = read_table_dir(src)
    if "ds" in frame.columns:
        frame = frame.drop(columns=["ds"])
    frame.to_parquet(dst, index=False)
    return len(frame)


def export_bundle(lake: Lake, ds: str, policy: PolicyConfig, run_dir: Path | None = None,
                  n_parity: int = 2000) -> bundle.Manifest:
    """Convert ``runs/ds=D/model.txt``, check parity and publish ``runs/ds=D/bundle``."""
    run_dir = Path(run_dir) if run_dir else lake.run_dir(ds)
    booster = lgb.Booster(model_file=str(run_dir / "model.txt"))
    train_info = json.loads((run_dir / "train.json").read_text()) if (run_dir / "train.json").is_file() else {}
    model = booster_to_onnx(booster)
    model_bytes = model.SerializeToString()
    X, offsets, rows = parity_sample(lake, ds, n_parity)
    parity = parity_check(booster, model_bytes, X, offsets, rows["prior_alpha"].to_numpy(),
                          rows["prior_beta"].to_numpy(), rows["prior_n"].to_numpy(), policy)
    final = run_dir / "bundle"
    staging = run_dir / f".bundle-staging-{dt.datetime.now(dt.UTC):%Y%m%d%H%M%S%f}"
    staging.mkdir(parents=True)
    try:
        (staging / bundle.MODEL_FILE).write_bytes(model_bytes)
        (staging / "feature_spec.json").write_text(json.dumps(feature_spec.spec_dict(), indent=2))
        counts = {"priors": _copy_table(lake.priors(ds), staging / "priors.parquet"),
                  "members": _copy_table(lake.member_features(ds), staging / "members.parquet")}
        arts = active_artworks(lake, ds)
        arts.to_parquet(staging / "artworks.parquet", index=False)
        counts["artworks"] = len(arts)
        evaluation = run_dir / "evaluation.json"
        metrics = {"train": train_info.get("metrics", {})}
        if evaluation.is_file():
            metrics["evaluation"] = json.loads(evaluation.read_text()).get("policies", {})
        digest = bundle.sha256(staging / bundle.MODEL_FILE)[:10]
        bundle.write_manifest(
            staging, bundle_version=f"{ds}.{digest}",
            created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), ds=ds,
            training_window=train_info.get("window", {}), heldout_ds=train_info.get("heldout_ds"),
            policy=asdict(policy), metrics=metrics, parity=parity, row_counts=counts,
            model={"format": "onnx", "target_opset": TARGET_OPSET, "trees": booster.num_trees()},
            versions={"lightgbm": lgb.__version__, "onnx": onnx.__version__,
                      "onnxmltools": onnxmltools.__version__, "onnxruntime": onnxruntime.__version__})
        manifest = bundle.verify(staging)
        if final.exists():
            old = run_dir / f".bundle-old-{digest}"
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            shutil.rmtree(old)
        staging.rename(final)
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
        return 1
    p = manifest["parity"]
    print(f"bundle {manifest.version}: parity max |dp| {p['max_abs_diff']:.2e} over {p['rows']} rows, "
          f"greedy agreement {p['greedy_agreement']:.4f}")
    return 0
