"""Online Beta priors (keyart.serving.rewards): what an impression and a reward count for,
when, with which weight, and that a restart or a second worker counts the same."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import orjson
import pytest

from keyart.ope import weighted_evidence
from keyart.serving.event_log import JsonlLog
from keyart.serving.rewards import (
    DELAY_BINS,
    EventSigner,
    Impression,
    LocalState,
    LogTail,
    OnlinePriors,
    RewardBook,
)
from keyart.serving.tables import ArtworkTable

PRIORS_DS, DAY = "2026-11-01", "2026-11-02"
ADULT, KIDS = "profile=adult", "profile=kids"
WINDOW_S, MAX_AGE_S = 4 * 3600, 5 * 3600
HOUR = 3_600_000
SECRET = "online-priors-tests-secret-" + "0" * 40
T0 = int(dt.datetime(2026, 11, 2, tzinfo=dt.UTC).timestamp() * 1000)  # DAY, 00:00 UTC


def table(n_artworks: int = 3, alpha: float = 5.0, beta: float = 95.0, n: float = 100.0) -> ArtworkTable:
    arts = [{"artwork_id": f"t1-a{j}", "title_id": "t1", "tags": ["tone:drama"], "is_default": j == 0}
            for j in range(n_artworks)]
    rows = [{"artwork_id": a["artwork_id"], "segment": "all", "alpha": alpha, "beta": beta, "n_impressions": n}
            for a in arts]
    return ArtworkTable.build(arts, rows)


def mean(p: OnlinePriors, i: int) -> float:
    return float(p.alpha[i] / (p.alpha[i] + p.beta[i]))


class Worker:
    """One serving process: its own logs in the shared directories, its state folding the others'."""

    def __init__(self, root: Path, name: str, arts: ArtworkTable | None = None):
        fast = {"fsync": "interval", "fsync_interval_ms": 1000}  # durability is not what these tests are about
        self.logs = [JsonlLog(root / "impressions", "impressions", **fast), JsonlLog(root / "rewards", "rewards", **fast)]
        for log in self.logs:
            log._tag = name  # distinct file names, as distinct pids give them
        tails = [(LogTail(log.root, log.prefix, own=log), log.prefix) for log in self.logs]
        self.state = LocalState(WINDOW_S, MAX_AGE_S, logs=tails)
        self.priors = OnlinePriors(self.state)
        self.book = RewardBook(EventSigner(SECRET), self.priors, MAX_AGE_S)
        self.signer = self.book.signer
        self.priors.sync()
        if arts is not None:
            self.priors.bind(arts, PRIORS_DS)

    def show(self, ts_ms: int, artwork_id: str, k: int = 2, propensity: float = 0.5, segment: str = ADULT) -> str:
        event_id = self.signer.issue(ts_ms, segment, artwork_id)
        ts = dt.datetime.fromtimestamp(ts_ms / 1000, dt.UTC)
        row = {"event_id": event_id, "ts": ts.isoformat().replace("+00:00", "Z"), "member_id": "m1", "title_id": "t1",
               "artwork_id": artwork_id, "candidates": [f"t1-a{j}" for j in range(k)], "propensity": propensity}
        self.logs[0].append_sync(ts.strftime("%Y-%m-%d"), orjson.dumps(row) + b"\n")
        self.priors.record_impressions([Impression.from_row(row)])
        return event_id

    def reward(self, event_id: str, ts_ms: int, reward: int = 1) -> int:
        """Post a reward; the HTTP status the endpoint would answer."""
        from keyart.serving.rewards import RewardRefused

        try:
            ref = self.book.admit(event_id, now_ms=ts_ms)
        except RewardRefused as exc:
            return exc.status
        ds, line = self.book.record_line(ref, reward, 30.0, dt.datetime.fromtimestamp(ts_ms / 1000, dt.UTC))
        self.logs[1].append_sync(ds, line)
        self.book.apply(ref, reward, ts_ms)
        return 200

    def close(self) -> None:
        for log in self.logs:
            log.close()


@pytest.fixture
def worker(tmp_path):
    w = Worker(tmp_path, "w1", table())
    yield w
    w.close()


