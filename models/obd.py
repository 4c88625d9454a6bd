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
title_id                          the slot, ``obd-<campaign>-pos<k>``, k = position - 1
                                  (OBD's positions 1, 2, 3 are slots 0, 1, 2; any other
                                  position is refused): the "title" whose "artwork" is
                                  chosen
artwork_id                        ``obd-<campaign>-item<item_id>``
candidates                        every item of the campaign (80 all, 34 men, 46 women)
propensity                        propensity_score: P(item at this slot) under the
                                  behaviour policy (uniform random or Bernoulli TS)
candidate_probabilities           1/n_items for every item when the policy is random and
                                  every propensity_score is 1/n_items; else null (bts
                                  does not log its distribution)
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
OBD_POSITIONS = (1, 2, 3)


def _member_id(row: tuple) -> str:
    return "obd-u" + hashlib.sha1("|".join(map(str, row)).encode()).hexdigest()[:12]


def _py(value):
    return value.item() if isinstance(value, np.generic) else value


def _slots(position: pd.Series, path: str | Path) -> np.ndarray:
    """OBD's positions 1..3 as slots 0..2; any other value is refused (never re-based on
    the file's minimum, so a file without position 1 keeps its slots)."""
    pos = pd.to_numeric(position, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isin(pos, OBD_POSITIONS)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{path}: position must be one of {OBD_POSITIONS} (OBD's three slots), "
                         f"got {_py(position.iloc[i])!r} at index {_py(position.index[i])!r} "
                         f"({int(bad.sum())} such rows)")
    return pos.astype(np.int64) - 1


def _numbers(raw: pd.DataFrame, column: str, path: str | Path) -> np.ndarray:
    values = pd.to_numeric(raw[column], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{path}: {column} must be a number, got {_py(raw[column].iloc[i])!r} "
                         f"at index {_py(raw.index[i])!r}")
    return values


def infer_campaign_policy(path: str | Path) -> tuple[str | None, str | None]:
    """Campaign and behaviour policy from OBD's file layout (``.../<policy>/[<campaign>/]<campaign>.csv``)."""
    path = Path(path)
    campaign = path.stem if path.stem in CAMPAIGN_ITEMS else None
    policy = next((part for part in reversed(path.parent.parts) if part in BEHAVIOR_POLICIES), None)
    return campaign, policy


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
    DataFrame, one row per impression in the CSV's row order (row i is OBP's round i):
    the rewards-contract columns plus ``user_feature_*``.
    """
    if campaign not in CAMPAIGN_ITEMS:
        raise ValueError(f"campaign must be one of {tuple(CAMPAIGN_ITEMS)}, got {campaign!r}")
    if behavior_policy not in BEHAVIOR_POLICIES:
        raise ValueError(f"behavior_policy must be one of {BEHAVIOR_POLICIES}, got {behavior_policy!r}")
    raw = pd.read_csv(path, index_col=0)
    missing = [c for c in REQUIRED if c not in raw.columns]
    if missing:
        raise ValueError(f"{path}: not an Open Bandit Dataset CSV, lacks columns {missing}")
    if len(raw) == 0:
        raise ValueError(f"{path}: no rows")
    if raw.index.has_duplicates:
        raise ValueError(f"{path}: the index column repeats {raw.index[raw.index.duplicated()][0]!r}; "
                         "it names the events and must be unique")
    n_items = n_items or CAMPAIGN_ITEMS[campaign]
    item_f = _numbers(raw, "item_id", path)
    if not (np.all(item_f == np.round(item_f)) and item_f.min() >= 0 and item_f.max() < n_items):
        raise ValueError(f"{path}: item_id outside 0..{n_items - 1} "
                         f"(campaign {campaign!r} has {n_items} items)")
    item = item_f.astype(np.int64)
    p = _numbers(raw, "propensity_score", path)
    if not ((p > 0).all() and (p <= 1).all()):
        raise ValueError(f"{path}: propensity_score must be in (0, 1]")
    click_f = _numbers(raw, "click", path)
    if not np.isin(click_f, (0, 1)).all():
        raise ValueError(f"{path}: click must be 0 or 1")
    click = click_f.astype(np.int64)
    ts = pd.to_datetime(raw["timestamp"], utc=True)
    local = ts + JST_OFFSET
    slot = _slots(raw["position"], path)
    user_cols = [c for c in raw.columns if c.startswith("user_feature_")]
    members = [_member_id(r) for r in raw[user_cols].itertuples(index=False)] if user_cols \
        else ["obd-u-unknown"] * len(raw)
    prefix = f"obd-{campaign}"
    candidates = [f"{prefix}-item{i}" for i in range(n_items)]
    # The random policy's distribution is known (uniform over the items); bts's is not logged.
    uniform = [1.0 / n_items] * n_items if behavior_policy == "random" and np.all(p == 1.0 / n_items) else None
    out = pd.DataFrame({
        "event_id": [f"{prefix}-{behavior_policy}-{i}" for i in raw.index],
        "ts": ts.to_numpy(),
        "member_id": members,
        "title_id": [f"{prefix}-pos{k}" for k in slot],
        "artwork_id": [candidates[i] for i in item],
        "candidates": [candidates] * len(raw),
        "propensity": p,
        "candidate_probabilities": [uniform] * len(raw) if uniform is not None else None,
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
        out[c] = raw[c].astype(str).to_numpy()
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


def write_open_bandit_lake(impressions: pd.DataFrame, root: str | Path, name: str) -> list[Path]:
    """Write mapped impressions as ``<root>/rewards/ds=D/<name>.parquet``, one file per day.

    ``ds`` is the impression's UTC date. The columns are the ``rewards`` contract's (its
    Arrow schema) followed by the ``user_feature_*`` columns as strings. Replaces a file of
    the same name; returns the files written.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from keyart.contracts import REWARDS
    from keyart.lake import Lake

    lake = Lake(root)
    extra = [c for c in impressions.columns if c.startswith("user_feature_")]
    schema = REWARDS.arrow_schema()
    for c in extra:
        schema = schema.append(pa.field(c, pa.string()))
    frame = impressions[REWARDS.columns + extra].copy()
    frame["ts"] = pd.to_datetime(frame["ts"], utc=True)
    written = []
    for day, part in frame.groupby("impression_ds", sort=True):
        folder = lake.rewards(day)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{name}.parquet"
        tmp = folder / f".{name}.parquet.tmp"
        pq.write_table(pa.Table.from_pandas(part, schema=schema, preserve_index=False), tmp)
        tmp.replace(target)
        written.append(target)
    return written


