"""features: member snapshot arithmetic, training rows, parity with keyart.feature_spec, reruns."""

from __future__ import annotations

import datetime as dt
import math

import numpy as np
import pandas as pd
import pytest
from jobs_fixtures import args, artwork, frame, impression, member, play, prior, reward_row, title
from pyspark.sql import functions as F
from pyspark.testing import assertDataFrameEqual

from keyart import feature_spec
from keyart.jobs import features
from keyart.jobs.common import write_day
from keyart.lake import Lake

DS = "2026-03-02"
PARAMS = features.SnapshotParams(DS, history_days=90, affinity_half_life_days=30.0)


def catalog(spark):
    titles = frame(spark, "titles", [title("t1", ["drama"], ["a"]), title("t2", ["comedy"])])
    artworks = frame(spark, "artworks", [
        artwork("t1-a0", "t1", ["cast:a", "tone:drama", "closeup"], is_default=True),
        artwork("t1-a1", "t1", ["tone:comedy"]),
        artwork("t2-a0", "t2", [], is_default=True),
    ])
    return titles, artworks


def test_member_snapshot_time_decayed_shares(spark):
    titles, _ = catalog(spark)
    plays = frame(spark, "plays", [
        play("m1", "t1", "2026-03-02 12:00", 60),   # age 0.5 d
        play("m1", "t2", "2026-02-01 00:00", 40),   # age 30 d = one half-life
        play("m1", "t1", "2025-11-01 00:00", 99),   # older than history_days
        play("m1", "t2", "2026-03-03 01:00", 99),   # after the snapshot
        play("m3", "t1", "2026-03-02 12:00", 10),   # not a member
    ])
    members = frame(spark, "members", [member("m1"), member("m2", "kids")])
    got = {r["member_id"]: r for r in features.member_snapshot(plays, titles, members, PARAMS)[0].collect()}
    assert set(got) == {"m1", "m2"}
    w1, w2 = 60 * 0.5 ** (0.5 / 30), 20.0
    m1 = got["m1"]
    assert m1["member_is_kids"] == 0
    assert m1["member_log_plays_28d"] == math.log1p(1)
    assert math.isclose(m1["member_days_since_last_play"], 0.5)
    assert m1["affinity_tags"] == ["cast:a", "genre:comedy", "genre:drama"]
    np.testing.assert_allclose(m1["affinity_values"], [w1 / (w1 + w2), w2 / (w1 + w2), w1 / (w1 + w2)])
    m2 = got["m2"]
    assert (m2["member_is_kids"], m2["member_log_plays_28d"], m2["member_days_since_last_play"]) == (1, 0.0, feature_spec.DAYS_SINCE_CAP)
    assert m2["affinity_tags"] == [] and m2["affinity_values"] == []


def training_inputs(spark):
    e1 = impression("e1", "2026-03-02 10:00", member="m1", artwork="t1-a1", candidates=["t1-a0", "t1-a1"], propensity=0.5)
    e2 = impression("e2", "2026-03-01 23:00", member="m9", title="t2", artwork="t2-a0", candidates=["t2-a0"], propensity=1.0)
    rewards = frame(spark, "rewards", [reward_row(e1, 1, 30.0), reward_row(e2, 0)])
    snap = pd.DataFrame([{"member_id": "m1", "member_is_kids": 0, "member_log_plays_28d": 1.5, "member_days_since_last_play": 2.0,
                          "affinity_tags": ["cast:a", "genre:drama"], "affinity_values": [0.8, 0.5],
                          "response_tags": ["cast:a", "closeup", "tone:comedy"], "response_values": [0.04, -0.01, 0.03],
                          "response_n": [3.0, 2.0, 4.0], "member_factors": [0.5, -1.0]}])
    snapshots = spark.createDataFrame(snap, features.SNAPSHOT_SCHEMA).withColumn("snapshot_ds", F.lit("2026-03-01").cast("date"))
    priors = frame(spark, "priors", [prior("t1", "t1-a0", 2, 8, 10), prior("t1", "t1-a1", 5, 5, 10),
                                     prior("t1", "t1-a1", 6, 4, 10, "profile=adult")])
    priors = priors.withColumn("prior_ds", F.lit("2026-03-01").cast("date"))
    titles, artworks = catalog(spark)
    return rewards, snapshots, priors, artworks, titles


