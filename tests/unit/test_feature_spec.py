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
        "device": ["tv", "mobile"][:n],
        "local_hour": [18, 6][:n],
        "day_of_week": [5, 1][:n],
        "page_row": [0, 3][:n],
        "position": [1, 7][:n],
        "art_tags": [["cast:robin_williams", "tone:comedy", "closeup"], ["tone:family"]][:n],
        "art_is_default": [False, True][:n],
        "title_genres": [["drama", "comedy"], ["family"]][:n],
        "art_prior_mean": [0.2, 0.1][:n],
        "art_prior_n": [100.0, 0.0][:n],
        "art_prior_mean_seg": [0.25, 0.1][:n],
        "title_prior_mean": [0.15, 0.1][:n],
    }


def test_matrix_shape_order_and_values():
    x = F.feature_matrix(_inputs())
    assert x.dtype == np.float32 and x.shape == (2, F.N_FEATURES)
    col = {name: i for i, name in enumerate(F.FEATURE_NAMES)}
    assert x[0, col["match_cast_sum"]] == pytest.approx(0.3)
    assert x[0, col["match_tone"]] == pytest.approx(0.6)
    assert x[0, col["match_title_genre"]] == pytest.approx((0.2 + 0.6) / 2)
    assert x[0, col["art_tone_comedy"]] == 1 and x[0, col["art_flag_closeup"]] == 1
    assert x[0, col["ctx_device_tv"]] == 1 and x[0, col["ctx_is_weekend"]] == 1
    assert x[0, col["art_prior_lift"]] == pytest.approx(0.05)
    assert x[1, col["member_days_since_last_play"]] == F.DAYS_SINCE_CAP
    assert x[1, col["match_cast_max"]] == 0 and x[1, col["art_is_default"]] == 1


def test_names_unique_and_spec_dict_matches():
    assert len(set(F.FEATURE_NAMES)) == F.N_FEATURES
    assert F.spec_dict()["features"] == list(F.FEATURE_NAMES)


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
