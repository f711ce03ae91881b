"""The circuit breaker core, on a fake clock: unit cases and a hypothesis state machine."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from agent.breaker import BreakerState, CircuitBreaker
from agent.config import BreakerConfig

pytestmark = pytest.mark.unit

CFG = BreakerConfig(timeouts_to_open=1, errors_to_open=3, open_s=2.0, max_open_s=8.0)


def test_consecutive_errors_open_and_success_resets() -> None:
    b = CircuitBreaker(CFG)
    b.record_failure(0.0, timeout=False)
    b.record_failure(0.1, timeout=False)
    b.record_success(0.2)  # not consecutive any more
    b.record_failure(0.3, timeout=False)
    b.record_failure(0.4, timeout=False)
    assert b.state(0.4) is BreakerState.CLOSED
    b.record_failure(0.5, timeout=False)
    assert b.state(0.5) is BreakerState.OPEN
    assert [t.to_state for t in b.drain_transitions()] == [BreakerState.OPEN]


def test_one_timeout_opens_then_half_open_admits_one_probe() -> None:
    b = CircuitBreaker(CFG)
    b.record_failure(10.0, timeout=True)
    assert not b.allows_traffic(10.0)
    assert not b.try_probe(11.9)  # still open
    assert b.state(12.0) is BreakerState.HALF_OPEN
    assert not b.allows_traffic(12.0)  # half-open takes probes only
    assert b.try_probe(12.0)
    assert not b.try_probe(12.1)  # one probe at a time
    b.record_success(12.5, probe=True)
    assert b.state(12.5) is BreakerState.CLOSED and b.allows_traffic(12.5)


def test_failed_probes_double_the_wait_up_to_the_cap() -> None:
    b = CircuitBreaker(CFG)
    b.record_failure(0.0, timeout=True)
    now, waits = 0.0, []
    for _ in range(4):
        retry_at = b.stats(now).retry_at
        assert retry_at is not None
        waits.append(retry_at - now)
        now = retry_at
        assert b.try_probe(now)
        b.record_failure(now, timeout=True, probe=True)
    assert waits == [2.0, 4.0, 8.0, 8.0]
    # A success resets the wait to open_s for the next opening.
    now = b.stats(now).retry_at or now
    assert b.try_probe(now)
    b.record_success(now, probe=True)
    b.record_failure(now + 1, timeout=True)
    assert b.stats(now + 1).retry_at == pytest.approx(now + 1 + 2.0)


def test_stale_results_do_not_move_an_open_breaker() -> None:
    b = CircuitBreaker(CFG)
    b.record_failure(0.0, timeout=True)
    b.record_success(0.5)  # work sent before it opened
    assert b.state(0.5) is BreakerState.OPEN
    b.record_failure(0.6, timeout=False)
    assert b.stats(0.6).retry_at == pytest.approx(2.0)


class BreakerMachine(RuleBasedStateMachine):
    """Random sequences of time, results and probes keep the breaker's promises."""

    def __init__(self) -> None:
        super().__init__()
        self.b = CircuitBreaker(CFG)
        self.now = 0.0
        self.probing = False
        self.streak = 0  # consecutive failures of real work while closed

    @rule(dt=st.floats(0.0, 5.0))
    def tick(self, dt: float) -> None:
        self.now += dt

    @rule(timeout=st.booleans())
    def failure(self, timeout: bool) -> None:
        before = self.b.state(self.now)
        self.b.record_failure(self.now, timeout=timeout)
        after = self.b.state(self.now)
        if before is BreakerState.CLOSED:
            self.streak += 1
            if timeout or self.streak >= CFG.errors_to_open:
                assert after is BreakerState.OPEN
                self.streak = 0
        else:
            assert after is before  # results of stale work change nothing

    @rule()
    def success(self) -> None:
        before = self.b.state(self.now)
        self.b.record_success(self.now)
        assert self.b.state(self.now) is before
        self.streak = 0 if before is BreakerState.CLOSED else self.streak

    @rule()
    def probe(self) -> None:
        got = self.b.try_probe(self.now)
        assert got == (self.b.state(self.now) is BreakerState.HALF_OPEN and not self.probing)
        self.probing = self.probing or got

    @precondition(lambda self: self.probing)
    @rule(ok=st.booleans(), timeout=st.booleans())
    def probe_result(self, ok: bool, timeout: bool) -> None:
        if ok:
            self.b.record_success(self.now, probe=True)
            assert self.b.state(self.now) is BreakerState.CLOSED
        else:
            self.b.record_failure(self.now, timeout=timeout, probe=True)
            assert self.b.state(self.now) is BreakerState.OPEN
        self.probing = False
        self.streak = 0

    @invariant()
    def open_means_a_retry_time_within_the_cap(self) -> None:
        stats = self.b.stats(self.now)
        if stats.state is BreakerState.OPEN:
            assert stats.retry_at is not None
            assert self.now < stats.retry_at <= self.now + CFG.max_open_s
        assert self.b.allows_traffic(self.now) == (stats.state is BreakerState.CLOSED)

    @invariant()
    def transitions_are_changes(self) -> None:
        for t in self.b.drain_transitions():
            assert t.from_state is not t.to_state


TestBreakerMachine = BreakerMachine.TestCase
TestBreakerMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
