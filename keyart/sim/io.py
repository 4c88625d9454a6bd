"""Small writers for the simulator: atomic JSON Lines and contract-typed Parquet."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from keyart.contracts import Contract

try:  # orjson is a dependency of keyart, but keep the simulator usable without it
    import orjson

    def _dumps(row: Mapping[str, Any]) -> bytes:
        return orjson.dumps(row, option=orjson.OPT_APPEND_NEWLINE)
except ImportError:  # pragma: no cover
    def _dumps(row: Mapping[str, Any]) -> bytes:
        return (json.dumps(row, separators=(",", ":")) + "\n").encode()


def iso_z(ts: np.ndarray) -> list[str]:
    """ISO-8601 UTC strings with millisecond precision and a trailing Z."""
    return [s + "Z" for s in np.datetime_as_string(np.asarray(ts, dtype="datetime64[ms]"), unit="ms").tolist()]


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


def write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> int:
    """Write rows as JSON Lines, replacing ``path`` atomically. Returns the row count."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    n = 0
    with open(tmp, "wb") as fh:
        for row in rows:
            fh.write(_dumps(row))
            n += 1
    os.replace(tmp, path)
    return n


def write_json(path: Path, obj: Any) -> None:
    """Write one JSON document atomically (pretty-printed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_default) + "\n")
    os.replace(tmp, path)


def _default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_table(folder: Path, name: str, contract: Contract, columns: Mapping[str, Any]) -> Path:
    """Replace the contents of ``folder`` with one Parquet file typed by ``contract``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.parquet"):
        old.unlink()
    table = pa.Table.from_pydict({c: columns[c] for c in contract.columns}, schema=contract.arrow_schema())
    path = folder / f"{name}.parquet"
    tmp = _tmp(path)
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path
