"""Signed event ids, reward intake and the online Beta priors the policy uses the same day.

Event id (at most 128 characters of contracts.ID_PATTERN)::

    1.<decision ms, base 36>.<nonce>.<segment a|k>.<signature>.<artwork_id>

``signature`` is HMAC-SHA256 with ``serve_event_secret`` over everything else, truncated
to 128 bits, base64url. So a reward names, unforgeably, the artwork that was shown, the
member's prior segment and the decision time; serving needs no per-decision state.

Rewards (:class:`RewardBook`)
    refused: malformed (422), forged / signed with another key (403), older than
    ``reward_max_age`` (410; the attribution window plus an hour), duplicate (409). The
    de-duplication set holds only ids younger than ``reward_max_age`` (older ones are
    refused anyway), so its memory is bounded by the reward rate times that age; it is
    rebuilt at start from the reward log, so a restart does not re-admit a duplicate.
    An accepted reward is fsynced to ``<lake>/raw/rewards/ds=D/`` before it is
    acknowledged, then moves the online priors of (artwork, 'all') and (artwork, member
    segment) as below.

Online priors (:class:`OnlinePriors`)
    deltas per decision day on top of the bundle's priors. Every logged decision counts
    as an impression without reward (beta += 1, n += 1); a reward for it then turns that
    failure into a success (alpha += reward, beta -= reward). So an artwork's online mean
    is its take rate on the impressions it actually got: counting rewards alone would raise
    the mean of whatever is shown most, and the policy would keep showing it. A reward for
    an impression this process did not count (decided before a restart, or by another
    worker) counts itself: alpha += reward, beta += 1 - reward, n += 1. Deltas are kept for
    the newest decision day seen and the three before it. A bundle whose
    manifest names its priors day (``priors_ds`` or ``ds``) absorbs the deltas of that day
    and before; without it, only today's deltas apply. Deltas are per process: with
    several workers each learns from the decisions it makes and the rewards it receives
    (the daily priors job reconciles them all).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import itertools
import os
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import orjson

from keyart import feature_spec
from keyart.contracts import ID_PATTERN
from keyart.serving.tables import ArtworkTable

VERSION = "1"
SEGMENT_CODES = {feature_spec.member_segment(0): "a", feature_spec.member_segment(1): "k"}
CODE_SEGMENTS = {v: k for k, v in SEGMENT_CODES.items()}
_ID_RE = re.compile(ID_PATTERN)


def _b36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if n == 0:
            return out


class RewardRefused(Exception):
    """A reward that is not accepted; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


@dataclass(frozen=True)
class EventRef:
    """What a verified event id says."""

    event_id: str
    ts_ms: int
    segment: str
    artwork_id: str
    digest: bytes


class EventSigner:
    """Issues and verifies HMAC-signed event ids."""

    def __init__(self, secret: str):
        self._key = secret.encode()
        self._nonce_prefix = base64.b32encode(os.urandom(5)).decode().lower()
        self._counter = itertools.count()

    def _sign(self, payload: str) -> tuple[str, bytes]:
        digest = hmac.digest(self._key, payload.encode(), hashlib.sha256)[:16]
        return base64.urlsafe_b64encode(digest).decode().rstrip("="), digest

    def issue(self, ts_ms: int, segment: str, artwork_id: str) -> str:
        """A new event id for showing ``artwork_id`` at ``ts_ms`` to a member of ``segment``."""
        return self.issue_many(ts_ms, segment, [artwork_id])[0]

    def issue_many(self, ts_ms: int, segment: str, artwork_ids: list[str]) -> list[str]:
        """Event ids for the decisions of one page (same time and member)."""
        stamp = f"{VERSION}.{_b36(ts_ms)}.{self._nonce_prefix}"
        code = SEGMENT_CODES[segment]
        out = []
        for artwork_id in artwork_ids:
            head = f"{stamp}{next(self._counter):x}.{code}"
            sig, _ = self._sign(f"{head}.{artwork_id}")
            event_id = f"{head}.{sig}.{artwork_id}"
            if len(event_id) > 128:
                raise ValueError(f"artwork id {artwork_id[:40]!r}... too long for an event id")
            out.append(event_id)
        return out

    def verify(self, event_id: str) -> EventRef:
        """Parse and check ``event_id``; :class:`RewardRefused` if malformed or forged."""
        if not isinstance(event_id, str) or not _ID_RE.match(event_id):
            raise RewardRefused(422, "malformed", "event_id is not a valid id")
        parts = event_id.split(".", 5)
        if len(parts) != 6 or parts[0] != VERSION or parts[3] not in CODE_SEGMENTS or not parts[5]:
            raise RewardRefused(422, "malformed", "event_id was not issued by this service (bad format)")
        try:
            ts_ms = int(parts[1], 36)
        except ValueError:
            raise RewardRefused(422, "malformed", "event_id has a bad timestamp") from None
        sig, digest = self._sign(".".join(parts[:4] + parts[5:]))
        if not hmac.compare_digest(sig, parts[4]):
            raise RewardRefused(403, "forged", "event_id signature does not verify (forged or altered)")
        return EventRef(event_id, ts_ms, CODE_SEGMENTS[parts[3]], parts[5], digest)


