"""The render engine: one loop of plan -> execute -> complete over render lanes.

Lanes: one per primary renderer instance (one per GPU; for a CPU primary,
one per worker thread) and a pool of CPU fallback lanes. Each lane runs its
renders in its own daemon thread, never on the event loop. Every step the
`FallbackRouter` says which lanes take which work (consulting the circuit
breakers), the `ChunkScheduler` picks the batches, and finished plans resolve
the chunks' futures and feed the breakers and latency models.

A plan not back within `render_timeout_s` fails its chunks (timeout); they
are abandoned, never retried. The lane's hung thread is abandoned too and
the lane gets a fresh thread, so a hang cannot block the lane, the other
lanes or the fallback. A lane that collects `max_abandoned` hung threads is
out (no new threads: the leak is bounded) until one of them returns. Every
chunk's future resolves to a `Rendered` with frames to show: the renderer's,
or, for a chunk that failed, was shed, failed validation or could not be
rendered at all, its source pictures with the mouth closed (the stand-in).

`prepare_avatar` has every primary renderer that keeps per-avatar state
(`PreparesAvatars`) compute it ahead of the avatar's first chunk, on the
lane's own thread in slices, so that a render queued meanwhile waits for one
slice at most.

Early frames: a chunk submitted with `on_frames` gets the leading frames that a
streaming renderer (`StreamsFrames`) hands over before the call ends, checked by
the validator as they come, on the event loop, before its future resolves. Only
the plan's own render delivers them (never a shadow probe), and only until it
ends: after a timeout or an error nothing more arrives, and the future's frames
(the stand-in's past the frames already shown) complete the chunk.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import structlog

from agent.breaker import BreakerTransition, CircuitBreaker
from agent.config import BreakerConfig
from agent.errors import RenderError
from agent.fallback import FallbackRouter, Route
from agent.latency import LatencyModel
from agent.scheduler import ChunkScheduler, Lane, Priority, RenderPlan, WorkItem
from agent.validation import OK, Verdict
from media.types import (
    AvatarPrep,
    ChunkKey,
    Frames,
    PreparesAvatars,
    RenderChunk,
    Renderer,
    RenderResult,
    render_inner,
)

log = structlog.get_logger(__name__)

StandIn = Callable[[RenderChunk], Frames]
WAIT_WINDOW_S = 10.0  # queue wait percentiles cover this much recent time
WAIT_MIN_SAMPLES = 20
LATE_SLACK = 1.5  # see Engine._late
PREPARE_SLICE_FRAMES = 32  # source frames per prepare job (one VAE batch of LatentSync's)
Validator = Callable[[RenderChunk, RenderResult], Verdict]
EarlyFrames = Callable[[Frames], None]  # a chunk's first frames, ahead of its future


@dataclass(frozen=True, slots=True)
class Rendered:
    """What a chunk's future resolves to: the frames to show and how they came about."""

    key: ChunkKey
    frames: Frames  # (F, H, W, 3) uint8
    served_by: Route
    outcome: str  # ok, invalid, error, timeout, shed
    late: bool  # finished after its deadline
    queue_wait_s: float
    detail: str = ""


@dataclass(frozen=True, slots=True)
class ChunkOutcome:
    """What the engine reports per finished chunk (for metrics)."""

    key: ChunkKey
    outcome: str  # ok, invalid, error, timeout, cancelled, shed
    served_by: Route
    queue_wait_s: float
    render_s: float
    batch_size: int
    stages: dict[str, float]
    priority: Priority
    late: bool = False
    check: str | None = None  # the validation check that failed
    error_kind: str | None = None  # RenderError.kind of a failed render


@dataclass(frozen=True, slots=True)
class LaneStats:
    name: str
    state: str
    busy: bool
    abandoned_threads: int
    dead: bool


@dataclass(frozen=True, slots=True)
class EngineStats:
    lanes: tuple[LaneStats, ...]
    queued: dict[Priority, int]
    shed: int
    deadline_misses: int  # late by the engine's fault (Engine._late)
    completed: int
    primary_lanes_alive: int
    primary_frame_cost_s: float | None  # measured seconds per frame; None until measured
    # p95 queue wait of recent chunks, counting a chunk that met its deadline as 0 (work
    # rendered ahead, e.g. of a TTS that streams faster than real time, waits on purpose):
    # a pile-up signal. 0 with too few chunks.
    queue_wait_p95_s: float


