"""Evaluation values the non-contextual baseline (``beta_ts``) with
``BASELINE_SAMPLES`` Monte Carlo draws per impression: the draws' error must stay a small
fraction of the estimate's own sampling error, and must not bias it."""

from __future__ import annotations

import numpy as np
import pandas as pd

from keyart.models.evaluate import BASELINE_SAMPLES, policy_targets
from keyart.ope import Bootstrap, LoggedPages, evaluate_policies
from keyart.policy import PolicyConfig, probabilities


def logged_day(n: int = 3000, k: int = 8, seed: int = 0) -> tuple[LoggedPages, pd.DataFrame]:
    """Uniformly logged pages of k artworks whose Beta priors differ at every impression (as
    the online priors do), rewards drawn at each artwork's rate."""
    rng = np.random.default_rng(seed)
    rate = rng.uniform(0.02, 0.10, k)
    offsets = np.arange(0, n * k + 1, k)
    m = rng.uniform(20, 400, (n, k))  # effective impressions behind each prior
    mean = np.clip(rate + rng.normal(0, 0.01, (n, k)), 0.005, 0.5)
    shown = rng.integers(0, k, n)
    reward = (rng.random(n) < rate[shown]).astype(np.float64)
    pages = LoggedPages(offsets, offsets[:-1] + shown, reward, np.full(n, 1.0 / k))
    rows = pd.DataFrame({"artwork_id": np.tile([f"a{j}" for j in range(k)], n),
                         "prior_alpha": (mean * m).ravel(), "prior_beta": ((1 - mean) * m).ravel(),
                         "prior_n": m.ravel()})
    return pages, rows


def snips(pages: LoggedPages, target: np.ndarray):
    return evaluate_policies(pages, {"t": target}, estimators=["snips"],
                             bootstrap=Bootstrap(n_boot=200, seed=0))["policies"]["t"]["snips"]


def test_the_baselines_draws_move_its_estimate_by_a_small_fraction_of_its_interval():
    pages, rows = logged_day()
    cfg = PolicyConfig()
    zero = {}  # no model-based policy: the baselines alone

    estimates = [snips(pages, policy_targets(pages, rows, zero, cfg, seed=s)["noncontextual"]).estimate
                 for s in range(5)]
    ref_cfg = PolicyConfig(name="beta_ts", floor=cfg.floor, thompson_samples=2048)
    ref_target = probabilities(ref_cfg, np.zeros(pages.n_rows), pages.offsets, rows["prior_alpha"].to_numpy(),
                               rows["prior_beta"].to_numpy(), rows["prior_n"].to_numpy(), np.random.default_rng(99))
    ref = snips(pages, ref_target)
    half_width = (ref.hi - ref.lo) / 2
    assert BASELINE_SAMPLES >= 64
    assert np.std(estimates) < 0.1 * half_width, (estimates, half_width)  # noise: small against the interval
    assert abs(np.mean(estimates) - ref.estimate) < 0.1 * half_width, (estimates, ref)  # and no bias
