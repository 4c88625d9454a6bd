"""Exploration policies: one implementation for offline evaluation and serving.

A *page* is a flat array of candidate rows grouped by title: ``offsets`` has one entry
per title plus one, and title ``t`` owns rows ``offsets[t]:offsets[t+1]``. For every row
a policy returns the probability that the candidate is shown; :func:`draw` picks one row
per title and returns its exact propensity.

Policies
--------
``squarecb``  inverse-gap weighting over the blended scores (Foster & Rakhlin, 2020,
              "Beyond UCB", ICML): p_a = 1 / (K + gamma * gap_a) for a != best, the rest
              on the best arm. Closed form, so propensities are exact. With ``gap_unit``
              ``stderr`` (the default) the gap is measured in standard errors of the
              difference: gap_a = (s_best - s_a) / sqrt(v_best / m_best + v_a / m_a), with
              v = s (1 - s) and m = alpha + beta the arm's Beta posterior concentration.
              SquareCB's rate grows like sqrt(T) with the data behind the estimates; here it
              grows with each arm's own: a new or rarely shown artwork (small m) keeps
              close to 1/K, a well-measured one at the same score gap fades like 1/sqrt(m).
              With ``score`` the gap is s_best - s_a (a fixed rate, whatever the data).
``thompson``  Thompson sampling around the blended score: each arm's rate is
              Beta(s * m, (1 - s) * m) with m = n_a + n0. P(arm is the argmax) is estimated
              with ``thompson_samples`` vectorised draws; the arm is then drawn *from that
              estimate*, so the logged propensity is exactly the probability used. The
              estimate differs from ideal Thompson by at most ~1/(2 sqrt(S)) per arm.
``egreedy``   (1 - epsilon) on the best arm, epsilon spread uniformly.
``greedy``    always the best arm (ties: the first). Ignores the floor.
``random``    uniform over the candidates.
``beta_ts``   the non-contextual bandit: Thompson sampling on the Beta priors alone.

Every policy except ``greedy`` mixes in a floor: p = floor + (1 - K * floor) * p_policy,
so every candidate keeps support for offline evaluation (K * floor is capped at
:data:`MAX_FLOOR_MASS`; the floor itself at :data:`MAX_FLOOR`).

Blending model and priors (``prior_blend``), with w = n / (n + prior_blend_n0) and n the
prior's effective impressions:

``mix``       w * model + (1 - w) * prior_mean: the model knows little about an artwork with
              few impressions, so its prior scores it; as its data grows the model takes over.
``residual``  (the default) model + w * (prior_mean - model_mean), model_mean the model's mean
              score on the artwork (the bundle carries it): the artwork's record corrects the
              model's level for the artwork as its data grows, and the model's per-member
              differences stay. A model that learned the catalog is left as it is; one that
              learned little of it ranks the artworks by their records, as the non-contextual
              bandit would. An artwork without a model mean (launched after the bundle's day)
              takes its row's score as the model's level: (1 - w) * model + w * prior_mean.
``prior_blend_n0`` = 0 switches the blend off under either rule (the model's score alone).

Serving's real-time updates (each impression, then its reward) move
``prior_alpha``/``prior_beta``/``prior_n`` and thereby the score.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

import numpy as np
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass

PolicyName = Literal["squarecb", "thompson", "egreedy", "greedy", "random", "beta_ts"]
POLICIES: tuple[str, ...] = get_args(PolicyName)

MAX_FLOOR = 0.125
"""Largest floor one may configure: 8 candidates at 0.125 would leave nothing to exploit."""
MAX_FLOOR_MASS = 0.5
"""Cap on K * floor when a page is scored, so a title with many candidates still exploits."""

# Each setting's type carries its rule and meaning; keyart.config.Settings uses the same
# types for its flat fields, so a value is accepted by both or by neither.
Floor = Annotated[float, Field(
    ge=0, le=MAX_FLOOR,
    description=f"Minimum probability of every candidate (at most {MAX_FLOOR}); on a title with K "
    f"candidates it shrinks to {MAX_FLOOR_MASS} / K where K * floor would pass {MAX_FLOOR_MASS}. "
    "Greedy ignores it.")]
Gamma = Annotated[float, Field(gt=0, description="SquareCB / inverse-gap-weighting learning rate, per unit of "
                                "gap (per standard error with gap_unit stderr, per unit of score with score).")]
GapUnit = Annotated[Literal["stderr", "score"], Field(
    description="squarecb: measure an arm's gap to the best in standard errors of the difference (stderr: "
    "exploration fades as the arm's data grows) or in score (score: a fixed rate).")]
Epsilon = Annotated[float, Field(ge=0, le=1, description="egreedy: probability spread uniformly over the candidates.")]
BlendN0 = Annotated[float, Field(
    ge=0, description="Model-vs-record blend, w = n / (n + n0) with n the artwork's effective impressions: under "
    "mix the prior mean's weight (1 - w) grows as the artwork's data shrinks below n0; under residual n0 is the "
    "pseudo-impressions the model's level counts against the artwork's record. 0 switches the blend off (the model alone).")]
BlendRule = Annotated[Literal["mix", "residual"], Field(
    description="How the model's score and the artwork's Beta posterior combine: mix (w * model + (1 - w) * "
    "prior mean, w = n / (n + n0): the model takes over as the artwork's data grows) or residual (model + "
    "w * (prior mean - the model's mean score on the artwork): the artwork's observed rate corrects the "
    "model's level as its data grows, the model's per-member differences are kept).")]

SETTINGS_FIELDS = {"name": "policy", "floor": "policy_floor", "gamma": "squarecb_gamma",
                   "gap_unit": "squarecb_gap_unit", "epsilon": "egreedy_epsilon", "prior_blend_n0": "prior_blend_n0",
                   "prior_blend": "prior_blend"}
"""PolicyConfig field -> the flat keyart.config.Settings field (env KEYART_<FIELD>) that sets it."""


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class PolicyConfig:
    """Validated policy settings: the one place their defaults and rules are written."""

    name: PolicyName = "squarecb"
    floor: Floor = 0.002
    gamma: Gamma = 50.0
    gap_unit: GapUnit = "stderr"
    epsilon: Epsilon = 0.1
    prior_blend_n0: BlendN0 = 50.0
    prior_blend: BlendRule = "residual"
    thompson_samples: Annotated[int, Field(ge=1, description="Monte Carlo draws per title for thompson and beta_ts.")] = 1024

    @classmethod
    def from_settings(cls, s: Any) -> PolicyConfig:
        return cls(**{field: getattr(s, setting) for field, setting in SETTINGS_FIELDS.items()})


def _check_page(n: int, offsets: np.ndarray) -> np.ndarray:
    offsets = np.asarray(offsets, dtype=np.int64)
    if offsets.ndim != 1 or len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != n:
        raise ValueError(f"offsets must start at 0 and end at {n}, got {offsets[:3]}...{offsets[-1:]}")
    if np.any(np.diff(offsets) < 1):
        raise ValueError("every title needs at least one candidate")
    return offsets


def group_ids(offsets: np.ndarray) -> np.ndarray:
    """Title index of every row: [n]."""
    sizes = np.diff(offsets)
    return np.repeat(np.arange(len(sizes)), sizes)


def group_argmax(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Global row index of the first maximum of each title: [T]."""
    gid = group_ids(offsets)
    gmax = np.maximum.reduceat(values, offsets[:-1])
    is_max = values >= gmax[gid]
    # first True per group: smallest index among maxima
    idx = np.where(is_max, np.arange(len(values)), len(values))
    return np.minimum.reduceat(idx, offsets[:-1])


