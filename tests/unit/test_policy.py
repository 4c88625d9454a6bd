"""Invariants of the exploration policies (keyart.policy)."""

from __future__ import annotations

from dataclasses import replace
from typing import get_args

import numpy as np
import pytest
from scipy import integrate, stats

from keyart.policy import (
    MAX_FLOOR,
    MAX_FLOOR_MASS,
    POLICIES,
    PolicyConfig,
    PolicyName,
    artwork_mean_scores,
    blend_scores,
    draw,
    gap_stderr,
    group_argmax,
    probabilities,
)

RNG_POLICIES = ("thompson", "beta_ts")


def page(seed: int = 0, titles: int = 40, kmin: int = 1, kmax: int = 8):
    """A random page: (scores [n], offsets [T+1], alpha, beta, n)."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(kmin, kmax + 1, size=titles)
    offsets = np.r_[0, np.cumsum(sizes)]
    n = int(offsets[-1])
    scores = rng.uniform(0.01, 0.4, n)
    alpha = rng.uniform(1, 40, n)
    return scores, offsets, alpha, alpha * rng.uniform(3, 12, n), rng.uniform(0, 500, n)


def probs_of(cfg: PolicyConfig, seed: int = 0, **kw):
    scores, offsets, a, b, n = page(seed, **kw)
    return probabilities(cfg, scores, offsets, a, b, n, rng=np.random.default_rng(seed)), offsets, scores, a, b, n


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"name": "ucb"}, "name\n.*'squarecb'"),
    ({"floor": -0.1}, "floor\n.*greater than or equal to 0"),
    ({"floor": MAX_FLOOR + 1e-9}, f"floor\n.*less than or equal to {MAX_FLOOR}"),
    ({"floor": 1.0}, "floor\n.*less than or equal to"),
    ({"gamma": 0.0}, "gamma\n.*greater than 0"),
    ({"gap_unit": "logit"}, "gap_unit\n.*'stderr'"),
    ({"epsilon": 1.5}, "epsilon\n.*less than or equal to 1"),
    ({"prior_blend_n0": -1}, "prior_blend_n0\n.*greater than or equal to 0"),
    ({"thompson_samples": 0}, "thompson_samples\n.*greater than or equal to 1"),
    ({"temperature": 1.0}, "temperature\n.*Unexpected keyword argument"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PolicyConfig(**kwargs)


def test_replace_validates_too():
    with pytest.raises(ValueError, match="floor"):
        replace(PolicyConfig(), floor=0.5)


def test_names_are_the_literal_type():
    assert POLICIES == get_args(PolicyName)
    assert PolicyConfig().name in POLICIES


def test_largest_floor_is_accepted_and_the_mass_cap_applies_per_page():
    p = probabilities(PolicyConfig(name="greedy", floor=MAX_FLOOR), *page(kmin=8, kmax=8))
    assert np.all((p == 0) | (p == 1))  # greedy ignores the floor
    p = probabilities(PolicyConfig(name="egreedy", epsilon=0.0, floor=MAX_FLOOR), *page(kmin=2, kmax=2))
    assert p.min() == pytest.approx(MAX_FLOOR)  # K * floor = 0.25: below the cap, kept


@pytest.mark.parametrize(("offsets", "match"), [
    ([0, 2, 2, 5], "at least one candidate"),
    ([1, 5], "offsets must start at 0"),
    ([0, 3], "offsets must start at 0 and end at 5"),
    ([0], "offsets must start at 0"),
])
def test_bad_offsets_are_refused(offsets, match):
    z = np.full(5, 0.1)
    with pytest.raises(ValueError, match=match):
        probabilities(PolicyConfig(), z, np.array(offsets), z + 1, z + 9, z)


def test_sampled_policies_need_an_rng():
    scores, offsets, a, b, n = page()
    with pytest.raises(ValueError, match="pass rng"):
        probabilities(PolicyConfig(name="thompson"), scores, offsets, a, b, n)


@pytest.mark.parametrize("name", POLICIES)
@pytest.mark.parametrize("floor", [0.0, 0.02, 0.1])
def test_probabilities_sum_to_one_and_respect_the_floor(name, floor):
    p, offsets, *_ = probs_of(PolicyConfig(name=name, floor=floor))
    sums = np.add.reduceat(p, offsets[:-1])
    np.testing.assert_allclose(sums, 1.0, atol=1e-12)
    assert np.all(p >= 0)
    if name != "greedy":
        k = np.repeat(np.diff(offsets), np.diff(offsets))
        assert np.all(p >= np.minimum(floor, MAX_FLOOR_MASS / k) - 1e-12)


def test_floor_mass_is_capped_at_one_half():
    p = probabilities(PolicyConfig(name="egreedy", epsilon=0.0, floor=0.1), *page(kmin=8, kmax=8))
    # K * floor = 0.8 > 0.5: the floor shrinks to 0.5 / K = 0.0625
    assert p.min() == pytest.approx(0.0625)
    assert p.max() == pytest.approx(0.0625 + 0.5)


@pytest.mark.parametrize("seed", range(5))
def test_greedy_always_takes_the_argmax(seed):
    p, offsets, scores, a, b, n = probs_of(PolicyConfig(name="greedy", prior_blend="mix"), seed)
    blended = blend_scores(scores, a, b, n, PolicyConfig().prior_blend_n0)
    best = group_argmax(blended, offsets)
    assert set(np.flatnonzero(p == 1.0)) == set(best)
    assert p.sum() == len(offsets) - 1
    chosen, prop = draw(p, offsets, np.random.default_rng(seed))
    np.testing.assert_array_equal(chosen, best)
    np.testing.assert_array_equal(prop, 1.0)


def test_greedy_breaks_ties_on_the_first_candidate():
    offsets = np.array([0, 3])
    p = probabilities(PolicyConfig(name="greedy", prior_blend_n0=0), np.array([0.2, 0.3, 0.3]),
                      offsets, np.ones(3), np.ones(3), np.zeros(3))
    np.testing.assert_array_equal(p, [0, 1, 0])


def test_egreedy_without_epsilon_or_floor_is_greedy():
    cfg = PolicyConfig(name="egreedy", epsilon=0.0, floor=0.0)
    p, *_ = probs_of(cfg)
    g, *_ = probs_of(replace(cfg, name="greedy"))
    np.testing.assert_array_equal(p, g)


def test_squarecb_is_inverse_gap_weighting():
    cfg = PolicyConfig(name="squarecb", gamma=100.0, gap_unit="score", floor=0.0, prior_blend_n0=0.0)
    s = np.array([0.10, 0.20, 0.15, 0.20])
    p = probabilities(cfg, s, np.array([0, 4]), np.ones(4), np.ones(4), np.zeros(4))
    expect = np.array([1 / (4 + 100 * 0.10), 0.0, 1 / (4 + 100 * 0.05), 1 / 4])
    expect[1] = 1 - expect.sum()
    np.testing.assert_allclose(p, expect)
    assert p.argmax() == 1  # the first of the tied best


def test_squarecb_gap_in_standard_errors_is_inverse_gap_weighting_in_z():
    """gap_unit stderr: p_a = 1 / (K + gamma * z_a), z_a = gap / sqrt(v_best/m_best + v_a/m_a)."""
    cfg = PolicyConfig(name="squarecb", gamma=30.0, floor=0.0, prior_blend_n0=0.0)
    s = np.array([0.05, 0.06, 0.04])
    alpha, beta = np.array([20.0, 300.0, 5.0]), np.array([380.0, 4700.0, 95.0])  # m = 400, 5000, 100
    p = probabilities(cfg, s, np.array([0, 3]), alpha, beta, alpha + beta)
    v, m = s * (1 - s), alpha + beta
    z = (0.06 - s) / np.sqrt(v[1] / m[1] + v / m)
    expect = 1 / (3 + 30 * z)
    expect[1] = 1 - expect[0] - expect[2]
    np.testing.assert_allclose(p, expect)
    np.testing.assert_allclose(gap_stderr(s, alpha, beta, np.array([1]), np.zeros(3, int)), np.sqrt(v[1] / m[1] + v / m))


def test_squarecb_explores_new_artworks_and_barely_the_well_measured():
    """Same model gap to the best (0.01): the exploration an artwork gets falls with its data."""
    cfg = PolicyConfig(name="squarecb", floor=0.0, prior_blend_n0=0.0)
    s = np.array([0.06, 0.05, 0.05, 0.05])
    m = np.array([20000.0, 20000.0, 500.0, 20.0])  # best, well-measured, a few days' data, new (EB prior only)
    p = probabilities(cfg, s, np.array([0, 4]), 0.05 * m, 0.95 * m, m)
    known, some, new = p[1], p[2], p[3]
    assert new > some > known
    assert new > 10 * known and known < 0.01  # a new artwork is explored, a well-measured one barely
    assert p.sum() == pytest.approx(1.0)
    # the fixed-rate rule spends the same on all three
    flat = probabilities(replace(cfg, gap_unit="score", gamma=3000.0), s, np.array([0, 4]), 0.05 * m, 0.95 * m, m)
    assert flat[1] == pytest.approx(flat[2]) == pytest.approx(flat[3])


@pytest.mark.parametrize("m", [10.0, 100.0, 1000.0, 10000.0, 100000.0])
def test_squarecb_exploration_of_an_arm_falls_as_its_data_grows(m):
    cfg = PolicyConfig(name="squarecb", floor=0.0, prior_blend_n0=0.0)
    s, off = np.array([0.06, 0.05]), np.array([0, 2])

    def p_of(mm: float) -> float:
        mass = np.array([1e5, mm])
        return probabilities(cfg, s, off, 0.05 * mass, 0.95 * mass, mass)[1]

    assert p_of(m) > p_of(4 * m)
    assert 0 < p_of(4 * m) < 0.5


@pytest.mark.parametrize("name", ["squarecb", "egreedy", "random", "thompson", "beta_ts"])
def test_100k_seeded_draws_match_the_reported_propensities(name):
    """Chi-square goodness of fit of 100k draws per title against the probabilities."""
    scores, offsets, a, b, n = page(3, titles=4, kmin=3, kmax=6)
    cfg = PolicyConfig(name=name, floor=0.02)
    p = probabilities(cfg, scores, offsets, a, b, n, rng=np.random.default_rng(1))
    reps = 100_000
    tiled = np.tile(p, reps)
    tiled_offsets = np.r_[0, np.cumsum(np.tile(np.diff(offsets), reps))]
    chosen, prop = draw(tiled, tiled_offsets, np.random.default_rng(2))
    np.testing.assert_allclose(prop, tiled[chosen])
    local = chosen - tiled_offsets[:-1]
    for t in range(len(offsets) - 1):
        k = offsets[t + 1] - offsets[t]
        counts = np.bincount(local[t::len(offsets) - 1], minlength=k)
        expected = p[offsets[t]:offsets[t + 1]] * reps
        assert stats.chisquare(counts, expected).pvalue > 1e-4, (t, counts, expected)


def _exact_two_arm(a1, b1, a2, b2) -> float:
    f = lambda x: stats.beta.pdf(x, a1, b1) * stats.beta.cdf(x, a2, b2)  # noqa: E731
    return integrate.quad(f, 0, 1, limit=200)[0]


@pytest.mark.parametrize(("a1", "b1", "a2", "b2"), [(2, 8, 3, 7), (20, 80, 25, 75), (1, 1, 1, 1)])
def test_thompson_monte_carlo_error_is_within_its_stated_bound(a1, b1, a2, b2):
    """P(argmax) is estimated with S draws: error ~ sqrt(p(1-p)/S) <= 1/(2 sqrt(S))."""
    cfg = PolicyConfig(name="beta_ts", floor=0.0, thompson_samples=1024)
    p = probabilities(cfg, np.zeros(2), np.array([0, 2]), np.array([a1, a2], float),
                      np.array([b1, b2], float), np.zeros(2), rng=np.random.default_rng(0))
    assert abs(p[0] - _exact_two_arm(a1, b1, a2, b2)) < 4 / (2 * np.sqrt(1024))


def test_thompson_chunking_keeps_whole_titles():
    from keyart.policy import _thompson_argmax_probs

    scores, offsets, a, b, n = page(5, titles=300)
    p = _thompson_argmax_probs(a, b, offsets, 64, np.random.default_rng(0), max_draws=64 * 7)
    np.testing.assert_allclose(np.add.reduceat(p, offsets[:-1]), 1.0)


def test_thompson_repeated_titles_share_one_estimate():
    """A day of logs repeats each title's candidates and priors: one Monte Carlo per distinct title."""
    from keyart.policy import _thompson_argmax_probs, _unique_pages

    _, offsets, a, b, _ = page(6, titles=5)
    reps = 200
    order = np.random.default_rng(1).permutation(np.repeat(np.arange(5), reps))
    sizes = np.diff(offsets)[order]
    rows = np.concatenate([np.arange(offsets[t], offsets[t + 1]) for t in order])
    big_off = np.r_[0, np.cumsum(sizes)]
    first, inverse = _unique_pages(a[rows], b[rows], big_off)
    assert len(first) == 5 and np.array_equal(order[first][inverse], order)
    p = _thompson_argmax_probs(a[rows], b[rows], big_off, 4096, np.random.default_rng(0))
    exact_once = _thompson_argmax_probs(a, b, offsets, 4096, np.random.default_rng(0))
    for t in range(5):
        pages = np.flatnonzero(order == t)
        got = np.stack([p[big_off[i]:big_off[i + 1]] for i in pages])
        assert (got == got[0]).all()  # every repetition identical
        np.testing.assert_allclose(got[0], exact_once[offsets[t]:offsets[t + 1]], atol=4 / (2 * np.sqrt(4096)))


