"""When an artwork may be shown: the one rule the priors job, export and serving apply.

An artwork is active on day ``d`` when ``active_from <= d`` and (``active_to`` is null or
``d <= active_to``); both bounds are inclusive dates (contracts.ARTWORKS). Code that needs
"active on some day of a range" (a bundle is exported for the days it may serve) asks
:func:`active_between` with the range's first and last day.

Dates are compared as proleptic ordinals (``date.toordinal()``): a null ``active_from``
means "always was" and a null ``active_to`` "open-ended".
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Any

import numpy as np

ALWAYS = 0  # ordinal before every real date: a null active_from
OPEN_ENDED = dt.date.max.toordinal()  # ordinal after every real date: a null active_to


def to_ordinal(value: Any, missing: int) -> int:
    """The ordinal of a date, datetime, pandas Timestamp or ISO string; ``missing`` for null."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return missing
    if isinstance(value, str):
        return dt.date.fromisoformat(value[:10]).toordinal()
    if hasattr(value, "date") and callable(value.date):  # datetime, pandas Timestamp
        if value != value:  # NaT
            return missing
        return value.date().toordinal()
    return value.toordinal()


def ordinals(values: Iterable[Any], missing: int) -> np.ndarray:
    """:func:`to_ordinal` of every value, as int64."""
    return np.fromiter((to_ordinal(v, missing) for v in values), dtype=np.int64)


def active_between(active_from: np.ndarray, active_to: np.ndarray, first: int, last: int) -> np.ndarray:
    """Which artworks are active on at least one day of ``[first, last]`` (ordinals; arrays of
    :func:`ordinals` with ``ALWAYS`` / ``OPEN_ENDED`` for nulls)."""
    return (np.asarray(active_from) <= last) & (np.asarray(active_to) >= first)


def active_on(active_from: np.ndarray, active_to: np.ndarray, day: int) -> np.ndarray:
    """Which artworks are active on ``day`` (an ordinal)."""
    return active_between(active_from, active_to, day, day)


def active_sql(first: str, last: str | None = None) -> str:
    """The same rule as a Spark SQL predicate on the catalog's ``active_from``/``active_to``
    columns, for the days ``first..last`` (YYYY-MM-DD; ``last`` defaults to ``first``)."""
    for day in (first, last or first):
        dt.date.fromisoformat(day)  # a literal goes into SQL: refuse anything but a date
    return (f"(active_from IS NULL OR active_from <= DATE'{last or first}') "
            f"AND (active_to IS NULL OR active_to >= DATE'{first}')")
