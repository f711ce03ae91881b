"""The instance's watch loop: instance tier, gauges, GPU memory and the leak guard.

A thin shell: every `TICK_S` it feeds `InstanceHealth` (breaker states,
queue wait, GPU memory) and publishes the instance tier that every session
takes as its floor, and holds the `DemotionGate` that paces its sessions'
deadline-miss tier moves; every `leak_guard.interval_s` it samples memory for the
`LeakGuard` and, when that trips, asks the server to drain and exit with
`leak_guard.exit_code` so that its supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

import structlog

from agent.admission import GpuMemory
from agent.breaker import BreakerState
from agent.leakguard import LeakGuard, MemorySample
from agent.resources import memory_limit_bytes, rss_bytes
from agent.tiers import DemotionGate, InstanceHealth, InstanceSignals
from media.gpu_memory import gpu_memory

if TYPE_CHECKING:
    from agent.server import AgentServer

log = structlog.get_logger(__name__)
TICK_S = 0.2
SHARE_ALPHA = 0.02  # EWMA weight per tick of the speaking share (about 10 s)


class InstanceWatch:
    def __init__(self, server: AgentServer) -> None:
        self.server = server
        cfg = server.config
        self.health = InstanceHealth(cfg.degradation, cfg.admission.gpu_memory_limit,
                                     server.clock())
        self.demotions = DemotionGate(cfg.degradation.miss_demotion_interval_s)
        self.leak_guard = LeakGuard(cfg.leak_guard)
        self.device = server.renderer.capabilities.device
        self.speaking_share: float | None = None
        self.gpu: GpuMemory | None = None
        self._gpu_base: int | None = None
        self._task: asyncio.Task[None] | None = None
        self.reason = ""  # why the instance is at its tier

    @property
    def tier(self) -> int:
        return self.health.tier

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="instance-watch")

    def after_warmup(self) -> None:
        """Remember GPU memory in use before any session (the model's own)."""
        sample = gpu_memory(self.device)
        if sample is not None:
            self._gpu_base = sample[0]
            self.gpu = GpuMemory(sample[0], sample[1], sample[0])

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        every = max(round(self.server.config.leak_guard.interval_s / TICK_S), 1)
        tick = 0
        while True:
            await asyncio.sleep(TICK_S)
            if tick % every == 0:
                await self._sample_memory()
            tick += 1
            self._tick()

    def _tick(self) -> None:
        srv, m = self.server, self.server.metrics
        now = srv.clock()
        stats = srv.engine.stats()
        primary, fallback = srv.engine.router.states(now)
        gpu_share = self.gpu.used_bytes / self.gpu.total_bytes if self.gpu else None
        signals = InstanceSignals(primary, fallback, stats.queue_wait_p95_s, gpu_share)
        self.demotions.urgent = self.health.piled_up(signals)
        change = self.health.update(now, signals)
        if change is not None:
            self.reason = change.reason
            m.degradation_tier.set(change.to_tier)
            log.warning("instance_tier", tier=change.to_tier, from_tier=change.from_tier,
                        reason=change.reason)
        m.breaker_state.set(min(primary, default=BreakerState.OPEN))
        m.render_threads_hung.set(sum(lane.abandoned_threads for lane in stats.lanes))
        for p, n in stats.queued.items():
            m.queue_depth.labels(p.name.lower()).set(n)
        sessions = [c for c in srv.sessions.values() if c.core is not None]
        for tier in (1, 2, 3):
            m.sessions_by_tier.labels(str(tier)).set(sum(1 for c in sessions if c.tier == tier))
        if sessions:
            share_now = sum(1 for c in sessions if c.core is not None and not c.core.idle
                            ) / len(sessions)
            prev = self.speaking_share
            self.speaking_share = share_now if prev is None else (
                prev + SHARE_ALPHA * (share_now - prev))

    async def _sample_memory(self) -> None:
        srv = self.server
        gpu = await asyncio.to_thread(gpu_memory, self.device)
        if gpu is not None:
            used, total = gpu
            base = self._gpu_base if self._gpu_base is not None else used
            self.gpu = GpuMemory(used, total, base)
            srv.metrics.gpu_memory_used.labels(self.device).set(used)
            srv.metrics.gpu_memory_total.labels(self.device).set(total)
        sample = MemorySample(rss_bytes(), memory_limit_bytes(),
                              gpu[0] if gpu else None, gpu[1] if gpu else None)
        tripped = self.leak_guard.observe(sample)
        if tripped is not None and not srv.draining:
            log.error("leak_guard_tripped", reason=tripped,
                      exit_code=srv.config.leak_guard.exit_code)
            srv.request_stop(srv.config.leak_guard.exit_code)
