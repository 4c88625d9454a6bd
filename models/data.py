"""Reading the features job's tables for the model steps.

The training table ``features/training/ds=D/`` has one row per (labelled impression,
candidate artwork); see docs/architecture.md. This module picks the partitions a run
uses (training window, held-out day), reads them with Arrow and turns the ``features``
list column into the float32 matrix the reward model takes.

Days
----
The *held-out day* of a run for ``ds=D`` is the newest labelled partition on or before D;
offline evaluation values policies on it and training never sees it. The *training
window* is the labelled partitions dated in ``[H - training_window_days, H - 1]`` for the
held-out day H, so a run trains on ``training_window_days`` days when all exist.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from keyart.feature_spec import MAX_PACKED_ROWS, N_FEATURES, pack_rows, unpack_rows
from keyart.lake import Lake

# Columns every model step reads from the training table (``features`` is added on demand).
PAGE_COLUMNS = (
    "event_id", "impression_ds", "ts", "member_id", "title_id", "artwork_id", "is_logged",
    "propensity", "policy", "model_version", "reward",
    "prior_alpha", "prior_beta", "prior_n",
)


COLD_START_TRAIN_SHARE = 0.7
"""On a lake's first labelled day, the earliest 70% of its impressions (by time) train the
model and the rest are held out, so the first daily run already yields a model."""


def time_split_rows(table: pa.Table, part: str) -> pa.Table:
    """The ``"train"`` (earliest :data:`COLD_START_TRAIN_SHARE` of impressions by ``ts``) or
    ``"heldout"`` (the rest) rows of a cold-start day. Every candidate row of an impression
    shares its ``ts``, so pages are never split."""
    if part not in ("train", "heldout"):
        raise ValueError(f"part must be 'train' or 'heldout', got {part!r}")
    ts = pc.cast(table.column("ts"), pa.int64()) if pa.types.is_timestamp(table.column("ts").type) else table.column("ts")
    values = np.asarray(ts.to_numpy())
    if values.size == 0:
        return table
    cutoff = np.quantile(values, COLD_START_TRAIN_SHARE, method="lower")
    mask = values <= cutoff if part == "train" else values > cutoff
    return table.filter(pa.array(mask))


def uniform_impressions(table: pa.Table, atol: float = 1e-6) -> pa.Table:
    """The candidate rows of the impressions logged uniformly at random (propensity = 1/K,
    K = the impression's candidate rows), whatever the policy's name."""
    if table.num_rows == 0:
        return table
    events = table.column("event_id").to_numpy(zero_copy_only=False)
    _, inverse, counts = np.unique(events, return_inverse=True, return_counts=True)
    logged = table.column("is_logged").to_numpy(zero_copy_only=False).astype(bool)
    propensity = table.column("propensity").to_numpy(zero_copy_only=False).astype(np.float64)
    uniform_event = np.zeros(len(counts), dtype=bool)
    uniform_event[inverse[logged]] = np.abs(propensity[logged] * counts[inverse[logged]] - 1.0) <= atol
    return table.filter(pa.array(uniform_event[inverse]))


def read_training(lake: Lake, days: Sequence[str], columns: Sequence[str] | None = None) -> pa.Table:
    """Concatenate the training partitions of ``days`` (one Arrow table, ``ds`` column added)."""
    if not days:
        raise ValueError("no days to read")
    tables = []
    for day in days:
        part = lake.training(day)
        files = sorted(part.glob("*.parquet"))
        if not files:
            raise FileNotFoundError(f"{part}: no Parquet files")
        t = pq.read_table(files, columns=list(columns) if columns else None) if len(files) > 1 \
            else pq.read_table(files[0], columns=list(columns) if columns else None)
        tables.append(binary_features(t).append_column("ds", pa.array([day] * t.num_rows, pa.string())))
    return pa.concat_tables(tables, promote_options="default")


def binary_features(table: pa.Table) -> pa.Table:
    """``table`` with its ``features`` column in the binary form the features job writes
    (:func:`keyart.feature_spec.pack_rows`); partitions written before it hold a list of
    floats, so a window that spans both still concatenates."""
    if "features" not in table.column_names:
        return table
    i = table.column_names.index("features")
    column = table.column(i)
    if pa.types.is_binary(column.type):
        return table
    # chunk by chunk, in slices one binary array can hold
    pieces = []
    for chunk in column.chunks:
        X = feature_array(chunk)
        pieces += [pack_rows(X[start:start + MAX_PACKED_ROWS]) for start in range(0, len(X), MAX_PACKED_ROWS)]
    return table.set_column(i, "features", pa.chunked_array(pieces, pa.binary()))


def feature_array(column: pa.ChunkedArray | pa.Array | pd.Series | Sequence) -> np.ndarray:
    """The float32 feature matrix [n, N_FEATURES] of a ``features`` column: binary
    (:func:`keyart.feature_spec.pack_rows`, what the features job writes), a list of floats
    (partitions written before it), or rows of numbers."""
    if isinstance(column, pa.ChunkedArray | pa.Array) and (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        return unpack_rows(column)
    if isinstance(column, pd.Series | list | tuple):
        if len(column) == 0:
            return np.zeros((0, N_FEATURES), np.float32)
        out = np.asarray(np.stack([np.asarray(v, dtype=np.float32) for v in column]), dtype=np.float32)
    else:
        arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        if len(arr) == 0:
            return np.zeros((0, N_FEATURES), np.float32)
        if arr.null_count:
            raise ValueError(f"features column has {arr.null_count} null rows")
        lengths = pa.compute.list_value_length(arr).to_numpy(zero_copy_only=False)
        if np.any(lengths != N_FEATURES):
            bad = int(lengths[lengths != N_FEATURES][0])
            raise ValueError(f"feature rows must have {N_FEATURES} values, found one with {bad}")
        out = arr.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, N_FEATURES)
    if out.ndim != 2 or out.shape[1] != N_FEATURES:
        raise ValueError(f"features must be [n, {N_FEATURES}], got {out.shape}")
    return out


def read_table_dir(path: Path) -> pd.DataFrame:
    """A small dimension table stored as Parquet files or JSON lines under ``path``."""
    path = Path(path)
    if path.is_file():
        return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_json(path, lines=True)
    parquet = sorted(path.glob("*.parquet"))
    if parquet:
        return pd.concat([pd.read_parquet(f) for f in parquet], ignore_index=True)
    jsonl = sorted(path.glob("*.jsonl"))
    if jsonl:
        return pd.concat([pd.read_json(f, lines=True) for f in jsonl], ignore_index=True)
    raise FileNotFoundError(f"{path}: no Parquet or JSON-lines files")


def pages_from_frame(frame: pd.DataFrame, group_by: str | None = "member_id"):
    """Group candidate rows into :class:`keyart.ope.LoggedPages`.

    ``frame`` has one row per (impression, candidate) with ``event_id``, ``artwork_id``,
    ``is_logged``, ``reward`` and ``propensity``. Returns ``(pages, rows)``: ``rows`` is
    ``frame`` sorted by (event_id, artwork_id) so row i of it is candidate row i of pages.
    """
    from keyart.ope import LoggedPages

    if len(frame) == 0:
        raise ValueError("no candidate rows")
    rows = frame.sort_values(["event_id", "artwork_id"], kind="stable").reset_index(drop=True)
    event = rows["event_id"].to_numpy()
    starts = np.flatnonzero(np.r_[True, event[1:] != event[:-1]])
    offsets = np.r_[starts, len(rows)]
    logged = rows["is_logged"].to_numpy(dtype=bool)
    per_event = np.add.reduceat(logged.astype(np.int64), starts)
    if np.any(per_event != 1):
        bad = event[starts[np.flatnonzero(per_event != 1)[0]]]
        raise ValueError(f"impression {bad!r} has {per_event[per_event != 1][0]} is_logged rows; expected 1")
    logged_row = np.flatnonzero(logged)
    groups = rows[group_by].to_numpy()[logged_row] if group_by and group_by in rows.columns else None
    pages = LoggedPages(offsets=offsets, logged_row=logged_row,
                        reward=rows["reward"].to_numpy(dtype=np.float64)[logged_row],
                        propensity=rows["propensity"].to_numpy(dtype=np.float64)[logged_row],
                        groups=groups)
    return pages, rows