def blend_scores(model_scores: np.ndarray, prior_alpha: np.ndarray, prior_beta: np.ndarray,
                 prior_n: np.ndarray, n0: float, model_mean: np.ndarray | None = None) -> np.ndarray:
    """The score every policy ranks by: [n]. w = n / (n + n0), n the artwork's effective impressions.

    Without ``model_mean`` (rule ``mix``): w * model + (1 - w) * prior mean.

    With ``model_mean`` (rule ``residual``; [n], the model's mean score over the artwork's candidate
    rows of a day, NaN where unknown): model + w * (prior mean - model_mean). The artwork's rate is
    estimated as a Beta-binomial posterior whose prior is the model's mean (n0 pseudo-impressions)
    and whose data is the artwork's record: (n0 * model_mean + n * prior mean) / (n0 + n); each
    member's score is that rate plus the model's difference for the member (model - model_mean).
    A model that knows the catalog keeps its per-member ranking (the correction is ~0 when it is
    calibrated per artwork); one that has learned little is corrected to the artworks' observed
    rates as they accrue, as a non-contextual bandit would rank them. Where model_mean is NaN
    (an artwork the day's rows did not show, e.g. one launched since), the row's own score stands
    in for it: (1 - w) * model + w * prior mean, so the artwork's record (serving's real-time
    updates included) still moves it as its data grows.

    ``n0`` = 0 switches the blend off under either rule: the model's score alone.
    """
    model_scores = np.asarray(model_scores, dtype=np.float64)
    if n0 <= 0:
        return model_scores.copy()
    a = np.asarray(prior_alpha, dtype=np.float64)
    b = np.asarray(prior_beta, dtype=np.float64)
    prior_mean = a / np.maximum(a + b, 1e-12)
    n = np.maximum(np.asarray(prior_n, dtype=np.float64), 0.0)
    w = n / (n + n0)
    if model_mean is None:
        return w * model_scores + (1.0 - w) * prior_mean
    model_mean = np.asarray(model_mean, dtype=np.float64)
    level = np.where(np.isfinite(model_mean), model_mean, model_scores)
    return np.clip(model_scores + w * (prior_mean - level), 0.0, 1.0)


