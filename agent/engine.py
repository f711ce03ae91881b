"""The render engine: one loop of plan -> execute -> complete over a renderer.

`submit` returns a future per chunk. The loop asks the scheduler for plans
whenever a worker is free, runs `renderer.render(batch)` in a worker thread
(never on the event loop) and resolves the futures. A plan not back within
`render_timeout_s` fails its chunks with `RenderTimeout`; the thread is
abandoned, never retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import structlog

from agent.errors import RenderError, RenderTimeout
from agent.scheduler import ChunkScheduler, Priority, RenderPlan, WorkItem
from media.types import ChunkKey, RenderChunk, Renderer, RenderResult

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class ChunkOutcome:
    """What the engine reports per finished chunk (for metrics)."""

    key: ChunkKey
    outcome: str  # ok, error, timeout, cancelled, shed
    queue_wait_s: float
    render_s: float
    batch_size: int
    stages: dict[str, float]
    priority: Priority


class Engine:
    def __init__(
        self,
        renderer: Renderer,
        scheduler: ChunkScheduler,
        workers: int,
        render_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
        on_outcome: Callable[[ChunkOutcome], None] | None = None,
    ) -> None:
        self.renderer = renderer
        self.scheduler = scheduler
        self.workers = workers
        self.render_timeout_s = render_timeout_s
        self.clock = clock
        self._on_outcome = on_outcome
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="render")
        self._busy = 0
        self._futures: dict[ChunkKey, asyncio.Future[RenderResult]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="engine")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in list(self._inflight):
            task.cancel()
        for fut in self._futures.values():
            if not fut.done():
                fut.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def submit(
        self, chunk: RenderChunk, deadline: float, priority: Priority
    ) -> asyncio.Future[RenderResult]:
        now = self.clock()
        fut: asyncio.Future[RenderResult] = asyncio.get_running_loop().create_future()
        self._futures[chunk.key] = fut
        for shed in self.scheduler.submit(WorkItem(chunk, deadline, priority, now), now):
            self._finish(shed.key, "shed", None, RenderError("render queue full", retryable=False))
            self._report(shed, "shed", now, 0.0, 0, {})
        self._wake.set()
        return fut

    def cancel(self, session: str, turns: Iterable[str] | None = None) -> None:
        now = self.clock()
        for item in self.scheduler.cancel(session, turns):
            fut = self._futures.pop(item.key, None)
            if fut is not None and not fut.done():
                fut.cancel()
            self._report(item, "cancelled", now, 0.0, 0, {})

    @property
    def queue_depth(self) -> dict[Priority, int]:
        return self.scheduler.stats().queued

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            free = self.workers - self._busy
            for plan in self.scheduler.schedule(self.clock(), free):
                self._busy += 1
                task = asyncio.create_task(self._execute(plan))
                self._inflight.add(task)
                task.add_done_callback(self._inflight.discard)

    async def _execute(self, plan: RenderPlan) -> None:
        loop = asyncio.get_running_loop()
        chunks = [it.chunk for it in plan.batch]
        start = self.clock()
        outcome = "ok"
        results: list[RenderResult] | None = None
        error: BaseException | None = None
        try:
            work = loop.run_in_executor(self._pool, self.renderer.render, chunks)
            results = await asyncio.wait_for(work, self.render_timeout_s)
            if len(results) != len(chunks):
                raise RenderError(
                    f"renderer returned {len(results)} results for {len(chunks)} chunks",
                    retryable=False,
                )
        except TimeoutError:
            outcome = "timeout"
            error = RenderTimeout(f"render not back within {self.render_timeout_s:g} s")
        except RenderError as exc:
            outcome = "error"
            error = exc
        except Exception as exc:
            log.exception("renderer_failed", renderer=self.renderer.capabilities.name)
            outcome = "error"
            error = RenderError(f"renderer failed: {exc!r}", retryable=False)
        finally:
            self._busy -= 1
            self._wake.set()
        end = self.clock()
        self.scheduler.complete(plan, end)
        for i, item in enumerate(plan.batch):
            result = results[i] if results is not None else None
            self._finish(item.key, outcome, result, error)
            stages = result.stages if result is not None else {}
            self._report(item, outcome, start, end - start, len(plan.batch), stages)

    def _finish(
        self,
        key: ChunkKey,
        outcome: str,
        result: RenderResult | None,
        error: BaseException | None,
    ) -> None:
        fut = self._futures.pop(key, None)
        if fut is None or fut.done():
            return
        if result is not None:
            fut.set_result(result)
        else:
            fut.set_exception(error or RenderError(outcome, retryable=False))

    def _report(
        self,
        item: WorkItem,
        outcome: str,
        started: float,
        render_s: float,
        batch: int,
        stages: dict[str, float],
    ) -> None:
        if self._on_outcome is not None:
            self._on_outcome(
                ChunkOutcome(
                    key=item.key,
                    outcome=outcome,
                    queue_wait_s=max(started - item.enqueued, 0.0),
                    render_s=render_s,
                    batch_size=batch,
                    stages=stages,
                    priority=item.priority,
                )
            )
