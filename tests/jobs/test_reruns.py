"""Rerun identity: a rerun of a day writes the same content, and the metrics say so.

Spark's Parquet is not byte-identical across reruns (file names carry a per-write UUID), so
idempotency is defined on content: each written partition's rows and an order-independent
content hash, recorded in the job's metrics (docs/jobs.md, "Reruns")."""

from __future__ import annotations

import json

from jobs_fixtures import args, artwork, frame, impression, member, play, write_raw_day

from keyart.contracts import IMPRESSIONS, PLAYS, PRIORS, REWARDS
from keyart.jobs import ingest, priors, rewards
from keyart.jobs.common import partition_content

D1, D2 = "2026-03-01", "2026-03-02"


def build(spark, lake) -> None:
    frame(spark, "artworks", [artwork("t1-a0", "t1", is_default=True), artwork("t1-a1", "t1"),
                              artwork("t2-a0", "t2", is_default=True)]).write.parquet(str(lake.artworks))
    frame(spark, "members", [member(f"m{i}", "kids" if i % 3 == 0 else "adult") for i in range(6)]).write.parquet(str(lake.members))
    for ds in (D1, D2):
        imps, plays = [], []
        for i in range(24):
            m, t = f"m{i % 6}", ("t1" if i % 2 else "t2")
            cands = ["t1-a0", "t1-a1"] if t == "t1" else ["t2-a0"]
            hour = (i * 7) % 20
            imps.append(impression(f"{ds}-e{i}", f"{ds} {hour:02d}:{i:02d}", member=m, title=t, artwork=cands[i % len(cands)],
                                   candidates=cands, propensity=1.0 / len(cands)))
            if i % 3:
                plays.append(play(m, t, f"{ds} {hour:02d}:{i + 20:02d}", float(5 * i)))
        write_raw_day(lake, ds, imps + imps[:2], plays)   # two exact duplicates


def run_days(spark, lake, settings) -> dict[str, dict]:
    out = {}
    for ds in (D1, D2):
        ingest.run(spark, lake, args(ds, lake.root), settings)
        rewards.run(spark, lake, args(ds, lake.root), settings)
        priors.run(spark, lake, args(ds, lake.root), settings)
        out[ds] = {job: json.loads(lake.metrics(job, ds).read_text()) for job in ("ingest", "rewards", "priors")}
    return out


def identities(metrics: dict) -> dict:
    return {"ingest": metrics["ingest"]["output"], "rewards": metrics["rewards"]["output"], "priors": metrics["priors"]["output"]}


def files(path) -> set[str]:
    return {p.name for p in path.glob("*.parquet")}


def test_a_rerun_writes_the_same_content_and_its_metrics_prove_it(spark, lake, settings):
    build(spark, lake)
    first = run_days(spark, lake, settings)
    names = {ds: files(lake.rewards(ds)) for ds in (D1, D2)}
    m = first[D2]
    assert m["ingest"]["output"]["clean/impressions"]["rows"] == 24
    assert m["rewards"]["output"]["rows"] == m["rewards"]["labelled"] > 0

    # each recorded identity is that of the partition on disk
    on_disk = {
        "clean/impressions": (lake.clean("impressions", D2), IMPRESSIONS),
        "clean/plays": (lake.clean("plays", D2), PLAYS),
    }
    for name, (path, contract) in on_disk.items():
        back = spark.read.schema(contract.spark_schema()).parquet(str(path))
        assert partition_content(back) == m["ingest"]["output"][name]
    assert partition_content(spark.read.schema(REWARDS.spark_schema()).parquet(str(lake.rewards(D2)))) == m["rewards"]["output"]
    assert partition_content(spark.read.schema(PRIORS.spark_schema()).parquet(str(lake.priors(D2)))) == m["priors"]["output"]

    second = run_days(spark, lake, settings)
    for ds in (D1, D2):
        assert identities(second[ds]) == identities(first[ds])
        assert second[ds] == first[ds]            # every figure, not only the hashes
        assert files(lake.rewards(ds)) != names[ds]   # new files (new names): identity is content, not bytes

    # a changed input changes exactly the identities it should
    raw = lake.raw("plays", D2) / "part-0.jsonl"
    raw.write_text(raw.read_text().replace('"minutes_played": 5.0', '"minutes_played": 6.0', 1))
    ingest.run(spark, lake, args(D2, lake.root), settings)
    changed = json.loads(lake.metrics("ingest", D2).read_text())["output"]
    assert changed["clean/plays"] != first[D2]["ingest"]["output"]["clean/plays"]
    assert changed["clean/plays"]["rows"] == first[D2]["ingest"]["output"]["clean/plays"]["rows"]
    assert changed["clean/impressions"] == first[D2]["ingest"]["output"]["clean/impressions"]
