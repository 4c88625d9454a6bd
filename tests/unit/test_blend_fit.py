"""The blend-weight fit the learning benchmark values (keyart.bench.learning_loop.fit_blend_n0)."""

from __future__ import annotations

import numpy as np
import pytest

from keyart.bench.learning_loop import BLEND_FIT_MAX_N0, BLEND_FIT_MIN_ROWS, fit_blend_n0


def outcomes(tau: float, seed: int = 0, artworks: int = 400, per_artwork: int = 300, rate: float = 0.05):
    """Shown impressions of artworks whose true rates sit around the model's level with sd ``tau``:
    (reward, the model's score, artwork keys)."""
    rng = np.random.default_rng(seed)
    keys = np.repeat(np.arange(artworks), per_artwork)
    member = rng.normal(0.0, 0.01, size=len(keys))  # what the model gets right: per-impression differences
    model = np.clip(rate + member, 0.005, 0.5)
    truth = np.clip(model + rng.normal(0.0, tau, size=artworks)[keys], 0.0, 1.0)
    return rng.binomial(1, truth).astype(float), model, keys


@pytest.mark.parametrize("tau", [0.01, 0.02, 0.04])
def test_blend_fit_finds_the_models_per_artwork_error(tau):
    # n0 = sigma^2 / tau^2: the model's error variance recovered from outcomes within sampling error
    reward, score, keys = outcomes(tau)
    fit = fit_blend_n0(reward, score, keys, fallback=50.0)
    assert fit["source"] == "fitted" and fit["artworks"] == 400 and fit["rows"] == 120_000
    assert fit["tau2"] == pytest.approx(tau**2, rel=0.25)
    assert fit["n0"] == pytest.approx(fit["sigma2"] / fit["tau2"])
    assert fit["sigma2"] == pytest.approx(float(np.mean(score * (1 - score))))


def test_blend_fit_trusts_a_model_whose_levels_are_right_and_distrusts_one_far_off():
    calibrated = fit_blend_n0(*outcomes(0.0, seed=1), fallback=50.0)
    assert calibrated["n0"] > 1_000 and calibrated["source"] == "fitted"  # within noise: the records barely correct it
    reward, _, keys = outcomes(0.0, seed=1)
    assert fit_blend_n0(reward, reward, keys, fallback=50.0)["n0"] == BLEND_FIT_MAX_N0  # every outcome foreseen
    far = fit_blend_n0(*outcomes(0.1, seed=2), fallback=50.0)
    assert far["n0"] < 10  # a few impressions of an artwork outweigh the model's level


def test_blend_fit_keeps_the_setting_without_enough_impressions():
    reward, score, keys = outcomes(0.02, artworks=10, per_artwork=50)
    fit = fit_blend_n0(reward, score, keys, fallback=50.0)
    assert (fit["source"], fit["n0"], fit["artworks"], fit["tau2"]) == ("setting", 50.0, 10, None)
    reward, score, keys = outcomes(0.02, artworks=100, per_artwork=3)
    assert len(score) < BLEND_FIT_MIN_ROWS and fit_blend_n0(reward, score, keys, 7.0)["n0"] == 7.0
    empty = fit_blend_n0(np.zeros(0), np.zeros(0), np.zeros(0), 5.0)
    assert (empty["source"], empty["n0"], empty["rows"]) == ("setting", 5.0, 0)
    with pytest.raises(ValueError, match="one value per impression"):
        fit_blend_n0(np.zeros(3), np.zeros(2), np.zeros(3), 50.0)


def test_blend_fit_leaves_out_impressions_without_an_outcome():
    reward, score, keys = outcomes(0.02, seed=3)
    fit = fit_blend_n0(reward, score, keys, fallback=50.0)
    reward2 = np.concatenate([reward, [np.nan] * 5])
    fit2 = fit_blend_n0(reward2, np.concatenate([score, [0.1] * 5]), np.concatenate([keys, [999] * 5]), fallback=50.0)
    assert fit2 == fit
