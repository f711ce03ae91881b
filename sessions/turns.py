"""One turn's media as the session core tracks it: audio in, planned frames, rendered frames."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from media.types import RENDER_SAMPLE_RATE, Audio, Frames, FrameSpec


class GrowingAudio:
    """An append-only float32 buffer; `view()` is a zero-copy snapshot of what has arrived."""

    def __init__(self, capacity: int = RENDER_SAMPLE_RATE) -> None:
        self._buf = np.zeros(max(capacity, 1), dtype=np.float32)
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def append(self, samples: Audio) -> None:
        need = self._n + len(samples)
        if need > len(self._buf):
            grown = np.zeros(max(need, 2 * len(self._buf)), dtype=np.float32)
            grown[: self._n] = self._buf[: self._n]
            # Views handed out earlier keep the old array alive; they stay valid.
            self._buf = grown
        self._buf[self._n : need] = samples
        self._n = need

    def view(self) -> Audio:
        out = self._buf[: self._n]
        out.flags.writeable = False
        return out

    def window(self, start: int, end: int) -> Audio:
        """Samples [start, end), zero-padded past what has arrived."""
        out = np.zeros(end - start, dtype=np.float32)
        lo, hi = min(start, self._n), min(end, self._n)
        out[lo - start : hi - start] = self._buf[lo:hi]
        return out


@dataclass(eq=False)
class Turn:
    """Mutable state of one queued or playing turn (owned by `SessionCore`).

    Frames of a turn are its speech frames (one per `spf` samples of audio)
    followed by the timeline's tail frames converging to neutral. `client`
    is False for the core's own interrupt blend, which sends no turn messages.
    """

    id: str
    text: str | None = None
    style: str | None = None
    duration_ms: int | None = None
    client: bool = True
    audio16: GrowingAudio = field(default_factory=GrowingAudio)
    audio_out: GrowingAudio = field(default_factory=GrowingAudio)
    ended: bool = False  # speak.end received: no more audio
    specs: list[FrameSpec] = field(default_factory=list)  # planned frames so far
    planned_speech: int = 0
    speech_frames: int | None = None  # known once ended
    tail_planned: bool = False
    started_planning: bool = False
    requested_chunks: int = 0
    rendered: dict[int, Frames] = field(default_factory=dict)
    played: int = 0
    first_seq: int | None = None  # video seq of the first frame sent

    @property
    def total_frames(self) -> int | None:
        """Speech plus tail frames, once the tail is planned."""
        return len(self.specs) if self.tail_planned else None

    @property
    def fully_planned(self) -> bool:
        return self.tail_planned
