"""The online arms of ``keyart bench loop`` and their valuation from ground truth (no Spark).

Both arms learn per event on the day's visits in time order: every slot of a page is one
event; the arm draws an artwork from its own distribution, observes a simulated quality
play (Bernoulli of the ground-truth expected quality play of the shown artwork) at once,
and updates. Decisions are valued exactly with :meth:`keyart.sim.world.World.expected_value`.

``NonContextualArm``  Beta-Thompson per (title, artwork): :mod:`keyart.policy`'s
                      ``beta_ts`` (with its floor) on the arm's own Beta counts, starting
                      from ``keyart.feature_spec.DEFAULT_PRIOR``.
``VWArm``             Vowpal Wabbit ``--cb_explore_adf --squarecb``: shared features are the
                      member's ``genre:``/``cast:`` affinities (a member snapshot) and the
                      request context; action features the artwork's tags and its id.
                      Learns with cost = -reward and the probability it logged.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from keyart import feature_spec, policy
from keyart.feature_spec import DEVICES

VW_ARGS = "--cb_explore_adf --squarecb -q UA -q CA -q UI -b 24 --quiet"
"""Shared namespaces U (affinities), C (context); action namespaces A (tags), I (artwork id).
24 hash bits: with the default 18 the U x I pairs collide and VW learns far worse."""


@dataclass
class ArmDay:
    """What an arm did on one day: [V, P] artwork and propensity per slot, and its outcomes."""

    artwork_idx: np.ndarray
    propensity: np.ndarray
    reward: np.ndarray

    @classmethod
    def empty(cls, shape: tuple[int, int]) -> ArmDay:
        """Uninitialised [V, P] arrays for an arm to fill slot by slot."""
        return cls(np.empty(shape, dtype=np.int64), np.empty(shape), np.empty(shape, dtype=np.int8))


def slot_offsets(candidates_row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For one visit's [P, K] candidates: (flat artwork indices [R], offsets [P + 1])."""
    mask = candidates_row >= 0
    return candidates_row[mask], np.r_[0, np.cumsum(mask.sum(-1))]


def day_values(world, visits) -> np.ndarray:
    """[V, P, K] exact expected quality play of every candidate (0 on padding)."""
    return world.candidate_values(visits)


class NonContextualArm:
    """Thompson sampling on per-artwork Beta counts, updated after every event.

    Parameters
    ----------
    n_artworks : size of the catalog (state is indexed by artwork index).
    cfg : the ``beta_ts`` policy settings (floor, samples); ``name`` is forced to beta_ts.
    """

    name = "noncontextual"

    def __init__(self, n_artworks: int, cfg: policy.PolicyConfig | None = None, seed: int = 0):
        self.cfg = replace(cfg or policy.PolicyConfig(), name="beta_ts")
        self.alpha = np.full(n_artworks, feature_spec.DEFAULT_PRIOR[0], dtype=np.float64)
        self.beta = np.full(n_artworks, feature_spec.DEFAULT_PRIOR[1], dtype=np.float64)
        self.n = np.zeros(n_artworks)
        self.rng = np.random.default_rng(seed)

    def run_day(self, world, visits, values: np.ndarray | None = None) -> ArmDay:
        values = day_values(world, visits) if values is None else values
        v, p = visits.titles.shape
        day = ArmDay.empty((v, p))
        art, prop, rew = day.artwork_idx, day.propensity, day.reward
        for i in range(v):
            rows, offsets = slot_offsets(visits.candidates[i])
            probs = policy.probabilities(self.cfg, np.zeros(len(rows)), offsets, self.alpha[rows],
                                         self.beta[rows], self.n[rows], rng=self.rng)
            chosen, propensity = policy.draw(probs, offsets, self.rng)
            a = rows[chosen]
            k = chosen - offsets[:-1]
            r = self.rng.random(p) < values[i, np.arange(p), k]
            self.alpha[a] += r
            self.beta[a] += 1 - r
            self.n[a] += 1
            art[i], prop[i], rew[i] = a, propensity, r
        return day


