"""Signed event ids, reward intake and the online Beta priors the policy uses the same day.

Event id (at most 128 characters of contracts.ID_PATTERN)::

    1.<decision ms, base 36>.<nonce>.<segment a|k>.<signature>.<artwork_id>

``signature`` is HMAC-SHA256 with ``serve_event_secret`` over everything else, truncated
to 128 bits, base64url. So a reward names, unforgeably, the artwork that was shown, the
member's prior segment and the decision time; serving needs no per-decision state to
accept it. The signature is also the event's identity for de-duplication.

Rewards (:class:`RewardBook`)
    refused: malformed (422), forged / signed with another key (403), older than
    ``reward_max_age`` (410; the attribution window plus an hour), duplicate (409). An
    accepted reward is fsynced to ``<lake>/raw/rewards/ds=D/`` before it is acknowledged,
    then counted by the online priors.

Online priors (:class:`OnlinePriors` over an :class:`OnlineState`)
    per decision day, artwork and segment, the evidence of the day's impressions and
    rewards on top of the bundle's priors, by the rules of :class:`LocalState`:

    * importance-weighted as the priors job weighs a day's labels (w = 1 / (K propensity),
      self-normalised, counted as Kish's effective sample size: keyart.ope.weighted_evidence),
      so the online delta estimates the same rate the bundle's prior does and the next
      day's priors continue it instead of jumping;
    * an impression counts as a failure only once its attribution window has closed without
      a reward; until then it is pending, and an open cohort counts its rewards out of the
      share of it whose outcome is known by now (from the learned reward-delay
      distribution), so pending impressions neither lower nor inflate the mean;
    * state is a function of the logged events: a restart folds the impression and reward
      logs of the kept days back in, and with several workers each folds in the others'
      log files (``sync``), rewards de-duplicated by event id, so N workers count what one
      process would.

    A bundle whose manifest names its priors day (``priors_ds`` or ``ds``) gets the deltas
    of the days after it; without one, only the newest decision day's.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import functools
import hashlib
import hmac
import itertools
import os
import re
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import orjson

from keyart import feature_spec
from keyart.contracts import ID_PATTERN
from keyart.ope import weighted_evidence
from keyart.serving.event_log import JsonlLog, unframe
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


_URLSAFE = bytes.maketrans(b"+/", b"-_")


def _b64url(digest: bytes) -> str:
    """URL-safe base64 of a 16-byte digest without its padding (22 characters)."""
    return binascii.b2a_base64(digest, newline=False)[:22].translate(_URLSAFE).decode()


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
        # HMAC state after the key: each signature copies it instead of re-keying (~25% less)
        self._keyed = hmac.new(self._key, digestmod=hashlib.sha256)
        self._nonce_prefix = base64.b32encode(os.urandom(5)).decode().lower()
        self._counter = itertools.count()

    def _digest(self, payload: str) -> bytes:
        mac = self._keyed.copy()
        mac.update(payload.encode())
        return mac.digest()[:16]

    def _sign(self, payload: str) -> tuple[str, bytes]:
        digest = self._digest(payload)
        return _b64url(digest), digest

    def issue(self, ts_ms: int, segment: str, artwork_id: str) -> str:
        """A new event id for showing ``artwork_id`` at ``ts_ms`` to a member of ``segment``."""
        return self.issue_many(ts_ms, segment, [artwork_id])[0]

    def issue_many(self, ts_ms: int, segment: str, artwork_ids: list[str]) -> list[str]:
        """Event ids for the decisions of one page (same time and member)."""
        return self.issue_page(ts_ms, segment, artwork_ids)[0]

    def issue_page(self, ts_ms: int, segment: str, artwork_ids: list[str]) -> tuple[list[str], list[bytes]]:
        """:meth:`issue_many` and the digest of every id (what :class:`Impression` keys on),
        so the caller need not parse the ids it was just given."""
        stamp = f"{VERSION}.{_b36(ts_ms)}.{self._nonce_prefix}"
        code = SEGMENT_CODES[segment]
        counter, keyed, b64 = self._counter, self._keyed, _b64url
        ids, digests = [], []
        for artwork_id in artwork_ids:
            head = f"{stamp}{next(counter):x}.{code}"
            mac = keyed.copy()
            mac.update(f"{head}.{artwork_id}".encode())
            digest = mac.digest()[:16]
            event_id = f"{head}.{b64(digest)}.{artwork_id}"
            if len(event_id) > 128:
                raise ValueError(f"artwork id {artwork_id[:40]!r}... too long for an event id")
            ids.append(event_id)
            digests.append(digest)
        return ids, digests

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


# --- the online priors -------------------------------------------------------------------

Key = tuple[str, str, str]
"""(decision day, artwork_id, segment): what an online delta is kept for."""

DELAY_BINS = 48
"""Cohorts of impressions per attribution window (5 minutes for 4 hours)."""
MIN_DELAY_REWARDS = 200
"""Rewards of closed windows needed before the reward-delay distribution is trusted."""
KEEP_DAYS = 4
"""Decision days kept: the newest seen and the three before it."""
_ZERO = (0.0, 0.0, 0.0)


_DAY_MS = 86_400_000


@functools.lru_cache(maxsize=64)
def _ds_of_day(day: int) -> str:
    return (dt.date(1970, 1, 1) + dt.timedelta(days=day)).isoformat()


def _utc_ds(ts_ms: int) -> str:
    return _ds_of_day(ts_ms // _DAY_MS)


def _ms(ts: str) -> int:
    return int(dt.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp() * 1000)


def _parts(event_id: str) -> tuple[int, str, bytes] | None:
    """(decision ms, segment, digest) of a well-formed event id, without checking its
    signature: for ids read back from serving's own logs (their lines carry a CRC)."""
    parts = event_id.split(".", 5) if isinstance(event_id, str) else ()
    if len(parts) != 6 or parts[0] != VERSION or parts[3] not in CODE_SEGMENTS:
        return None
    try:
        return int(parts[1], 36), CODE_SEGMENTS[parts[3]], base64.urlsafe_b64decode(parts[4] + "==")
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class Impression:
    """A logged decision as the online priors count it. ``weight`` is its importance weight
    1 / (K * propensity) over its K candidates, as the priors job weighs it."""

    digest: bytes
    ts_ms: int
    artwork_id: str
    segment: str
    weight: float

    @classmethod
    def of(cls, event_id: str, artwork_id: str, n_candidates: int, propensity: float) -> Impression | None:
        parsed = _parts(event_id)
        if parsed is None:
            return None
        ts_ms, segment, digest = parsed
        return cls.issued(digest, ts_ms, artwork_id, segment, n_candidates, propensity)

    @classmethod
    def issued(cls, digest: bytes, ts_ms: int, artwork_id: str, segment: str, n_candidates: int,
               propensity: float) -> Impression | None:
        """From what :meth:`EventSigner.issue_page` signed (None, as :meth:`of`, for no
        candidates or a propensity outside (0, 1])."""
        if n_candidates < 1 or not 0.0 < propensity <= 1.0:
            return None
        return cls(digest, ts_ms, artwork_id, segment, 1.0 / (n_candidates * propensity))

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Impression | None:
        """From a line of the impression log (contracts.IMPRESSIONS)."""
        try:
            return cls.of(row["event_id"], row["artwork_id"], len(row["candidates"]), float(row["propensity"]))
        except (KeyError, TypeError, ValueError):
            return None


