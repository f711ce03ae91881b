"""The session core: one conversation's turns, audio, render requests and playout, sans I/O.

The asyncio shell (`agent/connection.py`) feeds it client input (`on_*`),
asks it for render work (`poll_chunks`), hands back rendered chunks
(`on_rendered`) and, once per video frame slot, asks what that slot shows
(`next_slot`). Outputs are return values; there is no clock, socket or task
in here. Media time is counted in frames (at `fps`) and samples (at
`out_rate` for the client's audio, 16 kHz for renderers).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.errors import BadRequest
from agent.protocol import TurnDone, TurnStarted
from media.audio import StreamResampler
from media.avatar import Avatar
from media.types import (
    RENDER_SAMPLE_RATE,
    Audio,
    ChunkKey,
    Frame,
    Frames,
    FrameSpec,
    RenderChunk,
)
from sessions.timeline import Timeline
from sessions.turns import Turn

INTERRUPT_TURN = "~interrupt"


@dataclass(frozen=True, slots=True)
class SessionParams:
    session_id: str
    fps: int
    out_rate: int  # the client's audio rate (in and out)
    chunk_frames: int  # renderer's frames per chunk
    lookahead_ms: int  # renderer's audio look-ahead past a chunk's end
    max_turn_s: float
    max_queued_turns: int
    start_lead_frames: int = 3  # slots expected between planning a turn and showing it


@dataclass(frozen=True, slots=True)
class IdleSlot:
    """Show frame `index` of the avatar's shared idle loop, with silence."""

    index: int


@dataclass(frozen=True, slots=True)
class MediaSlot:
    """Show a rendered frame of a turn with its audio (`audio` at out_rate)."""

    turn: str
    frame: Frame
    audio: Audio
    speech: bool
    first_of_turn: bool
    last_of_turn: bool
    client_turn: bool


@dataclass(frozen=True, slots=True)
class HoldSlot:
    """The next frame is not rendered yet: repeat the last picture, silence."""

    frame: Frame


Slot = IdleSlot | MediaSlot | HoldSlot


@dataclass(frozen=True, slots=True)
class SessionStats:
    turns_started: int
    turns_done: int
    turns_interrupted: int
    chunks_requested: int
    chunks_rendered: int
    underruns: int


