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
    DemotionGate,
    InstanceHealth,
    InstanceSignals,
    Ladder,
    SessionHealth,
)

pytestmark = pytest.mark.unit

CFG = DegradationConfig(stable_s=10.0, miss_window=8, miss_ratio=0.5, queue_wait_s=1.0,
                        congestion_events=3, congestion_window_s=5.0,
                        miss_demotion_interval_s=2.0)
OK_PRIMARY = ChunkReport("primary", "primary", "ok", False, 0.01)
LATE_PRIMARY = ChunkReport("primary", "primary", "ok", True, 0.01)


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
@given(st.lists(st.tuples(st.floats(0.0, 4.0), st.integers(1, 3), st.integers(1, 3),
                          st.booleans()),
                max_size=60))
def test_ladder_promises(steps: list[tuple[float, int, int, bool]]) -> None:
    """Any sequence of demands, floors and refused step ups: tiers stay in 1-3, a change
    is announced only when the tier moves, a demand is met at once, the tier rises at
    most one step at a time and never within stable_s of a demand at or above it."""
    lad = Ladder(stable_s=3.0, now=0.0)
    now = 0.0
    prev_floor = 1
    last_demand: dict[int, float] = {}
    for dt, demand, floor, refuse in steps:
        now += dt
        before = lad.tier
        if demand > 1:
            lad.demand(demand, now, f"d{demand}")
            last_demand[demand] = now
        change = lad.update(now, floor=floor, may_step_up=lambda t, at, r=refuse: not r)
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
    piled = InstanceSignals((closed,), closed, 4.5, None)  # sessions shed faster
    assert inst.piled_up(piled) and inst.update(23.0, piled) is None
    change = inst.update(23.0, InstanceSignals((closed,), closed, 8.5, None))  # badly
    assert change is not None and "queue wait" in change.reason
    inst2 = InstanceHealth(CFG, gpu_memory_limit=0.8, now=0.0)
    change = inst2.update(0.0, InstanceSignals((closed,), closed, 0.0, 0.85))
    assert change is not None and "GPU memory" in change.reason


def test_a_refused_step_up_waits_and_keeps_the_hysteresis() -> None:
    lad = Ladder(stable_s=10.0, now=0.0)
    lad.demand(2, 0.0, "x")
    lad.update(0.0)
    asked: list[tuple[int, float]] = []

    def refuse(tier: int, now: float) -> bool:
        asked.append((tier, now))
        return False

    assert lad.update(9.0, may_step_up=refuse) is None and asked == []  # not due yet
    assert lad.update(10.0, may_step_up=refuse) is None and asked == [(1, 10.0)]
    up = lad.update(10.5, may_step_up=lambda tier, now: True)
    assert up is not None and up.to_tier == 1
    lad.demand(2, 11.0, "again")  # fails within the stable period: still doubles
    assert lad.update(11.0) is not None and lad.hold_s == 20.0


def missing_sessions(n: int, gate: DemotionGate) -> list[SessionHealth]:
    return [SessionHealth(CFG, now=0.0, gate=gate) for _ in range(n)]


def test_sessions_missing_together_leave_one_per_interval() -> None:
    gate = DemotionGate(2.0)
    sessions = missing_sessions(4, gate)
    drops: list[tuple[float, int]] = []
    for step in range(60):  # all miss every chunk for 6 s
        now = 0.1 * step
        for i, h in enumerate(sessions):
            h.on_chunk(now, LATE_PRIMARY)
            change = h.update(now)
            if change is not None:
                assert change.to_tier == 2 and "deadline" in change.reason
                drops.append((now, i))
    times = [t for t, _ in drops]
    assert len(drops) == 3 and times[0] == pytest.approx(0.3)  # the 4th late chunk
    assert all(b - a >= 2.0 for a, b in zip(times, times[1:], strict=False))
    assert len({i for _, i in drops}) == 3


