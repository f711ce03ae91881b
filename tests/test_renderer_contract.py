"""The contract every renderer keeps, run against each implementation.

To add a renderer, append a `RendererCase` to CASES: a factory taking the
avatar lookup, plus what it promises beyond the core contract. A tiny model
with random weights keeps the core contract (shapes, order, one result per
chunk, determinism, errors) but cannot lip-sync, and a model that conditions
on a whole chunk is not chunking-invariant; say so with the flags, e.g.

    pytest.param(
        RendererCase("latentsync-tiny", make_tiny_latentsync, chunking_invariant=False,
                     mouth_follows_audio=False, silence_tolerance=255.0),
        id="latentsync-tiny", marks=pytest.mark.gpu,
    )
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt
import pytest

from agent.config import CpuRendererConfig, DefaultAvatarConfig
from agent.errors import RenderError
from media.avatar import FACE_POINTS, Avatar, Geometry
from media.cpu_renderer import CpuRenderer
from media.default_avatar import ensure_default_avatar
from media.types import (
    RENDER_SAMPLE_RATE,
    Audio,
    ChunkKey,
    FrameSpec,
    RenderChunk,
    Renderer,
    SourceRef,
    StreamsFrames,
    samples_per_frame,
)
from tests.latentsyncutil import tiny_renderer

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("torch_one_thread")]

FPS = 25
SPF = samples_per_frame(FPS)
P = {name: i for i, name in enumerate(FACE_POINTS)}
Avatars = Callable[[str], Avatar]


@dataclass(frozen=True)
class RendererCase:
    name: str
    make: Callable[[Avatars], Renderer]
    chunking_invariant: bool = True  # any split of a turn into chunks gives the same pictures
    mouth_follows_audio: bool = True  # a loud voice visibly opens the mouth
    silence_tolerance: float = 0.0  # mean |rendered - source| allowed around a silent mouth


def make_tiny_latentsync(avatars: Avatars) -> Renderer:
    # Tiny UNet and Whisper (fixture weights) and a tiny random VAE on the CPU, 64 px crops.
    return tiny_renderer(avatars)


CASES = [
    pytest.param(
        RendererCase(
            "cpu", lambda avatars: CpuRenderer(avatars, CpuRendererConfig(chunk_frames=8))
        ),
        id="cpu",
    ),
    pytest.param(
        RendererCase("latentsync-tiny", make_tiny_latentsync, chunking_invariant=False,
                     mouth_follows_audio=False, silence_tolerance=255.0),
        id="latentsync-tiny",
    ),
]


@pytest.fixture(scope="module")
def avatar(tmp_path_factory: pytest.TempPathFactory) -> Avatar:
    config = DefaultAvatarConfig(size=128, clip_seconds=(2.0, 3.0), seed=11)
    return ensure_default_avatar(tmp_path_factory.mktemp("avatars"), config, FPS)


def _lookup(avatar: Avatar) -> Avatars:
    def get(avatar_id: str) -> Avatar:
        if avatar_id != avatar.id:
            raise KeyError(avatar_id)
        return avatar

    return get


@pytest.fixture(params=CASES)
def case(request: pytest.FixtureRequest) -> RendererCase:
    value = request.param
    assert isinstance(value, RendererCase)
    return value


@pytest.fixture
def renderer(case: RendererCase, avatar: Avatar) -> Iterator[Renderer]:
    made = case.make(_lookup(avatar))
    made.warmup()
    try:
        yield made
    finally:
        made.close()


def loud_vowel(seconds: float, level: float = 0.3) -> Audio:
    """An "ah": harmonics of 130 Hz weighted by formants at 730 and 1090 Hz."""
    t = np.arange(round(seconds * RENDER_SAMPLE_RATE)) / RENDER_SAMPLE_RATE
    out = np.zeros_like(t)
    for k in range(1, 30):
        f = 130.0 * k
        gain = math.exp(-(((f - 730) / 120) ** 2)) + 0.6 * math.exp(-(((f - 1090) / 140) ** 2))
        out += (gain + 0.02) / k * np.sin(2 * math.pi * f * t + k)
    return np.asarray(out * level / np.sqrt(np.mean(out**2)), np.float32)


def _specs(avatar: Avatar, n: int, *, speech: bool, clip: int = 1) -> list[FrameSpec]:
    frames = avatar.clips[clip].num_frames
    return [FrameSpec(SourceRef(clip, f % frames), speech=speech) for f in range(n)]


def _chunks(
    avatar: Avatar, specs: list[FrameSpec], audio: Audio, sizes: list[int], lookahead_ms: int
) -> list[RenderChunk]:
    """A turn split into chunks, each given the audio that had arrived when it was due."""
    out, first = [], 0
    for index, size in enumerate(sizes):
        end = (first + size) * SPF + math.ceil(lookahead_ms * RENDER_SAMPLE_RATE / 1000)
        out.append(
            RenderChunk(
                key=ChunkKey("s", "t", index),
                avatar=avatar.id,
                frames=tuple(specs[first : first + size]),
                first_frame=first,
                audio=audio[:end],
                fps=FPS,
            )
        )
        first += size
    assert first == len(specs)
    return out


def _render_all(renderer: Renderer, chunks: list[RenderChunk]) -> npt.NDArray[np.uint8]:
    batch = max(renderer.capabilities.max_batch, 1)
    frames = []
    for i in range(0, len(chunks), batch):
        for result in renderer.render(chunks[i : i + batch]):
            frames.append(result.frames)
    return np.concatenate(frames)


def _mouth_boxes(g: Geometry) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """(around the mouth, inside the lips) as (rows, cols) slices."""
    left, right = g[P["mouth_left"]], g[P["mouth_right"]]
    width = right[0] - left[0]
    upper, lower, chin = g[P["upper_lip"], 1], g[P["lower_lip"], 1], g[P["chin"], 1]
    around = (
        slice(int(g[P["nose_tip"], 1]), int(math.ceil(chin)) + 1),
        slice(int(left[0] - 0.3 * width), int(math.ceil(right[0] + 0.3 * width)) + 1),
    )
    inside = (
        slice(int(round(upper)), int(round(lower + 0.4 * (chin - lower))) + 1),
        slice(int(round(left[0] + 0.3 * width)), int(round(right[0] - 0.3 * width)) + 1),
    )
    return around, inside


def _luma(picture: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    return np.asarray(cv2.cvtColor(np.ascontiguousarray(picture), cv2.COLOR_RGB2GRAY), np.float32)


def test_capabilities(renderer: Renderer) -> None:
    caps = renderer.capabilities
    assert caps.name and caps.device
    assert caps.chunk_frames >= 1 and caps.max_batch >= 1 and caps.audio_lookahead_ms >= 0


def test_one_result_per_chunk_in_order(renderer: Renderer, avatar: Avatar) -> None:
    caps = renderer.capabilities
    sizes = [caps.chunk_frames, max(caps.chunk_frames // 2, 1), caps.chunk_frames][: caps.max_batch]
    specs = _specs(avatar, sum(sizes), speech=True)
    chunks = _chunks(avatar, specs, loud_vowel(2.0), sizes, caps.audio_lookahead_ms)
    results = renderer.render(chunks)
    assert [r.key for r in results] == [c.key for c in chunks]
    for chunk, result in zip(chunks, results, strict=True):
        assert result.frames.shape == (len(chunk.frames), avatar.height, avatar.width, 3)
        assert result.frames.dtype == np.uint8
        assert result.stages and all(v >= 0.0 for v in result.stages.values())
    assert renderer.render([]) == []


def test_deterministic(case: RendererCase, renderer: Renderer, avatar: Avatar) -> None:
    caps = renderer.capabilities
    specs = _specs(avatar, caps.chunk_frames, speech=True)
    chunks = _chunks(avatar, specs, loud_vowel(1.0), [caps.chunk_frames], caps.audio_lookahead_ms)
    first = renderer.render(chunks)[0].frames
    np.testing.assert_array_equal(renderer.render(chunks)[0].frames, first)
    other = case.make(_lookup(avatar))
    try:
        np.testing.assert_array_equal(other.render(chunks)[0].frames, first)
    finally:
        other.close()


def test_chunking_invariant(case: RendererCase, renderer: Renderer, avatar: Avatar) -> None:
    if not case.chunking_invariant:
        pytest.skip(f"{case.name} conditions on whole chunks")
    caps = renderer.capabilities
    cf = caps.chunk_frames
    n = 3 * cf
    # Speech with pauses, so the mouth opens and closes inside and across chunks.
    audio = loud_vowel(n / FPS + 0.5) * (
        np.sin(np.arange(round((n / FPS + 0.5) * 16000)) / 900) > 0
    )
    specs = _specs(avatar, n, speech=True)
    even = _render_all(renderer, _chunks(avatar, specs, audio, [cf] * 3, caps.audio_lookahead_ms))
    uneven_sizes = [max(cf // 2 - 1, 1), cf, cf]
    uneven_sizes.append(n - sum(uneven_sizes))
    uneven_sizes = [s for s in uneven_sizes if s > 0]
    uneven = _render_all(
        renderer, _chunks(avatar, specs, audio, uneven_sizes, caps.audio_lookahead_ms)
    )
    single = _render_all(renderer, _chunks(avatar, specs, audio, [1] * n, caps.audio_lookahead_ms))
    np.testing.assert_array_equal(uneven, even)
    np.testing.assert_array_equal(single, even)
    assert len({even[i].tobytes() for i in range(n)}) > 1  # the turn is not one picture


def test_silence_keeps_the_mouth_closed(
    case: RendererCase, renderer: Renderer, avatar: Avatar
) -> None:
    caps = renderer.capabilities
    specs = _specs(avatar, caps.chunk_frames, speech=True)
    silent = np.zeros(2 * RENDER_SAMPLE_RATE, np.float32)
    # Silent speech, and non-speech frames over a loud voice: both keep the mouth closed.
    for specs_, audio in (
        (specs, silent),
        (_specs(avatar, caps.chunk_frames, speech=False), loud_vowel(2.0)),
    ):
        chunk = _chunks(avatar, specs_, audio, [caps.chunk_frames], caps.audio_lookahead_ms)[0]
        frames = renderer.render([chunk])[0].frames
        for spec, picture in zip(chunk.frames, frames, strict=True):
            source = avatar.source.frame(spec.source)
            around, _ = _mouth_boxes(avatar.source.geometry(spec.source))
            diff = np.abs(picture[around].astype(np.float32) - source[around].astype(np.float32))
            assert float(diff.mean()) <= case.silence_tolerance


def test_loud_voice_opens_the_mouth(case: RendererCase, renderer: Renderer, avatar: Avatar) -> None:
    if not case.mouth_follows_audio:
        pytest.skip(f"{case.name} does not lip-sync (tiny or untrained model)")
    caps = renderer.capabilities
    specs = _specs(avatar, caps.chunk_frames, speech=True)
    # Voice from 0.2 s on: the last frames of the chunk are well into the vowel.
    audio = np.concatenate([np.zeros(3200, np.float32), loud_vowel(1.5)])
    chunk = _chunks(avatar, specs, audio, [caps.chunk_frames], caps.audio_lookahead_ms)[0]
    frames = renderer.render([chunk])[0].frames
    spec, picture = chunk.frames[-1], frames[-1]
    source = avatar.source.frame(spec.source)
    around, inside = _mouth_boxes(avatar.source.geometry(spec.source))
    diff = np.abs(picture[around].astype(np.float32) - source[around].astype(np.float32))
    assert float(diff.mean()) > 5.0
    darker = float(_luma(source)[inside].mean() - _luma(picture)[inside].mean())
    assert darker > 25.0, darker
    # Outside the lower face nothing changes.
    top = int(avatar.source.geometry(spec.source)[P["nose_tip"], 1]) - 4
    np.testing.assert_array_equal(picture[:top], source[:top])


def test_unknown_avatar_is_a_render_error(renderer: Renderer, avatar: Avatar) -> None:
    chunk = RenderChunk(
        key=ChunkKey("s", "t", 0),
        avatar="nobody",
        frames=(FrameSpec(SourceRef(0, 0)),),
        first_frame=0,
        audio=np.zeros(SPF, np.float32),
        fps=FPS,
    )
    with pytest.raises(RenderError) as info:
        renderer.render([chunk])
    assert not info.value.retryable


def test_streaming_hands_over_final_frames_early(renderer: Renderer, avatar: Avatar) -> None:
    """A turn's first chunk comes out in growing prefixes, each the final pixels, before
    the call returns; chunks inside a turn come out whole; the results are `render`'s."""
    if not isinstance(renderer, StreamsFrames):
        pytest.skip("the renderer does not stream")
    caps = renderer.capabilities
    cf = caps.chunk_frames
    specs = _specs(avatar, 2 * cf, speech=True)
    chunks = _chunks(avatar, specs, loud_vowel(3.0), [cf, cf], caps.audio_lookahead_ms)
    chunks = chunks[: caps.max_batch]
    seen: list[tuple[int, npt.NDArray[np.uint8]]] = []
    returned = threading.Event()

    def on_frames(i: int, frames: npt.NDArray[np.uint8]) -> None:
        assert not returned.is_set()
        seen.append((i, frames.copy()))

    streamed = renderer.render_streaming(chunks, on_frames)
    returned.set()
    assert [r.key for r in streamed] == [c.key for c in chunks]
    assert {i for i, _ in seen} == {0}  # only the turn's first chunk (first_frame 0)
    counts = [len(f) for _, f in seen]
    assert counts[0] <= 2 and counts == sorted(set(counts)) and counts[-1] < cf
    for _, frames in seen:
        np.testing.assert_array_equal(frames, streamed[0].frames[: len(frames)])
    plain = renderer.render(chunks)
    for a, b in zip(streamed, plain, strict=True):
        assert a.frames.shape == b.frames.shape
        # The same pictures: decoding a frame alone or in a batch may round differently.
        assert int(np.abs(a.frames.astype(np.int16) - b.frames).max()) <= 1
