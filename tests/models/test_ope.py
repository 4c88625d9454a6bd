"""Estimators on hand-built logs with known answers (keyart.ope)."""

from __future__ import annotations

import numpy as np
import pytest

from keyart.ope import (
    IPS,
    SNIPS,
    Bootstrap,
    DoublyRobust,
    LoggedPages,
    Replay,
    effective_sample_size,
    evaluate_policies,
    make_estimators,
    weight_diagnostics,
)
from keyart.policy import draw

ARM_RATES = np.array([0.1, 0.3, 0.6])


def uniform_log(n: int, seed: int, k: int = 3, rates=ARM_RATES) -> LoggedPages:
    """n impressions, k candidates each, uniform logging, Bernoulli rewards per arm."""
    rng = np.random.default_rng(seed)
    shown = rng.integers(0, k, size=n)
    offsets = np.arange(n + 1) * k
    reward = (rng.random(n) < rates[shown]).astype(float)
    return LoggedPages(offsets, offsets[:-1] + shown, reward, np.full(n, 1.0 / k))


def deterministic_target(n: int, arm: int, k: int = 3) -> np.ndarray:
    t = np.zeros(n * k)
    t[np.arange(n) * k + arm] = 1.0
    return t


def small_pages() -> LoggedPages:
    return LoggedPages(np.array([0, 2, 5]), np.array([1, 2]), np.array([1.0, 0.0]), np.array([0.5, 0.2]))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"offsets": np.array([1, 2, 5])}, "starting at 0"),
    ({"offsets": np.array([0, 2, 2])}, "at least one candidate"),
    ({"logged_row": np.array([1, 1])}, "inside its impression"),
    ({"logged_row": np.array([1])}, "logged_row must have shape"),
    ({"reward": np.array([1.0, np.nan])}, "reward must be finite"),
    ({"propensity": np.array([0.5, 0.0])}, r"propensity must be in \(0, 1\]"),
    ({"propensity": np.array([0.5, 1.5])}, r"propensity must be in \(0, 1\]"),
    ({"groups": np.array(["a"])}, "groups must have shape"),
])
def test_logged_pages_reject_bad_input(kwargs, match):
    base = {"offsets": np.array([0, 2, 5]), "logged_row": np.array([1, 2]),
            "reward": np.array([1.0, 0.0]), "propensity": np.array([0.5, 0.2])}
    with pytest.raises(ValueError, match=match):
        LoggedPages(**{**base, **kwargs})


@pytest.mark.parametrize(("target", "match"), [
    (np.full(4, 0.25), r"target must have shape \(5,\)"),
    (np.array([0.5, 0.5, 0.5, 0.5, 0.5]), "sum to 1 per impression"),
    (np.array([1.5, -0.5, 0.2, 0.3, 0.5]), ">= 0"),
    (np.array([0.5, 0.5, np.nan, 0.5, 0.5]), "finite"),
])
def test_targets_are_validated(target, match):
    with pytest.raises(ValueError, match=match):
        IPS().estimate(small_pages(), target)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"n_boot": 5}, "n_boot must be >= 10"),
    ({"level": 1.0}, "level must be in"),
    ({"chunk": 0}, "chunk must be >= 1"),
])
def test_bootstrap_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Bootstrap(**kwargs)


def test_unknown_estimator_and_missing_q_hat():
    with pytest.raises(ValueError, match="unknown estimators"):
        make_estimators(["ips", "magic"])
    with pytest.raises(ValueError, match="dr needs q_hat"):
        DoublyRobust().estimate(small_pages(), np.array([0.5, 0.5, 0.2, 0.3, 0.5]))


def test_hand_computed_ips_and_snips():
    pages = small_pages()
    target = np.array([0.0, 1.0, 0.2, 0.3, 0.5])
    # logged rows 1 and 2: weights 1.0 / 0.5 = 2 and 0.2 / 0.2 = 1; rewards 1 and 0
    assert IPS().estimate(pages, target) == pytest.approx((2 * 1 + 1 * 0) / 2)
    assert SNIPS().estimate(pages, target) == pytest.approx(2 / 3)


def test_on_policy_ips_is_the_mean_reward():
    pages = uniform_log(5000, 0)
    iv = evaluate_policies(pages, {"uniform": np.full(pages.n_rows, 1 / 3)}, estimators=["ips", "snips"])
    mean = pages.reward.mean()
    assert iv["policies"]["uniform"]["ips"].estimate == pytest.approx(mean)
    assert iv["policies"]["logging"]["ips"].estimate == pytest.approx(mean)
    lift = iv["lift"]["uniform"]["ips"]
    assert lift.estimate == pytest.approx(0.0, abs=1e-12)
    assert lift.lo == pytest.approx(0.0, abs=1e-12) and lift.hi == pytest.approx(0.0, abs=1e-12)  # paired