# the vocabulary of the day before the impressions: one tag column, the rest hashed
# and its embeddings (rank 2): t1 has factors and a mean artwork vector, t2 neither
EMBEDDINGS = feature_spec.Embeddings(2, titles={"t1": (0.3, 0.1)}, tags={"tone:drama": (0.2, -0.1), "cast:a": (0.05, 0.0),
                                                                         "tone:comedy": (-0.1, 0.3)},
                                     title_artworks={"t1": (0.1, 0.1)}, tag_profiles={"tone:drama": (0.0, 1.0)})
VOCABULARIES = {"2026-03-01": feature_spec.Vocabulary(tags=("tone:drama",), genres=("comedy", "drama"), embeddings=EMBEDDINGS)}


def expected_features() -> dict[tuple[str, str], np.ndarray]:
    """The same rows assembled by hand and passed to keyart.feature_spec directly."""
    ctx = {"device": "tv", "local_hour": 20, "day_of_week": 2, "page_row": 0, "position": 1}
    known = {"member_known": 1, "member_is_kids": 0, "member_log_plays_28d": 1.5, "member_days_since_last_play": 2.0,
             "affinity_tags": ["cast:a", "genre:drama"], "affinity_values": [0.8, 0.5],
             "response_tags": ["cast:a", "closeup", "tone:comedy"], "response_values": [0.04, -0.01, 0.03],
             "response_n": [3.0, 2.0, 4.0], "member_factors": [0.5, -1.0]}
    rows = [
        {**known, **ctx, "art_tags": ["cast:a", "tone:drama", "closeup"], "art_is_default": 1, "title_genres": ["drama"], "title_id": "t1"},
        {**known, **ctx, "art_tags": ["tone:comedy"], "art_is_default": 0, "title_genres": ["drama"], "title_id": "t1"},
        {**feature_spec.UNKNOWN_MEMBER, **ctx, "art_tags": [], "art_is_default": 1, "title_genres": ["comedy"], "title_id": "t2"},
    ]
    nan = float("nan")
    pri = feature_spec.prior_inputs([2, 5, nan], [8, 5, nan], [10, 10, nan], [nan, 6, nan], [nan, 4, nan], ["e1", "e1", "e2"])
    inputs = pd.DataFrame(rows)
    for k, v in pri.items():
        inputs[k] = v
    matrix = feature_spec.feature_matrix(inputs, VOCABULARIES["2026-03-01"])
    return {("e1", "t1-a0"): matrix[0], ("e1", "t1-a1"): matrix[1], ("e2", "t2-a0"): matrix[2]}


def vec(value: bytes | bytearray) -> np.ndarray:
    """A training row's ``features`` value (binary, little-endian float32) as numbers."""
    return np.frombuffer(bytes(value), dtype="<f4")