def learned_delays(w: Worker, day0_ms: int, n: int = 400, seed: int = 0) -> None:
    """A day of history whose rewards arrive like the simulator's plays (most within an
    hour), so the state knows the reward-delay distribution."""
    rng = np.random.default_rng(seed)
    for j in range(n):
        ts = day0_ms + j * 60_000
        eid = w.show(ts, "t1-a2")
        w.reward(eid, ts + int(delay_ms(rng)))
    w.show(day0_ms + 23 * HOUR, "t1-a2")  # the clock passes every window of the history


def delay_ms(rng: np.random.Generator) -> float:
    immediate = rng.random() < 0.65 / 0.95
    return 60_000 * (0.2 + rng.exponential(2.0) if immediate else 5.0 + min(rng.exponential(45.0), 200.0))


def test_pending_impressions_count_only_once_their_window_closes(worker):
    """200 impressions and 10 rewards: nothing moves while the windows are open (no delay
    distribution is known yet), then exactly 10 successes and 190 failures."""
    events = [worker.show(T0 + j * 1000, "t1-a0") for j in range(200)]
    for eid in events[:10]:
        assert worker.reward(eid, T0 + HOUR) == 200
    assert worker.priors.delta("t1-a0", "all") == (0.0, 0.0, 0.0)
    assert (worker.priors.alpha[0], worker.priors.beta[0]) == (5.0, 95.0)
    assert worker.priors.counts("t1-a0", "all") == (200, 10)
    worker.show(T0 + 5 * HOUR, "t1-a1")  # the clock passes the cohort's window
    assert worker.priors.delta("t1-a0", "all") == pytest.approx((10.0, 190.0, 200.0))
    assert mean(worker.priors, 0) == pytest.approx(15 / 300)  # 0.05, as the take rate says
    assert worker.priors.delta("t1-a0", ADULT) == pytest.approx((10.0, 190.0, 200.0))
    assert worker.reward(events[0], T0 + 5 * HOUR) == 409


def test_counts_are_importance_weighted_as_in_the_priors_job(worker):
    """The logging policy favoured a0 (p = 0.9) and rarely showed it in the contexts where it
    failed (p = 0.1): on-policy counts say 0.5, the weighted evidence says what the priors job
    will add for the same day (self-normalised IPS, Kish's effective sample size)."""
    w_hi, w_lo = 1 / (2 * 0.9), 1 / (2 * 0.1)
    ids = [worker.show(T0 + j, "t1-a0", propensity=0.9) for j in range(10)]
    ids += [worker.show(T0 + 10 + j, "t1-a0", propensity=0.1) for j in range(10)]
    for eid in ids[:10]:
        worker.reward(eid, T0 + 1000)
    worker.show(T0 + 5 * HOUR, "t1-a1")
    weights = np.r_[np.full(10, w_hi), np.full(10, w_lo)]
    rewards = np.r_[np.ones(10), np.zeros(10)]
    expected = weighted_evidence(weights.sum(), (weights ** 2).sum(), (weights * rewards).sum())
    got = worker.priors.delta("t1-a0", "all")
    assert got == pytest.approx(expected)
    assert got[0] / got[2] == pytest.approx(0.1)  # the rate as if shown in every context; on-policy: 0.5
    assert got[2] == pytest.approx(12.195, abs=0.001)  # 20 impressions this unequally weighted count as 12.2


