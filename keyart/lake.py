"""The lake layout: every path a job, model step or the server reads or writes.

Everything is a folder under ``lake_root``; daily data is partitioned ``ds=YYYY-MM-DD``.
The same layout works on a local disk or a mounted object store.

    catalog/titles/           titles (Parquet; or titles.jsonl)            contracts.TITLES
    catalog/artworks/         artworks                                     contracts.ARTWORKS
    members/                  member profiles                              contracts.MEMBERS
    raw/impressions/ds=D/     serving's impression log (*.jsonl, *.parquet) contracts.IMPRESSIONS
    raw/plays/ds=D/           play log (*.jsonl, *.parquet)                 contracts.PLAYS
    raw/plays/ds=D/_COMPLETE  the play log's completeness marker (JSON)    contracts.PLAYS_COMPLETE
    clean/{impressions,plays}/ds=D/        validated, deduplicated Parquet
    clean/plays/ds=D/_COMPLETE             the marker, as ingest accepted it
    clean/late_plays/ds=D/    plays delivered on D that started on an earlier day (within the lookback)
    quarantine/{impressions,plays}/ds=D/   rejected rows with their reason
    metrics/<step>/ds=D/metrics.json       counts and figures for the DAG to log
    rewards/ds=D/             impressions whose attribution window closed on day D, labelled
    features/members/ds=D/    member feature snapshot as of the end of D (serving loads it)
    features/training/ds=D/   training rows: labelled impressions with their feature inputs
    priors/ds=D/              Beta posteriors per (title, artwork, segment) at the end of D
    runs/ds=D/                model step outputs (model, evaluation, bundle/)
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

DS_FORMAT = "%Y-%m-%d"
PLAYS_MARKER = "_COMPLETE"


def parse_ds(ds: str | dt.date) -> dt.date:
    """A partition date from 'YYYY-MM-DD' (or a date); a clear error otherwise."""
    if isinstance(ds, dt.date):
        return ds
    try:
        return dt.datetime.strptime(ds, DS_FORMAT).date()
    except (TypeError, ValueError):
        raise ValueError(f"ds must be YYYY-MM-DD, got {ds!r}") from None


def fmt_ds(day: dt.date | str) -> str:
    return parse_ds(day).strftime(DS_FORMAT)


def shift_ds(ds: str | dt.date, days: int) -> str:
    return fmt_ds(parse_ds(ds) + dt.timedelta(days=days))


class Lake:
    """Paths under one lake root. Pure: creates nothing."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    # dimension tables
    @property
    def titles(self) -> Path:
        return self.root / "catalog" / "titles"

    @property
    def artworks(self) -> Path:
        return self.root / "catalog" / "artworks"

    @property
    def members(self) -> Path:
        return self.root / "members"

    # daily partitions
    def _part(self, *parts: str, ds: str | dt.date) -> Path:
        return self.root.joinpath(*parts) / f"ds={fmt_ds(ds)}"

    def raw(self, log: str, ds: str | dt.date) -> Path:
        _check_log(log)
        return self._part("raw", log, ds=ds)

    def clean(self, log: str, ds: str | dt.date | None = None) -> Path:
        _check_log(log)
        return self.root / "clean" / log if ds is None else self._part("clean", log, ds=ds)

    def plays_marker(self, ds: str | dt.date, side: str = "raw") -> Path:
        """The play log's completeness marker of ``ds``: ``raw`` (the deliverer's) or ``clean`` (ingest's)."""
        if side not in ("raw", "clean"):
            raise ValueError(f"side must be 'raw' or 'clean', got {side!r}")
        return self._part(side, "plays", ds=ds) / PLAYS_MARKER

    def late_plays(self, ds: str | dt.date | None = None) -> Path:
        """Plays delivered on ``ds`` (raw/plays/ds=D) that started on an earlier day."""
        base = ("clean", "late_plays")
        return self.root.joinpath(*base) if ds is None else self._part(*base, ds=ds)

    def quarantine(self, log: str, ds: str | dt.date) -> Path:
        _check_log(log)
        return self._part("quarantine", log, ds=ds)

    def metrics(self, step: str, ds: str | dt.date) -> Path:
        return self._part("metrics", step, ds=ds) / "metrics.json"

    def rewards(self, ds: str | dt.date | None = None) -> Path:
        return self.root / "rewards" if ds is None else self._part("rewards", ds=ds)

    def member_features(self, ds: str | dt.date | None = None) -> Path:
        base = ("features", "members")
        return self.root.joinpath(*base) if ds is None else self._part(*base, ds=ds)

    def training(self, ds: str | dt.date | None = None) -> Path:
        base = ("features", "training")
        return self.root.joinpath(*base) if ds is None else self._part(*base, ds=ds)

    def priors(self, ds: str | dt.date | None = None) -> Path:
        return self.root / "priors" if ds is None else self._part("priors", ds=ds)

    def run_dir(self, ds: str | dt.date) -> Path:
        return self._part("runs", ds=ds)

    def bundle_dir(self, ds: str | dt.date) -> Path:
        return self.run_dir(ds) / "bundle"