# --- keyart obd -------------------------------------------------------------------------

def add_arguments(parser) -> None:
    parser.description = (
        "Map one Open Bandit Dataset CSV onto keyart's rewards contract (labelled impressions) "
        "and write it as <out>/rewards/ds=D/obd-<campaign>-<policy>.parquet; "
        "`keyart ope --logs <out>/rewards` values policies on it.")
    parser.add_argument("--csv", required=True, type=Path, metavar="PATH",
                        help="an OBD CSV, e.g. open_bandit_dataset/random/all/all.csv")
    parser.add_argument("--out", required=True, type=Path, metavar="LAKE", help="lake root to write under")
    parser.add_argument("--campaign", choices=tuple(CAMPAIGN_ITEMS), default=None,
                        help="all | men | women (default: the file's name)")
    parser.add_argument("--behavior-policy", choices=BEHAVIOR_POLICIES, default=None,
                        help="random | bts (default: the folder it sits in, else random)")


def resolve_campaign_policy(path: Path, campaign: str | None, behavior_policy: str | None) -> tuple[str, str]:
    """Explicit values win; else OBD's layout; the campaign must be known one way or the other."""
    guessed_campaign, guessed_policy = infer_campaign_policy(path)
    campaign = campaign or guessed_campaign
    if campaign is None:
        raise ValueError(f"{path}: cannot tell the campaign from the file name "
                         f"(OBD names it all.csv, men.csv or women.csv); pass --campaign "
                         f"{' | '.join(CAMPAIGN_ITEMS)}")
    return campaign, behavior_policy or guessed_policy or "random"


def run(args) -> int:
    import sys

    try:
        campaign, policy = resolve_campaign_policy(args.csv, args.campaign, args.behavior_policy)
        impressions = load_open_bandit_csv(args.csv, campaign=campaign, behavior_policy=policy)
        files = write_open_bandit_lake(impressions, args.out, f"obd-{campaign}-{policy}")
    except (OSError, ValueError) as exc:
        print(f"keyart obd: error: {exc}", file=sys.stderr)
        return 2
    slots = impressions["context"].map(lambda c: c["position"]).value_counts().sort_index()
    print(f"{args.csv}: {len(impressions)} impressions (campaign {campaign}, {CAMPAIGN_ITEMS[campaign]} "
          f"items, behaviour policy {policy}), {impressions['member_id'].nunique()} members, "
          f"click rate {impressions['reward'].mean():.5f}")
    print("slots (OBD position - 1): " + ", ".join(f"{k}: {v}" for k, v in slots.items()))
    for f in files:
        print(f"wrote {f}")
    return 0
