"""``keyart stack up`` waits until every component is healthy in one and the same pass
(keyart.demo.stack._wait_healthy), on real processes; a component that passed once and
fails later (the balancer before HAProxy has seen a restarted replica) is waited for."""

from __future__ import annotations

import pytest

from keyart.demo import stack as stk


def _probe(answers: list[bool], calls: list[bool]):
    def probe() -> bool:
        ok = answers[len(calls)] if len(calls) < len(answers) else answers[-1]
        calls.append(ok)
        return ok

    return probe


@pytest.fixture
def state(tmp_path):
    yield tmp_path
    for record in (tmp_path / "run").glob("*.json"):
        stk.stop_component(tmp_path, record.stem, timeout=5)


def test_components_must_be_healthy_together(state):
    # a: healthy, then not for two probes, then healthy; b: healthy from its third probe on.
    # Probed each once per pass, they are first healthy together in the fourth pass.
    a_calls: list[bool] = []
    b_calls: list[bool] = []
    comps = [stk.Component("a", "a", ["sleep", "60"], _probe([True, False, False, True], a_calls)),
             stk.Component("b", "b", ["sleep", "60"], _probe([False, False, True], b_calls))]
    for comp in comps:
        stk.start_component(state, {}, comp)
    said: list[str] = []
    stk._wait_healthy(comps, state, timeout=60, say=said.append)
    assert a_calls == [True, False, False, True]
    assert b_calls == [False, False, True, True]
    assert said == ["  healthy  a", "  healthy  b"]


def test_a_component_that_exits_is_reported_with_its_log(state):
    comp = stk.Component("gone", "exits at once", ["sh", "-c", "echo cannot bind; exit 3"], lambda: False)
    stk.start_component(state, {}, comp)
    with pytest.raises(stk.StackError, match="gone exited at start-up(.|\n)*cannot bind"):
        stk._wait_healthy([comp], state, timeout=30, say=lambda _: None)


def test_not_healthy_in_time_names_what_failed(state):
    comps = [stk.Component("ok", "ok", ["sleep", "60"], lambda: True),
             stk.Component("never", "never", ["sleep", "60"], lambda: False)]
    for comp in comps:
        stk.start_component(state, {}, comp)
    with pytest.raises(stk.StackError, match=r"not healthy after 1s: never\n"):
        stk._wait_healthy(comps, state, timeout=1, say=lambda _: None)