def _check_log(log: str) -> None:
    if log not in ("impressions", "plays"):
        raise ValueError(f"log must be 'impressions' or 'plays', got {log!r}")


# --- the play log's completeness marker (contracts.PLAYS_COMPLETE) ------------------------

def day_bounds(ds: str | dt.date) -> tuple[dt.datetime, dt.datetime]:
    """[start, end) of the UTC day ``ds``."""
    start = dt.datetime.combine(parse_ds(ds), dt.time(), tzinfo=dt.UTC)
    return start, start + dt.timedelta(days=1)


@dataclass(frozen=True)
class PlaysMarker:
    """What a play-log partition's ``_COMPLETE`` says: plays of ``ds`` are delivered through an instant."""

    ds: str
    delivered_through: dt.datetime
    rows: int | None = None

    @property
    def covered_until(self) -> dt.datetime:
        """The instant up to which the plays of ``ds`` are complete, within the day."""
        start, end = day_bounds(self.ds)
        return min(max(self.delivered_through, start), end)

    @property
    def whole_day(self) -> bool:
        return self.covered_until >= day_bounds(self.ds)[1]

    def to_json(self) -> str:
        return json.dumps({"ds": self.ds, "delivered_through": self.delivered_through.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                           "rows": self.rows}, sort_keys=True)


def parse_plays_marker(text: str, ds: str | dt.date) -> tuple[PlaysMarker | None, str | None]:
    """The marker in ``text`` for partition ``ds``, or None and why it is not one."""
    from keyart.contracts import PLAYS_COMPLETE, parse_timestamp

    try:
        row = json.loads(text)
    except ValueError:
        return None, "is not JSON"
    why = PLAYS_COMPLETE.validate_row(row)
    if why:
        return None, why
    if str(row["ds"]) != fmt_ds(ds):
        return None, f"is for ds={row['ds']}, not {fmt_ds(ds)}"
    through = row["delivered_through"]
    through = through if isinstance(through, dt.datetime) else parse_timestamp(through)
    if through.tzinfo is None:
        through = through.replace(tzinfo=dt.UTC)
    rows = row.get("rows")
    return PlaysMarker(fmt_ds(ds), through.astimezone(dt.UTC), None if rows is None else int(rows)), None


def read_plays_marker(path: Path, ds: str | dt.date) -> tuple[PlaysMarker | None, str | None]:
    """The marker at ``path``, or None and why (missing, unreadable, invalid)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None, f"no completeness marker at {path}"
    except OSError as exc:
        return None, f"cannot read {path}: {exc}"
    marker, why = parse_plays_marker(text, ds)
    return marker, (f"{path} {why}" if why else None)


def write_plays_marker(path: Path, marker: PlaysMarker) -> Path:
    """Write ``marker`` at ``path`` atomically (a reader never sees half a marker)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(marker.to_json() + "\n")
    tmp.replace(path)
    return path


