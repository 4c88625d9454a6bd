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


# ----------------------------------------------------------------------------------------
# The two-day job chain shared by the standalone-master and Spark Connect tests
# ----------------------------------------------------------------------------------------

CHAIN_D1, CHAIN_D2 = "2026-03-01", "2026-03-02"


def write_raw_day(lake, ds: str, impressions: list[dict], plays: list[dict]) -> None:
    """A day's raw impression and play logs, each ending in a broken line, and the play log's
    completeness marker (its attribution windows may close)."""
    from keyart.lake import mark_plays_delivered

    for log, rows in (("impressions", impressions), ("plays", plays)):
        folder = lake.raw(log, ds)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "part-0.jsonl").write_text(jsonl(rows) + "{not json\n")
    mark_plays_delivered(lake, ds)


def build_lake(spark, lake) -> None:
    """Two days of raw logs (with a broken line each) over a three-artwork catalog."""
    frame(spark, "titles", [title("t1", ["drama"], ["a"]), title("t2", ["comedy"])]).write.parquet(str(lake.titles))
    frame(spark, "artworks", [artwork("t1-a0", "t1", ["cast:a", "tone:drama"], True), artwork("t1-a1", "t1", ["tone:comedy"]),
                              artwork("t2-a0", "t2", ["closeup"], True)]).write.parquet(str(lake.artworks))
    frame(spark, "members", [member(f"m{i}", "kids" if i % 3 == 0 else "adult") for i in range(6)]).write.parquet(str(lake.members))
    for ds in (CHAIN_D1, CHAIN_D2):
        imps, plays = [], []
        for i in range(30):
            m, t = f"m{i % 6}", ("t1" if i % 2 else "t2")
            cands = ["t1-a0", "t1-a1"] if t == "t1" else ["t2-a0"]
            when = f"{ds} {(i * 47) % 24:02d}:{i % 60:02d}"
            imps.append(impression(f"{ds}-e{i}", when, member=m, title=t, artwork=cands[i % len(cands)], candidates=cands,
                                   propensity=1.0 / len(cands)))
            if i % 3:
                plays.append(play(m, t, f"{ds} {(i * 47) % 24:02d}:{min(59, i % 60 + 20):02d}", float(i)))
        write_raw_day(lake, ds, imps, plays)


def run_local(spark, lake, settings) -> None:
    """ingest D1..D2, then rewards, features, priors of D2, in the given session."""
    from keyart.jobs import features, ingest, priors, rewards

    ingest.run(spark, lake, args(CHAIN_D1, lake.root, through=CHAIN_D2), settings)
    for job in (rewards, features, priors):
        job.run(spark, lake, args(CHAIN_D2, lake.root), settings)


def copy_inputs(reference, root):
    """A fresh copy of the chain reference's inputs (tests/jobs/conftest.py) under ``root``."""
    import shutil

    from keyart.lake import Lake

    shutil.copytree(reference["inputs"].root, root)
    return Lake(root)


def assert_same_outputs(spark, local, remote) -> None:
    """Every output of the chain in ``remote`` equals the one in ``local``, row for row."""
    from pyspark.testing import assertDataFrameEqual

    def read(lake, path):
        df = spark.read.parquet(str(path(lake)))
        return df.drop("source_file")   # holds the lake root, which differs

    d1, d2 = CHAIN_D1, CHAIN_D2
    for path in (lambda lk: lk.clean("impressions", d2), lambda lk: lk.quarantine("plays", d1), lambda lk: lk.rewards(d2),
                 lambda lk: lk.member_features(d2), lambda lk: lk.training(d2), lambda lk: lk.priors(d2)):
        expected = read(local, path)
        assert expected.count() > 0
        assertDataFrameEqual(read(remote, path), expected)
    def ingest_metrics(lake):
        # quarantined rows carry source_file (the lake root, which differs): so does their
        # content hash; their rows are compared, as the partitions above are without it
        m = json.loads(lake.metrics("ingest", d2).read_text())
        for name, out in m["output"].items():
            if name.startswith("quarantine/"):
                out.pop("content_hash")
        return m

    assert ingest_metrics(remote) == ingest_metrics(local)