def test_training_rows_and_feature_parity(spark):
    got = features.transform(*training_inputs(spark), VOCABULARIES).collect()
    by_key = {(r["event_id"], r["artwork_id"]): r for r in got}
    expected = expected_features()
    assert set(by_key) == set(expected)
    for key, vector in expected.items():
        assert len(by_key[key]["features"]) == 4 * feature_spec.N_FEATURES  # little-endian float32 each
        np.testing.assert_array_equal(vec(by_key[key]["features"]), vector)
    a0, a1, other = by_key[("e1", "t1-a0")], by_key[("e1", "t1-a1")], by_key[("e2", "t2-a0")]
    assert (a0["is_logged"], a1["is_logged"], other["is_logged"]) == (False, True, True)
    assert (a1["prior_alpha"], a1["prior_beta"], a1["prior_n"], a1["segment"]) == (5.0, 5.0, 10.0, "profile=adult")
    assert (other["prior_alpha"], other["prior_beta"], other["prior_n"]) == (*feature_spec.DEFAULT_PRIOR, 0.0)
    assert (a1["reward"], a1["minutes"], a1["played"], a1["logged_artwork_id"]) == (1, 30.0, 1, "t1-a1")
    col = {n: i for i, n in enumerate(feature_spec.FEATURE_NAMES)}
    f0 = vec(a0["features"])
    assert f0[col["art_tag_0"]] == 1.0 and f0[col["member_genre_1"]] == np.float32(0.5)
    assert f0[col[f"art_tag_bucket_{feature_spec.tag_bucket('closeup') - feature_spec.N_TAG_SLOTS}"]] == 1.0
    assert f0[col["resp_lift_sum"]] == np.float32(0.04 + -0.01) and f0[col["resp_lift_max"]] == np.float32(0.04)
    assert f0[col["resp_log_n"]] == np.float32(math.log1p(5.0))
    # member (0.5, -1) . t1 (0.3, 0.1); . (cast:a + tone:drama); minus t1's mean artwork vector (0.1, 0.1)
    assert f0[col["emb_member_title"]] == np.float32(0.5 * 0.3 - 0.1)
    assert f0[col["emb_member_artwork"]] == pytest.approx(0.5 * 0.25 + 0.1, abs=1e-7)
    assert f0[col["emb_artwork_lift"]] == pytest.approx(0.5 * 0.15 + 0.2, abs=1e-7)
    assert f0[col["emb_artwork_genres"]] == np.float32(-1.0)
    assert vec(other["features"])[col["emb_member_title"]:].tolist() == [0.0] * len(feature_spec.EMBEDDING_FEATURES)
    assert other["impression_ds"] == dt.date(2026, 3, 1) and other["ts"] == dt.datetime(2026, 3, 1, 23, 0)


def test_training_rows_are_feature_matrix_of_the_candidate_inputs(spark):
    # the job explodes candidates inside its Arrow step; feature_inputs explodes them in Spark:
    # every training row must carry that row's inputs, and feature_matrix of them
    inputs = training_inputs(spark)
    rows = features.feature_inputs(*inputs).toPandas()
    got = {(r["event_id"], r["artwork_id"]): r for r in features.transform(*inputs, VOCABULARIES).collect()}
    assert set(got) == set(zip(rows["event_id"], rows["artwork_id"], strict=True))
    priors = feature_spec.prior_inputs(*(rows[c].astype("float64") for c in ("prior_alpha", "prior_beta", "prior_n", "seg_alpha", "seg_beta")),
                                       rows["event_id"])
    matrix_inputs = rows.assign(**priors)
    for day in rows["known_ds"].unique():
        part = matrix_inputs[matrix_inputs["known_ds"] == day].reset_index(drop=True)
        want = feature_spec.feature_matrix(part, VOCABULARIES.get(day.isoformat()))
        for i, r in part.iterrows():
            row = got[(r["event_id"], r["artwork_id"])]
            np.testing.assert_array_equal(vec(row["features"]), want[i])
            missing = pd.isna(r["prior_alpha"]) or pd.isna(r["prior_beta"])
            assert (row["prior_alpha"], row["prior_beta"], row["prior_n"]) == (
                (*feature_spec.DEFAULT_PRIOR, 0.0) if missing else (r["prior_alpha"], r["prior_beta"], r["prior_n"]))
            for name in ("is_logged", "segment", "logged_artwork_id", "member_id", "propensity", "reward"):
                assert row[name] == r[name], name
            assert row["logging_probability"] == (None if pd.isna(r["logging_probability"]) else r["logging_probability"])


def test_impressions_split_across_arrow_batches_keep_their_title_mean(spark):
    inputs = training_inputs(spark)
    whole = features.transform(*inputs, VOCABULARIES)
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "1")
    try:
        split = features.transform(*inputs, VOCABULARIES).collect()
    finally:
        spark.conf.unset("spark.sql.execution.arrow.maxRecordsPerBatch")
    assertDataFrameEqual(split, whole.collect())


