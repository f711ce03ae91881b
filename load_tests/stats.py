"""What one simulated user measured, fed by a sans-I/O probe per connection.

`ConnectionProbe` takes what a `SessionClient` recorded (messages, video and
audio with their arrival times) plus what the user did (turn sent, interrupt
sent) and accumulates `UserStats`. Times are client monotonic seconds; the
probe stores them relative to the run's start so that series can be cut
into windows. No I/O and no clock here: every event carries its time.
"""

from __future__ import annotations

from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.protocol import FrameFlags, MediaHeader

PAIR_HORIZON_US = 2_000_000  # an A/V partner not seen within 2 s of pts is unpaired


@dataclass
class Series:
    """Samples with the time (seconds from the run start) they belong to."""

    t: array[float] = field(default_factory=lambda: array("d"))
    v: array[float] = field(default_factory=lambda: array("d"))

    def add(self, t: float, v: float) -> None:
        self.t.append(t)
        self.v.append(v)

    def values(self, start: float = -np.inf, end: float = np.inf) -> np.ndarray:
        t, v = np.frombuffer(self.t), np.frombuffer(self.v)
        return v[(t >= start) & (t < end)] if len(t) else v


@dataclass
class ClientSeries:
    """The load generator's own state over time, sampled by the run."""

    cpu: Series = field(default_factory=Series)  # this process, percent of one core
    machine_cpu: Series = field(default_factory=Series)  # every process here, same unit
    loop_lag: Series = field(default_factory=Series)  # how late the event loop woke up
    connected: Series = field(default_factory=Series)  # users with an open session


@dataclass
class UserStats:
    user: int
    connect_s: Series = field(default_factory=Series)  # fresh sessions: connect to ready
    resume_s: Series = field(default_factory=Series)  # resumes: connect to ready
    ttff_s: Series = field(default_factory=Series)  # first audio sent -> first turn frame
    gap_s: Series = field(default_factory=Series)  # arrival gap between video frames
    interrupt_ack_s: Series = field(default_factory=Series)  # interrupt -> turn.done
    interrupt_idle_s: Series = field(default_factory=Series)  # interrupt -> first idle frame
    jitter_s: array[float] = field(default_factory=lambda: array("d"))  # RFC 3550, per frame
    av_offset_s: array[float] = field(default_factory=lambda: array("d"))  # video - audio
    counts: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)  # server codes and client failures
    tiers: Counter[int] = field(default_factory=Counter)  # video frames per tier
    close_codes: Counter[int] = field(default_factory=Counter)
    error_log: list[tuple[float, str]] = field(default_factory=list)  # (time, code)
    connected_s: float = 0.0

    def error(self, code: str, t: float) -> None:
        self.errors[code] += 1
        self.error_log.append((t, code))


class IdleCatalog:
    """Payloads of the server's shared idle video (docs/protocol.md: encoded once
    per format, shared by all sessions), learned from the frames a fresh session
    shows before its first turn. A frame found here after an interrupt is idle."""

    def __init__(self) -> None:
        self._seen: set[int] = set()

    def learn(self, payload: bytes) -> None:
        self._seen.add(hash(payload))

    def __contains__(self, payload: bytes) -> bool:
        return hash(payload) in self._seen

    def __len__(self) -> int:
        return len(self._seen)


