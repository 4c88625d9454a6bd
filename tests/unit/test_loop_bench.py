"""Smoke tests of the online arms of ``keyart bench loop`` on a tiny world (no Spark)."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

from keyart.bench.loop import aggregate, goal
from keyart.bench.loop_arms import NonContextualArm, VWArm, lift_capture
from keyart.lake import shift_ds
from keyart.policy import PolicyConfig
from keyart.sim.world import World

pytest.importorskip("vowpalwabbit")


@pytest.fixture(scope="module")
def world() -> World:
    return World.build(seed=3, n_titles=12, n_members=300)


def history_affinity(world: World) -> dict[int, list[tuple[str, float]]]:
    """Share of history minutes per genre:/cast: tag (the snapshot's shape, without decay)."""
    h, cat = world.history, world.catalog
    minutes: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for m, t, x in zip(h["member_idx"].tolist(), h["title_idx"].tolist(), h["minutes"].tolist(), strict=True):
        for tag in [f"genre:{g}" for g in cat.title_genres[t]] + [f"cast:{c}" for c in cat.title_cast[t]]:
            minutes[m][tag] += x
    return {m: [(k, v / sum(d.values())) for k, v in d.items()] for m, d in minutes.items() if sum(d.values()) > 0}


def check_day(world: World, visits, day) -> float:
    art, prop = day.artwork_idx, day.propensity
    assert art.shape == visits.titles.shape == prop.shape
    assert ((art[..., None] == visits.candidates).any(-1) & (art >= 0)).all(), "a decision is not a candidate"
    assert ((prop > 0) & (prop <= 1)).all()
    assert set(np.unique(day.reward)) <= {0, 1}
    vals = world.candidate_values(visits)
    worst = np.where(visits.candidates >= 0, vals, np.inf).min(-1).mean()
    value = world.expected_value(visits, art)
    oracle = world.expected_value(visits, world.oracle_choice(visits))
    assert worst <= value <= oracle + 1e-12
    return value


@pytest.mark.parametrize("arm_name", ["noncontextual", "vw"])
def test_online_arm_decides_validly_between_worst_and_oracle(world, arm_name):
    if arm_name == "vw":
        arm = VWArm(world, history_affinity(world), seed=1)
    else:
        arm = NonContextualArm(world.catalog.n_artworks, PolicyConfig(thompson_samples=64), seed=1)
    lifts = []
    for k in range(3):
        visits = world.visits(shift_ds(world.config.start, k), 300, seed=5)
        value = check_day(world, visits, arm.run_day(world, visits))
        oracle = world.expected_value(visits, world.oracle_choice(visits))
        lifts.append(lift_capture(value, world.random_value(visits), oracle))
    if arm_name == "vw":
        assert arm.events == 3 * 300 * 10
        arm.close()
    # learning from its own outcomes: by the last day it beats uniform random
    assert lifts[-1] > 0, lifts


def test_aggregate_lift_and_regret():
    def seed(s, served):
        return {"seed": s, "days": [{"day": 0, "ds": "2026-11-01", "impressions": 100, "oracle": 0.2,
                                     "value": {"keyart": served, "random": 0.1, "noncontextual": 0.15, "vw": 0.12}}]}

    rows = aggregate([seed(1, 0.2), seed(2, 0.1)])
    k = rows[0]["arms"]["keyart"]
    assert k["lift_capture"] == {"mean": 0.5, "min": 0.0, "max": 1.0}
    assert k["cumulative_regret"]["max"] == pytest.approx(10.0)
    assert rows[0]["arms"]["random"]["lift_capture"]["mean"] == 0.0
    assert goal(rows)["met"] is None  # no day >= 3: not measured