def young_sums(cohorts: Iterable[tuple[int, Sequence[float]]], share: Callable[[int], float]) -> list[float]:
    """A key's open cohorts ``(cohort, [sw, sww, rewarded sw, rewarded sww])`` summed as
    [sum F w, sum F w^2, rewarded sw, rewarded sww], F = ``share(cohort)`` the share of its
    rewards already arrived (:class:`LocalState` explains the rule)."""
    yw = yww = rw = rww = 0.0
    for b, (w, ww, r1, r2) in cohorts:
        f = share(b)
        yw += f * w
        yww += f * ww
        rw += r1
        rww += r2
    return [yw, yww, rw, rww]


def with_young(sw: float, sww: float, swr: float, young: Sequence[float]) -> tuple[float, float, float]:
    """Closed-cohort sums (sw, sww, swr) plus a key's :func:`young_sums`: an open cohort
    counts at least its rewards so far."""
    return sw + max(young[0], young[2]), sww + max(young[1], young[3]), swr + young[2]


class OnlineState(Protocol):
    """The day's impressions and rewards, counted once however many processes serve.

    :class:`LocalState` keeps them in the process and folds in the logs the other workers
    write to the same directories (:meth:`sync`). A shared store (Redis: one hash of sums
    per key and cohort, ``SET NX`` on the event id for de-duplication) can implement the
    same methods; :class:`OnlinePriors` and :class:`RewardBook` use nothing else.
    Mutators return the keys whose :meth:`evidence` may have changed.
    """

    def add_impressions(self, events: Sequence[Impression]) -> set[Key]:
        """Logged decisions (after their lines are durable)."""
        ...

    def claim(self, ref: EventRef, now_ms: int) -> bool:
        """Reserve a reward's event id; False if a reward for it was already counted."""
        ...

    def release(self, ref: EventRef) -> None:
        """Undo :meth:`claim` (the reward could not be logged)."""
        ...

    def add_reward(self, ref: EventRef, reward: int, ts_ms: int) -> set[Key]:
        """A claimed reward, once logged, received at ``ts_ms``."""
        ...

    def sync(self) -> set[Key]:
        """Fold in what other processes counted since the last call."""
        ...

    def evidence(self, key: Key) -> tuple[float, float, float]:
        """(alpha, beta, n) to add to the prior of ``key`` now."""
        ...

    def keys(self) -> list[Key]:
        ...

    def day(self) -> str:
        """The newest decision day seen (today by the wall clock before any)."""
        ...

    def counts(self, key: Key) -> tuple[int, int]:
        """Impressions and rewards counted for ``key`` (for metrics and tests)."""
        ...


class LogTail:
    """The lines of one JSON-lines log (``<root>/ds=D/<prefix>-*.jsonl``, the format of
    :mod:`keyart.serving.event_log`) appended since the last read, checksums verified;
    the part this process's own ``own`` log wrote is skipped (it was counted when written)."""

    def __init__(self, root: Path, prefix: str, own: JsonlLog | None = None):
        self.root, self.prefix, self.own = Path(root), prefix, own
        self._offsets: dict[Path, int] = {}

    def days(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name[3:] for p in self.root.glob("ds=*") if _DS_RE.fullmatch(p.name[3:]))

    def read(self, ds: str) -> Iterator[bytes]:
        for path in sorted((self.root / f"ds={ds}").glob(f"{self.prefix}-*.jsonl")):
            start = self._offsets.get(path, 0)
            try:
                end = path.stat().st_size
            except OSError:
                continue
            mine = self.own.own_from(path) if self.own is not None else None
            if mine is not None:
                end = min(end, mine)
            if end <= start:
                continue
            with open(path, "rb") as f:
                f.seek(start)
                chunk = f.read(end - start)
            cut = chunk.rfind(b"\n") + 1  # whole lines only: a line being written is read next time
            if cut == 0:
                continue
            self._offsets[path] = start + cut
            for line in chunk[:cut].splitlines():
                payload = unframe(line) if line.strip() else None
                if payload is not None:
                    yield payload

    def forget_before(self, ds: str) -> None:
        for path in [p for p in self._offsets if p.parent.name < f"ds={ds}"]:
            del self._offsets[path]


_DS_RE = re.compile(r"\d{4}-\d{2}-\d{2}")


def _delay_cdf(h: np.ndarray) -> np.ndarray | None:
    """F by cohort age from the reward delays ``h`` by bin, or None below MIN_DELAY_REWARDS."""
    total = h.sum()
    if total < MIN_DELAY_REWARDS:
        return None
    below = np.concatenate([[0.0], np.cumsum(h)[:-1]])
    # a cohort of age k spans ages k - 1/2 .. k + 1/2 cohorts: half of bin k has arrived
    return np.concatenate([(below + h / 2.0) / total, [1.0, 1.0]])


def impression_batches(tail: LogTail, ds: str, size: int) -> Iterator[list[Impression]]:
    """The impressions of one day's log in batches of ``size``, the last one possibly short
    (or empty); lines that are not JSON or not an impression are passed over."""
    batch: list[Impression] = []
    for payload in tail.read(ds):
        try:
            ev = Impression.from_row(orjson.loads(payload))
        except orjson.JSONDecodeError:
            continue
        if ev is not None:
            batch.append(ev)
        if len(batch) >= size:
            yield batch
            batch = []
    yield batch


_ENTRY = struct.Struct("<qdqq?")  # cohort, weight, decision ms, reward ms (-1: none), both segments


def _pack_entry(b: int, weight: float, ts_ms: int, reward_ms: int | None, both: bool, artwork_id: str, segment: str) -> bytes:
    """An impression younger than the reward age limit, which matches its reward, as bytes.

    Bytes, not an object or a tuple: a dict (or a bytearray) holding only bytes is never
    tracked by the cyclic collector, so the ~10 entries a page leaves for the reward age
    limit (hundreds of thousands at a few hundred pages/s) are never walked by the full
    collections that request garbage triggers. Kept as objects, they made every full
    collection stall every in-flight request for 30-120 ms, growing with the traffic."""
    return _ENTRY.pack(b, weight, ts_ms, -1 if reward_ms is None else reward_ms, both) + f"{segment}\x00{artwork_id}".encode()


def _unpack_entry(e: bytes) -> tuple[str, tuple[Key, ...], int, float, int, int | None]:
    """(decision day, keys, cohort, weight, decision ms, reward ms or None) of :func:`_pack_entry`."""
    b, weight, ts_ms, reward_ms, both = _ENTRY.unpack_from(e)
    segment, artwork_id = e[_ENTRY.size:].decode().split("\x00", 1)
    ds = _utc_ds(ts_ms)
    keys = ((ds, artwork_id, feature_spec.SEGMENT_ALL), (ds, artwork_id, segment)) if both \
        else ((ds, artwork_id, feature_spec.SEGMENT_ALL),)
    return ds, keys, b, weight, ts_ms, None if reward_ms < 0 else reward_ms


def _digests(packed: bytes | bytearray) -> Iterator[bytes]:
    """The digests of a cohort's list (each one length byte, then the digest)."""
    i, n = 0, len(packed)
    while i < n:
        size = packed[i]
        yield bytes(packed[i + 1:i + 1 + size])
        i += 1 + size