def test_a_new_artworks_first_hour_does_not_push_it_below_its_prior(tmp_path):
    """A new artwork (empirical-Bayes prior Beta(1, 19): mean 0.05) is shown 1,000 times in
    its first hour and earns quality plays at 5%, which arrive minutes to hours later.
    Counting pending impressions as failures (the old rule) pulls its mean 18% below the
    prior, whatever its true rate; counting each open cohort's rewards out of the share of
    it whose outcome is known keeps it at the prior."""
    w = Worker(tmp_path, "w1", table(3, alpha=1.0, beta=19.0, n=0.0))
    try:
        learned_delays(w, T0 - 24 * HOUR)
        assert w.state.delay_cdf is not None
        rng = np.random.default_rng(1)
        start = T0 + 8 * HOUR
        due: list[tuple[int, str]] = []
        for j in range(1000):
            now = start + j * 3600
            for t, eid in [d for d in due if d[0] <= now]:
                w.reward(eid, t)
            due = [d for d in due if d[0] > now]
            eid = w.show(now, "t1-a0", k=3, propensity=1 / 3)
            if rng.random() < 0.05:
                due.append((now + int(delay_ms(rng)), eid))
        shown, rewarded = w.priors.counts("t1-a0", "all")
        old_rule = (1.0 + rewarded) / (20.0 + shown)
        assert shown == 1000 and old_rule < 0.85 * 0.05
        assert 0.97 * 0.05 <= mean(w.priors, 0) <= 1.15 * 0.05
        assert w.priors.n[0] > 500  # and it learned from the hour: most outcomes are known within it
    finally:
        w.close()


def test_a_restart_keeps_an_artworks_mean_at_its_take_rate(tmp_path):
    """200 impressions and 10 rewards: mean 0.05 before the restart and after it. Replaying
    the rewards without the impressions made it (5 + 10) / (100 + 10) ~ 0.14 here, 0.37
    with the issue's weaker prior."""
    w = Worker(tmp_path, "before", table())
    events = [w.show(T0 + j * 1000, "t1-a0") for j in range(200)]
    for eid in events[:10]:
        w.reward(eid, T0 + HOUR)
    w.show(T0 + 5 * HOUR, "t1-a1")
    assert mean(w.priors, 0) == pytest.approx(0.05)
    w.close()
    again = Worker(tmp_path, "after", table())
    try:
        assert mean(again.priors, 0) == pytest.approx(0.05)
        assert again.priors.counts("t1-a0", "all") == (200, 10)
    finally:
        again.close()


def test_restart_mid_day_leaves_every_online_mean_unchanged(tmp_path):
    """The issue's scenario, mid-window and mid-day: a restarted process folds the day's
    impression and reward logs back in and gets every array, delta and count again."""
    arts = table()
    w = Worker(tmp_path, "before", arts)
    learned_delays(w, T0 - 24 * HOUR)
    rng = np.random.default_rng(2)
    rewarded = []
    for j in range(600):
        now = T0 + 6 * HOUR + j * 20_000
        eid = w.show(now, f"t1-a{j % 2}", k=3, propensity=[0.6, 0.3][j % 2], segment=(ADULT, KIDS)[j % 3 == 0])
        if rng.random() < 0.1:
            assert w.reward(eid, now + int(delay_ms(rng))) == 200
            rewarded.append(eid)
    before = (w.priors.alpha.copy(), w.priors.beta.copy(), w.priors.n.copy())
    keys = sorted(w.state.keys())
    evidence = {k: w.state.evidence(k) for k in keys}
    counts = {k: w.state.counts(k) for k in keys}
    assert w.priors.counts("t1-a0", "all")[0] >= 200 and any(b for b in w.state._young)  # windows still open
    w.close()

    again = Worker(tmp_path, "after", arts)
    try:
        assert sorted(again.state.keys()) == keys
        for k in keys:
            assert again.state.evidence(k) == pytest.approx(evidence[k], rel=1e-12, abs=1e-12), k
            assert again.state.counts(k) == counts[k]
        for got, want in zip((again.priors.alpha, again.priors.beta, again.priors.n), before, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-12)
        assert again.reward(rewarded[-1], T0 + 10 * HOUR) == 409  # de-duplication survives too
    finally:
        again.close()


