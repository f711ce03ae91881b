"""Avatar preparation from real encoded videos: resampling, faces, segments, cache, errors, CLI."""

from __future__ import annotations

import os
from pathlib import Path

import av
import numpy as np
import pytest
from skimage import data as skdata

from agent.cli import main
from media.avatar import Avatar, ClipInfo
from media.avatar_cache import list_avatars, load_avatar
from media.face import FaceAnalyzer, make_face_analyzer
from media.face_align import paste_back
from media.prepare import (
    FaceCache,
    PrepareError,
    PrepareOptions,
    PrepareReport,
    prepare_avatar,
)
from media.types import Frames, SourceRef
from tests.videoutil import astronaut, person_video, still_video, true_points, write_video

pytestmark = pytest.mark.unit

SIZE = 384  # the photo at 384 px: her face about 68 px wide
FPS = 25
SECONDS = 3.0
BLACKOUT_30 = (40, 50)  # frames at 30 fps with the head blacked out: 1.33 s .. 1.67 s
# At 25 fps, frame k shows the 30 fps frame on screen at k / 25 s.
BLACKOUT_25 = {k for k in range(75) if BLACKOUT_30[0] <= int(k * 30 / 25) < BLACKOUT_30[1]}


@pytest.fixture(scope="module")
def analyzer() -> FaceAnalyzer:
    return make_face_analyzer("auto")


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("videos")
    return {
        key: person_video(d / f"astronaut.{key}", SECONDS, 30, SIZE, key, BLACKOUT_30)
        for key in ("mp4", "webm", "mkv")
    }


