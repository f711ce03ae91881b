"""Frame validation on real pictures: the CPU renderer's output passes, garbage fails."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.config import CpuRendererConfig, DefaultAvatarConfig, ValidationConfig
from agent.framechecks import FrameChecks, mouth_box
from agent.validation import _clipped_shares, validate_chunk
from media.avatar import Avatar
from media.cpu_renderer import CpuRenderer
from media.default_avatar import ensure_default_avatar
from media.types import ChunkKey, FrameSpec, RenderChunk, RenderResult
from tests.serverutil import speech_like

pytestmark = pytest.mark.unit

CFG = ValidationConfig()


@pytest.fixture(scope="module")
def avatar(tmp_path_factory: pytest.TempPathFactory) -> Avatar:
    config = DefaultAvatarConfig(size=128, clip_seconds=(2.0,), seed=5)
    return ensure_default_avatar(Path(tmp_path_factory.mktemp("avatars")), config, 25)


@pytest.fixture(scope="module")
def rendered(avatar: Avatar) -> tuple[RenderChunk, RenderResult, FrameChecks]:
    specs = tuple(FrameSpec(s.source, speech=True) for s in avatar.idle_loop[:8])
    chunk = RenderChunk(ChunkKey("s", "t", 0), avatar.id, specs, 0,
                        speech_like(1.0, 16000, seed=3), 25)
    lookup = {avatar.id: avatar}.__getitem__
    (result,) = CpuRenderer(lookup, CpuRendererConfig()).render([chunk])
    return chunk, result, FrameChecks(lookup, CFG)


def test_real_renders_and_stand_ins_pass(rendered: tuple[RenderChunk, RenderResult,
                                                         FrameChecks]) -> None:
    chunk, result, checks = rendered
    assert checks.validate(chunk, result).ok
    stand_in = checks.stand_in(chunk)
    assert stand_in.shape == result.frames.shape and stand_in.dtype == np.uint8
    assert checks.validate(chunk, RenderResult(chunk.key, stand_in)).ok
    # The stand-in is the render with the mouth closed: they differ inside the mouth
    # box only (the audio is loud, so the rendered mouth is open somewhere).
    avatar = checks._avatars(chunk.avatar)
    opened = 0
    for spec, a, b in zip(chunk.frames, stand_in, result.frames, strict=True):
        x0, y0, x1, y1 = mouth_box(avatar.source.geometry(spec.source), avatar.width,
                                   avatar.height)
        diff = np.abs(a.astype(int) - b).max(axis=2)  # (H, W)
        opened += int(diff[y0:y1, x0:x1].any())
        diff[y0:y1, x0:x1] = 0
        assert not diff.any()
    assert opened > 0


@pytest.mark.parametrize(
    ("corrupt", "check"),
    [
        (lambda f: np.full(f.shape, np.nan, np.float32), "nonfinite"),
        (lambda f: f.astype(np.float32), "shape"),
        (lambda f: f[:, :64], "shape"),
        (lambda f: f[:-1], "shape"),
        (lambda f: np.zeros_like(f), "blank"),
        (lambda f: np.full_like(f, 128), "blank"),
        (lambda f: np.where(f > 100, 255, 0).astype(np.uint8), "saturated"),
        (lambda f: np.roll(f, 24, axis=2), "incoherent"),
        (lambda f: f[:, ::-1], "incoherent"),
    ],
    ids=["nan", "float", "cropped", "short", "black", "grey", "clipped", "shifted", "flipped"],
)
def test_garbage_fails_with_the_right_check(
    rendered: tuple[RenderChunk, RenderResult, FrameChecks], corrupt: object, check: str
) -> None:
    chunk, result, checks = rendered
    frames = corrupt(result.frames.copy())  # type: ignore[operator]
    verdict = checks.validate(chunk, RenderResult(chunk.key, frames))
    assert not verdict.ok and verdict.check == check, verdict


def test_one_bad_frame_in_the_middle_is_caught(
    rendered: tuple[RenderChunk, RenderResult, FrameChecks]
) -> None:
    chunk, result, checks = rendered
    frames = result.frames.copy()
    frames[4] = 0
    assert checks.validate(chunk, RenderResult(chunk.key, frames)).check == "blank"


def test_changes_inside_the_mouth_box_are_allowed(avatar: Avatar) -> None:
    picture = avatar.source.frame(avatar.idle_loop[0].source)
    box = mouth_box(avatar.source.geometry(avatar.idle_loop[0].source), avatar.width,
                    avatar.height)
    x0, y0, x1, y1 = box
    assert 0 <= x0 < x1 <= avatar.width and 0 <= y0 < y1 <= avatar.height
    changed = np.array(picture)[None].copy()
    changed[0, y0:y1, x0:x1] = 255 - changed[0, y0:y1, x0:x1]
    sources = np.array(picture)[None]
    assert validate_chunk(changed, 1, sources, [box], CFG).ok
    outside = np.array(picture)[None].copy()
    outside[0, :, : x0] = 255 - outside[0, :, : x0]
    assert validate_chunk(outside, 1, sources, [box], CFG).check == "incoherent"


def test_clipped_share_counts_exactly_the_values_near_black_and_white() -> None:
    # 0-3 and 252-255 are clipped, 4-251 are not (the wrap-around trick's edges).
    values = np.arange(256, dtype=np.uint8)
    rows = np.stack([values, np.full(256, 4, np.uint8), np.full(256, 251, np.uint8)])
    shares = _clipped_shares(rows)
    assert shares.tolist() == [8 / 256, 0.0, 0.0]
