"""Serving's cached, vectorised feature assembly equals keyart.feature_spec.feature_matrix exactly."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest

from keyart import feature_spec
from keyart.config import Settings
from keyart.serving.bundle_store import load_bundle
from keyart.serving.page import page_matrix


def reference_matrix(bundle_path, member_id, ctx, slots, vocabulary=None, members=None):
    """feature_matrix over inputs built straight from the bundle's Parquet files and its vocabulary
    (``vocabulary``, ``members``: a vocabulary and member rows to use instead)."""
    if vocabulary is None:
        vocabulary = feature_spec.Vocabulary.from_dict(json.loads((bundle_path / "feature_spec.json").read_text())["vocabulary"])
    arts = {r["artwork_id"]: r for r in pq.read_table(bundle_path / "artworks.parquet").to_pylist()}
    if members is None:
        members = {r["member_id"]: r for r in pq.read_table(bundle_path / "members.parquet").to_pylist()}
    post = {(r["artwork_id"], r["segment"]): r for r in pq.read_table(bundle_path / "priors.parquet").to_pylist()}
    m = members.get(member_id)
    mem = dict(member_known=1, **{k: m.get(k, v) for k, v in feature_spec.UNKNOWN_MEMBER.items() if k != "member_known"}) \
        if m else dict(feature_spec.UNKNOWN_MEMBER)
    seg = feature_spec.member_segment(mem["member_is_kids"])
    rows = [(slot, a) for slot in slots for a in slot["candidates"]]
    nan = float("nan")

    def p(a, s, k):
        r = post.get((a, s))
        return r[k] if r else nan

    pri = feature_spec.prior_inputs(
        [p(a, "all", "alpha") for _, a in rows], [p(a, "all", "beta") for _, a in rows],
        [p(a, "all", "n_impressions") for _, a in rows],
        [p(a, seg, "alpha") for _, a in rows], [p(a, seg, "beta") for _, a in rows],
        [slot["title_id"] for slot, _ in rows])
    inputs = {k: [mem[k]] * len(rows) for k in feature_spec.UNKNOWN_MEMBER}
    inputs.update(
        device=[ctx["device"]] * len(rows), local_hour=[ctx["local_hour"]] * len(rows),
        day_of_week=[ctx["day_of_week"]] * len(rows),
        page_row=[s["page_row"] for s, _ in rows], position=[s["position"] for s, _ in rows],
        art_tags=[arts[a]["tags"] for _, a in rows], art_is_default=[arts[a]["is_default"] for _, a in rows],
        title_genres=[arts[a]["title_genres"] for _, a in rows], title_id=[slot["title_id"] for slot, _ in rows], **pri)
    return feature_spec.feature_matrix(inputs, vocabulary)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_page_matrix_equals_feature_matrix(bundle_dir, seed):
    path, world = bundle_dir
    b = load_bundle(path, "test", Settings())
    rng = np.random.default_rng(seed)
    for trial in range(10):
        member = world.member_ids[int(rng.integers(len(world.member_ids)))] if trial % 3 else "unknown-member"
        ctx = {"device": str(rng.choice(feature_spec.DEVICES)), "local_hour": int(rng.integers(24)),
               "day_of_week": int(rng.integers(7))}
        slots = random_page(rng, world)
        rows = np.array([b.artworks.index[a] for s in slots for a in s["candidates"]])
        offsets = np.concatenate([[0], np.cumsum([len(s["candidates"]) for s in slots])])
        got = page_matrix(b.artworks, b.members.get(member), ctx["device"], ctx["local_hour"], ctx["day_of_week"],
                          np.array([s["page_row"] for s in slots]), np.array([s["position"] for s in slots]),
                          rows, offsets)
        want = reference_matrix(path, member, ctx, slots)
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
        if trial % 3:  # a known member: the bundle's embeddings reach the page (or the member has no factors)
            emb = want[:, feature_spec.FEATURE_NAMES.index("emb_member_artwork")]
            assert (emb != 0).any() or b.members.get(member).factors is None


def random_page(rng, world):
    titles = rng.choice(world.title_ids, size=int(rng.integers(1, 12)), replace=False)
    slots = []
    for i, t in enumerate(titles):
        arts = world.artworks_of[str(t)]
        k = int(rng.integers(1, len(arts) + 1))
        slots.append({"title_id": str(t), "page_row": i // 4, "position": i % 4,
                      "candidates": [str(a) for a in rng.choice(arts, size=k, replace=False)]})
    return slots


@pytest.mark.parametrize("seed", [0, 1])
def test_page_matrix_with_learned_vocabulary_and_responses_equals_feature_matrix(bundle_dir, seed):
    """The bundle's vocabulary (learned from its catalog) and members with tag responses:
    serving's tables and page assembly give feature_matrix's values bit for bit."""
    from collections import Counter

    from keyart.serving.tables import ArtworkTable, MemberTable

    path, world = bundle_dir
    rng = np.random.default_rng(seed)
    art_rows = pq.read_table(path / "artworks.parquet").to_pylist()
    counts = Counter(t for r in art_rows for t in set(r["tags"]))
    genres = Counter(g for r in art_rows for g in set(r["title_genres"]))
    vocabulary = feature_spec.learn_vocabulary(dict(counts), dict(genres))
    assert vocabulary.tags and vocabulary.genres
    # embeddings of rank 4: every tag but one and every title a vector, half the titles a mean artwork vector
    titles = sorted({r["title_id"] for r in art_rows})
    vec = lambda: tuple(rng.normal(size=4).tolist())  # noqa: E731
    vocabulary = replace(vocabulary, embeddings=feature_spec.Embeddings(
        4, titles={t: vec() for t in titles}, tags={t: vec() for t in sorted(counts)[1:]},
        title_artworks={t: vec() for t in titles[::2]}, tag_profiles={t: vec() for t in sorted(counts)[::2]}))
    all_tags = sorted(counts) + ["never:shown"]
    members = {}
    for r in pq.read_table(path / "members.parquet").to_pylist():
        k = int(rng.integers(0, 12))
        tags = [str(t) for t in rng.choice(all_tags, size=k, replace=False)]
        n = rng.integers(0, 6, size=k).astype(float)  # n = 0 entries must not count
        rank = int(rng.choice([4, 4, 4, 0, 3]))  # factors of another rank count as none
        members[r["member_id"]] = {**r, "response_tags": tags, "response_n": n.tolist(),
                                   "response_values": feature_spec.response_lift(rng.binomial(n.astype(int), 0.3), n, 0.2).tolist(),
                                   "member_factors": rng.normal(size=rank).tolist()}
    table = ArtworkTable.build(art_rows, pq.read_table(path / "priors.parquet").to_pylist(), vocabulary)
    member_table = MemberTable(list(members.values()), table.vocab, table.vocabulary, table.resp_vocab)
    col = {name: i for i, name in enumerate(feature_spec.FEATURE_NAMES)}
    nonzero = np.zeros(feature_spec.N_FEATURES, bool)
    for trial in range(15):
        member = world.member_ids[int(rng.integers(len(world.member_ids)))] if trial % 4 else "unknown-member"
        ctx = {"device": str(rng.choice(feature_spec.DEVICES)), "local_hour": int(rng.integers(24)),
               "day_of_week": int(rng.integers(7))}
        slots = random_page(rng, world)
        rows = np.array([table.index[a] for s in slots for a in s["candidates"]])
        offsets = np.concatenate([[0], np.cumsum([len(s["candidates"]) for s in slots])])
        got = page_matrix(table, member_table.get(member), ctx["device"], ctx["local_hour"], ctx["day_of_week"],
                          np.array([s["page_row"] for s in slots]), np.array([s["position"] for s in slots]), rows, offsets)
        want = reference_matrix(path, member, ctx, slots, vocabulary, members)
        np.testing.assert_array_equal(got, want)
        nonzero |= (want != 0).any(axis=0)
    genre_cols = [col[f"member_genre_{j}"] for j in range(feature_spec.N_GENRE_SLOTS)]
    assert nonzero[[col["art_tag_0"], col["resp_lift_sum"], col["resp_lift_max"], col["resp_log_n"]]].all()
    assert nonzero[[col[name] for name in feature_spec.EMBEDDING_FEATURES]].all()
    assert nonzero[genre_cols].any()


def test_serving_app_does_not_import_training_libraries():
    code = ("import sys, keyart.serving.app; "
            "bad = [m for m in ('lightgbm', 'pyspark', 'onnxmltools') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
