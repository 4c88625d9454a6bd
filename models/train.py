"""``keyart train --ds D``: fit the reward model on the training window of D.

Reads ``features/training`` for the window (see :mod:`keyart.models.data`) and, from the
older labelled days within ``training_exploration_horizon_days``, the impressions that were
logged uniformly at random (:func:`keyart.lake.exploration_days`); writes
``runs/ds=D/model.txt`` (LightGBM, the shipped model: refit on every row with the chosen
tree count) and ``runs/ds=D/train.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from keyart.config import settings
from keyart.lake import Lake, exploration_days, fmt_ds, heldout_day, is_cold_start, training_days
from keyart.models.data import feature_array, read_training, time_split_rows, uniform_impressions
from keyart.models.reward_model import TrainConfig, TrainResult, train_reward_model

log = logging.getLogger(__name__)
TRAIN_COLUMNS = ("event_id", "ts", "is_logged", "reward", "propensity", "features")


TRAIN_ORDER = (("ts", "ascending"), ("event_id", "ascending"), ("is_logged", "ascending"))
"""Spark writes rows in no fixed order; this fixed order makes a rerun train the same model."""


def logged_arrays(table: pa.Table, order_by: Sequence[tuple[str, str]] | None = None) -> dict[str, np.ndarray]:
    """Features and labels of the shown rows, with each impression's candidate count and
    (when the table has the ``ds`` column :func:`read_training` adds) its labelled day.

    With ``order_by`` the shown rows come in the order a stable sort of the whole table by
    those keys gives them (``table.sort_by(order_by)`` first, the same arrays): the sort runs
    on the shown rows alone, since a stable sort keeps the relative order of any subset, and
    only they are copied (a day has ~7 candidate rows per shown one, each with its feature list).
    """
    events = table.column("event_id").combine_chunks()
    if events.null_count:
        raise ValueError(f"event_id has {events.null_count} null rows")
    codes = pc.dictionary_encode(events).indices.to_numpy()
    counts = np.bincount(codes)  # candidate rows of every impression
    logged = table.column("is_logged").to_numpy(zero_copy_only=False).astype(bool)
    shown = table.filter(pa.array(logged)).append_column("_n_candidates", pa.array(counts[codes[logged]]))
    if order_by is not None:
        shown = shown.sort_by(list(order_by))
    ts = pc.cast(shown.column("ts"), pa.int64()) if pa.types.is_timestamp(shown.column("ts").type) else shown.column("ts")
    out = {"X": feature_array(shown.column("features")),
           "y": shown.column("reward").to_numpy().astype(np.float64),
           "ts": np.asarray(ts.to_numpy()),
           "propensity": shown.column("propensity").to_numpy().astype(np.float64),
           "n_candidates": shown.column("_n_candidates").to_numpy()}
    if "ds" in shown.column_names:
        out["day"] = shown.column("ds").to_numpy(zero_copy_only=False)
    return out


def train_run(lake: Lake, ds: str, window_days: int, cfg: TrainConfig | None = None,
              run_dir: Path | None = None, exploration_horizon_days: int | None = None) -> dict[str, Any]:
    """Train on the window of ``ds`` (plus the uniformly-logged impressions of the labelled
    days within ``exploration_horizon_days`` before it) and write model.txt and train.json;
    return train.json. ``cfg`` and the horizon default to the settings'."""
    cfg = cfg or train_config(settings())
    if exploration_horizon_days is None:
        exploration_horizon_days = settings().training_exploration_horizon_days
    t0 = time.perf_counter()
    days = training_days(lake, ds, window_days)
    if not days:
        raise FileNotFoundError(f"no labelled days in the {window_days}-day window before the held-out day of {ds}")
    heldout = heldout_day(lake, ds)
    table = read_training(lake, days, columns=TRAIN_COLUMNS)
    if is_cold_start(days, heldout):
        table = time_split_rows(table, "train")
    older = exploration_days(lake, ds, window_days, exploration_horizon_days)
    kept: dict[str, int] = {}
    if older:
        uniform = uniform_impressions(read_training(lake, older, columns=TRAIN_COLUMNS))
        kept = dict(Counter(uniform.filter(uniform.column("is_logged")).column("ds").to_pylist()))
        table = pa.concat_tables([uniform, table], promote_options="default")
    arrays = logged_arrays(table, order_by=TRAIN_ORDER)
    load_s = time.perf_counter() - t0
    result: TrainResult = train_reward_model(cfg=cfg, **arrays)
    run_dir = Path(run_dir) if run_dir else lake.run_dir(ds)
    run_dir.mkdir(parents=True, exist_ok=True)
    result.booster.save_model(str(run_dir / "model.txt"), num_iteration=result.booster.best_iteration or None)
    info = result.train_json(cfg)
    info.update(ds=ds, heldout_ds=heldout, cold_start_split=is_cold_start(days, heldout),
                window={"days": days, "first_ds": days[0], "last_ds": days[-1], "window_days": window_days,
                        "exploration_horizon_days": exploration_horizon_days,
                        "exploration_impressions": kept})
    info["timings"]["load_s"] = round(load_s, 3)
    (run_dir / "train.json").write_text(json.dumps(info, indent=2, sort_keys=True))
    return info


def train_config(s: Any) -> TrainConfig:
    """The reward model's settings from keyart.config.Settings (``train_weighting``)."""
    return TrainConfig(weighting=s.train_weighting)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ds", required=True, type=fmt_ds, help="run date YYYY-MM-DD")
    parser.add_argument("--lake", type=Path, default=None, help="lake root (default: config)")
    parser.add_argument("--window-days", type=int, default=None, help="default: training_window_days")
    parser.add_argument("--run-dir", type=Path, default=None, help="default: <lake>/runs/ds=D")


def run(args: argparse.Namespace) -> int:
    s = settings()
    lake = Lake(args.lake or s.lake)
    info = train_run(lake, args.ds, args.window_days or s.training_window_days, cfg=train_config(s),
                     run_dir=args.run_dir, exploration_horizon_days=s.training_exploration_horizon_days)
    v = info["metrics"]["valid"]
    print(f"trained on {info['window']['first_ds']}..{info['window']['last_ds']} "
          f"({info['rows']['train']} + {info['rows']['valid']} rows, {info['best_iteration']} trees): "
          f"valid logloss {v['logloss']:.4f} AUC {v['auc']:.4f} ECE {v['ece']:.4f}")
    return 0