@pytest.fixture(scope="module")
def short_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1.2 s at 256 px: still for 1 s (enough rest for an idle loop), 30 frames at 25 fps."""
    return person_video(tmp_path_factory.mktemp("short") / "short.mkv", 1.2, 30, 256, "mkv")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, videos: dict[str, Path],
             analyzer: FaceAnalyzer) -> tuple[Path, PrepareReport]:
    root = tmp_path_factory.mktemp("cache")
    report = prepare_avatar(root, "astro", list(videos.values()), analyzer)
    return root, report


def test_prepares_every_container_at_25_fps(prepared: tuple[Path, PrepareReport]) -> None:
    root, report = prepared
    assert list_avatars(root) == ["astro"]
    assert sorted(p.name for p in root.iterdir()) == ["astro"]  # no temporaries left
    avatar = load_avatar(root, "astro")
    assert (avatar.width, avatar.height, avatar.fps) == (SIZE, SIZE, FPS)
    assert [c.name for c in avatar.clips] == ["0_astronaut", "1_astronaut", "2_astronaut"]
    for clip, info in zip(report.clips, avatar.clips, strict=True):
        assert info.num_frames == 75  # 3 s of 30 fps resampled to 25 fps
        assert abs(clip.source_fps - 30.0) < 0.01
        assert set(info.bad_frames) == BLACKOUT_25  # marked, not aborted


def test_geometry_follows_the_moving_face(prepared: tuple[Path, PrepareReport],
                                          analyzer: FaceAnalyzer) -> None:
    avatar = load_avatar(prepared[0], "astro")
    limit = 3.0 if analyzer.name != "haar" else 12.0  # px at 384 px (face about 68 px wide)
    for c, info in enumerate(avatar.clips):
        errors = [
            np.linalg.norm(avatar.source.geometry(SourceRef(c, f)) - true_points(f / FPS, SIZE),
                           axis=1).mean()
            for f in range(info.num_frames) if f not in info.bad_frames
        ]
        assert np.mean(errors) < limit, (c, np.mean(errors))
        # Bad frames still have geometry (interpolated) so blends never see NaN.
        assert all(np.isfinite(avatar.source.geometry(SourceRef(c, f))).all()
                   for f in info.bad_frames)


def test_rest_segments_and_gestures(prepared: tuple[Path, PrepareReport],
                                    analyzer: FaceAnalyzer) -> None:
    avatar = load_avatar(prepared[0], "astro")
    for info in avatar.clips:
        # Still for 1 s, a gesture over frames 25-50, still again (from frame 50).
        rest = {f for lo, hi in info.rest_segments for f in range(lo, hi)}
        assert not rest & set(range(30, 46))
        assert not rest & info.bad_frames
        assert max(hi - lo for lo, hi in info.rest_segments) >= 21  # enough for an idle loop
        if analyzer.name == "haar":
            continue  # its template points jitter too much to find every still stretch
        assert set(range(3, 22)) <= rest
        assert set(range(55, 72)) <= rest
        assert any(44 <= g <= 56 for g in info.gesture_ends), info.gesture_ends
    assert avatar.neutral.frame in {f for lo, hi in avatar.clips[avatar.neutral.clip]
                                    .rest_segments for f in range(lo, hi)}
    assert avatar.idle_loop[0].source == avatar.neutral
    assert len(avatar.idle_loop) >= 8 * FPS


def test_face_cache_extras(prepared: tuple[Path, PrepareReport]) -> None:
    avatar = load_avatar(prepared[0], "astro")
    faces = FaceCache(avatar)
    good, bad = SourceRef(1, 10), SourceRef(1, min(BLACKOUT_25))
    for size in (256, 512):
        crop = faces.crop(good, size)
        assert crop.shape == (size, size, 3) and crop.std() > 20
        assert not faces.crop(bad, size).any()
        assert faces.mouth_mask(size).shape == (size, size)
        # The crop affine takes the frame's mouth into the mask's regenerated region.
        mouth = avatar.source.geometry(good)[[3, 4, 5, 6]].mean(axis=0)
        x, y = faces.affine(good, size) @ [*mouth, 1.0]
        assert faces.mouth_mask(size)[round(y), round(x)] == 0
    geometry = faces.paste(good)
    frame = avatar.source.frame(good)
    out = paste_back(frame, faces.crop(good, 512), geometry)
    assert np.abs(out.astype(int) - frame.astype(int)).mean() < 1.0
    assert faces.paste(bad).box == (0, 0, 0, 0)
    np.testing.assert_array_equal(paste_back(frame, faces.crop(good, 256), faces.paste(bad)), frame)
    assert faces.latents(good) is None


class _MeanEncoder:
    """A LatentEncoder for the hook: 8 x 8 block means of the first 4 channels' stand-ins."""

    resolution = 256

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, pictures: Frames) -> np.ndarray:
        self.calls += 1
        b, r = pictures.shape[0], pictures.shape[1]
        blocks = pictures.reshape(b, r // 8, 8, r // 8, 8, 3).mean(axis=(2, 4))  # (B, r/8, r/8, 3)
        lum = blocks.mean(axis=3, keepdims=True)
        return np.concatenate([blocks, lum], axis=3).transpose(0, 3, 1, 2).astype(np.float16)


def test_latent_hook_and_up_to_date(tmp_path: Path, short_video: Path,
                                    analyzer: FaceAnalyzer) -> None:
    encoder = _MeanEncoder()
    options = PrepareOptions(idle_seconds=2.0)
    first = prepare_avatar(tmp_path, "lat", [short_video], analyzer, options,
                           latent_encoder=encoder)
    assert not first.up_to_date and encoder.calls == 2 * 2  # 30 frames in batches of 16, twice
    avatar = load_avatar(tmp_path, "lat")
    latents = FaceCache(avatar).latents(SourceRef(0, 10))
    assert latents is not None
    masked, ref = latents
    assert masked.shape == ref.shape == (4, 32, 32)
    assert masked[:, 24, 16].max() == 0 < ref[:, 24, 16].min()  # mouth region masked out
    stamp = (tmp_path / "lat" / "manifest.json").stat().st_mtime_ns
    again = prepare_avatar(tmp_path, "lat", [short_video], analyzer, options,
                           latent_encoder=encoder)
    assert again.up_to_date and encoder.calls == 4
    assert (tmp_path / "lat" / "manifest.json").stat().st_mtime_ns == stamp
    forced = prepare_avatar(tmp_path, "lat", [short_video], analyzer, options, force=True)
    assert not forced.up_to_date and "latent_ref_0" not in load_avatar(tmp_path, "lat").extras


# --- bad input -----------------------------------------------------------------------


def _expect_error(root: Path, videos: list[Path], match: str, analyzer: FaceAnalyzer,
                  **options: float) -> None:
    with pytest.raises(PrepareError, match=match):
        prepare_avatar(root, "bad", videos, analyzer, PrepareOptions(**options))  # type: ignore[arg-type]
    leftovers = [p.name for p in root.iterdir()] if root.exists() else []
    assert "bad" not in leftovers and not [n for n in leftovers if n.startswith(".tmp")]


def test_no_face_at_all_is_an_error(tmp_path: Path, analyzer: FaceAnalyzer) -> None:
    coffee = np.asarray(skdata.coffee(), np.uint8)[:400, :600]  # type: ignore[no-untyped-call]
    video = still_video(tmp_path / "coffee.mp4", np.ascontiguousarray(coffee), 1.2)
    _expect_error(tmp_path / "cache", [video], "no face found", analyzer)


def test_too_short_is_an_error(tmp_path: Path, analyzer: FaceAnalyzer) -> None:
    video = still_video(tmp_path / "short.mp4", astronaut(256), 0.5)
    _expect_error(tmp_path / "cache", [video], "too short", analyzer)


def test_unreadable_files_are_errors(tmp_path: Path, videos: dict[str, Path],
                                     analyzer: FaceAnalyzer) -> None:
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(os.urandom(20_000))
    _expect_error(tmp_path / "cache", [junk], "not a readable video", analyzer)
    truncated = tmp_path / "truncated.mkv"
    data = videos["mkv"].read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    with pytest.raises(PrepareError, match="truncated.mkv"):
        prepare_avatar(tmp_path / "cache", "bad", [truncated], analyzer)
    _expect_error(tmp_path / "cache", [tmp_path / "missing.mp4"], "no such file", analyzer)
    audio_only = tmp_path / "tone.wav"
    with av.open(str(audio_only), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1600), np.int16), format="s16",
                                           layout="mono")
        frame.sample_rate = 16000
        for packet in stream.encode(frame):
            container.mux(packet)
    _expect_error(tmp_path / "cache", [audio_only], "no video stream", analyzer)


