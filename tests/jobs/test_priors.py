"""priors: decay, ESS cap, importance weighting, empirical Bayes, segments, reruns."""

from __future__ import annotations

import json

import numpy as np
import pytest
from jobs_fixtures import args, artwork, frame, impression, member, prior, reward_row
from pyspark.testing import assertDataFrameEqual

from keyart import feature_spec
from keyart.jobs import priors
from keyart.jobs.common import write_day

DS = "2026-03-02"


def params(**kw):
    base = {"ds": DS, "half_life_days": 1.0, "max_ess": 500.0, "min_segment_impressions": 0.0}
    return priors.PriorParams(**{**base, **kw})


def labels(artwork_id, outcomes, propensity=0.5, member_id="m1", candidates=("t1-a0", "t1-a1")):
    """Reward rows for ``artwork_id``, one per outcome."""
    title = artwork_id.split("-")[0]
    return [reward_row(impression(f"{artwork_id}-{member_id}-{i}-{propensity}", "2026-03-02 08:00", member=member_id, title=title,
                                  artwork=artwork_id, candidates=list(candidates), propensity=propensity), r, 30.0 * r)
            for i, r in enumerate(outcomes)]


def arts(spark, *ids, **kw):
    return frame(spark, "artworks", [artwork(a, a.split("-")[0], **kw) for a in ids])


def members(spark):
    return frame(spark, "members", [member("m1"), member("k1", "kids")])


def test_decay_update_and_ess_cap(spark):
    previous = frame(spark, "priors", [prior("t1", "t1-a0", 20, 80, 100), prior("t1", "t1-a1", 900, 1100, 2000)])
    rewards = frame(spark, "rewards", labels("t1-a0", [1, 1, 1] + [0] * 7))
    got = priors.transform(previous, rewards, arts(spark, "t1-a0", "t1-a1"), members(spark), params())
    expected = [
        prior("t1", "t1-a0", 10 + 3, 40 + 7, 50 + 10),          # decayed by 0.5 (half-life 1 day) plus the day
        prior("t1", "t1-a1", 225, 275, 500),                    # decayed to (450, 550, 1000), capped at ESS 500
        prior("t1", "t1-a0", 3, 7, 10, "profile=adult"),        # segment with data, no fill (min 0)
    ]
    assertDataFrameEqual(got, frame(spark, "priors", expected))


def test_importance_weighted_evidence_counts_its_effective_sample_size(spark):
    rewards = frame(spark, "rewards", labels("t1-a0", [1, 1], propensity=0.8) + labels("t1-a0", [0, 0], propensity=0.2))
    previous = frame(spark, "priors", [prior("t1", "t1-a0", 0.0, 0.0, 0.0)])
    row = priors.transform(previous, rewards, arts(spark, "t1-a0"), members(spark), params()).where("segment = 'all'").first()
    # w = 1/(2*0.8) = 0.625 on the successes, 1/(2*0.2) = 2.5 on the failures: mean 1.25 / 6.25,
    # worth (sum w)^2 / sum w^2 = 6.25^2 / (2 * 0.625^2 + 2 * 2.5^2) impressions, not 4
    ess = 6.25 ** 2 / (2 * 0.625 ** 2 + 2 * 2.5 ** 2)
    assert row["alpha"] == pytest.approx(ess * 1.25 / 6.25)
    assert row["beta"] == pytest.approx(ess * (1 - 1.25 / 6.25))
    assert row["n_impressions"] == pytest.approx(ess)


def test_a_few_high_weight_impressions_do_not_make_an_exploited_artwork_look_certain(spark):
    """An exploiting policy showed a0 400 times at propensity 0.95 and 4 times at its floor: the
    weighted mean leans on the 4, so the posterior must stay about as wide as 4-ish impressions."""
    rewards = frame(spark, "rewards", labels("t1-a0", [1] * 40 + [0] * 360, propensity=0.95)
                    + labels("t1-a0", [0] * 4, propensity=0.01))
    previous = frame(spark, "priors", [prior("t1", "t1-a0", 0.0, 0.0, 0.0)])
    row = priors.transform(previous, rewards, arts(spark, "t1-a0"), members(spark), params()).where("segment = 'all'").first()
    w_hi, w_lo = 1 / (2 * 0.95), 1 / (2 * 0.01)
    mean = 40 * w_hi / (400 * w_hi + 4 * w_lo)
    ess = (400 * w_hi + 4 * w_lo) ** 2 / (400 * w_hi ** 2 + 4 * w_lo ** 2)
    assert row["alpha"] / (row["alpha"] + row["beta"]) == pytest.approx(mean)
    assert row["n_impressions"] == pytest.approx(ess) and ess < 20  # was counted as 404