def test_an_overload_moves_only_the_sessions_that_shed_the_excess() -> None:
    """A renderer that keeps 9 of 10 sessions on time: only one leaves it."""
    gate = DemotionGate(2.0)
    sessions = missing_sessions(10, gate)
    on_gpu: list[int] = []
    for step in range(400):  # 40 s: the one that left steps up, and one leaves again
        now = 0.1 * step
        late = sum(1 for h in sessions if h.tier == 1) > 9
        for h in sessions:
            lane = "primary" if h.tier == 1 else "fallback"
            h.on_chunk(now, ChunkReport(lane, lane, "ok", late and h.tier == 1, 0.01))
            h.update(now)
        on_gpu.append(sum(1 for h in sessions if h.tier == 1))
    assert min(on_gpu) == 9 and on_gpu[-1] == 9
    assert on_gpu.count(10) < 20  # all ten on it only until one misses enough to leave


def test_a_refused_session_drops_later_if_it_keeps_missing_and_not_if_it_stops() -> None:
    gate = DemotionGate(2.0)
    first, keeps, stops = missing_sessions(3, gate)
    for i in range(4):
        for h in (first, keeps, stops):
            h.on_chunk(0.25 * i, LATE_PRIMARY)
    assert [h.update(0.75) is not None for h in (first, keeps, stops)] == [True, False, False]
    # Refused: both keep their tier and their window.
    for i in range(4, 11):
        now = 0.25 * i
        keeps.on_chunk(now, LATE_PRIMARY)
        stops.on_chunk(now, OK_PRIMARY)  # the misses stopped; old ones linger in the window
        assert keeps.update(now) is None and stops.update(now) is None  # within 2 s
    keeps.on_chunk(2.75, LATE_PRIMARY)
    stops.on_chunk(2.75, OK_PRIMARY)
    change = keeps.update(2.75)
    assert change is not None and change.to_tier == 2 and "deadline" in change.reason
    assert stops.update(2.75) is None
    for i in range(12, 40):
        stops.on_chunk(0.25 * i, OK_PRIMARY)
        assert stops.update(0.25 * i) is None and stops.tier == 1


def test_failures_and_congestion_drop_every_session_at_once() -> None:
    gate = DemotionGate(2.0)
    sessions = missing_sessions(5, gate)
    for h in sessions[:4]:
        h.on_chunk(1.0, ChunkReport("primary", "primary", "timeout", True, 0.0))
    for t in (0.0, 0.5, 1.0):
        sessions[4].on_congestion(t)
    assert all(h.update(1.0) is not None for h in sessions)
    assert [h.tier for h in sessions] == [2] * 5
    # The gate was not used: a deadline-miss drop goes through right after.
    other = SessionHealth(CFG, now=0.0, gate=gate)
    for i in range(4):
        other.on_chunk(1.0 + 0.1 * i, LATE_PRIMARY)
    assert other.update(1.3) is not None and other.tier == 2


def test_long_queue_waits_are_load_and_leave_one_by_one() -> None:
    """Every session of an overloaded renderer waits at once (on the H100 all four
    sessions of a 1.1x load left the GPU together on 'queue wait' and it sat idle)."""
    gate = DemotionGate(2.0)
    sessions = missing_sessions(4, gate)
    waited = ChunkReport("primary", "primary", "ok", True, 1.6)
    for h in sessions:
        h.on_chunk(1.0, waited)
    changes = [h.update(1.0) for h in sessions]
    assert [h.tier for h in sessions] == [2, 1, 1, 1]
    assert changes[0] is not None and "queue wait" in changes[0].reason
    for h in sessions[1:]:  # still waiting 2 s later: the next one leaves
        h.on_chunk(3.1, waited)
        h.update(3.1)
    assert [h.tier for h in sessions] == [2, 2, 1, 1]


def test_while_work_piles_up_sessions_leave_faster_and_none_returns() -> None:
    gate = DemotionGate(2.0)
    sessions = missing_sessions(4, gate)
    gate.urgent = True
    waited = ChunkReport("primary", "primary", "ok", True, 1.6)
    for i, h in enumerate(sessions):  # 0.5 s apart: every one may leave
        h.on_chunk(1.0 + 0.5 * i, waited)
        h.update(1.0 + 0.5 * i)
    assert [h.tier for h in sessions] == [2, 2, 2, 2]
    assert not gate.allow_step_up(1, 30.0)
    gate.urgent = False
    assert gate.allow_step_up(1, 30.0)


