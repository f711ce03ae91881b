"""The chunk scheduler: which chunks render together next, sans I/O.

Earliest deadline first within priority classes (a turn in progress before a
new turn's first chunk before speculative work); waiting ages a chunk up one
class per `aging_s` so nothing starves. A chunk due later than `horizon_s`
from now counts as speculative whatever its class: a session's turn that the
TTS delivered ahead of time must not hold back another session's first chunk.
The queue is bounded: overflow sheds the least urgent work.
`schedule(now, free_workers)` returns immutable plans; the engine renders
them and reports back with `complete(plan, now)`.

Each chunk names the lane it wants (the primary renderer, or the CPU
fallback for sessions in tier 2); the engine asks per lane kind which chunks
it may take. Given the lane's measured latency, a batch is the largest one
whose render still ends before the earliest deadline in it; when even one
chunk would be late the lane is behind, and a full batch catches up fastest.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, field, replace
from enum import IntEnum, StrEnum

from agent.latency import LatencyModel
from media.types import ChunkKey, RenderChunk


class Priority(IntEnum):
    IN_TURN = 0  # the next chunk of a turn already playing
    TURN_START = 1  # the first chunk of a turn: time to first frame
    SPECULATIVE = 2  # chunks of queued turns, rendered ahead


class Lane(StrEnum):
    PRIMARY = "primary"  # the primary renderer (one lane per GPU)
    FALLBACK = "fallback"  # the CPU renderer pool


@dataclass(frozen=True, slots=True)
class WorkItem:
    chunk: RenderChunk
    deadline: float  # wall time its first frame must be sent
    priority: Priority
    enqueued: float
    lane: Lane = Lane.PRIMARY  # the lane the session asked for
    retry: bool = False  # a second try elsewhere after a retryable error

    @property
    def key(self) -> ChunkKey:
        return self.chunk.key


@dataclass(frozen=True, slots=True)
class RenderPlan:
    batch: tuple[WorkItem, ...]
    planned_at: float


@dataclass(frozen=True, slots=True)
class SchedulerStats:
    queued: dict[Priority, int] = field(default_factory=dict)
    shed: int = 0
    cancelled: int = 0
    planned: int = 0
    completed: int = 0
    deadline_misses: int = 0


class ChunkScheduler:
    def __init__(self, max_batch: int, max_queue: int, aging_s: float = 1.0,
                 horizon_s: float | None = None) -> None:
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be >= 1")
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.aging_s = aging_s
        self.horizon_s = horizon_s
        self._queue: list[WorkItem] = []
        self._shed = 0
        self._cancelled = 0
        self._planned = 0
        self._completed = 0
        self._misses = 0

    def __len__(self) -> int:
        return len(self._queue)

    def _urgency(self, item: WorkItem, now: float) -> tuple[int, float]:
        cls = int(item.priority)
        if self.horizon_s is not None and item.deadline - now > self.horizon_s:
            cls = int(Priority.SPECULATIVE)  # not needed soon: work ahead, not urgent work
        aged = int((now - item.enqueued) / self.aging_s) if self.aging_s > 0 else 0
        return (max(cls - aged, 0), item.deadline)

    def submit(self, item: WorkItem, now: float) -> list[WorkItem]:
        """Queue a chunk; returns the items shed to stay within the bound."""
        self._queue.append(item)
        shed: list[WorkItem] = []
        while len(self._queue) > self.max_queue:
            worst = max(self._queue, key=lambda it: self._urgency(it, now))
            self._queue.remove(worst)
            shed.append(worst)
        self._shed += len(shed)
        return shed

    def cancel(self, session: str, turns: Iterable[str] | None = None) -> list[WorkItem]:
        """Drop queued chunks of a session (all, or only the given turns)."""
        wanted = None if turns is None else set(turns)
        gone = [
            it
            for it in self._queue
            if it.key.session == session and (wanted is None or it.key.turn in wanted)
        ]
        for it in gone:
            self._queue.remove(it)
        self._cancelled += len(gone)
        return gone

    def reroute(self, session: str, lane: Lane) -> int:
        """Queued chunks of a session now want `lane` (its tier changed); returns how many."""
        moved = 0
        for i, it in enumerate(self._queue):
            if it.key.session == session and it.lane is not lane:
                self._queue[i] = replace(it, lane=lane)
                moved += 1
        return moved

    def schedule(
        self,
        now: float,
        free_workers: int,
        *,
        lanes: Collection[Lane] | None = None,
        max_batch: int | None = None,
        latency: LatencyModel | None = None,
    ) -> list[RenderPlan]:
        """Up to `free_workers` batches, most urgent first, of chunks wanting `lanes`
        (None: any), each at most `max_batch` chunks (None: the scheduler's)."""
        limit = min(max_batch or self.max_batch, self.max_batch)
        plans: list[RenderPlan] = []
        while free_workers > 0:
            self._queue.sort(key=lambda it: self._urgency(it, now))
            eligible = [it for it in self._queue if lanes is None or it.lane in lanes]
            if not eligible:
                break
            k = self._batch_size(eligible[:limit], now, latency)
            batch = tuple(eligible[:k])
            for it in batch:
                self._queue.remove(it)
            plans.append(RenderPlan(batch=batch, planned_at=now))
            self._planned += len(batch)
            free_workers -= 1
        return plans

    @staticmethod
    def _batch_size(head: list[WorkItem], now: float, latency: LatencyModel | None) -> int:
        if latency is None:
            return len(head)
        frames = 0
        earliest = float("inf")
        best = 0
        for k, it in enumerate(head, 1):
            frames += len(it.chunk.frames)
            earliest = min(earliest, it.deadline)
            if now + latency.estimate(frames) <= earliest:
                best = k
        return best or len(head)

    def take_all(self, lanes: Collection[Lane] | None = None) -> list[WorkItem]:
        """Remove and return every queued chunk wanting `lanes` (nothing can render them)."""
        gone = [it for it in self._queue if lanes is None or it.lane in lanes]
        for it in gone:
            self._queue.remove(it)
        return gone

    def complete(self, plan: RenderPlan, now: float) -> int:
        """Record a finished plan; returns how many of its chunks missed their deadline."""
        misses = sum(1 for it in plan.batch if now > it.deadline)
        self._completed += len(plan.batch)
        self._misses += misses
        return misses

    def stats(self) -> SchedulerStats:
        queued: dict[Priority, int] = dict.fromkeys(Priority, 0)
        for it in self._queue:
            queued[it.priority] += 1
        return SchedulerStats(
            queued=queued,
            shed=self._shed,
            cancelled=self._cancelled,
            planned=self._planned,
            completed=self._completed,
            deadline_misses=self._misses,
        )