def test_variable_frame_rate_stall_is_an_error(tmp_path: Path, analyzer: FaceAnalyzer) -> None:
    photo = astronaut(256)
    # 25 fps in ticks of 1/250 s, with half a second missing after frame 20.
    pts = [i * 10 + (125 if i > 20 else 0) for i in range(50)]
    video = write_video(tmp_path / "vfr.mp4", [photo] * 50, 25, "mp4", pts)
    _expect_error(tmp_path / "cache", [video], "variable frame rate", analyzer)


def test_huge_resolution_is_an_error(tmp_path: Path, analyzer: FaceAnalyzer) -> None:
    big = np.zeros((2400, 4000, 3), np.uint8)
    video = write_video(tmp_path / "big.mkv", [big], 25, "mkv")
    _expect_error(tmp_path / "cache", [video], "larger than 3840x2160", analyzer)


def test_too_long_and_mismatched_shapes_are_errors(tmp_path: Path, videos: dict[str, Path],
                                                   analyzer: FaceAnalyzer) -> None:
    _expect_error(tmp_path / "cache", [videos["mkv"]], "longer than 2 s", analyzer,
                  max_seconds=2.0)
    wide = write_video(tmp_path / "wide.mkv", [np.zeros((64, 128, 3), np.uint8)] * 30, 25, "mkv")
    _expect_error(tmp_path / "cache", [videos["mkv"], wide], "share one picture shape", analyzer)


