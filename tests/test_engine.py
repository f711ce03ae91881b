"""The engine over real renderers (the CPU renderer, wrapped in chaos): timeouts, breakers,
fallback, shadow probes, validation, shedding. Real threads and asyncio, tiny avatar."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from agent.breaker import BreakerState
from agent.chaos import ChaosRenderer, ChaosSpec
from agent.config import BreakerConfig, CpuRendererConfig, DefaultAvatarConfig, ValidationConfig
from agent.engine import PREPARE_SLICE_FRAMES, Engine, Rendered
from agent.errors import RenderError
from agent.fallback import Route
from agent.framechecks import FrameChecks
from agent.scheduler import ChunkScheduler, Lane, Priority
from media.avatar import Avatar
from media.cpu_renderer import CpuRenderer
from media.default_avatar import ensure_default_avatar
from media.types import (
    AvatarPrep,
    ChunkKey,
    Frames,
    FrameSink,
    FrameSpec,
    RenderChunk,
    Renderer,
    RenderResult,
)
from tests.conftest import timeout

pytestmark = pytest.mark.unit

BREAKER = BreakerConfig(timeouts_to_open=1, errors_to_open=2, open_s=0.2, max_open_s=0.4)


@pytest.fixture(scope="module")
def avatar(tmp_path_factory: pytest.TempPathFactory) -> Avatar:
    config = DefaultAvatarConfig(size=64, clip_seconds=(2.0,), seed=4)
    return ensure_default_avatar(Path(tmp_path_factory.mktemp("avatars")), config, 25)


def chunk(avatar: Avatar, session: str, index: int = 0) -> RenderChunk:
    specs = tuple(FrameSpec(s.source, speech=True) for s in avatar.idle_loop[:4])
    audio = (0.2 * np.sin(np.arange(16000) / 5.0)).astype(np.float32)
    return RenderChunk(ChunkKey(session, "t", index), avatar.id, specs, 0, audio, 25)


def make_engine(avatar: Avatar, primary: Renderer | list[Renderer], fallback: Renderer, *,
                max_queue: int = 64, max_abandoned: int = 4) -> Engine:
    lookup = {avatar.id: avatar}.__getitem__
    checks = FrameChecks(lookup, ValidationConfig())
    primaries = primary if isinstance(primary, list) else [primary]
    return Engine(primaries, fallback, ChunkScheduler(max_batch=2, max_queue=max_queue),
                  breaker=BREAKER, fallback_workers=1, render_timeout_s=0.3,
                  max_abandoned=max_abandoned, stand_in=checks.stand_in,
                  validate=checks.validate)


def cpu(avatar: Avatar) -> CpuRenderer:
    return CpuRenderer({avatar.id: avatar}.__getitem__, CpuRendererConfig())


@pytest.fixture
async def parts(avatar: Avatar) -> AsyncIterator[tuple[ChaosRenderer, Avatar]]:
    chaos = ChaosRenderer(cpu(avatar), ChaosSpec())
    yield chaos, avatar
    chaos.close()


async def render(engine: Engine, c: RenderChunk, lane: Lane = Lane.PRIMARY) -> Rendered:
    fut = engine.submit(c, engine.clock() + 1.0, Priority.IN_TURN, lane)
    return await asyncio.wait_for(fut, timeout(5))


async def test_a_hang_times_out_opens_the_breaker_and_the_fallback_serves(
    parts: tuple[ChaosRenderer, Avatar]
) -> None:
    chaos, avatar = parts
    chaos.set_spec(ChaosSpec(hang=1.0))
    engine = make_engine(avatar, chaos, cpu(avatar), max_abandoned=1)
    engine.start()
    try:
        first = await render(engine, chunk(avatar, "a"))
        assert (first.outcome, first.served_by) == ("timeout", Route.PRIMARY)
        assert first.frames.shape == (4, 64, 64, 3) and first.frames.dtype == np.uint8
        lane = engine.stats().lanes[0]
        assert lane.abandoned_threads == 1 and lane.dead  # max_abandoned=1: no new thread
        # The hung thread blocks neither the fallback nor the loop.
        second = await render(engine, chunk(avatar, "b"))
        assert (second.outcome, second.served_by) == ("ok", Route.FALLBACK)
        assert engine.router.states(engine.clock())[0][0] is not BreakerState.CLOSED
        # Lifting the fault releases the thread; the lane is back and a shadow probe
        # (a copy of the last chunk) closes the breaker.
        chaos.set_spec(ChaosSpec())
        for _ in range(100):
            if engine.router.primary_available(engine.clock()):
                break
            await asyncio.sleep(0.05)
        assert engine.stats().lanes[0].abandoned_threads == 0
        third = await render(engine, chunk(avatar, "c"))
        assert (third.outcome, third.served_by) == ("ok", Route.PRIMARY)
    finally:
        await engine.close()


async def test_retryable_oom_is_rendered_by_the_fallback(
    parts: tuple[ChaosRenderer, Avatar]
) -> None:
    chaos, avatar = parts
    chaos.set_spec(ChaosSpec(oom=1.0))
    engine = make_engine(avatar, chaos, cpu(avatar))
    engine.start()
    try:
        got = await render(engine, chunk(avatar, "a"))
        assert (got.outcome, got.served_by) == ("ok", Route.FALLBACK)
        plain = cpu(avatar).render([chunk(avatar, "a")])[0].frames
        assert np.array_equal(got.frames, plain)  # really rendered, not a stand-in
    finally:
        await engine.close()


async def test_corrupt_output_is_replaced_and_counts_against_the_breaker(
    parts: tuple[ChaosRenderer, Avatar]
) -> None:
    chaos, avatar = parts
    chaos.set_spec(ChaosSpec(corrupt=1.0))
    engine = make_engine(avatar, chaos, cpu(avatar))
    engine.start()
    try:
        results = [await render(engine, chunk(avatar, f"s{i}")) for i in range(2)]
        assert [r.outcome for r in results] == ["invalid", "invalid"]
        assert all(r.frames.dtype == np.uint8 and np.isfinite(r.frames).all()
                   and r.frames.std() > 10 for r in results)
        assert not engine.router.primary_available(engine.clock())  # errors_to_open=2
        third = await render(engine, chunk(avatar, "s3"))
        assert third.served_by is Route.FALLBACK and third.outcome == "ok"
    finally:
        await engine.close()


async def test_when_every_renderer_fails_chunks_get_the_static_tier(avatar: Avatar) -> None:
    broken_fallback = ChaosRenderer(cpu(avatar), ChaosSpec(error=1.0))
    primary = ChaosRenderer(cpu(avatar), ChaosSpec(error=1.0))
    engine = make_engine(avatar, primary, broken_fallback)
    engine.start()
    try:
        outcomes = []
        for i in range(6):
            r = await render(engine, chunk(avatar, f"s{i}"))
            outcomes.append((r.served_by.value, r.outcome))
        assert outcomes[-1] == ("static", "ok")
        assert ("fallback", "error") in outcomes
    finally:
        await engine.close()
        primary.close()
        broken_fallback.close()


async def test_queue_overflow_sheds_least_urgent_with_stand_ins(
    parts: tuple[ChaosRenderer, Avatar]
) -> None:
    chaos, avatar = parts
    chaos.set_spec(ChaosSpec(delay_ms=200))
    engine = make_engine(avatar, chaos, cpu(avatar), max_queue=2)
    engine.start()
    try:
        now = engine.clock()
        futs = [engine.submit(chunk(avatar, f"s{i}"), now + 1.0 + i, Priority.SPECULATIVE)
                for i in range(6)]
        futs.append(engine.submit(chunk(avatar, "urgent"), now, Priority.IN_TURN))
        done = await asyncio.wait_for(asyncio.gather(*futs), timeout(10))
        shed = [r for r in done if r.outcome == "shed"]
        assert shed and all(r.frames.shape == (4, 64, 64, 3) for r in shed)
        assert done[-1].outcome == "ok"  # the urgent one was kept
        assert engine.stats().shed == len(shed)
    finally:
        await engine.close()


async def test_reroute_moves_queued_work_and_static_serves_it_at_once(
    parts: tuple[ChaosRenderer, Avatar]
) -> None:
    chaos, avatar = parts
    chaos.set_spec(ChaosSpec(delay_ms=300))
    engine = make_engine(avatar, chaos, cpu(avatar))
    engine.start()
    try:
        now = engine.clock()
        busy = [engine.submit(chunk(avatar, f"x{i}"), now, Priority.IN_TURN) for i in range(2)]
        await asyncio.sleep(0.05)  # both primary-bound chunks are rendering (one lane)
        moved = engine.submit(chunk(avatar, "a", 1), now + 1, Priority.IN_TURN)
        gone = engine.submit(chunk(avatar, "b", 1), now + 1, Priority.IN_TURN)
        engine.reroute("a", Lane.FALLBACK)
        engine.reroute("b", None)
        b = await asyncio.wait_for(gone, timeout(2))
        assert (b.served_by, b.outcome) == (Route.STATIC, "ok")
        a = await asyncio.wait_for(moved, timeout(2))
        assert a.served_by is Route.FALLBACK
        await asyncio.wait_for(asyncio.gather(*busy), timeout(5))
    finally:
        await engine.close()


class PreparingCpu(CpuRenderer):
    """The CPU renderer with `frames` of per-avatar work to prepare, `slice_s` a slice;
    records the thread and the size of each slice asked for."""

    def __init__(self, avatar: Avatar, frames: int, slice_s: float = 0.0) -> None:
        super().__init__({avatar.id: avatar}.__getitem__, CpuRendererConfig())
        self.avatar_id, self.frames, self.slice_s = avatar.id, frames, slice_s
        self.done = 0
        self.calls: list[tuple[str, int | None]] = []

    def prepare_avatar(self, avatar: str, max_frames: int | None = None) -> AvatarPrep:
        self.calls.append((threading.current_thread().name, max_frames))
        if avatar != self.avatar_id:
            raise RenderError(f"unknown avatar {avatar!r}", retryable=False)
        time.sleep(self.slice_s)
        left = self.frames - self.done
        n = left if max_frames is None else min(left, max_frames)
        self.done += n
        return AvatarPrep(avatar, n, left - n, 0.001)


async def test_prepare_runs_in_slices_once_per_renderer_on_its_lane(avatar: Avatar) -> None:
    one, two = PreparingCpu(avatar, 70), PreparingCpu(avatar, 70)
    # Lanes 0 and 1 share one renderer; lane 2's is wrapped in chaos, which spares prepares.
    engine = make_engine(avatar, [one, one, ChaosRenderer(two, ChaosSpec(hang=1.0))],
                         cpu(avatar))
    engine.start()
    try:
        done = await asyncio.wait_for(engine.prepare_avatar(avatar.id), timeout(5))
        assert [(p.avatar, p.frames, p.remaining) for p in done] == [(avatar.id, 70, 0)] * 2
        assert [p.seconds for p in done] == pytest.approx([0.003, 0.003])
        assert one.calls == [("render-primary-0", PREPARE_SLICE_FRAMES)] * 3
        assert two.calls == [("render-primary-2", PREPARE_SLICE_FRAMES)] * 3
        again = await asyncio.wait_for(engine.prepare_avatar(avatar.id), timeout(5))
        assert [(p.frames, p.remaining) for p in again] == [(0, 0)] * 2
        # A renderer's error is logged, not raised: its renders will do the work.
        assert await asyncio.wait_for(engine.prepare_avatar("nobody"), timeout(5)) == []
    finally:
        await engine.close()
    # A renderer with nothing to prepare is left alone.
    plain = make_engine(avatar, cpu(avatar), cpu(avatar))
    plain.start()
    try:
        assert await plain.prepare_avatar(avatar.id) == []
    finally:
        await plain.close()


async def test_a_render_waits_for_one_prepare_slice_at_most(avatar: Avatar) -> None:
    slow = PreparingCpu(avatar, 20 * PREPARE_SLICE_FRAMES, slice_s=0.05)
    engine = make_engine(avatar, slow, cpu(avatar))
    engine.start()
    try:
        preparing = asyncio.create_task(engine.prepare_avatar(avatar.id))
        await asyncio.sleep(0.07)  # in the second slice
        got = await render(engine, chunk(avatar, "a"))
        assert (got.outcome, got.served_by) == ("ok", Route.PRIMARY)
        assert not preparing.done() and slow.done < slow.frames
        done = await asyncio.wait_for(preparing, timeout(5))
        assert [(p.frames, p.remaining) for p in done] == [(slow.frames, 0)]
    finally:
        await engine.close()


async def test_the_pile_up_signal_counts_only_the_waits_of_late_chunks(
    parts: tuple[ChaosRenderer, Avatar]
) -> None:
    """Work rendered ahead (a TTS streaming faster than real time) waits in the queue on
    purpose: that must not read as a pile-up, which drops the whole instance a tier."""
    chaos, avatar = parts
    chaos.set_spec(ChaosSpec(delay_ms=40))
    engine = make_engine(avatar, chaos, cpu(avatar))
    engine.start()
    try:
        now = engine.clock()
        ahead = [engine.submit(chunk(avatar, f"a{i}"), now + 60.0, Priority.SPECULATIVE)
                 for i in range(24)]
        done = await asyncio.wait_for(asyncio.gather(*ahead), timeout(30))
        assert not any(r.late for r in done)
        assert max(r.queue_wait_s for r in done) > 0.2  # they did wait, on time
        assert engine.stats().queue_wait_p95_s == 0.0
        now = engine.clock()
        due = [engine.submit(chunk(avatar, f"d{i}", 1), now + 0.01, Priority.IN_TURN)
               for i in range(24)]
        done = await asyncio.wait_for(asyncio.gather(*due), timeout(30))
        assert sum(r.late for r in done) > 12
        assert engine.stats().queue_wait_p95_s > 0.2
    finally:
        await engine.close()


def turn_start(avatar: Avatar, session: str) -> RenderChunk:
    """A turn's first chunk of 16 frames (the CPU renderer streams turn starts)."""
    specs = tuple(FrameSpec(s.source, speech=True) for s in avatar.idle_loop[:16])
    assert len(specs) == 16
    audio = (0.2 * np.sin(np.arange(16000) / 5.0)).astype(np.float32)
    return RenderChunk(ChunkKey(session, "t", 0), avatar.id, specs, 0, audio, 25)


