"""serving's member table (built with Arrow) against the feature specification's row rules:
affinity_map / genre_row / response_map, member by member, edge cases included."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from keyart import feature_spec
from keyart.serving.tables import MemberTable

VOCABULARY = feature_spec.Vocabulary(genres=("drama", "comedy"))
VOCAB = {"genre:drama": 0, "genre:comedy": 1, "cast:x": 2, "cast:y": 3}
RESP_VOCAB = {"tone:a": 0, "tone:b": 1, "cast:x": 2}

ROWS = [
    # a repeated tag: the last value wins, in the place of its first appearance
    {"member_id": "m1", "member_is_kids": 0, "member_log_plays_28d": 1.5, "member_days_since_last_play": 3.0,
     "affinity_tags": ["genre:drama", "cast:x", "genre:drama", "cast:zz"], "affinity_values": [0.1, 0.2, 0.3, 0.9],
     "response_tags": ["tone:a", "tone:a", "tone:b", "unknown"], "response_values": [1.0, 2.0, 3.0, 4.0],
     "response_n": [1.0, 0.0, 2.0, 5.0]},
    # missing lists and scalars: no affinities, the unknown-member fill values
    {"member_id": "m2", "member_is_kids": None, "member_log_plays_28d": None, "member_days_since_last_play": None,
     "affinity_tags": None, "affinity_values": [0.4], "response_tags": ["tone:a"], "response_values": None,
     "response_n": [1.0]},
    # empty lists; a kids profile; a response with no impressions only
    {"member_id": "m3", "member_is_kids": 1, "member_log_plays_28d": 0.0, "member_days_since_last_play": 900.0,
     "affinity_tags": [], "affinity_values": [], "response_tags": ["cast:x"], "response_values": [0.5],
     "response_n": [0.0]},
    {"member_id": "m4", "member_is_kids": 0, "member_log_plays_28d": 2.0, "member_days_since_last_play": 0.0,
     "affinity_tags": ["cast:y", "genre:comedy"], "affinity_values": [0.7, 0.2],
     "response_tags": ["cast:x", "tone:b", "cast:x"], "response_values": [0.1, 0.2, 0.3], "response_n": [3.0, 1.0, 4.0]},
]


def reference(row):
    amap = feature_spec.affinity_map(row["affinity_tags"], row["affinity_values"])
    rmap = feature_spec.response_map(row["response_tags"], row["response_values"], row["response_n"])
    block = feature_spec.member_block([1.0], [row["member_is_kids"] or 0], [row["member_log_plays_28d"]],
                                      [row["member_days_since_last_play"]],
                                      np.array([feature_spec.genre_row(amap, VOCABULARY)]))[0]
    aff = [(VOCAB[t], v) for t, v in amap.items() if t in VOCAB]
    resp = [(RESP_VOCAB[t], v, k) for t, (v, k) in rmap.items() if t in RESP_VOCAB]
    return block, aff, resp


@pytest.mark.parametrize("as_table", [False, True])
def test_member_rows_follow_the_feature_spec(as_table):
    rows = pa.Table.from_pylist(ROWS) if as_table else ROWS
    table = MemberTable(rows, VOCAB, VOCABULARY, RESP_VOCAB)
    assert len(table) == len(ROWS)
    for row in ROWS:
        got = table.get(row["member_id"])
        block, aff, resp = reference(row)
        np.testing.assert_array_equal(got.block, block)
        assert list(zip(got.aff_cols.tolist(), got.aff_vals.tolist(), strict=True)) == aff
        assert list(zip(got.resp_cols.tolist(), got.resp_vals.tolist(), got.resp_n.tolist(), strict=True)) == resp
        assert got.segment == feature_spec.member_segment(row["member_is_kids"] or 0)
    m1 = table.get("m1")
    assert m1.aff_cols.tolist() == [0, 2] and m1.aff_vals.tolist() == [0.3, 0.2]   # last value, first place
    assert m1.resp_cols.tolist() == [0, 1] and m1.resp_vals.tolist() == [1.0, 3.0]  # n = 0 entries dropped first
    assert table.get("nobody") is table.unknown


def test_lists_of_unequal_length_refuse_the_table():
    bad = [dict(ROWS[0], affinity_values=[0.1])]
    with pytest.raises(ValueError, match="differ in length"):
        MemberTable(bad, VOCAB, VOCABULARY, RESP_VOCAB)


def test_a_snapshot_without_response_columns_loads():
    rows = [{k: v for k, v in r.items() if not k.startswith("response_")} for r in ROWS]
    table = MemberTable(rows, VOCAB, VOCABULARY, RESP_VOCAB)
    assert table.get("m1").resp_cols.size == 0 and table.get("m4").aff_cols.tolist() == [3, 1]