def test_run_writes_snapshot_and_training_and_rerun_is_identical(spark, lake, settings):
    rewards, _, priors, artworks, titles = training_inputs(spark)
    titles.write.parquet(str(lake.titles))
    artworks.write.parquet(str(lake.artworks))
    frame(spark, "members", [member("m1"), member("m9", "kids")]).write.parquet(str(lake.members))
    write_day(frame(spark, "plays", [play("m1", "t1", "2026-02-28 20:00", 50)]), lake.clean("plays", "2026-02-28"))
    write_day(rewards, lake.rewards(DS))
    write_day(priors.drop("prior_ds"), lake.priors("2026-03-01"))
    features.run(spark, lake, args(DS, lake.root), settings)
    vocabulary = feature_spec.read_vocabulary(lake.root, DS)
    assert vocabulary.genres == ("comedy", "drama") and vocabulary.tags == ()  # no tag on 5 artworks
    snapshot = spark.read.parquet(str(lake.member_features(DS)))
    training = spark.read.parquet(str(lake.training(DS)))
    assert snapshot.count() == 2 and training.count() == 3
    m1 = training.where("event_id = 'e1'").first()
    assert vec(m1["features"])[feature_spec.FEATURE_NAMES.index("member_known")] == 1.0  # snapshot of 03-01 computed from plays
    first_snap, first_train = snapshot.collect(), training.collect()
    features.run(spark, lake, args(DS, lake.root), settings)
    assertDataFrameEqual(spark.read.parquet(str(lake.member_features(DS))), first_snap)
    assertDataFrameEqual(spark.read.parquet(str(lake.training(DS))), first_train)
    assert feature_spec.read_vocabulary(lake.root, DS) == vocabulary


def test_after_a_day_without_priors_training_rows_see_the_priors_serving_kept(spark, tmp_path, settings):
    """The priors task did not run on 02-28 and 03-01, so neither did export: serving kept the
    bundle exported on 02-27, with 02-27's priors, for the impressions of 03-01 and 03-02. Their
    training rows must carry those priors, not the missing-prior default."""
    rewards, _, priors, artworks, titles = training_inputs(spark)
    priors = priors.drop("prior_ds")

    lake = Lake(tmp_path / "lake")
    titles.write.parquet(str(lake.titles))
    artworks.write.parquet(str(lake.artworks))
    frame(spark, "members", [member("m1"), member("m9", "kids")]).write.parquet(str(lake.members))
    write_day(frame(spark, "plays", [play("m1", "t1", "2026-02-26 20:00", 50)]), lake.clean("plays", "2026-02-26"))
    write_day(rewards, lake.rewards(DS))
    write_day(priors, lake.priors("2026-02-27"))
    features.run(spark, lake, args(DS, lake.root), settings)
    mean = feature_spec.FEATURE_NAMES.index("art_prior_mean")
    assert {r["artwork_id"]: float(vec(r["features"])[mean]) for r in spark.read.parquet(str(lake.training(DS))).collect()
            if r["event_id"] == "e1"} == pytest.approx({"t1-a0": 2 / 10, "t1-a1": 5 / 10})  # 02-27's, not the default's 0.1
    # what the job looked them up in: 02-27's rows, as each known day's, whole
    served = features.served_priors(spark, lake, ["2026-02-28", "2026-03-01"], settings.prior_max_gap_days)
    assertDataFrameEqual(served, priors.withColumn("prior_ds", F.lit("2026-02-28").cast("date")).unionByName(
        priors.withColumn("prior_ds", F.lit("2026-03-01").cast("date"))))
    assert features.served_priors(spark, lake, ["2026-03-01"], 2).count() == 0  # older than the gap limit


