"""The endpoint's counters count every page and request, however they are batched or cached:
:class:`DecisionStats` folds pages in batches (and on every read), :class:`Metrics` looks
labelled children up once."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from keyart.serving.metrics import FOLD_PAGES, PROPENSITY_BUCKETS, DecisionStats, Metrics


def _histogram(stats: DecisionStats) -> tuple[list[float], float]:
    fam = [f for f in stats.collect() if f.name == "keyart_decision_propensity"][0]
    buckets = [s.value for s in fam.samples if s.name.endswith("_bucket")]
    total = [s.value for s in fam.samples if s.name.endswith("_sum")][0]
    return buckets, total


def test_decision_stats_count_every_page_across_folds_and_a_table_swap():
    rng = np.random.default_rng(3)
    ids_a = [f"art-{i}" for i in range(50)]
    ids_b = list(reversed(ids_a)) + ["art-new"]  # a new bundle: other rows, one more artwork
    table_a, table_b = object(), object()
    stats = DecisionStats()
    want: Counter[str] = Counter()
    props: list[float] = []
    p_sum = 0.0
    for page in range(2 * FOLD_PAGES + 7):
        table, ids = (table_a, ids_a) if page < FOLD_PAGES + 3 else (table_b, ids_b)
        rows = rng.choice(len(ids), size=8, replace=False)
        p = rng.uniform(0.001, 1.0, size=8)
        p[0] = 1.0
        stats.record_page(table, ids, rows, p, now=1_000.0)
        want.update(ids[r] for r in rows)
        props += p.tolist()
        p_sum += float(p.sum())
        if page in (5, FOLD_PAGES - 1, FOLD_PAGES + 10):  # reads between folds see every page so far
            assert stats.artwork_counts() == dict(want)
    assert stats.artwork_counts() == dict(want)
    buckets, total = _histogram(stats)
    cumulative = [sum(1 for x in props if x <= b) for b in PROPENSITY_BUCKETS] + [len(props)]
    assert buckets == cumulative
    assert total == p_sum  # added page by page, in order, as before batching
    assert stats.reward_rate(now=1_000.0) == 0.0  # decisions counted at once
    stats.record_reward(1, now=1_000.0)
    assert stats.reward_rate(now=1_000.0) == 1 / len(props)


def test_cached_children_count_pages_and_requests():
    m = Metrics()
    value = m.registry.get_sample_value
    for _ in range(3):
        m.count_page("thompson", False, 40)
    m.count_page("default", True, 5)
    m.count_page("default", True, 5)
    assert value("keyart_pages_total", {"fallback": "false"}) == 3
    assert value("keyart_pages_total", {"fallback": "true"}) == 2
    assert value("keyart_decisions_total", {"policy": "thompson", "fallback": "false"}) == 120
    assert value("keyart_decisions_total", {"policy": "default", "fallback": "true"}) == 10
    assert value("keyart_fallback_pages_total") == 2
    for status in (200, 200, 422, 200, 413):
        m.count_request("/v1/artwork", status, 0.003)
    m.count_request("other", 404, 0.001)
    assert value("keyart_requests_total", {"route": "/v1/artwork", "status": "200"}) == 3
    assert value("keyart_requests_total", {"route": "/v1/artwork", "status": "422"}) == 1
    assert value("keyart_requests_total", {"route": "other", "status": "404"}) == 1
    assert value("keyart_request_seconds_count", {"route": "/v1/artwork"}) == 5
    assert value("keyart_request_seconds_sum", {"route": "/v1/artwork"}) == pytest.approx(5 * 0.003)
    assert value("keyart_rejections_total", {"route": "/v1/artwork", "reason": "422"}) == 1
    assert value("keyart_rejections_total", {"route": "/v1/artwork", "reason": "413"}) == 1
    assert value("keyart_rejections_total", {"route": "other", "reason": "404"}) == 1
    assert value("keyart_rejections_total", {"route": "/v1/artwork", "reason": "200"}) is None
