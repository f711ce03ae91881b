"""One session's outgoing video: picture size by tier, the live encoder, the shared loops.

Tier 1 sends the negotiated size. Tiers 2 and 3 send a reduced size
(`degradation.tier2_scale` of the height: a quarter of the pixels to encode
and far fewer bytes); the `tier` message that announces the change carries
the new size and the next video frame is a keyframe at that size. Tier 3
sends the shared static loop (the neutral picture) at the session's frame
rate: the protocol keeps video flowing at the session fps, and unchanged
pictures cost a few bytes each, with a keyframe once a second for clients
that join or lost data.

The client's decoder follows one stream at a time: the shared idle loop,
the shared static loop, or this session's live encoder. Switching to the
idle loop needs one of its keyframes; until the loop reaches one, idle
pictures are encoded live (`idle_packet`). A live encoder after any switch
starts with a keyframe.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, replace

from agent.config import VideoConfig
from media.avatar import Avatar
from media.encode import EncodedFrame, VideoEncoder, make_encoder, resize_frame
from media.idle_video import compose
from media.types import Frame


@dataclass(frozen=True, slots=True)
class OutputFormat:
    codec: str
    width: int
    height: int
    fps: int
    rate: int


LoopSource = Callable[[Avatar, str, int, int], Awaitable[tuple[EncodedFrame, ...]]]


class VideoOutput:
    def __init__(self, avatar: Avatar, fmt: OutputFormat, reduced: tuple[int, int],
                 config: VideoConfig, pool: Executor, idle: LoopSource, static: LoopSource,
                 on_encode: Callable[[float], None]) -> None:
        self.avatar = avatar
        self.full = fmt
        self.reduced = replace(fmt, width=reduced[0], height=reduced[1])
        self.current = fmt
        self.tier = 1
        self._config = config
        self._pool = pool
        self._idle_source = idle
        self._static_source = static
        self._on_encode = on_encode
        self._encoder: VideoEncoder | None = None
        self._idle: tuple[EncodedFrame, ...] = ()
        self._static: tuple[EncodedFrame, ...] = ()
        self._static_index = 0
        self._live_idle = False  # the client's decoder is not on the idle loop

    def format_for(self, tier: int) -> OutputFormat:
        return self.full if tier == 1 else self.reduced

    async def start(self, tier: int) -> None:
        """Load the shared loops of the starting tier (before the first frame)."""
        self.tier = tier
        self.current = self.format_for(tier)
        self._idle, self._static = await self.loops(tier)

    async def loops(self, tier: int) -> tuple[tuple[EncodedFrame, ...], tuple[EncodedFrame, ...]]:
        fmt = self.format_for(tier)
        idle = await self._idle_source(self.avatar, fmt.codec, fmt.width, fmt.height)
        static: tuple[EncodedFrame, ...] = ()
        if tier == 3:
            static = await self._static_source(self.avatar, fmt.codec, fmt.width, fmt.height)
        return idle, static

    def switch(self, tier: int, idle: tuple[EncodedFrame, ...],
               static: tuple[EncodedFrame, ...]) -> bool:
        """Move to `tier` with its loops (from `loops`); True when the size changed."""
        fmt = self.format_for(tier)
        resized = fmt != self.current
        self.current = fmt
        self._idle, self._static = idle, static
        # Whatever the client decoded last, a live picture from here on needs a keyframe.
        if self._encoder is not None:
            self._encoder.close()
            self._encoder = None
        self._live_idle = True
        self._static_index = 0  # the static loop starts with a keyframe
        self.tier = tier
        return resized

    def static_packet(self, needs_keyframe: bool) -> EncodedFrame | None:
        """The next picture of the static loop (tier 3); None while waiting for a keyframe."""
        packet = self._static[self._static_index]
        self._static_index = (self._static_index + 1) % len(self._static)
        if needs_keyframe and not packet.keyframe:
            return None
        return packet

    async def idle_packet(self, index: int, needs_keyframe: bool) -> EncodedFrame | None:
        """Frame `index` of the idle loop; None while a dropped frame awaits a keyframe."""
        packet = self._idle[index]
        if packet.keyframe:
            self._live_idle = False
        if not self._live_idle:
            return None if needs_keyframe and not packet.keyframe else packet
        picture = await asyncio.get_running_loop().run_in_executor(
            self._pool, compose, self.avatar, self.avatar.idle_loop[index])
        return await self.encode(picture, force=needs_keyframe)

    async def encode(self, frame: Frame, *, force: bool) -> EncodedFrame:
        """Encode a live picture at the current size (in the encode pool)."""
        fmt = self.current
        if self._encoder is None:
            self._encoder = make_encoder(fmt.codec, fmt.width, fmt.height, fmt.fps, self._config)
        encoder = self._encoder
        started = time.perf_counter()

        def work() -> EncodedFrame:
            pic = frame
            if pic.shape[1] != fmt.width or pic.shape[0] != fmt.height:
                pic = resize_frame(pic, fmt.width, fmt.height)
            return encoder.encode(pic, force_keyframe=force)

        enc = await asyncio.get_running_loop().run_in_executor(self._pool, work)
        self._live_idle = True  # the client now follows the live encoder
        self._on_encode(time.perf_counter() - started)
        return enc

    def close(self) -> None:
        if self._encoder is not None:
            self._encoder.close()
            self._encoder = None
