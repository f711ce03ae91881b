"""An MP4 writer for people to watch a session (the CLI client's `--out out.mp4`).

Decoded RGB frames are re-encoded with libx264 (quality over latency: this is
a file) and PCM s16le mono audio with AAC. Video time is a frame count at
`fps`, audio time a sample count at `audio_rate`; both start at 0, which is
the session's pts 0, so lip sync in the file is the wire's lip sync.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from types import TracebackType

import av
import numpy as np

from media.types import Frame

_BT601 = 6  # AVCOL_SPC/PRI/TRC_SMPTE170M, the matrix PyAV's RGB->YUV conversion uses
_RANGE_MPEG = 1


class Mp4Writer:
    """Writes RGB frames and s16 mono PCM to an MP4 (H.264 + AAC); use as a context manager."""

    def __init__(
        self, path: str | Path, fps: int, width: int, height: int, audio_rate: int
    ) -> None:
        if width <= 0 or height <= 0 or width % 2 or height % 2:
            raise ValueError(f"video size must be positive and even, got {width}x{height}")
        if fps <= 0 or audio_rate <= 0:
            raise ValueError(f"fps and audio_rate must be positive, got {fps}, {audio_rate}")
        self.fps = fps
        self.width = width
        self.height = height
        self.audio_rate = audio_rate
        # faststart: the index goes first so a browser can play while loading.
        self._container = av.open(str(path), "w", format="mp4", options={"movflags": "+faststart"})
        video = self._container.add_stream("libx264", rate=fps)
        video.width = width
        video.height = height
        video.pix_fmt = "yuv420p"
        video.options = {"crf": "20", "preset": "veryfast"}
        ctx = video.codec_context
        ctx.colorspace = _BT601
        ctx.color_primaries = _BT601
        ctx.color_trc = _BT601
        ctx.color_range = _RANGE_MPEG
        self._video = video
        self._audio = self._container.add_stream("aac", rate=audio_rate, layout="mono")
        self._next_frame = 0  # pts of the next video frame, in frames
        self._samples = 0  # audio samples written
        self._closed = False

    def write_video(self, frame: Frame, pts_us: int | None = None) -> None:
        """Append one (H, W, 3) uint8 RGB frame.

        `pts_us` (wire pts) places it in time, so frames a client never got
        leave the previous picture on screen instead of shifting the rest;
        without it the frame follows the previous one.
        """
        self._check_open()
        if frame.shape != (self.height, self.width, 3) or frame.dtype != np.uint8:
            raise ValueError(
                f"expected a ({self.height}, {self.width}, 3) uint8 RGB frame, "
                f"got {frame.shape} {frame.dtype}"
            )
        index = self._next_frame if pts_us is None else round(pts_us * self.fps / 1_000_000)
        if index < self._next_frame:
            raise ValueError(f"video pts {pts_us} us goes back before frame {self._next_frame}")
        picture = av.VideoFrame.from_ndarray(frame, format="rgb24")
        picture.pts = index
        picture.time_base = Fraction(1, self.fps)
        self._container.mux(self._video.encode(picture))
        self._next_frame = index + 1

    def write_audio(self, pcm: bytes | bytearray | memoryview) -> None:
        """Append s16le mono PCM at `audio_rate` (contiguous after the previous call)."""
        self._check_open()
        if len(pcm) % 2:
            raise ValueError(f"s16 PCM needs an even number of bytes, got {len(pcm)}")
        if not pcm:
            return
        samples = np.frombuffer(pcm, dtype="<i2").reshape(1, -1)  # (1, N) packed s16
        chunk = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        chunk.sample_rate = self.audio_rate
        chunk.time_base = Fraction(1, self.audio_rate)
        chunk.pts = self._samples
        self._samples += samples.shape[1]
        self._container.mux(self._audio.encode(chunk))

    def close(self) -> None:
        """Flush both encoders and finish the file; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._container.mux(self._video.encode(None))
            self._container.mux(self._audio.encode(None))
        finally:
            self._container.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("Mp4Writer is closed")

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