def test_two_workers_count_what_one_process_counts(tmp_path):
    """Two workers share the log directories; a duplicate reward reaches the other worker
    before it has seen the first. After folding each other's logs both hold the counts one
    process holds (a fresh process folding every log), and the duplicate counts once."""
    arts = table()
    a, b = Worker(tmp_path, "a", arts), Worker(tmp_path, "b", arts)
    try:
        learned_delays(a, T0 - 24 * HOUR)
        rng = np.random.default_rng(3)
        ids = []
        for j in range(300):
            w = (a, b)[j % 2]
            now = T0 + 6 * HOUR + j * 10_000
            ids.append((w.show(now, f"t1-a{j % 3 % 2}"), now))
        for eid, now in ids[::7]:
            assert a.reward(eid, now + int(delay_ms(rng))) == 200
        first, when = ids[0]
        assert b.reward(first, when + 60_000) == 200  # b has not folded a's reward log yet
        a.priors.sync()
        b.priors.sync()
        assert b.reward(first, when + 120_000) == 409  # now it has
        one = Worker(tmp_path, "reference", arts)
        try:
            keys = sorted(one.state.keys())
            assert sorted(a.state.keys()) == sorted(b.state.keys()) == keys
            for k in keys:
                for w in (a, b):
                    assert w.state.counts(k) == one.state.counts(k), k
                    assert w.state.evidence(k) == pytest.approx(one.state.evidence(k), rel=1e-12, abs=1e-12), k
            for w in (a, b):
                np.testing.assert_allclose(w.priors.alpha, one.priors.alpha, rtol=1e-12)
                np.testing.assert_allclose(w.priors.beta, one.priors.beta, rtol=1e-12)
            shown = sum(1 for eid, _ in ids if eid.endswith("t1-a0"))
            rewarded = sum(1 for eid, _ in ids[::7] if eid.endswith("t1-a0"))
            assert one.priors.counts("t1-a0", "all") == (shown, rewarded)
        finally:
            one.close()
    finally:
        a.close()
        b.close()


def test_days_the_bundle_already_holds_do_not_apply(worker):
    for j in range(10):
        worker.show(T0 - 12 * HOUR + j, "t1-a0")  # decided on PRIORS_DS
    worker.show(T0 + 6 * HOUR, "t1-a1")
    assert (worker.priors.alpha[0], worker.priors.beta[0], worker.priors.n[0]) == (5.0, 95.0, 100.0)
    assert worker.priors.delta("t1-a0", "all") == (0.0, 0.0, 0.0)
    assert worker.priors.counts("t1-a0", "all") == (10, 0)


def test_old_days_are_pruned_relative_to_the_newest_day_not_the_wall_clock(worker):
    """Simulated or replayed traffic runs on a client clock far from today."""
    for d in range(5):
        worker.show(T0 + d * 24 * HOUR, "t1-a0")
    assert sorted({k[0] for k in worker.state.keys()}) == ["2026-11-03", "2026-11-04", "2026-11-05", "2026-11-06"]


def test_cohorts_span_the_attribution_window():
    s = LocalState(WINDOW_S, MAX_AGE_S)
    assert s.bin_ms * DELAY_BINS == WINDOW_S * 1000


def test_per_impression_state_is_invisible_to_the_cyclic_collector(worker):
    """Every page leaves ~10 entries for the reward age limit: hundreds of thousands at a few
    hundred pages/s. Held in containers the collector tracks, each full collection walked
    them all and stalled every in-flight request (30-120 ms, growing with the traffic)."""
    import gc

    rewarded = [worker.show(T0 + j * 1000, f"t1-a{j % 3}", segment=(ADULT, KIDS)[j % 2]) for j in range(300)]
    for j, eid in enumerate(rewarded[:100]):
        assert worker.reward(eid, T0 + j * 1000 + 30_000) == 200
    worker.show(T0 + 4 * HOUR + 60_000, "t1-a0")  # the first cohorts close: their entries are read back
    gc.collect()
    state = worker.state
    assert len(state._entries) >= 300
    assert not gc.is_tracked(state._entries)
    assert not any(gc.is_tracked(ids) for ids in state._by_bin.values())
    # what the entries carry still adds up: 300 impressions, 100 of them rewarded, both segments' keys
    counts = {k: state.counts(k) for k in state.keys()}
    assert sum(c[0] for k, c in counts.items() if k[2] == "all") == 301
    assert sum(c[1] for k, c in counts.items() if k[2] == "all") == 100
    assert sum(c[1] for k, c in counts.items() if k[2] != "all") == 100
