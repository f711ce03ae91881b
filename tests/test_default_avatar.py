"""The default avatar: built from the astronaut photo, cached, alive, with truthful metadata."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import pytest

from agent.config import DefaultAvatarConfig
from media.avatar import FACE_POINTS, Avatar
from media.avatar_cache import list_avatars
from media.default_avatar import (
    DEFAULT_AVATAR_ID,
    IDLE_LOOP_SECONDS,
    build_default_avatar,
    ensure_default_avatar,
)
from media.procedural import MOTION_FIELDS, ProceduralSource
from media.types import FrameSpec, SourceRef

pytestmark = pytest.mark.unit

SIZE, FPS = 128, 25
CONFIG = DefaultAvatarConfig(size=SIZE, clip_seconds=(2.0, 4.0, 3.0), seed=3)
P = {name: i for i, name in enumerate(FACE_POINTS)}


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("avatars")


@pytest.fixture(scope="module")
def avatar(cache: Path) -> Avatar:
    return ensure_default_avatar(cache, CONFIG, FPS)


def _luma(picture: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    return np.asarray(cv2.cvtColor(picture, cv2.COLOR_RGB2GRAY), np.float32)


def _motion(cache: Path, clip: int) -> npt.NDArray[np.float32]:
    return np.asarray(np.load(cache / DEFAULT_AVATAR_ID / f"motion_{clip}.npy"), np.float32)


def test_built_once_then_loaded_and_rebuilt_on_change(cache: Path, avatar: Avatar) -> None:
    assert list_avatars(cache) == [DEFAULT_AVATAR_ID]
    manifest = cache / DEFAULT_AVATAR_ID / "manifest.json"
    before = manifest.stat().st_ino
    again = ensure_default_avatar(cache, CONFIG, FPS)
    assert manifest.stat().st_ino == before  # cache hit: nothing rewritten
    assert again.clips == avatar.clips
    other = tmp = cache.parent / "rebuilt"
    tmp.mkdir()
    first = ensure_default_avatar(other, CONFIG, FPS)
    old_hash = json.loads((other / DEFAULT_AVATAR_ID / "manifest.json").read_text())["content_hash"]
    changed = ensure_default_avatar(other, CONFIG.model_copy(update={"seed": 4}), FPS)
    new_hash = json.loads((other / DEFAULT_AVATAR_ID / "manifest.json").read_text())["content_hash"]
    assert new_hash != old_hash
    assert changed.clips[1].rest_segments != first.clips[1].rest_segments or not np.array_equal(
        changed.source.frame(SourceRef(1, 20)), first.source.frame(SourceRef(1, 20))
    )


def test_shape_and_clips(avatar: Avatar) -> None:
    assert (avatar.id, avatar.width, avatar.height, avatar.fps) == ("default", SIZE, SIZE, FPS)
    assert [c.num_frames for c in avatar.clips] == [
        round(IDLE_LOOP_SECONDS * FPS),
        *(round(s * FPS) for s in CONFIG.clip_seconds),
    ]
    assert avatar.clips[0].name == "idle"
    assert [c.tags for c in avatar.clips[1:]] == [("calm",), ("emphatic",), ("listening",)]
    picture = avatar.source.frame(SourceRef(2, 10))
    assert picture.shape == (SIZE, SIZE, 3) and picture.dtype == np.uint8


def test_face_points_sit_on_the_face(avatar: Avatar) -> None:
    g = avatar.source.geometry(avatar.neutral)
    assert g.shape == (len(FACE_POINTS), 2)
    assert ((g >= 0) & (g < SIZE)).all()
    eyes_y = (g[P["left_eye"], 1] + g[P["right_eye"], 1]) / 2
    assert g[P["left_eye"], 0] < g[P["nose_tip"], 0] < g[P["right_eye"], 0]
    assert g[P["mouth_left"], 0] < g[P["upper_lip"], 0] < g[P["mouth_right"], 0]
    assert eyes_y < g[P["nose_tip"], 1] < g[P["upper_lip"], 1] < g[P["lower_lip"], 1]
    assert g[P["lower_lip"], 1] < g[P["chin"], 1]
    eye_distance = float(np.linalg.norm(g[P["right_eye"]] - g[P["left_eye"]]))
    assert 0.06 * SIZE < eye_distance < 0.12 * SIZE
    # The points hit the picture's features: pupils darker than the cheeks below them.
    luma = _luma(avatar.source.frame(avatar.neutral))
    for eye in ("left_eye", "right_eye"):
        x, y = np.round(g[P[eye]]).astype(int)
        pupil = luma[y - 1 : y + 2, x - 1 : x + 2].mean()
        cheek = luma[y + 6 : y + 9, x - 1 : x + 2].mean()
        assert pupil < cheek - 40, (eye, pupil, cheek)


@pytest.mark.parametrize(
    "tx, ty, angle, scale, breath",
    [(3.0, -2.0, 0.0, 1.0, 0.0), (0.0, 1.5, 3.0, 1.02, 0.5), (-2.5, 0.0, -2.0, 0.98, 0.8)],
)
def test_geometry_tracks_the_picture(
    tx: float, ty: float, angle: float, scale: float, breath: float
) -> None:
    """Where geometry says a face point went, its neutral patch is found in the frame."""
    rig = build_default_avatar(CONFIG, FPS).rig
    motion = np.array([[0, 0, 0, 1, 0, 0], [tx, ty, angle, scale, breath, 0]], np.float32)
    source = ProceduralSource(rig, [motion])
    neutral, frame = source.frame(SourceRef(0, 0)), source.frame(SourceRef(0, 1))
    g0, g = source.geometry(SourceRef(0, 0)), source.geometry(SourceRef(0, 1))
    np.testing.assert_allclose(g0, rig.geometry)
    for point in ("left_eye", "right_eye", "nose_tip", "chin"):
        x0, y0 = np.round(g0[P[point]]).astype(int)
        template = neutral[y0 - 5 : y0 + 6, x0 - 5 : x0 + 6]
        scores = cv2.matchTemplate(frame, template, cv2.TM_SQDIFF)
        _, _, (bx, by), _ = cv2.minMaxLoc(scores)
        expected = g[P[point]] - (g0[P[point]] - np.array([x0, y0]))  # where (x0, y0) went
        assert np.abs(np.array([bx + 5, by + 5]) - expected).max() <= 0.75, point


def test_idle_loop_is_seamless_and_alive(avatar: Avatar) -> None:
    idle = avatar.clips[0]
    assert avatar.neutral == SourceRef(0, 0)
    assert avatar.idle_loop == tuple(FrameSpec(SourceRef(0, f)) for f in range(idle.num_frames))
    first = avatar.source.frame(SourceRef(0, 0)).astype(np.float32)
    last = avatar.source.frame(SourceRef(0, idle.num_frames - 1)).astype(np.float32)
    step = avatar.source.frame(SourceRef(0, 1)).astype(np.float32)
    wrap = float(np.abs(last - first).mean())
    # Closing the loop is no bigger a jump than any single step of it.
    assert wrap <= 1.5 * float(np.abs(step - first).mean()) + 0.05
    spread = [
        float(np.abs(avatar.source.frame(SourceRef(0, f)).astype(np.float32) - first).mean())
        for f in range(0, idle.num_frames, 10)
    ]
    assert max(spread) > 10 * wrap + 0.3  # visibly moving while idle


def test_blinks_close_the_eyes(cache: Path, avatar: Avatar) -> None:
    blink = _motion(cache, 0)[:, MOTION_FIELDS.index("blink")]
    per_10s = np.count_nonzero(np.diff((blink > 0).astype(int)) == 1) / (blink.size / FPS) * 10
    assert 1.5 <= per_10s <= 5.0
    closed = int(np.argmax(blink))
    assert blink[closed] == 1.0
    for clip, f in ((0, 0), (0, closed)):
        g = avatar.source.geometry(SourceRef(clip, f))
        luma = _luma(avatar.source.frame(SourceRef(clip, f)))
        x, y = np.round(g[P["left_eye"]]).astype(int)
        if f == 0:
            open_eye = luma[y - 1 : y + 2, x - 2 : x + 3].mean()
        else:
            closed_eye = luma[y - 1 : y + 2, x - 2 : x + 3].mean()
    assert closed_eye > open_eye + 30  # lid skin covers the dark iris


def test_rest_segments_and_gesture_ends_are_truthful(avatar: Avatar, cache: Path) -> None:
    g0 = avatar.source.geometry(avatar.neutral)
    k = SIZE / 512
    gestures = 0
    for c, info in enumerate(avatar.clips):
        blink = _motion(cache, c)[:, MOTION_FIELDS.index("blink")]
        track = np.stack(
            [avatar.source.geometry(SourceRef(c, f)) for f in range(info.num_frames)]
        )  # (N, 8, 2)
        speed = np.linalg.norm(np.diff(track, axis=0), axis=2).max(axis=1)
        assert info.rest_segments, f"clip {info.name} has no rest segment"
        for start, end in info.rest_segments:
            assert 0 <= start < end <= info.num_frames
            assert np.linalg.norm(track[start:end] - g0, axis=2).max() <= 2.0 * k + 1e-4
            assert (blink[start:end] == 0).all()
        for end in info.gesture_ends:
            gestures += 1
            assert speed[max(end - 12, 0) : end].max() > 0.45 * k  # a fast stretch before
            assert speed[end : end + 4].max() < 0.25 * k  # and still after
    assert gestures > 0
