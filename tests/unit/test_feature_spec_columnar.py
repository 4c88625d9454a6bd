"""columnar_feature_matrix (the features job's path) equals feature_matrix bit for bit."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest

from keyart import feature_spec as F


def columnar(inputs, vocabulary=None, arrow=False):
    """columnar_feature_matrix of feature_matrix's inputs: every row its own member, artwork and title."""
    n = len(inputs["art_tags"])
    blocks = F.CatalogBlocks(inputs["art_tags"], inputs["art_is_default"], inputs["title_genres"], vocabulary, inputs["title_id"])
    members = {k: inputs[k] for k in (*F.UNKNOWN_MEMBER, "device", "local_hour", "day_of_week", "page_row", "position")}
    if arrow:
        members = {k: pa.array(v) for k, v in members.items()}
    rows = np.arange(n)
    priors = {k: inputs[k] for k in ("art_prior_mean", "art_prior_n", "art_prior_mean_seg", "title_prior_mean")}
    return F.columnar_feature_matrix(blocks, members, rows, rows, rows, priors)


def assert_same_bits(a, b):
    assert a.dtype == b.dtype == np.float32 and a.shape == b.shape
    np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


EDGES = {
    "member_known": [1, 0, 1, 1, 1],
    "member_is_kids": [0, 1, 0, 1, 0],
    "member_log_plays_28d": [math.log1p(10), 0.0, 1.0, 2.0, 0.5],
    "member_days_since_last_play": [2.0, F.DAYS_SINCE_CAP, float("nan"), 400.0, 0.0],
    # repeated tags: the last value wins; a tag nobody asks for; an unknown member's empty lists
    "affinity_tags": [["genre:comedy", "cast:a", "genre:drama", "cast:a", "genre:comedy"], [], ["cast:zz", "genre:x"],
                      ["genre:", "cast:b"], ["genre:drama"]],
    "affinity_values": [[0.6, 0.3, 0.2, 0.7, 0.1], [], [0.5, 0.25], [0.125, 0.3], [1.0]],
    # a repeated tag whose last entry has no impressions: the earlier one counts (n > 0 first)
    "response_tags": [["cast:a", "closeup", "mood:dark", "closeup", "tone:comedy", "tone:comedy"], [], ["rare"], [],
                      ["tone:"]],
    "response_values": [[0.02, -0.01, 0.5, -0.03, 0.07, 0.9], [], [0.3], [], [-0.0]],
    "response_n": [[4.0, 3.0, 0.0, 2.0, 5.0, 0.0], [], [1.0], [], [2.0]],
    "device": ["tv", "mobile", "web", "tablet", "tv"],
    "local_hour": [18, 6, 0, 23, 12],
    "day_of_week": [5, 1, 6, 0, 3],
    "page_row": [0, 3, 1, 2, 0],
    "position": [1, 7, 0, 4, 2],
    # cast tags repeated and absent from the member, tags outside the vocabulary (hashed), no tags,
    # a 'key:' tag with an empty value
    "art_tags": [["cast:a", "tone:comedy", "closeup", "cast:a", "cast:c"], ["tone:family"], ["rare", "x:y:z", "mood:dark"],
                 [], ["tone:", "cast:b", "genre:drama"]],
    "art_is_default": [False, True, 0, 1, True],
    "title_genres": [["drama", "comedy", "drama"], ["family"], [], ["x"], [""]],
    # a title with factors and a mean artwork vector, one with factors only, unknown ones
    "title_id": ["t1", "t2", "t9", "t1", "t3"],
    # factors of the vocabulary's rank, none, another rank (none), negative zero
    "member_factors": [[0.5, -1.25, 2.0], [], [1.0, 2.0], [-0.0, 0.3, 1e-3], [3.0, 0.0, -2.5]],
    "art_prior_mean": [0.2, 0.1, 0.3, 0.05, 0.1],
    "art_prior_n": [100.0, 0.0, 3.0, 1.0, 0.0],
    "art_prior_mean_seg": [0.25, 0.1, 0.3, 0.07, 0.1],
    "title_prior_mean": [0.15, 0.1, 0.3, 0.05, 0.1],
}
EMB = F.Embeddings(3, titles={"t1": (0.1, -0.2, 0.3), "t2": (1e-8, 0.5, -0.5), "t3": (0.25, 0.25, 0.25)},
                   tags={"cast:a": (0.01, 0.02, -0.03), "tone:comedy": (0.3, 0.1, 0.7), "closeup": (-0.2, 0.05, 0.0),
                         "mood:dark": (0.1, 0.1, 0.1), "genre:drama": (0.4, -0.4, 0.2), "tone:": (0.0, 0.9, -0.1)},
                   title_artworks={"t1": (0.05, 0.15, -0.25), "t3": (0.2, 0.2, 0.2)},
                   tag_profiles={"tone:comedy": (0.0, 0.0, 1.0), "cast:a": (0.0, 0.5, 0.5), "rare": (0.0, 0.125, 0.0)})
