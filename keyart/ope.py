"""Offline policy evaluation on logged pages: replay, IPS, SNIPS, doubly robust.

Logged data (:class:`LoggedPages`): n impressions; impression i had candidate rows
``offsets[i]:offsets[i+1]`` (a flat array of all candidates), showed row ``logged_row[i]``
with logging propensity ``propensity[i]`` and got ``reward[i]``. A *target policy* is given
by its probability for every candidate row (``target`` [n_rows], summing to 1 per
impression), as :func:`keyart.policy.probabilities` returns it. The value V of a policy
is its expected reward per impression: the take rate (quality plays per impression).

Every estimator reduces to per-impression terms (num_i, den_i) with V = sum num / sum den,
so one bootstrap serves all of them and paired intervals (lift over logging) reuse the
same resampling weights:

==========  =================================================  =====================
estimator   num_i / den_i                                      reference
==========  =================================================  =====================
replay      r_i * a_i / a_i, a_i = [draw from target matches   Li, Chu, Langford & Wang,
            the logged row] * [coin with P = p_min / p_i]      WSDM 2011 (rejection form)
ips         w_i r_i / 1,  w_i = target(logged_i) / p_i         Horvitz & Thompson 1952
snips       w_i r_i / w_i                                      Swaminathan & Joachims 2015
dr          sum_a target(a) q(a) + w_i (r_i - q(logged_i)) / 1 Dudik, Langford & Li, ICML 2011
==========  =================================================  =====================

Replay is Li et al.'s estimator: keep the events where the target policy's (seeded) draw
equals the logged artwork. It is unbiased when logging was uniform over a constant number
of candidates; the extra coin (accept with probability ``p_min / p_i``) makes the kept
events independent of the logging policy in general, so it stays unbiased for any logging
and any candidate count, at the price of fewer kept events. Under uniform logging with
constant K the coin always accepts and this is exactly Li et al.

Intervals: Poisson(1) bootstrap (each impression, or each ``groups`` cluster, gets an
independent Poisson(1) weight per replicate) and percentile bounds. Clustering by member
accounts for the correlation between the titles of one page.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from keyart.policy import draw

ESTIMATORS = ("replay", "ips", "snips", "dr")
LOGGED_SUM_TOL = 1e-5
"""Logged probabilities are rounded to 6 significant digits: each impression's sum is within 5e-6 of 1."""


def effective_sample_size(weights: np.ndarray) -> float:
    """Kish's effective sample size (sum w)^2 / sum w^2 of importance weights: n when every
    weight is equal (on-policy), far fewer when a few weights dominate."""
    w = np.asarray(weights, dtype=np.float64)
    sww = float(np.dot(w, w))
    return float(w.sum()) ** 2 / sww if sww > 0 else 0.0


