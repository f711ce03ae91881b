"""Rate limits and quotas (agent/limits.py), driven with explicit times."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.auth import ANONYMOUS, Principal
from agent.config import LimitsConfig
from agent.errors import BadRequest, Timeout
from agent.limits import (
    MAX_TRACKED_ADDRESSES,
    ConnectionLimiter,
    SessionLimiter,
    SessionQuota,
    Strikes,
    TokenBucket,
)

pytestmark = pytest.mark.unit


def test_token_bucket_rate_and_burst() -> None:
    b = TokenBucket(rate=2.0, capacity=3.0, now=0.0)
    assert [b.take(1, 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert b.take(1, 0.0) == pytest.approx(0.5)  # refused: nothing taken
    assert b.take(1, 0.25) == pytest.approx(0.25)
    assert b.take(1, 0.5) == 0.0
    assert b.level(100.0) == 3.0  # never above capacity


def test_token_bucket_big_item_leaves_a_debt() -> None:
    b = TokenBucket(rate=1.0, capacity=2.0, now=0.0)
    assert b.take(5.0, 0.0) == 0.0  # taken from a full bucket...
    assert b.take(0.1, 0.0) == pytest.approx(3.1)  # ...and paid back over time
    assert b.take(5.0, 3.0) == pytest.approx(2.0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 0.5), st.floats(0.001, 3.0)), max_size=60))
def test_token_bucket_never_exceeds_its_rate(steps: list[tuple[float, float]]) -> None:
    rate, cap = 4.0, 2.0
    b = TokenBucket(rate, cap, 0.0)
    now, taken = 0.0, 0.0
    for dt, amount in steps:
        now += dt
        if b.take(amount, now) == 0.0:
            taken += amount
    # What was taken fits in the start burst plus the refill, plus one oversized item.
    assert taken <= cap + rate * now + 3.0 + 1e-9


def test_strikes_window() -> None:
    s = Strikes(limit=3, window_s=10.0)
    assert not s.add(0.0) and not s.add(1.0)
    assert not s.add(10.5)  # the first fell out of the window
    assert s.add(10.9)
    assert not Strikes(limit=3, window_s=10.0).add(11.0)


def test_connection_limiter_rate_then_block() -> None:
    lim = ConnectionLimiter(rate_per_s=1.0, burst=2, strikes=3, window_s=10.0, block_s=30.0)
    assert lim.admit("a", 0.0).allowed and lim.admit("a", 0.0).allowed
    v = lim.admit("a", 0.0)
    assert not v.allowed and not v.blocked and v.retry_after_s == pytest.approx(1.0)
    assert lim.admit("b", 0.0).allowed  # addresses are independent
    assert not lim.admit("a", 0.1).blocked
    v = lim.admit("a", 0.2)  # third refusal in the window: abuse
    assert v.blocked and v.new_block and v.retry_after_s == 30.0
    v = lim.admit("a", 5.0)  # still blocked, though the bucket refilled
    assert v.blocked and not v.new_block and v.retry_after_s == pytest.approx(25.2)
    assert lim.admit("a", 31.0).allowed


def test_connection_limiter_failed_auth_blocks() -> None:
    lim = ConnectionLimiter(rate_per_s=100.0, burst=100, strikes=2, window_s=10.0, block_s=5.0)
    assert not lim.strike("a", 0.0)
    assert lim.strike("a", 1.0)
    assert lim.admit("a", 2.0).blocked
    assert lim.admit("a", 6.5).allowed


def test_connection_limiter_memory_is_bounded() -> None:
    lim = ConnectionLimiter(rate_per_s=1.0, burst=1, strikes=3, window_s=1.0, block_s=1.0)
    for i in range(MAX_TRACKED_ADDRESSES + 500):
        lim.admit(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", 0.0)
    assert len(lim) == MAX_TRACKED_ADDRESSES


def test_session_quota() -> None:
    q = SessionQuota({"token": 2, "ticket": 1})
    t = Principal("token:aa", "token")
    u = Principal("ticket:u", "ticket")
    assert q.acquire(t) and q.acquire(t) and not q.acquire(t)
    assert q.acquire(u) and not q.acquire(u)
    assert q.acquire(Principal("ticket:v", "ticket"))
    q.release(t)
    assert q.acquire(t)
    for _ in range(100):
        assert q.acquire(ANONYMOUS)  # no cap for the open server's anonymous clients
    q.release(u)
    assert q.held(u) == 0
    with pytest.raises(ValueError):
        q.release(u)


def limits(**kw: object) -> LimitsConfig:
    return LimitsConfig(**kw)


def test_session_limiter_control_rate() -> None:
    lim = SessionLimiter(limits(control_messages_per_s=10, control_message_burst=5), 25, 0.0)
    for _ in range(5):
        lim.control(0.0)
    with pytest.raises(BadRequest) as info:
        lim.control(0.0)
    assert not info.value.fatal and "messages a second" in info.value.message
    lim.control(0.1)


def test_session_limiter_audio_real_time_factor() -> None:
    lim = SessionLimiter(limits(audio_realtime_factor=2.0, audio_burst_s=1.0), 25, 0.0)
    rate = 16000
    # 1 s head start, then 2 s of audio per second of wall time.
    lim.audio(rate, rate, 0.0)
    with pytest.raises(BadRequest, match="faster than 2x real time"):
        lim.audio(rate // 50, rate, 0.0)
    for i in range(1, 101):  # 20 ms frames at exactly 2x real time for 1 s
        lim.audio(rate // 50, rate, i * 0.01)
    with pytest.raises(BadRequest):
        lim.audio(rate // 50, rate, 1.0)
    # Empty frames still cost time: a flood of headers is refused too.
    lim2 = SessionLimiter(limits(audio_realtime_factor=1.0, audio_burst_s=0.05), 25, 0.0)
    with pytest.raises(BadRequest):
        for _ in range(10):
            lim2.audio(0, rate, 0.0)


def test_session_limiter_sustained_refusals_are_abuse() -> None:
    lim = SessionLimiter(limits(abuse_strikes=3, abuse_window_s=1.0), 25, 0.0)
    lim.refused(0.0)
    lim.refused(0.5)
    lim.refused(1.6)  # the first two are out of the window
    with pytest.raises(BadRequest) as info:
        lim.refused(1.7)
        lim.refused(1.8)
    assert info.value.fatal and info.value.close_code == 1008


def test_session_limiter_backlog() -> None:
    lim = SessionLimiter(limits(max_send_backlog_s=2.0), 25, 0.0)
    lim.backlog(100)
    with pytest.raises(Timeout) as info:
        lim.backlog(2 * 25 * 2 + 17)
    assert info.value.fatal and info.value.code == "timeout"