class StallAfterFirstFrames:
    """The CPU renderer, stalling after it has handed over its first early frames: a hang
    where chaos (which faults whole calls) cannot put one."""

    def __init__(self, inner: CpuRenderer) -> None:
        self.inner = inner
        self.release = threading.Event()
        self.finished = threading.Event()
        self.capabilities = inner.capabilities

    def warmup(self) -> None:
        self.inner.warmup()

    def close(self) -> None:
        self.release.set()

    def render(self, batch: Sequence[RenderChunk]) -> list[RenderResult]:
        return self.inner.render(batch)

    def render_streaming(self, batch: Sequence[RenderChunk],
                         on_frames: FrameSink) -> list[RenderResult]:
        calls = 0

        def sink(i: int, frames: Frames) -> None:
            nonlocal calls
            calls += 1
            if calls == 2:
                self.release.wait(timeout(5))
            on_frames(i, frames)

        try:
            return self.inner.render_streaming(batch, sink)
        finally:
            self.finished.set()


def early_sink(got: list[tuple[int, Frames, bool]], fut: list[asyncio.Future[Rendered]]
               ) -> Callable[[Frames], None]:
    def on_frames(frames: Frames) -> None:
        assert threading.current_thread() is threading.main_thread()  # on the event loop
        got.append((len(frames), frames.copy(), fut[0].done()))
    return on_frames


