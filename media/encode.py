"""Video encoders: RGB frames in, one self-contained packet per frame out.

Wire contract (PROTOCOL.md, server video): `h264` is one Annex-B access unit
per frame with SPS/PPS before every keyframe; `jpeg` is one baseline JPEG per
frame. Encoders are synchronous and hold no locks: the server runs each one in
a worker thread, one encoder per session (an encoder is not thread-safe).

GIL: PyAV releases the GIL inside `avcodec_send_frame`/`avcodec_receive_packet`
and OpenCV releases it inside `cvtColor`/`imencode`, so encoders of different
sessions run in parallel; only the small numpy/PyAV glue holds it (see
bench/encode.py for the measured scaling).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal, Protocol

import av
import cv2
import numpy as np
from av.video.frame import PictureType

from agent.config import VideoConfig
from media.types import Frame

# H.264 NAL unit types (ITU-T H.264 table 7-1) that the wire contract names.
NAL_SLICE = 1
NAL_IDR = 5
NAL_SEI = 6
NAL_SPS = 7
NAL_PPS = 8
NAL_AUD = 9

# VUI colour description written into the SPS: BT.601 limited range, the
# matrix that OpenCV's RGB->I420 conversion below uses, so that decoders
# (browsers included) convert back with the same matrix.
_BT601 = 6  # AVCOL_SPC/PRI/TRC_SMPTE170M
_RANGE_MPEG = 1  # AVCOL_RANGE_MPEG (16-235)


@dataclass(frozen=True, slots=True)
class EncodedFrame:
    """One encoded picture as sent on the wire.

    `keyframe`: a decoder can start here (H.264: IDR with SPS/PPS in the
    same payload). `config`: codec configuration only, no picture (wire flag
    bit 3); the encoders here never emit one because headers travel in-band.
    """

    data: bytes
    keyframe: bool
    config: bool = False


class VideoEncoder(Protocol):
    codec: str
    width: int
    height: int

    def encode(self, frame: Frame, *, force_keyframe: bool = False) -> EncodedFrame: ...

    def close(self) -> None: ...


def _check_size(width: int, height: int) -> None:
    if width <= 0 or height <= 0 or width % 2 or height % 2:
        raise ValueError(f"video size must be positive and even (yuv420p), got {width}x{height}")


def _check_frame(frame: Frame, width: int, height: int) -> None:
    if frame.shape != (height, width, 3) or frame.dtype != np.uint8:
        raise ValueError(
            f"expected a ({height}, {width}, 3) uint8 RGB frame, got {frame.shape} {frame.dtype}"
        )


def _nal_starts(data: bytes) -> list[int]:
    """Offsets of the first byte (the NAL header) of every Annex-B NAL unit.

    Emulation prevention guarantees 00 00 01 never occurs inside a NAL unit,
    so a plain search is exact (a 4-byte start code contains the 3-byte one).
    """
    starts: list[int] = []
    i = data.find(b"\x00\x00\x01")
    while i >= 0:
        starts.append(i + 3)
        i = data.find(b"\x00\x00\x01", i + 3)
    return starts


def h264_nal_types(data: bytes) -> tuple[int, ...]:
    """The NAL unit types of an Annex-B byte string, in order."""
    return tuple(data[i] & 0x1F for i in _nal_starts(data) if i < len(data))


def h264_nal_units(data: bytes) -> list[bytes]:
    """Each NAL unit of an Annex-B byte string (header byte first, no start code).

    Trailing zero bytes before the next start code (4-byte start codes,
    trailing_zero_8bits) are stripped.
    """
    starts = _nal_starts(data)
    ends = [s - 3 for s in starts[1:]] + [len(data)]
    return [data[s:e].rstrip(b"\x00") for s, e in zip(starts, ends, strict=True) if s < e]


class H264Encoder:
    """libx264 tuned for real time: one access unit out per frame in, at once.

    `tune=zerolatency` turns off B-frames, lookahead and frame threading, so
    `encode` returns the frame's own access unit. Keyframes are IDRs carrying
    SPS/PPS in-band (repeat-headers; no global header because there is no
    container). A keyframe comes on the first frame, when forced, and after
    `keyframe_interval - 1` non-key frames; scene-cut detection is off so
    keyframes come only where asked (predictable size and join points).
    `threads` > 1 uses x264 sliced threads (no added latency); the default 1
    suits a server that already encodes many sessions in parallel.
    """

    codec = "h264"

    def __init__(
        self,
        width: int,
        height: int,
        fps: int,
        *,
        crf: int = 23,
        preset: str = "ultrafast",
        keyframe_interval: int = 50,
        threads: int = 1,
    ) -> None:
        _check_size(width, height)
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        if keyframe_interval < 1:
            raise ValueError(f"keyframe_interval must be >= 1, got {keyframe_interval}")
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.width = width
        self.height = height
        self.keyframe_interval = keyframe_interval
        ctx = av.CodecContext.create("libx264", "w")
        assert isinstance(ctx, av.VideoCodecContext)
        ctx.width = width
        ctx.height = height
        ctx.pix_fmt = "yuv420p"
        ctx.time_base = Fraction(1, fps)
        ctx.framerate = Fraction(fps)
        ctx.gop_size = keyframe_interval
        ctx.thread_count = threads
        ctx.colorspace = _BT601
        ctx.color_primaries = _BT601
        ctx.color_trc = _BT601
        ctx.color_range = _RANGE_MPEG
        ctx.options = {
            "preset": preset,
            "tune": "zerolatency",
            "crf": str(crf),
            # A forced I picture becomes an IDR (not an open-GOP recovery point).
            "forced-idr": "1",
            "x264-params": "scenecut=0:repeat-headers=1",
        }
        ctx.open()
        self._ctx: av.VideoCodecContext | None = ctx
        self._index = 0
        self._since_key = 0  # frames since the last keyframe

    def encode(self, frame: Frame, *, force_keyframe: bool = False) -> EncodedFrame:
        if self._ctx is None:
            raise RuntimeError("encoder is closed")
        _check_frame(frame, self.width, self.height)
        # (H * 3/2, W) planar Y, U, V; BT.601 limited range, GIL released.
        yuv = np.asarray(cv2.cvtColor(frame, cv2.COLOR_RGB2YUV_I420), dtype=np.uint8)
        picture = av.VideoFrame.from_ndarray(yuv, format="yuv420p")
        picture.pts = self._index
        want_key = force_keyframe or self._index == 0 or self._since_key >= self.keyframe_interval
        if want_key:
            picture.pict_type = PictureType.I
        packets = self._ctx.encode(picture)
        self._index += 1
        if len(packets) != 1:
            raise RuntimeError(
                f"libx264 returned {len(packets)} packets for one frame; zero-latency tuning lost"
            )
        data = bytes(packets[0])
        types = h264_nal_types(data)
        keyframe = NAL_IDR in types
        if keyframe != packets[0].is_keyframe or (want_key and not keyframe):
            raise RuntimeError(f"keyframe mismatch: asked {want_key}, NAL types {types}")
        if keyframe and not (NAL_SPS in types and NAL_PPS in types):
            raise RuntimeError(f"IDR access unit without SPS/PPS: NAL types {types}")
        self._since_key = 1 if keyframe else self._since_key + 1
        return EncodedFrame(data, keyframe)

    def close(self) -> None:
        # Nothing is buffered (zero latency), so there is nothing to flush.
        self._ctx = None


class JpegEncoder:
    """Baseline JPEG per frame; every frame is a keyframe."""

    codec = "jpeg"

    def __init__(self, width: int, height: int, quality: int = 85) -> None:
        if width <= 0 or height <= 0:
            raise ValueError(f"video size must be positive, got {width}x{height}")
        if not 1 <= quality <= 100:
            raise ValueError(f"JPEG quality must be in [1, 100], got {quality}")
        self.width = width
        self.height = height
        self._params = [cv2.IMWRITE_JPEG_QUALITY, quality, cv2.IMWRITE_JPEG_PROGRESSIVE, 0]

    def encode(self, frame: Frame, *, force_keyframe: bool = False) -> EncodedFrame:
        _check_frame(frame, self.width, self.height)
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), self._params)
        if not ok:
            raise RuntimeError("cv2.imencode failed to encode a JPEG")
        return EncodedFrame(buf.tobytes(), keyframe=True)

    def close(self) -> None:
        pass


def make_encoder(
    codec: Literal["h264", "jpeg"] | str, width: int, height: int, fps: int, config: VideoConfig
) -> VideoEncoder:
    """The session encoder for `codec`; keyframes at least every keyframe_interval_s."""
    if codec == "h264":
        interval = max(1, math.floor(config.keyframe_interval_s * fps))
        return H264Encoder(
            width,
            height,
            fps,
            crf=config.h264_crf,
            preset=config.h264_preset,
            keyframe_interval=interval,
        )
    if codec == "jpeg":
        return JpegEncoder(width, height, config.jpeg_quality)
    raise ValueError(f"unknown video codec {codec!r} (expected 'h264' or 'jpeg')")


def fit_size(src_w: int, src_h: int, max_height: int) -> tuple[int, int]:
    """Even (width, height) no taller than `max_height` or the source, keeping aspect.

    Never upscales. Both sides are rounded down/nearest to even numbers
    (yuv420p needs them), so the aspect ratio is kept within one pixel.
    """
    if src_w <= 0 or src_h <= 0 or max_height <= 0:
        raise ValueError(f"sizes must be positive, got {src_w}x{src_h}, max_height {max_height}")
    h = min(src_h, max_height) // 2 * 2
    w = round(src_w * h / src_h / 2) * 2
    if w < 2 or h < 2:
        raise ValueError(f"{src_w}x{src_h} at max_height {max_height} leaves no even size")
    return w, h


def resize_frame(frame: Frame, width: int, height: int) -> Frame:
    """The frame at (height, width); INTER_AREA shrinking, INTER_LINEAR enlarging."""
    h, w = frame.shape[:2]
    if (w, h) == (width, height):
        return frame
    shrink = width <= w and height <= h
    interpolation = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return np.asarray(cv2.resize(frame, (width, height), interpolation=interpolation), np.uint8)


def encode_loop(
    frames: Sequence[Frame],
    codec: str,
    w: int,
    h: int,
    fps: int,
    keyframe_every: int,
    config: VideoConfig,
) -> tuple[EncodedFrame, ...]:
    """Pre-encode a looping sequence once (the shared idle video).

    Frames are resized to (h, w). Index 0 and every `keyframe_every`-th frame
    are keyframes (IDR with SPS/PPS), so a session may start sending at any of
    them with a fresh decoder on the client and keep going round the loop:
    each IDR drops all references, and the wrap from the last frame lands on
    index 0, a keyframe. The encoder's own interval may add more keyframes.
    """
    if not frames:
        raise ValueError("encode_loop needs at least one frame")
    if keyframe_every < 1:
        raise ValueError(f"keyframe_every must be >= 1, got {keyframe_every}")
    encoder = make_encoder(codec, w, h, fps, config)
    try:
        return tuple(
            encoder.encode(resize_frame(f, w, h), force_keyframe=i % keyframe_every == 0)
            for i, f in enumerate(frames)
        )
    finally:
        encoder.close()
