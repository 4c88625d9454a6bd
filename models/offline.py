"""``keyart ope``: value a target policy offline on any impression log.

Works outside the daily run: no lake, model or registry is needed, only

``--logs PATH``
    labelled impressions. Either keyart's format: a ``.jsonl`` / ``.parquet`` file, or a
    folder read recursively (e.g. ``<lake>/rewards/``), with one row per impression holding
    ``event_id``, ``candidates``, ``artwork_id``, ``propensity`` (impressions contract),
    ``member_id`` (for ``--cluster member``) and ``reward`` (rewards contract; any finite
    number is valued as is). Rows of serving's impression log (no ``reward``) take their
    reward from ``--rewards PATH``, a table of ``event_id, reward``. Or an Open Bandit
    Dataset CSV (:mod:`keyart.models.obd` maps it; ``--format obd``, the default for
    ``.csv``).
``--policy PROBS``
    the target policy's probability for every candidate of every logged impression.
    Either a table (``.csv``, ``.parquet`` or ``.jsonl``) with a key column, ``artwork_id``
    and ``probability``. The key is ``event_id`` (one distribution per impression),
    ``title_id`` (one per title, for every impression of it; with OBD the slot
    ``obd-<campaign>-pos<k>``) or ``position`` (the impression's ``context.position``;
    with OBD the slot k = OBD position - 1); if several are present the first of that
    order is used. A candidate without a row has probability 0. Or Open Bandit Pipeline's
    ``action_dist`` saved with ``numpy.save`` (``.npy``, [n_rounds, n_actions, len_list]
    or [n_rounds, n_actions]): round i is the log's i-th impression (the CSV's row order;
    for keyart files, files in name order and rows in file order), action a its a-th
    candidate (OBD: ``item_id`` a), and the slice used is the impression's position
    (``context.position``; the only slice when len_list is 1).

Checks, each failing with a message naming the file and the row, impression or id:
probabilities finite and in [0, 1]; summing to 1 within 1e-6 over each impression's
candidates; every logged impression covered; no key or artwork that the log does not
have; no duplicated (key, artwork) rows; shapes matching the log.

``dr`` needs ``--q-hat PATH``, a reward model's prediction for every candidate, in the same
two formats (table column ``q_hat`` instead of ``probability``, every candidate covered;
or OBP's ``estimated_rewards_by_reg_model`` as ``.npy``).

Estimates and 95% percentile intervals come from :func:`keyart.ope.evaluate_policies`
(Poisson bootstrap, clustered by ``member_id`` with ``--cluster member``). The logging
policy is valued as :func:`keyart.ope.evaluate_policies` values it, and lift over it uses
paired replicates.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from keyart.contracts import IMPRESSIONS, MAX_CANDIDATES
from keyart.ope import (
    ESTIMATORS,
    Bootstrap,
    LoggedPages,
    Replay,
    effective_sample_size,
    evaluate_policies,
    to_json,
)

POLICY_KEYS = ("event_id", "title_id", "position")
SUM_ATOL = 1e-6
LOG_SUFFIXES = (".jsonl", ".parquet")
TABLE_SUFFIXES = (".csv", ".parquet", ".jsonl")
MAX_NAMED = 5
POSITION_FIELD = next(f for f in IMPRESSIONS["context"].children if f.name == "position")


class InputError(ValueError):
    """A user input that cannot be valued; the message names file, row or id."""


def _named(values, limit: int = MAX_NAMED) -> str:
    values = list(values)
    shown = ", ".join(repr(v) for v in values[:limit])
    return shown + (f" and {len(values) - limit} more" if len(values) > limit else "")


# --- the log ------------------------------------------------------------------------------

@dataclass
class Log:
    """Logged impressions in log order (row i is round i) and where they came from."""

    impressions: pd.DataFrame  # event_id, member_id, title_id, position, candidates, artwork_id, propensity, reward
    source: str
    format: str  # "keyart" or "obd"
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.impressions)

    def offsets(self) -> np.ndarray:
        k = self.impressions["candidates"].map(len).to_numpy(dtype=np.int64)
        return np.r_[0, np.cumsum(k)]


def log_files(path: Path) -> list[Path]:
    """The log's files: ``path`` itself, or every .jsonl / .parquet below it (name order)."""
    if path.is_file():
        if path.suffix not in LOG_SUFFIXES:
            raise InputError(f"{path}: a keyart log is .jsonl or .parquet (an OBD CSV is --format obd)")
        return [path]
    if not path.is_dir():
        raise InputError(f"{path}: no such file or folder")
    files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix in LOG_SUFFIXES
                   and not any(part.startswith((".", "_")) for part in f.relative_to(path).parts))
    if not files:
        raise InputError(f"{path}: no .jsonl or .parquet files under it")
    return files


