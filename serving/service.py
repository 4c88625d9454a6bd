"""The decision service: pre-process -> one ONNX call for the page -> policy -> post-process.

:meth:`Service.prepare` checks the page against the limits and the serving catalog
(every problem named in the error), :meth:`Service.choose` assembles the feature matrix,
scores every candidate of every title in one model call and applies
:mod:`keyart.policy` (the same code offline evaluation uses), and :meth:`Service.decide`
signs event ids and renders the response and the impression-log lines.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import orjson

from keyart import feature_spec, policy
from keyart.config import Settings
from keyart.serving.bundle_store import BundleStore, LoadedBundle
from keyart.serving.page import page_matrix
from keyart.serving.rewards import EventSigner, Impression
from keyart.serving.schemas import ArtworkRequest
from keyart.serving.tables import ArtworkTable, Member

DEFAULT = "default"
MAX_NAMED = 10
LINE = (b'{"event_id":%s%s,"title_id":%s,"artwork_id":%s,"candidates":%s,"propensity":%s,'
        b'"candidate_probabilities":%s%s,"page_row":%d,"position":%d}}')
"""An impression-log line (contracts.IMPRESSIONS): event id, [ts, member], title, artwork,
candidates, propensity, candidate probabilities, [model version, policy, context head],
page row, position; the same bytes as ``orjson.dumps`` of the row's dict in that key order."""


class PageRefused(Exception):
    """A request the service will not decide; ``status`` is the HTTP status."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


@dataclass
class Prepared:
    """A validated page resolved against the serving catalog."""

    request: ArtworkRequest
    bundle: LoadedBundle | None
    table: ArtworkTable
    member: Member
    rows: np.ndarray          # [R] artwork rows of all candidates
    offsets: np.ndarray       # [T + 1]
    title_rows: np.ndarray    # [T] title index of every slot
    page_row: np.ndarray      # [T]
    position: np.ndarray      # [T]


@dataclass
class Choice:
    """The policy's pick for every title of a page."""

    chosen: np.ndarray        # [T] global candidate row index
    propensity: np.ndarray    # [T]
    policy: str
    model_version: str
    fallback: bool
    probs: np.ndarray         # [R] the distribution every title's artwork was drawn from
    registry_version: str | None = None
    inference_s: float | None = None  # the ONNX call alone; None without a model
    features_s: float = 0.0
    policy_s: float = 0.0


class Decided(NamedTuple):
    """A decided page: the response body, the UTC day of the decision, the impression-log
    lines, the impressions the online priors count once the lines are logged, what the
    metrics count (the table, the shown rows [T] and propensities [T], the inference time)
    and the seconds of its stages (prepare, features, inference, policy, render)."""

    body: dict[str, Any]
    ds: str
    lines: list[bytes]
    segment: str
    shown: list[str]
    events: list[Impression]
    table: ArtworkTable
    shown_rows: np.ndarray
    propensity: np.ndarray
    inference_s: float | None
    stages: tuple[float, float, float, float, float]


def logged_probabilities(probs: np.ndarray, chosen: np.ndarray, propensity: np.ndarray) -> np.ndarray:
    """What the impression log keeps of a page's distribution [R]: every probability to 6
    significant digits (the line stays short; the sum stays within 5e-6 of 1), except each
    shown candidate's, which is its propensity exactly (offline evaluation divides by it)."""
    p = np.asarray(probs, dtype=np.float64)
    out = np.zeros_like(p)
    pos = p > 0
    scale = 10.0 ** (5 - np.floor(np.log10(p[pos])))
    out[pos] = np.round(p[pos] * scale) / scale
    out[chosen] = propensity
    return out


def _names(ids: list[str]) -> str:
    more = f" and {len(ids) - MAX_NAMED} more" if len(ids) > MAX_NAMED else ""
    return ", ".join(repr(i) for i in ids[:MAX_NAMED]) + more


