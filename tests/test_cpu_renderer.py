"""CPU renderer specifics: mouth shape from audio, pixel-space blends, errors, stages."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from scipy.signal import lfilter

from agent.config import CpuRendererConfig, DefaultAvatarConfig
from agent.errors import RenderError
from media.avatar import FACE_POINTS, Avatar
from media.cpu_renderer import CpuRenderer
from media.default_avatar import ensure_default_avatar
from media.mouth import LOOKAHEAD_SAMPLES, WINDOW_SAMPLES, mouth_track, open_mouth
from media.types import (
    RENDER_SAMPLE_RATE,
    Audio,
    ChunkKey,
    FrameSpec,
    RenderChunk,
    SourceRef,
    samples_per_frame,
)

pytestmark = pytest.mark.unit

FPS = 25
SPF = samples_per_frame(FPS)
P = {name: i for i, name in enumerate(FACE_POINTS)}
FORMANTS = {"a": (730, 1090, 2440), "i": (270, 2290, 3010), "u": (300, 870, 2240)}


def vowel(name: str, seconds: float, level: float = 0.2) -> Audio:
    """A formant-synthesised vowel: pulse train, three resonators, lip radiation."""
    n = round(seconds * RENDER_SAMPLE_RATE)
    pulses = np.zeros(n)
    pulses[np.arange(0, n, RENDER_SAMPLE_RATE / 130.0).astype(int)] = 1.0
    x = lfilter([1.0], [1.0, -0.97], pulses)
    for freq, bandwidth in zip(FORMANTS[name], (70, 100, 160), strict=True):
        r = math.exp(-math.pi * bandwidth / RENDER_SAMPLE_RATE)
        c = 2 * r * math.cos(2 * math.pi * freq / RENDER_SAMPLE_RATE)
        x = lfilter([1 - c + r * r], [1, -c, r * r], x)
    x = np.diff(x, prepend=0.0)
    return np.asarray(x * level / np.sqrt(np.mean(x**2)), np.float32)


@pytest.fixture(scope="module")
def avatar(tmp_path_factory: pytest.TempPathFactory) -> Avatar:
    config = DefaultAvatarConfig(size=128, clip_seconds=(2.0,), seed=5)
    return ensure_default_avatar(tmp_path_factory.mktemp("avatars"), config, FPS)


@pytest.fixture
def renderer(avatar: Avatar) -> CpuRenderer:
    return CpuRenderer({avatar.id: avatar}.__getitem__, CpuRendererConfig(chunk_frames=6))


def _chunk(avatar: Avatar, specs: list[FrameSpec], audio: Audio, first: int = 0) -> RenderChunk:
    return RenderChunk(ChunkKey("s", "t", 0), avatar.id, tuple(specs), first, audio, FPS)


def test_capabilities_and_stages(renderer: CpuRenderer, avatar: Avatar) -> None:
    caps = renderer.capabilities
    assert (caps.name, caps.device, caps.chunk_frames) == ("cpu", "cpu", 6)
    assert caps.audio_lookahead_ms * RENDER_SAMPLE_RATE / 1000 >= LOOKAHEAD_SAMPLES
    result = renderer.render(
        [_chunk(avatar, [FrameSpec(SourceRef(0, 3), speech=True)], vowel("a", 0.5))]
    )
    assert set(result[0].stages) == {"audio_features", "source", "mouth"}


def test_silence_is_exactly_closed_and_history_is_bounded() -> None:
    silent = mouth_track(np.zeros(16000, np.float32), 0, 20, FPS)
    assert not silent.opening.any() and not silent.spread.any()
    # A loud burst is forgotten: the mouth is exactly closed again a little later.
    audio = np.zeros(3 * RENDER_SAMPLE_RATE, np.float32)
    audio[:8000] = vowel("a", 0.5, 0.3)
    track = mouth_track(audio, 0, 60, FPS)
    assert track.opening[5:12].min() > 0.8
    assert not track.opening[40:].any()


def test_frame_shape_depends_on_audio_up_to_the_lookahead_only() -> None:
    audio = vowel("a", 2.0, 0.05)
    k = 20
    boundary = (k + 1) * SPF + LOOKAHEAD_SAMPLES  # frame k's window ends here
    base = mouth_track(audio, 0, k + 1, FPS)
    later = audio.copy()
    later[boundary:] = 0.9  # changes after the boundary: frames <= k unchanged
    np.testing.assert_array_equal(mouth_track(later, 0, k + 1, FPS).opening, base.opening)
    np.testing.assert_array_equal(
        mouth_track(audio[:boundary], 0, k + 1, FPS).opening, base.opening
    )
    inside = audio.copy()
    inside[boundary - WINDOW_SAMPLES // 2 : boundary] *= 4.0  # inside frame k's window
    assert mouth_track(inside, 0, k + 1, FPS).opening[k] > base.opening[k]


def test_vowels_shape_the_lips(avatar: Avatar) -> None:
    tracks = {v: mouth_track(vowel(v, 1.0), 15, 5, FPS) for v in "aiu"}
    assert all(t.opening.min() > 0.8 for t in tracks.values())
    assert tracks["i"].spread.min() > 0.5  # spread "ee"
    assert tracks["u"].spread.max() < -0.5  # rounded "oo"
    assert abs(float(tracks["a"].spread.mean())) < 0.5
    # Rounded lips make a narrower dark opening than spread ones.
    g = avatar.source.geometry(avatar.neutral)
    widths = {}
    for spread in (-1.0, 1.0):
        picture = avatar.source.frame(avatar.neutral).copy()
        open_mouth(picture, g, 1.0, spread)
        dark = cv2.cvtColor(picture, cv2.COLOR_RGB2GRAY) < 70
        rows = slice(int(g[P["upper_lip"], 1]), int(g[P["chin"], 1]))
        widths[spread] = int(dark[rows].any(axis=0).sum())
    assert widths[-1.0] < widths[1.0], widths


def test_blends_in_pixel_space(renderer: CpuRenderer, avatar: Avatar) -> None:
    a, b = SourceRef(1, 4), SourceRef(0, 37)
    specs = [
        FrameSpec(a, blend_to=b, blend_weight=0.3),
        FrameSpec(a, blend_to=b, blend_weight=1.0),
        FrameSpec(a, blend_to=b, blend_weight=0.0),
    ]
    frames = renderer.render([_chunk(avatar, specs, vowel("a", 1.0))])[0].frames
    fa, fb = avatar.source.frame(a), avatar.source.frame(b)
    np.testing.assert_array_equal(frames[0], cv2.addWeighted(fa, 0.7, fb, 0.3, 0.0))
    np.testing.assert_array_equal(frames[1], fb)
    np.testing.assert_array_equal(frames[2], fa)


def test_blended_speech_frame_opens_the_blended_mouth(
    renderer: CpuRenderer, avatar: Avatar
) -> None:
    a, b = SourceRef(1, 4), SourceRef(0, 37)
    spec = FrameSpec(a, blend_to=b, blend_weight=0.5, speech=True)
    audio = vowel("a", 1.0, 0.3)
    picture = renderer.render([_chunk(avatar, [spec], audio, first=10)])[0].frames[0]
    expected = np.asarray(
        cv2.addWeighted(avatar.source.frame(a), 0.5, avatar.source.frame(b), 0.5, 0.0), np.uint8
    )
    geometry = 0.5 * avatar.source.geometry(a) + 0.5 * avatar.source.geometry(b)
    track = mouth_track(audio, 10, 1, FPS)
    open_mouth(
        expected, geometry.astype(np.float32), float(track.opening[0]), float(track.spread[0])
    )
    np.testing.assert_array_equal(picture, expected)


def test_bad_chunks_are_render_errors(renderer: CpuRenderer, avatar: Avatar) -> None:
    audio = np.zeros(SPF, np.float32)
    bad_ref = _chunk(avatar, [FrameSpec(SourceRef(0, 10_000))], audio)
    wrong_fps = RenderChunk(
        ChunkKey("s", "t", 0), avatar.id, (FrameSpec(SourceRef(0, 0)),), 0, audio, 50
    )
    for chunk, message in ((bad_ref, "out of range"), (wrong_fps, "50 fps")):
        with pytest.raises(RenderError, match=message) as info:
            renderer.render([chunk])
        assert not info.value.retryable