_CRC_HEAD = b'{"_crc32":"'
_CRC_PREFIX = len(_CRC_HEAD) + 10  # {"_crc32":"xxxxxxxx",


def unframe(line: bytes) -> bytes | None:
    """The JSON object of a log line: a line with serving's ``_crc32`` prefix is verified
    (docs/data-contracts.md: crc32 of ``{`` + everything after the 21-character prefix) and
    returned without it, None if it does not match; a line without the prefix as is."""
    line = line.rstrip(b"\r\n")
    if not line.startswith(_CRC_HEAD):
        return line
    digits = line[len(_CRC_HEAD):_CRC_PREFIX - 2]
    if len(line) <= _CRC_PREFIX or line[_CRC_PREFIX - 2:_CRC_PREFIX] != b'",' \
            or not all(c in b"0123456789abcdef" for c in digits):
        return None
    payload = b"{" + line[_CRC_PREFIX:]
    return payload if zlib.crc32(payload) == int(digits, 16) else None


def _jsonl_rows(path: Path):
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        payload = unframe(line)
        if payload is None:
            raise InputError(f"{path} line {number}: checksum mismatch (a torn or altered line)")
        try:
            row = json.loads(payload)
        except ValueError:
            raise InputError(f"{path} line {number}: malformed JSON") from None
        if not isinstance(row, dict):
            raise InputError(f"{path} line {number}: not a JSON object")
        yield f"{path} line {number}", row


def _parquet_rows(path: Path):
    import pyarrow.parquet as pq

    wanted = ("event_id", "member_id", "title_id", "artwork_id", "candidates", "propensity",
              "reward", "context")
    names = pq.ParquetFile(path).schema_arrow.names
    table = pq.read_table(path, columns=[c for c in wanted if c in names])
    for number, row in enumerate(table.to_pylist(), start=1):
        yield f"{path} row {number}", row


def _check(where: str, name: str, value) -> None:
    why = IMPRESSIONS[name].check(value)
    if why:
        raise InputError(f"{where}: {name} {why}")