def test_posterior_accumulates_day_after_day_like_a_thompson_sampler(spark):
    """Without decay, two daily updates give the posterior of both days' evidence at once."""
    arts_ = arts(spark, "t1-a0", "t1-a1")
    start = frame(spark, "priors", [prior("t1", "t1-a0", 1, 9, 0), prior("t1", "t1-a1", 1, 9, 0)])
    day1 = labels("t1-a0", [1] * 3 + [0] * 17) + labels("t1-a1", [1] * 6 + [0] * 14)
    day2 = labels("t1-a0", [1] * 2 + [0] * 18, member_id="m2") + labels("t1-a1", [1] * 7 + [0] * 13, member_id="m2")
    p = params(half_life_days=1e12, max_ess=1e9)
    after1 = priors.transform(start, frame(spark, "rewards", day1), arts_, members(spark), p)
    after2 = priors.transform(after1, frame(spark, "rewards", day2), arts_, members(spark), p)
    got = {r["artwork_id"]: (r["alpha"], r["beta"], r["n_impressions"]) for r in after2.where("segment = 'all'").collect()}
    assert got["t1-a0"] == pytest.approx((1 + 5, 9 + 35, 40))
    assert got["t1-a1"] == pytest.approx((1 + 13, 9 + 27, 40))


def test_default_decay_and_cap_leave_room_to_learn():
    """The decay forgets slowly (a month's half-life) and the cap sits above the steady state of
    an artwork with 1000 effective impressions a day, so the cap never replaces the decay."""
    from keyart.config import Settings

    p = priors.PriorParams.from_settings(DS, Settings())
    assert p.half_life_days >= 30
    assert 1000 / (1 - p.decay) < p.max_ess


def test_uniform_logging_policy_gives_plain_counts(spark):
    rewards = frame(spark, "rewards", labels("t1-a0", [1, 0, 0, 0], propensity=0.5))
    previous = frame(spark, "priors", [prior("t1", "t1-a0", 0.0, 0.0, 0.0)])
    row = priors.transform(previous, rewards, arts(spark, "t1-a0"), members(spark), params()).where("segment = 'all'").first()
    assert (row["alpha"], row["beta"], row["n_impressions"]) == (1.0, 3.0, 4.0)


def test_new_artwork_gets_empirical_bayes_prior_from_its_title(spark):
    previous = frame(spark, "priors", [prior("t1", "t1-a0", 2, 8, 10), prior("t1", "t1-a1", 4, 6, 10)])
    got = priors.transform(previous, frame(spark, "rewards", []), arts(spark, "t1-a0", "t1-a1", "t1-a2", "t2-a0"),
                           members(spark), params(half_life_days=1e9))
    rows = {r["artwork_id"]: r for r in got.collect()}
    m, v = 0.3, 0.01                                 # means 0.2 and 0.4
    ess = min(m * (1 - m) / v - 1, priors.EB_MAX_ESS)  # 20.0
    for new in ("t1-a2", "t2-a0"):                   # t2 has no artwork with data: the catalog's moments
        assert rows[new]["alpha"] == pytest.approx(m * ess)
        assert rows[new]["beta"] == pytest.approx((1 - m) * ess)
        assert rows[new]["n_impressions"] == 0.0


def test_first_day_without_any_data_gives_every_active_artwork_the_default(spark):
    artworks = frame(spark, "artworks", [artwork("t1-a0", "t1"), artwork("t1-a1", "t1", active_to="2026-03-01"),
                                          artwork("t1-a2", "t1", active_from="2026-03-03")])
    got = priors.transform(frame(spark, "priors", []), frame(spark, "rewards", []), artworks, members(spark), params())
    assertDataFrameEqual(got, frame(spark, "priors", [prior("t1", "t1-a0", *feature_spec.DEFAULT_PRIOR, 0.0)]))


