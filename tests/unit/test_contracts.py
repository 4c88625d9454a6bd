"""Field and Contract validation: good rows pass, bad rows fail naming the field."""

from __future__ import annotations

import datetime as dt

import pytest

from keyart.contracts import (
    ALL,
    ARTWORKS,
    IMPRESSIONS,
    MEMBERS,
    PLAYS,
    TITLES,
    Field,
    parse_timestamp,
    reason_kind,
    validate_records,
)


def good_play() -> dict:
    return {"member_id": "m000001", "title_id": "t0001", "ts": "2026-11-01T20:15:00.123Z",
            "minutes_played": 42.5, "device": "tv"}


def good_impression() -> dict:
    return {
        "event_id": "rnd-20261101-000001-00", "ts": "2026-11-01T20:15:00Z", "member_id": "m000001",
        "title_id": "good_will_hunting", "artwork_id": "good_will_hunting-couple",
        "candidates": ["good_will_hunting-couple", "good_will_hunting-robin"], "propensity": 0.5,
        "model_version": "random", "policy": "random",
        "context": {"device": "mobile", "country": "US", "local_hour": 21, "day_of_week": 6,
                    "page_row": 0, "position": 3},
    }


GOOD_ROWS = [
    (TITLES, {"title_id": "good_will_hunting", "name": "Good Will Hunting", "genres": ["drama"],
              "cast": ["robin_williams"], "maturity_rating": "R"}),
    (ARTWORKS, {"artwork_id": "t0001-a0", "title_id": "t0001", "tags": ["tone:drama", "closeup"],
                "is_default": True, "active_from": "2026-01-01", "active_to": None}),
    (ARTWORKS, {"artwork_id": "t0001-a1", "title_id": "t0001", "tags": [], "is_default": False,
                "active_from": dt.date(2026, 1, 1), "active_to": dt.date(2026, 12, 31)}),
    (MEMBERS, {"member_id": "m000001", "country": "US", "language": "en-US", "profile": "kids",
               "signup_date": "2024-02-29"}),
    (PLAYS, good_play()),
    (PLAYS, {**good_play(), "ts": dt.datetime(2026, 11, 1, 20, tzinfo=dt.UTC), "minutes_played": 0}),
    (IMPRESSIONS, good_impression()),
]


@pytest.mark.parametrize(("contract", "row"), GOOD_ROWS, ids=lambda x: getattr(x, "name", None))
def test_good_rows_are_valid(contract, row):
    assert contract.validate_row(row) is None


# (contract, base row, field, bad value, expected words in the reason)
BAD_INPUTS = [
    (PLAYS, good_play, "member_id", None, "missing"),
    (PLAYS, good_play, "member_id", "m 1", "not a valid id"),
    (PLAYS, good_play, "member_id", 42, "must be a string"),
    (PLAYS, good_play, "title_id", "x" * 129, "not a valid id"),
    (PLAYS, good_play, "ts", "yesterday", "ISO-8601"),
    (PLAYS, good_play, "ts", 1_700_000_000, "ISO-8601"),
    (PLAYS, good_play, "minutes_played", -1.0, ">= 0"),
    (PLAYS, good_play, "minutes_played", 24 * 60 + 1, "<= 1440"),
    (PLAYS, good_play, "minutes_played", float("nan"), "finite"),
    (PLAYS, good_play, "minutes_played", "12", "must be a number"),
    (PLAYS, good_play, "minutes_played", True, "must be a number"),
    (PLAYS, good_play, "device", "toaster", "must be one of"),
    (IMPRESSIONS, good_impression, "propensity", 0.0, ">= 1e-09"),
    (IMPRESSIONS, good_impression, "propensity", 1.5, "<= 1.0"),
    (IMPRESSIONS, good_impression, "candidates", [], "at least 1"),
    (IMPRESSIONS, good_impression, "candidates", "t0001-a0", "list of strings"),
    (IMPRESSIONS, good_impression, "candidates", ["ok", 3], "[1] must be a string"),
    (IMPRESSIONS, good_impression, "candidates", ["bad id!"], "[0] is not a valid id"),
    (IMPRESSIONS, good_impression, "context", "tv", "must be an object"),
    (IMPRESSIONS, good_impression, "context", {"device": "tv"}, ".country is missing"),
    (MEMBERS, lambda: dict(GOOD_ROWS[3][1]), "profile", "teen", "must be one of"),
    (MEMBERS, lambda: dict(GOOD_ROWS[3][1]), "signup_date", "2024-02-30", "YYYY-MM-DD"),
    (ARTWORKS, lambda: dict(GOOD_ROWS[1][1]), "is_default", "yes", "must be a boolean"),
    (TITLES, lambda: dict(GOOD_ROWS[0][1]), "genres", [], "at least 1"),
    (TITLES, lambda: dict(GOOD_ROWS[0][1]), "maturity_rating", "NC-17", "must be one of"),
]