class Service:
    """Decides pages against the store's current bundle (or the fallback catalog)."""

    def __init__(self, store: BundleStore, signer: EventSigner, settings: Settings,
                 rng: np.random.Generator | None = None):
        self.store = store
        self.signer = signer
        self.settings = settings
        self.rng = rng if rng is not None else np.random.default_rng()

    def prepare(self, req: ArtworkRequest) -> Prepared:
        """Resolve the page; :class:`PageRefused` names every title or artwork that is wrong."""
        s = self.settings
        if req.ts is not None and not s.serve_client_clock:
            raise PageRefused(422, "ts_not_accepted",
                              "ts is accepted only when the server runs with serve_client_clock (simulation/replay); omit it")
        if len(req.titles) > s.serve_max_titles:
            raise PageRefused(413, "too_many_titles",
                              f"page has {len(req.titles)} titles; the limit is {s.serve_max_titles} (serve_max_titles)")
        bundle = self.store.current
        table = bundle.artworks if bundle is not None else self.store.fallback
        if table is None:
            raise PageRefused(503, "no_catalog", "no model and no catalog loaded: cannot decide")
        day = (dt.datetime.fromtimestamp(client_clock_ms(req.ts) / 1000, dt.UTC) if req.ts is not None
               else dt.datetime.now(dt.UTC)).date()
        resolved = self._resolve_fast(req, table, day)
        if resolved is None:  # something is wrong with the page: the per-title checks name it
            chunks, title_rows = self._resolve_checked(req, table, day)
            resolved = (np.concatenate(chunks), np.fromiter((len(c) for c in chunks), np.int64, len(chunks)),
                        title_rows)
        rows, sizes, title_rows = resolved
        if np.any(sizes > s.serve_max_artworks):
            big = [req.titles[i].title_id for i in np.flatnonzero(sizes > s.serve_max_artworks)]
            raise PageRefused(413, "too_many_artworks", f"titles {_names(big)} have more than "
                              f"{s.serve_max_artworks} active artworks (serve_max_artworks)")
        offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        member = bundle.members.get(req.member_id) if bundle is not None else _UNKNOWN
        return Prepared(
            request=req, bundle=bundle, table=table, member=member,
            rows=rows, offsets=offsets, title_rows=title_rows,
            page_row=np.fromiter((t.page_row for t in req.titles), np.int64, len(req.titles)),
            position=np.fromiter((t.position for t in req.titles), np.int64, len(req.titles)),
        )

    def _resolve_fast(self, req: ArtworkRequest, table: ArtworkTable,
                      day: dt.date) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """(candidate rows [R], candidates per title [T], title rows [T]) of the page, with the
        checks of :meth:`_resolve_checked` run over whole arrays; None if any of them fails,
        so the per-title pass can name every problem."""
        titles = req.titles
        index = table.index
        title_index = table.title_index
        tids = [slot.title_id for slot in titles]
        t_idx = [title_index.get(tid, -1) for tid in tids]
        if -1 in t_idx or len(set(tids)) != len(tids):
            return None
        limit = self.settings.serve_max_artworks
        flat: list[int] = []
        sizes: list[int] = []
        for t, slot in zip(t_idx, titles, strict=True):
            cands = slot.candidates
            if cands is None:
                active = table.active_rows(t, day)
                if len(active) == 0:
                    return None
                flat += active.tolist()
                sizes.append(len(active))
            elif len(cands) > limit:
                return None
            else:
                flat += [index.get(a, -1) for a in cands]
                sizes.append(len(cands))
        rows = np.asarray(flat, dtype=np.int64)
        counts = np.asarray(sizes, dtype=np.int64)
        title_rows = np.asarray(t_idx, dtype=np.int64)
        # unknown ids, ids of another title, an artwork twice (titles are distinct, so a row
        # repeated on the page repeats within its title), not active on the day
        if (rows < 0).any() or (table.title_of[rows] != np.repeat(title_rows, counts)).any() \
                or len(set(flat)) != len(flat) or not table.is_active(rows, day).all():
            return None
        return rows, counts, title_rows

    def _resolve_checked(self, req: ArtworkRequest, table: ArtworkTable,
                         day: dt.date) -> tuple[list[np.ndarray], np.ndarray]:
        """The page title by title; :class:`PageRefused` names every title or artwork that is wrong."""
        s = self.settings
        unknown_titles: list[str] = []
        problems: list[str] = []
        too_many: list[str] = []
        seen: set[str] = set()
        chunks: list[np.ndarray] = []
        title_rows = np.empty(len(req.titles), dtype=np.int64)
        for i, slot in enumerate(req.titles):
            tid = slot.title_id
            if tid in seen:
                problems.append(f"title {tid!r} appears twice on the page")
            seen.add(tid)
            t = table.title_index.get(tid)
            if t is None:
                unknown_titles.append(tid)
                continue
            title_rows[i] = t
            if slot.candidates is None:
                rows = table.active_rows(t, day)
                if len(rows) == 0:
                    problems.append(f"title {tid!r}: no artwork is active on {day.isoformat()}")
                    continue
                chunks.append(rows)
                continue
            if len(slot.candidates) > s.serve_max_artworks:
                too_many.append(tid)
                continue
            rows = [table.index.get(a, -1) for a in slot.candidates]
            unknown = [a for a, r in zip(slot.candidates, rows, strict=True) if r < 0]
            other = [a for a, r in zip(slot.candidates, rows, strict=True) if r >= 0 and table.title_of[r] != t]
            if unknown:
                problems.append(f"title {tid!r}: unknown artwork ids {_names(unknown)}")
            if other:
                problems.append(f"title {tid!r}: artwork ids of another title {_names(other)}")
            if unknown or other:
                continue
            if len(set(rows)) != len(rows):
                problems.append(f"title {tid!r}: candidates repeat an artwork")
                continue
            rows_arr = np.asarray(rows, dtype=np.int64)
            inactive = rows_arr[~table.is_active(rows_arr, day)]
            if len(inactive):
                problems.append(f"title {tid!r}: artwork ids not active on {day.isoformat()} "
                                f"{_names([table.artwork_ids[r] for r in inactive])}")
                continue
            chunks.append(rows_arr)
        if too_many:
            raise PageRefused(413, "too_many_artworks", f"titles {_names(too_many)} have more than "
                              f"{s.serve_max_artworks} candidates (serve_max_artworks)")
        if unknown_titles:
            problems.insert(0, f"unknown title ids {_names(unknown_titles)}")
        if problems:
            raise PageRefused(422, "unknown_ids" if unknown_titles else "bad_candidates", "; ".join(problems))
        return chunks, title_rows

    def features(self, p: Prepared) -> np.ndarray:
        """The page's feature matrix [R, N_FEATURES] (needs a bundle)."""
        ctx = p.request.context
        return page_matrix(p.table, p.member, ctx.device, ctx.local_hour, ctx.day_of_week,
                           p.page_row, p.position, p.rows, p.offsets)

    def choose(self, p: Prepared) -> Choice:
        """One model call for the whole page, then the exploration policy."""
        b = p.bundle
        if b is None:
            if self.settings.serve_cold_start == "uniform":
                # a cold start explores: every active candidate is shown and logged with its
                # exact propensity, so the first day's logs train and evaluate every artwork
                uniform = 1.0 / np.diff(p.offsets)[policy.group_ids(p.offsets)]
                chosen, propensity = policy.draw(uniform, p.offsets, self.rng)
                return Choice(chosen, propensity, "random", DEFAULT, True, uniform)
            is_default = (p.rows == p.table.default_row[p.title_rows][policy.group_ids(p.offsets)]).astype(np.float64)
            chosen = policy.group_argmax(is_default, p.offsets)  # the default, else the first candidate
            one_hot = np.zeros(len(p.rows))
            one_hot[chosen] = 1.0
            return Choice(chosen, np.ones(len(chosen)), DEFAULT, DEFAULT, True, one_hot)
        t0 = time.perf_counter()
        x = self.features(p)
        t1 = time.perf_counter()
        scores = b.score(x)
        t2 = time.perf_counter()
        alpha = b.prior_alpha if b.prior_alpha is not None else p.table.policy_alpha
        beta = b.prior_beta if b.prior_beta is not None else p.table.policy_beta
        n = b.prior_n if b.prior_n is not None else p.table.policy_n
        mm = p.table.model_mean
        probs = policy.probabilities(b.policy, scores, p.offsets, alpha[p.rows], beta[p.rows], n[p.rows], rng=self.rng,
                                     model_mean=mm[p.rows] if mm is not None and b.policy.prior_blend == "residual" else None)
        chosen, propensity = policy.draw(probs, p.offsets, self.rng)
        return Choice(chosen, propensity, b.policy.name, b.version, False, probs, b.registry_version, t2 - t1,
                      t1 - t0, time.perf_counter() - t2)

    def decide(self, req: ArtworkRequest) -> Decided:
        """The page's decisions, its impression-log lines and what the online priors count."""
        t0 = time.perf_counter()
        p = self.prepare(req)
        t1 = time.perf_counter()
        c = self.choose(p)
        t2 = time.perf_counter()
        ts_ms = client_clock_ms(req.ts) if req.ts is not None else int(time.time() * 1000)
        now = dt.datetime.fromtimestamp(ts_ms / 1000, dt.UTC)
        second = now.isoformat(timespec="seconds")  # YYYY-MM-DDTHH:MM:SS+00:00 (strftime costs ~10x)
        ts = f"{second[:19]}.{ts_ms % 1000:03d}Z"
        ctx = req.context
        ids = p.table.artwork_ids
        rows, offsets = p.rows.tolist(), p.offsets.tolist()
        chosen, propensities = c.chosen.tolist(), c.propensity.tolist()
        logged = logged_probabilities(c.probs, c.chosen, c.propensity).tolist()
        shown = [ids[rows[i]] for i in chosen]
        segment = p.member.segment
        event_ids, digests = self.signer.issue_page(ts_ms, segment, shown)
        member_id, model_version, policy_name = req.member_id, c.model_version, c.policy
        dumps = orjson.dumps
        # what every line of the page shares, serialized once; each line is then one bytes
        # format of JSON-encoded pieces (the same bytes as dumping the row's dict)
        head = b',"ts":%s,"member_id":%s' % (dumps(ts), dumps(member_id))
        context = dumps({"device": ctx.device, "country": ctx.country, "local_hour": ctx.local_hour,
                         "day_of_week": ctx.day_of_week})[:-1]
        tail = b',"model_version":%s,"policy":%s,"context":%s' % (dumps(model_version), dumps(policy_name), context)
        decisions = []
        lines = []
        events = []
        for t, slot in enumerate(req.titles):
            lo, hi = offsets[t], offsets[t + 1]
            artwork_id, event_id, propensity = shown[t], event_ids[t], propensities[t]
            ev = Impression.issued(digests[t], ts_ms, artwork_id, segment, hi - lo, propensity)
            if ev is not None:
                events.append(ev)
            decisions.append({"title_id": slot.title_id, "artwork_id": artwork_id, "propensity": propensity,
                              "event_id": event_id, "model_version": model_version})
            candidates = slot.candidates if slot.candidates is not None else [ids[r] for r in rows[lo:hi]]
            lines.append(LINE % (dumps(event_id), head, dumps(slot.title_id), dumps(artwork_id), dumps(candidates),
                                 dumps(propensity), dumps(logged[lo:hi]), tail, slot.page_row, slot.position))
        body = {"model_version": c.model_version, "registry_version": c.registry_version, "policy": c.policy,
                "fallback": c.fallback, "decisions": decisions}
        inference_s = c.inference_s or 0.0
        stages = (t1 - t0, c.features_s, inference_s, t2 - t1 - c.features_s - inference_s, time.perf_counter() - t2)
        return Decided(body, second[:10], lines, p.member.segment, shown, events,
                       p.table, p.rows[c.chosen], c.propensity, c.inference_s, stages)


def client_clock_ms(ts: dt.datetime) -> int:
    """Milliseconds since the epoch of a client-supplied time (naive = UTC)."""
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=dt.UTC)
    return int(ts.timestamp() * 1000)


def _unknown_member() -> Member:
    u = feature_spec.UNKNOWN_MEMBER
    block = feature_spec.member_block([u["member_known"]], [u["member_is_kids"]], [u["member_log_plays_28d"]],
                                  [u["member_days_since_last_play"]])[0]
    return Member(block, feature_spec.member_segment(u["member_is_kids"]), np.zeros(0, np.int64), np.zeros(0))


_UNKNOWN = _unknown_member()