def weighted_evidence(sw: float, sww: float, swr: float) -> tuple[float, float, float]:
    """Self-normalised importance-weighted evidence of a Bernoulli rate as Beta counts.

    From the sums of the weights w, of w^2 and of w r over the observations: the rate
    r_w = swr / sw (self-normalised IPS) counted as e = sw^2 / sww observations (Kish's
    effective sample size), i.e. ``(successes, failures, e) = (e r_w, e - e r_w, e)``. The
    priors job (jobs/priors.py ``evidence``) and serving's online priors both use this, so
    a day's online delta is what the next day's priors add for it.
    """
    if not isinstance(sw, np.ndarray):  # serving: one key at a time
        if sw <= 0.0 or sww <= 0.0:
            return (0.0, 0.0, 0.0)
        e = sw * sw / sww
        s = e * min(max(swr / sw, 0.0), 1.0)
        return (s, e - s, e)
    sw, sww, swr = (np.asarray(x, dtype=np.float64) for x in (sw, sww, swr))
    ok = (sw > 0) & (sww > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        e = np.where(ok, sw * sw / sww, 0.0)
        s = e * np.where(ok, np.clip(swr / sw, 0.0, 1.0), 0.0)
    return (s, e - s, e)


@dataclass(frozen=True)
class LoggedPages:
    """Logged impressions with all their candidates.

    Parameters
    ----------
    offsets : [n + 1] int, candidate rows of impression i are ``offsets[i]:offsets[i+1]``.
    logged_row : [n] int, global index of the shown candidate.
    reward : [n] float, the observed reward (0/1 for quality plays).
    propensity : [n] float in (0, 1], logging probability of the shown candidate.
    groups : [n] optional cluster ids for the bootstrap (e.g. member ids).
    logging : [n_rows] optional, the logging policy's probability of every candidate as
        logged with the impression (serving logs them to 6 significant digits and the shown
        one exactly): each impression's sum within ``LOGGED_SUM_TOL`` of 1 and its shown
        candidate's equal to ``propensity``; NaN for the impressions logged without them
        (:attr:`logged_known`). :meth:`logging_target` is then the logging policy as a
        target, whose importance weights are exactly 1.
    """

    offsets: np.ndarray
    logged_row: np.ndarray
    reward: np.ndarray
    propensity: np.ndarray
    groups: np.ndarray | None = None
    logging: np.ndarray | None = None

    def __post_init__(self) -> None:
        off = np.asarray(self.offsets, dtype=np.int64)
        n = len(off) - 1
        if off.ndim != 1 or n < 1 or off[0] != 0:
            raise ValueError("offsets must be a 1-d array starting at 0 with at least one impression")
        if np.any(np.diff(off) < 1):
            raise ValueError("every impression needs at least one candidate")
        row = np.asarray(self.logged_row, dtype=np.int64)
        r = np.asarray(self.reward, dtype=np.float64)
        p = np.asarray(self.propensity, dtype=np.float64)
        for name, arr in (("logged_row", row), ("reward", r), ("propensity", p)):
            if arr.shape != (n,):
                raise ValueError(f"{name} must have shape ({n},), got {arr.shape}")
        if np.any(row < off[:-1]) or np.any(row >= off[1:]):
            raise ValueError("logged_row must lie inside its impression's candidate rows")
        if not np.isfinite(r).all():
            raise ValueError("reward must be finite")
        if not (np.isfinite(p).all() and np.all(p > 0) and np.all(p <= 1)):
            raise ValueError("propensity must be in (0, 1]")
        object.__setattr__(self, "offsets", off)
        object.__setattr__(self, "logged_row", row)
        object.__setattr__(self, "reward", r)
        object.__setattr__(self, "propensity", p)
        if self.groups is not None:
            g = np.asarray(self.groups)
            if g.shape != (n,):
                raise ValueError(f"groups must have shape ({n},), got {g.shape}")
            object.__setattr__(self, "groups", np.unique(g, return_inverse=True)[1])
        if self.logging is not None:
            q = np.array(self.logging, dtype=np.float64)
            if q.shape != (int(off[-1]),):
                raise ValueError(f"logging must have shape ({int(off[-1])},), got {q.shape}")
            sizes = np.diff(off)
            known = np.add.reduceat(np.isfinite(q), off[:-1]) == sizes
            q[~np.repeat(known, sizes)] = np.nan
            k = np.repeat(known, sizes)
            if np.any(q[k] < 0) or np.any(q[k] > 1):
                raise ValueError("logging probabilities must be in [0, 1]")
            sums = np.add.reduceat(np.where(k, q, 0.0), off[:-1])[known]
            if np.any(np.abs(sums - 1.0) > LOGGED_SUM_TOL):
                raise ValueError(f"logging probabilities must sum to 1 per impression (worst {sums[np.argmax(np.abs(sums - 1))]:.8f})")
            if np.any(q[row][known] != p[known]):
                raise ValueError("logging probabilities must give the shown candidate its propensity exactly")
            object.__setattr__(self, "logging", q)

    @property
    def n_impressions(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_rows(self) -> int:
        return int(self.offsets[-1])

    def check_target(self, target: np.ndarray, atol: float = 1e-6) -> np.ndarray:
        """Validate a target policy's probabilities [n_rows]; return them as float64."""
        t = np.asarray(target, dtype=np.float64)
        if t.shape != (self.n_rows,):
            raise ValueError(f"target must have shape ({self.n_rows},), got {t.shape}")
        if not np.isfinite(t).all() or np.any(t < 0):
            raise ValueError("target probabilities must be finite and >= 0")
        sums = np.add.reduceat(t, self.offsets[:-1])
        if np.any(np.abs(sums - 1.0) > atol):
            raise ValueError(f"target probabilities must sum to 1 per impression (worst {sums[np.argmax(np.abs(sums - 1))]:.6f})")
        return t

    def weights(self, target: np.ndarray) -> np.ndarray:
        """Importance weights target(logged) / propensity: [n]."""
        return self.check_target(target)[self.logged_row] / self.propensity

    @property
    def logged_known(self) -> np.ndarray:
        """[n] bool: the impression carries its logged probabilities."""
        if self.logging is None:
            return np.zeros(self.n_impressions, dtype=bool)
        return ~np.isnan(self.logging[self.logged_row])

    def logging_target(self) -> np.ndarray:
        """The logged distribution as a target [n_rows] summing to 1 per impression: the
        candidates not shown rescaled to 1 - propensity (undoing the rounding of their
        logged values), the shown one at its propensity, so its importance weights are 1.
        NaN on the impressions logged without probabilities."""
        if self.logging is None:
            raise ValueError("these pages carry no logged probabilities")
        t = self.logging.copy()
        others = np.add.reduceat(t, self.offsets[:-1]) - t[self.logged_row]
        with np.errstate(invalid="ignore", divide="ignore"):
            scale = np.where(others > 0, (1.0 - self.propensity) / others, 0.0)
        t *= np.repeat(scale, np.diff(self.offsets))
        t[self.logged_row] = self.propensity
        t[np.repeat(~self.logged_known, np.diff(self.offsets))] = np.nan
        return t


@dataclass(frozen=True)
class Estimator:
    """Base of the estimators: per-impression terms (num [n], den [n])."""

    name: ClassVar[str] = ""

    def terms(self, pages: LoggedPages, target: np.ndarray,
              q_hat: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def estimate(self, pages: LoggedPages, target: np.ndarray, q_hat: np.ndarray | None = None) -> float:
        num, den = self.terms(pages, target, q_hat)
        total = den.sum()
        return float(num.sum() / total) if total > 0 else float("nan")


@dataclass(frozen=True)
class Replay(Estimator):
    """Li et al. (2011) replay with a rejection coin for non-uniform logging.

    Parameters
    ----------
    seed : seeds the target policy's draws and the acceptance coins.
    """

    name: ClassVar[str] = "replay"
    seed: int = 0

    def terms(self, pages, target, q_hat=None):
        t = pages.check_target(target)
        rng = np.random.default_rng(self.seed)
        chosen, _ = draw(t, pages.offsets, rng)
        accept_p = pages.propensity.min() / pages.propensity
        kept = (chosen == pages.logged_row) & (rng.random(pages.n_impressions) < accept_p)
        den = kept.astype(np.float64)
        return den * pages.reward, den


@dataclass(frozen=True)
class IPS(Estimator):
    """Inverse propensity scoring: mean of w_i r_i (unbiased, high variance)."""

    name: ClassVar[str] = "ips"

    def terms(self, pages, target, q_hat=None):
        w = pages.weights(target)
        return w * pages.reward, np.ones_like(w)


@dataclass(frozen=True)
class SNIPS(Estimator):
    """Self-normalised IPS: sum w_i r_i / sum w_i (consistent, lower variance)."""

    name: ClassVar[str] = "snips"

    def terms(self, pages, target, q_hat=None):
        w = pages.weights(target)
        return w * pages.reward, w


@dataclass(frozen=True)
class DoublyRobust(Estimator):
    """Doubly robust: the reward model's value of the target plus an IPS correction.

    ``q_hat`` [n_rows] is the reward model's prediction for every candidate row.
    """

    name: ClassVar[str] = "dr"

    def terms(self, pages, target, q_hat=None):
        if q_hat is None:
            raise ValueError("dr needs q_hat, the reward model's prediction per candidate row")
        q = np.asarray(q_hat, dtype=np.float64)
        if q.shape != (pages.n_rows,) or not np.isfinite(q).all():
            raise ValueError(f"q_hat must be finite with shape ({pages.n_rows},), got {q.shape}")
        t = pages.check_target(target)
        direct = np.add.reduceat(t * q, pages.offsets[:-1])
        w = t[pages.logged_row] / pages.propensity
        num = direct + w * (pages.reward - q[pages.logged_row])
        return num, np.ones_like(num)


def make_estimators(names: Sequence[str] = ESTIMATORS, seed: int = 0) -> dict[str, Estimator]:
    """Estimators by name (``replay`` is seeded with ``seed``)."""
    table = {"replay": Replay(seed=seed), "ips": IPS(), "snips": SNIPS(), "dr": DoublyRobust()}
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown estimators {unknown}; choose from {ESTIMATORS}")
    return {n: table[n] for n in names}


@dataclass(frozen=True)
class Interval:
    """A point estimate with a bootstrap interval."""

    estimate: float
    lo: float
    hi: float

    def covers(self, value: float) -> bool:
        return bool(self.lo <= value <= self.hi)

    def to_dict(self) -> dict[str, float]:
        return {"estimate": self.estimate, "lo": self.lo, "hi": self.hi}


@dataclass(frozen=True)
class Bootstrap:
    """Poisson(1) bootstrap settings.

    Parameters
    ----------
    n_boot : replicates.
    level : two-sided confidence level of the percentile interval.
    chunk : replicates drawn at a time (memory: chunk * n floats).
    """

    n_boot: int = 200
    level: float = 0.95
    seed: int = 0
    chunk: int = 16
    _q: tuple[float, float] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.n_boot < 10:
            raise ValueError(f"n_boot must be >= 10, got {self.n_boot}")
        if not 0.5 <= self.level < 1.0:
            raise ValueError(f"level must be in [0.5, 1), got {self.level}")
        if self.chunk < 1:
            raise ValueError("chunk must be >= 1")
        a = (1.0 - self.level) / 2.0
        object.__setattr__(self, "_q", (a, 1.0 - a))

    def replicates(self, nums: np.ndarray, dens: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
        """Bootstrap values [n_boot, m] of m ratio estimators given terms [m, n]."""
        nums = np.atleast_2d(np.asarray(nums, dtype=np.float64))
        dens = np.atleast_2d(np.asarray(dens, dtype=np.float64))
        if groups is not None:  # cluster bootstrap: one weight per group
            g = np.asarray(groups)
            n_g = int(g.max()) + 1
            nums = np.stack([np.bincount(g, weights=row, minlength=n_g) for row in nums])
            dens = np.stack([np.bincount(g, weights=row, minlength=n_g) for row in dens])
        rng = np.random.default_rng(self.seed)
        out = np.empty((self.n_boot, nums.shape[0]))
        for start in range(0, self.n_boot, self.chunk):
            b = min(self.chunk, self.n_boot - start)
            w = rng.poisson(1.0, size=(b, nums.shape[1])).astype(np.float64)
            with np.errstate(invalid="ignore", divide="ignore"):
                out[start:start + b] = (w @ nums.T) / (w @ dens.T)
        return out

    def interval(self, point: float, reps: np.ndarray) -> Interval:
        reps = reps[np.isfinite(reps)]
        if len(reps) == 0:
            return Interval(point, float("nan"), float("nan"))
        lo, hi = np.quantile(reps, self._q)
        return Interval(float(point), float(lo), float(hi))


def evaluate_policies(pages: LoggedPages, targets: Mapping[str, np.ndarray], q_hat: np.ndarray | None = None,
                      estimators: Sequence[str] = ESTIMATORS, bootstrap: Bootstrap | None = None,
                      replay_seed: int = 0, differences: Sequence[tuple[str, str]] = ()) -> dict[str, dict]:
    """Value every target policy with every estimator, plus the logging policy and lifts.

    Parameters
    ----------
    pages : the logged impressions.
    targets : policy name -> probabilities [n_rows].
    q_hat : [n_rows] reward-model predictions (needed for ``dr``; skipped without it).
    differences : pairs ``(a, b)`` of target names; for each, V_a - V_b per estimator with
        a paired bootstrap interval (both valued on the same resampled impressions, so the
        interval is far narrower than either policy's own when the two policies agree often).

    Returns
    -------
    ``{"policies": {name: {estimator: Interval}}, "lift": {name: {estimator: Interval}}}``
    where ``policies["logging"]`` is the on-policy mean reward (the same under every
    estimator key) and lift = V / V_logging - 1 with paired bootstrap intervals; with
    ``differences``, also ``"difference": {"<a>_minus_<b>": {estimator: Interval}}``.
    """
    bootstrap = bootstrap or Bootstrap()
    for a, b in differences:
        missing = {a, b} - set(targets)
        if missing:
            raise ValueError(f"difference {a} - {b}: no target named {sorted(missing)}")
    names = [e for e in estimators if e != "dr" or q_hat is not None]
    ests = make_estimators(names, seed=replay_seed)
    labels, nums, dens = [("logging", "on_policy")], [pages.reward], [np.ones(pages.n_impressions)]
    for policy, target in targets.items():
        if policy == "logging":
            raise ValueError("'logging' is valued on-policy; do not pass it as a target")
        for name, est in ests.items():
            num, den = est.terms(pages, target, q_hat)
            labels.append((policy, name))
            nums.append(num)
            dens.append(den)
    nums_a, dens_a = np.vstack(nums), np.vstack(dens)
    with np.errstate(invalid="ignore", divide="ignore"):
        points = nums_a.sum(axis=1) / dens_a.sum(axis=1)
    reps = bootstrap.replicates(nums_a, dens_a, pages.groups)
    policies: dict[str, dict[str, Interval]] = {"logging": {}}
    lift: dict[str, dict[str, Interval]] = {}
    log_iv = bootstrap.interval(points[0], reps[:, 0])
    for name in ests:
        policies["logging"][name] = log_iv
    for j, (policy, name) in enumerate(labels[1:], start=1):
        policies.setdefault(policy, {})[name] = bootstrap.interval(points[j], reps[:, j])
        with np.errstate(invalid="ignore", divide="ignore"):
            lift_reps = reps[:, j] / reps[:, 0] - 1.0
        lift.setdefault(policy, {})[name] = bootstrap.interval(points[j] / points[0] - 1.0, lift_reps)
    out: dict[str, dict] = {"policies": policies, "lift": lift}
    if differences:
        col = {label: j for j, label in enumerate(labels)}
        out["difference"] = {
            f"{a}_minus_{b}": {name: bootstrap.interval(points[col[(a, name)]] - points[col[(b, name)]],
                                                        reps[:, col[(a, name)]] - reps[:, col[(b, name)]])
                               for name in ests}
            for a, b in differences}
    return out


def weight_diagnostics(pages: LoggedPages, targets: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Per policy, its importance weights on the logged impressions: effective sample size
    (Kish), its share of n, and the largest weight. The logging policy's weights are 1 by
    construction when the pages carry logged probabilities (ESS = n); a target rebuilt from
    other inputs than the ones that served drifts from it (ESS < n on its own logs)."""
    out: dict[str, dict[str, float]] = {}
    named = dict(targets)
    if pages.logging is not None and pages.logged_known.all():
        named = {"logging": pages.logging_target(), **named}
    n = pages.n_impressions
    for name, target in named.items():
        w = pages.weights(target)
        ess = effective_sample_size(w)
        out[name] = {"ess": ess, "ess_share": ess / n, "max_weight": float(w.max())}
    if "logging" not in out:  # on-policy by definition: the shown artwork's probability is the propensity
        out["logging"] = {"ess": float(n), "ess_share": 1.0, "max_weight": 1.0}
    return out


def to_json(result: Mapping[str, Mapping[str, Mapping[str, Interval]]]) -> dict:
    """Intervals -> plain dicts (evaluation.json layout)."""
    return {section: {p: {e: iv.to_dict() for e, iv in by_est.items()} for p, by_est in by_policy.items()}
            for section, by_policy in result.items()}