class RecentIds:
    """Digests of accepted event ids younger than ``max_age_s``, bucketed by hour for pruning."""

    def __init__(self, max_age_s: float):
        self.max_age_s = max_age_s
        self._buckets: dict[int, set[bytes]] = {}

    def __len__(self) -> int:
        return sum(len(b) for b in self._buckets.values())

    def add(self, digest: bytes, ts_ms: int) -> bool:
        """Remember ``digest``; False if it was already there."""
        bucket = self._buckets.setdefault(ts_ms // 3_600_000, set())
        if digest in bucket:
            return False
        bucket.add(digest)
        return True

    def discard(self, digest: bytes, ts_ms: int) -> None:
        self._buckets.get(ts_ms // 3_600_000, set()).discard(digest)

    def prune(self, now_ms: int) -> None:
        oldest = (now_ms - int(self.max_age_s * 1000)) // 3_600_000
        for hour in [h for h in self._buckets if h < oldest]:
            del self._buckets[hour]


class OnlinePriors:
    """Impression and reward deltas per (decision ds, artwork, segment) over the bundle's Beta priors."""

    def __init__(self) -> None:
        self._deltas: dict[str, dict[tuple[str, str], list[float]]] = {}
        self._lock = threading.Lock()
        self._table: ArtworkTable | None = None
        self._priors_ds: str | None = None
        self.alpha = self.beta = self.n = np.zeros(0)

    def _applies(self, ds: str) -> bool:
        if self._priors_ds is not None:
            return ds > self._priors_ds
        return ds == dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")

    def bind(self, table: ArtworkTable, priors_ds: str | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The policy's (alpha, beta, n) arrays [N] for a newly loaded bundle; later events update them."""
        with self._lock:
            alpha, beta, n = table.policy_alpha.copy(), table.policy_beta.copy(), table.policy_n.copy()
            self._table, self._priors_ds = table, priors_ds
            for ds, deltas in self._deltas.items():
                if not self._applies(ds):
                    continue
                for (artwork_id, segment), (da, db, dn) in deltas.items():
                    i = table.index.get(artwork_id)
                    if i is not None and segment == feature_spec.SEGMENT_ALL:
                        alpha[i] += da
                        beta[i] += db
                        n[i] += dn
            self.alpha, self.beta, self.n = alpha, beta, n
            return alpha, beta, n

    def _add_delta(self, ds: str, artwork_id: str, segment: str, da: float, db: float, dn: float) -> int | None:
        """Add (da, db, dn) to the deltas of (artwork, 'all') and (artwork, segment) of day
        ``ds``; return the artwork's row in the bound table, if any (lock held)."""
        day = self._deltas.setdefault(ds, {})
        for seg in {feature_spec.SEGMENT_ALL, segment}:
            d = day.setdefault((artwork_id, seg), [0.0, 0.0, 0.0])
            d[0] += da
            d[1] += db
            d[2] += dn
        return self._table.index.get(artwork_id) if self._table is not None else None

    def _move(self, ds: str, artwork_id: str, segment: str, da: float, db: float, dn: float) -> None:
        """The deltas and, if day ``ds`` applies to the bound bundle, the policy's arrays (lock held)."""
        i = self._add_delta(ds, artwork_id, segment, da, db, dn)
        if i is not None and self._applies(ds):
            self.alpha[i] += da
            self.beta[i] += db
            self.n[i] += dn

    def _prune(self) -> None:
        """Keep three days before the newest decision day seen (the clock may be a client's)."""
        if len(self._deltas) > 3:
            newest = dt.date.fromisoformat(max(self._deltas))
            keep = (newest - dt.timedelta(days=3)).isoformat()
            for old in [d for d in self._deltas if d < keep]:
                del self._deltas[old]

    def record_impressions(self, ds: str, artwork_ids: Iterable[str], segment: str) -> None:
        """Logged decisions of day ``ds`` for a member of ``segment``: each a failure until rewarded."""
        with self._lock:
            rows = [i for a in artwork_ids if (i := self._add_delta(ds, a, segment, 0.0, 1.0, 1.0)) is not None]
            if rows and self._applies(ds):  # one vectorised update per page
                np.add.at(self.beta, rows, 1.0)
                np.add.at(self.n, rows, 1.0)
            self._prune()

    def record(self, ds: str, artwork_id: str, segment: str, reward: int) -> None:
        """A reward for an impression of ``artwork_id`` decided on day ``ds`` (member of ``segment``)."""
        with self._lock:
            pending = self._deltas.get(ds, {}).get((artwork_id, feature_spec.SEGMENT_ALL), (0.0, 0.0, 0.0))[1]
            if pending >= 1.0:  # this process counted the impression as a failure: convert it
                self._move(ds, artwork_id, segment, float(reward), -float(reward), 0.0)
            else:
                self._move(ds, artwork_id, segment, float(reward), 1.0 - reward, 1.0)
            self._prune()

    def delta(self, artwork_id: str, segment: str) -> tuple[float, float, float]:
        """Sum of the deltas that apply to (artwork, segment)."""
        with self._lock:
            tot = [0.0, 0.0, 0.0]
            for ds, deltas in self._deltas.items():
                if self._applies(ds):
                    for k, v in enumerate(deltas.get((artwork_id, segment), ())):
                        tot[k] += v
            return (tot[0], tot[1], tot[2])


def _utc_ds(ts_ms: int) -> str:
    return dt.datetime.fromtimestamp(ts_ms / 1000, dt.UTC).strftime("%Y-%m-%d")


class RewardBook:
    """Validates rewards, de-duplicates them, logs them and feeds the online priors."""

    def __init__(self, signer: EventSigner, priors: OnlinePriors, max_age_s: float):
        self.signer = signer
        self.priors = priors
        self.seen = RecentIds(max_age_s)
        self.max_age_s = max_age_s

    def admit(self, event_id: str, now_ms: int | None = None) -> EventRef:
        """Verify and reserve ``event_id``; :class:`RewardRefused` if it must be refused."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        ref = self.signer.verify(event_id)
        if ref.ts_ms < now_ms - self.max_age_s * 1000:
            raise RewardRefused(410, "expired", f"event is older than the reward window ({self.max_age_s / 3600:g} h)")
        if ref.ts_ms > now_ms + 300_000:
            raise RewardRefused(422, "malformed", "event_id is dated in the future")
        self.seen.prune(now_ms)
        if not self.seen.add(ref.digest, ref.ts_ms):
            raise RewardRefused(409, "duplicate", "a reward for this event_id was already recorded; ignored")
        return ref

    def release(self, ref: EventRef) -> None:
        """Forget a reservation whose reward could not be logged (the client may retry)."""
        self.seen.discard(ref.digest, ref.ts_ms)

    def record_line(self, ref: EventRef, reward: int, minutes: float, now: dt.datetime) -> tuple[str, bytes]:
        """(ds, JSON line) of the reward log for an admitted reward."""
        row = {"event_id": ref.event_id, "ts": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
               "impression_ts": dt.datetime.fromtimestamp(ref.ts_ms / 1000, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
               "artwork_id": ref.artwork_id, "segment": ref.segment, "reward": int(reward), "minutes": float(minutes)}
        return now.strftime("%Y-%m-%d"), orjson.dumps(row) + b"\n"

    def apply(self, ref: EventRef, reward: int) -> None:
        """Move the online priors of the impression's decision day."""
        self.priors.record(_utc_ds(ref.ts_ms), ref.artwork_id, ref.segment, reward)

    def replay(self, lines: Iterable[tuple[str, bytes]], now_ms: int | None = None) -> int:
        """Re-admit logged rewards at start-up (de-duplication and priors); returns how many."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        count = 0
        for _ds, line in lines:
            try:
                row = orjson.loads(line)
                ref = self.signer.verify(row["event_id"])
            except (orjson.JSONDecodeError, KeyError, TypeError, RewardRefused):
                continue
            if ref.ts_ms >= now_ms - self.max_age_s * 1000 and not self.seen.add(ref.digest, ref.ts_ms):
                continue
            self.apply(ref, int(row.get("reward", 0)))
            count += 1
        return count
