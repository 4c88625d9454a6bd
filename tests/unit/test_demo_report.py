"""The demo report's headline and plots (keyart.demo.report), on hand-made day results."""

from __future__ import annotations

import pytest

from keyart.demo.report import (
    DIFFERENCE,
    DayResult,
    _plots,
    _served_by,
    day_over_day,
    headline,
    truth_pairs,
)
from keyart.ope import ESTIMATORS


def _days() -> list[DayResult]:
    return [DayResult("2026-11-01", "random", 1000, 0.050, 0.050, 0.045, 0.080, None, 0.049),
            DayResult("2026-11-02", "2026-11-01.abcdef0123456789", 3000, 0.060, 0.050, 0.045, 0.080, 0.052, 0.061),
            DayResult("2026-11-03", "2026-11-01.abcdef0123456789+tables.2026-11-02", 1000, 0.064, 0.050, 0.045, 0.080,
                      0.053, 0.066)]


def test_headline_puts_served_beside_default_and_oracle_over_the_model_days():
    names = {"2026-11-01.abcdef0123456789": "v1", "2026-11-01.abcdef0123456789+tables.2026-11-02": "v3"}
    first, second, third = headline(_days(), names)
    served = (0.060 * 3000 + 0.064 * 1000) / 4000  # impression-weighted, day 0 (random) left out
    assert first.startswith(f"**keyart served a take rate of {served:.4f} against 0.0450 for the default artwork")
    assert "and 0.0800 for the oracle**" in first and "4000 impressions of 2 day(s)" in first
    assert f"{(served - 0.045) / 0.035:.0%} of the gap" in second and "served by v3" in second
    assert _served_by(_days()[2], {}) == "2026-11-01.a…"  # unknown to the registry: shortened
    assert third.startswith("Last day (2026-11-03): served 1.422 × the default artwork's take rate.")
    assert "take rate yes; ratio to the default yes (per day: 1.333 / 1.422)" in third


def test_day_over_day_names_each_day_that_fell_more_than_the_slack():
    days = [DayResult("2026-11-02", "v1", 100, 0.060, 0.03, 0.050, 0.08, None, 0.06),
            DayResult("2026-11-03", "v1", 100, 0.0595, 0.03, 0.050, 0.08, None, 0.06),  # -0.8%: within 1%
            DayResult("2026-11-04", "v2", 100, 0.0570, 0.03, 0.045, 0.08, None, 0.06),  # -4.2%, ratio up
            DayResult("2026-11-05", "v2", 100, 0.0560, 0.03, 0.046, 0.08, None, 0.06)]  # -1.8%, ratio -4.0%
    line = day_over_day(days)
    assert line.startswith("Last day (2026-11-05): served 1.217 × the default")
    assert "take rate no (2026-11-04 -4.2%, 2026-11-05 -1.8%)" in line
    assert "ratio to the default no (2026-11-05 -3.9%)" in line
    assert day_over_day(days[:1]).count("yes") == 2  # one day: nothing to compare


def test_plots_are_written_with_one_tick_per_run(tmp_path):
    ope = [{"run": run, "policy": policy, "estimator": est, "estimate": 0.05, "lo": 0.04, "hi": 0.06,
            "true": 0.051, "covered": True, "impressions": 100, "heldout_part": "all", "heldout_ds": run}
           for run in ("2026-11-01", "2026-11-02") for policy in ("logging", "candidate") for est in ESTIMATORS]
    names = _plots(tmp_path, _days(), ope, {}, {})
    assert names == ["take_rate.png", "ope.png"]
    for name in names:
        assert (tmp_path / name).stat().st_size > 10_000
    import matplotlib.pyplot as plt

    assert not plt.get_fignums()  # every figure closed


@pytest.mark.parametrize("n_days", [1, 12])
def test_take_rate_plot_scales_with_the_days(tmp_path, n_days):
    days = [DayResult(f"2026-11-{i + 1:02d}", "v", 10, 0.05, 0.05, 0.04, 0.08, None, 0.05) for i in range(n_days)]
    assert _plots(tmp_path, days, [], {}, {}) == ["take_rate.png"]


def test_truth_pairs_give_the_gates_paired_difference_when_a_champion_was_valued():
    est = {"snips": {"estimate": 0.001, "lo": -0.002, "hi": 0.004}}
    ev = {"policies": {"logging": {"snips": 1}, "candidate": {"snips": 2}, "champion": {"snips": 3}},
          "difference": {DIFFERENCE: est}}
    truths = {"logging": 0.05, "candidate": 0.06, "champion": 0.055, "heldout_ds": "2026-11-02"}
    pairs = truth_pairs(ev, truths, seen=0.5)
    assert [(w, e) for w, _, e in pairs] == [("logging", {"snips": 1}), ("candidate", {"snips": 2}),
                                             ("champion", {"snips": 3}), (DIFFERENCE, est)]
    assert [t for _, t, _ in pairs] == pytest.approx([0.025, 0.03, 0.0275, 0.0025])
    # no champion valued (or its bundle gone): no champion and no difference
    del truths["champion"]
    assert [w for w, _, _ in truth_pairs(ev, truths, seen=0.5)] == ["logging", "candidate"]
