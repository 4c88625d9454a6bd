"""The logged distribution of every impression survives ingest (checked) and reaches the
training rows, one probability per candidate row."""

from __future__ import annotations

import json

from jobs_fixtures import frame as rows_frame
from jobs_fixtures import impression, iso, reward_row
from test_features import training_inputs

from keyart.contracts import IMPRESSIONS
from keyart.jobs import features, ingest
from keyart.serving.event_log import frame

DS = "2026-03-02"


def logged(event_id: str, probs, propensity: float, as_text: bool = True) -> dict:
    row = impression(event_id, "2026-03-02 10:00", artwork="t1-a1", candidates=["t1-a0", "t1-a1", "t1-a2"],
                     propensity=propensity, policy="squarecb", model_version="v1")
    if as_text:
        row["ts"] = iso("2026-03-02 10:00")
    row["candidate_probabilities"] = probs
    return row


def test_ingest_keeps_consistent_distributions_and_quarantines_the_rest(spark):
    p = 0.7123456789012345
    rows = {
        "ok": logged("ok", [0.143827, p, 0.143827], p),
        "absent": {k: v for k, v in logged("absent", None, p).items() if k != "candidate_probabilities"},
        "short": logged("short", [0.3, p], p),
        "sum": logged("sum", [0.2, p, 0.2], p),
        "shown": logged("shown", [0.143827, 0.712346, 0.143827], p),
        "range": logged("range", [-0.1, p, 0.3876543210987655], p),
        "text": logged("text", ["0.143827", p, 0.143827], p),
    }
    lines = [frame(json.dumps(r).encode()).decode() for r in rows.values()]
    raw = spark.createDataFrame([(DS, "f.jsonl", x) for x in lines], ingest.RAW_SCHEMA)
    result = ingest.transform(raw, IMPRESSIONS)
    clean = {r["event_id"]: r for r in result.clean.collect()}
    assert set(clean) == {"ok", "absent"}
    assert clean["ok"]["candidate_probabilities"] == [0.143827, p, 0.143827]
    assert clean["ok"]["candidate_probabilities"][1] == clean["ok"]["propensity"]
    assert clean["absent"]["candidate_probabilities"] is None
    reasons = {json.loads(r["raw"])["event_id"]: r["reason"] for r in result.quarantine.collect()}
    assert reasons["short"] == "candidate_probabilities must have one value per candidate, got 2 for 3"
    assert reasons["sum"].startswith("candidate_probabilities must sum to 1, got 1.11")
    assert reasons["shown"].startswith("propensity must equal the shown artwork's candidate_probabilities entry")
    assert reasons["range"].startswith("candidate_probabilities")
    assert reasons["text"].startswith("candidate_probabilities must be a array<double>")


def test_training_rows_carry_each_candidates_logged_probability(spark):
    p = 0.7
    with_probs = logged("e1", [0.1, p, 0.2], p, as_text=False)
    without = impression("e2", "2026-03-02 11:00", member="m2", artwork="t1-a0", candidates=["t1-a0", "t1-a1"])
    rewards = rows_frame(spark, "rewards", [reward_row(with_probs, 1, 30.0), reward_row(without, 0)])
    _, snapshots, priors, artworks, titles = training_inputs(spark)
    got = features.feature_inputs(rewards, snapshots, priors, artworks, titles).select(
        "event_id", "artwork_id", "is_logged", "logging_probability").collect()
    by = {(r["event_id"], r["artwork_id"]): r for r in got}
    assert {k: by[k]["logging_probability"] for k in by if k[0] == "e1"} == {
        ("e1", "t1-a0"): 0.1, ("e1", "t1-a1"): p, ("e1", "t1-a2"): 0.2}
    assert by[("e1", "t1-a1")]["is_logged"] and by[("e1", "t1-a1")]["logging_probability"] == p
    assert {by[k]["logging_probability"] for k in by if k[0] == "e2"} == {None}
    assert "logging_probability" in features.ROW_COLUMNS
