"""The on-disk avatar cache: round trips, atomic writes, id validation, clear load errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from media.avatar import FACE_POINTS, ClipInfo
from media.avatar_cache import (
    FORMAT_VERSION,
    AvatarCacheError,
    AvatarNotFound,
    ClipData,
    cached_content_hash,
    list_avatars,
    load_avatar,
    validate_avatar_id,
    write_frames_avatar,
)
from media.types import FrameSpec, SourceRef

pytestmark = pytest.mark.unit

H, W = 12, 16


def _clip(name: str, n: int, seed: int) -> ClipData:
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (n, H, W, 3), dtype=np.uint8)
    geometry = rng.uniform(0, W, (n, len(FACE_POINTS), 2)).astype(np.float32)
    info = ClipInfo(
        name=name,
        num_frames=n,
        tags=("calm", "test"),
        rest_segments=((0, 2),),
        gesture_ends=(3,),
        bad_frames=frozenset({n - 1}),
    )
    return ClipData(info=info, frames=frames, geometry=geometry)


IDLE = (
    FrameSpec(SourceRef(0, 0)),
    FrameSpec(SourceRef(0, 1), blend_to=SourceRef(1, 2), blend_weight=0.25),
    FrameSpec(SourceRef(1, 3), speech=True),
)


def _write(
    root: Path, avatar_id: str = "test_avatar", seed: int = 0, **extras: npt.NDArray[Any]
) -> Path:
    clips = [_clip("a", 5, seed), _clip("b", 4, seed + 1)]
    arrays = {"latents": np.arange(6, dtype=np.float16).reshape(2, 3), **extras}
    return write_frames_avatar(
        root,
        avatar_id,
        clips,
        SourceRef(0, 0),
        IDLE,
        arrays,
        fps=25,
    )


def test_frames_avatar_round_trip(tmp_path: Path) -> None:
    path = _write(tmp_path)
    assert path == tmp_path / "test_avatar"
    assert list_avatars(tmp_path) == ["test_avatar"]
    avatar = load_avatar(tmp_path, "test_avatar")
    assert (avatar.id, avatar.fps, avatar.width, avatar.height) == ("test_avatar", 25, W, H)
    assert avatar.neutral == SourceRef(0, 0)
    assert avatar.idle_loop == IDLE
    clips = [_clip("a", 5, 0), _clip("b", 4, 1)]
    assert avatar.clips == tuple(c.info for c in clips)
    for c, clip in enumerate(clips):
        for f in range(clip.info.num_frames):
            picture = avatar.source.frame(SourceRef(c, f))
            np.testing.assert_array_equal(picture, clip.frames[f])
            np.testing.assert_array_equal(avatar.source.geometry(SourceRef(c, f)), clip.geometry[f])
    # Pictures stay on disk: the clip is memory-mapped, read-only.
    picture = avatar.source.frame(SourceRef(0, 1))
    assert isinstance(picture.base, np.memmap) or isinstance(picture, np.memmap)
    assert not picture.flags.writeable
    np.testing.assert_array_equal(
        np.asarray(avatar.extras["latents"]), np.arange(6, dtype=np.float16).reshape(2, 3)
    )
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["kind"] == "frames"
    assert manifest["idle_loop"][1] == {
        "source": {"clip": 0, "frame": 1},
        "blend_to": {"clip": 1, "frame": 2},
        "blend_weight": 0.25,
        "speech": False,
    }


def test_content_hash_follows_inputs(tmp_path: Path) -> None:
    _write(tmp_path / "one", seed=0)
    _write(tmp_path / "two", seed=0)
    _write(tmp_path / "three", seed=5)
    one = cached_content_hash(tmp_path / "one", "test_avatar")
    assert one is not None
    assert one == cached_content_hash(tmp_path / "two", "test_avatar")
    assert one != cached_content_hash(tmp_path / "three", "test_avatar")
    assert cached_content_hash(tmp_path / "one", "missing") is None


def test_rewrite_replaces_and_leaves_no_temporaries(tmp_path: Path) -> None:
    _write(tmp_path, seed=0)
    _write(tmp_path, seed=9)
    avatar = load_avatar(tmp_path, "test_avatar")
    np.testing.assert_array_equal(avatar.source.frame(SourceRef(0, 0)), _clip("a", 5, 9).frames[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test_avatar"]


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    # np.save refuses object arrays without pickling, after the clips are written.
    with pytest.raises(ValueError, match="allow_pickle"):
        _write(tmp_path, unpicklable=np.array([object()], dtype=object))
    assert list(tmp_path.iterdir()) == []
    # A failed rewrite keeps the previous avatar intact.
    _write(tmp_path, seed=3)
    with pytest.raises(ValueError, match="allow_pickle"):
        _write(tmp_path, seed=4, unpicklable=np.array([object()], dtype=object))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test_avatar"]
    avatar = load_avatar(tmp_path, "test_avatar")
    np.testing.assert_array_equal(avatar.source.frame(SourceRef(1, 2)), _clip("b", 4, 4).frames[2])


def test_interrupted_write_is_invisible(tmp_path: Path) -> None:
    # What a crash mid-write leaves: a temporary directory without a manifest.
    partial = tmp_path / ".tmp-crashed-abc123"
    partial.mkdir()
    np.save(partial / "clip_0.npy", np.zeros((1, 2, 2, 3), np.uint8))
    assert list_avatars(tmp_path) == []
    with pytest.raises(AvatarNotFound):
        load_avatar(tmp_path, "crashed")


def test_write_rejects_inconsistent_inputs(tmp_path: Path) -> None:
    good = _clip("a", 5, 0)
    short = ClipData(info=good.info, frames=good.frames[:4], geometry=good.geometry)
    with pytest.raises(ValueError, match="clip 0 frames"):
        write_frames_avatar(tmp_path, "x", [short], SourceRef(0, 0), IDLE[:1], {}, fps=25)
    bad_geo = ClipData(info=good.info, frames=good.frames, geometry=good.geometry[:, :3])
    with pytest.raises(ValueError, match="clip 0 geometry"):
        write_frames_avatar(tmp_path, "x", [bad_geo], SourceRef(0, 0), IDLE[:1], {}, fps=25)
    with pytest.raises(ValueError, match="out of range"):
        write_frames_avatar(tmp_path, "x", [good], SourceRef(0, 9), IDLE[:1], {}, fps=25)
    with pytest.raises(ValueError, match="extras name"):
        write_frames_avatar(
            tmp_path, "x", [good], SourceRef(0, 0), IDLE[:1], {"../up": np.zeros(1)}, fps=25
        )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("good", ["default", "a", "0", "my-avatar_2", "x" * 64])
def test_valid_ids(good: str) -> None:
    assert validate_avatar_id(good) == good


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "..",
        "../etc",
        "a/b",
        "a\\b",
        "/abs",
        ".hidden",
        "-a",
        "_a",
        "Upper",
        "x" * 65,
        "a b",
        "a\x00",
        "é",
    ],
)
def test_invalid_ids_are_refused(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError, match="invalid avatar id"):
        validate_avatar_id(bad)
    with pytest.raises(ValueError, match="invalid avatar id"):
        load_avatar(tmp_path, bad)
    with pytest.raises(ValueError, match="invalid avatar id"):
        write_frames_avatar(tmp_path, bad, [_clip("a", 5, 0)], SourceRef(0, 0), IDLE[:1], {}, 25)
    assert list(tmp_path.iterdir()) == []


def test_load_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(AvatarNotFound, match="no avatar 'ghost'") as info:
        load_avatar(tmp_path, "ghost")
    assert isinstance(info.value, KeyError)
    path = _write(tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(AvatarCacheError, match="prepare it again"):
        load_avatar(tmp_path, "test_avatar")
    manifest["format_version"] = FORMAT_VERSION
    (path / "manifest.json").write_text(json.dumps(manifest))
    np.save(path / "clip_1.npy", np.zeros((4, H, W + 2, 3), np.uint8))
    with pytest.raises(AvatarCacheError, match="clip_1.npy"):
        load_avatar(tmp_path, "test_avatar")
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(AvatarCacheError, match="not valid JSON"):
        load_avatar(tmp_path, "test_avatar")