def submit_early(engine: Engine, c: RenderChunk, got: list[tuple[int, Frames, bool]],
                 priority: Priority = Priority.TURN_START) -> asyncio.Future[Rendered]:
    """Submit with a sink noting each early delivery (count, frames, future done yet)."""
    fut: list[asyncio.Future[Rendered]] = []
    fut.append(engine.submit(c, engine.clock() + 1.0, priority, on_frames=early_sink(got, fut)))
    return fut[0]


async def test_a_turn_start_comes_out_in_checked_early_frames_before_its_future(
        avatar: Avatar) -> None:
    engine = make_engine(avatar, cpu(avatar), cpu(avatar))
    engine.start()
    try:
        got: list[tuple[int, Frames, bool]] = []
        c = turn_start(avatar, "a")
        done = await asyncio.wait_for(submit_early(engine, c, got), timeout(5))
        assert (done.outcome, done.served_by) == ("ok", Route.PRIMARY)
        assert [n for n, _, _ in got] == [1, 4, 8, 12]
        assert not any(resolved for _, _, resolved in got)
        for n, frames, _ in got:
            np.testing.assert_array_equal(frames, done.frames[:n])
        # Without a sink, or for a chunk inside a turn, the chunk comes out whole.
        assert (await render(engine, c)).outcome == "ok"
        inside = replace(turn_start(avatar, "b"), first_frame=16)
        got.clear()
        fut = submit_early(engine, inside, got, Priority.IN_TURN)
        assert (await asyncio.wait_for(fut, timeout(5))).outcome == "ok" and got == []
    finally:
        await engine.close()