def _evidence_prior(rates: dict[str, list[tuple[int, int]]]) -> tuple[dict[str, float], float, float]:
    """The day-evidence empirical-Bayes prior written out: each title's pooled rate, the
    catalog's, and alpha + beta from the within-title beta-binomial method of moments."""
    S = noise = c = 0.0
    title_mean = {}
    for title, arms in rates.items():
        n = np.array([a[1] for a in arms], float)
        s = np.array([a[0] for a in arms], float)
        m = s.sum() / n.sum()
        title_mean[title] = m
        S += (n * (s / n - m) ** 2).sum()
        noise += m * (1 - m) * (len(arms) - 1)
        c += n.sum() - (n ** 2).sum() / n.sum()
    cm = sum(a[0] for arms in rates.values() for a in arms) / sum(a[1] for arms in rates.values() for a in arms)
    ess = min(max(cm * (1 - cm) / ((S - noise) / c) - 1, 1.0), priors.EB_MAX_ESS)
    return title_mean, cm, ess


def test_first_day_priors_take_their_scale_from_the_days_own_rates(spark):
    """With no posterior anywhere (a lake's first day), an artwork's prior is not the flat
    Beta(1, 9) (mean 0.10, ten times this catalog's 1% rate) but its title's pooled rate today,
    as strong as the spread of the artworks' rates within titles says."""
    counts = {"t1": [(2, 200), (2, 200)], "t2": [(40, 200), (2, 200)]}  # (quality plays, impressions)
    rewards = []
    for title, arms in counts.items():
        for j, (s, n) in enumerate(arms):
            rewards += labels(f"{title}-a{j}", [1] * s + [0] * (n - s), candidates=(f"{title}-a0", f"{title}-a1"))
    artworks = arts(spark, "t1-a0", "t1-a1", "t1-a2", "t2-a0", "t2-a1", "t3-a0")  # t1-a2, t3-a0: no evidence
    got = priors.transform(frame(spark, "priors", []), frame(spark, "rewards", rewards), artworks, members(spark),
                           params(max_ess=1e9))
    rows = {r["artwork_id"]: r for r in got.where("segment = 'all'").collect()}
    title_mean, cm, ess = _evidence_prior(counts)
    assert 1.0 < ess < priors.EB_MAX_ESS  # the formula's own value, not a clip
    for title, arms in counts.items():
        for j, (s, n) in enumerate(arms):
            r = rows[f"{title}-a{j}"]
            assert r["alpha"] == pytest.approx(title_mean[title] * ess + s)
            assert r["beta"] == pytest.approx((1 - title_mean[title]) * ess + n - s)
            assert r["n_impressions"] == pytest.approx(n)
    new = rows["t1-a2"]  # no impression yet: its title's rate (1%), not 10%
    assert new["alpha"] / (new["alpha"] + new["beta"]) == pytest.approx(0.01)
    assert new["alpha"] + new["beta"] == pytest.approx(ess) and new["n_impressions"] == 0.0
    other = rows["t3-a0"]  # a title without evidence: the catalog's rate
    assert other["alpha"] / (other["alpha"] + other["beta"]) == pytest.approx(cm)


def test_first_day_rates_that_spread_no_more_than_noise_give_the_strongest_prior(spark):
    counts = {"t1": [(2, 200), (2, 200)], "t2": [(4, 200), (4, 200)]}  # equal within titles
    rewards = [row for title, arms in counts.items() for j, (s, n) in enumerate(arms)
               for row in labels(f"{title}-a{j}", [1] * s + [0] * (n - s), candidates=(f"{title}-a0", f"{title}-a1"))]
    got = priors.transform(frame(spark, "priors", []), frame(spark, "rewards", rewards),
                           arts(spark, "t1-a0", "t1-a1", "t2-a0", "t2-a1"), members(spark), params(max_ess=1e9))
    row = next(r for r in got.collect() if r["artwork_id"] == "t2-a0" and r["segment"] == "all")
    assert row["alpha"] == pytest.approx(0.02 * priors.EB_MAX_ESS + 4)
    assert row["beta"] == pytest.approx(0.98 * priors.EB_MAX_ESS + 196)


def test_thin_segment_is_filled_with_the_artwork_mean(spark):
    rewards = frame(spark, "rewards", labels("t1-a0", [1] * 5 + [0] * 5, member_id="k1") + labels("t1-a0", [1] * 10 + [0] * 30))
    previous = frame(spark, "priors", [prior("t1", "t1-a0", 0.0, 0.0, 0.0)])
    got = priors.transform(previous, rewards, arts(spark, "t1-a0"), members(spark), params(min_segment_impressions=100.0))
    rows = {r["segment"]: r for r in got.collect()}
    m_all = 15 / 50
    assert rows["profile=kids"]["alpha"] == pytest.approx(5 + 90 * m_all)
    assert rows["profile=kids"]["beta"] == pytest.approx(5 + 90 * (1 - m_all))
    assert rows["profile=kids"]["n_impressions"] == 10.0
    assert rows["profile=adult"]["alpha"] + rows["profile=adult"]["beta"] == pytest.approx(100.0)


