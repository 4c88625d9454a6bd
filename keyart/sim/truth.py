"""The ground-truth play model: P(play), minutes watched, and the exact quality-play rate.

For member m, artwork a of title t and context c::

    logit P(play) = b0 + appeal_t
                  + w_g  * theta_m . g_t            (title genre match)
                  + w_tc * sum_{c in cast_t} tau_mc  (title cast match)
                  + w_tone * theta_m[tone_a]        (ARTWORK: tone speaks to the member)
                  + w_cast * sum_{c in cast_a} tau_mc  (ARTWORK: shows a favourite actor)
                  + w_kids * kids_m * [tone_a in {family, animation}]
                  + w_kids_text * kids_m * text_heavy_a      (kids do not read posters)
                  + w_cb * clickbait_a + idio_a + flags_a . F[:, device]
                  + w_pos * position + w_row * page_row
                  + device_c + w_hour * cos(2 pi (hour - 21) / 24) + w_wkd * weekend

Minutes given a play are a mixture, capped at the title's runtime R_t: with probability
``p_ab = sigmoid(a0 + a_int * interest_mt + a_cb * clickbait_a)`` the member abandons
(minutes ~ Exponential(mean 5)), otherwise minutes ~ Weibull(k, lambda = s * R_t), where
``interest_mt = theta_m . g_t + 0.3 * sum_{c in cast_t} tau_mc``. Hence, for q <= R_t::

    P(minutes >= q | play) = p_ab * exp(-q / 5) + (1 - p_ab) * exp(-(q / lambda) ** k)

and 0 for q > R_t. The expected quality play is P(play) * P(minutes >= q | play).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import cached_property

import numpy as np

from keyart.contracts import DEVICES
from keyart.sim.catalog import Catalog
from keyart.sim.names import ART_FLAGS, KIDS_GENRES, G
from keyart.sim.population import Members

_TEXT_HEAVY = ART_FLAGS.index("text_heavy")


@dataclass(frozen=True)
class TruthParams:
    """Coefficients of the ground-truth model (see the module docstring)."""

    intercept: float = -5.0
    w_title_genre: float = 3.0
    w_title_cast: float = 0.4
    w_tone: float = 3.5
    w_cast: float = 1.2
    w_kids_tone: float = 1.5
    w_kids_text: float = -0.8
    w_clickbait: float = 0.6
    w_position: float = -0.06
    w_row: float = -0.2
    device: tuple[float, ...] = (0.15, -0.10, -0.15, 0.0)  # tv, mobile, web, tablet
    # flag x device (rows closeup, text_heavy, group; columns tv, mobile, web, tablet)
    flag_device: tuple[tuple[float, ...], ...] = (
        (0.00, 0.25, 0.05, 0.20),
        (0.10, -0.30, 0.00, -0.10),
        (0.05, -0.10, 0.00, 0.00),
    )
    w_hour: float = 0.35
    peak_hour: float = 21.0
    w_weekend: float = 0.10
    abandon_intercept: float = 0.3
    abandon_interest: float = -3.0
    abandon_clickbait: float = 2.5
    abandon_mean_minutes: float = 5.0
    engaged_shape: float = 1.6
    engaged_scale: float = 0.8

    def to_dict(self) -> dict:
        return asdict(self)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def device_index(device) -> np.ndarray:
    """Device codes (indices into keyart.contracts.DEVICES) from names or codes."""
    arr = np.asarray(device)
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64)
    lookup = {d: i for i, d in enumerate(DEVICES)}
    return np.vectorize(lookup.__getitem__, otypes=[np.int64])(arr)


@dataclass
class GroundTruth:
    """Vectorised ground truth over a catalog and members. Never read by the pipeline."""

    catalog: Catalog
    members: Members
    params: TruthParams = field(default_factory=TruthParams)

    # ---- cached member x title terms -----------------------------------------------------
    @cached_property
    def genre_match(self) -> np.ndarray:
        """[M, T] theta_m . g_t."""
        return (self.members.theta @ self.catalog.title_genre_w.T).astype(np.float32)

    @cached_property
    def cast_match(self) -> np.ndarray:
        """[M, T] sum of the member's actor taste over the title's cast."""
        return (self.members.tau @ self.catalog.title_cast_m.T).astype(np.float32)

    @cached_property
    def _kids_tone(self) -> np.ndarray:
        return np.isin(self.catalog.art_tone, [G[g] for g in KIDS_GENRES])

    @cached_property
    def _flag_effect(self) -> np.ndarray:
        """[N, len(DEVICES)] flag x device effect per artwork."""
        return self.catalog.art_flags.astype(np.float64) @ np.asarray(self.params.flag_device)

    def title_logit(self, member_idx: np.ndarray, title_idx: np.ndarray) -> np.ndarray:
        """Title part of the play logit (no artwork, no context)."""
        p, c = self.params, self.catalog
        return (
            p.intercept + c.title_appeal[title_idx]
            + p.w_title_genre * self.genre_match[member_idx, title_idx]
            + p.w_title_cast * self.cast_match[member_idx, title_idx]
        )

    def artwork_effect(self, member_idx: np.ndarray, art_idx: np.ndarray, device: np.ndarray) -> np.ndarray:
        """The artwork's contribution to the play logit (what personalization can move)."""
        p, c, m = self.params, self.catalog, self.members
        cast = c.art_cast[art_idx]  # [..., C]
        taste = m.tau[np.expand_dims(member_idx, -1), np.clip(cast, 0, None)]
        cast_term = np.where(cast >= 0, taste, 0.0).sum(-1)
        return (
            p.w_tone * m.theta[member_idx, c.art_tone[art_idx]]
            + p.w_cast * cast_term
            + p.w_kids_tone * (m.is_kids[member_idx] & self._kids_tone[art_idx])
            + p.w_kids_text * (m.is_kids[member_idx] & (c.art_flags[art_idx, _TEXT_HEAVY] > 0))
            + p.w_clickbait * c.art_clickbait[art_idx]
            + c.art_idio[art_idx]
            + self._flag_effect[art_idx, device]
        )

    def p_play(self, member_idx, art_idx, device, local_hour, day_of_week, page_row, position) -> np.ndarray:
        """P(play | member, artwork, context). All arguments broadcast together."""
        p = self.params
        member_idx = np.asarray(member_idx)
        art_idx = np.asarray(art_idx)
        dev = device_index(device)
        hour = np.asarray(local_hour, dtype=np.float64)
        title_idx = self.catalog.art_title[art_idx]
        logit = (
            self.title_logit(member_idx, title_idx)
            + self.artwork_effect(member_idx, art_idx, dev)
            + p.w_position * np.asarray(position) + p.w_row * np.asarray(page_row)
            + np.asarray(p.device)[dev]
            + p.w_hour * np.cos(2.0 * np.pi * (hour - p.peak_hour) / 24.0)
            + p.w_weekend * (np.asarray(day_of_week) >= 5)
        )
        return sigmoid(logit)

    def p_abandon(self, member_idx, art_idx) -> np.ndarray:
        """P(the member abandons early | play): low for genuine interest, high for clickbait."""
        p, c = self.params, self.catalog
        title_idx = c.art_title[art_idx]
        interest = self.genre_match[member_idx, title_idx] + 0.3 * self.cast_match[member_idx, title_idx]
        return sigmoid(p.abandon_intercept + p.abandon_interest * interest + p.abandon_clickbait * c.art_clickbait[art_idx])

    def p_minutes_at_least(self, member_idx, art_idx, quality_minutes: float) -> np.ndarray:
        """Exact P(minutes >= quality_minutes | play), closed form."""
        p, c = self.params, self.catalog
        q = float(quality_minutes)
        runtime = c.title_runtime[c.art_title[np.asarray(art_idx)]]
        lam = p.engaged_scale * runtime
        ab = self.p_abandon(member_idx, art_idx)
        surv = ab * np.exp(-q / p.abandon_mean_minutes) + (1.0 - ab) * np.exp(-((q / lam) ** p.engaged_shape))
        return np.where(q <= runtime, surv, 0.0)

    def expected_quality_play(
        self, member_idx, art_idx, device, local_hour, day_of_week, page_row, position, quality_minutes: float = 15.0
    ) -> np.ndarray:
        """P(play) * P(minutes >= quality_minutes | play). All arguments broadcast together."""
        return self.p_play(member_idx, art_idx, device, local_hour, day_of_week, page_row, position) * self.p_minutes_at_least(
            member_idx, art_idx, quality_minutes
        )

    def sample_minutes(self, rng: np.random.Generator, member_idx, art_idx=None, title_idx=None) -> np.ndarray:
        """Draw minutes watched for plays (``art_idx`` None = organic play of ``title_idx``)."""
        p, c = self.params, self.catalog
        member_idx = np.asarray(member_idx)
        if art_idx is not None:
            title_idx = c.art_title[np.asarray(art_idx)]
            ab = self.p_abandon(member_idx, art_idx)
        else:
            title_idx = np.asarray(title_idx)
            interest = self.genre_match[member_idx, title_idx] + 0.3 * self.cast_match[member_idx, title_idx]
            ab = sigmoid(p.abandon_intercept + p.abandon_interest * interest)
        runtime = c.title_runtime[title_idx]
        n = member_idx.shape
        quit_ = rng.random(n) < ab
        early = rng.exponential(p.abandon_mean_minutes, n)
        full = p.engaged_scale * runtime * rng.weibull(p.engaged_shape, n)
        minutes = np.minimum(np.where(quit_, early, full), runtime)
        return np.floor(minutes * 10.0) / 10.0  # floor keeps minutes >= q exact for q on 0.1 steps
