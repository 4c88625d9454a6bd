"""Synthetic bundles: a random catalog, member snapshot, priors and tree-ensemble model.

Used by ``keyart bench serving`` when no real bundle is given, and by the serving tests
(which swap in a real LightGBM model converted to ONNX). The tables follow the bundle
layout of docs/architecture.md; the model has the graph a LightGBM export has (an
``ai.onnx.ml`` TreeEnsembleRegressor of the margin and a Sigmoid, input ``features``
[N, N_FEATURES], output ``probabilities`` [N, 2]), built with ``onnx.helper`` so no training
library is needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from keyart import bundle, contracts, feature_spec

TONES = ("action", "comedy", "drama", "romance", "thriller", "horror", "family", "animation", "documentary", "scifi")
FLAGS = ("closeup", "text_heavy", "group")
CAST = tuple(f"actor_{i:03d}" for i in range(60))


@dataclass(frozen=True)
class SyntheticWorld:
    """The ids a synthetic bundle holds, for building requests."""

    title_ids: list[str]
    artworks_of: dict[str, list[str]]
    member_ids: list[str]


def artwork_rows(rng: np.random.Generator, n_titles: int, per_title: int) -> list[dict]:
    """Artwork rows (bundle columns plus catalog dates): ``per_title`` artworks per title."""
    rows = []
    for t in range(n_titles):
        tid = f"t{t + 1:04d}"
        genres = sorted({str(g) for g in rng.choice(TONES, size=int(rng.integers(1, 4)), replace=False)})
        cast = [str(c) for c in rng.choice(CAST, size=4, replace=False)]
        for j in range(per_title):
            shown = rng.choice(cast, size=int(rng.integers(0, 3)), replace=False)
            tags = [f"cast:{c}" for c in shown] + [f"tone:{rng.choice(genres)}"]
            tags += [f for f in FLAGS if rng.random() < 0.3]
            rows.append({
                "artwork_id": f"{tid}-a{j}", "title_id": tid, "tags": tags, "is_default": j == 0,
                "title_genres": genres, "active_from": "2026-01-01", "active_to": None,
            })
    return rows


def member_rows(rng: np.random.Generator, n_members: int, arts: list[dict], embedding_rank: int = 0) -> list[dict]:
    """Member snapshot rows with affinities over the catalog's genre and cast tags, and (90% of them)
    factors of ``embedding_rank``."""
    vocab = sorted({"genre:" + g for a in arts for g in a["title_genres"]}
                   | {t for a in arts for t in a["tags"] if t.startswith("cast:")})
    rows = []
    for m in range(n_members):
        k = int(rng.integers(0, min(12, len(vocab)) + 1))
        tags = [str(t) for t in rng.choice(vocab, size=k, replace=False)]
        vals = rng.dirichlet(np.ones(k)).tolist() if k else []
        rows.append({
            "member_id": f"m{m:06d}", "member_is_kids": int(rng.random() < 0.15),
            "member_log_plays_28d": float(np.log1p(rng.poisson(6))),
            "member_days_since_last_play": float(rng.integers(0, 400)),
            "affinity_tags": tags, "affinity_values": vals,
            "member_factors": (0.3 * rng.normal(size=embedding_rank)).tolist() if rng.random() < 0.9 else [],
        })
    return rows


def embeddings(rng: np.random.Generator, arts: list[dict], rank: int) -> feature_spec.Embeddings:
    """Random title factors, tag directions and title means of ``rank`` for the catalog (rank 0: none)."""
    if rank == 0:
        return feature_spec.Embeddings()
    titles = sorted({a["title_id"] for a in arts})
    tags = sorted({t for a in arts for t in a["tags"]})
    vec = lambda: tuple((0.3 * rng.normal(size=rank)).tolist())  # noqa: E731
    return feature_spec.Embeddings(rank, {t: vec() for t in titles}, {t: vec() for t in tags}, {t: vec() for t in titles},
                                   {t: vec() for t in tags})


def prior_rows(rng: np.random.Generator, arts: list[dict], coverage: float = 0.8) -> list[dict]:
    """contracts.PRIORS rows: 'all' for most artworks, some segment rows; the 'all' rows carry a
    ``model_mean`` (the bundle model's mean score, what export adds; here a function of the mean)."""
    rows = []
    for a in arts:
        if rng.random() > coverage:
            continue  # no posterior yet: serving uses DEFAULT_PRIOR
        for seg in ("all", "profile=adult", "profile=kids"):
            if seg != "all" and rng.random() < 0.5:
                continue
            n = float(rng.integers(0, 3000))
            mean = float(rng.beta(2, 12))
            rows.append({"title_id": a["title_id"], "artwork_id": a["artwork_id"], "segment": seg,
                         "alpha": 1 + mean * n, "beta": 9 + (1 - mean) * n, "n_impressions": n,
                         "model_mean": 0.5 * mean + 0.02 if seg == "all" else None})
    return rows


BUNDLE_PRIORS_SCHEMA = contracts.PRIORS.arrow_schema().append(pa.field("model_mean", pa.float64()))
ARTWORK_SCHEMA = pa.schema([
    ("artwork_id", pa.string()), ("title_id", pa.string()), ("tags", pa.list_(pa.string())),
    ("is_default", pa.bool_()), ("title_genres", pa.list_(pa.string())),
])
MEMBER_SCHEMA = pa.schema([
    ("member_id", pa.string()), ("member_is_kids", pa.int32()), ("member_log_plays_28d", pa.float64()),
    ("member_days_since_last_play", pa.float64()), ("affinity_tags", pa.list_(pa.string())),
    ("affinity_values", pa.list_(pa.float64())), ("member_factors", pa.list_(pa.float64())),
])


def write_tables(bundle_dir: Path, *, seed: int = 0, n_titles: int = 60, per_title: int = 8,
                 n_members: int = 500, embedding_rank: int = 16) -> tuple[SyntheticWorld, list[dict]]:
    """Write artworks/members/priors parquet and feature_spec.json (with embeddings of ``embedding_rank``,
    the default setting's) into ``bundle_dir``."""
    import json

    rng = np.random.default_rng(seed)
    bundle_dir = Path(bundle_dir)
    bundle_dir.mkdir(parents=True, exist_ok=True)
    arts = artwork_rows(rng, n_titles, per_title)
    members = member_rows(rng, n_members, arts, embedding_rank)
    pq.write_table(pa.Table.from_pylist([{k: a[k] for k in ARTWORK_SCHEMA.names} for a in arts],
                                        schema=ARTWORK_SCHEMA), bundle_dir / bundle.ARTWORKS_FILE)
    pq.write_table(pa.Table.from_pylist(members, schema=MEMBER_SCHEMA), bundle_dir / bundle.MEMBERS_FILE)
    pq.write_table(pa.Table.from_pylist(prior_rows(rng, arts), schema=BUNDLE_PRIORS_SCHEMA),
                   bundle_dir / bundle.PRIORS_FILE)
    vocabulary = feature_spec.Vocabulary(embeddings=embeddings(rng, arts, embedding_rank))
    (bundle_dir / bundle.SPEC_FILE).write_text(json.dumps(feature_spec.spec_dict(vocabulary), indent=2))
    artworks_of: dict[str, list[str]] = {}
    for a in arts:
        artworks_of.setdefault(a["title_id"], []).append(a["artwork_id"])
    world = SyntheticWorld(list(artworks_of), artworks_of, [m["member_id"] for m in members])
    return world, arts


def tree_ensemble_onnx(seed: int = 0, n_trees: int = 200, depth: int = 5) -> bytes:
    """A random binary tree ensemble shaped like a LightGBM export.

    Complete trees of ``depth`` levels (2**depth leaves) over random features and
    thresholds; logistic output; only the ``probabilities`` [N, 2] output is exposed. Built
    as the converter's TreeEnsembleClassifier, then put in the form export ships
    (:func:`keyart.models.export.regressor_graph`).
    """
    import onnx
    from onnx import TensorProto, helper

    from keyart.models.export import regressor_graph

    rng = np.random.default_rng(seed)
    attrs: dict[str, list] = {k: [] for k in (
        "nodes_treeids", "nodes_nodeids", "nodes_featureids", "nodes_values", "nodes_modes",
        "nodes_truenodeids", "nodes_falsenodeids", "class_treeids", "class_nodeids",
        "class_ids", "class_weights")}
    n_internal = 2 ** depth - 1
    for tree in range(n_trees):
        for node in range(2 ** (depth + 1) - 1):
            attrs["nodes_treeids"].append(tree)
            attrs["nodes_nodeids"].append(node)
            if node < n_internal:
                attrs["nodes_featureids"].append(int(rng.integers(0, feature_spec.N_FEATURES)))
                attrs["nodes_values"].append(float(rng.uniform(0.0, 1.0)))
                attrs["nodes_modes"].append("BRANCH_LEQ")
                attrs["nodes_truenodeids"].append(2 * node + 1)
                attrs["nodes_falsenodeids"].append(2 * node + 2)
            else:
                attrs["nodes_featureids"].append(0)
                attrs["nodes_values"].append(0.0)
                attrs["nodes_modes"].append("LEAF")
                attrs["nodes_truenodeids"].append(0)
                attrs["nodes_falsenodeids"].append(0)
                attrs["class_treeids"].append(tree)
                attrs["class_nodeids"].append(node)
                attrs["class_ids"].append(0)
                attrs["class_weights"].append(float(rng.normal(-2.0 / n_trees, 0.05)))
    node = helper.make_node(
        "TreeEnsembleClassifier", [bundle.INPUT_NAME], ["label", bundle.OUTPUT_NAME],
        domain="ai.onnx.ml", classlabels_int64s=[0, 1], post_transform="LOGISTIC", **attrs)
    graph = helper.make_graph(
        [node], "synthetic_reward_model",
        [helper.make_tensor_value_info(bundle.INPUT_NAME, TensorProto.FLOAT, [None, feature_spec.N_FEATURES])],
        [helper.make_tensor_value_info(bundle.OUTPUT_NAME, TensorProto.FLOAT, [None, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15),
                                                    helper.make_opsetid("ai.onnx.ml", 3)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return regressor_graph(model).SerializeToString()


def probe_block(model_bytes: bytes, seed: int = 0, n: int = 16) -> dict:
    """Probe rows for the manifest: random feature rows and the model's P(quality play)."""
    from keyart.scoring import OnnxScorer

    rng = np.random.default_rng(seed + 1)
    x = rng.uniform(0.0, 1.0, size=(n, feature_spec.N_FEATURES)).astype(np.float32)
    p = OnnxScorer(model_bytes).predict(x)
    return {"features": x.tolist(), "scores": [float(v) for v in p]}


def write_bundle(bundle_dir: Path, *, seed: int = 0, version: str = "synthetic-1",
                 model_bytes: bytes | None = None, n_titles: int = 60, per_title: int = 8,
                 n_members: int = 500, n_trees: int = 200, embedding_rank: int = 16) -> SyntheticWorld:
    """A complete, verified bundle at ``bundle_dir`` (model synthetic unless given)."""
    bundle_dir = Path(bundle_dir)
    world, _ = write_tables(bundle_dir, seed=seed, n_titles=n_titles, per_title=per_title,
                            n_members=n_members, embedding_rank=embedding_rank)
    if model_bytes is None:
        model_bytes = tree_ensemble_onnx(seed, n_trees=n_trees)
    (bundle_dir / bundle.MODEL_FILE).write_bytes(model_bytes)
    bundle.write_manifest(bundle_dir, bundle_version=version, created_at="2026-01-01T00:00:00Z",
                          probe=probe_block(model_bytes, seed))
    bundle.verify(bundle_dir)
    return world


def catalog_rows(rows: list[dict]) -> pa.Table:
    """Artwork rows as a contracts.ARTWORKS table (the lake catalog, for fallback serving)."""
    keep = [{k: r[k] for k in contracts.ARTWORKS.columns} for r in rows]
    import datetime as dt

    for r in keep:
        r["active_from"] = dt.date.fromisoformat(r["active_from"])
    return pa.Table.from_pylist(keep, schema=contracts.ARTWORKS.arrow_schema())