def read_keyart_log(path: Path, rewards: Path | None = None, need_member: bool = True) -> Log:
    """Read and check impressions in keyart's format (see the module docstring)."""
    records: dict[str, list] = {c: [] for c in ("event_id", "member_id", "title_id", "position",
                                                 "candidates", "artwork_id", "propensity", "reward")}
    where_of: list[str] = []
    files = log_files(Path(path))
    for f in files:
        rows = _jsonl_rows(f) if f.suffix == ".jsonl" else _parquet_rows(f)
        for where, row in rows:
            for name in ("event_id", "artwork_id", "propensity"):
                _check(where, name, row.get(name))
            member = row.get("member_id")
            if member is not None or need_member:
                if member is None:
                    raise InputError(f"{where}: member_id is missing; it clusters the bootstrap "
                                     "(pass --cluster none to value without it)")
                _check(where, "member_id", member)
            title = row.get("title_id")
            if title is not None:
                _check(where, "title_id", title)
            cands = row.get("candidates")
            if not isinstance(cands, list | tuple) or not all(isinstance(c, str) for c in cands):
                raise InputError(f"{where}: candidates must be a list of artwork ids, got {str(cands)[:60]}")
            if not 1 <= len(cands) <= MAX_CANDIDATES:
                raise InputError(f"{where}: candidates must have 1..{MAX_CANDIDATES} items, got {len(cands)}")
            if len(set(cands)) != len(cands):
                dup = next(c for c in cands if cands.count(c) > 1)
                raise InputError(f"{where}: candidates list {dup!r} twice")
            if row["artwork_id"] not in cands:
                raise InputError(f"{where}: artwork_id {row['artwork_id']!r} is not one of its candidates")
            context = row.get("context")
            position = context.get("position") if isinstance(context, dict) else None
            if position is not None:
                why = POSITION_FIELD.check(position)
                if why:
                    raise InputError(f"{where}: context.position {why}")
            reward = row.get("reward")
            if rewards is None:
                if reward is None:
                    raise InputError(f"{where}: no reward. Pass labelled impressions (the rewards "
                                     "contract, e.g. <lake>/rewards/) or --rewards PATH")
                if isinstance(reward, bool) or not isinstance(reward, int | float) or not math.isfinite(reward):
                    raise InputError(f"{where}: reward must be a finite number, got {reward!r}")
            elif reward is not None:
                raise InputError(f"{where}: the log has a reward column and --rewards was given; use one")
            for key, value in (("event_id", row["event_id"]), ("member_id", member), ("title_id", title),
                               ("position", position), ("candidates", list(cands)),
                               ("artwork_id", row["artwork_id"]), ("propensity", float(row["propensity"])),
                               ("reward", None if reward is None else float(reward))):
                records[key].append(value)
            where_of.append(where)
    if not where_of:
        raise InputError(f"{path}: the log has no rows")
    frame = pd.DataFrame(records)
    dup = frame["event_id"].duplicated(keep=False)
    if dup.any():
        first = frame["event_id"][dup].iloc[0]
        rows = [where_of[i] for i in np.flatnonzero(frame["event_id"].to_numpy() == first)]
        raise InputError(f"event_id {first!r} appears {len(rows)} times ({'; '.join(rows[:3])}); "
                         f"{int(dup.sum())} rows share an event_id. Deduplicate first "
                         "(keyart job ingest does)")
    details: dict[str, Any] = {"files": len(files)}
    if rewards is not None:
        frame["reward"], details["rewards"] = _join_rewards(frame["event_id"], Path(rewards))
    return Log(frame, str(path), "keyart", details)


def read_table(path: Path) -> pd.DataFrame:
    """A small table from .csv, .parquet or .jsonl (ids kept as strings)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if path.suffix == ".csv":
        return pd.read_csv(path, dtype={"event_id": str, "title_id": str, "artwork_id": str},
                           keep_default_na=False, na_values=[""])
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    if path.suffix == ".jsonl":
        return pd.read_json(path, lines=True, dtype={"event_id": str, "title_id": str, "artwork_id": str})
    raise InputError(f"{path}: a table is .csv, .parquet or .jsonl")


def _py(value):
    """A numpy scalar as the Python value (for messages)."""
    return value.item() if isinstance(value, np.generic) else value


def _row(path: Path, i: int) -> str:
    """Where table row i (0-based, after the header) is: a CSV's line, else the row number."""
    return f"{path} line {i + 2}" if Path(path).suffix == ".csv" else f"{path} row {i + 1}"


def _numeric(table: pd.DataFrame, column: str, path: Path, lo: float | None = None,
             hi: float | None = None) -> np.ndarray:
    raw = table[column]
    values = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if lo is not None:
        bad |= values < lo
    if hi is not None:
        bad |= values > hi
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        rng = f" in [{lo:g}, {hi:g}]" if lo is not None and hi is not None else ""
        raise InputError(f"{_row(path, i)}: {column} must be a finite number{rng}, got {_py(raw.iloc[i])!r} "
                         f"({int(bad.sum())} such rows)")
    return values


