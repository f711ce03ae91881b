"""A session's tier in the shell: feeds its `SessionHealth` core, applies its changes.

Two tiers matter. The decided tier (`health.tier`) routes new render work
at once (tier 1 the primary, tier 2 the CPU fallback, tier 3 nothing). The
applied tier (`video.tier`) is what the frames on the wire show: applying
a change needs the shared loops at the tier's picture size, which are
prepared in the background, so it follows within a frame or two. `poll`
runs once per frame slot in the playout task (the only task that encodes)
and returns the `tier` message to send ahead of the first frame of the new
tier.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog

from agent.protocol import TierChanged, VideoInfo
from agent.tiers import ChunkReport, SessionHealth, TierChange
from agent.videoout import VideoOutput
from media.encode import EncodedFrame

if TYPE_CHECKING:
    from agent.metrics import Metrics
    from agent.watch import InstanceWatch

log = structlog.get_logger(__name__)

Loops = tuple[tuple[EncodedFrame, ...], tuple[EncodedFrame, ...]]


class SessionTiers:
    def __init__(self, health: SessionHealth, video: VideoOutput, watch: InstanceWatch,
                 metrics: Metrics, clock: Callable[[], float],
                 on_decided: Callable[[int], None]) -> None:
        self.health = health
        self._on_decided = on_decided  # routes the session's queued work at once
        self.video = video
        self._watch = watch
        self._metrics = metrics
        self._clock = clock
        self._pending: TierChange | None = None
        self._loading: asyncio.Future[Loops] | None = None

    @property
    def decided(self) -> int:
        return self.health.tier

    @property
    def applied(self) -> int:
        return self.video.tier

    def on_chunk(self, report: ChunkReport) -> None:
        self.health.on_chunk(self._clock(), report)

    def on_congestion(self) -> None:
        self.health.on_congestion(self._clock())

    def poll(self) -> TierChanged | None:
        change = self.health.update(self._clock(), self._watch.tier, self._watch.reason)
        if change is not None:
            self._on_decided(change.to_tier)
            if self._loading is not None and not self._loading.done():
                self._loading.cancel()
            self._pending = change
            self._loading = asyncio.ensure_future(self.video.loops(change.to_tier))
        if self._pending is None or self._loading is None or not self._loading.done():
            return None
        pending, loading = self._pending, self._loading
        self._pending = self._loading = None
        if pending.to_tier == self.video.tier:
            return None  # changed back before it was applied
        idle, static = loading.result()
        before = self.video.tier
        resized = self.video.switch(pending.to_tier, idle, static)
        fmt = self.video.current
        info = VideoInfo(codec=fmt.codec, fps=fmt.fps, width=fmt.width,
                         height=fmt.height) if resized else None
        self._metrics.degradation_transitions.labels(str(before), str(pending.to_tier)).inc()
        if pending.reason.startswith("client congested") and pending.to_tier > before:
            self._metrics.slow_consumer_events.labels("tier_down").inc()
        log.info("tier_changed", tier=pending.to_tier, from_tier=before, reason=pending.reason,
                 width=fmt.width, height=fmt.height)
        return TierChanged(tier=pending.to_tier, reason=pending.reason, video=info)

    def close(self) -> None:
        if self._loading is not None:
            self._loading.cancel()
