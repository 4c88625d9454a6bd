"""The Open Bandit Dataset (Saito et al., 2021) mapped onto keyart's impression log.

OBD (ZOZOTOWN fashion recommendations, https://research.zozo.com/data.html) ships one
CSV per behaviour policy and campaign, ``{random,bts}/{all,men,women}.csv``: an unnamed
index column, then ``timestamp, item_id, position, click, propensity_score,
user_feature_0..3, user-item_affinity_<item>...``. Each row is one item shown in one of
three slots of a recommendation widget.

Mapping onto the ``rewards`` contract (labelled impressions, docs/architecture.md)
================================  ==========================================================
keyart column                     OBD source
================================  ==========================================================
event_id                          ``obd-<campaign>-<policy>-<index>`` (the CSV index)
ts, impression_ds                 timestamp (UTC) and its date
member_id                         ``obd-u<hash>`` of user_feature_0..3 (OBD has no user id:
                                  users with identical hashed features share an id)
title_id                          the slot, ``obd-<campaign>-pos<k>`` (k = 0, 1, 2): the
                                  "title" whose "artwork" is chosen
artwork_id                        ``obd-<campaign>-item<item_id>``
candidates                        every item of the campaign (80 all, 34 men, 46 women)
propensity                        propensity_score: P(item at this slot) under the
                                  behaviour policy (uniform random or Bernoulli TS)
policy, model_version             the behaviour policy name, ``obd-<policy>``
context                           device "web" and country "JP" (placeholders: OBD has
                                  neither), local hour / weekday in JST, page_row 0,
                                  position = slot
reward, played                    click
minutes                           0 (OBD has no watch time)
================================  ==========================================================

Slots are treated as independent decisions, as in the Open Bandit Pipeline's
position-wise evaluation; the three items of one widget are in fact drawn without
replacement, so a per-slot value is what the estimators report. The user features are
kept as ``user_feature_*`` columns for a reward model. :func:`open_bandit_pages` expands
the log to candidate rows and returns :class:`keyart.ope.LoggedPages`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from keyart.ope import LoggedPages

CAMPAIGN_ITEMS = {"all": 80, "men": 34, "women": 46}
BEHAVIOR_POLICIES = ("random", "bts")
REQUIRED = ("timestamp", "item_id", "position", "click", "propensity_score")
JST_OFFSET = pd.Timedelta(hours=9)


def _member_id(row: tuple) -> str:
    return "obd-u" + hashlib.sha1("|".join(map(str, row)).encode()).hexdigest()[:12]


def load_open_bandit_csv(path: str | Path, campaign: str = "all", behavior_policy: str = "random",
                         n_items: int | None = None) -> pd.DataFrame:
    """Read one OBD CSV as labelled impressions in the ``rewards`` contract layout.

    Parameters
    ----------
    path : the CSV (``<policy>/<campaign>.csv`` of OBD, or a sample in that format).
    campaign : ``all``, ``men`` or ``women`` (sets the candidate list).
    behavior_policy : ``random`` or ``bts`` (recorded as the logging policy).
    n_items : candidate count; default the campaign's item count.

    Returns
    -------
    DataFrame, one row per impression: the rewards-contract columns plus ``user_feature_*``.
    """
    if campaign not in CAMPAIGN_ITEMS:
        raise ValueError(f"campaign must be one of {tuple(CAMPAIGN_ITEMS)}, got {campaign!r}")
    if behavior_policy not in BEHAVIOR_POLICIES:
        raise ValueError(f"behavior_policy must be one of {BEHAVIOR_POLICIES}, got {behavior_policy!r}")
    raw = pd.read_csv(path, index_col=0)
    missing = [c for c in REQUIRED if c not in raw.columns]
    if missing:
        raise ValueError(f"{path}: not an Open Bandit Dataset CSV, lacks columns {missing}")
    n_items = n_items or CAMPAIGN_ITEMS[campaign]
    item = raw["item_id"].to_numpy(dtype=np.int64)
    if item.min() < 0 or item.max() >= n_items:
        raise ValueError(f"{path}: item_id outside 0..{n_items - 1}")
    p = raw["propensity_score"].to_numpy(dtype=np.float64)
    if not (np.isfinite(p).all() and (p > 0).all() and (p <= 1).all()):
        raise ValueError(f"{path}: propensity_score must be in (0, 1]")
    click = raw["click"].to_numpy(dtype=np.int64)
    if not np.isin(click, (0, 1)).all():
        raise ValueError(f"{path}: click must be 0 or 1")
    ts = pd.to_datetime(raw["timestamp"], utc=True)
    local = ts + JST_OFFSET
    slot = raw["position"].to_numpy(dtype=np.int64)
    slot = slot - slot.min()  # OBD numbers slots 1..3
    user_cols = [c for c in raw.columns if c.startswith("user_feature_")]
    members = [_member_id(r) for r in raw[user_cols].itertuples(index=False)] if user_cols \
        else ["obd-u-unknown"] * len(raw)
    prefix = f"obd-{campaign}"
    candidates = [f"{prefix}-item{i}" for i in range(n_items)]
    out = pd.DataFrame({
        "event_id": [f"{prefix}-{behavior_policy}-{i}" for i in raw.index],
        "ts": ts.to_numpy(),
        "member_id": members,
        "title_id": [f"{prefix}-pos{k}" for k in slot],
        "artwork_id": [candidates[i] for i in item],
        "candidates": [candidates] * len(raw),
        "propensity": p,
        "model_version": f"obd-{behavior_policy}",
        "policy": behavior_policy,
        "context": [{"device": "web", "country": "JP", "local_hour": int(h), "day_of_week": int(d),
                     "page_row": 0, "position": int(k)}
                    for h, d, k in zip(local.dt.hour, local.dt.dayofweek, slot, strict=True)],
        "impression_ds": ts.dt.date.to_numpy(),
        "reward": click,
        "minutes": 0.0,
        "played": click,
    })
    for c in user_cols:
        out[c] = raw[c].to_numpy()
    return out


def open_bandit_pages(impressions: pd.DataFrame) -> tuple[LoggedPages, pd.DataFrame]:
    """Expand impressions to candidate rows: (pages, rows [n * K] with ``is_logged``)."""
    k = impressions["candidates"].map(len).to_numpy()
    rows = pd.DataFrame({
        "event_id": np.repeat(impressions["event_id"].to_numpy(), k),
        "title_id": np.repeat(impressions["title_id"].to_numpy(), k),
        "artwork_id": np.concatenate([np.asarray(c) for c in impressions["candidates"]]),
    })
    rows["is_logged"] = rows["artwork_id"].to_numpy() == np.repeat(impressions["artwork_id"].to_numpy(), k)
    offsets = np.r_[0, np.cumsum(k)]
    logged_row = np.flatnonzero(rows["is_logged"].to_numpy())
    if len(logged_row) != len(impressions):
        raise ValueError("every impression's artwork_id must be one of its candidates, exactly once")
    pages = LoggedPages(offsets=offsets, logged_row=logged_row,
                        reward=impressions["reward"].to_numpy(dtype=np.float64),
                        propensity=impressions["propensity"].to_numpy(dtype=np.float64),
                        groups=impressions["member_id"].to_numpy())
    return pages, rows
