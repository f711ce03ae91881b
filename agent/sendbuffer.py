"""Per-session send buffer with slow-consumer policy, sans I/O.

Media and turn messages queue in playout order. When a client reads too
slowly the buffer fills: queued non-key video is dropped (never audio, never
keyframes carrying codec config), and later non-key video is dropped until
the producer sends a keyframe (`needs_keyframe`), so the client's decoder is
never fed a P-frame whose reference it did not get. Sequence numbers are
assigned when a frame leaves the buffer, per kind, from 0.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from agent.protocol import (
    FrameFlags,
    MediaHeader,
    MediaKind,
    Text,
    TierChanged,
    TurnDone,
    TurnStarted,
    dump,
    pack_media,
)


@dataclass(frozen=True, slots=True)
class OutMedia:
    kind: MediaKind
    flags: FrameFlags
    tier: int
    pts_us: int
    payload: bytes
    turn: str | None = None  # set for frames of a turn (flushed on interrupt)

    @property
    def droppable(self) -> bool:
        return self.kind == MediaKind.VIDEO and not self.flags & FrameFlags.KEYFRAME


@dataclass(frozen=True, slots=True)
class OutMessage:
    """A message that must stay in order with the media around it: turn messages,
    and tier changes and transcripts, which say what the frames after them show."""

    message: TurnStarted | TurnDone | TierChanged | Text


OutItem = OutMedia | OutMessage


@dataclass(frozen=True, slots=True)
class SendBufferStats:
    queued: int
    video_dropped: int
    congestion_events: int
    flushed: int
    queued_bytes: int = 0


class SendBuffer:
    def __init__(self, max_video_frames: int) -> None:
        if max_video_frames < 2:
            raise ValueError("max_video_frames must be at least 2")
        self._max = max_video_frames
        self._items: deque[OutItem] = deque()
        self._video_queued = 0
        self._seq = {MediaKind.VIDEO: 0, MediaKind.AUDIO: 0}
        self._bytes = 0  # media payload bytes queued
        self.needs_keyframe = False
        self._dropped = 0
        self._congestion = 0
        self._flushed = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def video_queued(self) -> int:
        return self._video_queued

    def push(self, item: OutItem) -> bool:
        """Queue an item; False when it was dropped (congestion policy)."""
        if isinstance(item, OutMedia) and item.kind == MediaKind.VIDEO:
            if self.needs_keyframe and item.droppable:
                self._dropped += 1
                return False
            if item.flags & FrameFlags.KEYFRAME:
                self.needs_keyframe = False
            if self._video_queued >= self._max:
                self._congestion += 1
                self._drop_queued_video()
                if item.droppable:
                    self._dropped += 1
                    return False
            self._video_queued += 1
        if isinstance(item, OutMedia):
            self._bytes += len(item.payload)
        self._items.append(item)
        return True

    @property
    def queued_bytes(self) -> int:
        """Media payload bytes waiting: audio is never dropped, so a client that stops
        reading grows this until the shell closes it."""
        return self._bytes

    def _drop_queued_video(self) -> None:
        kept: deque[OutItem] = deque()
        for it in self._items:
            if isinstance(it, OutMedia) and it.droppable:
                self._dropped += 1
                self._video_queued -= 1
                self._bytes -= len(it.payload)
            else:
                kept.append(it)
        self._items = kept
        self.needs_keyframe = True

    def pop(self) -> bytes | str | None:
        """The next wire message (binary media or JSON text), or None when empty."""
        if not self._items:
            return None
        item = self._items.popleft()
        if isinstance(item, OutMessage):
            msg = item.message
            if isinstance(msg, TurnStarted):
                msg = msg.model_copy(update={"seq": self._seq[MediaKind.VIDEO]})
            return dump(msg)
        if item.kind == MediaKind.VIDEO:
            self._video_queued -= 1
        self._bytes -= len(item.payload)
        seq = self._seq[item.kind]
        self._seq[item.kind] = seq + 1
        header = MediaHeader(item.kind, item.flags, item.tier, seq, item.pts_us)
        return pack_media(header, item.payload)

    def flush_turn(self) -> tuple[int, list[TurnStarted | TurnDone]]:
        """Drop every queued frame of a turn (interrupt).

        Returns how many video frames were dropped and the turn messages that
        were queued with them (the shell decides which still go out).
        """
        kept: deque[OutItem] = deque()
        dropped_video = 0
        messages: list[TurnStarted | TurnDone] = []
        for it in self._items:
            if isinstance(it, OutMedia) and it.turn is not None:
                if it.kind == MediaKind.VIDEO:
                    dropped_video += 1
                    self._video_queued -= 1
                self._bytes -= len(it.payload)
                self._flushed += 1
            elif isinstance(it, OutMessage) and isinstance(it.message, TurnStarted | TurnDone):
                messages.append(it.message)
            else:
                kept.append(it)
        self._items = kept
        if dropped_video:
            self.needs_keyframe = True
        return dropped_video, messages

    @property
    def next_seq(self) -> dict[MediaKind, int]:
        return dict(self._seq)

    def set_next_seq(self, video: int, audio: int) -> None:
        """Continue numbering after a resume."""
        self._seq = {MediaKind.VIDEO: video, MediaKind.AUDIO: audio}

    def stats(self) -> SendBufferStats:
        return SendBufferStats(len(self._items), self._dropped, self._congestion, self._flushed,
                               self._bytes)