@pytest.mark.parametrize("arm", [0, 2])
def test_under_uniform_logging_ips_and_replay_agree_in_expectation(arm):
    """Averaged over 40 logs both are unbiased for the arm's rate, and agree with each other."""
    n, ips, replay = 3000, [], []
    for seed in range(40):
        pages = uniform_log(n, seed)
        target = deterministic_target(n, arm)
        ips.append(IPS().estimate(pages, target))
        replay.append(Replay(seed=seed).estimate(pages, target))
    assert np.mean(ips) == pytest.approx(ARM_RATES[arm], abs=0.01)
    assert np.mean(replay) == pytest.approx(ARM_RATES[arm], abs=0.01)
    assert np.mean(ips) == pytest.approx(np.mean(replay), abs=0.01)


def test_replay_stays_unbiased_when_logging_is_not_uniform():
    """Logging favours arm 0 (0.8/0.1/0.1): the rejection coin keeps replay unbiased."""
    rng = np.random.default_rng(0)
    n, k = 200_000, 3
    mu = np.array([0.8, 0.1, 0.1])
    shown = rng.choice(k, size=n, p=mu)
    offsets = np.arange(n + 1) * k
    pages = LoggedPages(offsets, offsets[:-1] + shown, (rng.random(n) < ARM_RATES[shown]).astype(float), mu[shown])
    target = np.tile([0.2, 0.3, 0.5], n)
    truth = float(target[:3] @ ARM_RATES)
    for est in (Replay(seed=1), IPS(), SNIPS()):
        assert est.estimate(pages, target) == pytest.approx(truth, abs=0.01), est.name


def test_dr_with_a_perfect_reward_model_has_zero_variance():
    """Deterministic rewards and q_hat = truth: DR does not depend on what was logged."""
    n, k = 500, 3
    target = np.tile([0.2, 0.3, 0.5], n)
    q = np.tile(ARM_RATES, n)
    drs, ips = [], []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        shown = rng.integers(0, k, size=n)
        offsets = np.arange(n + 1) * k
        pages = LoggedPages(offsets, offsets[:-1] + shown, ARM_RATES[shown], np.full(n, 1 / k))
        drs.append(DoublyRobust().estimate(pages, target, q))
        ips.append(IPS().estimate(pages, target))
        if seed == 0:
            iv = evaluate_policies(pages, {"t": target}, q_hat=q, estimators=["dr"])["policies"]["t"]["dr"]
            assert iv.hi - iv.lo == pytest.approx(0.0, abs=1e-12)
    assert np.std(drs) == pytest.approx(0.0, abs=1e-12)
    assert np.mean(drs) == pytest.approx(float(target[:3] @ ARM_RATES))
    assert np.std(ips) > 0.005


def test_bootstrap_intervals_cover_at_about_the_nominal_rate():
    """95% intervals of IPS over 60 uniform logs cover the truth at least ~85% of the time."""
    arm, hits = 2, 0
    for seed in range(60):
        pages = uniform_log(1500, 100 + seed)
        iv = evaluate_policies(pages, {"t": deterministic_target(1500, arm)}, estimators=["ips", "snips"],
                               bootstrap=Bootstrap(n_boot=100, seed=seed))
        hits += iv["policies"]["t"]["ips"].covers(ARM_RATES[arm])
    assert hits / 60 >= 0.85


