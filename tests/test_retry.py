"""Client reconnect policy: exponential backoff, full jitter, close codes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.retry import BackoffPolicy, Retry, after_close

pytestmark = pytest.mark.unit


@given(st.integers(0, 100), st.floats(0.0, 0.999999), st.integers(0, 60_000))
def test_delay_is_full_jitter_over_a_capped_exponential_after_the_hint(
    attempt: int, u: float, hint_ms: int
) -> None:
    p = BackoffPolicy(base_s=0.25, cap_s=30.0)
    d = p.delay(attempt, u, hint_ms)
    ceiling = min(30.0, 0.25 * 2**attempt)
    assert hint_ms / 1000 <= d < hint_ms / 1000 + ceiling
    assert d == pytest.approx(hint_ms / 1000 + u * ceiling)


def test_jitter_spreads_clients_that_failed_together() -> None:
    p = BackoffPolicy()
    delays = sorted(p.delay(5, u / 100) for u in range(100))
    assert delays[0] == 0.0 and delays[-1] > 0.9 * min(p.cap_s, p.base_s * 32)


def test_close_codes() -> None:
    assert after_close(1013) is Retry.BACKOFF
    assert after_close(1012) is Retry.RESUME
    assert after_close(1006) is Retry.RESUME and after_close(None) is Retry.RESUME
    assert [after_close(c) for c in (1000, 1008, 1009)] == [Retry.NO] * 3
    assert BackoffPolicy(max_attempts=3).gives_up(3)
    with pytest.raises(ValueError):
        BackoffPolicy(base_s=2.0, cap_s=1.0)