def residual_means(cfg: PolicyConfig, scores: np.ndarray, keys: np.ndarray) -> np.ndarray | None:
    """The ``model_mean`` to hand :func:`probabilities` for ``scores`` of the rows keyed by artwork
    ``keys``: :func:`artwork_mean_scores` under ``prior_blend`` ``residual``, None (nothing to
    compute) under ``mix``. For callers that value a model on rows they hold whole (evaluation,
    the benchmarks); serving reads the bundle's means instead."""
    return artwork_mean_scores(scores, keys) if cfg.prior_blend == "residual" else None


def artwork_mean_scores(scores: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Every row's artwork's mean score over the rows given: [n] (``keys`` [n] any artwork key).
    What the ``residual`` blend reads as ``model_mean`` (:func:`blend_scores`)."""
    scores = np.asarray(scores, dtype=np.float64)
    if not len(scores):
        return scores.copy()
    _, inverse = np.unique(np.asarray(keys), return_inverse=True)
    inverse = inverse.reshape(-1)
    return (np.bincount(inverse, weights=scores) / np.bincount(inverse))[inverse]


def gap_stderr(scores: np.ndarray, prior_alpha: np.ndarray, prior_beta: np.ndarray, best: np.ndarray,
               gid: np.ndarray) -> np.ndarray:
    """Standard error of s_best - s_a for every row [n]: sqrt(v_best / m_best + v_a / m_a).

    v = s (1 - s) is the Bernoulli variance at the score, m = alpha + beta (at least 1) the
    Beta posterior's concentration: the effective impressions behind the arm, pseudo-counts
    of its empirical-Bayes prior included.
    """
    q = np.clip(scores, 1e-4, 1.0 - 1e-4)
    m = np.maximum(np.asarray(prior_alpha, dtype=np.float64) + np.asarray(prior_beta, dtype=np.float64), 1.0)
    var = q * (1.0 - q) / m
    return np.sqrt(var + var[best][gid])


def _apply_floor(p: np.ndarray, offsets: np.ndarray, floor: float) -> np.ndarray:
    if floor <= 0:
        return p
    k = np.diff(offsets).astype(np.float64)
    f = np.minimum(floor, MAX_FLOOR_MASS / k)
    fk = np.repeat(f, np.diff(offsets))
    kk = np.repeat(k, np.diff(offsets))
    return fk + (1.0 - kk * fk) * p


def _unique_pages(a: np.ndarray, b: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Titles with identical candidate (a, b) sequences share one estimate.

    Returns (first [U] title index of each distinct sequence, inverse [T] title -> its
    distinct sequence). Offline evaluation values ``beta_ts`` on a day of logs where the
    same title's candidates and priors repeat on every impression: one Monte Carlo per
    distinct title instead of per impression.
    """
    ab = np.ascontiguousarray(np.column_stack([a, b]))
    seen: dict[bytes, int] = {}
    inverse = np.empty(len(offsets) - 1, dtype=np.int64)
    first: list[int] = []
    for t in range(len(offsets) - 1):
        key = ab[offsets[t]:offsets[t + 1]].tobytes()
        u = seen.setdefault(key, len(seen))
        if u == len(first):
            first.append(t)
        inverse[t] = u
    return np.asarray(first, dtype=np.int64), inverse


def _thompson_argmax_probs(a: np.ndarray, b: np.ndarray, offsets: np.ndarray, samples: int,
                           rng: np.random.Generator, max_draws: int = 1 << 22) -> np.ndarray:
    """Monte Carlo P(arm is its title's argmax) [n]. Titles with the same candidate (a, b)
    get the same estimate (computed once); distinct titles are processed in chunks so at
    most ``max_draws`` Beta draws are held at once (a day of logs fits in memory)."""
    first, inverse = _unique_pages(a, b, offsets)
    if len(first) < len(offsets) - 1:
        sizes = np.diff(offsets)
        u_sizes = sizes[first]
        u_offsets = np.r_[0, np.cumsum(u_sizes)]
        u_rows = np.concatenate([np.arange(offsets[t], offsets[t + 1]) for t in first])
        pu = _thompson_argmax_probs(a[u_rows], b[u_rows], u_offsets, samples, rng, max_draws)
        gid = group_ids(offsets)
        within = np.arange(len(a)) - offsets[gid]
        return pu[u_offsets[inverse[gid]] + within]
    n_titles = len(offsets) - 1
    rows_per_chunk = max(1, max_draws // samples)
    p = np.empty(len(a))
    t0 = 0
    while t0 < n_titles:
        # as many whole titles as fit in rows_per_chunk (at least one)
        t1 = int(np.searchsorted(offsets, offsets[t0] + rows_per_chunk, side="right")) - 1
        t1 = min(max(t1, t0 + 1), n_titles)
        lo, hi = int(offsets[t0]), int(offsets[t1])
        sub = offsets[t0:t1 + 1] - lo
        draws = rng.beta(np.maximum(a[lo:hi], 1e-6), np.maximum(b[lo:hi], 1e-6), size=(samples, hi - lo))
        gid = group_ids(sub)
        gmax = np.maximum.reduceat(draws, sub[:-1], axis=1)
        wins = (draws >= gmax[:, gid]).mean(axis=0)
        # ties (measure zero) would double count; normalise per title
        p[lo:hi] = wins / np.add.reduceat(wins, sub[:-1])[gid]
        t0 = t1
    return p


def probabilities(cfg: PolicyConfig, model_scores: np.ndarray, offsets: np.ndarray,
                  prior_alpha: np.ndarray, prior_beta: np.ndarray, prior_n: np.ndarray,
                  rng: np.random.Generator | None = None, model_mean: np.ndarray | None = None) -> np.ndarray:
    """Probability of showing every candidate row: [n], summing to 1 within each title.

    Parameters
    ----------
    model_scores : [n] predicted quality-play probability per candidate row.
    offsets : [T + 1] row offsets of the titles.
    prior_alpha, prior_beta, prior_n : [n] Beta prior of each candidate and its effective
        impressions (the blend weight of the model grows with n).
    rng : needed by the sampled policies (thompson, beta_ts).
    model_mean : [n] the model's mean score on each candidate's artwork (:func:`blend_scores`),
        read with ``prior_blend`` ``residual``; None there means unknown everywhere (each row's
        own score stands in, :func:`blend_scores`).
    """
    scores = np.asarray(model_scores, dtype=np.float64)
    n = len(scores)
    offsets = _check_page(n, offsets)
    sizes = np.diff(offsets)
    gid = group_ids(offsets)
    k = sizes[gid].astype(np.float64)

    if cfg.name == "random":
        return 1.0 / k
    if cfg.prior_blend == "residual":
        mean = np.full(n, np.nan) if model_mean is None else model_mean
        s = blend_scores(scores, prior_alpha, prior_beta, prior_n, cfg.prior_blend_n0, mean)
    else:
        s = blend_scores(scores, prior_alpha, prior_beta, prior_n, cfg.prior_blend_n0)
    best = group_argmax(s, offsets)
    is_best = np.zeros(n, dtype=bool)
    is_best[best] = True
    if cfg.name == "greedy":
        return is_best.astype(np.float64)
    if cfg.name == "egreedy":
        p = cfg.epsilon / k + (1.0 - cfg.epsilon) * is_best
    elif cfg.name == "squarecb":
        gap = s[best][gid] - s
        if cfg.gap_unit == "stderr":
            gap = gap / gap_stderr(s, prior_alpha, prior_beta, best, gid)
        p = np.where(is_best, 0.0, 1.0 / (k + cfg.gamma * gap))
        rest = 1.0 - np.add.reduceat(p, offsets[:-1])
        p[best] = rest
    elif cfg.name in ("thompson", "beta_ts"):
        if rng is None:
            raise ValueError(f"policy {cfg.name} samples: pass rng")
        if cfg.name == "thompson":
            m = np.maximum(np.asarray(prior_n, dtype=np.float64), 0.0) + max(cfg.prior_blend_n0, 1.0)
            a, b = s * m, (1.0 - s) * m
        else:
            a, b = np.asarray(prior_alpha, dtype=np.float64), np.asarray(prior_beta, dtype=np.float64)
        p = _thompson_argmax_probs(a, b, offsets, cfg.thompson_samples, rng)
    else:  # pragma: no cover - guarded by PolicyConfig
        raise ValueError(cfg.name)
    return _apply_floor(p, offsets, cfg.floor)


def draw(probs: np.ndarray, offsets: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw one row per title from ``probs``: (chosen global row index [T], its propensity [T])."""
    probs = np.asarray(probs, dtype=np.float64)
    offsets = _check_page(len(probs), offsets)
    cum = np.cumsum(probs)
    start = np.concatenate([[0.0], cum])[offsets[:-1]]
    totals = np.add.reduceat(probs, offsets[:-1])
    u = start + rng.random(len(offsets) - 1) * totals
    idx = np.searchsorted(cum, u, side="right")
    idx = np.clip(idx, offsets[:-1], offsets[1:] - 1)
    return idx, probs[idx] / totals