def raw_rows(folder: Path) -> int:
    """Rows in a raw partition as ingest counts them: non-blank lines of JSON Lines files plus Parquet rows."""
    n = 0
    if not folder.is_dir():
        return n
    for p in folder.iterdir():
        if not p.is_file() or p.name.startswith(("_", ".")):
            continue
        if p.name.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
            import gzip

            with (gzip.open(p, "rb") if p.name.endswith(".gz") else p.open("rb")) as fh:
                n += sum(1 for line in fh if line.rstrip(b"\r\n").strip(b" "))
        elif p.name.endswith(".parquet"):
            import pyarrow.parquet as pq

            n += pq.read_metadata(p).num_rows
    return n


def mark_plays_delivered(lake: Lake, ds: str | dt.date, delivered_through: dt.datetime | None = None) -> Path:
    """Write ``raw/plays/ds=D/_COMPLETE`` for the partition as it is now: delivered through
    ``delivered_through`` (default the end of the day), with its current row count."""
    through = delivered_through or day_bounds(ds)[1]
    return write_plays_marker(lake.plays_marker(ds), PlaysMarker(fmt_ds(ds), through, raw_rows(lake.raw("plays", ds))))


# --- labelled days ------------------------------------------------------------------------

def partition_days(root: Path, through: str | dt.date) -> list[str]:
    """Dates of the ``ds=`` partitions under ``root`` that hold Parquet, on or before
    ``through``, oldest first."""
    if not root.is_dir():
        return []
    last = parse_ds(through)
    days = []
    for child in root.iterdir():
        if child.is_dir() and child.name.startswith("ds=") and any(child.glob("*.parquet")):
            try:
                day = parse_ds(child.name[3:])
            except ValueError:
                continue
            if day <= last:
                days.append(day)
    return [fmt_ds(d) for d in sorted(days)]


def labelled_days(lake: Lake, through: str | dt.date) -> list[str]:
    """Dates of the training partitions on or before ``through``, oldest first."""
    return partition_days(lake.training(), through)


def previous_priors_day(lake: Lake, ds: str | dt.date, max_gap_days: int) -> str | None:
    """The newest priors partition before ``ds`` and at most ``max_gap_days`` before it, or
    None: a day the priors task did not run must not reset every posterior."""
    older = partition_days(lake.priors(), shift_ds(ds, -1))
    if older and parse_ds(older[-1]) >= parse_ds(shift_ds(ds, -max_gap_days)):
        return older[-1]
    return None


def heldout_day(lake: Lake, ds: str | dt.date) -> str:
    """The newest labelled day on or before ``ds`` (never used for training)."""
    days = labelled_days(lake, ds)
    if not days:
        raise FileNotFoundError(f"no training partitions under {lake.training()} on or before {fmt_ds(ds)}")
    return days[-1]


def training_days(lake: Lake, ds: str | dt.date, window_days: int) -> list[str]:
    """Labelled days in ``[H - window_days, H - 1]`` for the held-out day H of ``ds``.

    With no labelled day before H (a cold start) this is ``[H]``: the model trains on the
    early part of H and is evaluated on the late part (:func:`time_split_rows`).
    """
    if window_days < 1:
        raise ValueError(f"window_days must be >= 1, got {window_days}")
    held = parse_ds(heldout_day(lake, ds))
    first = held - dt.timedelta(days=window_days)
    older = [d for d in labelled_days(lake, held - dt.timedelta(days=1)) if parse_ds(d) >= first]
    return older or [fmt_ds(held)]


def exploration_days(lake: Lake, ds: str | dt.date, window_days: int, horizon_days: int) -> list[str]:
    """Labelled days in ``[H - horizon_days, H - window_days - 1]``: older than the training
    window of ``ds`` but within the exploration horizon (oldest first).

    Training keeps the uniformly-logged impressions of these days (:func:`training_days`
    keeps every impression of the window): uniform logs are the only data where every
    artwork was shown in every context, and a window of exploit-logged days would let the
    cold start's uniform day fall out after ``window_days``.
    """
    if horizon_days <= window_days:
        return []
    held = parse_ds(heldout_day(lake, ds))
    first, last = held - dt.timedelta(days=horizon_days), held - dt.timedelta(days=window_days + 1)
    return [d for d in labelled_days(lake, last) if parse_ds(d) >= first]


def is_cold_start(days: Sequence[str], heldout: str) -> bool:
    """True when the training days are the held-out day itself."""
    return list(days) == [heldout]