def test_run_warm_starts_from_yesterday_and_rerun_is_identical(spark, lake, settings):
    arts(spark, "t1-a0", "t1-a1").write.parquet(str(lake.artworks))
    members(spark).write.parquet(str(lake.members))
    write_day(frame(spark, "priors", [prior("t1", "t1-a0", 2, 8, 10)]), lake.priors("2026-03-01"))
    write_day(frame(spark, "rewards", labels("t1-a0", [1, 0])), lake.rewards(DS))
    priors.run(spark, lake, args(DS, lake.root), settings)
    first = spark.read.parquet(str(lake.priors(DS))).collect()
    d = 0.5 ** (1 / settings.prior_half_life_days)
    row = next(r for r in first if r["artwork_id"] == "t1-a0" and r["segment"] == "all")
    assert row["alpha"] == pytest.approx(2 * d + 1) and row["n_impressions"] == pytest.approx(10 * d + 2)
    assert json.loads(lake.metrics("priors", DS).read_text())["warm_started"] is True
    priors.run(spark, lake, args(DS, lake.root), settings)
    assertDataFrameEqual(spark.read.parquet(str(lake.priors(DS))), first)


def test_a_missed_day_decays_the_newest_earlier_priors_over_the_gap(spark, lake, settings):
    """The task did not run on D-2 and D-1: D warm-starts from D-3's priors decayed three
    days, not from the empirical-Bayes start (which would lose every artwork's record)."""
    arts(spark, "t1-a0", "t1-a1").write.parquet(str(lake.artworks))
    members(spark).write.parquet(str(lake.members))
    write_day(frame(spark, "priors", [prior("t1", "t1-a0", 200, 800, 1000), prior("t1", "t1-a1", 100, 900, 1000)]),
              lake.priors("2026-02-27"))
    write_day(frame(spark, "priors", [prior("t1", "t1-a0", 1, 1, 2)]), lake.priors("2026-02-20"))  # older: not read
    write_day(frame(spark, "rewards", labels("t1-a0", [1, 0])), lake.rewards(DS))
    priors.run(spark, lake, args(DS, lake.root), settings)
    rows = {r["artwork_id"]: r for r in spark.read.parquet(str(lake.priors(DS))).collect() if r["segment"] == "all"}
    d3 = 0.5 ** (3 / settings.prior_half_life_days)
    assert rows["t1-a0"]["alpha"] == pytest.approx(200 * d3 + 1) and rows["t1-a0"]["beta"] == pytest.approx(800 * d3 + 1)
    assert rows["t1-a1"]["alpha"] == pytest.approx(100 * d3) and rows["t1-a1"]["n_impressions"] == pytest.approx(1000 * d3)
    figures = json.loads(lake.metrics("priors", DS).read_text())
    assert figures["warm_started"] is True
    assert (figures["warm_start_ds"], figures["warm_start_gap_days"]) == ("2026-02-27", 3)


def test_priors_older_than_the_gap_limit_are_not_carried(spark, lake, settings):
    arts(spark, "t1-a0", "t1-a1").write.parquet(str(lake.artworks))
    members(spark).write.parquet(str(lake.members))
    write_day(frame(spark, "priors", [prior("t1", "t1-a0", 200, 800, 1000)]), lake.priors("2026-02-27"))
    write_day(frame(spark, "rewards", labels("t1-a0", [1, 0])), lake.rewards(DS))
    priors.run(spark, lake, args(DS, lake.root), settings.model_copy(update={"prior_max_gap_days": 2}))
    rows = {r["artwork_id"]: r for r in spark.read.parquet(str(lake.priors(DS))).collect() if r["segment"] == "all"}
    assert rows["t1-a0"]["n_impressions"] == pytest.approx(2.0)  # the day's evidence on an empirical-Bayes start
    figures = json.loads(lake.metrics("priors", DS).read_text())
    assert figures["warm_started"] is False and figures["warm_start_ds"] is None