def _join_rewards(event_id: pd.Series, path: Path) -> tuple[np.ndarray, dict]:
    table = read_table(path)
    missing = [c for c in ("event_id", "reward") if c not in table.columns]
    if missing:
        raise InputError(f"{path}: a rewards table needs columns event_id, reward; lacks {missing}")
    reward = _numeric(table, "reward", path)
    ids = table["event_id"].astype(str)
    dup = ids.duplicated(keep=False)
    if dup.any():
        raise InputError(f"{path}: event_id {ids[dup].iloc[0]!r} has {int((ids == ids[dup].iloc[0]).sum())} rewards; "
                         "one per impression")
    by_id = pd.Series(reward, index=ids.to_numpy())
    found = event_id.isin(by_id.index)
    if not found.all():
        lacking = event_id[~found]
        raise InputError(f"{path}: {len(lacking)} logged impressions have no reward, e.g. event_id "
                         f"{_named(lacking)}")
    extra = int((~ids.isin(set(event_id))).sum())
    return by_id.loc[event_id.to_numpy()].to_numpy(), {"path": str(path), "rows": len(table),
                                                       "rows_not_in_log": extra}


def read_obd_log(path: Path, campaign: str | None = None, behavior_policy: str | None = None) -> Log:
    from keyart.models.obd import CAMPAIGN_ITEMS, load_open_bandit_csv, resolve_campaign_policy

    campaign, policy = resolve_campaign_policy(Path(path), campaign, behavior_policy)
    imp = load_open_bandit_csv(path, campaign=campaign, behavior_policy=policy)
    frame = pd.DataFrame({
        "event_id": imp["event_id"], "member_id": imp["member_id"], "title_id": imp["title_id"],
        "position": imp["context"].map(lambda c: c["position"]), "candidates": imp["candidates"],
        "artwork_id": imp["artwork_id"], "propensity": imp["propensity"].astype(np.float64),
        "reward": imp["reward"].astype(np.float64)})
    return Log(frame, str(path), "obd", {"campaign": campaign, "behavior_policy": policy,
                                         "n_items": CAMPAIGN_ITEMS[campaign]})


def read_log(path: Path, fmt: str = "auto", campaign: str | None = None, behavior_policy: str | None = None,
             rewards: Path | None = None, need_member: bool = True) -> Log:
    path = Path(path)
    if fmt == "auto":
        fmt = "obd" if path.suffix == ".csv" else "keyart"
    if fmt == "obd":
        if rewards is not None:
            raise InputError("--rewards is for keyart logs; an OBD CSV has its clicks")
        if not path.is_file():
            raise InputError(f"{path}: no such file")
        return read_obd_log(path, campaign, behavior_policy)
    if campaign or behavior_policy:
        raise InputError("--campaign and --behavior-policy are for OBD CSVs (--format obd)")
    return read_keyart_log(path, rewards=rewards, need_member=need_member)


def log_pages(log: Log, cluster: str = "member") -> LoggedPages:
    imp = log.impressions
    offsets = log.offsets()
    index = [c.index(a) for c, a in zip(imp["candidates"], imp["artwork_id"], strict=True)]
    groups = None
    if cluster == "member":
        if imp["member_id"].isna().any():
            raise InputError("--cluster member needs member_id on every impression")
        groups = imp["member_id"].to_numpy()
    return LoggedPages(offsets=offsets, logged_row=offsets[:-1] + np.asarray(index, dtype=np.int64),
                       reward=imp["reward"].to_numpy(dtype=np.float64),
                       propensity=imp["propensity"].to_numpy(dtype=np.float64), groups=groups)


# --- the target policy (and q-hat) ---------------------------------------------------------

@dataclass(frozen=True)
class Kind:
    """What a per-candidate input holds: probabilities (sum to 1) or reward predictions."""

    flag: str
    column: str
    distribution: bool


