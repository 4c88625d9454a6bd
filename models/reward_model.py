"""The reward model: LightGBM predicting P(quality play | member, context, title, artwork).

Trained on the *logged* rows of the training table (the artwork that was shown and its
outcome), float32 features in :data:`keyart.feature_spec.FEATURE_NAMES` order.

Importance weights
------------------
Logs from an exploiting policy over-represent the arms it liked, so the model would fit
them best and extrapolate to the rest. Re-weighting a row by ``(1 / K) / propensity``
(K = candidates of the impression) makes the logs look like uniform-random logging, at a
price: the weights' effective sample size ``(sum w)^2 / sum w^2`` falls far below the row
count, so the model learns from fewer rows. ``TrainConfig.weighting`` picks the trade:

``clipped``  ``min(ratio, max_weight)``: close to uniform, the highest variance;
``sqrt``     ``sqrt(min(ratio, max_weight))``: half-way in log space;
``none``     every row weight 1: the most rows, the logging policy's preference kept.

Weights are normalised to mean 1. Uniform logs (every ``propensity * K == 1``) get weight
1 under every rule. The default was chosen by measurement (docs/models.md).

Capacity
--------
The tree count is chosen by early stopping on a validation set *pooled over days*: the
newest ``valid_fraction`` of each labelled day (``day``), so a window of several days is
judged on all of them and not on the tail of its last day alone. The count is at least
:meth:`TrainConfig.trees_floor`. Then, with ``refit``, the shipped model is fit again on
every row (validation rows included) with the same parameters and that many trees: the
validation rows are the newest of each day and the most like tomorrow.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, get_args

import lightgbm as lgb
import numpy as np
import pandas as pd

from keyart.config import Settings, TrainWeighting
from keyart.feature_spec import FEATURE_NAMES, FEATURE_SPEC_VERSION, N_FEATURES

Weighting = TrainWeighting
WEIGHTINGS: tuple[str, ...] = get_args(TrainWeighting)
DEFAULT_WEIGHTING: Weighting = Settings.model_fields["train_weighting"].default
"""The ``train_weighting`` setting's default, chosen by measurement (docs/models.md)."""