def test_failed_rewrite_keeps_the_previous_avatar(tmp_path: Path, short_video: Path,
                                                  analyzer: FaceAnalyzer) -> None:
    options = PrepareOptions(idle_seconds=2.0)
    prepare_avatar(tmp_path, "keep", [short_video], analyzer, options)
    junk = tmp_path.parent / "junk.mkv"
    junk.write_bytes(b"\x1a\x45\xdf\xa3" + os.urandom(4000))
    with pytest.raises(PrepareError):
        prepare_avatar(tmp_path, "keep", [junk], analyzer, options)
    avatar: Avatar = load_avatar(tmp_path, "keep")
    assert avatar.clips[0].num_frames == 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]


def test_cli_prepare(tmp_path: Path, short_video: Path, analyzer: FaceAnalyzer,
                     capsys: pytest.CaptureFixture[str]) -> None:
    args = ["prepare", "--avatar", "cli", "--avatar-dir", str(tmp_path), "--max-height", "128"]
    assert main([*args, str(short_video)]) == 0
    out = capsys.readouterr().out
    assert f"avatar 'cli' (128x128, faces: {analyzer.name}) written to" in out
    assert "30 frames (30.0" in out and "0 without a face" in out and "frames/s" in out
    assert load_avatar(tmp_path, "cli").height == 128
    assert main([*args, str(short_video)]) == 0
    assert "is up to date" in capsys.readouterr().out
    assert main([*args, str(tmp_path / "nope.mp4")]) == 2
    assert "prepare: error: " in capsys.readouterr().err
    assert main(["prepare", "--avatar", "Bad Id", str(short_video)]) == 2
    assert "invalid avatar id" in capsys.readouterr().err
    assert main(["prepare", "--avatar", "default", str(short_video)]) == 2
    assert "built-in avatar" in capsys.readouterr().err


def test_motion_analysis_on_synthetic_tracks() -> None:
    from media.default_avatar import _FACE_POINTS_512
    from media.prepare_motion import analyse_motion, choose_neutral

    n = 110
    rng = np.random.default_rng(0)
    still = np.repeat(_FACE_POINTS_512[None], n, axis=0).astype(np.float32)  # (N, 8, 2)
    # Steady head, then a 1 s sway over frames 50-75; the lips part during 90-100.
    moving = still.copy()
    moving[50:75, :, 0] += 12 * np.sin(np.linspace(0, np.pi, 25))[:, None]
    moving[90:100, 6, 1] += 8.0
    good = np.ones(n, bool)
    good[20] = False
    moving[20] = np.nan
    m = analyse_motion(moving, good, FPS)
    rest = {f for a, b in m.rest_segments for f in range(a, b)}
    assert not m.calm_fallback and 20 not in rest
    # Frames whose pose average reaches the bad frame 20 are not measured.
    assert set(range(2, 14)) <= rest and set(range(26, 47)) <= rest
    assert not rest & set(range(52, 73))
    assert not rest & set(range(92, 98))  # mouth open is not rest
    assert any(72 <= g <= 82 for g in m.gesture_ends)
    assert np.isfinite(m.geometry).all()  # frame 20 interpolated
    # Jitter everywhere: nothing is still, so the calmest second becomes the rest.
    shaky = (still + rng.normal(0, 2.0, still.shape)).astype(np.float32)
    s = analyse_motion(shaky, np.ones(n, bool), FPS)
    assert s.calm_fallback and max(b - a for a, b in s.rest_segments) >= 21
    clips = [ClipInfo("a", n, rest_segments=m.rest_segments, bad_frames=frozenset({20}))]
    neutral = choose_neutral(clips, [m], FPS)
    lo, hi = next((a, b) for a, b in m.rest_segments if a <= neutral.frame < b)
    assert lo + 10 <= neutral.frame < hi - 10  # room for the idle loop's crossfades