VOCAB = F.Vocabulary(tags=("tone:comedy", "", "closeup"), genres=("drama", "comedy", "x"), embeddings=EMB)


@pytest.mark.parametrize("vocabulary", [None, VOCAB])
@pytest.mark.parametrize("arrow", [False, True])
def test_edge_rows_equal_feature_matrix(vocabulary, arrow):
    assert_same_bits(columnar(EDGES, vocabulary, arrow), F.feature_matrix(EDGES, vocabulary))


def test_edge_rows_exercise_every_match_feature():
    # a parity test that cannot fail on zeros: the edge rows reach every match and member column
    x = columnar(EDGES, VOCAB)
    col = {name: i for i, name in enumerate(F.FEATURE_NAMES)}
    for name in (*F.MATCH_FEATURES, *F.EMBEDDING_FEATURES, "member_genre_0", "member_genre_1", "member_genre_2"):
        assert np.any(x[:, col[name]] != 0), name
    # in tag order cast:a, tone:comedy (its n > 0 entry), closeup (its last), cast:a again
    assert x[0, col["resp_lift_sum"]] == np.float32(0.02 + 0.07 + -0.03 + 0.02)
    assert x[0, col["match_cast_sum"]] == np.float32(0.7 + 0.7 + 0.0)  # cast:a's last value, twice
    assert x[:, col[f"art_tag_bucket_{F.tag_bucket('rare') - F.N_TAG_SLOTS}"]][2] >= 1.0


def random_inputs(rng, n):
    tags = ["cast:a", "cast:b", "cast:c", "tone:comedy", "tone:drama", "closeup", "mood:dark", "text", "genre:drama", "x:"]
    genres = ["drama", "comedy", "family", "x"]

    def pick(pool, k):
        return [str(t) for t in rng.choice(pool, size=k, replace=True)]

    rows = {k: [] for k in F.INPUT_COLUMNS}
    for _ in range(n):
        known = bool(rng.random() < 0.8)
        a = int(rng.integers(0, 8)) if known else 0
        r = int(rng.integers(0, 8)) if known else 0
        rows["member_known"].append(int(known))
        rows["member_is_kids"].append(int(rng.random() < 0.3))
        rows["member_log_plays_28d"].append(float(rng.random() * 3) if known else 0.0)
        rows["member_days_since_last_play"].append(float(rng.random() * 500) if known else F.DAYS_SINCE_CAP)
        rows["affinity_tags"].append(pick([*tags, *(f"genre:{g}" for g in genres)], a))
        rows["affinity_values"].append(rng.random(a).tolist())
        rows["response_tags"].append(pick(tags, r))
        rows["response_values"].append((rng.random(r) - 0.5).tolist())
        rows["response_n"].append(rng.integers(0, 4, r).astype(float).tolist())
        rows["device"].append(str(rng.choice(F.DEVICES)))
        rows["local_hour"].append(int(rng.integers(24)))
        rows["day_of_week"].append(int(rng.integers(7)))
        rows["page_row"].append(int(rng.integers(5)))
        rows["position"].append(int(rng.integers(10)))
        rows["art_tags"].append(pick(tags, int(rng.integers(0, 7))))
        rows["art_is_default"].append(int(rng.random() < 0.2))
        rows["title_genres"].append(pick(genres, int(rng.integers(0, 4))))
        rows["title_id"].append(str(rng.choice(["t1", "t2", "t3", "t4"])))
        k = int(rng.choice([3, 3, 3, 0, 2]))
        rows["member_factors"].append((rng.normal(size=k) if known else np.zeros(0)).tolist())
        for k in ("art_prior_mean", "art_prior_n", "art_prior_mean_seg", "title_prior_mean"):
            rows[k].append(float(rng.random()))
    return rows