class ConnectionProbe:
    def __init__(self, stats: UserStats, ready: dict[str, Any], *, t0: float, opened: float,
                 catalog: IdleCatalog, playout_buffer_s: float) -> None:
        self.stats = stats
        self.ready = ready
        self.t0 = t0
        self.opened = opened
        self.catalog = catalog
        self.buffer_s = playout_buffer_s
        self.frame_us = 1_000_000 // int(ready["video"]["fps"])
        self.resume_token: str = ready["resume_token"]
        self.last_video_seq: int | None = None
        self._learn_idle = not ready.get("resumed", False)
        self._last_video: MediaHeader | None = None
        self._last_arrival: float | None = None
        self._last_transit: float | None = None
        self._jitter = 0.0
        self._min_transit = np.inf
        self._tier: int | None = None
        self._video_at: dict[int, float] = {}  # pts -> arrival, waiting for the audio
        self._audio_at: dict[int, float] = {}
        self._sent: dict[str, float] = {}  # turn -> first audio sent, until its first frame
        self._started: dict[str, int] = {}  # turn -> seq of its first frame
        self.done: dict[str, dict[str, Any]] = {}
        self._interrupt_at: float | None = None
        self._ack_pending = False
        self.idle_after_interrupt = False

    # --- what the user did ------------------------------------------------------

    def turn_sent(self, turn: str, now: float) -> None:
        self._learn_idle = False
        self._sent[turn] = now
        self.stats.counts["turns_sent"] += 1

    def interrupt_sent(self, now: float) -> None:
        self._interrupt_at = now
        self._ack_pending = True
        self.idle_after_interrupt = False
        self.stats.counts["interrupts_sent"] += 1

    def closed(self, now: float, close_code: int | None) -> None:
        self.stats.connected_s += max(0.0, now - self.opened)
        if close_code is not None:
            self.stats.close_codes[close_code] += 1
        self.stats.counts["unpaired_av"] += len(self._video_at) + len(self._audio_at)
        self._video_at.clear()
        self._audio_at.clear()

    # --- what the server sent ---------------------------------------------------

    def on_message(self, msg: dict[str, Any], now: float) -> None:
        kind = msg.get("type")
        s = self.stats
        if kind == "turn.started":
            self._started[msg["turn"]] = int(msg["seq"])
        elif kind == "turn.done":
            self.done[msg["turn"]] = msg
            self.resume_token = msg.get("resume_token") or self.resume_token
            if msg.get("interrupted"):
                s.counts["turns_interrupted"] += 1
                if self._ack_pending and self._interrupt_at is not None:
                    s.interrupt_ack_s.add(now - self.t0, now - self._interrupt_at)
                    self._ack_pending = False
            else:
                s.counts["turns_completed"] += 1
            self._sent.pop(msg["turn"], None)
        elif kind == "tier":
            s.counts["tier_messages"] += 1
        elif kind == "error":
            s.error(str(msg.get("code", "unknown")), now - self.t0)

    def on_video(self, header: MediaHeader, payload: bytes, now: float) -> None:
        s = self.stats
        s.counts["video_frames"] += 1
        s.counts["video_bytes"] += len(payload)
        s.tiers[header.tier] += 1
        if header.flags & FrameFlags.KEYFRAME:
            s.counts["keyframes"] += 1
        if self._tier is not None and header.tier != self._tier:
            s.counts["tier_changes"] += 1
        self._tier = header.tier
        rel = now - self.t0
        if self._last_arrival is not None:
            s.gap_s.add(rel, now - self._last_arrival)
        self._last_arrival = now
        last = self._last_video
        if last is not None:
            if header.seq != last.seq + 1:
                s.counts["seq_gaps"] += 1
            # Frames dropped for a slow reader leave a gap in pts, not in seq.
            missing = (header.pts_us - last.pts_us) // self.frame_us - 1
            s.counts["dropped_frames"] += max(0, missing)
        self._last_video = header
        self.last_video_seq = header.seq
        self._transit(now - header.pts_us / 1e6)
        self._pair(header.pts_us, now, self._video_at, self._audio_at)
        if header.flags & FrameFlags.SPEECH and self._sent:
            for turn, sent in list(self._sent.items()):
                first = self._started.get(turn)
                if first is not None and header.seq >= first:
                    s.ttff_s.add(sent - self.t0, now - sent)  # counted when the turn began
                    del self._sent[turn]
        if self._learn_idle:
            self.catalog.learn(payload)
        elif (self._interrupt_at is not None and now > self._interrupt_at
              and payload in self.catalog):
            s.interrupt_idle_s.add(rel, now - self._interrupt_at)
            self._interrupt_at = None
            self.idle_after_interrupt = True

    def on_audio(self, header: MediaHeader, now: float) -> None:
        self.stats.counts["audio_frames"] += 1
        self._pair(header.pts_us, now, self._audio_at, self._video_at)

    # --- internals ----------------------------------------------------------------

    def _transit(self, transit: float) -> None:
        """Transit = arrival - pts: constant for a perfectly paced stream. Jitter is
        RFC 3550's interarrival jitter (transit changes, smoothed over 16 frames); a
        frame is late when it trails the fastest frame of the connection by more than
        a player's buffer."""
        s = self.stats
        if self._last_transit is not None:
            self._jitter += (abs(transit - self._last_transit) - self._jitter) / 16
            s.jitter_s.append(self._jitter)
        self._last_transit = transit
        self._min_transit = min(self._min_transit, transit)
        if transit - self._min_transit > self.buffer_s:
            s.counts["late_frames"] += 1

    def _pair(self, pts: int, now: float, mine: dict[int, float],
              other: dict[int, float]) -> None:
        partner = other.pop(pts, None)
        if partner is None:
            mine[pts] = now
            if len(mine) > 64:  # bounded: old entries without a partner are unpaired
                for old in [p for p in mine if p < pts - PAIR_HORIZON_US]:
                    del mine[old]
                    self.stats.counts["unpaired_av"] += 1
            return
        video_at, audio_at = (now, partner) if mine is self._video_at else (partner, now)
        self.stats.av_offset_s.append(video_at - audio_at)