def test_blend_falls_back_on_priors_where_the_model_knows_little():
    model, alpha, beta = np.array([0.9]), np.array([1.0]), np.array([9.0])
    assert blend_scores(model, alpha, beta, np.array([0.0]), 50.0)[0] == pytest.approx(0.1)
    assert blend_scores(model, alpha, beta, np.array([1e9]), 50.0)[0] == pytest.approx(0.9, abs=1e-6)
    assert blend_scores(model, alpha, beta, np.array([50.0]), 50.0)[0] == pytest.approx(0.5)


def test_real_time_prior_updates_move_the_choice():
    """A new artwork (n small) the model rates low wins once its prior collects plays: under
    either blend (the new artwork has no model mean; the known one's equals its record)."""
    offsets, scores = np.array([0, 2]), np.array([0.20, 0.05])
    alpha, beta, n = np.array([20.0, 1.0]), np.array([80.0, 9.0]), np.array([1000.0, 0.0])
    # mix: 10 impressions, 8 quality plays arrive for the new artwork during the day; residual (the
    # record counts against n0 = 50 pseudo-impressions of the model's level): 40 and 30
    for cfg, mean, (plays, shown) in ((PolicyConfig(name="greedy", prior_blend="mix"), None, (8, 10)),
                                      (PolicyConfig(name="greedy", prior_blend="residual"), np.array([0.20, np.nan]), (30, 40))):
        assert probabilities(cfg, scores, offsets, alpha, beta, n, model_mean=mean)[0] == 1.0
        alpha2, beta2, n2 = alpha + [0, plays], beta + [0, shown - plays], n + [0, shown]
        assert probabilities(cfg, scores, offsets, alpha2, beta2, n2, model_mean=mean)[1] == 1.0
        # a quarter of the plays: the new artwork's record is not yet enough
        assert probabilities(cfg, scores, offsets, alpha + [0, plays // 4], beta + [0, shown - plays // 4], n2,
                             model_mean=mean)[0] == 1.0


# --- the residual blend ------------------------------------------------------------------

def test_residual_blend_keeps_a_calibrated_models_scores():
    """Where the model's mean on the artwork equals the artwork's observed rate, the score is the model's."""
    model = np.array([0.02, 0.09, 0.05])
    alpha, beta = np.array([5.0, 5.0, 5.0]), np.array([95.0, 95.0, 95.0])  # prior mean 0.05
    got = blend_scores(model, alpha, beta, np.array([1e4, 1e4, 1e4]), 50.0, model_mean=np.full(3, 0.05))
    np.testing.assert_allclose(got, model)


def test_residual_blend_corrects_the_models_level_by_the_artworks_data():
    """A model that rates two artworks alike (it learned nothing of them) against their records:
    mix at large n follows the model and cannot tell them apart; residual follows the records,
    as a non-contextual bandit would, and keeps the model's per-member difference."""
    # two members (rows 0-1, 2-3) x artworks A, B: the model mildly prefers A for both
    model = np.array([0.052, 0.050, 0.056, 0.054])
    mean = np.array([0.054, 0.052, 0.054, 0.052])  # its mean score per artwork
    rate_a, rate_b, n = 0.03, 0.08, np.full(4, 5000.0)
    a = np.array([rate_a, rate_b, rate_a, rate_b]) * n
    b = n - a
    off = np.array([0, 2, 4])
    mix = probabilities(PolicyConfig(name="greedy", prior_blend="mix"), model, off, a, b, n)
    res = probabilities(PolicyConfig(name="greedy", prior_blend="residual"), model, off, a, b, n, model_mean=mean)
    assert mix.tolist() == [1.0, 0.0, 1.0, 0.0]  # mix: the model's preference, whatever the records say
    assert res.tolist() == [0.0, 1.0, 0.0, 1.0]  # residual: artwork B's record wins for both members
    s = blend_scores(model, a, b, n, 50.0, model_mean=mean)
    w = 5000.0 / 5050.0
    np.testing.assert_allclose(s, model + w * (np.array([rate_a, rate_b, rate_a, rate_b]) - mean))
    # the member-level difference the model sees survives: the same artwork scores apart by the model's gap
    assert s[2] - s[0] == pytest.approx(model[2] - model[0])


def test_residual_blend_leaves_the_model_alone_where_the_artwork_has_no_data():
    model, alpha, beta = np.array([0.07, 0.02]), np.array([1.0, 1.0]), np.array([9.0, 9.0])
    # n = 0: the record has no weight, the model's per-member score stands (mix would give the prior mean 0.1)
    np.testing.assert_allclose(blend_scores(model, alpha, beta, np.zeros(2), 50.0, model_mean=np.array([0.03, 0.03])), model)
    # unknown model mean and no data yet: the model's score
    np.testing.assert_allclose(blend_scores(model, alpha, beta, np.zeros(2), 50.0, model_mean=np.full(2, np.nan)), model)


def test_residual_blend_without_a_model_mean_takes_the_rows_score_as_the_level():
    """An artwork the model has no mean for (launched after the bundle's day): the row's own score is
    the model's level, so its record, serving's real-time updates included, moves its score as its
    data grows: (1 - w) * model + w * prior mean."""
    model, alpha, beta, n = np.array([0.07, 0.02, 0.05]), np.array([1.0, 90.0, 5.0]), np.array([9.0, 10.0, 95.0]), \
        np.array([30.0, 1e6, 70.0])
    mean = np.array([np.nan, np.nan, 0.04])
    w = n / (n + 50.0)
    got = blend_scores(model, alpha, beta, n, 50.0, model_mean=mean)
    np.testing.assert_allclose(got[:2], ((1 - w) * model + w * alpha / (alpha + beta))[:2])
    assert got[1] == pytest.approx(0.9, abs=1e-4)  # a huge record wins over the model's 0.02
    np.testing.assert_allclose(got[2], 0.05 + w[2] * (0.05 - 0.04))  # a known mean: the residual rule
    # residual without any means at all: every row's own score is its level
    np.testing.assert_allclose(blend_scores(model, alpha, beta, n, 50.0, model_mean=np.full(3, np.nan)),
                               (1 - w) * model + w * alpha / (alpha + beta))
    cfg = PolicyConfig(name="greedy", prior_blend="residual")
    assert probabilities(cfg, model, np.array([0, 3]), alpha, beta, n).tolist() == [0.0, 1.0, 0.0]


@pytest.mark.parametrize("rule", ["mix", "residual"])
def test_no_blend_weight_is_the_model_alone_under_either_rule(rule):
    model, alpha, beta, n = np.array([0.07, 0.02]), np.array([1.0, 90.0]), np.array([9.0, 10.0]), np.full(2, 1e6)
    mean = np.array([0.03, 0.5]) if rule == "residual" else None
    np.testing.assert_array_equal(blend_scores(model, alpha, beta, n, 0.0, model_mean=mean), model)
    cfg = PolicyConfig(name="greedy", prior_blend=rule, prior_blend_n0=0.0)
    assert probabilities(cfg, model, np.array([0, 2]), alpha, beta, n, model_mean=mean).tolist() == [1.0, 0.0]


def test_residual_blend_scores_stay_probabilities():
    # scores stay probabilities
    big = blend_scores(np.array([0.99]), np.array([99.0]), np.array([1.0]), np.array([1e6]), 50.0, model_mean=np.array([0.01]))
    assert big[0] == 1.0


def test_mix_ignores_model_means():
    model, alpha, beta, n = np.array([0.2, 0.3]), np.array([1.0, 5.0]), np.array([9.0, 5.0]), np.array([30.0, 70.0])
    cfg = PolicyConfig(name="squarecb", prior_blend="mix")
    np.testing.assert_array_equal(probabilities(cfg, model, np.array([0, 2]), alpha, beta, n),
                                  probabilities(cfg, model, np.array([0, 2]), alpha, beta, n, model_mean=np.array([0.9, 0.0])))


def test_artwork_mean_scores_is_each_rows_artworks_mean():
    scores = np.array([0.1, 0.3, 0.2, 0.6, 0.5])
    keys = np.array(["a", "b", "a", "b", "c"], dtype=object)
    np.testing.assert_allclose(artwork_mean_scores(scores, keys), [0.15, 0.45, 0.15, 0.45, 0.5])
    assert artwork_mean_scores(np.zeros(0), np.zeros(0)).shape == (0,)