@pytest.mark.parametrize("seed", range(6))
def test_random_rows_equal_feature_matrix(seed):
    rng = np.random.default_rng(seed)
    inputs = random_inputs(rng, 300)
    vocabulary = replace(F.learn_vocabulary({"tone:comedy": 9, "closeup": 7, "text": 5, "mood:dark": 2}, {"drama": 4, "comedy": 3}),
                         embeddings=EMB)
    for vocab in (None, vocabulary):
        assert_same_bits(columnar(inputs, vocab, arrow=bool(seed % 2)), F.feature_matrix(inputs, vocab))


def test_shared_members_and_artworks_equal_per_row_inputs():
    # the job's shape: a few members and catalog rows, many candidate rows pointing at them
    rng = np.random.default_rng(11)
    members = random_inputs(rng, 7)
    catalog = random_inputs(rng, 5)
    row_member = rng.integers(0, 7, 60)
    row_artwork = rng.integers(0, 5, 60)
    row_title = rng.integers(0, 5, 60)
    priors = {k: rng.random(60) for k in ("art_prior_mean", "art_prior_n", "art_prior_mean_seg", "title_prior_mean")}
    blocks = F.CatalogBlocks(catalog["art_tags"], catalog["art_is_default"], catalog["title_genres"], VOCAB, catalog["title_id"])
    member_cols = {k: members[k] for k in (*F.UNKNOWN_MEMBER, "device", "local_hour", "day_of_week", "page_row", "position")}
    got = F.columnar_feature_matrix(blocks, member_cols, row_member, row_artwork, row_title, priors)
    flat = {k: [member_cols[k][i] for i in row_member] for k in member_cols}
    flat.update(art_tags=[catalog["art_tags"][a] for a in row_artwork],
                art_is_default=[catalog["art_is_default"][a] for a in row_artwork],
                title_genres=[catalog["title_genres"][t] for t in row_title],
                title_id=[catalog["title_id"][t] for t in row_title], **priors)
    assert_same_bits(got, F.feature_matrix(flat, VOCAB))


def test_no_rows_and_mismatched_lists():
    empty = {k: [] for k in F.INPUT_COLUMNS}
    assert columnar(empty).shape == (0, F.N_FEATURES)
    bad = {**EDGES, "affinity_values": [[0.6], [], [0.5, 0.25], [0.125, 0.3], [1.0]]}
    with pytest.raises(ValueError, match="differ in length"):
        columnar(bad)


def test_prior_inputs_by_group_equals_prior_inputs():
    nan = float("nan")
    args = ([2, 5, nan, 0, 3], [8, 5, nan, 0, 1], [10, 10, nan, 4, 2], [nan, 6, nan, 1, nan], [nan, 4, nan, 1, nan])
    want = F.prior_inputs(*args, ["b", "a", "b", "c", "a"])
    got = F.prior_inputs_by_group(*args, np.array([7, 3, 7, 0, 3]))
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
