"""The shared online state (keyart.serving.rewards.RedisState) on the machine's Redis
(127.0.0.1:6379): two replicas sharing it count what one process counts, a duplicate reward
on the other replica is refused, a restart reads the state back, and Redis going away costs
neither a decision nor a double count. Every test has its own key prefix, deleted after."""

from __future__ import annotations

import datetime as dt
import secrets

import numpy as np
import pytest

from keyart.config import Settings
from keyart.serving.rewards import (
    EventSigner,
    Impression,
    LocalState,
    OnlinePriors,
    OnlineStateUnavailable,
    RedisState,
    RewardBook,
    RewardRefused,
    online_state,
)
from keyart.serving.tables import ArtworkTable

redis = pytest.importorskip("redis")

URL = "redis://127.0.0.1:6379/0"
WINDOW_S, MAX_AGE_S = 4 * 3600, 5 * 3600
HOUR = 3_600_000
ADULT, KIDS = "profile=adult", "profile=kids"
SECRET = "online-state-redis-tests-" + "0" * 40
T0 = int(dt.datetime(2026, 11, 2, tzinfo=dt.UTC).timestamp() * 1000)


@pytest.fixture
def client():
    c = redis.Redis.from_url(URL, socket_timeout=5)
    try:
        c.ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis is not reachable at {URL} ({exc}): start it (the machine's redis-server)", pytrace=False)
    yield c
    c.close()


@pytest.fixture
def prefix(client):
    p = f"keyart-test:{secrets.token_hex(6)}:"
    yield p
    keys = list(client.scan_iter(match=p + "*", count=1000))
    if keys:
        client.delete(*keys)


def replica(client, prefix: str) -> RedisState:
    state = RedisState(client, prefix, WINDOW_S, MAX_AGE_S)
    state.sync()
    return state


def delay_ms(rng: np.random.Generator) -> int:
    immediate = rng.random() < 0.65 / 0.95
    return int(60_000 * (0.2 + rng.exponential(2.0) if immediate else 5.0 + min(rng.exponential(45.0), 200.0)))


def traffic(seed: int = 0) -> list[tuple]:
    """A day of history (the reward delays get known), then a day with windows still open:
    ("imp", Impression) and ("rew", event id, decision ms, reward ms) in the order they
    happen, with some rewards reported before their impression reaches the state."""
    rng = np.random.default_rng(seed)
    signer = EventSigner(SECRET)
    ops: list[tuple] = []
    pending: list[tuple[int, tuple]] = []
    start = T0 - 24 * HOUR
    for j in range(1400):
        now = start + j * 90_000 if j < 700 else T0 + 6 * HOUR + (j - 700) * 20_000
        for _t, op in sorted(p for p in pending if p[0] <= now):
            ops.append(op)
        pending = [p for p in pending if p[0] > now]
        artwork = f"t1-a{j % 3}"
        segment = (ADULT, KIDS)[j % 4 == 0]
        propensity = (0.6, 0.3, 0.1)[j % 3]
        eid = signer.issue(now, segment, artwork)
        imp = Impression.of(eid, artwork, 3, propensity)
        rewarded = rng.random() < (0.5 if j < 700 else 0.15)
        reward_ms = now + delay_ms(rng)
        if rewarded and j % 50 == 0:
            ops.append(("rew", eid, now, now + 1000))  # the reward overtakes its impression
            ops.append(("imp", imp, eid, propensity))
            continue
        ops.append(("imp", imp, eid, propensity))
        if rewarded:
            pending.append((reward_ms, ("rew", eid, now, reward_ms)))
    ops += [op for _, op in sorted(pending, key=lambda p: p[0]) if op[3] <= T0 + 12 * HOUR]
    return ops


def play(states: list, ops: list[tuple]) -> int:
    """Apply ``ops`` through the OnlineState interface, round robin over ``states``; a
    reward is claimed first (a refused claim is a duplicate). Returns the duplicates refused."""
    refused = 0
    signer = EventSigner(SECRET)
    for i, op in enumerate(ops):
        state = states[i % len(states)]
        if op[0] == "imp":
            state.add_impressions([op[1]])
        else:
            ref = signer.verify(op[1])
            if not state.claim(ref, op[3]):
                refused += 1
                continue
            state.add_reward(ref, 1, op[3])
    return refused


def assert_same(got, want) -> None:
    keys = sorted(want.keys())
    assert keys and sorted(got.keys()) == keys
    for k in keys:
        assert got.counts(k) == want.counts(k), k
        assert got.evidence(k) == pytest.approx(want.evidence(k), rel=1e-9, abs=1e-9), k
    assert (got.delay_cdf is None) == (want.delay_cdf is None)
    if want.delay_cdf is not None:
        np.testing.assert_allclose(got.delay_cdf, want.delay_cdf, rtol=1e-12)


def test_two_replicas_count_what_one_process_counts(client, prefix):
    ops = traffic()
    one = LocalState(WINDOW_S, MAX_AGE_S)
    play([one], ops)
    assert one.delay_cdf is not None and any(one._young.values())  # windows both closed and open
    assert any(one.counts(k)[1] for k in one.keys())

    a, b = replica(client, prefix), replica(client, prefix)
    play([a, b], ops)
    for r in (a, b):
        r.sync()
        assert_same(r, one)
    assert a.errors == b.errors == 0


def test_own_writes_count_at_once_and_the_others_after_sync(client, prefix):
    signer = EventSigner(SECRET)
    a, b = replica(client, prefix), replica(client, prefix)
    events = [Impression.of(signer.issue(T0 + j, ADULT, "t1-a0"), "t1-a0", 2, 0.5) for j in range(10)]
    changed = a.add_impressions(events)
    key = (dt.datetime.fromtimestamp(T0 / 1000, dt.UTC).strftime("%Y-%m-%d"), "t1-a0", "all")
    assert key in changed and a.counts(key) == (10, 0)
    assert b.counts(key) == (0, 0)
    assert key in b.sync() and b.counts(key) == (10, 0)
    a.add_impressions(events[:3])  # a page logged again counts once
    b.sync()
    assert a.counts(key) == b.counts(key) == (10, 0)


def test_a_duplicate_reward_on_the_other_replica_is_refused_and_counted_once(client, prefix):
    table = ArtworkTable.build(
        [{"artwork_id": f"t1-a{j}", "title_id": "t1", "tags": ["tone:drama"], "is_default": j == 0} for j in range(2)],
        [{"artwork_id": f"t1-a{j}", "segment": "all", "alpha": 5.0, "beta": 95.0, "n_impressions": 100.0}
         for j in range(2)])
    books = []
    for _ in range(2):
        priors = OnlinePriors(replica(client, prefix))
        priors.bind(table, "2026-11-01")
        books.append(RewardBook(EventSigner(SECRET), priors, MAX_AGE_S))
    a, b = books
    eid = a.signer.issue(T0, ADULT, "t1-a0")
    a.priors.record_impressions([Impression.of(eid, "t1-a0", 2, 0.5)])
    ref = a.admit(eid, now_ms=T0 + 60_000)
    a.apply(ref, 1, T0 + 60_000)
    with pytest.raises(RewardRefused) as refused:
        b.admit(eid, now_ms=T0 + 61_000)
    assert refused.value.status == 409
    b.priors.sync()
    assert a.priors.counts("t1-a0", "all") == b.priors.counts("t1-a0", "all") == (1, 1)
    # a reward that could not be logged is released: its retry (on either replica) is accepted
    eid2 = a.signer.issue(T0 + 5, ADULT, "t1-a1")
    ref2 = b.admit(eid2, now_ms=T0 + 70_000)
    b.release(ref2)
    assert a.admit(eid2, now_ms=T0 + 71_000).event_id == eid2


def test_a_restarted_replica_reads_the_state_back(client, prefix):
    ops = traffic(seed=1)
    one = LocalState(WINDOW_S, MAX_AGE_S)
    play([one], ops)
    play([replica(client, prefix)], ops)
    assert_same(replica(client, prefix), one)


def test_redis_down_refuses_rewards_and_keeps_serving(prefix):
    down = redis.Redis(host="127.0.0.1", port=1, socket_timeout=0.5, socket_connect_timeout=0.5)
    state = RedisState(down, prefix, WINDOW_S, MAX_AGE_S)
    signer = EventSigner(SECRET)
    eid = signer.issue(T0, ADULT, "t1-a0")
    assert state.add_impressions([Impression.of(eid, "t1-a0", 2, 0.5)]) == set()
    with pytest.raises(RewardRefused) as refused:
        state.claim(signer.verify(eid), T0)
    assert refused.value.status == 503
    assert state.errors == 2
    with pytest.raises(OnlineStateUnavailable, match="no Redis answers"):
        RedisState.from_url("redis://127.0.0.1:1/0", prefix, WINDOW_S, MAX_AGE_S, timeout_s=0.5)


def test_settings_choose_the_state(prefix, monkeypatch):
    monkeypatch.setenv("KEYART_SERVE_ONLINE_STATE", "redis")
    monkeypatch.setenv("KEYART_SERVE_REDIS_URL", URL)
    monkeypatch.setenv("KEYART_SERVE_REDIS_PREFIX", prefix)
    s = Settings()
    state = online_state(s, WINDOW_S, MAX_AGE_S)
    assert isinstance(state, RedisState) and state.prefix == prefix
    monkeypatch.setenv("KEYART_SERVE_ONLINE_STATE", "local")
    assert isinstance(online_state(Settings(), WINDOW_S, MAX_AGE_S), LocalState)
    monkeypatch.setenv("KEYART_SERVE_ONLINE_STATE", "memcached")
    with pytest.raises(ValueError, match="serve_online_state"):
        Settings()



def test_an_empty_redis_is_seeded_from_the_logs_once(client, prefix, tmp_path):
    """A first start (or a Redis that lost its data) folds the kept days' impression and
    reward logs in, as a restarted local state does; a second replica does not fold again."""
    import orjson

    from keyart.serving.event_log import JsonlLog
    from keyart.serving.rewards import LogTail

    fast = {"fsync": "interval", "fsync_interval_ms": 1000}
    imps, rews = JsonlLog(tmp_path / "impressions", "impressions", **fast), JsonlLog(tmp_path / "rewards", "rewards", **fast)
    for op in traffic(seed=2):
        if op[0] == "imp":
            imp, eid, propensity = op[1:]
            ts = dt.datetime.fromtimestamp(imp.ts_ms / 1000, dt.UTC)
            row = {"event_id": eid, "ts": ts.isoformat().replace("+00:00", "Z"), "member_id": "m1", "title_id": "t1",
                   "artwork_id": imp.artwork_id, "candidates": ["t1-a0", "t1-a1", "t1-a2"], "propensity": propensity}
            imps.append_sync(ts.strftime("%Y-%m-%d"), orjson.dumps(row) + b"\n")
        else:
            ts = dt.datetime.fromtimestamp(op[3] / 1000, dt.UTC)
            row = {"event_id": op[1], "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"), "reward": 1,
                   "artwork_id": op[1].rsplit(".", 1)[1], "minutes": 30.0}
            rews.append_sync(ts.strftime("%Y-%m-%d"), orjson.dumps(row) + b"\n")
    imps.close()
    rews.close()

    def tails():
        return [(LogTail(tmp_path / "impressions", "impressions"), "impressions"),
                (LogTail(tmp_path / "rewards", "rewards"), "rewards")]

    one = LocalState(WINDOW_S, MAX_AGE_S, logs=tails())
    one.sync()
    assert one.delay_cdf is not None and sum(one.counts(k)[1] for k in one.keys()) > 0
    first = RedisState(client, prefix, WINDOW_S, MAX_AGE_S, logs=tails())
    first.sync()
    assert_same(first, one)
    second = RedisState(client, prefix, WINDOW_S, MAX_AGE_S, logs=tails())
    second.sync()
    assert_same(second, one)  # not folded twice
    client.delete(*client.scan_iter(match=prefix + "*", count=1000))  # Redis lost its data
    first.sync()
    assert_same(first, one)  # rebuilt from the logs
    second.sync()
    assert_same(second, one)


def test_days_no_longer_kept_are_dropped_by_the_decision_clock(client, prefix):
    """As in LocalState, the kept days end at the newest decision day (a client clock may be
    far from today); the change marks of older days are dropped from Redis too."""
    signer = EventSigner(SECRET)
    r = replica(client, prefix)
    for d in range(6):
        r.add_impressions([Impression.of(signer.issue(T0 + d * 24 * HOUR, ADULT, "t1-a0"), "t1-a0", 2, 0.5)])
    r.sync()
    kept = ["2026-11-04", "2026-11-05", "2026-11-06", "2026-11-07"]
    assert sorted({k[0] for k in r.keys()}) == kept
    marks = {m.decode().partition(":")[2][:10] for m, _ in client.zscan_iter(prefix + "dirty")}
    assert sorted(marks) == kept
    again = replica(client, prefix)
    assert sorted({k[0] for k in again.keys()}) == kept
