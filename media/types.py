"""The typed boundaries between timeline, renderer and encoder.

Data flows one way: the session timeline emits a `FrameSpec` per output frame,
the session groups them into a `RenderChunk` with the audio for those frames,
a `Renderer` turns a batch of chunks into `RenderResult`s, and the encoder turns
frames into packets. Each dataclass is frozen and owned by its producer.

Media time is an integer count with an explicit rate: frames at the avatar's
fps, audio samples at `RENDER_SAMPLE_RATE`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

# Renderers always receive 16 kHz mono float32 audio (Whisper's rate).
RENDER_SAMPLE_RATE = 16_000

Frame = npt.NDArray[np.uint8]  # (H, W, 3) RGB
Frames = npt.NDArray[np.uint8]  # (F, H, W, 3) RGB
Audio = npt.NDArray[np.float32]  # (N,) mono in [-1, 1]


@dataclass(frozen=True, slots=True)
class SourceRef:
    """One frame of an avatar's source material: clip index and frame index."""

    clip: int
    frame: int


@dataclass(frozen=True, slots=True)
class FrameSpec:
    """What one output frame shows.

    `source` is the source frame; when `blend_to` is set the picture is
    `(1 - blend_weight) * source + blend_weight * blend_to` (the renderer picks
    the space: pixels for the CPU renderer, latents for diffusion). `speech`
    says whether the frame belongs to spoken audio (mouth driven by audio) or
    is a neutral/idle frame (mouth closed).
    """

    source: SourceRef
    blend_to: SourceRef | None = None
    blend_weight: float = 0.0
    speech: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.blend_weight <= 1.0:
            raise ValueError(f"blend_weight must be in [0, 1], got {self.blend_weight}")
        if self.blend_to is None and self.blend_weight != 0.0:
            raise ValueError("blend_weight set without blend_to")


@dataclass(frozen=True, slots=True)
class ChunkKey:
    """Identifies one chunk of one turn of one session."""

    session: str
    turn: str
    index: int


@dataclass(frozen=True, slots=True)
class RenderChunk:
    """Up to `chunk_frames` consecutive output frames of one turn.

    `audio` is the turn's 16 kHz audio from the turn's first sample to as far
    as it has arrived (at least to the end of this chunk plus the renderer's
    look-ahead, or to the end of the turn). Frame `k` of the turn covers
    samples `[k * spf, (k + 1) * spf)` with `spf = RENDER_SAMPLE_RATE / fps`;
    `frames[i]` is frame `first_frame + i` of the turn. Samples past the end of
    `audio` are silence.
    """

    key: ChunkKey
    avatar: str
    frames: tuple[FrameSpec, ...]
    first_frame: int
    audio: Audio
    fps: int
    # True once the turn's audio is complete (speak.end): `audio` is all of it.
    end_of_turn: bool = False
    trace: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.frames:
            raise ValueError("a chunk needs at least one frame")
        if self.first_frame < 0:
            raise ValueError(f"first_frame must be >= 0, got {self.first_frame}")


@dataclass(frozen=True, slots=True)
class RenderResult:
    """The rendered pictures of one chunk, at the avatar's resolution."""

    key: ChunkKey
    frames: Frames  # (F, H, W, 3) uint8 RGB, F == len(chunk.frames)
    stages: dict[str, float] = field(default_factory=dict)  # stage name -> seconds


@dataclass(frozen=True, slots=True)
class RendererCapabilities:
    """What a renderer can do; the engine sizes chunks and batches from it."""

    name: str
    chunk_frames: int  # frames per chunk (16 for LatentSync)
    max_batch: int  # chunks per render() call
    audio_lookahead_ms: int  # audio needed past a chunk's end before it can start
    device: str  # "cpu", "cuda:0", ...


class Renderer(Protocol):
    """One narrow interface for every renderer; all members are synchronous.

    `render` runs in a worker thread, never on the event loop. It must return
    one result per chunk, in order, or raise `agent.errors.RenderError`.
    """

    @property
    def capabilities(self) -> RendererCapabilities: ...

    def warmup(self) -> None: ...

    def render(self, batch: Sequence[RenderChunk]) -> list[RenderResult]: ...

    def close(self) -> None: ...


# Early frames of a render call: (index of the chunk in the batch, the chunk's frames so far).
FrameSink = Callable[[int, Frames], None]


@runtime_checkable
class StreamsFrames(Protocol):
    """An optional renderer member: hand each chunk's leading frames over as they are ready.

    `render_streaming` does what `render` does and returns the same results; while it
    runs it may call `on_frames(i, frames)` from its own thread, any number of times, with
    the first k frames of `batch[i]` (k growing, less than the chunk's count). Those
    frames are final: the same pixels as the first k frames of its result. A turn's first
    frame can then leave the renderer before the rest of its chunk is decoded and pasted.
    An exception from `on_frames` propagates (the call fails as any render does).
    """

    def render_streaming(self, batch: Sequence[RenderChunk],
                         on_frames: FrameSink) -> list[RenderResult]: ...


@dataclass(frozen=True, slots=True)
class AvatarPrep:
    """What one `prepare_avatar` call did for one avatar."""

    avatar: str
    frames: int  # source frames this call prepared
    remaining: int  # source frames still to prepare; 0 once the avatar is ready
    seconds: float


@runtime_checkable
class PreparesAvatars(Protocol):
    """An optional renderer member: per-avatar work done ahead of the avatar's first chunk.

    `prepare_avatar` prepares at most `max_frames` source frames of the avatar
    (all when None) and says how many are left; the caller repeats it until
    none are, so renders can run between the calls. Idempotent; synchronous,
    run in the renderer's worker thread like `render`; raises
    `agent.errors.RenderError`. Renderers without per-avatar state omit it.
    """

    def prepare_avatar(self, avatar: str, max_frames: int | None = None) -> AvatarPrep: ...


def prepare_inner(inner: object, avatar: str, max_frames: int | None = None) -> AvatarPrep:
    """`prepare_avatar` for a wrapping renderer: the inner renderer's, or nothing to do
    when it keeps no per-avatar state."""
    if isinstance(inner, PreparesAvatars):
        return inner.prepare_avatar(avatar, max_frames)
    return AvatarPrep(avatar, 0, 0, 0.0)


def samples_per_frame(fps: int, rate: int = RENDER_SAMPLE_RATE) -> int:
    """Audio samples covering one video frame; the rate must divide evenly."""
    if rate % fps:
        raise ValueError(f"{rate} Hz audio does not divide into {fps} fps frames")
    return rate // fps


def stream_pieces(n: int) -> list[tuple[int, int]]:
    """The frame ranges [a, e) in which a streaming renderer hands over a turn's first chunk
    of `n` frames: frame 0 alone (the turn's first picture), then frames 1-3 (due 40 ms
    later at 25 fps), then 4 at a time; the last piece ends at `n` and comes with the
    result, not through `on_frames`."""
    edges = [e for e in (1, *range(4, n, 4)) if e < n]
    return list(zip([0, *edges], [*edges, n], strict=True))


def render_inner(inner: Renderer, batch: Sequence[RenderChunk],
                 on_frames: FrameSink | None) -> list[RenderResult]:
    """`render` or `render_streaming` for a wrapping renderer: the inner renderer's streaming
    render when there is a sink and it streams, else its plain one."""
    if on_frames is not None and isinstance(inner, StreamsFrames):
        return inner.render_streaming(batch, on_frames)
    return inner.render(batch)