@dataclass(frozen=True)
class TrainConfig:
    """LightGBM settings and the validation split.

    Parameters
    ----------
    num_boost_round : upper bound on trees; early stopping usually ends sooner.
    early_stopping_rounds : stop after this many rounds without a better validation logloss.
    valid_fraction : newest share of each day's rows (by ``ts``) used for validation.
    max_weight : clip on importance weights before normalisation.
    weighting : ``none``, ``sqrt`` or ``clipped`` (module docstring).
    refit : ship a model refit on every row with the chosen tree count.
    min_trees : floor on the tree count; None = :meth:`trees_floor` of the learning rate.
    """

    learning_rate: float = 0.05
    num_leaves: int = 31
    min_data_in_leaf: int = 100
    feature_fraction: float = 0.9
    lambda_l2: float = 1.0
    num_boost_round: int = 600
    early_stopping_rounds: int = 40
    valid_fraction: float = 0.15
    max_weight: float = 20.0
    num_threads: int = 2
    seed: int = 7
    weighting: Weighting = DEFAULT_WEIGHTING
    refit: bool = True
    min_trees: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.learning_rate <= 1.0:
            raise ValueError(f"learning_rate must be in (0, 1], got {self.learning_rate}")
        if self.num_leaves < 2:
            raise ValueError(f"num_leaves must be >= 2, got {self.num_leaves}")
        if self.min_data_in_leaf < 1:
            raise ValueError(f"min_data_in_leaf must be >= 1, got {self.min_data_in_leaf}")
        if not 0.0 < self.feature_fraction <= 1.0:
            raise ValueError(f"feature_fraction must be in (0, 1], got {self.feature_fraction}")
        if self.num_boost_round < 1 or self.early_stopping_rounds < 1:
            raise ValueError("num_boost_round and early_stopping_rounds must be >= 1")
        if not 0.0 < self.valid_fraction < 0.5:
            raise ValueError(f"valid_fraction must be in (0, 0.5), got {self.valid_fraction}")
        if self.max_weight < 1.0:
            raise ValueError(f"max_weight must be >= 1, got {self.max_weight}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.min_trees is not None and not 1 <= self.min_trees <= self.num_boost_round:
            raise ValueError(f"min_trees must be in [1, num_boost_round], got {self.min_trees}")

    def trees_floor(self) -> int:
        """Fewest trees the model may have.

        Each tree fits only ``learning_rate`` of the residual it sees, so after B trees a
        signal one tree can capture is in the model to ``1 - (1 - lr)^B``. Below 90% the
        count measures the shrinkage, not the data: early stopping on a noisy validation
        curve then ships a model still close to the base rate (lr 0.05: 45 trees).
        """
        if self.min_trees is not None:
            return self.min_trees
        return min(self.num_boost_round, math.ceil(math.log(0.1) / math.log(1.0 - self.learning_rate))
                   if self.learning_rate < 1.0 else 1)

    def lgb_params(self) -> dict[str, Any]:
        return {
            "objective": "binary",
            "learning_rate": self.learning_rate,
            "num_leaves": self.num_leaves,
            "min_data_in_leaf": self.min_data_in_leaf,
            "feature_fraction": self.feature_fraction,
            "lambda_l2": self.lambda_l2,
            "num_threads": self.num_threads,
            "seed": self.seed,
            "deterministic": True,
            "force_col_wise": True,
            "verbose": -1,
        }


@dataclass
class TrainResult:
    """A trained booster and what train.json records about it."""

    booster: lgb.Booster
    metrics: dict[str, dict[str, float]]
    info: dict[str, Any] = field(default_factory=dict)

    def train_json(self, cfg: TrainConfig) -> dict[str, Any]:
        return {"params": asdict(cfg), "feature_spec_version": FEATURE_SPEC_VERSION,
                "feature_names": list(FEATURE_NAMES), "metrics": self.metrics, **self.info}


# ---------------------------------------------------------------------------------------
# Weights and split
# ---------------------------------------------------------------------------------------

def importance_weights(propensity: np.ndarray, n_candidates: np.ndarray, max_weight: float = 20.0,
                       weighting: str = "clipped") -> np.ndarray:
    """Row weights [n], mean 1 (ones if the logging was uniform or ``weighting`` is ``none``).

    Parameters
    ----------
    propensity : [n] logging probability of the shown artwork, in (0, 1].
    n_candidates : [n] number of candidate artworks of the impression (K >= 1).
    weighting : ``clipped`` (ratio to uniform logging, clipped at ``max_weight``), ``sqrt``
        (its square root) or ``none``.
    """
    p = np.asarray(propensity, dtype=np.float64)
    k = np.asarray(n_candidates, dtype=np.float64)
    if p.shape != k.shape:
        raise ValueError(f"propensity and n_candidates differ in shape: {p.shape} vs {k.shape}")
    if np.any(~np.isfinite(p)) or np.any(p <= 0) or np.any(p > 1):
        raise ValueError("propensity must be in (0, 1]")
    if np.any(k < 1):
        raise ValueError("n_candidates must be >= 1")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if weighting == "none" or len(p) == 0 or np.allclose(p * k, 1.0, rtol=0, atol=1e-6):
        return np.ones_like(p)
    w = np.minimum((1.0 / k) / p, max_weight)
    if weighting == "sqrt":
        w = np.sqrt(w)
    return w / w.mean()


def effective_size(w: np.ndarray) -> float:
    """Kish effective sample size of weights: (sum w)^2 / sum w^2 (n for equal weights)."""
    w = np.asarray(w, dtype=np.float64)
    return float(w.sum() ** 2 / (w ** 2).sum()) if len(w) and (w ** 2).sum() > 0 else 0.0


def time_split(ts: np.ndarray, valid_fraction: float, day: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train [n_train], valid [n_valid]): the newest ``valid_fraction`` by time,
    of every ``day`` separately when given (validation pooled over days)."""
    ts = np.asarray(ts)
    if day is None:
        groups = [np.arange(len(ts))]
    else:
        _, inverse = np.unique(np.asarray(day), return_inverse=True)
        groups = [np.flatnonzero(inverse == g) for g in range(inverse.max() + 1)] if len(ts) else []
    valid = []
    for rows in groups:
        order = rows[np.argsort(ts[rows], kind="stable")]
        n_valid = int(round(len(order) * valid_fraction))
        valid.append(order[len(order) - n_valid:] if n_valid else order[:0])
    va = np.sort(np.concatenate(valid)) if valid else np.zeros(0, np.int64)
    if len(va) == 0 and len(ts) > 1:  # too few rows per day: the newest row overall
        va = np.array([int(np.argsort(ts, kind="stable")[-1])])
    if len(ts) - len(va) < 1 or len(va) < 1:
        raise ValueError(f"too few rows ({len(ts)}) for a validation split")
    tr = np.setdiff1d(np.arange(len(ts)), va, assume_unique=True)
    return tr, va


# ---------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------

def weighted_auc(y: np.ndarray, p: np.ndarray, w: np.ndarray | None = None) -> float:
    """Area under the ROC curve with sample weights (ties count one half); NaN if one class."""
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    w = np.ones_like(y) if w is None else np.asarray(w, dtype=np.float64)
    pos_w, neg_w = w * (y > 0.5), w * (y <= 0.5)
    if pos_w.sum() == 0 or neg_w.sum() == 0:
        return float("nan")
    uniq, inv = np.unique(p, return_inverse=True)
    pos_by = np.bincount(inv, weights=pos_w, minlength=len(uniq))
    neg_by = np.bincount(inv, weights=neg_w, minlength=len(uniq))
    neg_below = np.cumsum(neg_by) - neg_by
    return float((pos_by * (neg_below + 0.5 * neg_by)).sum() / (pos_w.sum() * neg_w.sum()))


def classification_metrics(y: np.ndarray, p: np.ndarray, w: np.ndarray | None = None,
                           n_bins: int = 10) -> dict[str, float]:
    """Logloss, AUC and calibration of predictions ``p`` [n] for labels ``y`` [n].

    Calibration: ``calibration_ratio`` = mean prediction / mean label (1 is perfect) and
    ``ece`` = weighted mean |mean prediction - mean label| over ``n_bins`` quantile bins.
    """
    y = np.asarray(y, dtype=np.float64)
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    w = np.ones_like(y) if w is None else np.asarray(w, dtype=np.float64)
    if len(y) == 0:
        raise ValueError("no rows to score")
    wsum = w.sum()
    logloss = float(-(w * (y * np.log(p) + (1 - y) * np.log(1 - p))).sum() / wsum)
    edges = np.unique(np.quantile(p, np.linspace(0, 1, n_bins + 1)))
    bins = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, max(len(edges) - 2, 0))
    bw = np.bincount(bins, weights=w)
    ok = bw > 0
    pred_b = np.bincount(bins, weights=w * p)[ok] / bw[ok]
    obs_b = np.bincount(bins, weights=w * y)[ok] / bw[ok]
    ece = float((bw[ok] * np.abs(pred_b - obs_b)).sum() / wsum)
    mean_y = float((w * y).sum() / wsum)
    mean_p = float((w * p).sum() / wsum)
    return {"logloss": logloss, "auc": weighted_auc(y, p, w), "ece": ece,
            "mean_label": mean_y, "mean_prediction": mean_p,
            "calibration_ratio": mean_p / mean_y if mean_y > 0 else float("nan"), "rows": int(len(y))}


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------

def logged_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The shown-artwork rows of a training table, with ``n_candidates`` per impression."""
    for col in ("event_id", "is_logged", "reward", "propensity", "ts"):
        if col not in frame.columns:
            raise KeyError(f"training table lacks column {col!r}")
    k = frame.groupby("event_id", sort=False)["event_id"].transform("size")
    out = frame.assign(n_candidates=k.to_numpy())
    out = out[out["is_logged"].astype(bool)]
    dup = out["event_id"].duplicated()
    if dup.any():
        raise ValueError(f"{int(dup.sum())} impressions have more than one is_logged row")
    return out.reset_index(drop=True)


def train_reward_model(X: np.ndarray, y: np.ndarray, ts: np.ndarray, propensity: np.ndarray,
                       n_candidates: np.ndarray, cfg: TrainConfig | None = None,
                       day: np.ndarray | None = None) -> TrainResult:
    """Fit the reward model on logged impressions.

    Parameters
    ----------
    X : [n, N_FEATURES] float32 features of the shown artwork.
    y : [n] reward (1 = quality play).
    ts : [n] impression time (orders the validation split).
    propensity, n_candidates : [n] logging propensity and candidate count (weights).
    day : [n] labelled day of each row: validation takes the newest share of each day.

    The tree count is chosen by early stopping on the validation rows (at least
    ``cfg.trees_floor()``); with ``cfg.refit`` the returned booster is fit again on every
    row with that count, else it is the early-stopped one. ``metrics`` are those of the
    early-stopped model at that count (the refit model has no unseen rows to be judged on).
    """
    cfg = cfg or TrainConfig()
    X = np.ascontiguousarray(X, dtype=np.float32)
    y = np.asarray(y, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] != N_FEATURES:
        raise ValueError(f"X must be [n, {N_FEATURES}], got {X.shape}")
    if len(y) != len(X) or len(ts) != len(X) or (day is not None and len(day) != len(X)):
        raise ValueError(f"X, y, ts and day must have the same rows: {len(X)}, {len(y)}, {len(ts)}"
                         + (f", {len(day)}" if day is not None else ""))
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("rewards must be 0 or 1")
    if not np.isfinite(X).all():
        raise ValueError("features contain NaN or infinite values")
    t0 = time.perf_counter()
    w = importance_weights(propensity, n_candidates, cfg.max_weight, cfg.weighting)
    tr, va = time_split(ts, cfg.valid_fraction, day)
    floor = cfg.trees_floor()
    dtrain = lgb.Dataset(X[tr], y[tr], weight=w[tr], feature_name=list(FEATURE_NAMES), free_raw_data=False)
    dvalid = lgb.Dataset(X[va], y[va], weight=w[va], reference=dtrain)
    curve: dict[str, Any] = {}
    # patience of at least the floor: the curve is recorded that far even when it turns at once
    selector = lgb.train(cfg.lgb_params(), dtrain, num_boost_round=cfg.num_boost_round,
                         valid_sets=[dvalid], valid_names=["valid"],
                         callbacks=[lgb.early_stopping(max(cfg.early_stopping_rounds, floor), verbose=False),
                                    lgb.record_evaluation(curve)])
    stopped_at = int(selector.best_iteration or selector.current_iteration())
    trees = max(stopped_at, floor)
    select_s = time.perf_counter() - t0
    metrics = {
        "train": classification_metrics(y[tr], selector.predict(X[tr], num_iteration=trees), w[tr]),
        "valid": classification_metrics(y[va], selector.predict(X[va], num_iteration=trees), w[va]),
    }
    booster = selector
    t1 = time.perf_counter()
    if cfg.refit:
        full = lgb.Dataset(X, y, weight=w, feature_name=list(FEATURE_NAMES))
        booster = lgb.train(cfg.lgb_params(), full, num_boost_round=trees)
    else:
        booster.best_iteration = trees
    info = {"rows": {"train": int(len(tr)), "valid": int(len(va)), "fit": int(len(X) if cfg.refit else len(tr))},
            "best_iteration": int(trees), "early_stopping_iteration": stopped_at, "trees_floor": int(floor),
            "refit": bool(cfg.refit), "weighting": cfg.weighting,
            "importance_weighted": bool(not np.allclose(w, 1.0)),
            "weights_effective_size": round(effective_size(w), 1),
            "valid_days": int(len(np.unique(np.asarray(day)[va]))) if day is not None else 1,
            "timings": {"fit_s": round(select_s + time.perf_counter() - t1, 3), "select_s": round(select_s, 3),
                        "refit_s": round(time.perf_counter() - t1, 3)}}
    return TrainResult(booster=booster, metrics=metrics, info=info)


def predict(booster: lgb.Booster, X: np.ndarray) -> np.ndarray:
    """P(quality play) [n] from the native booster (its best iteration)."""
    return booster.predict(np.asarray(X, dtype=np.float32))
