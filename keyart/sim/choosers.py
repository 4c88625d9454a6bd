"""Choosers: who picks the artwork for every slot of a simulated page.

A chooser takes the day's :class:`~keyart.sim.visits.Visits` and returns
:class:`Decisions` (artwork, propensity, event id, model version, policy per slot).
:class:`RandomChooser` decides locally and its impressions are written by the traffic
simulator; :class:`HttpChooser` asks the serving endpoint, which logs its own impressions.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from keyart.contracts import DEVICES
from keyart.sim.io import iso_z
from keyart.sim.visits import Visits

if TYPE_CHECKING:
    from keyart.sim.world import World

log = logging.getLogger(__name__)


class ChooserError(RuntimeError):
    """The chooser could not decide (endpoint down, malformed response, ...)."""


@dataclass
class Decisions:
    """What was shown at every slot of every visit.

    Attributes
    ----------
    artwork_idx, propensity, event_id : ndarray [V, P]
    model_version, policy : ndarray [V] (str)
    """

    artwork_idx: np.ndarray
    propensity: np.ndarray
    event_id: np.ndarray
    model_version: np.ndarray
    policy: np.ndarray

    @classmethod
    def empty(cls, visits: int, slots: int) -> Decisions:
        """Arrays for ``visits`` x ``slots`` decisions, every artwork -1 until filled."""
        return cls(np.full((visits, slots), -1, dtype=np.int64), np.zeros((visits, slots)),
                   np.empty((visits, slots), dtype=object), np.empty(visits, dtype=object),
                   np.empty(visits, dtype=object))


class Chooser(Protocol):
    """Anything that decides artworks for a batch of visits."""

    name: str
    logs_impressions: bool
    """True when the chooser logs impressions itself (the endpoint), so traffic must not."""

    def choose(self, world: World, visits: Visits, rng: np.random.Generator) -> Decisions: ...


class RandomChooser:
    """Uniform over the active candidates, propensity 1/K; traffic writes its impressions."""

    name = "random"
    logs_impressions = False

    def choose(self, world: World, visits: Visits, rng: np.random.Generator) -> Decisions:
        k = visits.n_candidates
        pick = np.minimum((rng.random(k.shape) * k).astype(np.int64), k - 1)
        art = np.take_along_axis(visits.candidates, pick[..., None], -1)[..., 0]
        day = visits.ds.replace("-", "")
        v, p = visits.titles.shape
        ids = np.array([f"rnd-{day}-{i:06d}-{j:02d}" for i in range(v) for j in range(p)], dtype=object).reshape(v, p)
        return Decisions(
            artwork_idx=art,
            propensity=1.0 / k,
            event_id=ids,
            model_version=np.full(v, "random", dtype=object),
            policy=np.full(v, "random", dtype=object),
        )


def build_page_request(world: World, visits: Visits, i: int, include_ts: bool = True) -> dict[str, Any]:
    """The ``POST /v1/artwork`` body for visit ``i`` (docs/architecture.md).

    Candidates are listed explicitly (the artworks active on the visit's day), so the
    endpoint and the simulator agree on them. ``ts`` (the simulated request time, ISO-8601
    UTC) is included when ``include_ts`` so the endpoint can stamp its impressions with
    simulated rather than wall-clock time.
    """
    cat, mem = world.catalog, world.members
    m = int(visits.member_idx[i])
    titles = []
    for j, t in enumerate(visits.titles[i].tolist()):
        cands = visits.candidates[i, j]
        titles.append({
            "title_id": cat.title_ids[t],
            "candidates": [cat.art_ids[a] for a in cands[cands >= 0].tolist()],
            "page_row": int(visits.page_row[j]),
            "position": int(visits.position[j]),
        })
    body: dict[str, Any] = {
        "member_id": mem.member_ids[m],
        "context": {
            "device": DEVICES[int(visits.device[i])],
            "country": mem.country[m],
            "local_hour": int(visits.local_hour[i]),
            "day_of_week": int(visits.day_of_week[i]),
        },
        "titles": titles,
    }
    if include_ts:
        body["ts"] = iso_z(visits.ts[i : i + 1])[0]
    return body


class HttpChooser:
    """Asks the serving endpoint (``POST {url}/v1/artwork``) for every visit, concurrently."""

    logs_impressions = True

    def __init__(self, url: str, timeout: float = 10.0, workers: int = 8, include_ts: bool = True) -> None:
        self.url = url.rstrip("/")
        self.name = "http"
        self.timeout = timeout
        self.workers = workers
        self.include_ts = include_ts

    def _client(self):
        import httpx

        return httpx.Client(base_url=self.url, timeout=self.timeout,
                            limits=httpx.Limits(max_connections=self.workers, max_keepalive_connections=self.workers))

    def _unreachable(self, exc: Exception) -> ChooserError:
        return ChooserError(
            f"artwork endpoint {self.url} is unreachable ({type(exc).__name__}: {exc}); "
            "start it with `keyart serve` or use --policy random"
        )

    def choose(self, world: World, visits: Visits, rng: np.random.Generator) -> Decisions:
        import httpx

        v, p = visits.titles.shape
        out = Decisions.empty(v, p)
        with self._client() as client:
            try:
                client.get("/healthz")
            except httpx.TransportError as exc:
                raise self._unreachable(exc) from exc

            def one(i: int) -> None:
                body = build_page_request(world, visits, i, self.include_ts)
                try:
                    resp = client.post("/v1/artwork", json=body)
                except httpx.TransportError as exc:
                    raise self._unreachable(exc) from exc
                if resp.status_code != 200:
                    raise ChooserError(f"POST {self.url}/v1/artwork -> {resp.status_code}: {resp.text[:300]}")
                parse_decisions(world, visits, i, resp.json(), out)

            with ThreadPoolExecutor(self.workers) as pool:
                for _ in pool.map(one, range(v)):
                    pass
        return out

    def send_rewards(self, events: list[tuple[str, float, str]]) -> dict[str, int]:
        """POST a reward of 1 for each (event_id, minutes, play ts ISO-8601); returns counts of
        accepted and rejected. The play time is sent as ``ts`` when ``include_ts``, so an
        endpoint on the client clock ages rewards in simulated time."""
        import httpx

        counts = {"sent": 0, "rejected": 0}
        if not events:
            return counts
        with self._client() as client:
            def one(ev: tuple[str, float, str]) -> bool:
                try:
                    body = {"event_id": ev[0], "reward": 1, "minutes": float(ev[1])}
                    if self.include_ts:
                        body["ts"] = ev[2]
                    resp = client.post("/v1/reward", json=body)
                except httpx.TransportError as exc:
                    raise self._unreachable(exc) from exc
                return resp.status_code < 300

            with ThreadPoolExecutor(self.workers) as pool:
                for ok in pool.map(one, events):
                    counts["sent" if ok else "rejected"] += 1
        if counts["rejected"]:
            log.warning("%d of %d rewards were rejected by %s", counts["rejected"], len(events), self.url)
        return counts


def parse_decisions(world: World, visits: Visits, i: int, payload: Any, out: Decisions) -> None:
    """Fill row ``i`` of ``out`` from a ``/v1/artwork`` response; check it fully."""
    try:
        decisions = {d["title_id"]: d for d in payload["decisions"]}
        for j, t in enumerate(visits.titles[i].tolist()):
            d = decisions[world.catalog.title_ids[t]]
            a = world.artwork_index(d["artwork_id"])
            if a not in visits.candidates[i, j]:
                raise ChooserError(f"visit {i}: endpoint chose {d['artwork_id']}, not a candidate of {world.catalog.title_ids[t]}")
            out.artwork_idx[i, j] = a
            out.propensity[i, j] = float(d["propensity"])
            out.event_id[i, j] = str(d["event_id"])
        out.model_version[i] = str(payload.get("model_version", ""))
        out.policy[i] = str(payload.get("policy", ""))
    except (KeyError, TypeError, ValueError) as exc:
        raise ChooserError(f"visit {i}: malformed /v1/artwork response ({type(exc).__name__}: {exc}): {str(payload)[:300]}") from exc