def test_a_failure_with_a_full_miss_window_does_not_take_the_gate() -> None:
    gate = DemotionGate(2.0)
    a, b = missing_sessions(2, gate)
    for i in range(3):
        a.on_chunk(0.1 * i, LATE_PRIMARY)
    a.on_chunk(0.3, ChunkReport("primary", "primary", "error", True, 0.0))
    change = a.update(0.3)
    assert change is not None and change.reason == "primary render error"
    for i in range(4):
        b.on_chunk(0.4 + 0.1 * i, LATE_PRIMARY)
    assert b.update(0.7) is not None


def test_sessions_that_left_for_misses_step_up_one_per_interval() -> None:
    gate = DemotionGate(2.0)
    a, b = missing_sessions(2, gate)
    failed = SessionHealth(CFG, now=0.0, gate=gate)
    for i in range(4):
        a.on_chunk(0.25 * i, LATE_PRIMARY)
        b.on_chunk(2.0 + 0.25 * i, LATE_PRIMARY)
    failed.on_chunk(2.75, ChunkReport("primary", "primary", "error", False, 0.0))
    assert a.update(0.75) is not None and b.update(2.75) is not None
    assert failed.update(2.75) is not None
    a.ladder.demand(2, 2.75, "held")  # a's stable period now ends with b's
    ups: dict[str, float] = {}
    for step in range(200):
        now = 2.75 + 0.0625 * step
        for name, h in (("a", a), ("b", b), ("failed", failed)):
            change = h.update(now)
            if change is not None:
                assert change.to_tier == 1 and name not in ups
                ups[name] = now
    # a and b were both due at 12.75: one steps up, the other one interval later; the
    # session that left for a failure is not paced.
    assert ups["failed"] == 12.75
    assert sorted([ups["a"], ups["b"]]) == [12.75, 14.75]


def test_a_step_up_under_the_instance_floor_is_not_paced() -> None:
    gate = DemotionGate(2.0)
    a, b = missing_sessions(2, gate)
    for i in range(4):
        a.on_chunk(0.25 * i, LATE_PRIMARY)
        b.on_chunk(2.0 + 0.25 * i, LATE_PRIMARY)
    assert a.update(0.75) is not None and b.update(2.75) is not None
    a.ladder.demand(2, 2.75, "held")
    a.update(12.75, floor=2)
    b.update(12.75, floor=2)
    assert a.ladder.own_tier == b.ladder.own_tier == 1 and a.tier == b.tier == 2
    assert gate.allow_step_up(1, 12.75)  # neither took the slot


def test_gate_zero_interval_paces_nothing() -> None:
    gate = DemotionGate(0.0)
    sessions = [SessionHealth(CFG.model_copy(update={"miss_demotion_interval_s": 0.0}),
                              now=0.0, gate=gate) for _ in range(4)]
    for i in range(4):
        for h in sessions:
            h.on_chunk(0.1 * i, LATE_PRIMARY)
    assert all(h.update(0.3) is not None for h in sessions)
    with pytest.raises(ValueError):
        DemotionGate(-1.0)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.floats(0.0, 1.0),
                          st.sampled_from(["late", "ok", "error", "wait"])), max_size=120))
def test_gate_promises(events: list[tuple[int, float, str]]) -> None:
    """Any chunks of four sessions sharing a gate: deadline-miss drops from a tier are
    at least the interval apart, as are queue-wait drops; failures drop at once."""
    gate = DemotionGate(2.0)
    sessions = missing_sessions(4, gate)
    now = 0.0
    miss_drops: dict[int, list[float]] = {}
    for i, dt, kind in events:
        now += dt
        h = sessions[i]
        lane = "primary" if h.tier == 1 else "fallback"
        outcome = "error" if kind == "error" else "ok"
        h.on_chunk(now, ChunkReport(lane, lane, outcome, kind in ("late", "wait"),
                                    1.5 if kind == "wait" else 0.0))
        before = h.tier
        change = h.update(now)
        if kind == "error" and before < 3:
            assert change is not None and change.to_tier > before
        if change is not None and ("deadline" in change.reason
                                   or "queue wait" in change.reason):
            miss_drops.setdefault(change.from_tier, []).append(now)
    for times in miss_drops.values():
        assert all(b - a >= 2.0 for a, b in zip(times, times[1:], strict=False))
