"""Row builders for the Spark job tests: tiny inline data in the contract schemas."""

from __future__ import annotations

import argparse
import datetime as dt
import json
from collections.abc import Iterable, Sequence
from typing import Any

from keyart.contracts import ARTWORKS, IMPRESSIONS, MEMBERS, PLAYS, PRIORS, REWARDS, TITLES

UTC = dt.UTC


def ts(text: str) -> dt.datetime:
    """'2026-03-02 10:00' -> aware UTC datetime."""
    return dt.datetime.fromisoformat(text).replace(tzinfo=UTC)


def iso(text: str) -> str:
    return ts(text).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def context(device: str = "tv", hour: int = 20, dow: int = 2, row: int = 0, pos: int = 1) -> dict[str, Any]:
    return {"device": device, "country": "US", "local_hour": hour, "day_of_week": dow, "page_row": row, "position": pos}


def impression(event_id: str, when: str, member: str = "m1", title: str = "t1", artwork: str = "t1-a0",
               candidates: Sequence[str] = ("t1-a0", "t1-a1"), propensity: float = 0.5, policy: str = "random",
               model_version: str = "random", ctx: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"event_id": event_id, "ts": ts(when), "member_id": member, "title_id": title, "artwork_id": artwork,
            "candidates": list(candidates), "propensity": propensity, "model_version": model_version,
            "policy": policy, "context": ctx or context()}


def play(member: str, title: str, when: str, minutes: float, device: str = "tv") -> dict[str, Any]:
    return {"member_id": member, "title_id": title, "ts": ts(when), "minutes_played": float(minutes), "device": device}


def reward_row(imp: dict[str, Any], reward: int, minutes: float = 0.0, played: int | None = None) -> dict[str, Any]:
    return {**imp, "impression_ds": imp["ts"].date(), "reward": reward, "minutes": float(minutes),
            "played": int(minutes > 0) if played is None else played}


def title(title_id: str, genres: Sequence[str] = ("drama",), cast: Sequence[str] = ()) -> dict[str, Any]:
    return {"title_id": title_id, "name": title_id.upper(), "genres": list(genres), "cast": list(cast), "maturity_rating": "PG"}


def artwork(artwork_id: str, title_id: str, tags: Sequence[str] = (), is_default: bool = False,
            active_from: str = "2026-01-01", active_to: str | None = None) -> dict[str, Any]:
    return {"artwork_id": artwork_id, "title_id": title_id, "tags": list(tags), "is_default": is_default,
            "active_from": dt.date.fromisoformat(active_from), "active_to": dt.date.fromisoformat(active_to) if active_to else None}


def member(member_id: str, profile: str = "adult") -> dict[str, Any]:
    return {"member_id": member_id, "country": "US", "language": "en", "profile": profile, "signup_date": dt.date(2025, 1, 1)}


def prior(title_id: str, artwork_id: str, alpha: float, beta: float, n: float, segment: str = "all") -> dict[str, Any]:
    return {"title_id": title_id, "artwork_id": artwork_id, "segment": segment, "alpha": float(alpha), "beta": float(beta), "n_impressions": float(n)}


SCHEMAS = {"impressions": IMPRESSIONS, "plays": PLAYS, "rewards": REWARDS, "titles": TITLES,
           "artworks": ARTWORKS, "members": MEMBERS, "priors": PRIORS}


def frame(spark, kind: str, rows: Iterable[dict[str, Any]]):
    contract = SCHEMAS[kind]
    return spark.createDataFrame([tuple(r.get(c) for c in contract.columns) for r in rows], contract.spark_schema())


def jsonl(rows: Iterable[dict[str, Any]]) -> str:
    def default(o: Any) -> str:
        if isinstance(o, dt.datetime):
            return o.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return o.isoformat()
    return "".join(json.dumps(r, default=default) + "\n" for r in rows)


def args(ds: str, lake, through: str | None = None) -> argparse.Namespace:
    return argparse.Namespace(ds=ds, through=through, lake=str(lake), master=None, shuffle_partitions=1)
