"""Video decoders for server payloads (tests, the CLI client, the load tester).

`decode(data)` takes one wire payload and returns the pictures it completes:
for `h264` one access unit gives one picture at once (low delay, no frame
threading, no reordering: the stream has no B-frames); `jpeg` gives one.
"""

from __future__ import annotations

import av
import cv2
import numpy as np

from media.types import Frame


class VideoDecoder:
    """Decodes one codec's payloads to (H, W, 3) uint8 RGB frames; not thread-safe."""

    def __init__(self, codec: str) -> None:
        if codec not in ("h264", "jpeg"):
            raise ValueError(f"unknown video codec {codec!r} (expected 'h264' or 'jpeg')")
        self.codec = codec
        self._ctx: av.VideoCodecContext | None = None
        if codec == "h264":
            ctx = av.CodecContext.create("h264", "r")
            assert isinstance(ctx, av.VideoCodecContext)
            # Frame threading holds pictures back by one per thread; one thread
            # plus LOW_DELAY returns each picture from its own access unit.
            ctx.thread_count = 1
            ctx.flags |= av.codec.context.Flags.low_delay
            ctx.open()
            self._ctx = ctx

    def decode(self, data: bytes) -> list[Frame]:
        """The pictures completed by this payload; raises ValueError on bad data."""
        if self.codec == "jpeg":
            bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
            if bgr is None:
                raise ValueError(f"payload of {len(data)} bytes is not a decodable JPEG")
            return [np.ascontiguousarray(bgr[:, :, ::-1])]  # BGR -> RGB
        if self._ctx is None:
            raise RuntimeError("decoder is closed")
        try:
            pictures = self._ctx.decode(av.Packet(data))
        except av.error.FFmpegError as e:
            raise ValueError(f"undecodable h264 access unit: {e}") from e
        # The SPS VUI says BT.601 limited range; to_ndarray converts with it.
        return [np.asarray(p.to_ndarray(format="rgb24"), dtype=np.uint8) for p in pictures]

    def close(self) -> None:
        self._ctx = None
