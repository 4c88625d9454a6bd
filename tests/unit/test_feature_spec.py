import math

import numpy as np
import pytest

from keyart import feature_spec as F


def _inputs(n=2):
    return {
        "member_known": [1, 0][:n],
        "member_is_kids": [0, 1][:n],
        "member_log_plays_28d": [math.log1p(10), 0.0][:n],
        "member_days_since_last_play": [2.0, float("nan")][:n],
        "affinity_tags": [["genre:comedy", "cast:robin_williams", "genre:drama"], []][:n],
        "affinity_values": [[0.6, 0.3, 0.2], []][:n],
        "response_tags": [["cast:robin_williams", "closeup", "mood:dark"], []][:n],
        "response_values": [[0.02, -0.01, 0.5], []][:n],
        "response_n": [[4.0, 3.0, 0.0], []][:n],
        "device": ["tv", "mobile"][:n],
        "local_hour": [18, 6][:n],
        "day_of_week": [5, 1][:n],
        "page_row": [0, 3][:n],
        "position": [1, 7][:n],
        "art_tags": [["cast:robin_williams", "tone:comedy", "closeup"], ["tone:family"]][:n],
        "art_is_default": [False, True][:n],
        "title_genres": [["drama", "comedy"], ["family"]][:n],
        "title_id": ["t1", "t2"][:n],
        "member_factors": [[1.0, 2.0], []][:n],
        "art_prior_mean": [0.2, 0.1][:n],
        "art_prior_n": [100.0, 0.0][:n],
        "art_prior_mean_seg": [0.25, 0.1][:n],
        "title_prior_mean": [0.15, 0.1][:n],
    }


EMB = F.Embeddings(2, titles={"t1": (0.5, 0.1)},
                   tags={"tone:comedy": (0.1, 0.2), "closeup": (0.0, -0.1), "cast:robin_williams": (0.3, 0.0)},
                   title_artworks={"t1": (0.05, 0.05)}, tag_profiles={"tone:comedy": (0.0, 0.5), "cast:robin_williams": (0.0, 0.25)})
VOCAB = F.Vocabulary(tags=("tone:comedy", "", "closeup"), genres=("drama", "comedy"), embeddings=EMB)


def test_matrix_shape_order_and_values():
    x = F.feature_matrix(_inputs(), VOCAB)
    assert x.dtype == np.float32 and x.shape == (2, F.N_FEATURES)
    col = {name: i for i, name in enumerate(F.FEATURE_NAMES)}
    assert x[0, col["match_cast_sum"]] == pytest.approx(0.3)
    assert x[0, col["match_tag_genre"]] == pytest.approx(0.6)
    assert x[0, col["match_title_genre"]] == pytest.approx((0.2 + 0.6) / 2)
    assert x[0, col["art_tag_0"]] == 1 and x[0, col["art_tag_1"]] == 0 and x[0, col["art_tag_2"]] == 1
    assert x[0, col["member_genre_0"]] == pytest.approx(0.2) and x[0, col["member_genre_1"]] == pytest.approx(0.6)
    assert x[0, col["member_genre_2"]] == 0
    # a response with no impressions does not count
    assert x[0, col["resp_lift_sum"]] == pytest.approx(0.01) and x[0, col["resp_lift_max"]] == pytest.approx(0.02)
    assert x[0, col["resp_log_n"]] == pytest.approx(math.log1p(7.0))
    family = col[f"art_tag_bucket_{F.tag_bucket('tone:family') - F.N_TAG_SLOTS}"]
    assert x[1, family] == 1 and x[1, col["resp_log_n"]] == 0 and x[1, col["resp_lift_max"]] == 0
    assert x[0, col["ctx_device_tv"]] == 1 and x[0, col["ctx_is_weekend"]] == 1
    assert x[0, col["art_prior_lift"]] == pytest.approx(0.05)
    assert x[1, col["member_days_since_last_play"]] == F.DAYS_SINCE_CAP
    assert x[1, col["match_cast_max"]] == 0 and x[1, col["art_is_default"]] == 1


def test_embedding_features_are_dot_products_with_the_members_factors():
    x = F.feature_matrix(_inputs(), VOCAB)
    col = {name: i for i, name in enumerate(F.FEATURE_NAMES)}
    art = np.array([0.3, 0.0]) + np.array([0.1, 0.2]) + np.array([0.0, -0.1])  # cast, tone, closeup in tag order
    u = np.array([1.0, 2.0])
    assert x[0, col["emb_member_title"]] == pytest.approx(0.5 + 0.2)
    assert x[0, col["emb_member_artwork"]] == pytest.approx(u @ art)
    assert x[0, col["emb_artwork_lift"]] == pytest.approx(u @ (art - 0.05))
    assert x[0, col["emb_artwork_genres"]] == pytest.approx(2.0 * (0.25 + 0.5))
    # no factors (unknown member), a title without factors, an artwork with no tag direction: 0
    assert (x[1, col["emb_member_title"]:] == 0).all()
    other = _inputs()
    other["member_factors"] = [[1.0, 2.0, 3.0], [1.0, 1.0]]  # another rank: no factors
    y = F.feature_matrix(other, VOCAB)
    assert y[0, col["emb_member_title"]] == 0 and y[0, col["emb_member_artwork"]] == 0
    assert y[1, col["emb_member_title"]] == 0 and y[1, col["emb_member_artwork"]] == 0  # t2, tone:family: none
    # a repeated tag counts once
    assert (EMB.artwork_vector(["closeup", "closeup"]) == EMB.artwork_vector(["closeup"])).all()
    assert (F.feature_matrix(_inputs(), F.Vocabulary())[:, col["emb_member_title"]:] == 0).all()


