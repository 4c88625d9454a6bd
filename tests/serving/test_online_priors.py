"""Online Beta priors (keyart.serving.rewards.OnlinePriors): impressions count, not only rewards."""

from __future__ import annotations

import numpy as np
import pytest

from keyart.serving.rewards import OnlinePriors
from keyart.serving.tables import ArtworkTable

DAY, PRIORS_DS = "2026-11-02", "2026-11-01"
ADULT = "profile=adult"


@pytest.fixture
def priors() -> OnlinePriors:
    arts = [{"artwork_id": f"t1-a{j}", "title_id": "t1", "tags": ["tone:drama"], "is_default": j == 0} for j in range(2)]
    rows = [{"artwork_id": a["artwork_id"], "segment": "all", "alpha": 5.0, "beta": 95.0, "n_impressions": 100.0}
            for a in arts]
    p = OnlinePriors()
    p.bind(ArtworkTable.build(arts, rows), PRIORS_DS)
    return p


def mean(p: OnlinePriors, i: int) -> float:
    return float(p.alpha[i] / (p.alpha[i] + p.beta[i]))


def test_impressions_without_rewards_lower_the_mean(priors):
    """Showing an artwork 200 times with 2 quality plays must pull its mean toward 1%,
    not raise it: counting only the rewards would make whatever is shown most look best."""
    priors.record_impressions(DAY, ["t1-a0"] * 200, ADULT)
    for _ in range(2):
        priors.record(DAY, "t1-a0", ADULT, 1)
    assert (priors.alpha[0], priors.beta[0], priors.n[0]) == (7.0, 293.0, 300.0)
    assert mean(priors, 0) == pytest.approx(7 / 300)
    assert mean(priors, 0) < 0.05 == pytest.approx(mean(priors, 1))  # the unshown artwork keeps its prior
    assert priors.delta("t1-a0", "all") == (2.0, 198.0, 200.0)
    assert priors.delta("t1-a0", ADULT) == (2.0, 198.0, 200.0)


def test_reward_converts_its_counted_impression_and_zero_reward_changes_nothing(priors):
    priors.record_impressions(DAY, ["t1-a1"], ADULT)
    assert priors.delta("t1-a1", "all") == (0.0, 1.0, 1.0)
    priors.record(DAY, "t1-a1", ADULT, 0)
    assert priors.delta("t1-a1", "all") == (0.0, 1.0, 1.0)
    priors.record(DAY, "t1-a1", ADULT, 1)
    assert priors.delta("t1-a1", "all") == (1.0, 0.0, 1.0)
    assert (priors.alpha[1], priors.beta[1], priors.n[1]) == (6.0, 95.0, 101.0)


def test_reward_for_an_impression_this_process_did_not_count(priors):
    """Decided before a restart or by another worker: the reward counts its own impression."""
    priors.record(DAY, "t1-a0", ADULT, 1)
    assert priors.delta("t1-a0", "all") == (1.0, 0.0, 1.0)
    assert np.all(priors.beta >= 95.0)


def test_days_the_bundle_already_holds_do_not_apply(priors):
    priors.record_impressions(PRIORS_DS, ["t1-a0"] * 10, ADULT)
    assert (priors.alpha[0], priors.beta[0], priors.n[0]) == (5.0, 95.0, 100.0)
    assert priors.delta("t1-a0", "all") == (0.0, 0.0, 0.0)


def test_old_days_are_pruned_relative_to_the_newest_day_not_the_wall_clock(priors):
    """Simulated or replayed traffic runs on a client clock far from today."""
    for day in ("2026-11-02", "2026-11-03", "2026-11-04", "2026-11-05", "2026-11-06"):
        priors.record_impressions(day, ["t1-a0"], ADULT)
    assert sorted(priors._deltas) == ["2026-11-03", "2026-11-04", "2026-11-05", "2026-11-06"]
    assert priors.n[0] == 105.0  # pruning forgets deltas, not what the bound arrays already hold