def _clean(tag: str) -> str:
    """A VW feature name: no spaces, pipes or colons (VW reads ``name:value``)."""
    return tag.replace(" ", "_").replace("|", "_").replace(":", "=")


class VWArm:
    """Vowpal Wabbit's contextual bandit learning online per event.

    Parameters
    ----------
    world : the simulated world (catalog tags and member profiles; never the ground truth).
    affinity : member index -> list of (tag, value) from a member feature snapshot
        (``genre:<g>`` / ``cast:<c>``); members missing from it have no affinities.
    args : VW command line (``--cb_explore_adf --squarecb`` and interactions).
    """

    name = "vw"

    def __init__(self, world, affinity: dict[int, list[tuple[str, float]]], args: str = VW_ARGS, seed: int = 0):
        import vowpalwabbit

        self.args = f"{args} --random_seed {int(seed)}"
        self.vw = vowpalwabbit.Workspace(self.args)
        cat = world.catalog
        self._actions = [
            f"|A {' '.join(_clean(t) for t in cat.art_tags[a])} |I {_clean(cat.art_ids[a])}"
            for a in range(cat.n_artworks)
        ]
        self._kids = world.members.is_kids
        self._user: dict[int, str] = {
            m: " ".join(f"{_clean(t)}:{float(x):.5g}" for t, x in tags if x > 0) for m, tags in affinity.items()
        }
        self.rng = np.random.default_rng(seed)
        self.events = 0

    def _shared(self, m: int, device: int, hour: int, dow: int, row: int, pos: int) -> str:
        kids = "kids" if self._kids[m] else "adult"
        return (f"shared |U {self._user.get(m, '')} |C {kids} dev={DEVICES[device]} hour={hour} "
                f"weekend={int(dow >= 5)} row={row} pos={pos}")

    def run_day(self, world, visits, values: np.ndarray | None = None) -> ArmDay:
        values = day_values(world, visits) if values is None else values
        v, p = visits.titles.shape
        day = ArmDay.empty((v, p))
        art, prop, rew = day.artwork_idx, day.propensity, day.reward
        member, device = visits.member_idx.tolist(), visits.device.tolist()
        hour, dow = visits.local_hour.tolist(), visits.day_of_week.tolist()
        rows_, pos_ = visits.page_row.tolist(), visits.position.tolist()
        uniform = self.rng.random((v, p))
        outcome = self.rng.random((v, p))
        for i in range(v):
            for j in range(p):
                cands = visits.candidates[i, j]
                cands = cands[cands >= 0].tolist()
                shared = self._shared(member[i], device[i], hour[i], dow[i], rows_[j], pos_[j])
                actions = [self._actions[a] for a in cands]
                pmf = np.asarray(self.vw.predict([shared, *actions]), dtype=np.float64)
                pmf = pmf / pmf.sum()
                k = min(int(np.searchsorted(np.cumsum(pmf), uniform[i, j], side="right")), len(cands) - 1)
                r = int(outcome[i, j] < values[i, j, k])
                actions[k] = f"0:{-float(r)}:{pmf[k]:.6g} {actions[k]}"
                self.vw.learn([shared, *actions])
                art[i, j], prop[i, j], rew[i, j] = cands[k], pmf[k], r
                self.events += 1
        return day

    def close(self) -> None:
        self.vw.finish()


def lift_capture(value: float, random_value: float, oracle_value: float) -> float:
    """(V - V_random) / (V_oracle - V_random)."""
    gap = oracle_value - random_value
    return float((value - random_value) / gap) if gap > 0 else float("nan")


def summarize(values: list[float]) -> dict[str, Any]:
    """Mean, min and max over seeds."""
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "min": float(arr.min()), "max": float(arr.max())}
