"""Data for ``keyart bench learning``: simulated logs through the Spark jobs, and the
feature rows of fresh simulated visits as serving would build them.

The logs go through the real pipeline (``keyart.sim`` traffic -> ingest -> rewards ->
features -> priors, in-process on ``local[2]``) so the model trains on exactly what the
daily DAG would give it. For valuation, every candidate of every slot of new visits gets
its feature row from :func:`keyart.feature_spec.feature_matrix` (the one specification), with
the member snapshot, priors and vocabulary of the last logged day: what the bundle would hold.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from keyart import feature_spec
from keyart.contracts import DEVICES
from keyart.lake import Lake, shift_ds
from keyart.models.data import read_table_dir


def simulate_and_label(world, lake: Lake, days: list[str], n_visits: int, seed: int) -> None:
    """Uniform-random traffic on each of ``days``, labelled by the Spark jobs.

    Runs ingest (from the first day of the world's viewing history), then rewards ->
    features -> priors for every day through the day after the last (late impressions are
    labelled the day after), as the daily DAG would.
    """
    from keyart.jobs import features as features_job
    from keyart.jobs import ingest, priors, rewards
    from keyart.jobs.common import get_spark, run_job
    from keyart.sim.choosers import RandomChooser
    from keyart.sim.traffic import simulate_day

    for day in days:
        simulate_day(world, day, RandomChooser(), visits=n_visits, seed=seed, lake_root=lake.root)
    # mapInPandas workers must run this interpreter (the one with pandas and keyart)
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    spark = get_spark("keyart-bench-learning", master="local[2]", shuffle_partitions=4, ui=False)
    try:
        def job(module, day: str, through: str | None = None) -> None:
            args = argparse.Namespace(ds=day, through=through, lake=str(lake.root), master=None, shuffle_partitions=None)
            run_job(module.__name__.rsplit(".", 1)[-1], module.run, args, spark=spark)

        last = shift_ds(days[-1], 1)
        # the world's viewing history too, as the demo and a production lake have it: member
        # taste features are built from it
        job(ingest, shift_ds(days[0], -world.config.history_days), last)
        for day in [*days, last]:
            job(rewards, day)
            job(features_job, day)
            job(priors, day)
    finally:
        spark.stop()


@dataclass
class SlotRows:
    """Candidate rows of a set of visits, aligned with ``visits.candidates``.

    Attributes
    ----------
    X : [n, N_FEATURES] float32 features; row order = ``visits.candidates >= 0`` in C order.
    offsets : [S + 1] candidate rows of slot s (slots in C order of [V, P]).
    prior_alpha, prior_beta, prior_n : [n] segment-'all' prior of every row.
    """

    X: np.ndarray
    offsets: np.ndarray
    prior_alpha: np.ndarray
    prior_beta: np.ndarray
    prior_n: np.ndarray

    def to_vpk(self, probs: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """Scatter flat row probabilities [n] into [V, P, K] (0 on padding)."""
        out = np.zeros(candidates.shape)
        out[candidates >= 0] = probs
        return out


def visit_rows(world, visits, lake: Lake, ds: str) -> SlotRows:
    """Feature rows of every candidate of every slot of ``visits``, with day ``ds``'s snapshot/priors."""
    cat = world.catalog
    mask = visits.candidates >= 0
    k = mask.sum(-1).reshape(-1)
    offsets = np.r_[0, np.cumsum(k)]
    art = visits.candidates[mask]
    slot_of_row = np.repeat(np.arange(len(k)), k)
    ctx = {name: np.asarray(v).reshape(-1)[slot_of_row] for name, v in visits.slot_context().items()}

    snap = read_table_dir(lake.member_features(ds)).set_index("member_id")
    member_ids = np.asarray(world.members.member_ids, dtype=object)[ctx["member_idx"]]
    known = pd.Index(snap.index).get_indexer(member_ids)
    has = known >= 0
    pick = np.where(has, known, 0)

    def member_col(name: str, default):
        vals = snap[name].to_numpy()[pick]
        return [v if h else default for v, h in zip(vals, has, strict=True)] if not has.all() else list(vals)

    is_kids = np.asarray(world.members.is_kids)[ctx["member_idx"]].astype(int)
    pri = read_table_dir(lake.priors(ds))
    art_ids = np.asarray(cat.art_ids, dtype=object)[art]
    title_ids = np.asarray(cat.title_ids, dtype=object)[cat.art_title[art]]

    def prior_of(segment: pd.Series | str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        keyed = pri.set_index(["artwork_id", "segment"])
        seg = np.full(len(art_ids), segment, dtype=object) if isinstance(segment, str) else segment
        idx = keyed.index.get_indexer(pd.MultiIndex.from_arrays([art_ids, seg]))
        ok = idx >= 0
        take = np.where(ok, idx, 0)
        col = lambda c: np.where(ok, keyed[c].to_numpy()[take], np.nan)  # noqa: E731
        return col("alpha"), col("beta"), col("n_impressions")

    a_all, b_all, n_all = prior_of(feature_spec.SEGMENT_ALL)
    seg = np.array([feature_spec.member_segment(x) for x in is_kids], dtype=object)
    a_seg, b_seg, _ = prior_of(seg)
    prior = feature_spec.prior_inputs(a_all, b_all, n_all, a_seg, b_seg, title_ids)
    inputs = {
        "member_known": has.astype(int),
        "member_is_kids": member_col("member_is_kids", 0),
        "member_log_plays_28d": member_col("member_log_plays_28d", 0.0),
        "member_days_since_last_play": member_col("member_days_since_last_play", feature_spec.DAYS_SINCE_CAP),
        "affinity_tags": member_col("affinity_tags", []),
        "affinity_values": member_col("affinity_values", []),
        **{c: member_col(c, []) if c in snap.columns else [[]] * len(art)
           for c in ("response_tags", "response_values", "response_n", "member_factors")},
        "device": np.asarray(DEVICES, dtype=object)[ctx["device"]],
        "local_hour": ctx["local_hour"], "day_of_week": ctx["day_of_week"],
        "page_row": ctx["page_row"], "position": ctx["position"],
        "art_tags": [cat.art_tags[i] for i in art],
        "art_is_default": cat.art_is_default[art].astype(int),
        "title_genres": [cat.title_genres[t] for t in cat.art_title[art]],
        "title_id": title_ids,
        **prior,
    }
    missing = ~np.isfinite(a_all)
    alpha = np.where(missing, feature_spec.DEFAULT_PRIOR[0], a_all)
    beta = np.where(missing, feature_spec.DEFAULT_PRIOR[1], b_all)
    vocabulary = feature_spec.read_vocabulary(lake.root, ds)
    return SlotRows(X=feature_spec.feature_matrix(inputs, vocabulary), offsets=offsets, prior_alpha=alpha, prior_beta=beta,
                    prior_n=np.where(missing, 0.0, np.nan_to_num(n_all)))


def ensure_path(path: Path | None) -> Path:
    import tempfile

    return Path(path) if path else Path(tempfile.mkdtemp(prefix="keyart-bench-learning-"))