def test_member_responses_are_the_spec_formula_on_data_before_the_day(spark):
    titles, artworks = catalog(spark)

    def labelled_on(day, rows):
        return frame(spark, "rewards", rows).withColumn("labelled_ds", F.lit(day).cast("date"))

    def shown(event, member_id, art, when="2026-03-01 10:00"):
        return impression(event, when, member=member_id, artwork=art, candidates=["t1-a0", "t1-a1"])

    # m1 saw t1-a0 (cast:a, tone:drama, closeup) 3 times with 2 quality plays and t1-a1 (tone:comedy)
    # once without; m2 saw t1-a1 with a quality play and t1-a0 without, relabelled a quality play
    # the next day (a late play); an impression after the snapshot day and a label written after
    # it do not count
    day1 = labelled_on("2026-03-01", [
        reward_row(shown("e0", "m1", "t1-a0"), 1), reward_row(shown("e1", "m1", "t1-a0"), 1),
        reward_row(shown("e2", "m1", "t1-a0"), 0), reward_row(shown("e3", "m1", "t1-a1"), 0),
        reward_row(shown("f1", "m2", "t1-a1"), 1), reward_row(shown("f2", "m2", "t1-a0"), 0)])
    day2 = labelled_on("2026-03-02", [reward_row(shown("f2", "m2", "t1-a0"), 1)])
    later = labelled_on("2026-03-03", [reward_row(shown("late", "m1", "t1-a1", "2026-03-03 09:00"), 1),
                                       reward_row(shown("e2", "m1", "t1-a0"), 1)])
    labelled = day1.unionByName(day2).unionByName(later)
    members = frame(spark, "members", [member("m1"), member("m2"), member("m3")])
    snap = {r["member_id"]: r for r in features.member_snapshot(
        frame(spark, "plays", []), titles, members, PARAMS, labelled, artworks)[0].collect()}
    lift = feature_spec.response_lift
    # population over the window: the t1-a0 tags 3 of 4, tone:comedy 1 of 2
    m1, m2 = snap["m1"], snap["m2"]
    assert m1["response_tags"] == ["cast:a", "closeup", "tone:comedy", "tone:drama"]
    np.testing.assert_array_equal(m1["response_values"], [lift(2.0, 3.0, 0.75), lift(2.0, 3.0, 0.75),
                                                          lift(0.0, 1.0, 0.5), lift(2.0, 3.0, 0.75)])
    assert m1["response_n"] == [3.0, 3.0, 1.0, 3.0]
    np.testing.assert_array_equal(m2["response_values"], [lift(1.0, 1.0, 0.75), lift(1.0, 1.0, 0.75),
                                                          lift(1.0, 1.0, 0.5), lift(1.0, 1.0, 0.75)])
    assert m2["response_n"] == [1.0] * 4
    assert snap["m3"]["response_tags"] == [] and snap["m3"]["response_n"] == []


def test_vocabulary_is_learned_sticky_and_written(spark, lake, settings, tmp_path):
    _, artworks = catalog(spark)
    titles, _ = catalog(spark)
    counts = features.catalog_counts(artworks, titles)
    assert counts == ({"cast:a": 1, "tone:drama": 1, "closeup": 1, "tone:comedy": 1}, {"drama": 1, "comedy": 1})
    first = features.vocabulary_for(lake, "2026-03-01", ({"mood:dark": 9, "text": 6, "rare": 1, "cast:x": 50}, {"drama": 3}))
    assert first.tags == ("mood:dark", "text") and first.genres == ("drama",)
    features.write_vocabulary(first, lake, "2026-03-01")
    # the next day's catalog: 'text' is now rarer than a new tag, but keeps its column
    later = features.vocabulary_for(lake, "2026-03-02", ({"mood:dark": 9, "text": 5, "shot:wide": 7}, {"comedy": 4, "drama": 3}))
    assert later.tags == ("mood:dark", "text", "shot:wide") and later.genres == ("drama", "comedy")
    assert features.vocabulary_for(lake, "2026-03-01", ({}, {})) == first