def test_cluster_bootstrap_uses_groups():
    pages = uniform_log(2000, 1)
    grouped = LoggedPages(pages.offsets, pages.logged_row, pages.reward, pages.propensity,
                          groups=np.arange(2000) // 50)
    t = deterministic_target(2000, 1)
    a = evaluate_policies(pages, {"t": t}, estimators=["ips"])["policies"]["t"]["ips"]
    b = evaluate_policies(grouped, {"t": t}, estimators=["ips"])["policies"]["t"]["ips"]
    assert a.estimate == b.estimate
    assert a.lo != b.lo


def test_logging_is_not_a_target():
    pages = uniform_log(100, 0)
    with pytest.raises(ValueError, match="valued on-policy"):
        evaluate_policies(pages, {"logging": np.full(300, 1 / 3)})


def test_paired_difference_is_narrower_than_either_interval_and_finds_a_small_gain():
    """Two policies that agree on 95% of impressions: one's lower bound does not clear the
    other's estimate, yet the paired difference (same bootstrap resamples) is a fraction as
    wide and excludes zero."""
    n = 6000
    pages = uniform_log(n, 5)
    a = deterministic_target(n, 2)  # always the best arm (0.6)
    b = 0.95 * deterministic_target(n, 2) + 0.05 * deterministic_target(n, 1)  # 5% on the 0.3 arm
    res = evaluate_policies(pages, {"a": a, "b": b}, estimators=["ips", "snips"],
                            bootstrap=Bootstrap(n_boot=200, seed=1), differences=[("a", "b")])
    for name in ("ips", "snips"):
        ia, ib = res["policies"]["a"][name], res["policies"]["b"][name]
        d = res["difference"]["a_minus_b"][name]
        assert d.estimate == pytest.approx(ia.estimate - ib.estimate)
        assert ia.lo < ib.estimate  # unpaired: a's lower bound does not clear b's estimate
        assert (d.hi - d.lo) < 0.35 * min(ia.hi - ia.lo, ib.hi - ib.lo)
        assert 0 < d.lo <= 0.05 * (0.6 - 0.3) <= d.hi


def test_difference_needs_both_targets():
    pages = uniform_log(100, 0)
    with pytest.raises(ValueError, match="no target named"):
        evaluate_policies(pages, {"a": np.full(300, 1 / 3)}, differences=[("a", "champion")])


def logged_day(n: int = 4000, k: int = 4, seed: int = 0, drift: float = 2.0):
    """Impressions drawn from a distribution that moves during the day (serving's online
    priors), logged as serving logs it: every candidate's probability to 6 significant
    digits, the shown one exactly. Also returns the distribution rebuilt from the frozen
    start-of-day state, as offline evaluation used to rebuild the logging policy."""
    rng = np.random.default_rng(seed)
    base = rng.normal(0, 1, size=(n, k))
    hour = np.linspace(0, 1, n)[:, None]
    served = np.exp(base + drift * hour * rng.normal(0, 1, size=(n, k)))
    served /= served.sum(axis=1, keepdims=True)
    frozen = np.exp(base) / np.exp(base).sum(axis=1, keepdims=True)
    offsets = np.arange(n + 1) * k
    flat = served.ravel()
    chosen, propensity = draw(flat, offsets, rng)
    logged = np.round(flat / 10.0 ** np.floor(np.log10(flat)), 5) * 10.0 ** np.floor(np.log10(flat))
    logged[chosen] = propensity
    reward = (rng.random(n) < 0.1 + 0.2 * (chosen - offsets[:-1] == 0)).astype(float)
    return LoggedPages(offsets, chosen, reward, propensity, logging=logged), frozen.ravel()


def test_the_logging_policy_valued_from_its_logged_probabilities_has_ess_n_and_its_mean_reward():
    pages, frozen = logged_day()
    n = pages.n_impressions
    sums = np.add.reduceat(pages.logging, pages.offsets[:-1])
    assert np.all(np.abs(sums - 1.0) <= 5e-6)  # the logged probabilities sum to 1 per impression
    served = pages.logging_target()
    assert np.array_equal(pages.weights(served), np.ones(n))
    assert effective_sample_size(pages.weights(served)) == n
    res = evaluate_policies(pages, {"served": served}, estimators=["ips", "snips"])
    for name in ("ips", "snips"):
        assert res["policies"]["served"][name].estimate == pytest.approx(pages.reward.mean(), rel=1e-12)
        assert res["policies"]["logging"][name].estimate == pytest.approx(pages.reward.mean(), rel=1e-12)
    diag = weight_diagnostics(pages, {"rebuilt": frozen})
    assert diag["logging"]["ess"] == pytest.approx(n) and diag["logging"]["ess_share"] == pytest.approx(1.0)
    # the same policy rebuilt from the start-of-day state is another policy on these logs
    assert diag["rebuilt"]["ess_share"] < 0.8


@pytest.mark.parametrize(("change", "match"), [
    (lambda q, row: q * 1.01, "sum to 1 per impression"),
    (lambda q, row: np.where(np.isin(np.arange(len(q)), row), q * (1 + 1e-9), q), "propensity exactly"),
    (lambda q, row: q[:-1], "logging must have shape"),
])
def test_logged_probabilities_must_describe_the_draw(change, match):
    pages, _ = logged_day(n=50)
    with pytest.raises(ValueError, match=match):
        LoggedPages(pages.offsets, pages.logged_row, pages.reward, pages.propensity,
                    logging=change(pages.logging, pages.logged_row))