POLICY = Kind("--policy", "probability", True)
Q_HAT = Kind("--q-hat", "q_hat", False)


def per_candidate(path: Path, log: Log, kind: Kind = POLICY) -> tuple[np.ndarray, dict]:
    """The value of every candidate row of the log [n_rows], checked; and a description."""
    path = Path(path)
    if path.suffix == ".npy":
        return _from_array(path, log, kind)
    if path.suffix in TABLE_SUFFIXES:
        return _from_table(path, log, kind)
    raise InputError(f"{kind.flag} {path}: expected a table (.csv, .parquet, .jsonl) or an array (.npy)")


def _check_sums(values: np.ndarray, offsets: np.ndarray, log: Log, path: Path) -> None:
    sums = np.add.reduceat(values, offsets[:-1])
    bad = np.abs(sums - 1.0) > SUM_ATOL
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InputError(f"{path}: the probabilities of impression {log.impressions['event_id'].iloc[i]!r} "
                         f"(round {i}) sum to {sums[i]:.9g} over its {offsets[i + 1] - offsets[i]} candidates; "
                         f"they must sum to 1 within {SUM_ATOL:g} ({int(bad.sum())} impressions fail)")


def _from_array(path: Path, log: Log, kind: Kind) -> tuple[np.ndarray, dict]:
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a numpy .npy array ({exc})") from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise InputError(f"{path}: expected shape [n_rounds, n_actions, len_list] (OBP's "
                         f"{'action_dist' if kind.distribution else 'estimated_rewards_by_reg_model'}), "
                         f"got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise InputError(f"{path}: expected real numbers, got dtype {arr.dtype}")
    n_rounds, n_actions, len_list = arr.shape
    if n_rounds != log.n:
        raise InputError(f"{path}: has {n_rounds} rounds, the log {log.source} has {log.n} impressions")
    k = log.impressions["candidates"].map(len).to_numpy()
    if np.any(k != n_actions):
        i = int(np.flatnonzero(k != n_actions)[0])
        raise InputError(f"{path}: has {n_actions} actions, but impression "
                         f"{log.impressions['event_id'].iloc[i]!r} has {k[i]} candidates; an array needs "
                         "the same candidate list length on every impression (use a table otherwise)")
    arr = arr.astype(np.float64, copy=False)
    bad = ~np.isfinite(arr)
    if kind.distribution:
        bad |= (arr < 0) | (arr > 1)
    if bad.any():
        r, a, s = (int(x) for x in np.argwhere(bad)[0])
        raise InputError(f"{path}: [{r}, {a}, {s}] = {arr[r, a, s].item()!r}; values must be finite"
                         + (" and in [0, 1]" if kind.distribution else "")
                         + f" ({int(bad.sum())} such values)")
    if kind.distribution:
        sums = arr.sum(axis=1)
        off = np.abs(sums - 1.0) > SUM_ATOL
        if off.any():
            r, s = (int(x) for x in np.argwhere(off)[0])
            raise InputError(f"{path}: action_dist[{r}, :, {s}] sums to {sums[r, s]:.9g}; every "
                             f"[round, :, position] must sum to 1 within {SUM_ATOL:g} "
                             f"({int(off.sum())} fail)")
    if len_list == 1:
        slot = np.zeros(log.n, dtype=np.int64)
    else:
        pos = log.impressions["position"]
        if pos.isna().any():
            raise InputError(f"{path}: len_list is {len_list}, so the slice is the impression's position, "
                             "but the log has impressions without context.position")
        slot = pos.to_numpy(dtype=np.int64)
        if slot.max() >= len_list:
            i = int(np.argmax(slot >= len_list))
            raise InputError(f"{path}: impression {log.impressions['event_id'].iloc[i]!r} is at position "
                             f"{slot[i]}, outside the array's len_list {len_list}")
    values = arr[np.arange(log.n), :, slot].reshape(-1)
    return values, {"path": str(path), "format": "array", "shape": list(arr.shape)}


def _from_table(path: Path, log: Log, kind: Kind) -> tuple[np.ndarray, dict]:
    table = read_table(path)
    key = next((c for c in POLICY_KEYS if c in table.columns), None)
    missing = [c for c in ("artwork_id", kind.column) if c not in table.columns]
    if key is None or missing:
        raise InputError(f"{path}: a {kind.flag} table needs a key column ({' | '.join(POLICY_KEYS)}), "
                         f"artwork_id and {kind.column}; it has {list(table.columns)}")
    if len(table) == 0:
        raise InputError(f"{path}: the table is empty")
    lo_hi = (0.0, 1.0) if kind.distribution else (None, None)
    value = _numeric(table, kind.column, path, *lo_hi)
    imp = log.impressions
    if imp[key].isna().any():
        raise InputError(f"{path}: keyed by {key}, but the log has impressions without "
                         f"{'context.position' if key == 'position' else key}")
    if key == "position":
        tkey = _numeric(table, "position", path, 0, 1000)
        if np.any(tkey != np.round(tkey)):
            raise InputError(f"{path}: position must be a whole number")
        tkey = pd.Series(tkey.astype(np.int64))
        lkey = imp["position"].astype(np.int64)
    else:
        if table[key].isna().any() or table["artwork_id"].isna().any():
            raise InputError(f"{path}: {key} and artwork_id must not be empty")
        tkey, lkey = table[key].astype(str), imp[key].astype(str)
    art = table["artwork_id"].astype(str)
    pairs = pd.DataFrame({"key": tkey.to_numpy(), "artwork_id": art.to_numpy(), "value": value})
    dup = pairs.duplicated(["key", "artwork_id"], keep=False)
    if dup.any():
        first = pairs[dup].iloc[0]
        raise InputError(f"{path}: {key} {first['key']!r}, artwork_id {first['artwork_id']!r} has "
                         f"{int((dup & (pairs['key'] == first['key']) & (pairs['artwork_id'] == first['artwork_id'])).sum())} "
                         "rows; one per (key, artwork)")
    unknown = sorted(set(pairs["key"]) - set(lkey))
    if unknown:
        raise InputError(f"{path}: {len(unknown)} {key} values are not in the log {log.source}: {_named(unknown)}")
    k = imp["candidates"].map(len).to_numpy()
    rows = pd.DataFrame({"key": np.repeat(lkey.to_numpy(), k),
                         "artwork_id": np.concatenate([np.asarray(c, dtype=object) for c in imp["candidates"]])})
    known = pairs.merge(rows.drop_duplicates(), on=["key", "artwork_id"], how="left", indicator=True)
    stray = known[known["_merge"] == "left_only"]
    if len(stray):
        first = stray.iloc[0]
        raise InputError(f"{path}: {len(stray)} rows name an artwork that is not a candidate of their "
                         f"{key}: artwork_id {first['artwork_id']!r} for {key} {first['key']!r}"
                         + (f"; also {_named(stray['artwork_id'].iloc[1:])}" if len(stray) > 1 else ""))
    uncovered = ~lkey.isin(set(pairs["key"]))
    if uncovered.any():
        raise InputError(f"{path}: {int(uncovered.sum())} of {log.n} logged impressions have no rows, "
                         f"e.g. event_id {_named(imp['event_id'][uncovered])}"
                         + (f" ({key} {_named(lkey[uncovered].unique())})" if key != "event_id" else ""))
    merged = rows.merge(pairs, on=["key", "artwork_id"], how="left", sort=False)
    values = merged["value"].to_numpy(dtype=np.float64)
    if not kind.distribution and np.isnan(values).any():
        i = int(np.flatnonzero(np.isnan(values))[0])
        raise InputError(f"{path}: no {kind.column} for artwork_id {merged['artwork_id'].iloc[i]!r} of "
                         f"{key} {merged['key'].iloc[i]!r}; DR needs every candidate "
                         f"({int(np.isnan(values).sum())} missing)")
    values = np.nan_to_num(values, nan=0.0)
    if kind.distribution:
        _check_sums(values, log.offsets(), log, path)
    return values, {"path": str(path), "format": "table", "key": key, "rows": len(table)}


# --- evaluation ----------------------------------------------------------------------------

def evaluate_log(log: Log, target: np.ndarray, q_hat: np.ndarray | None = None,
                 estimators: tuple[str, ...] = ("replay", "ips", "snips"), cluster: str = "member",
                 n_boot: int = 200, seed: int = 0) -> dict[str, Any]:
    """Estimates with intervals and diagnostics (the ``--json`` document, without inputs)."""
    if "dr" in estimators and q_hat is None:
        raise InputError("dr needs --q-hat (a reward model's prediction for every candidate)")
    pages = log_pages(log, cluster)
    pages.check_target(target, atol=SUM_ATOL)
    bootstrap = Bootstrap(n_boot=n_boot, seed=seed)
    result = evaluate_policies(pages, {"target": target}, q_hat=q_hat, estimators=list(estimators),
                               bootstrap=bootstrap, replay_seed=seed)
    out = to_json(result)
    w = pages.weights(target)
    kept = None
    if "replay" in estimators:
        kept = int(Replay(seed=seed).terms(pages, target)[1].sum())
    k = np.diff(pages.offsets)
    out["diagnostics"] = {
        "replay_kept": kept,
        "weight_mean": float(w.mean()),
        "weight_max": float(w.max()),
        "effective_sample_size": effective_sample_size(w),
        "target_support_of_logged": int((w > 0).sum()),
    }
    out.update({
        "n_impressions": pages.n_impressions,
        "n_candidate_rows": pages.n_rows,
        "candidates_per_impression": {"min": int(k.min()), "max": int(k.max())},
        "cluster": cluster,
        "n_clusters": int(pages.groups.max()) + 1 if pages.groups is not None else pages.n_impressions,
        "n_boot": n_boot,
        "seed": seed,
        "level": bootstrap.level,
        "estimators": list(estimators),
    })
    return out


def _plain(value):
    """JSON without NaN: NaN and infinities become null."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.6f}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:+.1f}%"


def summary_text(doc: dict) -> str:
    logs, pol = doc["logs"], doc["policy"]
    where = f"OBD CSV, campaign {logs['campaign']}, behaviour policy {logs['behavior_policy']}" \
        if logs["format"] == "obd" else f"keyart log, {logs['files']} file(s)"
    k = doc["candidates_per_impression"]
    k_text = str(k["min"]) if k["min"] == k["max"] else f"{k['min']}-{k['max']}"
    how = f"table keyed by {pol['key']}" if pol["format"] == "table" else f"array {pol['shape']}"
    clusters = f"clustered by member ({doc['n_clusters']} members)" if doc["cluster"] == "member" \
        else "by impression"
    lines = [
        f"logs:   {logs['path']} ({where})",
        f"        {doc['n_impressions']} impressions, {k_text} candidates each",
        f"policy: {pol['path']} ({how})",
        f"{int(round(doc['level'] * 100))}% intervals: Poisson bootstrap, {doc['n_boot']} replicates, {clusters}, "
        f"seed {doc['seed']}",
        "",
        f"{'policy':<9}{'estimator':<11}{'estimate':>10}   interval",
    ]
    for policy in ("target", "logging"):
        rows = list(doc["policies"][policy].items())
        if policy == "logging" and all(iv == rows[0][1] for _, iv in rows):
            rows = [("on-policy", rows[0][1])]  # the same value under every estimator key
        for est, iv in rows:
            lines.append(f"{policy:<9}{est:<11}{_fmt(iv['estimate']):>10}   [{_fmt(iv['lo'])}, {_fmt(iv['hi'])}]")
    lines.append("")
    lines.append("lift of the target over logging (V_target / V_logging - 1, paired intervals)")
    for est, iv in doc["lift"]["target"].items():
        lines.append(f"{'':<9}{est:<11}{_pct(iv['estimate']):>10}   [{_pct(iv['lo'])}, {_pct(iv['hi'])}]")
    d = doc["diagnostics"]
    lines.append("")
    if d["replay_kept"] is not None:
        lines.append(f"replay kept {d['replay_kept']} of {doc['n_impressions']} impressions")
    lines.append(f"importance weights: mean {d['weight_mean']:.4f}, max {d['weight_max']:.4g}, "
                 f"effective sample size {d['effective_sample_size']:.1f}; the target gives the logged "
                 f"artwork probability > 0 on {d['target_support_of_logged']} impressions")
    return "\n".join(lines)


# --- the command ---------------------------------------------------------------------------

def _estimators(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in ESTIMATORS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"choose from {','.join(ESTIMATORS)}; got {text!r}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Value a target policy offline (replay, IPS, SNIPS, DR with bootstrap intervals) "
                          "on an impression log in keyart's format or an Open Bandit Dataset CSV. "
                          "See docs/models.md, 'keyart ope'.")
    parser.add_argument("--logs", required=True, type=Path, metavar="PATH",
                        help="labelled impressions: .jsonl / .parquet file or folder (rewards contract), "
                             "or an OBD .csv")
    parser.add_argument("--policy", required=True, type=Path, metavar="PROBS",
                        help="target policy: table (.csv/.parquet/.jsonl) of <event_id|title_id|position>, "
                             "artwork_id, probability; or OBP's action_dist as .npy")
    parser.add_argument("--estimators", type=_estimators, default=None, metavar="LIST",
                        help="comma-separated subset of replay,ips,snips,dr "
                             "(default replay,ips,snips, plus dr with --q-hat)")
    parser.add_argument("--q-hat", type=Path, default=None, metavar="PATH",
                        help="for dr: reward predictions per candidate, a table with column q_hat "
                             "or OBP's estimated_rewards_by_reg_model as .npy")
    parser.add_argument("--cluster", choices=("member", "none"), default="member",
                        help="bootstrap clusters: member_id (default) or single impressions")
    parser.add_argument("--n-boot", type=int, default=200, metavar="N", help="bootstrap replicates (>= 10)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="seeds the bootstrap and replay's draws")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--format", choices=("auto", "keyart", "obd"), default="auto",
                        help="log format (auto: .csv is OBD, anything else keyart)")
    parser.add_argument("--rewards", type=Path, default=None, metavar="PATH",
                        help="keyart logs without a reward column: table of event_id, reward")
    parser.add_argument("--campaign", choices=("all", "men", "women"), default=None,
                        help="OBD campaign (default: the CSV's name)")
    parser.add_argument("--behavior-policy", choices=("random", "bts"), default=None,
                        help="OBD behaviour policy (default: the folder, else random)")


def run(args: argparse.Namespace) -> int:
    try:
        estimators = args.estimators or (("replay", "ips", "snips") + (("dr",) if args.q_hat else ()))
        if args.n_boot < 10:
            raise InputError(f"--n-boot must be >= 10, got {args.n_boot}")
        log = read_log(args.logs, args.format, args.campaign, args.behavior_policy, args.rewards,
                       need_member=args.cluster == "member")
        target, policy_info = per_candidate(args.policy, log, POLICY)
        q_hat = q_info = None
        if args.q_hat is not None:
            q_hat, q_info = per_candidate(args.q_hat, log, Q_HAT)
        doc = evaluate_log(log, target, q_hat, estimators, args.cluster, args.n_boot, args.seed)
    except (OSError, ValueError) as exc:
        print(f"keyart ope: error: {exc}", file=sys.stderr)
        return 2
    doc = {"logs": {"path": log.source, "format": log.format, **log.details}, "policy": policy_info,
           "q_hat": q_info, **doc}
    if args.json:
        print(json.dumps(_plain(doc), indent=2))
    else:
        print(summary_text(doc))
    return 0