@pytest.mark.parametrize(("contract", "make", "name", "value", "words"), BAD_INPUTS,
                         ids=[f"{c.name}.{n}={v!r}"[:60] for c, _, n, v, _ in BAD_INPUTS])
def test_bad_value_is_rejected_naming_the_field(contract, make, name, value, words):
    row = make()
    row[name] = value
    why = contract.validate_row(row)
    assert why is not None
    assert why.startswith(name + " ") or why.startswith(name + "."), why
    assert words in why


@pytest.mark.parametrize("field_name", ["local_hour", "day_of_week", "page_row"])
def test_struct_child_out_of_range_names_parent_and_child(field_name):
    row = good_impression()
    row["context"] = {**row["context"], field_name: 5000}
    why = IMPRESSIONS.validate_row(row)
    assert why is not None and why.startswith(f"context .{field_name} must be <=")


def test_missing_column_and_non_mapping_rows():
    row = good_play()
    del row["device"]
    assert PLAYS.validate_row(row) == "device is missing (null)"
    assert PLAYS.validate_row(["not", "a", "row"]) == "row must be an object, got list"


def test_integer_fields_reject_fractions_but_accept_integral_floats():
    f = Field("n", "int", minimum=0)
    assert f.check(3.0) is None
    assert "integer" in (f.check(3.5) or "")
    assert Field("x", "double", nullable=True).check(None) is None


def test_unknown_dtype_is_a_programming_error():
    with pytest.raises(ValueError, match="unknown dtype"):
        Field("x", "decimal").check(1)


def test_parse_timestamp_is_utc():
    assert parse_timestamp("2026-11-01T23:30:00Z") == dt.datetime(2026, 11, 1, 23, 30, tzinfo=dt.UTC)
    assert parse_timestamp("2026-11-01T23:30:00-02:00") == dt.datetime(2026, 11, 2, 1, 30, tzinfo=dt.UTC)
    assert parse_timestamp("2026-11-01 23:30:00") == dt.datetime(2026, 11, 1, 23, 30, tzinfo=dt.UTC)
    assert parse_timestamp("nope") is None


def test_validate_records_counts_and_locates_first_error():
    rows = [good_play(), {**good_play(), "device": "fax"}, good_play(), {**good_play(), "minutes_played": -3},
            {**good_play(), "device": "vcr"}, "garbage"]
    report = validate_records(PLAYS, rows, source="raw/plays/ds=2026-11-01/x.jsonl")
    assert (report.rows, report.valid, report.invalid) == (6, 2, 4)
    assert not report.ok
    assert report.first_error == (
        "raw/plays/ds=2026-11-01/x.jsonl row 2: device must be one of ['tv', 'mobile', 'web', 'tablet'], got 'fax'"
    )
    by_field: dict[str, int] = {}
    for kind, n in report.reasons.items():
        by_field[kind.split()[0]] = by_field.get(kind.split()[0], 0) + n
    assert by_field == {"device": 2, "minutes_played": 1, "row": 1}
    assert all("got" not in kind for kind in report.reasons)  # counted by kind, not by value
    assert "4 of 6 rows invalid" in report.summary()


def test_validate_records_all_valid_summary():
    report = validate_records(PLAYS, [good_play()] * 3, source="f.jsonl")
    assert report.ok and report.summary() == "f.jsonl: 3 rows, all valid"


def test_reason_kind_drops_the_value():
    assert reason_kind("ts must be an ISO-8601 UTC timestamp, got 'x'") == "ts must be an ISO-8601 UTC timestamp"
    assert reason_kind("minutes_played must be >= 0, got -1") == "minutes_played must be >= 0"


@pytest.mark.parametrize("contract", list(ALL.values()), ids=list(ALL))
def test_arrow_schema_matches_fields(contract):
    schema = contract.arrow_schema()
    assert schema.names == contract.columns
    for f in contract.fields:
        assert schema.field(f.name).nullable == f.nullable
