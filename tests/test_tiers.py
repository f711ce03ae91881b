"""Degradation ladders on a fake clock: hysteresis, floors, session and instance signals."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.breaker import BreakerState
from agent.config import DegradationConfig
from agent.tiers import (
    MAX_HOLD_FACTOR,
    ChunkReport,
    InstanceHealth,
    InstanceSignals,
    Ladder,
    SessionHealth,
)

pytestmark = pytest.mark.unit

CFG = DegradationConfig(stable_s=10.0, miss_window=8, miss_ratio=0.5, queue_wait_s=1.0,
                        congestion_events=3, congestion_window_s=5.0)
OK_PRIMARY = ChunkReport("primary", "primary", "ok", False, 0.01)


def test_drops_at_once_and_steps_up_one_tier_per_stable_period() -> None:
    lad = Ladder(stable_s=10.0, now=0.0)
    lad.demand(3, 1.0, "no renderer")
    change = lad.update(1.0)
    assert change is not None and (change.from_tier, change.to_tier) == (1, 3)
    assert change.reason == "no renderer"
    assert lad.update(10.9) is None  # 9.9 s after the demand
    up = lad.update(11.0)
    assert up is not None and up.to_tier == 2
    assert lad.update(20.9) is None  # the step up itself starts a new stable period
    up = lad.update(21.0)
    assert up is not None and up.to_tier == 1


def test_a_step_up_that_fails_doubles_the_stable_period() -> None:
    lad = Ladder(stable_s=10.0, now=0.0)
    lad.demand(2, 0.0, "x")
    lad.update(0.0)
    assert lad.update(10.0) is not None  # back to 1
    lad.demand(2, 11.0, "again")  # fails 1 s after stepping up
    assert lad.update(11.0) is not None and lad.tier == 2
    assert lad.hold_s == 20.0
    assert lad.update(30.9) is None
    assert lad.update(31.0) is not None and lad.tier == 1
    assert lad.update(51.0) is None and lad.hold_s == 10.0  # stable at 1: forgiven


def test_floor_raises_without_entering_hysteresis() -> None:
    lad = Ladder(stable_s=10.0, now=0.0)
    change = lad.update(1.0, floor=2, floor_reason="breaker open")
    assert change is not None and change.to_tier == 2 and change.reason == "breaker open"
    back = lad.update(1.2, floor=1)
    assert back is not None and back.to_tier == 1  # its own tier never moved


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.floats(0.0, 4.0), st.integers(1, 3), st.integers(1, 3)),
                max_size=60))
def test_ladder_promises(steps: list[tuple[float, int, int]]) -> None:
    """Any sequence of demands and floors: tiers stay in 1-3, a change is announced only
    when the tier moves, a demand is met at once, the tier rises at most one step at a
    time and never within stable_s of a demand at or above it."""
    lad = Ladder(stable_s=3.0, now=0.0)
    now = 0.0
    prev_floor = 1
    last_demand: dict[int, float] = {}
    for dt, demand, floor in steps:
        now += dt
        before = lad.tier
        if demand > 1:
            lad.demand(demand, now, f"d{demand}")
            last_demand[demand] = now
        change = lad.update(now, floor=floor)
        assert lad.tier in (1, 2, 3)
        assert lad.tier >= max(floor, demand)
        if change is None:
            assert lad.tier == before
        else:
            assert (change.from_tier, change.to_tier) == (before, lad.tier) != (before, before)
        if lad.tier < before:
            # More than one step up only when a floor lifted; never soon after a demand.
            assert lad.tier == before - 1 or prev_floor > lad.tier + 1
            assert all(now - t >= 3.0 for k, t in last_demand.items() if k > lad.tier)
        assert 3.0 <= lad.hold_s <= MAX_HOLD_FACTOR * 3.0
        prev_floor = floor


def test_primary_failure_drops_the_session_to_2_and_fallback_failure_to_3() -> None:
    h = SessionHealth(CFG, now=0.0)
    h.on_chunk(0.0, OK_PRIMARY)
    assert h.update(0.0) is None
    h.on_chunk(1.0, ChunkReport("primary", "primary", "timeout", True, 0.0))
    change = h.update(1.0)
    assert change is not None and change.to_tier == 2 and "timeout" in change.reason
    h.on_chunk(2.0, ChunkReport("fallback", "fallback", "error", False, 0.0))
    change = h.update(2.0)
    assert change is not None and change.to_tier == 3


def test_served_below_what_was_wanted_demands_that_tier() -> None:
    h = SessionHealth(CFG, now=0.0)
    h.on_chunk(0.0, ChunkReport("primary", "fallback", "ok", False, 0.0))
    assert h.update(0.0) is not None and h.tier == 2
    # A tier-2 session served by the fallback as it asked is healthy.
    h.on_chunk(1.0, ChunkReport("fallback", "fallback", "ok", False, 0.0))
    assert h.update(9.9) is None
    assert h.update(10.0) is not None and h.tier == 1
    h.on_chunk(12.0, ChunkReport("primary", "static", "ok", False, 0.0))
    assert h.update(12.0) is not None and h.tier == 3


def test_deadline_misses_in_the_window_step_down_one_tier() -> None:
    h = SessionHealth(CFG, now=0.0)
    for i, late in enumerate([True, False, True, True]):
        h.on_chunk(float(i), ChunkReport("primary", "primary", "ok", late, 0.0))
    assert h.update(4.0) is None  # 3 of 4 late; the window needs 4 (8 x 0.5)
    h.on_chunk(4.0, ChunkReport("primary", "primary", "ok", True, 0.0))
    change = h.update(4.0)
    assert change is not None and change.to_tier == 2 and "deadline" in change.reason
    # The new tier is judged on its own chunks.
    for i in range(3):
        h.on_chunk(5.0 + i, ChunkReport("fallback", "fallback", "ok", True, 0.0))
    assert h.update(8.0) is None


def test_chunks_queued_before_a_drop_do_not_push_further_down() -> None:
    h = SessionHealth(CFG, now=0.0)
    h.on_chunk(0.0, ChunkReport("primary", "primary", "ok", True, 2.0))
    assert h.update(0.0) is not None and h.tier == 2
    for i in range(8):  # the rest of the primary's queue, late as well
        h.on_chunk(0.1 * i, ChunkReport("primary", "primary", "ok", True, 2.5))
    assert h.update(1.0) is None and h.tier == 2


def test_a_long_queue_wait_that_made_a_chunk_late_steps_down() -> None:
    h = SessionHealth(CFG, now=0.0)
    h.on_chunk(0.0, ChunkReport("primary", "primary", "ok", False, 1.5))  # on time anyway
    assert h.update(0.0) is None
    h.on_chunk(0.1, ChunkReport("primary", "primary", "ok", True, 1.5))
    change = h.update(0.1)
    assert change is not None and change.to_tier == 2 and "queue wait" in change.reason


def test_sustained_congestion_moves_to_tier_2_and_a_burst_does_not() -> None:
    h = SessionHealth(CFG, now=0.0)
    h.on_congestion(0.0)
    h.on_congestion(6.0)  # the first one left the 5 s window
    assert h.update(6.0) is None
    h.on_congestion(7.0)
    h.on_congestion(8.0)
    change = h.update(8.0)
    assert change is not None and change.to_tier == 2 and "congested" in change.reason


def test_instance_tier_follows_breakers_queue_wait_and_gpu_memory() -> None:
    inst = InstanceHealth(CFG, gpu_memory_limit=0.8, now=0.0)
    closed, opened = BreakerState.CLOSED, BreakerState.OPEN
    healthy = InstanceSignals((closed, opened), closed, 0.1, 0.5)
    assert inst.update(0.0, healthy) is None  # one primary lane still takes work
    change = inst.update(1.0, InstanceSignals((opened, BreakerState.HALF_OPEN), closed, 0.1,
                                              None))
    assert change is not None and change.to_tier == 2 and "breaker" in change.reason
    change = inst.update(2.0, InstanceSignals((opened, opened), opened, 0.1, None))
    assert change is not None and change.to_tier == 3
    assert inst.update(11.9, healthy) is None
    assert inst.update(12.0, healthy) is not None and inst.tier == 2
    assert inst.update(22.0, healthy) is not None and inst.tier == 1
    assert inst.update(23.0, InstanceSignals((closed,), closed, 2.0, None)) is None  # busy
    change = inst.update(23.0, InstanceSignals((closed,), closed, 4.5, None))  # piled up
    assert change is not None and "queue wait" in change.reason
    inst2 = InstanceHealth(CFG, gpu_memory_limit=0.8, now=0.0)
    change = inst2.update(0.0, InstanceSignals((closed,), closed, 0.0, 0.85))
    assert change is not None and "GPU memory" in change.reason
