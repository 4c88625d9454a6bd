"""The world simulator: determinism, contract-valid files, and the ground truth's shape."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from keyart.cli import main
from keyart.config import settings
from keyart.contracts import (
    ARTWORKS,
    IMPRESSIONS,
    MEMBERS,
    PLAYS,
    TITLES,
    parse_timestamp,
    validate_records,
)
from keyart.lake import Lake
from keyart.sim.choosers import (
    ChooserError,
    Decisions,
    RandomChooser,
    build_page_request,
    parse_decisions,
)
from keyart.sim.names import G
from keyart.sim.traffic import simulate_day
from keyart.sim.world import World

DS = "2026-11-01"
WORLD_ARGS = ["--seed", "7", "--titles", "30", "--members", "500"]


def make_lake(root: Path) -> Path:
    assert main(["world", "--out", str(root), *WORLD_ARGS]) == 0
    assert main(["traffic", "--lake", str(root), "--ds", DS, "--policy", "random", "--visits", "300"]) == 0
    return root


@pytest.fixture(scope="module")
def lake(tmp_path_factory) -> Path:
    return make_lake(tmp_path_factory.mktemp("lake"))


@pytest.fixture(scope="module")
def world(lake) -> World:
    return World.load(lake)


def data_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.suffix in (".jsonl", ".parquet", ".npz")}


def contract_for(rel: Path):
    parts = rel.parts
    if parts[:2] == ("catalog", "titles"):
        return TITLES
    if parts[:2] == ("catalog", "artworks"):
        return ARTWORKS
    if parts[0] == "members":
        return MEMBERS
    if parts[:2] == ("raw", "plays"):
        return PLAYS
    if parts[:2] == ("raw", "impressions"):
        return IMPRESSIONS
    raise AssertionError(f"unexpected data file {rel}")


def test_every_written_file_is_contract_valid(lake):
    files = [p for p in lake.rglob("*") if p.suffix in (".jsonl", ".parquet") and "sim" not in p.parts]
    seen = set()
    for path in files:
        rel = path.relative_to(lake)
        contract = contract_for(rel)
        seen.add(contract.name)
        if path.suffix == ".parquet":
            table = pq.read_table(path)
            assert table.schema.equals(contract.arrow_schema(), check_metadata=False), rel
            rows = table.to_pylist()
        else:
            rows = [json.loads(line) for line in path.read_text().splitlines()]
            part = rel.parts[2]
            assert all(parse_timestamp(r["ts"]).date().isoformat() == part[3:] for r in rows), f"{rel}: ds != UTC date of ts"
            assert all(r["ts"].endswith("Z") for r in rows)
        report = validate_records(contract, rows, source=str(rel))
        assert report.rows > 0 and report.ok, report.summary()
    assert seen == {"titles", "artworks", "members", "plays", "impressions"}


def test_catalog_shape(world):
    cat = world.catalog
    assert cat.n_titles == 30
    counts = np.diff(cat.title_art_offsets)
    assert counts.min() >= 4 and counts.max() <= 12
    assert np.bincount(cat.art_title[cat.art_is_default], minlength=cat.n_titles).tolist() == [1] * cat.n_titles
    for tags in cat.art_tags:
        assert sum(t.startswith("tone:") for t in tags) == 1
    assert {"good_will_hunting-couple", "good_will_hunting-robin", "good_will_hunting-default",
            "pulp_fiction-uma", "pulp_fiction-travolta", "the_lost_kite-character", "the_lost_kite-drama"} <= set(cat.art_ids)
    # named actors also appear in generated titles, so history gives members affinities to them
    for actor in ("robin_williams", "uma_thurman", "john_travolta", "matt_damon"):
        generated = [c for tid, c in zip(cat.title_ids, cat.title_cast, strict=True) if tid.startswith("t0")]
        assert any(actor in c for c in generated), actor


def test_world_is_deterministic(tmp_path, lake):
    again = make_lake(tmp_path / "again")
    assert data_files(again) == data_files(lake)


def test_traffic_rerun_is_idempotent(tmp_path):
    root = make_lake(tmp_path / "lake")
    before = data_files(root)
    assert main(["traffic", "--lake", str(root), "--ds", DS, "--policy", "random", "--visits", "300"]) == 0
    assert data_files(root) == before
    summary = json.loads((root / "sim" / "traffic" / f"ds={DS}.json").read_text())
    assert summary["impressions"] == 3000 and summary["visits"] == 300


def test_world_load_roundtrip(world):
    fresh = World.build(seed=7, n_titles=30, n_members=500)
    v = fresh.visits(DS, 50)
    choice = fresh.oracle_choice(v)
    assert np.array_equal(choice, world.oracle_choice(world.visits(DS, 50)))
    assert fresh.expected_value(v, choice) == pytest.approx(world.expected_value(v, choice))


def best_art(world: World, member: int, title_id: str) -> str:
    arts = world.catalog.artworks_of(world.title_index(title_id))
    vals = world.expected_quality_play(np.full(arts.shape, member), arts, "tv", 21, 4, 0, 0)
    return world.catalog.art_ids[int(arts[vals.argmax()])]


def top_adult(world: World, genre: str) -> int:
    adults = np.flatnonzero(~world.members.is_kids)
    return int(adults[world.members.theta[adults, G[genre]].argmax()])


def test_good_will_hunting_art_follows_taste(world):
    assert best_art(world, top_adult(world, "romance"), "good_will_hunting") == "good_will_hunting-couple"
    assert best_art(world, top_adult(world, "comedy"), "good_will_hunting") == "good_will_hunting-robin"


def test_lost_kite_kids_and_adults_prefer_different_art(world):
    arts = world.catalog.artworks_of(world.title_index("the_lost_kite"))
    names = [world.catalog.art_ids[a] for a in arts]

    def favourite(members: np.ndarray) -> str:
        vals = world.expected_quality_play(members[:, None], arts[None, :], "tv", 19, 5, 0, 0)
        return names[int(np.bincount(vals.argmax(1), minlength=len(arts)).argmax())]

    kids = np.flatnonzero(world.members.is_kids)
    adults = np.flatnonzero(~world.members.is_kids)
    assert favourite(kids) == "the_lost_kite-character"
    assert favourite(adults) == "the_lost_kite-drama"
    assert best_art(world, top_adult(world, "drama"), "the_lost_kite") == "the_lost_kite-drama"


def test_oracle_beats_default_beats_random(world):
    v = world.visits(DS, 500)
    oracle = world.expected_value(v, world.oracle_choice(v))
    default = world.expected_value(v, world.default_choice(v))
    random = world.random_value(v)
    assert oracle >= default >= random
    assert oracle >= 1.25 * random
    uniform = np.where(v.candidates >= 0, 1.0 / v.n_candidates[..., None], 0.0)
    assert world.expected_value_of_probs(v, uniform) == pytest.approx(random)


def test_clickbait_raises_plays_but_lowers_quality_plays(world):
    cat = world.catalog
    members = np.arange(world.members.n_members)[:, None]
    diffs_play, diffs_quality = [], []
    for t in np.unique(cat.art_title[cat.art_clickbait]):
        arts = cat.artworks_of(int(t))
        cb = cat.art_clickbait[arts]
        ctx = dict(device="tv", local_hour=21, day_of_week=4, page_row=0, position=0)
        p = world.p_play(members, arts[None, :], **ctx).mean(0)
        q = world.expected_quality_play(members, arts[None, :], **ctx).mean(0)
        diffs_play.append(p[cb].mean() - p[~cb].mean())
        diffs_quality.append(q[cb].mean() - q[~cb].mean())
    assert len(diffs_play) >= 2
    assert np.mean(diffs_play) > 0
    assert np.mean(diffs_quality) < 0


def test_expected_quality_play_matches_sampling(world):
    rng = np.random.default_rng(0)
    member, art = top_adult(world, "comedy"), world.artwork_index("good_will_hunting-robin")
    p_q = world.truth.p_minutes_at_least(member, art, 15.0)
    minutes = world.truth.sample_minutes(rng, np.full(200_000, member), art_idx=np.full(200_000, art))
    assert (minutes >= 15.0).mean() == pytest.approx(float(p_q), abs=0.005)


def test_plays_crossing_midnight_land_in_next_partition(lake):
    plays = Lake(lake).raw("plays", "2026-11-02") / f"traffic-{DS}.jsonl"
    rows = [json.loads(line) for line in plays.read_text().splitlines()]
    assert rows, "some plays caused on the day should start after midnight UTC"
    assert all(r["ts"].startswith("2026-11-02") for r in rows)
    same_day = Lake(lake).raw("plays", DS) / f"traffic-{DS}.jsonl"
    assert all(json.loads(line)["ts"].startswith(DS) for line in same_day.read_text().splitlines())


def test_history_covers_the_days_before_start(lake, world):
    # `keyart world` writes as many days of history as the member features read by default
    days = settings().history_days
    assert world.config.history_days == days
    first = (dt.date.fromisoformat(DS) - dt.timedelta(days=days)).isoformat()
    parts = sorted(p.parent.name for p in (lake / "raw" / "plays").glob("ds=*/history.jsonl"))
    assert parts[0] >= f"ds={first}" and parts[-1] == "ds=2026-10-31"
    assert len(parts) >= 0.9 * days  # (nearly) every day of the window has plays


def test_random_chooser_propensities(world):
    v = world.visits(DS, 40)
    d = RandomChooser().choose(world, v, np.random.default_rng(1))
    assert np.allclose(d.propensity, 1.0 / v.n_candidates)
    assert (world.catalog.art_title[d.artwork_idx] == v.titles).all()
    assert len(set(d.event_id.ravel().tolist())) == v.n_slots


def test_page_request_body(world):
    v = world.visits(DS, 5)
    body = build_page_request(world, v, 2)
    m = int(v.member_idx[2])
    assert body["member_id"] == world.members.member_ids[m]
    assert body["context"] == {"device": ("tv", "mobile", "web", "tablet")[int(v.device[2])],
                               "country": world.members.country[m],
                               "local_hour": int(v.local_hour[2]), "day_of_week": int(v.day_of_week[2])}
    assert [t["title_id"] for t in body["titles"]] == [world.catalog.title_ids[t] for t in v.titles[2]]
    assert [(t["page_row"], t["position"]) for t in body["titles"]] == [(r, p) for r, p in zip(v.page_row, v.position, strict=True)]
    for t in body["titles"]:
        arts = world.catalog.artworks_of(world.title_index(t["title_id"]))
        assert set(t["candidates"]) <= {world.catalog.art_ids[a] for a in arts} and t["candidates"]
    assert parse_timestamp(body["ts"]).date() == dt.date(2026, 11, 1)
    json.dumps(body)  # plain JSON types only
    assert "ts" not in build_page_request(world, v, 2, include_ts=False)


def test_parse_decisions_checks_the_response(world):
    v = world.visits(DS, 3)
    out = Decisions.empty(*v.titles.shape)
    body = build_page_request(world, v, 0)
    payload = {"model_version": "3", "policy": "squarecb", "decisions": [
        {"title_id": t["title_id"], "artwork_id": t["candidates"][-1], "propensity": 0.5, "event_id": f"e{j}"}
        for j, t in enumerate(body["titles"])]}
    parse_decisions(world, v, 0, payload, out)
    assert (out.propensity[0] == 0.5).all() and out.model_version[0] == "3" and out.policy[0] == "squarecb"
    bad = {"decisions": payload["decisions"][1:]}
    with pytest.raises(ChooserError, match="malformed"):
        parse_decisions(world, v, 0, bad, out)


def test_simulate_day_in_memory(world):
    s = simulate_day(world, DS, RandomChooser(), visits=200, seed=3)
    assert s["impressions"] == 2000 and "files" not in s
    e = s["expected_take_rate"]
    assert e["oracle"] >= e["served"] > 0 and e["served"] == pytest.approx(e["random"], rel=0.25)


def test_traffic_without_world_fails_clearly(tmp_path, capsys):
    assert main(["traffic", "--lake", str(tmp_path), "--ds", DS, "--policy", "random"]) == 1
    assert "keyart world" in capsys.readouterr().err


def test_p_delay_within_matches_sampled_delays():
    import numpy as np

    from keyart.sim.traffic import p_delay_within, play_delays_ms

    delays = play_delays_ms(np.random.default_rng(3), 400_000)
    for hours in (0.5, 4.0, 6.0, 9.0):
        assert p_delay_within(hours) == pytest.approx((delays <= hours * 3_600_000).mean(), abs=3e-3)
    assert p_delay_within(9.0) == pytest.approx(1.0, abs=1e-4)  # exponential tails never quite end


class _RecordingEndpoint(RandomChooser):
    """A random chooser that takes rewards, recording the order of decisions and rewards."""

    name = "recording"
    logs_impressions = True

    def __init__(self):
        self.log: list[tuple[str, object]] = []
        self.decided_at: dict[str, np.datetime64] = {}

    def choose(self, world, visits, rng):
        d = super().choose(world, visits, rng)
        d.event_id = np.array([[f"{i}@{visits.ts[r]}" for i in row] for r, row in enumerate(d.event_id)], dtype=object)
        for r, row in enumerate(d.event_id):
            for eid in row:
                self.decided_at[eid] = visits.ts[r]
        self.log.append(("choose", (visits.ts[0], visits.ts[-1])))
        return d

    def send_rewards(self, events):
        self.log.append(("rewards", [(eid, np.datetime64(ts.rstrip("Z"), "ms")) for eid, _, ts in events]))
        return {"sent": len(events), "rejected": 0}


def test_rewards_reach_the_endpoint_during_the_day(world):
    """With rewards, the day is decided hour by hour and every reward is posted after its
    impression was decided and before the first page that comes after its play started."""
    ep = _RecordingEndpoint()
    s = simulate_day(world, DS, ep, visits=600, seed=5, send_rewards=True, attribution_window_hours=4.0)
    chooses = [span for kind, span in ep.log if kind == "choose"]
    assert 12 <= len(chooses) <= 24  # one batch per hour that has visits
    sent = [ev for kind, evs in ep.log if kind == "rewards" for ev in evs]
    assert s["rewards"]["sent"] == len(sent) == s["quality_plays_in_window"] > 0
    assert len({eid for eid, _ in sent}) == len(sent)
    later_batches = 0
    for k, (kind, payload) in enumerate(ep.log):
        if kind != "rewards":
            continue
        for eid, play_ts in payload:
            assert ep.decided_at[eid] <= play_ts  # decided before its play
            nxt = next((span for kd, span in ep.log[k + 1:] if kd == "choose"), None)
            if nxt is not None:
                assert play_ts < nxt[0]  # posted before the next hour's pages are decided
                later_batches += 1
    assert later_batches > 0.5 * len(sent)  # most rewards arrive while the day is still being served


def test_simulator_does_not_import_the_feature_specification():
    import ast

    import keyart.sim

    for path in Path(keyart.sim.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any("feature_spec" in n for n in names), f"{path.name} imports the feature specification"


def test_unseen_tag_vocabulary_keeps_the_world_and_renames_its_tags():
    from keyart.sim.names import ART_FLAGS, GENRES

    default = World.build(seed=3, n_titles=30, n_members=200, history_days=7)
    unseen = World.build(seed=3, n_titles=30, n_members=200, history_days=7, tag_vocabulary="unseen")
    assert unseen.config.tag_vocabulary == "unseen"
    for name in ("art_tone", "art_cast", "art_flags", "art_idio", "art_clickbait"):
        np.testing.assert_array_equal(getattr(default.catalog, name), getattr(unseen.catalog, name))
    np.testing.assert_array_equal(default.members.theta, unseen.members.theta)
    visits = default.visits(DS, 50)
    np.testing.assert_array_equal(default.candidate_values(visits), unseen.candidate_values(visits))
    old_words = {f"tone:{g}" for g in GENRES} | set(ART_FLAGS)
    tags = {t for ts in unseen.catalog.art_tags for t in ts}
    assert not tags & old_words
    assert {t.split(":")[0] for t in tags if ":" in t} >= {"cast", "mood", "style", "palette", "shot", "campaign"}
    for d, u in zip(default.catalog.art_tags, unseen.catalog.art_tags, strict=True):
        assert [t for t in d if t.startswith("cast:")] == [t for t in u if t.startswith("cast:")]
    with pytest.raises(ValueError, match="unknown tag vocabulary"):
        World.build(seed=3, n_titles=30, n_members=200, history_days=7, tag_vocabulary="klingon")


def test_unseen_vocabulary_world_roundtrips(tmp_path):
    assert main(["world", "--out", str(tmp_path), *WORLD_ARGS, "--tag-vocabulary", "unseen"]) == 0
    world = World.load(tmp_path)
    assert world.config.tag_vocabulary == "unseen"
    saved = pq.read_table(Lake(tmp_path).artworks).column("tags").to_pylist()
    assert saved == world.catalog.art_tags
