"""The CPU renderer: source frames (blended in pixel space) with an audio-driven mouth.

No model, no weights: the mouth opens with the loudness of the voiced band and
spreads or rounds with the spectral balance (`media.mouth`), applied as a
smooth warp of lips and jaw with a drawn mouth interior. A few milliseconds
per 512 px frame on one core. Stateless between calls, so `render` may run in
several threads at once and any chunking of a turn gives the same pictures.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence

import cv2
import numpy as np

from agent.config import CpuRendererConfig
from agent.errors import NotFound, RenderError
from media.avatar import Avatar, Geometry
from media.mouth import LOOKAHEAD_SAMPLES, mouth_track, open_mouth
from media.types import (
    RENDER_SAMPLE_RATE,
    Frame,
    Frames,
    FrameSink,
    FrameSpec,
    RenderChunk,
    RendererCapabilities,
    RenderResult,
    stream_pieces,
)

MAX_BATCH = 4  # chunks are independent; a batch only saves call overhead


class CpuRenderer:
    """media.types.Renderer on the CPU; `avatars` maps an avatar id to a loaded Avatar."""

    def __init__(self, avatars: Callable[[str], Avatar], config: CpuRendererConfig) -> None:
        self._avatars = avatars
        self._caps = RendererCapabilities(
            name="cpu",
            chunk_frames=config.chunk_frames,
            max_batch=MAX_BATCH,
            audio_lookahead_ms=math.ceil(LOOKAHEAD_SAMPLES * 1000 / RENDER_SAMPLE_RATE),
            device="cpu",
        )

    @property
    def capabilities(self) -> RendererCapabilities:
        return self._caps

    def warmup(self) -> None:
        """Touch the numpy FFT and OpenCV paths once so the first chunk is not slow."""
        audio = np.zeros(RENDER_SAMPLE_RATE // 5, np.float32)
        audio[::7] = 0.3
        mouth_track(audio, 0, 2, 25)
        picture = np.full((64, 64, 3), 128, np.uint8)
        geometry = np.array(
            [[22, 24], [42, 24], [32, 34], [25, 42], [39, 42], [32, 41], [32, 43], [32, 54]],
            np.float32,
        )
        open_mouth(picture, geometry, 0.5, 0.2)

    def render(self, batch: Sequence[RenderChunk]) -> list[RenderResult]:
        return [self._render_chunk(chunk) for chunk in batch]

    def render_streaming(self, batch: Sequence[RenderChunk],
                         on_frames: FrameSink) -> list[RenderResult]:
        """`render`, handing a turn's first chunk over early (`StreamsFrames`), piece by
        piece (`stream_pieces`) as its frames are drawn."""
        return [self._render_chunk(chunk, functools.partial(on_frames, i)
                                   if chunk.first_frame == 0 else None)
                for i, chunk in enumerate(batch)]

    def close(self) -> None:
        """Nothing to release."""

    def _render_chunk(self, chunk: RenderChunk,
                      on_frames: Callable[[Frames], None] | None = None) -> RenderResult:
        t0 = time.perf_counter()
        avatar = self._avatar(chunk)
        n = len(chunk.frames)
        track = mouth_track(chunk.audio, chunk.first_frame, n, chunk.fps)
        t1 = time.perf_counter()
        frames = np.empty((n, avatar.height, avatar.width, 3), np.uint8)  # (F, H, W, 3)
        source = mouth = 0.0
        handovers = {e for _, e in stream_pieces(n)[:-1]} if on_frames is not None else set()
        for i, spec in enumerate(chunk.frames):
            t = time.perf_counter()
            geometry = _source(avatar, spec, frames[i])
            t_mouth = time.perf_counter()
            if spec.speech:
                open_mouth(frames[i], geometry, float(track.opening[i]), float(track.spread[i]))
            source += t_mouth - t
            mouth += time.perf_counter() - t_mouth
            if on_frames is not None and i + 1 in handovers:
                on_frames(frames[: i + 1])
        stages = {"audio_features": t1 - t0, "source": source, "mouth": mouth}
        return RenderResult(key=chunk.key, frames=frames, stages=stages)

    def _avatar(self, chunk: RenderChunk) -> Avatar:
        try:
            avatar = self._avatars(chunk.avatar)
        except (KeyError, NotFound) as exc:  # a mapping's or agent.avatars' "no such avatar"
            raise RenderError(f"unknown avatar {chunk.avatar!r}: {exc}", retryable=False) from None
        if chunk.fps != avatar.fps:
            raise RenderError(
                f"chunk at {chunk.fps} fps for avatar {avatar.id!r} at {avatar.fps} fps",
                retryable=False,
            )
        try:
            for spec in chunk.frames:
                avatar.check_ref(spec.source)
                if spec.blend_to is not None:
                    avatar.check_ref(spec.blend_to)
        except ValueError as exc:
            raise RenderError(str(exc), retryable=False) from None
        return avatar


def source_picture(avatar: Avatar, spec: FrameSpec, out: Frame) -> None:
    """Write the spec's source picture into `out` (H, W, 3), blended in pixel space where
    the spec blends (also the LatentSync renderer's paste-back background)."""
    first = _picture(avatar, avatar.source.frame(spec.source))
    if spec.blend_to is None or spec.blend_weight == 0.0:
        np.copyto(out, first)
        return
    w = spec.blend_weight
    second = _picture(avatar, avatar.source.frame(spec.blend_to))
    cv2.addWeighted(first, 1.0 - w, second, w, 0.0, dst=out)


def _source(avatar: Avatar, spec: FrameSpec, out: Frame) -> Geometry:
    """Write the spec's (blended) source picture into `out`; return its face geometry."""
    source_picture(avatar, spec, out)
    geometry = avatar.source.geometry(spec.source)
    if spec.blend_to is None or spec.blend_weight == 0.0:
        return geometry
    w = spec.blend_weight
    other = avatar.source.geometry(spec.blend_to)
    return ((1.0 - w) * geometry + w * other).astype(np.float32)


def _picture(avatar: Avatar, picture: Frame) -> Frame:
    if picture.shape != (avatar.height, avatar.width, 3) or picture.dtype != np.uint8:
        raise RenderError(
            f"avatar {avatar.id!r} source frame is {picture.shape} {picture.dtype}, "
            f"want ({avatar.height}, {avatar.width}, 3) uint8",
            retryable=False,
        )
    return picture