class _Worker:
    """One daemon thread running jobs in order. Daemon, so that a render that never
    returns cannot keep the process from exiting."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[
            tuple[Callable[[], Any], concurrent.futures.Future[Any]] | None
        ] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, fut = job
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)

    def submit(self, fn: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._jobs.put((fn, fut))
        return fut

    def stop(self) -> None:
        """The thread ends after its current job (now, unless that one hangs)."""
        self._jobs.put(None)


@dataclass(eq=False)
class _Lane:
    name: str
    kind: Lane
    renderer: Renderer
    breaker: CircuitBreaker
    latency: LatencyModel
    worker: _Worker
    busy: bool = False
    abandoned: int = 0
    dead: bool = False
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


_Checked = tuple[Frames, Verdict, dict[str, float]]


class Engine:
    def __init__(
        self,
        primaries: Sequence[Renderer],
        fallback: Renderer,
        scheduler: ChunkScheduler,
        *,
        breaker: BreakerConfig,
        fallback_workers: int,
        render_timeout_s: float,
        max_abandoned: int,
        stand_in: StandIn,
        validate: Validator | None = None,
        prior_frame_cost_s: float = 0.02,
        clock: Callable[[], float] = time.monotonic,
        on_outcome: Callable[[ChunkOutcome], None] | None = None,
        on_breaker: Callable[[BreakerTransition], None] | None = None,
    ) -> None:
        if not primaries:
            raise ValueError("the engine needs at least one primary renderer")
        self.scheduler = scheduler
        self.render_timeout_s = render_timeout_s
        self.max_abandoned = max_abandoned
        self.clock = clock
        self._stand_in = stand_in
        self._validate = validate
        self._on_outcome = on_outcome
        self._on_breaker = on_breaker
        self.primary_latency = LatencyModel(prior_frame_cost_s)
        self.fallback_latency = LatencyModel(prior_frame_cost_s)
        self.primary_batch = max(p.capabilities.max_batch for p in primaries)
        self.fallback_batch = fallback.capabilities.max_batch
        self.primary: list[_Lane] = [
            _Lane(f"primary-{i}", Lane.PRIMARY, r, CircuitBreaker(breaker, f"primary-{i}"),
                  self.primary_latency, _Worker(f"render-primary-{i}"))
            for i, r in enumerate(primaries)
        ]
        fb_breaker = CircuitBreaker(breaker, "fallback")
        self.fallback: list[_Lane] = [
            _Lane(f"fallback-{i}", Lane.FALLBACK, fallback, fb_breaker, self.fallback_latency,
                  _Worker(f"render-fallback-{i}"))
            for i in range(fallback_workers)
        ]
        self.router = FallbackRouter([lane.breaker for lane in self.primary], fb_breaker)
        self._aux = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="stand-in")
        self._futures: dict[ChunkKey, asyncio.Future[Rendered]] = {}
        self._early: dict[ChunkKey, EarlyFrames] = {}  # open to early frames
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._waits: deque[tuple[float, float]] = deque(maxlen=500)  # (finished, wait)
        self._last_chunk: RenderChunk | None = None  # input for shadow probes
        self._late_chunks = 0
        self._closed = False

    # --- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="engine")

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in list(self._tasks):
            task.cancel()
        self._early.clear()
        for fut in self._futures.values():
            if not fut.done():
                fut.cancel()
        for lane in self.primary + self.fallback:
            lane.worker.stop()
        self._aux.shutdown(wait=False, cancel_futures=True)

    # --- work in --------------------------------------------------------------

    def submit(self, chunk: RenderChunk, deadline: float, priority: Priority,
               lane: Lane = Lane.PRIMARY, on_frames: EarlyFrames | None = None
               ) -> asyncio.Future[Rendered]:
        """Queue a chunk; its future resolves to the frames to show. `on_frames` gets,
        on the event loop, the chunk's leading frames (each call more of them) that a
        streaming renderer hands over early, checked; the future's frames begin with them."""
        now = self.clock()
        fut: asyncio.Future[Rendered] = asyncio.get_running_loop().create_future()
        self._futures[chunk.key] = fut
        if on_frames is not None:
            self._early[chunk.key] = on_frames
        self._last_chunk = chunk
        item = WorkItem(chunk, deadline, priority, now, lane)
        for shed in self.scheduler.submit(item, now):
            self._spawn(self._fail([shed], "shed", Route.STATIC, now, "render queue full"))
        self._wake.set()
        return fut

    def cancel(self, session: str, turns: Iterable[str] | None = None) -> None:
        now = self.clock()
        for item in self.scheduler.cancel(session, turns):
            self._early.pop(item.key, None)
            fut = self._futures.pop(item.key, None)
            if fut is not None and not fut.done():
                fut.cancel()
            self._report(item, "cancelled", Route.STATIC, now, 0.0, 0, {})

    def reroute(self, session: str, lane: Lane | None) -> None:
        """A session changed tier: its queued chunks move to `lane`, or, for None (the
        static tier), are served at once by their stand-ins. Chunks already rendering
        finish where they are."""
        if lane is not None:
            if self.scheduler.reroute(session, lane):
                self._wake.set()
            return
        gone = self.scheduler.cancel(session)
        if gone:
            self._spawn(self._fail(gone, "ok", Route.STATIC, self.clock(), "static tier"))

    async def prepare_avatar(self, avatar: str) -> list[AvatarPrep]:
        """Prepare `avatar` on every primary renderer that can (each renderer once, its
        lanes in parallel); what each did. A lane that fails or does not answer within
        `render_timeout_s` is left as it is: its renders then compute what is missing."""
        renderers: dict[int, _Lane] = {}
        for lane in self.primary:
            if isinstance(lane.renderer, PreparesAvatars):
                renderers.setdefault(id(lane.renderer), lane)
        done = await asyncio.gather(*(self._prepare_on(lane, avatar)
                                      for lane in renderers.values()))
        return [prep for prep in done if prep is not None]

    async def _prepare_on(self, lane: _Lane, avatar: str) -> AvatarPrep | None:
        renderer = lane.renderer
        assert isinstance(renderer, PreparesAvatars)
        frames, seconds = 0, 0.0
        started = self.clock()
        while not lane.dead:
            job = lane.worker.submit(
                lambda: renderer.prepare_avatar(avatar, PREPARE_SLICE_FRAMES))
            try:
                prep: AvatarPrep = await asyncio.wait_for(asyncio.wrap_future(job),
                                                          self.render_timeout_s)
            except TimeoutError:
                log.warning("avatar_prepare_failed", avatar=avatar, lane=lane.name,
                            error=f"not back within {self.render_timeout_s:g} s")
                return None
            except RenderError as exc:
                log.warning("avatar_prepare_failed", avatar=avatar, lane=lane.name,
                            error=str(exc))
                return None
            except Exception:
                log.exception("avatar_prepare_failed", avatar=avatar, lane=lane.name)
                return None
            frames += prep.frames
            seconds += prep.seconds
            if prep.remaining == 0:
                log.info("avatar_prepared", avatar=avatar, lane=lane.name, frames=frames,
                         seconds=round(seconds, 3),
                         wall_s=round(self.clock() - started, 3))
                return AvatarPrep(avatar, frames, 0, seconds)
        log.warning("avatar_prepare_failed", avatar=avatar, lane=lane.name, error="lane is out")
        return None

    @property
    def queue_depth(self) -> dict[Priority, int]:
        return self.scheduler.stats().queued

    # --- the loop -----------------------------------------------------------------

    async def _loop(self) -> None:
        while not self._closed:
            # Wake on new work and finished plans; tick anyway so that open
            # breakers turn half-open and waiting chunks age.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.1):
                    await self._wake.wait()
            self._wake.clear()
            self._step()

    def _step(self) -> None:
        now = self.clock()
        free_primary = [i for i, lane in enumerate(self.primary) if not lane.busy and not lane.dead]
        free_fallback = [lane for lane in self.fallback if not lane.busy and not lane.dead]
        probe = self._last_chunk
        routing = self.router.plan(now, free_primary, len(free_fallback), probe is not None)
        for i in routing.primary_lanes:
            for plan in self.scheduler.schedule(now, 1, lanes={Lane.PRIMARY},
                                                max_batch=self.primary_batch,
                                                latency=self.primary_latency):
                self._start(self.primary[i], plan)
        if routing.fallback_wants and free_fallback:
            plans = self.scheduler.schedule(now, len(free_fallback), lanes=routing.fallback_wants,
                                            max_batch=self.fallback_batch,
                                            latency=self.fallback_latency)
            for lane, plan in zip(free_fallback, plans, strict=False):
                self._start(lane, plan)
        if routing.static_wants:
            gone = self.scheduler.take_all(routing.static_wants)
            if gone:
                self._spawn(self._fail(gone, "ok", Route.STATIC, now, "no renderer available"))
        if probe is not None:
            for i in routing.probe_lanes:
                self._start_probe(self.primary[i], probe)
            idle = [lane for lane in self.fallback if not lane.busy and not lane.dead]
            if routing.fallback_probe and idle:
                self._start_probe(idle[0], probe)
        self._publish_transitions()

    def _start(self, lane: _Lane, plan: RenderPlan) -> None:
        lane.busy = True
        self._spawn(self._execute(lane, plan))

    def _start_probe(self, lane: _Lane, chunk: RenderChunk) -> None:
        lane.busy = True
        self._spawn(self._probe(lane, chunk))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- execution --------------------------------------------------------------

    def _render_checked(self, renderer: Renderer, chunks: list[RenderChunk],
                        early: Callable[[int, Frames], None] | None = None) -> list[_Checked]:
        """In the lane's thread: render, check each chunk, stand in for failing ones.
        `early`: stream (`StreamsFrames`) and pass it the early frames."""
        results = render_inner(renderer, chunks, early)
        if len(results) != len(chunks):
            raise RenderError(f"renderer returned {len(results)} results for "
                              f"{len(chunks)} chunks", retryable=False)
        out: list[_Checked] = []
        for chunk, result in zip(chunks, results, strict=True):
            verdict = self._validate(chunk, result) if self._validate is not None else OK
            frames = result.frames if verdict.ok else self._stand_in(chunk)
            out.append((frames, verdict, result.stages))
        return out

    async def _run_on(self, lane: _Lane, chunks: list[RenderChunk], *, stream: bool = False
                      ) -> list[_Checked]:
        """Run on the lane's thread with the timeout; a hung thread is abandoned. `stream`:
        deliver early frames to the chunks submitted with `on_frames`."""
        early = None
        if stream and any(c.key in self._early for c in chunks):
            early = self._early_sink(chunks)
        job = lane.worker.submit(lambda: self._render_checked(lane.renderer, chunks, early))
        try:
            return await asyncio.wait_for(asyncio.wrap_future(job), self.render_timeout_s)
        except TimeoutError:
            self._abandon(lane, job)
            raise

    def _early_sink(self, chunks: list[RenderChunk]) -> Callable[[int, Frames], None]:
        """The renderer's `on_frames` for one plan (called in the lane's thread): check the
        frames not yet checked, then hand them to the event loop. A chunk whose early
        frames fail a check gets no more of them (its future decides)."""
        loop = asyncio.get_running_loop()
        checked = [0] * len(chunks)
        refused = [False] * len(chunks)

        def sink(i: int, frames: Frames) -> None:
            chunk = chunks[i]
            done = checked[i]
            if refused[i] or not done < len(frames) < len(chunk.frames):
                return
            if self._validate is not None:
                part = replace(chunk, frames=chunk.frames[done : len(frames)],
                               first_frame=chunk.first_frame + done)
                verdict = self._validate(part, RenderResult(chunk.key, frames[done:]))
                if not verdict.ok:
                    refused[i] = True
                    log.warning("early_frames_refused", turn_id=chunk.key.turn,
                                chunk=chunk.key.index, check=verdict.check, detail=verdict.detail)
                    return
            checked[i] = len(frames)
            loop.call_soon_threadsafe(self._deliver_early, chunk.key, frames)

        return sink

    def _deliver_early(self, key: ChunkKey, frames: Frames) -> None:
        """On the loop: pass early frames on while the chunk's plan is still running."""
        on_frames = self._early.get(key)
        fut = self._futures.get(key)
        if on_frames is not None and fut is not None and not fut.done():
            on_frames(frames)

    def _abandon(self, lane: _Lane, job: concurrent.futures.Future[Any]) -> None:
        lane.worker.stop()
        lane.abandoned += 1
        loop = asyncio.get_running_loop()

        def released(_: concurrent.futures.Future[Any]) -> None:
            loop.call_soon_threadsafe(self._released, lane)

        job.add_done_callback(released)
        if lane.abandoned >= self.max_abandoned:
            # No new thread: the lane is out until one of its hung threads returns.
            lane.dead = True
            log.error("render_lane_given_up", lane=lane.name, hung_threads=lane.abandoned)
        else:
            lane.worker = _Worker(f"render-{lane.name}")
            log.warning("render_thread_abandoned", lane=lane.name, hung_threads=lane.abandoned)

    def _released(self, lane: _Lane) -> None:
        """A hung thread returned (its result was thrown away) and ended."""
        lane.abandoned -= 1
        if lane.dead and not self._closed:
            lane.dead = False
            lane.worker = _Worker(f"render-{lane.name}")
            log.info("render_lane_back", lane=lane.name, hung_threads=lane.abandoned)
            self._wake.set()

    async def _execute(self, lane: _Lane, plan: RenderPlan) -> None:
        chunks = [it.chunk for it in plan.batch]
        start = self.clock()
        checked: list[_Checked] | None = None
        outcome, detail, timed_out, kind = "ok", "", False, None
        retry: list[WorkItem] = []
        try:
            checked = await self._run_on(lane, chunks, stream=True)
        except TimeoutError:
            outcome, timed_out, kind = "timeout", True, "model_timeout"
            detail = f"render not back within {self.render_timeout_s:g} s"
        except RenderError as exc:
            outcome, detail, kind = "error", str(exc), exc.kind
            if exc.retryable and lane.kind is Lane.PRIMARY:
                retry = [replace(it, lane=Lane.FALLBACK, retry=True)
                         for it in plan.batch if not it.retry]
        except Exception as exc:
            log.exception("renderer_failed", lane=lane.name)
            outcome, detail, kind = "error", f"renderer failed: {exc!r}", "model_error"
        finally:
            lane.busy = False
            self._wake.set()
            for chunk in chunks:  # a hung or failed render delivers nothing more
                self._early.pop(chunk.key, None)
        end = self.clock()
        self.scheduler.complete(plan, end)
        route = Route.PRIMARY if lane.kind is Lane.PRIMARY else Route.FALLBACK
        if checked is None:
            lane.breaker.record_failure(end, timeout=timed_out)
            for item in retry:  # tried once more on the fallback: never after a timeout
                for shed in self.scheduler.submit(item, end):
                    self._spawn(self._fail([shed], "shed", Route.STATIC, end, "render queue full"))
            retried = {it.key for it in retry}
            failed = [it for it in plan.batch if it.key not in retried]
            for item in plan.batch:
                self._report(item, outcome, route, start, end - start, len(plan.batch), {},
                             error_kind=kind)
            if failed:
                await self._fail(failed, outcome, route, start, detail, report=False)
            self._publish_transitions()
            return
        lane.latency.observe(sum(len(c.frames) for c in chunks), end - start)
        if all(v.ok for _, v, _ in checked):
            lane.breaker.record_success(end)
        else:
            lane.breaker.record_failure(end, timeout=False)
        for item, (frames, verdict, stages) in zip(plan.batch, checked, strict=True):
            result_outcome = "ok" if verdict.ok else "invalid"
            late = self._late(item, end, lane.latency)
            self._report(item, result_outcome, route, start, end - start, len(plan.batch), stages,
                         late=late, check=verdict.check)
            self._resolve(Rendered(item.key, frames, route, result_outcome, late,
                                   max(start - item.enqueued, 0.0), verdict.detail))
        self._publish_transitions()

    async def _probe(self, lane: _Lane, chunk: RenderChunk) -> None:
        """A shadow render that only decides the breaker; its frames are thrown away."""
        ok = False
        try:
            checked = await self._run_on(lane, [chunk])
            ok = all(v.ok for _, v, _ in checked)
            timed_out = False
        except TimeoutError:
            timed_out = True
        except Exception:
            timed_out = False
        finally:
            lane.busy = False
            self._wake.set()
        now = self.clock()
        if ok:
            lane.breaker.record_success(now, probe=True)
        else:
            lane.breaker.record_failure(now, timeout=timed_out, probe=True)
        log.info("breaker_probe", lane=lane.name, ok=ok)
        self._publish_transitions()

    async def _fail(self, items: list[WorkItem], outcome: str, route: Route, started: float,
                    detail: str, *, report: bool = True) -> None:
        """Resolve chunks with their stand-in frames (computed off the event loop)."""
        chunks = [it.chunk for it in items]
        loop = asyncio.get_running_loop()
        try:
            frames = await loop.run_in_executor(
                self._aux, lambda: [self._stand_in(c) for c in chunks])
        except RuntimeError:  # the executor shut down: the engine is closing
            return
        end = self.clock()
        for item, stand_in in zip(items, frames, strict=True):
            late = self._late(item, end, self.primary_latency)
            if report:
                self._report(item, outcome, route, started, 0.0, 0, {}, late=late)
            self._resolve(Rendered(item.key, stand_in, route, outcome, late,
                                   max(started - item.enqueued, 0.0), detail))

    @staticmethod
    def _late(item: WorkItem, end: float, latency: LatencyModel) -> bool:
        """Finished after its deadline. A chunk that was due when it arrived (its audio
        came just in time) is late only when it also took longer than a render normally
        takes (LATE_SLACK x the estimate): that lateness is the audio's, not ours."""
        if item.deadline > item.enqueued:
            return end > item.deadline
        return end > item.enqueued + LATE_SLACK * latency.estimate(len(item.chunk.frames))

    def _resolve(self, rendered: Rendered) -> None:
        self._early.pop(rendered.key, None)
        fut = self._futures.pop(rendered.key, None)
        if fut is not None and not fut.done():
            fut.set_result(rendered)

    # --- reporting ------------------------------------------------------------------

    def _report(self, item: WorkItem, outcome: str, route: Route, started: float,
                render_s: float, batch: int, stages: dict[str, float], *, late: bool = False,
                check: str | None = None, error_kind: str | None = None) -> None:
        wait = max(started - item.enqueued, 0.0)
        self._late_chunks += late
        if outcome != "cancelled":
            self._waits.append((self.clock(), wait if late else 0.0))
        if self._on_outcome is not None:
            self._on_outcome(ChunkOutcome(item.key, outcome, route, wait, render_s, batch,
                                          stages, item.priority, late, check, error_kind))

    def _publish_transitions(self) -> None:
        breakers = {id(lane.breaker): lane.breaker for lane in self.primary + self.fallback}
        for breaker in breakers.values():
            for t in breaker.drain_transitions():
                log.warning("circuit_breaker", lane=t.name, from_state=t.from_state.name,
                            to_state=t.to_state.name, reason=t.reason)
                if self._on_breaker is not None:
                    self._on_breaker(t)

    def stats(self) -> EngineStats:
        now = self.clock()
        sched = self.scheduler.stats()
        lanes = tuple(
            LaneStats(lane.name, lane.breaker.state(now).name.lower(), lane.busy,
                      lane.abandoned, lane.dead)
            for lane in self.primary + self.fallback
        )
        cost = None
        if self.primary_latency.samples:
            # Per frame of a one-chunk call: conservative where batching helps.
            cost = self.primary_latency.per_frame(self.primary[0].renderer.capabilities
                                                  .chunk_frames)
        # Over the last WAIT_WINDOW_S, and only with enough chunks to mean something.
        waits = sorted(w for at, w in self._waits if now - at <= WAIT_WINDOW_S)
        p95 = waits[int(0.95 * (len(waits) - 1))] if len(waits) >= WAIT_MIN_SAMPLES else 0.0
        return EngineStats(lanes, sched.queued, sched.shed, self._late_chunks,
                           sched.completed, sum(1 for lane in self.primary if not lane.dead),
                           cost, p95)