class _StateReads:
    """What both online-state stores answer the same way from their local copy: the current
    day (the simulated clock's when one drives it), a key's counts, the delay CDF."""

    clock_ms: int
    _lock: Any  # an RLock
    _counts: dict
    _cdf: np.ndarray | None

    def day(self) -> str:
        return _utc_ds(self.clock_ms) if self.clock_ms > 0 else dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")

    def counts(self, key: Key) -> tuple[int, int]:
        with self._lock:
            c = self._counts.get(key, (0, 0))
            return (c[0], c[1])

    @property
    def delay_cdf(self) -> np.ndarray | None:
        """F by cohort age (in cohorts), or None while too few delays are known."""
        return self._cdf


class LocalState(_StateReads):
    """:class:`OnlineState` in this process, folding in the other workers' log files.

    Impressions are grouped in cohorts of ``window / DELAY_BINS`` by decision time. Per key
    and cohort it keeps the sums of the importance weights w and w^2 over all impressions
    and over the rewarded ones. A cohort whose attribution window has closed counts every
    impression: rewarded ones as successes, the others as failures. A cohort still open (age
    a) counts its rewards so far as successes out of F(a) of its impressions, F being the
    share of rewards that arrive within a (the reward-delay distribution, learned from the
    closed cohorts of the kept days): an unbiased rate (inverse probability of censoring
    weighting) with the confidence of the F(a) share of the cohort whose outcome is known,
    so a pending impression does not count as a failure. Until ``MIN_DELAY_REWARDS`` delays
    are known, open cohorts count nothing. Every key's sums become Beta counts by
    :func:`keyart.ope.weighted_evidence`, as the priors job turns a day's labels into them.

    Time is the newest decision time seen (serving may run on a client's clock), moved to
    the wall clock by :meth:`sync` when ``wall_clock``. State depends only on the events and
    that time, not on the order they arrive in, so a restart that folds the logs in again
    (:meth:`sync` on a fresh instance) or another worker that folds them rebuilds the same
    counts.
    """

    def __init__(self, window_s: float, max_age_s: float, logs: Sequence[tuple[LogTail, str]] = (),
                 wall_clock: bool = False):
        self.window_ms = int(window_s * 1000)
        self.max_age_ms = int(max_age_s * 1000)
        self.bin_ms = max(1, -(-self.window_ms // DELAY_BINS))
        self.logs = list(logs)  # (tail, "impressions" | "rewards")
        self.wall_clock = wall_clock
        self.seen = RecentIds(max_age_s)
        self.clock_ms = 0
        self._clock_bin = 0
        self._lock = threading.RLock()
        self._sync_lock = threading.Lock()
        self._young: dict[int, dict[Key, list[float]]] = {}    # cohort -> key -> [sw, sww, rewarded sw, rewarded sww]
        self._young_keys: dict[Key, set[int]] = {}
        self._ycache: dict[Key, list[float]] = {}              # key -> [sum F w, sum F w^2, rewarded sw, sww]
        self._closed: dict[Key, list[float]] = {}              # key -> [sw, sww, swr]
        self._counts: dict[Key, list[int]] = {}
        self._entries: dict[bytes, bytes] = {}                 # digest -> _pack_entry (untracked: bytes only)
        self._by_bin: dict[int, bytearray] = {}                # cohort -> its digests, length-prefixed
        self._orphans: dict[bytes, tuple[int, int]] = {}       # rewards before their impression: (impression, reward) ms
        self._delays: dict[str, np.ndarray] = {}               # decision day -> reward delays by cohort age
        self._cdf: np.ndarray | None = None
        self._cdf_dirty = False

    # -- the rule ------------------------------------------------------------------------
    def _closed_bin(self, b: int) -> bool:
        return (b + 1) * self.bin_ms + self.window_ms <= self.clock_ms

    def _expired_bin(self, b: int) -> bool:
        return (b + 1) * self.bin_ms + self.max_age_ms <= self.clock_ms

    def _oldest_day(self) -> str:
        return "" if self.clock_ms <= 0 else _ds_of_day(self.clock_ms // _DAY_MS - (KEEP_DAYS - 1))

    def _f(self, b: int) -> float:
        cdf = self._cdf
        return 0.0 if cdf is None else float(cdf[min(max(self._clock_bin - b, 0), len(cdf) - 1)])

    def _count_delay(self, ds: str, delay_ms: int) -> None:
        if 0 <= delay_ms < self.window_ms:
            self._delays.setdefault(ds, np.zeros(DELAY_BINS))[min(delay_ms // self.bin_ms, DELAY_BINS - 1)] += 1
            self._cdf_dirty = True

    def _refresh_cdf(self) -> None:
        self._cdf_dirty = False
        self._cdf = _delay_cdf(sum(self._delays.values(), np.zeros(DELAY_BINS)))

    def _impression(self, ev: Impression, changed: set[Key]) -> None:
        self._impressions((ev,), changed)

    def _impressions(self, events: Sequence[Impression], changed: set[Key]) -> None:
        """Count impressions that share one decision time and segment (a page's): what
        depends only on those (day, cohort, its state) is worked out once."""
        ev0 = events[0]
        ts_ms, segment = ev0.ts_ms, ev0.segment
        ds = _utc_ds(ts_ms)
        if ds < self._oldest_day():
            return
        b = ts_ms // self.bin_ms
        closed = self._closed_bin(b)
        keep = not self._expired_bin(b)
        both = segment != feature_spec.SEGMENT_ALL
        entries, orphans, counts = self._entries, self._orphans, self._counts
        if not closed:
            cohort = self._young.setdefault(b, {})
            f = self._f(b)
            young_keys, ycache = self._young_keys, self._ycache
        if keep:
            cohort_ids = self._by_bin.get(b)
            if cohort_ids is None:
                cohort_ids = self._by_bin[b] = bytearray()
        for ev in events:
            digest = ev.digest
            if digest in entries:
                continue
            artwork_id = ev.artwork_id
            keys = ((ds, artwork_id, feature_spec.SEGMENT_ALL), (ds, artwork_id, segment)) if both \
                else ((ds, artwork_id, feature_spec.SEGMENT_ALL),)
            orphan = orphans.pop(digest, None) if orphans else None
            reward_ts = orphan[1] if orphan is not None else None
            w = ev.weight
            ww, r = w * w, 0.0 if reward_ts is None else 1.0
            for k in keys:
                c = counts.get(k)
                if c is None:
                    counts[k] = [1, int(r)]
                else:
                    c[0] += 1
                    c[1] += int(r)
            if closed:
                for k in keys:
                    c = self._closed.setdefault(k, [0.0, 0.0, 0.0])
                    c[0] += w
                    c[1] += ww
                    c[2] += w * r
                if reward_ts is not None:
                    self._count_delay(ds, reward_ts - ts_ms)
            else:
                for k in keys:
                    y = cohort.get(k)
                    if y is None:
                        cohort[k] = [w, ww, w * r, ww * r]
                    else:
                        y[0] += w
                        y[1] += ww
                        y[2] += w * r
                        y[3] += ww * r
                    bins = young_keys.get(k)
                    if bins is None:
                        young_keys[k] = {b}
                    else:
                        bins.add(b)
                    yc = ycache.get(k)
                    if yc is not None:
                        yc[0] += f * w
                        yc[1] += f * ww
                        yc[2] += w * r
                        yc[3] += ww * r
            if keep and len(digest) < 256:  # a signed digest is 16 bytes; a longer one matches no reward
                entries[digest] = _pack_entry(b, w, ts_ms, reward_ts, both, artwork_id, segment)
                cohort_ids.append(len(digest))
                cohort_ids += digest
            changed.update(keys)

    def _reward(self, digest: bytes, impression_ms: int, reward_ms: int, changed: set[Key]) -> None:
        """A reward of 1 (a reward of 0 changes nothing: the impression counts as a failure
        when its window closes, as it would without one)."""
        e = self._entries.get(digest)
        if e is None:  # its impression is in a log not folded yet (another worker's)
            self._orphans[digest] = (impression_ms, reward_ms)
            return
        ds, keys, b, w, ts_ms, rewarded = _unpack_entry(e)
        if rewarded is not None:
            return
        self._entries[digest] = _pack_entry(b, w, ts_ms, reward_ms, len(keys) > 1, keys[0][1], keys[-1][2])
        for k in keys:
            self._counts[k][1] += 1
        if self._closed_bin(b):
            for k in keys:
                self._closed[k][2] += w
            self._count_delay(ds, reward_ms - ts_ms)
        else:
            cohort = self._young[b]
            for k in keys:
                y = cohort[k]
                y[2] += w
                y[3] += w * w
                yc = self._ycache.get(k)
                if yc is not None:
                    yc[2] += w
                    yc[3] += w * w
        changed.update(keys)

    def _advance(self, now_ms: int, changed: set[Key]) -> None:
        """Move the clock to ``now_ms`` (never back): close the cohorts whose window has
        passed, forget impressions older than the reward age limit and days no longer kept."""
        if now_ms > self.clock_ms:
            self.clock_ms = now_ms
        cb = self.clock_ms // self.bin_ms
        if cb == self._clock_bin and not self._cdf_dirty:
            return
        self._clock_bin = cb
        for b in sorted(b for b in self._young if self._closed_bin(b)):
            for k, (sw, sww, swr, _) in self._young.pop(b).items():
                c = self._closed.setdefault(k, [0.0, 0.0, 0.0])
                c[0] += sw
                c[1] += sww
                c[2] += swr
                bins = self._young_keys[k]
                bins.discard(b)
                if not bins:
                    del self._young_keys[k]
                changed.add(k)
            for d in _digests(self._by_bin.get(b, b"")):
                ds, _, _, _, ts_ms, reward_ts = _unpack_entry(self._entries[d])
                if reward_ts is not None:
                    self._count_delay(ds, reward_ts - ts_ms)
        for b in [b for b in self._by_bin if self._expired_bin(b)]:
            for d in _digests(self._by_bin.pop(b)):
                self._entries.pop(d, None)
        oldest = self._oldest_day()
        for table in (self._closed, self._counts, self._young_keys):
            for k in [k for k in table if k[0] < oldest]:
                del table[k]
        for ds in [ds for ds in self._delays if ds < oldest]:
            del self._delays[ds]
            self._cdf_dirty = True
        if self._cdf_dirty:
            self._refresh_cdf()
        self._ycache.clear()
        changed.update(self._young_keys)  # their open cohorts are older now: F moved

    def _settle(self, changed: set[Key]) -> None:
        """After a mutation: a new reward delay moves F, hence every open cohort's weight."""
        if self._cdf_dirty:
            self._refresh_cdf()
            self._ycache.clear()
            changed.update(self._young_keys)

    def _expire_orphans(self) -> None:
        for d in [d for d, (ts, _) in self._orphans.items() if ts + self.max_age_ms <= self.clock_ms]:
            del self._orphans[d]

    # -- OnlineState -----------------------------------------------------------------------
    def add_impressions(self, events: Sequence[Impression]) -> set[Key]:
        changed: set[Key] = set()
        with self._lock:
            start, n = 0, len(events)
            while start < n:  # runs of one decision time and segment (a page) at a time
                ts_ms, segment = events[start].ts_ms, events[start].segment
                end = start + 1
                while end < n and events[end].ts_ms == ts_ms and events[end].segment == segment:
                    end += 1
                self._impressions(events[start:end], changed)
                start = end
            if events:
                self._advance(max(ev.ts_ms for ev in events), changed)
                self._expire_orphans()
            self._settle(changed)
        return changed

    def claim(self, ref: EventRef, now_ms: int) -> bool:
        with self._lock:
            self.seen.prune(now_ms)
            return self.seen.add(ref.digest, ref.ts_ms)

    def release(self, ref: EventRef) -> None:
        with self._lock:
            self.seen.discard(ref.digest, ref.ts_ms)

    def add_reward(self, ref: EventRef, reward: int, ts_ms: int) -> set[Key]:
        changed: set[Key] = set()
        if reward:
            with self._lock:
                self._reward(ref.digest, ref.ts_ms, ts_ms, changed)
                self._settle(changed)
        return changed

    def sync(self) -> set[Key]:
        """Fold in the log lines appended since the last call (at start-up: every line of the
        kept days). Rewards first, so an impression finds its reward whatever order the
        files are read in; impressions in batches, so memory stays bounded by the impressions
        younger than the reward age limit."""
        changed: set[Key] = set()
        with self._sync_lock:
            tails = list(self.logs)
            # the kept days end at the newest decision day: the newest impression folder or the clock's
            days = sorted({d for t, kind in tails if kind == "impressions" for d in t.days()})
            if self.clock_ms > 0:
                days.append(_utc_ds(self.clock_ms))
            if days:
                newest = max(days)
                first = (dt.date.fromisoformat(newest) - dt.timedelta(days=KEEP_DAYS - 1)).isoformat()
                for t, _ in tails:
                    t.forget_before(first)
                for t, kind in tails:
                    if kind != "rewards":
                        continue
                    for ds in [d for d in t.days() if d >= first]:
                        lines = list(t.read(ds))
                        with self._lock:
                            for payload in lines:
                                self._fold_reward(payload, changed)
                for t, kind in tails:
                    if kind != "impressions":
                        continue
                    for ds in [d for d in t.days() if first <= d <= newest]:
                        for batch in impression_batches(t, ds, 20_000):
                            self._fold_impressions(batch, changed)
            with self._lock:
                if self.wall_clock:
                    self._advance(int(time.time() * 1000), changed)
                self._expire_orphans()
                self._settle(changed)
        return changed

    def _fold_reward(self, payload: bytes, changed: set[Key]) -> None:
        try:
            row = orjson.loads(payload)
            parsed = _parts(row["event_id"])
            reward_ms = _ms(row["ts"])
            reward = int(row.get("reward", 0))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            return
        if parsed is None:
            return
        impression_ms, _, digest = parsed
        if self.seen.add(digest, impression_ms) and reward:  # a duplicate (another worker's) counts once
            self._reward(digest, impression_ms, reward_ms, changed)

    def _fold_impressions(self, batch: list[Impression], changed: set[Key]) -> None:
        if not batch:
            return
        with self._lock:
            for ev in batch:
                self._impression(ev, changed)
            self._advance(max(ev.ts_ms for ev in batch), changed)

    def evidence(self, key: Key) -> tuple[float, float, float]:
        with self._lock:
            c = self._closed.get(key)
            sw, sww, swr = c if c is not None else _ZERO
            bins = self._young_keys.get(key)
            if self._cdf is not None and bins:
                yc = self._ycache.get(key)
                if yc is None:
                    yc = self._ycache[key] = young_sums(((b, self._young[b][key]) for b in bins), self._f)
                sw, sww, swr = with_young(sw, sww, swr, yc)
            return weighted_evidence(sw, sww, swr)

    def keys(self) -> list[Key]:
        with self._lock:
            return list(self._closed.keys() | self._young_keys.keys())



class OnlinePriors:
    """The policy's Beta arrays of the bound bundle: its priors plus the evidence of the
    decision days after the bundle's priors day (:class:`OnlineState`), segment ``all``."""

    def __init__(self, state: OnlineState | None = None):
        self.state: OnlineState = state if state is not None else LocalState(4 * 3600, 5 * 3600)
        self._lock = threading.Lock()
        self._table: ArtworkTable | None = None
        self._priors_ds: str | None = None
        self._day = ""
        self._applied: dict[tuple[str, str], tuple[float, float, float]] = {}
        self.alpha = self.beta = self.n = np.zeros(0)

    def _applies(self, ds: str) -> bool:
        if self._priors_ds is not None:
            return ds > self._priors_ds
        return ds == self._day

    def bind(self, table: ArtworkTable, priors_ds: str | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The policy's (alpha, beta, n) arrays [N] for a newly loaded bundle; later events update them."""
        with self._lock:
            self._table, self._priors_ds = table, priors_ds
            self.alpha, self.beta, self.n = table.policy_alpha.copy(), table.policy_beta.copy(), table.policy_n.copy()
            self._rebuild()
            return self.alpha, self.beta, self.n

    def _rebuild(self) -> None:
        self._applied = {}
        self._day = self.state.day()
        self._refresh([k for k in self.state.keys() if k[2] == feature_spec.SEGMENT_ALL])

    def _refresh(self, changed: Iterable[Key]) -> None:
        """Bring the arrays up to date for ``changed`` keys (lock held)."""
        table = self._table
        if table is None:
            return
        if self._priors_ds is None and self.state.day() != self._day:  # the day turned: which deltas apply changed
            self.alpha[:], self.beta[:], self.n[:] = table.policy_alpha, table.policy_beta, table.policy_n
            self._rebuild()
            return
        for ds, artwork_id, segment in changed:
            if segment != feature_spec.SEGMENT_ALL:
                continue
            i = table.index.get(artwork_id)
            if i is None:
                continue
            new = self.state.evidence((ds, artwork_id, segment)) if self._applies(ds) else _ZERO
            old = self._applied.get((ds, artwork_id), _ZERO)
            if new != old:
                self.alpha[i] += new[0] - old[0]
                self.beta[i] += new[1] - old[1]
                self.n[i] += new[2] - old[2]
                self._applied[(ds, artwork_id)] = new

    def record_impressions(self, events: Sequence[Impression]) -> None:
        """Logged decisions (their lines are durable)."""
        changed = self.state.add_impressions(events)
        with self._lock:
            self._refresh(changed)

    def record(self, ref: EventRef, reward: int, ts_ms: int) -> None:
        """A logged reward for ``ref``, received at ``ts_ms``."""
        changed = self.state.add_reward(ref, reward, ts_ms)
        with self._lock:
            self._refresh(changed)

    def sync(self) -> None:
        """Fold in what the other workers logged (and, at start-up, this day's logs)."""
        changed = self.state.sync()
        with self._lock:
            self._refresh(changed)

    def delta(self, artwork_id: str, segment: str) -> tuple[float, float, float]:
        """Sum of the evidence that applies to (artwork, segment)."""
        tot = [0.0, 0.0, 0.0]
        with self._lock:
            days = {k[0] for k in self.state.keys() if k[1] == artwork_id and k[2] == segment}
            for ds in days:
                if self._applies(ds):
                    for j, v in enumerate(self.state.evidence((ds, artwork_id, segment))):
                        tot[j] += v
        return (tot[0], tot[1], tot[2])

    def counts(self, artwork_id: str, segment: str) -> tuple[int, int]:
        """Impressions and rewards counted for (artwork, segment) over the kept days."""
        imps = rews = 0
        for k in self.state.keys():
            if k[1] == artwork_id and k[2] == segment:
                i, r = self.state.counts(k)
                imps, rews = imps + i, rews + r
        return imps, rews


class RewardBook:
    """Validates rewards, de-duplicates them (through the online state), logs them and feeds
    the online priors."""

    def __init__(self, signer: EventSigner, priors: OnlinePriors, max_age_s: float):
        self.signer = signer
        self.priors = priors
        self.max_age_s = max_age_s

    def admit(self, event_id: str, now_ms: int | None = None) -> EventRef:
        """Verify and reserve ``event_id``; :class:`RewardRefused` if it must be refused."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        ref = self.signer.verify(event_id)
        if ref.ts_ms < now_ms - self.max_age_s * 1000:
            raise RewardRefused(410, "expired", f"event is older than the reward window ({self.max_age_s / 3600:g} h)")
        if ref.ts_ms > now_ms + 300_000:
            raise RewardRefused(422, "malformed", "event_id is dated in the future")
        if not self.priors.state.claim(ref, now_ms):
            raise RewardRefused(409, "duplicate", "a reward for this event_id was already recorded; ignored")
        return ref

    def release(self, ref: EventRef) -> None:
        """Forget a reservation whose reward could not be logged (the client may retry)."""
        self.priors.state.release(ref)

    def record_line(self, ref: EventRef, reward: int, minutes: float, now: dt.datetime) -> tuple[str, bytes]:
        """(ds, JSON line) of the reward log for an admitted reward."""
        row = {"event_id": ref.event_id, "ts": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
               "impression_ts": dt.datetime.fromtimestamp(ref.ts_ms / 1000, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
               "artwork_id": ref.artwork_id, "segment": ref.segment, "reward": int(reward), "minutes": float(minutes)}
        return now.strftime("%Y-%m-%d"), orjson.dumps(row) + b"\n"

    def apply(self, ref: EventRef, reward: int, now_ms: int | None = None) -> None:
        """Count a logged reward in the online priors."""
        self.priors.record(ref, reward, int(time.time() * 1000) if now_ms is None else now_ms)


# --- the shared online state: Redis ------------------------------------------------------

_IMPRESSIONS_LUA = """
local p, window, maxage, binms, keep, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]),
  tonumber(ARGV[5]), tonumber(ARGV[6])
local clock = tonumber(redis.call('GET', p .. 'clock') or '0')
local oldest = -1e12
if clock > 0 then oldest = math.floor(clock / 86400000) - (keep - 1) end
local ver = redis.call('INCR', p .. 'ver')
local newest, newest_text, out, i = clock, nil, {ver}, 7
local dirty = {}
while i <= #ARGV do
  local digest, ts, day, ds, b, w, ww, keys = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2]), ARGV[i + 3],
    ARGV[i + 4], ARGV[i + 5], ARGV[i + 6], ARGV[i + 7]
  i = i + 8
  if ts > newest then newest, newest_text = ts, ARGV[i - 7] end
  local reward = -1
  if day < oldest or redis.call('EXISTS', p .. 'e:' .. digest) == 1 then
    reward = -2
  else
    local orphan = redis.call('GET', p .. 'o:' .. digest)
    if orphan then
      redis.call('DEL', p .. 'o:' .. digest)
      local sep = string.find(orphan, ':', 1, true)
      if tonumber(string.sub(orphan, 1, sep - 1)) + maxage > clock then reward = tonumber(string.sub(orphan, sep + 1)) end
    end
    for key in string.gmatch(keys, '[^;]+') do
      local name = 'k:' .. ds .. '|' .. key
      local h = p .. name
      if redis.call('HINCRBY', h, 'n', 1) == 1 then redis.call('PEXPIRE', h, ttl) end
      redis.call('HINCRBYFLOAT', h, b .. ':w', w)
      redis.call('HINCRBYFLOAT', h, b .. ':ww', ww)
      if reward >= 0 then
        redis.call('HINCRBY', h, 'r', 1)
        redis.call('HINCRBYFLOAT', h, b .. ':rw', w)
        redis.call('HINCRBYFLOAT', h, b .. ':rww', ww)
      end
      dirty[#dirty + 1] = ver
      dirty[#dirty + 1] = name
    end
    if reward >= 0 and reward - ts >= 0 and reward - ts < window then
      local h = p .. 'dl:' .. ds
      redis.call('HINCRBY', h, b .. ':' .. math.min(math.floor((reward - ts) / binms), 47), 1)
      redis.call('PEXPIRE', h, ttl)
      dirty[#dirty + 1] = ver
      dirty[#dirty + 1] = 'dl:' .. ds
    end
    if (tonumber(b) + 1) * binms + maxage > clock then
      local rewarded = '0'
      if reward >= 0 then rewarded = '1' end
      redis.call('SET', p .. 'e:' .. digest, table.concat({ds, b, w, ww, ARGV[i - 7], rewarded, keys}, ' '),
        'PX', maxage + 3600000)
    end
  end
  out[#out + 1] = reward
end
if newest_text then redis.call('SET', p .. 'clock', newest_text) end
if #dirty > 0 then redis.call('ZADD', p .. 'dirty', unpack(dirty)) end
return out
"""
"""A page's impressions, atomically. ARGV: prefix, window ms, reward age limit ms, cohort ms,
kept days, key TTL ms, then per impression: digest (hex), decision ms, day number, ds,
cohort, w, w^2 (as text: no rounding), 'artwork|segment;...'. Per key ``k:<ds>|<artwork>|<segment>``
a hash of ``n``, ``r`` and per cohort the sums ``<cohort>:w|ww|rw|rww``; per decision day
``dl:<ds>`` the reward delays by ``<cohort>:<delay bin>``; ``e:<digest>`` the impression for
its reward (until the reward age limit passes on the decision clock), ``o:<digest>`` a reward
that came first; ``dirty`` (sorted set) the version each hash last changed at. Returns
{version, then per impression the matched reward's ms, -1 (none) or -2 (not counted: a
duplicate or a day no longer kept)}: the rule of :class:`LocalState`."""

_REWARD_LUA = """
local p, window, maxage, binms, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[6])
local digest, impression, reward = ARGV[7], ARGV[8], tonumber(ARGV[9])
local clock = tonumber(redis.call('GET', p .. 'clock') or '0')
local entry = redis.call('GET', p .. 'e:' .. digest)
local f = {}
if entry then
  for part in string.gmatch(entry, '%S+') do f[#f + 1] = part end
  if (tonumber(f[2]) + 1) * binms + maxage <= clock then entry = false end
end
if not entry then
  redis.call('SET', p .. 'o:' .. digest, impression .. ':' .. ARGV[9], 'PX', maxage + 3600000)
  return {0, ''}
end
if f[6] == '1' then return {0, ''} end
f[6] = '1'
redis.call('SET', p .. 'e:' .. digest, table.concat(f, ' '), 'KEEPTTL')
local ver = redis.call('INCR', p .. 'ver')
local ds, b, w, ww, ts = f[1], f[2], f[3], f[4], tonumber(f[5])
for key in string.gmatch(f[7], '[^;]+') do
  local name = 'k:' .. ds .. '|' .. key
  redis.call('HINCRBY', p .. name, 'r', 1)
  redis.call('HINCRBYFLOAT', p .. name, b .. ':rw', w)
  redis.call('HINCRBYFLOAT', p .. name, b .. ':rww', ww)
  redis.call('ZADD', p .. 'dirty', ver, name)
end
if reward - ts >= 0 and reward - ts < window then
  local h = p .. 'dl:' .. ds
  redis.call('HINCRBY', h, b .. ':' .. math.min(math.floor((reward - ts) / binms), 47), 1)
  redis.call('PEXPIRE', h, ttl)
  redis.call('ZADD', p .. 'dirty', ver, 'dl:' .. ds)
end
return {ver, entry}
"""
"""A reward of 1, atomically. ARGV: the same six, then digest (hex), decision ms, reward ms.
Returns {version, the impression's entry} when counted, {0, ''} otherwise (kept as an
orphan until its impression arrives, or a second reward for the impression)."""

_CLOCK_LUA = """
local now = tonumber(ARGV[2])
if now > tonumber(redis.call('GET', ARGV[1] .. 'clock') or '0') then
  redis.call('SET', ARGV[1] .. 'clock', ARGV[2])
end
return redis.call('GET', ARGV[1] .. 'clock')
"""


class OnlineStateUnavailable(RuntimeError):
    """The shared online state does not answer at start-up."""


class RedisState(_StateReads):
    """:class:`OnlineState` shared by every replica through Redis, by the rule of
    :class:`LocalState`: whatever replica a page or a reward reaches, every replica's
    evidence is what one process counting all of them holds.

    Writes are one Lua script per page (its impressions) or per reward: atomic, one round
    trip. Per key and cohort Redis holds the sums of w, w^2 and of the rewarded ones; per
    day the reward delays by cohort; the impressions younger than the reward age limit (for
    their rewards) and the claimed event ids (``SET NX``, so a duplicate reward on another
    replica is refused). Cohorts close on the shared decision clock (the newest decision
    time any replica saw). Each replica reads evidence from its own mirror of the sums:
    its own writes enter it at once, the others' with :meth:`sync` (the hashes changed
    since the last one, read in one transaction with the version they are current at).

    The first replica to find the prefix empty (a first start, or a Redis that lost its
    data: every replica notices by the seeding token) folds the kept days' logs in
    (:meth:`seed`), so the state is the logs' as :class:`LocalState` rebuilds it.

    A Redis error on an impression or a reward is logged and counted (``errors``); the
    event is in the durable logs and the next day's priors, only today's online delta
    misses it. A claim that cannot reach Redis is refused with 503 (retry), never accepted
    twice.
    """

    def __init__(self, client: Any, prefix: str, window_s: float, max_age_s: float, wall_clock: bool = False,
                 logs: Sequence[tuple[LogTail, str]] = ()):
        self.client, self.prefix = client, prefix
        self.logs = list(logs)  # folded into an empty Redis by the first sync
        self._epoch: bytes | None = None  # the token of the seeding this mirror was read after
        self._forgotten = ""  # the oldest kept day when old change marks were last dropped
        self.window_ms = int(window_s * 1000)
        self.max_age_ms = int(max_age_s * 1000)
        self.bin_ms = max(1, -(-self.window_ms // DELAY_BINS))
        self.wall_clock = wall_clock
        self.clock_ms = 0
        self.errors = 0
        ttl_ms = (KEEP_DAYS + 1) * _DAY_MS
        self._args = [prefix, self.window_ms, self.max_age_ms, self.bin_ms, KEEP_DAYS, ttl_ms]
        self._impressions_script = client.register_script(_IMPRESSIONS_LUA)
        self._reward_script = client.register_script(_REWARD_LUA)
        self._clock_script = client.register_script(_CLOCK_LUA)
        self._lock = threading.RLock()
        self._sync_lock = threading.Lock()
        self._since = 0                                        # versions up to this one were read
        self._snapshot: dict[Key, int] = {}                    # key -> version its mirror was read at
        self._delay_snapshot: dict[str, int] = {}              # decision day -> the same for its delays
        self._closed: dict[Key, list[float]] = {}              # key -> [sw, sww, swr]
        self._young: dict[Key, dict[int, list[float]]] = {}    # key -> cohort -> [sw, sww, rewarded sw, sww]
        self._counts: dict[Key, list[int]] = {}
        self._delays: dict[str, dict[int, np.ndarray]] = {}    # decision day -> cohort -> delays by bin
        self._cdf: np.ndarray | None = None
        self._clock_bin = 0
        self._cache: dict[Key, tuple[float, float, float]] = {}

    @classmethod
    def from_url(cls, url: str, prefix: str, window_s: float, max_age_s: float, wall_clock: bool = False,
                 logs: Sequence[tuple[LogTail, str]] = (), timeout_s: float = 2.0) -> RedisState:
        try:
            import redis
        except ImportError:
            raise OnlineStateUnavailable("serve_online_state=redis needs the redis client: pip install redis") from None
        client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                      health_check_interval=30)
        try:
            client.ping()
        except redis.RedisError as exc:
            raise OnlineStateUnavailable(f"serve_online_state=redis: no Redis answers at {url} ({exc})") from None
        return cls(client, prefix, window_s, max_age_s, wall_clock, logs)

    # -- the mirror (lock held) --------------------------------------------------------
    def _closed_bin(self, b: int) -> bool:
        return (b + 1) * self.bin_ms + self.window_ms <= self.clock_ms

    def _oldest_day(self) -> str:
        return "" if self.clock_ms <= 0 else _ds_of_day(self.clock_ms // _DAY_MS - (KEEP_DAYS - 1))

    def _add(self, key: Key, b: int, sums: tuple[float, float, float, float], n: int, r: int) -> None:
        if self._closed_bin(b):
            c = self._closed.setdefault(key, [0.0, 0.0, 0.0])
            c[0] += sums[0]
            c[1] += sums[1]
            c[2] += sums[2]
        else:
            y = self._young.setdefault(key, {}).setdefault(b, [0.0, 0.0, 0.0, 0.0])
            for j in range(4):
                y[j] += sums[j]
        c = self._counts.setdefault(key, [0, 0])
        c[0] += n
        c[1] += r
        self._cache.pop(key, None)

    def _add_delay(self, ds: str, b: int, delay_ms: int, version: int, changed: set[Key]) -> None:
        if 0 <= delay_ms < self.window_ms and self._delay_snapshot.get(ds, -1) < version:
            self._delays.setdefault(ds, {}).setdefault(b, np.zeros(DELAY_BINS))[
                min(delay_ms // self.bin_ms, DELAY_BINS - 1)] += 1
            if self._closed_bin(b) and self._refresh_cdf():
                changed.update(self._young)

    def _set_key(self, key: Key, fields: dict[bytes, bytes], version: int) -> None:
        """The mirror of a key from its hash as read at ``version``."""
        self._snapshot[key] = version
        self._closed.pop(key, None)
        self._young.pop(key, None)
        self._cache.pop(key, None)
        bins: dict[int, list[float]] = {}
        counts = [0, 0]
        for name, value in fields.items():
            label, _, part = name.decode().partition(":")
            if not part:
                counts["nr".index(label)] = int(value)
                continue
            slot = ("w", "ww", "rw", "rww").index(part)
            bins.setdefault(int(label), [0.0, 0.0, 0.0, 0.0])[slot] = float(value)
        self._counts[key] = counts
        for b, sums in bins.items():
            self._add(key, b, (sums[0], sums[1], sums[2], sums[3]), 0, 0)

    def _set_delays(self, ds: str, fields: dict[bytes, bytes], version: int) -> None:
        self._delay_snapshot[ds] = version
        cohorts: dict[int, np.ndarray] = {}
        for name, value in fields.items():
            b, _, d = name.decode().partition(":")
            cohorts.setdefault(int(b), np.zeros(DELAY_BINS))[int(d)] = int(value)
        self._delays[ds] = cohorts

    def _refresh_cdf(self) -> bool:
        """F from the delays of the closed cohorts of the kept days; True if it changed."""
        oldest = self._oldest_day()
        h = np.zeros(DELAY_BINS)
        for ds, cohorts in self._delays.items():
            if ds >= oldest:
                for b, counts in cohorts.items():
                    if self._closed_bin(b):
                        h += counts
        cdf = _delay_cdf(h)
        if (cdf is None) != (self._cdf is None) or (cdf is not None and not np.array_equal(cdf, self._cdf)):
            self._cdf = cdf
            self._cache.clear()
            return True
        return False

    def _advance(self, now_ms: int, changed: set[Key]) -> None:
        if now_ms > self.clock_ms:
            self.clock_ms = now_ms
        cb = self.clock_ms // self.bin_ms
        if cb == self._clock_bin:
            return
        self._clock_bin = cb
        for key, cohorts in list(self._young.items()):
            for b in [b for b in cohorts if self._closed_bin(b)]:
                sw, sww, swr, _ = cohorts.pop(b)
                c = self._closed.setdefault(key, [0.0, 0.0, 0.0])
                c[0] += sw
                c[1] += sww
                c[2] += swr
                changed.add(key)
            if not cohorts:
                del self._young[key]
        oldest = self._oldest_day()
        for table in (self._closed, self._young, self._counts, self._snapshot):
            for key in [k for k in table if k[0] < oldest]:
                del table[key]
        for ds in [ds for ds in self._delays if ds < oldest]:
            del self._delays[ds]
            self._delay_snapshot.pop(ds, None)
        self._refresh_cdf()
        self._cache.clear()
        changed.update(self._young)  # their open cohorts are older now: F moved

    def _f(self, b: int) -> float:
        cdf = self._cdf
        return 0.0 if cdf is None else float(cdf[min(max(self._clock_bin - b, 0), len(cdf) - 1)])

    # -- OnlineState -----------------------------------------------------------------------
    def add_impressions(self, events: Sequence[Impression]) -> set[Key]:
        if not events:
            return set()
        args: list[Any] = list(self._args)
        rows = []
        for ev in events:
            ds = _utc_ds(ev.ts_ms)
            keys = ((ds, ev.artwork_id, feature_spec.SEGMENT_ALL),) if ev.segment == feature_spec.SEGMENT_ALL \
                else ((ds, ev.artwork_id, feature_spec.SEGMENT_ALL), (ds, ev.artwork_id, ev.segment))
            b, w = ev.ts_ms // self.bin_ms, ev.weight
            ww = w * w
            args += [ev.digest.hex(), ev.ts_ms, ev.ts_ms // _DAY_MS, ds, b, repr(w), repr(ww),
                     ";".join(f"{k[1]}|{k[2]}" for k in keys)]
            rows.append((ev, ds, keys, b, w, ww))
        try:
            out = self._impressions_script(args=args)
        except Exception as exc:  # noqa: BLE001 - serving goes on; the logs keep the impressions
            self._failed("impressions", exc)
            return set()
        version = int(out[0])
        changed: set[Key] = set()
        with self._lock:
            for (ev, ds, keys, b, w, ww), reward in zip(rows, out[1:], strict=True):
                reward = int(reward)
                if reward == -2:
                    continue
                rewarded = reward >= 0
                for k in keys:
                    if self._snapshot.get(k, -1) < version:
                        self._add(k, b, (w, ww, w, ww) if rewarded else (w, ww, 0.0, 0.0), 1, int(rewarded))
                if rewarded:
                    self._add_delay(ds, b, reward - ev.ts_ms, version, changed)
                changed.update(keys)
            self._advance(max(ev.ts_ms for ev in events), changed)
        return changed

    def claim(self, ref: EventRef, now_ms: int) -> bool:
        try:
            return bool(self.client.set(f"{self.prefix}s:{ref.digest.hex()}", b"1", nx=True,
                                        px=self.max_age_ms + 3_600_000))
        except Exception as exc:  # noqa: BLE001 - never accept a reward that may be a duplicate
            self._failed("claim", exc)
            raise RewardRefused(503, "unavailable", "the online state does not answer; retry") from None

    def release(self, ref: EventRef) -> None:
        try:
            self.client.delete(f"{self.prefix}s:{ref.digest.hex()}")
        except Exception as exc:  # noqa: BLE001 - a retry of this reward is then refused as a duplicate
            self._failed("release", exc)

    def add_reward(self, ref: EventRef, reward: int, ts_ms: int) -> set[Key]:
        if not reward:
            return set()
        try:
            version, entry = self._reward_script(args=[*self._args, ref.digest.hex(), ref.ts_ms, ts_ms])
        except Exception as exc:  # noqa: BLE001 - the reward is in the log; the online delta misses it
            self._failed("reward", exc)
            return set()
        if not version:
            return set()
        ds, b, w, ww, ts, _, keys_text = entry.decode().split(" ")
        b, w, ww = int(b), float(w), float(ww)
        keys = [(ds, *k.split("|", 1)) for k in keys_text.split(";")]
        changed: set[Key] = set()
        with self._lock:
            for k in keys:
                if self._snapshot.get(k, -1) < int(version):
                    self._add(k, b, (0.0, 0.0, w, ww), 0, 1)
            self._add_delay(ds, b, ts_ms - int(ts), int(version), changed)
            changed.update(keys)
        return changed

    def seed(self) -> bool:
        """Fold the kept days' logs into Redis if this prefix holds no state yet (a first
        start, or a Redis that lost its data), as :meth:`LocalState.sync` folds them at
        start-up: rewards first, then impressions. One replica does it (``SET NX``)."""
        if not self.client.set(self.prefix + "seeded", os.urandom(8).hex().encode(), nx=True):
            return False
        if not self.logs:
            return True
        tails = [(LogTail(t.root, t.prefix), kind) for t, kind in self.logs]  # every line, this process's too
        days = sorted({d for t, kind in tails if kind == "impressions" for d in t.days()})
        if not days:
            return True
        first = (dt.date.fromisoformat(days[-1]) - dt.timedelta(days=KEEP_DAYS - 1)).isoformat()
        for t, kind in tails:
            if kind != "rewards":
                continue
            for ds in [d for d in t.days() if d >= first]:
                for payload in t.read(ds):
                    try:
                        row = orjson.loads(payload)
                        parsed = _parts(row["event_id"])
                        reward_ms, reward = _ms(row["ts"]), int(row.get("reward", 0))
                    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
                        continue
                    if parsed is None:
                        continue
                    ref = EventRef(row["event_id"], parsed[0], parsed[1], str(row.get("artwork_id", "")), parsed[2])
                    if self.claim(ref, reward_ms) and reward:
                        self.add_reward(ref, reward, reward_ms)
        for t, kind in tails:
            if kind != "impressions":
                continue
            for ds in [d for d in t.days() if first <= d <= days[-1]]:
                for batch in impression_batches(t, ds, 500):
                    self.add_impressions(batch)
        return True

    def sync(self) -> set[Key]:
        """Read what changed in Redis since the last call (at start-up: everything kept,
        after :meth:`seed`)."""
        epoch = self.client.get(self.prefix + "seeded")
        if epoch is None or epoch != self._epoch:
            # first start, or Redis lost its data (restarted without persistence, flushed):
            # the state is rebuilt from the logs (by one replica), and this mirror from it
            with self._lock:
                for table in (self._closed, self._young, self._counts, self._delays, self._snapshot,
                              self._delay_snapshot, self._cache):
                    table.clear()
                self._since = 0
            self.seed()
            self._epoch = self.client.get(self.prefix + "seeded")
        with self._sync_lock:
            if self.wall_clock:
                self._clock_script(args=[self.prefix, int(time.time() * 1000)])
            with self.client.pipeline(transaction=True) as pipe:
                pipe.get(self.prefix + "ver")
                pipe.zrangebyscore(self.prefix + "dirty", f"({self._since}", "+inf")
                since, names = pipe.execute()
            names = [n.decode() for n in names]
            with self.client.pipeline(transaction=True) as pipe:
                for n in names:
                    pipe.hgetall(self.prefix + n)
                pipe.get(self.prefix + "clock")
                pipe.get(self.prefix + "ver")
                *hashes, clock, version = pipe.execute()
            version = int(version or 0)
            changed: set[Key] = set()
            with self._lock:
                self._advance(int(clock or 0), changed)
                oldest = self._oldest_day()
                for n, fields in zip(names, hashes, strict=True):
                    kind, _, rest = n.partition(":")
                    if kind == "k":
                        ds, artwork_id, segment = rest.split("|", 2)
                        if ds >= oldest:
                            self._set_key((ds, artwork_id, segment), fields, version)
                            changed.add((ds, artwork_id, segment))
                    elif kind == "dl" and rest >= oldest:
                        self._set_delays(rest, fields, version)
                if self._refresh_cdf():
                    changed.update(self._young)
            self._since = int(since or 0)
            self._forget_days()
        return changed

    def _forget_days(self) -> None:
        """Once a day: drop the change marks of days no longer kept (their hashes expire by
        their TTL), so the set of marks stays as large as the kept days' keys."""
        oldest = self._oldest_day()
        if oldest == self._forgotten:
            return
        old = [n for n, _ in self.client.zscan_iter(self.prefix + "dirty", count=1000)
               if n.decode().partition(":")[2][:10] < oldest]
        for i in range(0, len(old), 1000):
            self.client.zrem(self.prefix + "dirty", *old[i:i + 1000])
        self._forgotten = oldest

    def _failed(self, what: str, exc: Exception) -> None:
        self.errors += 1
        import logging

        logging.getLogger("keyart.serving").warning("online state (Redis) %s failed: %s", what, exc)

    def evidence(self, key: Key) -> tuple[float, float, float]:
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                return hit
            c = self._closed.get(key)
            sw, sww, swr = c if c is not None else _ZERO
            young = self._young.get(key)
            if self._cdf is not None and young:
                sw, sww, swr = with_young(sw, sww, swr, young_sums(young.items(), self._f))
            out = weighted_evidence(sw, sww, swr)
            self._cache[key] = out
            return out

    def keys(self) -> list[Key]:
        with self._lock:
            return list(self._closed.keys() | self._young.keys())



def online_state(settings: Any, window_s: float, max_age_s: float, logs: Sequence[tuple[LogTail, str]] = (),
                 wall_clock: bool = False) -> OnlineState:
    """The online state ``serve_online_state`` names: this process's (folding the other
    workers' ``logs``) or Redis's at ``serve_redis_url`` under ``serve_redis_prefix``."""
    if getattr(settings, "serve_online_state", "local") == "redis":
        return RedisState.from_url(settings.serve_redis_url, settings.serve_redis_prefix, window_s, max_age_s,
                                   wall_clock=wall_clock, logs=logs)
    return LocalState(window_s, max_age_s, logs=logs, wall_clock=wall_clock)
