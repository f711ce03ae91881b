"""Per-session observability glue: turn records, sampled turns, allocation events.

The connection shell calls these few methods at the points where things
happen; this module decides what is logged, recorded and sampled. Spans of a
turn come from the engine (queue wait and renderer stages per chunk) and
from the shell (encode, send).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog

from agent.engine import ChunkOutcome
from agent.telemetry import SampleWriter, TurnTrace
from media.types import Frame

log = structlog.get_logger(__name__)


@dataclass
class _Turn:
    trace: TurnTrace
    frames: list[Frame] = field(default_factory=list)
    sampled: bool = False


class SessionObserver:
    def __init__(self, session_id: str, trace_id: str, sampler: SampleWriter | None,
                 max_sample_frames: int = 25 * 120) -> None:
        self.session_id = session_id
        self.trace_id = trace_id
        self.sampler = sampler
        self.max_sample_frames = max_sample_frames
        self._turns: dict[str, _Turn] = {}
        self._saving: set[asyncio.Task[Any]] = set()

    def turn_queued(self, turn: str, now: float) -> None:
        sampled = self.sampler is not None and self.sampler.wanted(self.session_id, turn)
        self._turns[turn] = _Turn(TurnTrace(self.session_id, turn, self.trace_id, now),
                                  sampled=sampled)

    def span(self, turn: str, stage: str, start: float, duration: float) -> None:
        t = self._turns.get(turn)
        if t is not None:
            t.trace.add(stage, start, duration)

    def chunk(self, outcome: ChunkOutcome, now: float) -> None:
        """Spans of one finished chunk: its queue wait, then its renderer stages in order."""
        t = self._turns.get(outcome.key.turn)
        if t is None:
            return
        start = now - outcome.render_s - outcome.queue_wait_s
        t.trace.add("queue_wait", start, outcome.queue_wait_s)
        at = start + outcome.queue_wait_s
        for stage, seconds in outcome.stages.items():
            t.trace.add(stage, at, seconds)
            at += seconds
        t.trace.counts[f"chunks_{outcome.outcome}"] = (
            t.trace.counts.get(f"chunks_{outcome.outcome}", 0) + 1)

    def frame_shown(self, turn: str, frame: Frame) -> None:
        t = self._turns.get(turn)
        if t is not None and t.sampled and len(t.frames) < self.max_sample_frames:
            t.frames.append(frame)

    def turn_finished(self, turn: str, outcome: str, audio: np.ndarray | None, rate: int,
                      fps: int) -> None:
        """Log the turn's record; save it when sampled (in a worker thread)."""
        t = self._turns.pop(turn, None)
        if t is None:
            return
        record = t.trace.record()
        record["outcome"] = outcome
        log.info("turn_trace", turn_id=turn, **{k: v for k, v in record.items()
                                                 if k not in ("session_id", "turn_id")})
        if t.sampled and self.sampler is not None and audio is not None:
            sampler = self.sampler
            task = asyncio.get_running_loop().create_task(asyncio.to_thread(
                sampler.save, self.session_id, turn, audio, rate, t.frames, fps, record))
            self._saving.add(task)
            task.add_done_callback(self._saving.discard)

    async def close(self) -> None:
        if self._saving:
            await asyncio.gather(*self._saving, return_exceptions=True)
