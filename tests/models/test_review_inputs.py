"""The reviewer's plot inputs evaluation writes (keyart.models.evaluate.review_inputs) and the
challenger-vs-champion view the model card and plots build from them (keyart.models.report)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from keyart.models import report
from keyart.models.data import pages_from_frame
from keyart.models.evaluate import artwork_share, calibration, distance_to_logging, per_title_lift
from keyart.ope import IPS, SNIPS, DoublyRobust

K = 3
TITLES = ("t0", "t1", "t2", "t3")


def uniform_day(n: int = 4000, seed: int = 0):
    """n uniformly logged impressions over four titles; the second artwork of t0 plays best.
    Returns (pages, rows, true P(quality play) per candidate row)."""
    rng = np.random.default_rng(seed)
    title = rng.choice(TITLES, size=n, p=[0.55, 0.25, 0.19, 0.01])
    shown = rng.integers(0, K, n)
    cand = np.tile(np.arange(K), n)
    p = 0.05 + 0.10 * ((np.repeat(title, K) == "t0") & (cand == 1)) + 0.02 * cand
    reward = (rng.random(n) < p.reshape(n, K)[np.arange(n), shown]).astype(float)
    frame = pd.DataFrame({
        "event_id": np.repeat([f"e{i:06d}" for i in range(n)], K),
        "member_id": np.repeat([f"m{i % 211}" for i in range(n)], K),
        "title_id": np.repeat(title, K), "artwork_id": [f"{t}-a{c}" for t, c in zip(np.repeat(title, K), cand, strict=True)],
        "is_logged": cand == np.repeat(shown, K), "propensity": 1.0 / K, "reward": np.repeat(reward, K),
    })
    pages, rows = pages_from_frame(frame)
    order = rows.index.to_numpy()  # pages_from_frame keeps the (event, artwork) order of the frame
    return pages, rows, p[order]


def test_calibration_bins_cover_every_shown_artwork_and_a_true_model_is_calibrated():
    pages, _, p = uniform_day()
    cal = calibration(pages, p)
    assert sum(cal["count"]) == pages.n_impressions
    assert len(cal["predicted"]) == len(cal["observed"]) == len(cal["count"]) >= 2
    assert np.all(np.diff(cal["predicted"]) > 0)  # bins ordered by prediction
    assert cal["ece"] < 0.02  # the true probabilities are calibrated up to sampling noise
    biased = calibration(pages, p + 0.1)
    assert biased["ece"] == pytest.approx(0.1, abs=0.02)
    flat = calibration(pages, np.full(pages.n_rows, 0.07))  # a model that learnt nothing: one bin
    assert flat["count"] == [pages.n_impressions] and flat["predicted"] == [pytest.approx(0.07)]


def test_per_title_lift_is_the_paired_snips_difference_per_title():
    pages, rows, p = uniform_day()
    best = np.zeros(pages.n_rows)
    for i in range(pages.n_impressions):  # greedy on the truth
        lo, hi = pages.offsets[i], pages.offsets[i + 1]
        best[lo + int(np.argmax(p[lo:hi]))] = 1.0
    out = per_title_lift(pages, rows, best, n_boot=100, seed=1)
    titles = rows["title_id"].to_numpy()[pages.logged_row]
    assert set(out) == {"t0", "t1", "t2"}  # t3 has fewer than 50 impressions
    w = best[pages.logged_row] * K
    for t, cell in out.items():
        at = titles == t
        direct = (w[at] * pages.reward[at]).sum() / w[at].sum() - pages.reward[at].mean()
        assert cell["estimate"] == pytest.approx(direct, abs=1e-12)
        assert cell["impressions"] == int(at.sum())
        assert cell["lo"] < cell["estimate"] < cell["hi"]
    assert out["t0"]["lo"] > 0  # the best artwork of t0 is clearly better than uniform


def test_artwork_share_sums_to_one_per_policy_and_logging_counts_what_was_shown():
    pages, rows, _ = uniform_day()
    uniform = np.full(pages.n_rows, 1.0 / K)
    shares = artwork_share(pages, rows, {"candidate": uniform})
    for policy in ("logging", "candidate"):
        assert sum(shares[policy].values()) == pytest.approx(1.0, abs=1e-4)
    shown = rows["artwork_id"].to_numpy()[pages.logged_row]
    assert shares["logging"]["t0-a1"] == pytest.approx(np.mean(shown == "t0-a1"), abs=1e-6)
    t0 = np.mean(rows["title_id"].to_numpy()[pages.logged_row] == "t0")
    assert shares["candidate"]["t0-a1"] == pytest.approx(t0 / K, abs=1e-6)


def test_a_candidate_equal_to_the_logging_policy_is_flagged_and_its_estimates_are_the_logged_mean():
    """On a uniformly logged day a model whose scores do not separate the candidates gives
    back the uniform distribution: every estimator (DR with that model's flat scores as
    q-hat) then returns the logged mean exactly."""
    pages, _, _ = uniform_day()
    flat = np.full(pages.n_rows, 0.07)
    uniform = np.full(pages.n_rows, 1.0 / K)
    same = distance_to_logging(pages, uniform)
    assert same["same_policy"] and same["max_abs_diff"] == 0.0 and "equal the logging" in same["note"]
    mean = pages.reward.mean()
    for est in (IPS(), SNIPS(), DoublyRobust()):
        assert est.estimate(pages, uniform, q_hat=flat) == pytest.approx(mean, abs=1e-12)
    tilted = uniform + np.tile([0.01, -0.01, 0.0], pages.n_impressions)
    assert not distance_to_logging(pages, tilted)["same_policy"]


def _evaluation(champion: bool = True) -> dict:
    iv = {"estimate": 0.060, "lo": 0.055, "hi": 0.065}
    policies = {p: {e: dict(iv) for e in ("replay", "ips", "snips", "dr")} for p in ("candidate", "logging")}
    out = {"heldout_ds": "2026-11-02", "n_impressions": 1000, "policies": policies}
    if champion:
        policies["champion"] = {e: {"estimate": 0.058, "lo": 0.053, "hi": 0.063} for e in ("ips", "snips", "dr")}
        out["difference"] = {"candidate_minus_champion": {e: {"estimate": 0.002, "lo": -0.004, "hi": 0.008}
                                                          for e in ("ips", "snips", "dr")}}
    return out


def test_comparison_rows_and_the_difference_plot(tmp_path):
    rows = report.comparison_rows(_evaluation(), 0.05)
    assert [r["estimator"] for r in rows] == ["ips", "snips", "dr"]
    assert [r["gate_reads"] for r in rows] == [False, False, True]  # the gate reads dr unless set otherwise
    assert [r["gate_reads"] for r in report.comparison_rows(_evaluation(), 0.05, "snips")] == [False, True, False]
    dr = rows[2]
    assert dr["minus_delta"] == pytest.approx(-0.05 * 0.058)
    assert (dr["difference_lo"], dr["challenger_estimate"], dr["champion_hi"]) == (-0.004, 0.060, 0.063)
    out = report.difference_plot(_evaluation(), tmp_path / "d.png", 0.05,
                                 {"decision": "promoted", "figures": {"pooled": 0.003, "pooled_lo": -0.001,
                                                                      "pooled_hi": 0.007, "pooled_days": 2.0}})
    assert out == tmp_path / "d.png" and out.stat().st_size > 5000
    note = report.difference_plot(_evaluation(champion=False), tmp_path / "none.png", 0.05)
    assert isinstance(note, str) and "no paired difference" in note and not (tmp_path / "none.png").exists()


def test_the_model_card_opens_with_the_decision_once_the_gate_ran():
    kwargs = dict(ds="2026-11-03", manifest={"bundle_version": "b1"}, train={}, evaluation=_evaluation(),
                  lineage={}, notes=[])
    pending = report.model_card(**kwargs)
    assert pending.index("## Decision") < pending.index("## Challenger vs champion") < pending.index("## Identity")
    assert "Pending" in pending and "| **dr** (gate) |" in pending and "-0.00290" in pending
    assert "The gate reads dr" in pending
    decided = report.model_card(**kwargs, decision={"decision": "kept", "reason": "snips ... may be worse by more than delta",
                                                    "version": "4", "champion_after": "5", "estimator": "snips"})
    assert "**kept**" in decided and "> snips ... may be worse by more than delta" in decided
    assert "Pending" not in decided and "- champion after: `5`" in decided
    assert "| **snips** (gate) |" in decided and "The gate reads snips" in decided  # the one it did read
    first = report.model_card(**{**kwargs, "evaluation": _evaluation(champion=False)})
    assert "promoted on parity alone" in first
