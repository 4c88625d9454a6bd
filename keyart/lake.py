"""The lake layout: every path a job, model step or the server reads or writes.

Everything is a folder under ``lake_root``; daily data is partitioned ``ds=YYYY-MM-DD``.
The same layout works on a local disk or a mounted object store.

    catalog/titles/           titles (Parquet; or titles.jsonl)            contracts.TITLES
    catalog/artworks/         artworks                                     contracts.ARTWORKS
    members/                  member profiles                              contracts.MEMBERS
    raw/impressions/ds=D/     serving's impression log (*.jsonl, *.parquet) contracts.IMPRESSIONS
    raw/plays/ds=D/           play log (*.jsonl, *.parquet)                 contracts.PLAYS
    clean/{impressions,plays}/ds=D/        validated, deduplicated Parquet
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
from pathlib import Path

DS_FORMAT = "%Y-%m-%d"


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
