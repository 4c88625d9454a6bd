"""Data contracts: the one definition of every table keyart reads or writes.

Each contract is a list of :class:`Field`. From it come the Spark schema
(:meth:`Contract.spark_schema`), the Arrow schema (:meth:`Contract.arrow_schema`) and
row validation for Python-side data (:meth:`Contract.validate_row`,
:func:`validate_records`). Spark jobs build their validation expressions from the same
fields (see ``keyart.jobs.common``). docs/data-contracts.md describes them for users.

Types: ``string``, ``long``, ``int``, ``double``, ``boolean``, ``timestamp`` (UTC),
``date``, ``array<string>``, ``array<double>`` (``minimum``/``maximum`` bound each item),
and ``struct`` (with ``children``).
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

# An id is the whole string: 1-128 of these characters. In Java (Spark's rlike) and Python
# `$` also matches before a final newline, so `(?!\n)` refuses "m1\n". Engines without
# look-ahead (pydantic's Rust regex, JSON Schema), where `$` is the end of the text, use
# ID_SCHEMA_PATTERN: the same set of strings.
ID_CHARS = r"[A-Za-z0-9_.:\-]{1,128}"
ID_PATTERN = rf"^{ID_CHARS}$(?!\n)"
ID_SCHEMA_PATTERN = rf"^{ID_CHARS}$"
_ID_RE = re.compile(ID_PATTERN)
# Most candidate artworks one impression may list (serving's serve_max_artworks may not exceed it).
MAX_CANDIDATES = 1000


@dataclass(frozen=True)
class Field:
    """One column of a contract, with its checks."""

    name: str
    dtype: str
    nullable: bool = False
    doc: str = ""
    minimum: float | None = None
    maximum: float | None = None
    allowed: tuple[str, ...] | None = None
    is_id: bool = False
    children: tuple[Field, ...] = ()

    def check(self, value: Any) -> str | None:
        """Return why ``value`` violates this field, or None if it is valid."""
        if value is None:
            return None if self.nullable else "is missing (null)"
        t = self.dtype
        if t == "string":
            if not isinstance(value, str):
                return f"must be a string, got {type(value).__name__}"
            if self.is_id and not _ID_RE.match(value):
                return f"is not a valid id ({value[:40]!r}; allowed {ID_PATTERN})"
            if self.allowed is not None and value not in self.allowed:
                return f"must be one of {list(self.allowed)}, got {value[:40]!r}"
            return None
        if t in ("long", "int", "double"):
            if isinstance(value, bool) or not isinstance(value, int | float):
                return f"must be a number, got {type(value).__name__}"
            if t != "double" and isinstance(value, float) and not value.is_integer():
                return f"must be an integer, got {value!r}"
            if isinstance(value, float) and not math.isfinite(value):
                return f"must be finite, got {value!r}"
            if self.minimum is not None and value < self.minimum:
                return f"must be >= {self.minimum}, got {value!r}"
            if self.maximum is not None and value > self.maximum:
                return f"must be <= {self.maximum}, got {value!r}"
            return None
        if t == "boolean":
            return None if isinstance(value, bool) else f"must be a boolean, got {type(value).__name__}"
        if t == "timestamp":
            if isinstance(value, dt.datetime):
                return None
            if isinstance(value, str) and parse_timestamp(value) is not None:
                return None
            return f"must be an ISO-8601 UTC timestamp, got {str(value)[:40]!r}"
        if t == "date":
            if isinstance(value, dt.date):
                return None
            if isinstance(value, str):
                try:
                    dt.date.fromisoformat(value)
                    return None
                except ValueError:
                    pass
            return f"must be a YYYY-MM-DD date, got {str(value)[:40]!r}"
        if t == "array<string>":
            if not isinstance(value, list | tuple):
                return f"must be a list of strings, got {type(value).__name__}"
            for i, item in enumerate(value):
                if not isinstance(item, str):
                    return f"[{i}] must be a string, got {type(item).__name__}"
                if self.is_id and not _ID_RE.match(item):
                    return f"[{i}] is not a valid id ({item[:40]!r})"
            if self.minimum is not None and len(value) < self.minimum:
                return f"must have at least {int(self.minimum)} items, got {len(value)}"
            if self.maximum is not None and len(value) > self.maximum:
                return f"must have at most {int(self.maximum)} items, got {len(value)}"
            return None
        if t == "array<double>":
            if not isinstance(value, list | tuple):
                return f"must be a list of numbers, got {type(value).__name__}"
            for i, item in enumerate(value):
                if isinstance(item, bool) or not isinstance(item, int | float) or not math.isfinite(item):
                    return f"[{i}] must be a finite number, got {str(item)[:40]!r}"
                if self.minimum is not None and item < self.minimum:
                    return f"[{i}] must be >= {self.minimum}, got {item!r}"
                if self.maximum is not None and item > self.maximum:
                    return f"[{i}] must be <= {self.maximum}, got {item!r}"
            return None
        if t == "struct":
            if not isinstance(value, Mapping):
                return f"must be an object, got {type(value).__name__}"
            for child in self.children:
                why = child.check(value.get(child.name))
                if why:
                    return f".{child.name} {why}"
            return None
        raise ValueError(f"unknown dtype {t!r} in contract field {self.name}")


def parse_timestamp(value: str) -> dt.datetime | None:
    """Parse an ISO-8601 timestamp; naive values are UTC. None if unparseable."""
    try:
        ts = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        return None
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=dt.UTC)
    return ts.astimezone(dt.UTC)


@dataclass(frozen=True)
class Contract:
    """A named table: its fields, primary key and partitioning."""

    name: str
    fields: tuple[Field, ...]
    key: tuple[str, ...] = ()
    partitioned_by_ds: bool = False
    doc: str = ""
    _by_name: dict[str, Field] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._by_name.update({f.name: f for f in self.fields})

    @property
    def columns(self) -> list[str]:
        return [f.name for f in self.fields]

    def __getitem__(self, name: str) -> Field:
        return self._by_name[name]

    def validate_row(self, row: Any) -> str | None:
        """Why ``row`` (a mapping) violates this contract, or None. Names the field."""
        if not isinstance(row, Mapping):
            return f"row must be an object, got {type(row).__name__}"
        for f in self.fields:
            why = f.check(row.get(f.name))
            if why:
                return f"{f.name} {why}"
        return None

    def spark_schema(self):  # -> pyspark.sql.types.StructType
        from pyspark.sql import types as T

        def to_spark(f: Field):
            simple = {
                "string": T.StringType(),
                "long": T.LongType(),
                "int": T.IntegerType(),
                "double": T.DoubleType(),
                "boolean": T.BooleanType(),
                "timestamp": T.TimestampType(),
                "date": T.DateType(),
                "array<string>": T.ArrayType(T.StringType(), containsNull=False),
                "array<double>": T.ArrayType(T.DoubleType(), containsNull=False),
            }
            if f.dtype == "struct":
                return T.StructType([T.StructField(c.name, to_spark(c), c.nullable) for c in f.children])
            return simple[f.dtype]

        return T.StructType([T.StructField(f.name, to_spark(f), f.nullable) for f in self.fields])

    def arrow_schema(self):  # -> pyarrow.Schema
        import pyarrow as pa

        def to_arrow(f: Field):
            simple = {
                "string": pa.string(),
                "long": pa.int64(),
                "int": pa.int32(),
                "double": pa.float64(),
                "boolean": pa.bool_(),
                "timestamp": pa.timestamp("us", tz="UTC"),
                "date": pa.date32(),
                "array<string>": pa.list_(pa.string()),
                "array<double>": pa.list_(pa.float64()),
            }
            if f.dtype == "struct":
                return pa.struct([pa.field(c.name, to_arrow(c), c.nullable) for c in f.children])
            return simple[f.dtype]

        return pa.schema([pa.field(f.name, to_arrow(f), f.nullable) for f in self.fields])


@dataclass
class ValidationReport:
    """Outcome of validating many rows: counts and the first violation, located."""

    source: str
    rows: int = 0
    valid: int = 0
    invalid: int = 0
    first_error: str | None = None
    reasons: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.invalid == 0

    def summary(self) -> str:
        if self.ok:
            return f"{self.source}: {self.rows} rows, all valid"
        return f"{self.source}: {self.invalid} of {self.rows} rows invalid; first: {self.first_error}"


def reason_kind(reason: str) -> str:
    """Collapse a reason to its field and kind, for counting (drops the offending value)."""
    return reason.split(",")[0].split(" got ")[0].strip()


def validate_records(contract: Contract, rows: Iterable[Any], source: str = "<rows>") -> ValidationReport:
    """Validate rows; never raises on a malformed row. Names file, row and field of the first error."""
    report = ValidationReport(source=source)
    for i, row in enumerate(rows, start=1):
        report.rows += 1
        why = contract.validate_row(row)
        if why is None:
            report.valid += 1
            continue
        report.invalid += 1
        kind = reason_kind(why)
        report.reasons[kind] = report.reasons.get(kind, 0) + 1
        if report.first_error is None:
            report.first_error = f"{source} row {i}: {why}"
    return report


# ----------------------------------------------------------------------------------------
# The contracts
# ----------------------------------------------------------------------------------------

DEVICES = ("tv", "mobile", "web", "tablet")
PROFILES = ("adult", "kids")
MATURITY_RATINGS = ("G", "PG", "PG-13", "R", "TV-Y", "TV-PG", "TV-14", "TV-MA")

TITLES = Contract(
    name="titles",
    key=("title_id",),
    doc="The catalog's titles.",
    fields=(
        Field("title_id", "string", is_id=True, doc="Stable title id."),
        Field("name", "string", doc="Display name."),
        Field("genres", "array<string>", minimum=1, doc="Lower-case genre names, e.g. ['drama','romance']."),
        Field("cast", "array<string>", doc="Cast ids (snake_case), e.g. ['robin_williams']."),
        Field("maturity_rating", "string", allowed=MATURITY_RATINGS),
    ),
)

ARTWORKS = Contract(
    name="artworks",
    key=("artwork_id",),
    doc="Candidate artworks; a title has one or more, exactly one of them the default.",
    fields=(
        Field("artwork_id", "string", is_id=True),
        Field("title_id", "string", is_id=True),
        Field("tags", "array<string>", doc="'cast:<id>', 'tone:<genre>', and flags such as 'closeup', 'text_heavy'."),
        Field("is_default", "boolean", doc="Shown when no model is available."),
        Field("active_from", "date", doc="First day the artwork may be shown."),
        Field("active_to", "date", nullable=True, doc="Last day it may be shown; null = open-ended."),
    ),
)

MEMBERS = Contract(
    name="members",
    key=("member_id",),
    doc="Member profiles.",
    fields=(
        Field("member_id", "string", is_id=True),
        Field("country", "string", doc="ISO 3166-1 alpha-2."),
        Field("language", "string", doc="BCP-47 language tag."),
        Field("profile", "string", allowed=PROFILES),
        Field("signup_date", "date"),
    ),
)

PLAYS = Contract(
    name="plays",
    key=("member_id", "title_id", "ts"),
    partitioned_by_ds=True,
    doc="One row per play start; ds is the UTC date of ts.",
    fields=(
        Field("member_id", "string", is_id=True),
        Field("title_id", "string", is_id=True),
        Field("ts", "timestamp", doc="Play start, UTC."),
        Field("minutes_played", "double", minimum=0, maximum=24 * 60),
        Field("device", "string", allowed=DEVICES),
    ),
)

PLAYS_COMPLETE = Contract(
    name="plays_complete",
    key=("ds",),
    partitioned_by_ds=True,
    doc="The play log's completeness marker: one JSON object in `raw/plays/ds=D/_COMPLETE`, written by whoever "
    "delivers the play log after the partition's files; ingest carries it to `clean/plays/ds=D/_COMPLETE`. "
    "Without it the day's plays count as incomplete and no attribution window that needs them is labelled.",
    fields=(
        Field("ds", "date", doc="The partition it describes."),
        Field("delivered_through", "timestamp",
              doc="Every play that started on ds before this instant (UTC) has been delivered (in this partition, or "
              "as a late play in a later one already delivered); ds+1 at 00:00Z or later = the whole day."),
        Field("rows", "long", nullable=True, minimum=0,
              doc="Rows delivered in raw/plays/ds=D, every file; ingest counts the day incomplete when it reads "
              "fewer. Null = not checked."),
    ),
)

CONTEXT_FIELDS = (
    Field("device", "string", allowed=DEVICES),
    Field("country", "string"),
    Field("local_hour", "int", minimum=0, maximum=23),
    Field("day_of_week", "int", minimum=0, maximum=6, doc="0 = Monday."),
    Field("page_row", "int", minimum=0, maximum=1000),
    Field("position", "int", minimum=0, maximum=1000),
)

IMPRESSIONS = Contract(
    name="impressions",
    key=("event_id",),
    partitioned_by_ds=True,
    doc="One row per decision serving made and showed; ds is the UTC date of ts.",
    fields=(
        Field("event_id", "string", is_id=True, doc="Unique, HMAC-signed by serving."),
        Field("ts", "timestamp", doc="Decision time, UTC."),
        Field("member_id", "string", is_id=True),
        Field("title_id", "string", is_id=True),
        Field("artwork_id", "string", is_id=True, doc="The artwork shown."),
        Field("candidates", "array<string>", is_id=True, minimum=1, maximum=MAX_CANDIDATES,
              doc="Every artwork that could have been shown."),
        Field("propensity", "double", minimum=1e-9, maximum=1.0, doc="P(artwork_id | context) under the logging policy."),
        Field("candidate_probabilities", "array<double>", nullable=True, minimum=0.0, maximum=1.0,
              doc="The logging policy's probability of every candidate, aligned with `candidates`: the served "
              "distribution (6 significant digits; the shown artwork's entry is `propensity` exactly). They sum "
              "to 1 within 1e-5. Null in logs written before serving logged it."),
        Field("model_version", "string", doc="Bundle version that decided, or 'default'/'random'."),
        Field("policy", "string", doc="Policy name that decided (e.g. squarecb, random)."),
        Field("context", "struct", children=CONTEXT_FIELDS),
    ),
)

REWARDS = Contract(
    name="rewards",
    key=("event_id",),
    partitioned_by_ds=True,
    doc="Labelled impressions; ds = the run that labelled them (window closed that day).",
    fields=IMPRESSIONS.fields
    + (
        Field("impression_ds", "date"),
        Field("reward", "int", minimum=0, maximum=1, doc="1 if a quality play was attributed."),
        Field("minutes", "double", minimum=0, doc="Minutes of the attributed play (0 if none)."),
        Field("played", "int", minimum=0, maximum=1, doc="1 if any play was attributed (quality or not)."),
    ),
)

PRIORS = Contract(
    name="priors",
    key=("title_id", "artwork_id", "segment"),
    partitioned_by_ds=True,
    doc="Beta posterior of the quality-play rate per artwork and member segment ('all' = every member).",
    fields=(
        Field("title_id", "string", is_id=True),
        Field("artwork_id", "string", is_id=True),
        Field("segment", "string", doc="'all', or a segment key such as 'profile=kids'."),
        Field("alpha", "double", minimum=0),
        Field("beta", "double", minimum=0),
        Field("n_impressions", "double", minimum=0, doc="Importance-weighted impressions seen (after decay)."),
    ),
)

QUARANTINE_EXTRA = (
    Field("reason", "string", doc="Why the row failed, naming the field."),
    Field("source_file", "string"),
    Field("raw", "string", doc="The row as it arrived."),
)

ALL: dict[str, Contract] = {
    c.name: c for c in (TITLES, ARTWORKS, MEMBERS, PLAYS, PLAYS_COMPLETE, IMPRESSIONS, REWARDS, PRIORS)
}


def render_markdown() -> str:
    """The contracts as Markdown tables (docs/data-contracts.md embeds this verbatim)."""
    out: list[str] = []
    for c in ALL.values():
        where = "partitioned by `ds=YYYY-MM-DD`" if c.partitioned_by_ds else "not partitioned"
        out.append(f"### `{c.name}`\n\n{c.doc} Key: `{', '.join(c.key)}`; {where}.\n")
        out.append("| field | type | null | checks | meaning |\n|---|---|---|---|---|")
        for f in c.fields:
            rows = [(f.name, f)] + [(f"{f.name}.{ch.name}", ch) for ch in f.children]
            for name, fld in rows:
                checks = []
                if fld.is_id:
                    checks.append("id")
                if fld.minimum is not None:
                    checks.append(f">= {fld.minimum:g}" if fld.dtype != "array<string>" else f">= {fld.minimum:g} items")
                if fld.maximum is not None:
                    checks.append(f"<= {fld.maximum:g}")
                if fld.allowed:
                    checks.append(" / ".join(fld.allowed))
                out.append(f"| `{name}` | {fld.dtype} | {'yes' if fld.nullable else 'no'} | {', '.join(checks)} | {fld.doc} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":  # python -m keyart.contracts > the generated part of the doc
    print(render_markdown())
