"""The chunk scheduler core: EDF within priority classes, aging, bounded queue."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.latency import LatencyModel
from agent.scheduler import ChunkScheduler, Lane, Priority, WorkItem
from media.types import ChunkKey, FrameSpec, RenderChunk, SourceRef

pytestmark = pytest.mark.unit

SPEC = FrameSpec(SourceRef(0, 0))


def item(session: str, index: int, deadline: float, prio: Priority, enq: float = 0.0
         ) -> WorkItem:
    chunk = RenderChunk(ChunkKey(session, "t", index), "a", (SPEC,), 0,
                        np.zeros(640, np.float32), 25)
    return WorkItem(chunk, deadline, prio, enq)


def test_priority_then_deadline() -> None:
    s = ChunkScheduler(max_batch=1, max_queue=10, aging_s=100)
    s.submit(item("a", 0, 5.0, Priority.SPECULATIVE), 0)
    s.submit(item("b", 0, 9.0, Priority.IN_TURN), 0)
    s.submit(item("c", 0, 1.0, Priority.TURN_START), 0)
    s.submit(item("d", 0, 2.0, Priority.IN_TURN), 0)
    order = [p.batch[0].key.session for p in s.schedule(0.0, free_workers=4)]
    assert order == ["d", "b", "c", "a"]


def test_aging_prevents_starvation() -> None:
    s = ChunkScheduler(max_batch=1, max_queue=10, aging_s=1.0)
    s.submit(item("old", 0, 100.0, Priority.SPECULATIVE, enq=0.0), 0.0)
    s.submit(item("new", 0, 50.0, Priority.IN_TURN, enq=2.5), 2.5)
    # After 2.5 s the speculative chunk has aged two classes: it is IN_TURN-level
    # with... a later deadline, so the new one still goes first; at 5 s it ties
    # on class and the earlier deadline wins.
    first = s.schedule(2.5, 1)[0].batch[0].key.session
    assert first == "new"
    s.submit(item("new2", 1, 200.0, Priority.IN_TURN, enq=5.0), 5.0)
    assert s.schedule(5.0, 1)[0].batch[0].key.session == "old"


def test_overflow_sheds_least_urgent() -> None:
    s = ChunkScheduler(max_batch=1, max_queue=2, aging_s=100)
    s.submit(item("a", 0, 1.0, Priority.IN_TURN), 0)
    s.submit(item("b", 0, 1.0, Priority.SPECULATIVE), 0)
    shed = s.submit(item("c", 0, 2.0, Priority.TURN_START), 0)
    assert [w.key.session for w in shed] == ["b"]
    assert s.stats().shed == 1


def test_cancel_session_removes_only_its_chunks() -> None:
    s = ChunkScheduler(max_batch=4, max_queue=10)
    for i in range(3):
        s.submit(item("a", i, 1.0, Priority.IN_TURN), 0)
    s.submit(item("b", 0, 1.0, Priority.IN_TURN), 0)
    assert len(s.cancel("a")) == 3
    plans = s.schedule(0.0, 1)
    assert [w.key.session for w in plans[0].batch] == ["b"]


def test_deadline_misses_counted_on_complete() -> None:
    s = ChunkScheduler(max_batch=2, max_queue=10)
    s.submit(item("a", 0, 1.0, Priority.IN_TURN), 0)
    s.submit(item("b", 0, 3.0, Priority.IN_TURN), 0)
    (plan,) = s.schedule(0.0, 1)
    assert s.complete(plan, 2.0) == 1
    assert s.stats().deadline_misses == 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 10), st.sampled_from(list(Priority))), max_size=30),
       st.integers(1, 4))
def test_every_submitted_chunk_is_planned_shed_or_queued(
    items: list[tuple[float, Priority]], batch: int
) -> None:
    s = ChunkScheduler(max_batch=batch, max_queue=8)
    shed = 0
    for i, (deadline, prio) in enumerate(items):
        shed += len(s.submit(item("s", i, deadline, prio), 0.0))
    planned = sum(len(p.batch) for p in s.schedule(1.0, free_workers=100))
    assert planned + shed == len(items)
    assert all(len(p.batch) <= batch for p in s.schedule(1.0, 1))


def laned(session: str, index: int, deadline: float, lane: Lane,
          prio: Priority = Priority.IN_TURN) -> WorkItem:
    return replace(item(session, index, deadline, prio), lane=lane)


def test_lanes_take_only_the_work_that_wants_them() -> None:
    s = ChunkScheduler(max_batch=4, max_queue=10)
    s.submit(laned("a", 0, 1.0, Lane.PRIMARY), 0)
    s.submit(laned("b", 0, 0.5, Lane.FALLBACK), 0)
    s.submit(laned("c", 0, 2.0, Lane.PRIMARY), 0)
    (plan,) = s.schedule(0.0, 1, lanes={Lane.FALLBACK})
    assert [w.key.session for w in plan.batch] == ["b"]
    (plan,) = s.schedule(0.0, 1, lanes={Lane.PRIMARY}, max_batch=1)
    assert [w.key.session for w in plan.batch] == ["a"]
    assert [w.key.session for w in s.take_all({Lane.PRIMARY})] == ["c"]
    assert len(s) == 0 and s.schedule(0.0, 3) == []


def test_batch_is_the_largest_that_keeps_the_earliest_deadline() -> None:
    model = LatencyModel(prior_per_frame_s=0.01)  # one frame per chunk here: 10 ms a chunk
    s = ChunkScheduler(max_batch=8, max_queue=20)
    for i in range(6):
        s.submit(item(f"s{i}", 0, 0.035, Priority.IN_TURN), 0)
    (plan,) = s.schedule(0.0, 1, latency=model)
    assert len(plan.batch) == 3  # 3 chunks end at 0.03 <= 0.035; 4 would end at 0.04
    # Behind anyway (the earliest deadline has passed): a full batch catches up fastest.
    (plan,) = s.schedule(1.0, 1, latency=model)
    assert len(plan.batch) == 3


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=20), st.floats(1e-3, 0.1))
def test_chosen_batch_meets_its_deadlines_when_any_batch_can(
    deadlines: list[float], per_chunk: float
) -> None:
    model = LatencyModel(prior_per_frame_s=per_chunk)
    s = ChunkScheduler(max_batch=4, max_queue=50)
    for i, d in enumerate(deadlines):
        s.submit(item(f"s{i}", 0, d, Priority.IN_TURN), 0)
    (plan,) = s.schedule(0.0, 1, latency=model)
    earliest = min(w.deadline for w in plan.batch)
    if per_chunk <= min(deadlines):  # one chunk alone would make it
        assert model.estimate(len(plan.batch)) <= earliest + 1e-12
    else:
        assert len(plan.batch) == min(4, len(deadlines))


def test_work_due_beyond_the_horizon_does_not_hold_back_a_first_chunk() -> None:
    s = ChunkScheduler(max_batch=1, max_queue=10, aging_s=100, horizon_s=1.0)
    for i in range(3):  # one session's turn, delivered ahead of time
        s.submit(item("a", i, 2.0 + i, Priority.IN_TURN), 0.0)
    s.submit(item("b", 0, 0.5, Priority.TURN_START), 0.0)
    s.submit(item("a", 9, 0.3, Priority.IN_TURN), 0.0)  # due soon: still first
    order = [(p.batch[0].key.session, p.batch[0].key.index) for p in s.schedule(0.0, 5)]
    assert order == [("a", 9), ("b", 0), ("a", 0), ("a", 1), ("a", 2)]
