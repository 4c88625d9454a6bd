"""The reward model: LightGBM predicting P(quality play | member, context, title, artwork).

Trained on the *logged* rows of the training table (the artwork that was shown and its
outcome), float32 features in :data:`keyart.feature_spec.FEATURE_NAMES` order.

Importance weights
------------------
Logs from an exploiting policy over-represent the arms it liked, so the model would fit
them best and extrapolate to the rest. When the logging was not uniform, each row gets
weight ``(1 / K) / propensity`` (K = candidates of the impression): the re-weighted rows
look like uniform-random logging. Weights are clipped at ``max_weight`` (bias for
variance) and normalised to mean 1. Uniform logs (every ``propensity * K == 1``) are
left unweighted.

Validation is time-ordered: the newest ``valid_fraction`` of rows by ``ts`` is held out
for early stopping and metrics, so the model is judged on data after what it saw.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import lightgbm as lgb
import numpy as np
import pandas as pd

from keyart.feature_spec import FEATURE_NAMES, FEATURE_SPEC_VERSION, N_FEATURES


@dataclass(frozen=True)
class TrainConfig:
    """LightGBM settings and the validation split.

    Parameters
    ----------
    num_boost_round : upper bound on trees; early stopping usually ends sooner.
    early_stopping_rounds : stop after this many rounds without a better validation logloss.
    valid_fraction : newest share of rows (by ``ts``) used for validation.
    max_weight : clip on importance weights before normalisation.
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

def importance_weights(propensity: np.ndarray, n_candidates: np.ndarray, max_weight: float = 20.0) -> np.ndarray:
    """Weights re-targeting logged rows to uniform logging: [n], mean 1 (ones if uniform).

    Parameters
    ----------
    propensity : [n] logging probability of the shown artwork, in (0, 1].
    n_candidates : [n] number of candidate artworks of the impression (K >= 1).
    """
    p = np.asarray(propensity, dtype=np.float64)
    k = np.asarray(n_candidates, dtype=np.float64)
    if p.shape != k.shape:
        raise ValueError(f"propensity and n_candidates differ in shape: {p.shape} vs {k.shape}")
    if np.any(~np.isfinite(p)) or np.any(p <= 0) or np.any(p > 1):
        raise ValueError("propensity must be in (0, 1]")
    if np.any(k < 1):
        raise ValueError("n_candidates must be >= 1")
    if len(p) == 0 or np.allclose(p * k, 1.0, rtol=0, atol=1e-6):
        return np.ones_like(p)
    w = np.minimum((1.0 / k) / p, max_weight)
    return w / w.mean()


def time_split(ts: np.ndarray, valid_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train [n_train], valid [n_valid]): the newest ``valid_fraction`` by time."""
    order = np.argsort(np.asarray(ts), kind="stable")
    n_valid = max(1, int(round(len(order) * valid_fraction)))
    if len(order) - n_valid < 1:
        raise ValueError(f"too few rows ({len(order)}) for a validation split")
    return np.sort(order[:-n_valid]), np.sort(order[-n_valid:])


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
                       n_candidates: np.ndarray, cfg: TrainConfig | None = None) -> TrainResult:
    """Fit the reward model on logged impressions.

    Parameters
    ----------
    X : [n, N_FEATURES] float32 features of the shown artwork.
    y : [n] reward (1 = quality play).
    ts : [n] impression time (orders the validation split).
    propensity, n_candidates : [n] logging propensity and candidate count (weights).
    """
    cfg = cfg or TrainConfig()
    X = np.ascontiguousarray(X, dtype=np.float32)
    y = np.asarray(y, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] != N_FEATURES:
        raise ValueError(f"X must be [n, {N_FEATURES}], got {X.shape}")
    if len(y) != len(X) or len(ts) != len(X):
        raise ValueError(f"X, y and ts must have the same rows: {len(X)}, {len(y)}, {len(ts)}")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("rewards must be 0 or 1")
    if not np.isfinite(X).all():
        raise ValueError("features contain NaN or infinite values")
    t0 = time.perf_counter()
    w = importance_weights(propensity, n_candidates, cfg.max_weight)
    tr, va = time_split(ts, cfg.valid_fraction)
    dtrain = lgb.Dataset(X[tr], y[tr], weight=w[tr], feature_name=list(FEATURE_NAMES), free_raw_data=False)
    dvalid = lgb.Dataset(X[va], y[va], weight=w[va], reference=dtrain)
    booster = lgb.train(cfg.lgb_params(), dtrain, num_boost_round=cfg.num_boost_round,
                        valid_sets=[dvalid], valid_names=["valid"],
                        callbacks=[lgb.early_stopping(cfg.early_stopping_rounds, verbose=False)])
    fit_s = time.perf_counter() - t0
    metrics = {
        "train": classification_metrics(y[tr], booster.predict(X[tr], num_iteration=booster.best_iteration), w[tr]),
        "valid": classification_metrics(y[va], booster.predict(X[va], num_iteration=booster.best_iteration), w[va]),
    }
    info = {"rows": {"train": int(len(tr)), "valid": int(len(va))},
            "best_iteration": int(booster.best_iteration or booster.current_iteration()),
            "importance_weighted": bool(not np.allclose(w, 1.0)),
            "timings": {"fit_s": round(fit_s, 3)}}
    return TrainResult(booster=booster, metrics=metrics, info=info)


def predict(booster: lgb.Booster, X: np.ndarray) -> np.ndarray:
    """P(quality play) [n] from the native booster (its best iteration)."""
    return booster.predict(np.asarray(X, dtype=np.float32))