def test_embeddings_separate_tastes_and_learn_which_members_a_tag_speaks_to(spark):
    """Two groups of members play two disjoint sets of titles; group A responds to artworks tagged
    ``mood:warm``, group B does not. ALS factors and the tag's response direction recover both,
    whatever the tag is called: member . title and member . artwork rank the right group first."""
    rng = np.random.default_rng(3)
    group = {f"m{i:02d}": "A" if i < 12 else "B" for i in range(24)}
    titles = frame(spark, "titles", [title(f"{g}{j}", ["drama"]) for g in "AB" for j in range(4)])
    artworks = frame(spark, "artworks", [
        artwork(f"{g}{j}-warm", f"{g}{j}", ["mood:warm"], is_default=True) for g in "AB" for j in range(4)
    ] + [artwork(f"{g}{j}-cold", f"{g}{j}", ["mood:cold"]) for g in "AB" for j in range(4)])
    plays = frame(spark, "plays", [
        play(m, f"{g}{int(rng.integers(4))}", f"2026-02-{int(rng.integers(1, 28)):02d} 20:00", float(rng.uniform(20, 90)))
        for m, g in group.items() for _ in range(8)])
    shown_rows = []
    for m, g in group.items():
        for k in range(30):
            t = f"{'AB'[k % 2]}{k % 4}"
            art = f"{t}-{'warm' if k % 3 else 'cold'}"
            warm = art.endswith("warm")
            reward = int(rng.random() < (0.6 if warm and g == "A" else 0.15))
            shown_rows.append(reward_row(impression(f"{m}-{k}", "2026-03-01 10:00", member=m, title=t, artwork=art,
                                                    candidates=[f"{t}-warm", f"{t}-cold"]), reward))
    labelled = frame(spark, "rewards", shown_rows).withColumn("labelled_ds", F.lit("2026-03-01").cast("date"))
    members = frame(spark, "members", [member(m) for m in group])
    params = features.SnapshotParams(DS, 90, 30.0, embeddings=features.EmbeddingParams(rank=4, iterations=15, tag_ridge=10.0))
    snap, emb = features.member_snapshot(plays, titles, members, params, labelled, artworks)
    factors = {r["member_id"]: np.asarray(r["member_factors"]) for r in snap.collect()}
    assert emb.rank == 4 and all(len(f) == 4 for f in factors.values())
    assert set(emb.titles) == {f"{g}{j}" for g in "AB" for j in range(4)} and set(emb.tags) == {"mood:warm", "mood:cold"}
    # ALS: a member's own group's titles score higher than the other group's
    for m, g in group.items():
        own = np.mean([factors[m] @ emb.title_vector(f"{g}{j}") for j in range(4)])
        other = np.mean([factors[m] @ emb.title_vector(f"{'B' if g == 'A' else 'A'}{j}") for j in range(4)])
        assert own > other, m
    # the warm tag's direction: A's members are predicted to respond to it more than B's
    warm = emb.artwork_vector(["mood:warm"])
    a = np.mean([factors[m] @ warm for m, g in group.items() if g == "A"])
    b = np.mean([factors[m] @ warm for m, g in group.items() if g == "B"])
    assert a > b + 0.05
    # title means: the mean of the title's two artwork vectors, so warm - mean = (warm - cold) / 2
    np.testing.assert_allclose(emb.lift_vector(["mood:warm"], "A0"),
                               (emb.artwork_vector(["mood:warm"]) - emb.artwork_vector(["mood:cold"])) / 2)
    # a rerun gives the same fit (seeded)
    _, again = features.member_snapshot(plays, titles, members, params, labelled, artworks)
    assert again == emb
    # with the vocabulary's genres, each vector ends with the member's minute shares on them
    # (every play here is a drama: 1.0) and a title's with 1 / its genres on its own
    snap, with_genres = features.member_snapshot(plays, titles, members, params, labelled, artworks, ["drama", "comedy"])
    assert with_genres.rank == 6 and with_genres.titles["A0"][4:] == (1.0, 0.0)
    assert all(list(r["member_factors"][4:]) == [1.0, 0.0] for r in snap.collect())
    assert set(with_genres.tags) == {"mood:warm", "mood:cold"}
    # each tag's catalog genre profile: both moods are on dramas only
    assert with_genres.tag_profiles["mood:warm"] == (0.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    assert np.asarray(with_genres.artwork_profile(["mood:warm", "mood:cold"]))[4] == 2.0


def test_no_embeddings_at_rank_zero(spark):
    titles, artworks = catalog(spark)
    plays = frame(spark, "plays", [play("m1", "t1", "2026-03-02 12:00", 60)])
    members = frame(spark, "members", [member("m1")])
    params = features.SnapshotParams(DS, 90, 30.0, embeddings=features.EmbeddingParams(rank=0))
    snap, emb = features.member_snapshot(plays, titles, members, params)
    assert emb == feature_spec.Embeddings() and snap.first()["member_factors"] == []