async def test_corrupt_early_frames_are_never_shown(avatar: Avatar) -> None:
    chaos = ChaosRenderer(cpu(avatar), ChaosSpec(corrupt=1.0, seed=3))
    engine = make_engine(avatar, chaos, cpu(avatar))
    engine.start()
    try:
        got: list[tuple[int, Frames, bool]] = []
        done = await asyncio.wait_for(submit_early(engine, turn_start(avatar, "a"), got),
                                      timeout(5))
        assert done.outcome == "invalid" and got == []
        assert done.frames.dtype == np.uint8 and done.frames.std() > 10  # the stand-in
    finally:
        chaos.close()
        await engine.close()


async def test_after_a_timeout_no_more_early_frames_arrive(avatar: Avatar) -> None:
    stall = StallAfterFirstFrames(cpu(avatar))
    engine = make_engine(avatar, stall, cpu(avatar))
    engine.start()
    try:
        got: list[tuple[int, Frames, bool]] = []
        done = await asyncio.wait_for(submit_early(engine, turn_start(avatar, "a"), got),
                                      timeout(5))
        assert done.outcome == "timeout" and [n for n, _, _ in got] == [1]
        stall.release.set()  # the abandoned render goes on and hands over the rest
        assert await asyncio.to_thread(stall.finished.wait, timeout(5))
        await asyncio.sleep(0.1)  # its hand-overs reach the loop, and are dropped there
        assert [n for n, _, _ in got] == [1]
    finally:
        stall.close()
        await engine.close()