def test_embeddings_round_trip_and_bad_ones_are_refused():
    assert F.Embeddings.from_dict(EMB.to_dict()) == EMB
    assert F.Vocabulary.from_dict(VOCAB.to_dict()).embeddings == EMB
    assert F.Embeddings.from_dict(None) == F.Embeddings()
    with pytest.raises(ValueError, match="rank 2"):
        F.Embeddings.from_dict({"rank": 2, "tags": {"a": [1.0]}})
    with pytest.raises(ValueError, match="rank"):
        F.Embeddings.from_dict({"rank": -1})


def test_names_unique_and_spec_dict_matches():
    assert len(set(F.FEATURE_NAMES)) == F.N_FEATURES
    assert F.spec_dict()["features"] == list(F.FEATURE_NAMES)
    assert F.Vocabulary.from_dict(F.spec_dict(VOCAB)["vocabulary"]) == VOCAB
    assert F.Vocabulary.from_dict(F.spec_dict()["vocabulary"]) == F.Vocabulary() == F.Vocabulary.from_dict(None)


def test_unseen_tags_change_values_not_the_specification():
    """A catalog with other tags gets other columns filled, through the same arithmetic."""
    inputs = _inputs(1)
    inputs["art_tags"] = [["style:cartoon", "shot:wide", "typography", "cast:robin_williams"]]
    learned = F.learn_vocabulary({"style:cartoon": 40, "shot:wide": 12, "typography": 3}, {"comedy": 5})
    assert learned.tags == ("style:cartoon", "shot:wide")
    x = F.feature_matrix(inputs, learned)[0]
    col = {name: i for i, name in enumerate(F.FEATURE_NAMES)}
    assert x[col["art_tag_0"]] == 1 and x[col["art_tag_1"]] == 1 and x[col["art_n_cast"]] == 1
    assert x[col[f"art_tag_bucket_{F.tag_bucket('typography') - F.N_TAG_SLOTS}"]] == 1
    hashed = F.feature_matrix(inputs)[0]  # empty vocabulary: all three in buckets
    assert hashed[col["art_tag_0"]] == 0 and hashed[col["art_tag_bucket_0"]:col["art_tag_bucket_0"] + F.N_TAG_BUCKETS].sum() == 3


def test_learn_vocabulary_keeps_slots_and_ranks_newcomers():
    first = F.learn_vocabulary({"a": 10, "b": 20, "c": 10, "cast:x": 99, "rare": F.TAG_MIN_ARTWORKS - 1}, {"g1": 1, "g2": 2})
    assert first.tags == ("b", "a", "c") and first.genres == ("g2", "g1")
    nxt = F.learn_vocabulary({"a": 1, "d": 50, "e": 50}, {"g3": 9}, previous=first)
    assert nxt.tags == ("b", "a", "c", "d", "e") and nxt.genres == ("g2", "g1", "g3")
    many = F.learn_vocabulary({f"t{i:02d}": 100 - i for i in range(40)}, {})
    assert len(many.tags) == F.N_TAG_SLOTS and many.tags[0] == "t00"


@pytest.mark.parametrize("bad, match", [
    ({"tags": ["a", "a"]}, "twice"),
    ({"tags": ["cast:x"]}, "cast"),
    ({"tags": [f"t{i}" for i in range(F.N_TAG_SLOTS + 1)]}, "at most"),
    ({"tags": "abc"}, "lists"),
])
def test_bad_vocabulary_is_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        F.Vocabulary.from_dict(bad)


def test_response_lift_shrinks_towards_the_population():
    assert F.response_lift(0.0, 0.0, 0.3) == 0.0
    assert F.response_lift(5.0, 10.0, 0.1) == pytest.approx((5 - 1) / (10 + F.RESPONSE_PRIOR_N))
    big = F.response_lift(500.0, 1000.0, 0.1)
    assert big == pytest.approx(0.5 - 0.1, rel=0.02)


def test_missing_input_column_is_named():
    inputs = _inputs()
    del inputs["art_tags"]
    with pytest.raises(KeyError, match="art_tags"):
        F.feature_matrix(inputs)


def test_prior_inputs_defaults_and_title_mean():
    nan = float("nan")
    out = F.prior_inputs([2, nan, 6], [8, nan, 4], [10, 5, 3], [nan, 3, nan], [nan, 1, nan], ["t", "t", "u"])
    default_mean = F.DEFAULT_PRIOR[0] / sum(F.DEFAULT_PRIOR)
    np.testing.assert_allclose(out["art_prior_mean"], [0.2, default_mean, 0.6])
    np.testing.assert_allclose(out["art_prior_n"], [10, 0, 3])
    np.testing.assert_allclose(out["art_prior_mean_seg"], [0.2, 0.75, 0.6])
    np.testing.assert_allclose(out["title_prior_mean"], [(0.2 + default_mean) / 2] * 2 + [0.6])


def test_empty_page_gives_empty_matrix():
    empty = {k: [] for k in F.INPUT_COLUMNS}
    assert F.feature_matrix(empty).shape == (0, F.N_FEATURES)