class SessionCore:
    def __init__(self, avatar: Avatar, timeline: Timeline, params: SessionParams) -> None:
        if params.out_rate % params.fps or RENDER_SAMPLE_RATE % params.fps:
            raise ValueError(f"audio rates must divide into {params.fps} fps frames")
        self.avatar = avatar
        self.timeline = timeline
        self.params = params
        self._spf16 = RENDER_SAMPLE_RATE // params.fps
        self._spf_out = params.out_rate // params.fps
        self._lookahead16 = params.lookahead_ms * RENDER_SAMPLE_RATE // 1000
        self._max_samples16 = int(params.max_turn_s * RENDER_SAMPLE_RATE)
        self._turns: deque[Turn] = deque()  # head plays first
        self._open: Turn | None = None  # receiving audio (the last turn without speak.end)
        self._resampler: StreamResampler | None = None
        self._playing: Turn | None = None
        self._idle_index = 0
        self._last_frame: Frame | None = None
        # The client audio of the last finished turn (for sampled quality records).
        self.last_turn_audio: Audio | None = None
        self._last_spec: FrameSpec | None = None
        self._ids_seen: set[str] = set()
        self._turns_started = 0
        self._turns_done = 0
        self._turns_interrupted = 0
        self._chunks_requested = 0
        self._chunks_rendered = 0
        self._underruns = 0

    # --- client input -----------------------------------------------------

    def on_speak_start(
        self, turn: str, text: str | None, duration_ms: int | None, style: str | None
    ) -> None:
        if turn in self._ids_seen:
            raise BadRequest(f"turn id {turn!r} was already used in this session")
        queued = sum(1 for t in self._turns if t.client) - (1 if self._playing else 0)
        if queued >= self.params.max_queued_turns + (0 if self._playing else 1):
            raise BadRequest(
                f"too many queued turns (limit {self.params.max_queued_turns}); "
                "wait for turn.done or send interrupt"
            )
        if self._open is not None:
            self._close_open_turn()
        self._ids_seen.add(turn)
        t = Turn(id=turn, text=text, style=style, duration_ms=duration_ms)
        self._turns.append(t)
        self._open = t
        self._resampler = StreamResampler(self.params.out_rate, RENDER_SAMPLE_RATE)

    def on_audio(self, samples: Audio) -> None:
        """Client audio at out_rate for the open turn."""
        t = self._open
        if t is None or self._resampler is None:
            raise BadRequest("audio frame outside a turn: send speak.start first")
        resampled = self._resampler.push(samples)
        if len(t.audio16) + len(resampled) > self._max_samples16:
            raise BadRequest(
                f"turn {t.id!r} is longer than the limit of {self.params.max_turn_s:g} s"
            )
        t.audio_out.append(samples)
        t.audio16.append(resampled)

    def on_speak_end(self, turn: str) -> None:
        t = self._open
        if t is None or t.id != turn:
            expected = f"the open turn is {t.id!r}" if t else "no turn is open"
            raise BadRequest(f"speak.end for turn {turn!r}, but {expected}")
        self._close_open_turn()

    def _close_open_turn(self) -> None:
        t = self._open
        assert t is not None and self._resampler is not None
        t.audio16.append(self._resampler.flush())
        t.ended = True
        t.speech_frames = math.ceil(len(t.audio16) / self._spf16)
        if t.started_planning and not t.tail_planned:
            self.timeline.set_turn_length(t.speech_frames)
        self._open = None
        self._resampler = None

    def on_listen(self, active: bool) -> None:
        self.timeline.listen(active)

    def on_interrupt(self, unsent_frames: int = 0) -> list[TurnDone | None]:
        """Barge-in: stop every turn. `unsent_frames` of the playing turn were
        committed but flushed from the send buffer before reaching the client.

        Returns the turn.done messages to send (pts filled in by the shell via
        `done_pts`); the avatar converges to neutral through a short blend.
        """
        playing = self._playing
        if playing is not None and playing.client:
            playing.played = max(playing.played - unsent_frames, 0)
        last_shown = None
        if playing is not None and playing.played > 0:
            last_shown = playing.specs[playing.played - 1]
        elif playing is not None:
            last_shown = self._last_spec
        blend: list[FrameSpec] = []
        if self.timeline.in_turn or playing is not None:
            blend = self.timeline.interrupt(last_shown)
        done: list[TurnDone | None] = []
        for t in self._turns:
            if not t.client:
                continue
            frames = t.played if t is playing else 0
            done.append(TurnDone(turn=t.id, frames=frames, interrupted=True, pts_us=0))
            self._turns_interrupted += 1
        self._turns.clear()
        self._open = None
        self._resampler = None
        self._playing = None
        if playing is not None and blend:
            t = Turn(id=INTERRUPT_TURN, client=False, ended=True)
            t.specs = list(blend)
            t.speech_frames = 0
            t.started_planning = True
            t.tail_planned = True
            self._turns.append(t)
        return done

    # --- render work ------------------------------------------------------

    def poll_chunks(self) -> list[RenderChunk]:
        """Chunks whose frames are planned and not yet requested, in order."""
        out: list[RenderChunk] = []
        planning_open = True  # only the first not-fully-planned turn may plan
        for t in self._turns:
            if planning_open and not t.fully_planned:
                self._plan(t)
                planning_open = t.fully_planned
            out.extend(self._ready_chunks(t))
        return out

    def _plan(self, t: Turn) -> None:
        if not t.started_planning:
            from_idle = 0
            if self._playing is None and self._turns and self._turns[0] is t:
                n = len(self.avatar.idle_loop)
                from_idle = (self._idle_index + self.params.start_lead_frames) % n
            duration = t.speech_frames
            if duration is None and t.duration_ms is not None:
                duration = round(t.duration_ms * self.params.fps / 1000)
            self.timeline.start_turn(duration_frames=duration, style=t.style, from_idle=from_idle)
            t.started_planning = True
        if t.ended:
            assert t.speech_frames is not None
            available = t.speech_frames
        else:
            available = max(len(t.audio16) - self._lookahead16, 0) // self._spf16
        if available > t.planned_speech:
            t.specs.extend(self.timeline.next_frames(available - t.planned_speech))
            t.planned_speech = available
        if t.ended and t.planned_speech == t.speech_frames:
            t.specs.extend(self.timeline.end_turn())
            t.tail_planned = True

    def _ready_chunks(self, t: Turn) -> list[RenderChunk]:
        cf = self.params.chunk_frames
        out: list[RenderChunk] = []
        while True:
            start = t.requested_chunks * cf
            end = start + cf
            total = t.total_frames
            if total is not None:
                if start >= total:
                    break
                end = min(end, total)
            elif end > len(t.specs):
                break
            out.append(
                RenderChunk(
                    key=ChunkKey(self.params.session_id, t.id, t.requested_chunks),
                    avatar=self.avatar.id,
                    frames=tuple(t.specs[start:end]),
                    first_frame=start,
                    audio=t.audio16.view(),
                    fps=self.params.fps,
                    end_of_turn=t.ended,
                )
            )
            t.requested_chunks += 1
            self._chunks_requested += 1
        return out

    def on_rendered(self, key: ChunkKey, frames: Frames, *, partial: bool = False) -> bool:
        """Store a rendered chunk; False when its turn is gone (interrupted).

        `partial`: the chunk's first frames, ahead of the rest (a streaming renderer's
        early frames): playout may show them; the whole chunk follows, beginning with the
        same frames, and replaces them."""
        for t in self._turns:
            if t.id == key.turn:
                if partial:
                    have = t.rendered.get(key.index)
                    if have is None or len(have) < len(frames):
                        t.rendered[key.index] = frames
                    return True
                t.rendered[key.index] = frames
                self._chunks_rendered += 1
                return True
        return False

    def source_frames(self, chunk: RenderChunk) -> Frames:
        """Unrendered stand-in for a failed chunk: the source pictures, mouth as recorded."""
        return np.stack([self.avatar.source.frame(s.source) for s in chunk.frames])

    # --- playout ----------------------------------------------------------

    def next_slot(self) -> tuple[Slot, TurnStarted | None, TurnDone | None]:
        """What the next video frame slot shows, and any turn message to send first.

        Turn messages carry seq/pts 0; the shell fills in the slot's values.
        """
        started: TurnStarted | None = None
        if self._playing is None and self._turns and self._frame_ready(self._turns[0], 0):
            self._playing = self._turns[0]
            if self._playing.client:
                self._turns_started += 1
                started = TurnStarted(turn=self._playing.id, seq=0, pts_us=0)
        t = self._playing
        if t is None:
            slot: Slot = IdleSlot(self._idle_index)
            self._idle_index = (self._idle_index + 1) % len(self.avatar.idle_loop)
            self._last_frame = None
            return slot, None, None
        k = t.played
        if not self._frame_ready(t, k):
            self._underruns += 1
            assert self._last_frame is not None
            return HoldSlot(self._last_frame), started, None
        cf = self.params.chunk_frames
        frame = t.rendered[k // cf][k % cf]
        if k % cf == cf - 1:
            del t.rendered[k // cf]  # played: free it
        a0 = k * self._spf_out
        audio = t.audio_out.window(a0, a0 + self._spf_out)
        spec = t.specs[k]
        t.played += 1
        last = t.total_frames is not None and t.played == t.total_frames
        self._last_frame = frame
        self._last_spec = spec
        done: TurnDone | None = None
        if last:
            self._turns.popleft()
            self._playing = None
            self._idle_index = 0  # the turn ended at neutral: idle_loop[0]
            if t.client:
                self._turns_done += 1
                self.last_turn_audio = t.audio_out.view()
                done = TurnDone(turn=t.id, frames=t.played, interrupted=False, pts_us=0)
        slot = MediaSlot(
            turn=t.id,
            frame=frame,
            audio=audio,
            speech=spec.speech,
            first_of_turn=k == 0,
            last_of_turn=last,
            client_turn=t.client,
        )
        return slot, started, done

    def _frame_ready(self, t: Turn, k: int) -> bool:
        total = t.total_frames
        if total is not None and k >= total:
            return False
        frames = t.rendered.get(k // self.params.chunk_frames)
        return frames is not None and k % self.params.chunk_frames < len(frames)

    # --- state ------------------------------------------------------------

    @property
    def idle(self) -> bool:
        return self._playing is None and not self._turns

    @property
    def active_turn(self) -> str | None:
        return self._playing.id if self._playing and self._playing.client else None

    @property
    def open_turn(self) -> str | None:
        """The turn receiving audio (speak.start without speak.end), if any."""
        return self._open.id if self._open is not None else None

    def frames_until(self, chunk: RenderChunk) -> int:
        """Frame slots before a planned chunk's first frame is due (its deadline)."""
        ahead = 0
        for t in self._turns:
            if t.id == chunk.key.turn:
                return ahead + chunk.first_frame - t.played
            ahead += (t.total_frames or len(t.specs)) - t.played
        return ahead

    def is_playing(self, turn: str) -> bool:
        return self._playing is not None and self._playing.id == turn

    def pending_turn_ids(self) -> Sequence[str]:
        return [t.id for t in self._turns]

    def stats(self) -> SessionStats:
        return SessionStats(
            turns_started=self._turns_started,
            turns_done=self._turns_done,
            turns_interrupted=self._turns_interrupted,
            chunks_requested=self._chunks_requested,
            chunks_rendered=self._chunks_rendered,
            underruns=self._underruns,
        )

    def snapshot(self) -> dict[str, Any]:
        """Resumable state: the conversation's place in the avatar's material.

        Turns in flight are not carried over: a lost connection ends them.
        """
        if self.timeline.in_turn:
            self.timeline.interrupt(None)
        return {"timeline": self.timeline.state(), "idle_index": self._idle_index}

    def restore(self, state: dict[str, Any]) -> None:
        self._idle_index = int(state.get("idle_index", 0)) % len(self.avatar.idle_loop)
