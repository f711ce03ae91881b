"""The latency model fits a + b * frames and follows a renderer whose speed changes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.latency import LatencyModel

pytestmark = pytest.mark.unit


@given(st.floats(0.0, 0.5), st.floats(1e-4, 0.1))
def test_recovers_fixed_and_per_frame_cost(a: float, b: float) -> None:
    m = LatencyModel(prior_per_frame_s=0.02)
    for frames in [8, 16, 24, 32] * 5:
        m.observe(frames, a + b * frames)
    fa, fb = m.coefficients()
    assert fa == pytest.approx(a, abs=1e-6) and fb == pytest.approx(b, rel=1e-6)
    assert m.estimate(12) == pytest.approx(a + 12 * b, rel=1e-6, abs=1e-9)


def test_prior_then_proportional_then_tracks_a_slowdown() -> None:
    m = LatencyModel(prior_per_frame_s=0.02)
    assert m.estimate(8) == pytest.approx(0.16)
    m.observe(8, 0.08)  # one batch size only: cost proportional to frames
    a, b = m.coefficients()
    assert a == 0.0 and b == pytest.approx(0.01)
    for _ in range(40):
        m.observe(8, 0.8)  # ten times slower now
    assert m.per_frame(8) == pytest.approx(0.1, rel=0.05)
    with pytest.raises(ValueError):
        m.observe(0, 1.0)
