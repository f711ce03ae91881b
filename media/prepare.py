"""Avatar preparation: videos of one person -> a "frames" avatar in the cache `serve` reads.

`prepare_avatar` decodes each video with PyAV (any container and codec
FFmpeg reads), resamples it to the avatar rate by timestamps, follows one
face through it (`media.face`), aligns it as LatentSync expects
(`media.face_align`), and measures where the person rests and where gestures
end (`media.prepare_motion`). Pictures and crops are spooled to disk as they
come; what stays in memory grows only by the per-frame geometry and paste
masks (about 0.1 MB a frame at 720p, measured by bench/prepare.py). The avatar is written with
`media.avatar_cache.write_frames_avatar`: atomically, so a failed or
interrupted run leaves nothing behind and never a partial avatar.

Per clip `i` the avatar's extras hold (see `FaceCache`):
- `crop256_i`, `crop512_i` (N, r, r, 3) uint8: aligned faces (zeros on bad frames);
- `affine256_i`, `affine512_i` (N, 2, 3) float32: frame pixel -> crop pixel;
- `paste_box_i` (N, 4) int32, `paste_inv256_i`, `paste_inv512_i` (N, 2, 3)
  float32, `paste_mask_i` (N, Hm, Wm) uint8: paste-back geometry and soft mask
  (boxes are empty on bad frames);
- with a `LatentEncoder`: `latent_masked_i`, `latent_ref_i` (N, 4, r/8, r/8);
and once: `mouth_mask_256`, `mouth_mask_512` and `prepare_meta` (JSON bytes).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import av
import av.error
import cv2
import numpy as np
import numpy.typing as npt

from agent.errors import AgentError
from media.avatar import FACE_POINTS, Avatar, ClipInfo
from media.avatar_cache import (
    ClipData,
    load_avatar,
    validate_avatar_id,
    write_frames_avatar,
)
from media.default_avatar import DEFAULT_AVATAR_ID
from media.face import FaceAnalyzer, FaceTracker
from media.face_align import (
    CROP_SIZES,
    AlignSmoother,
    PasteGeometry,
    crop_affine,
    empty_paste_geometry,
    mouth_mask,
    paste_geometry,
    scale_affine,
    warp_crop,
)
from media.prepare_motion import ClipMotion, analyse_motion, choose_neutral
from media.types import Frame, Frames, SourceRef
from sessions.idle_loop import build_idle_loop

PREPARE_VERSION = 1  # changes whenever the output for the same input does
MAX_SOURCE_PIXELS = 3840 * 2160  # larger videos are refused (downscale them first)
MIN_SOURCE_FPS = 12.0  # below this, resampling to 25 fps would repeat most frames
_STALL_S = 0.25  # a gap this long (and 3 frame intervals) between frames is refused
IDLE_MIN_SECONDS = 8.0


class PrepareError(AgentError):
    """The input cannot become an avatar; the message says why and what to do."""


class LatentEncoder(Protocol):
    """The VAE hook: encodes aligned crops once at preparation, not per chunk at run time."""

    @property
    def resolution(self) -> int: ...

    def encode(self, pictures: Frames) -> npt.NDArray[np.float16]:
        """(B, r, r, 3) uint8 RGB -> (B, 4, r / 8, r / 8) scaled latents."""
        ...


@dataclass(frozen=True, slots=True)
class PrepareOptions:
    fps: int = 25
    max_height: int = 720  # stored frames are downscaled to this height
    min_clip_seconds: float = 1.0
    max_seconds: float = 120.0  # all clips together
    idle_seconds: float = IDLE_MIN_SECONDS

    def __post_init__(self) -> None:
        if self.fps <= 0 or self.max_height < 64 or self.max_seconds <= 0:
            raise PrepareError(
                f"need fps > 0, max height >= 64 and max seconds > 0; got fps={self.fps}, "
                f"max_height={self.max_height}, max_seconds={self.max_seconds}"
            )


@dataclass(frozen=True, slots=True)
class ClipReport:
    name: str
    source_fps: float
    frames: int
    bad_frames: int
    rest_segments: int
    gesture_ends: int


@dataclass(frozen=True, slots=True)
class PrepareReport:
    avatar_id: str
    path: Path
    width: int
    height: int
    analyzer: str
    clips: tuple[ClipReport, ...]
    up_to_date: bool = False  # nothing was done: the cached avatar has these inputs

    @property
    def frames(self) -> int:
        return sum(c.frames for c in self.clips)


# --- reading video -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VideoProbe:
    path: Path
    width: int  # after rotation
    height: int
    seconds: float  # container's estimate; 0 when unknown


def probe_video(path: Path) -> VideoProbe:
    """Size (as displayed) and duration; PrepareError for unreadable files and huge videos.

    The first frame is decoded too: it tells the display rotation and proves
    the stream decodes before any long work starts.
    """
    if not path.is_file():
        raise PrepareError(f"{path}: no such file")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise PrepareError(f"{path}: no video stream")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            if width * height > MAX_SOURCE_PIXELS:
                raise PrepareError(
                    f"{path}: {width}x{height} is larger than 3840x2160; downscale it first "
                    "(for example ffmpeg -i IN -vf scale=-2:1080 OUT)"
                )
            seconds = 0.0
            if stream.duration is not None and stream.time_base is not None:
                seconds = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                seconds = container.duration / 1e6
            first = next(iter(container.decode(stream)), None)
    except av.error.FFmpegError as exc:
        raise PrepareError(f"{path}: not a readable video ({exc.strerror or exc})") from None
    if first is None:
        raise PrepareError(f"{path}: no frame could be decoded")
    height, width = _picture(first).shape[:2]
    return VideoProbe(path, width, height, seconds)


def read_frames(path: Path, fps: int) -> Iterator[tuple[Frame, float]]:
    """RGB frames resampled to `fps` by presentation time, with the source rate seen so far.

    Output frame k shows the source frame on screen at t0 + k / fps.
    PrepareError for undecodable data, missing or backward timestamps, and
    variable frame rates that resampling cannot hide (stalls, very low rates).
    """
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as exc:
        raise PrepareError(f"{path}: not a readable video ({exc.strerror or exc})") from None
    with container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        current: Frame | None = None
        times: list[float] = []
        k = 0
        try:
            for frame in container.decode(stream):
                if frame.pts is None or frame.time_base is None:
                    raise PrepareError(f"{path}: frames without timestamps; remux it (ffmpeg -i "
                                       "IN -c copy OUT.mp4)")
                t = float(frame.pts * frame.time_base)
                if times and t <= times[-1]:
                    raise PrepareError(f"{path}: timestamps go backwards at {t:.3f} s")
                if times:
                    _check_interval(path, times, t)
                if current is not None:
                    while times[0] + k / fps < t:
                        yield current, _rate(times)
                        k += 1
                times.append(t)
                current = _picture(frame)
        except av.error.FFmpegError as exc:
            raise PrepareError(f"{path}: corrupt video data ({exc.strerror or exc})") from None
        if current is None:
            raise PrepareError(f"{path}: no frame could be decoded")
        # The last frame lasts one typical interval.
        end = times[-1] + (float(np.median(np.diff(times))) if len(times) > 1 else 1.0 / fps)
        while times[0] + k / fps < end - 1e-6:
            yield current, _rate(times)
            k += 1


def _picture(frame: av.VideoFrame) -> Frame:
    rgb = frame.to_ndarray(format="rgb24")  # (H, W, 3)
    turns = round(frame.rotation / 90) % 4 if frame.rotation else 0
    # Display matrix rotation is counter-clockwise in degrees.
    return np.ascontiguousarray(np.rot90(rgb, turns) if turns else rgb)


def _rate(times: list[float]) -> float:
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0


def _check_interval(path: Path, times: list[float], t: float) -> None:
    gap = t - times[-1]
    if len(times) >= 3:
        typical = float(np.median(np.diff(times[-50:])))
        if gap > _STALL_S and gap > 3 * typical:
            raise PrepareError(
                f"{path}: variable frame rate: no frame for {gap:.2f} s at {times[-1]:.2f} s "
                "(typical gap {:.0f} ms); re-encode at a constant rate (ffmpeg -i IN -vf fps=25 "
                "OUT.mp4)".format(typical * 1000)
            )
    if len(times) == 10 and _rate([*times, t]) < MIN_SOURCE_FPS:
        raise PrepareError(
            f"{path}: {_rate([*times, t]):.1f} frames per second; need at least {MIN_SOURCE_FPS:g}"
        )


# --- one clip ------------------------------------------------------------------


@dataclass
class _Spool:
    """Raw frames appended to a file, mapped as one (N, *shape) array at the end."""

    path: Path
    shape: tuple[int, ...]
    count: int = 0
    _file: Any = field(default=None, repr=False)

    def append(self, value: npt.NDArray[np.uint8]) -> None:
        if self._file is None:
            self._file = open(self.path, "wb")  # noqa: SIM115 - closed by close()
        self._file.write(np.ascontiguousarray(value, np.uint8).tobytes())
        self.count += 1

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self) -> npt.NDArray[np.uint8]:
        self.release()
        if self.count == 0:
            return np.zeros((0, *self.shape), np.uint8)
        return np.memmap(self.path, np.uint8, "r", shape=(self.count, *self.shape))


@dataclass(frozen=True, slots=True)
class _ClipResult:
    name: str
    source_fps: float
    frames: npt.NDArray[np.uint8]  # (N, H, W, 3), memory-mapped spool
    crops: dict[int, npt.NDArray[np.uint8]]  # size -> (N, r, r, 3)
    points: npt.NDArray[np.float32]  # (N, 8, 2) in stored-frame pixels, NaN on bad frames
    box_affines: npt.NDArray[np.float64]  # (N, 2, 3) stored frame -> 256 px box, NaN on bad
    good: npt.NDArray[np.bool_]  # (N,)


class _ClipBuilder:
    """Tracks, aligns and crops one clip frame by frame into disk spools."""

    def __init__(self, probe: VideoProbe, size: tuple[int, int], analyzer: FaceAnalyzer,
                 spool_dir: Path, index: int) -> None:
        width, height = size
        self._size = size
        self._scale = (width / probe.width, height / probe.height)
        self._tracker, self._smoother = FaceTracker(analyzer), AlignSmoother()
        self.frames = _Spool(spool_dir / f"frames_{index}.raw", (height, width, 3))
        self._crops = {r: _Spool(spool_dir / f"crop{r}_{index}.raw", (r, r, 3))
                       for r in CROP_SIZES}
        self._points: list[npt.NDArray[np.float32]] = []
        self._affines: list[npt.NDArray[np.float64]] = []

    def add(self, picture: Frame) -> None:
        sx, sy = self._scale
        face = self._tracker.update(picture)
        if face is None:
            self._smoother.reset()
            self._points.append(np.full((len(FACE_POINTS), 2), np.nan, np.float32))
            self._affines.append(np.full((2, 3), np.nan))
            for r, spool in self._crops.items():
                spool.append(np.zeros((r, r, 3), np.uint8))
        else:
            box_affine = self._smoother.update(face.align)  # source pixels -> 256 px box
            for r, spool in self._crops.items():
                spool.append(warp_crop(picture, box_affine, r))
            self._affines.append(scale_affine(box_affine, sx, sy))
            # Stored pixel centres: x' + 0.5 = (x + 0.5) * sx.
            self._points.append(
                ((face.points + 0.5) * np.array([sx, sy], np.float32) - 0.5).astype(np.float32)
            )
        stored = picture if self._scale == (1.0, 1.0) else np.asarray(
            cv2.resize(picture, self._size, interpolation=cv2.INTER_AREA), np.uint8)
        self.frames.append(stored)

    def release(self) -> None:
        for spool in (self.frames, *self._crops.values()):
            spool.release()

    def finish(self, name: str, source_fps: float) -> _ClipResult:
        points = self._points
        return _ClipResult(
            name=name,
            source_fps=source_fps,
            frames=self.frames.close(),
            crops={r: s.close() for r, s in self._crops.items()},
            points=np.stack(points) if points else np.zeros((0, len(FACE_POINTS), 2), np.float32),
            box_affines=np.stack(self._affines) if self._affines else np.zeros((0, 2, 3)),
            good=np.array([not np.isnan(p).any() for p in points], bool),
        )


def _process_clip(
    probe: VideoProbe,
    size: tuple[int, int],
    analyzer: FaceAnalyzer,
    options: PrepareOptions,
    spool_dir: Path,
    index: int,
    budget_frames: int,
) -> _ClipResult:
    builder = _ClipBuilder(probe, size, analyzer, spool_dir, index)
    source_fps = 0.0
    try:
        for picture, rate in read_frames(probe.path, options.fps):
            source_fps = rate
            if picture.shape[:2] != (probe.height, probe.width):
                raise PrepareError(
                    f"{probe.path}: picture size changes mid-stream "
                    f"({probe.width}x{probe.height} -> {picture.shape[1]}x{picture.shape[0]})"
                )
            if builder.frames.count >= budget_frames:
                raise PrepareError(
                    f"the videos are longer than {options.max_seconds:g} s together; trim them "
                    "or raise --max-seconds"
                )
            builder.add(picture)
    finally:
        builder.release()
    return builder.finish(_clip_name(probe.path, index), source_fps)


def _clip_name(path: Path, index: int) -> str:
    return f"{index}_{path.stem}"[:64]


# --- the whole avatar ---------------------------------------------------------------


def prepare_avatar(
    root: Path,
    avatar_id: str,
    videos: Sequence[Path],
    analyzer: FaceAnalyzer,
    options: PrepareOptions = PrepareOptions(),
    *,
    latent_encoder: LatentEncoder | None = None,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> PrepareReport:
    """Prepare (or replace) avatar `avatar_id` under root from the videos, one clip each."""
    try:
        validate_avatar_id(avatar_id)
    except ValueError as exc:
        raise PrepareError(str(exc)) from None
    if avatar_id == DEFAULT_AVATAR_ID:
        raise PrepareError(
            f"{avatar_id!r} is the built-in avatar, rebuilt by serve; pick another id "
            "(and set avatars.default to it to make it the default)"
        )
    if not videos:
        raise PrepareError("give at least one video")
    say = progress or (lambda _msg: None)
    probes = [probe_video(Path(v)) for v in videos]
    first = probes[0]
    for p in probes[1:]:
        if abs(p.width / p.height - first.width / first.height) > 0.01:
            raise PrepareError(
                f"{p.path} is {p.width}x{p.height} but {first.path} is "
                f"{first.width}x{first.height}: the clips of one avatar share one picture shape"
            )
    total = sum(p.seconds for p in probes)
    if total > options.max_seconds + 1.0:
        raise PrepareError(
            f"the videos are {total:.1f} s together, longer than {options.max_seconds:g} s; "
            "trim them or raise --max-seconds"
        )
    size = _stored_size(first.width, first.height, options.max_height)
    inputs = _input_hash(probes, options, analyzer.name, latent_encoder)
    if not force and _cached_inputs(root, avatar_id) == inputs:
        avatar = load_avatar(root, avatar_id)
        return PrepareReport(avatar_id, root / avatar_id, avatar.width, avatar.height,
                             analyzer.name, (), up_to_date=True)
    _check_disk(root, probes, size, options)
    root.mkdir(parents=True, exist_ok=True)
    spool_dir = Path(tempfile.mkdtemp(prefix=f".tmp-prepare-{avatar_id}-", dir=root))
    try:
        results: list[_ClipResult] = []
        budget = round(options.max_seconds * options.fps)
        for i, probe in enumerate(probes):
            say(f"clip {i}: {probe.path.name} ({probe.width}x{probe.height})")
            result = _process_clip(probe, size, analyzer, options, spool_dir, i, budget)
            budget -= result.good.shape[0]
            _check_clip(probe.path, result, options, analyzer.name)
            results.append(result)
        return _write(root, avatar_id, results, size, analyzer.name, inputs, options,
                      latent_encoder)
    finally:
        shutil.rmtree(spool_dir, ignore_errors=True)


def _stored_size(width: int, height: int, max_height: int) -> tuple[int, int]:
    """Even width and height, at most max_height high, same aspect ratio."""
    h = min(height, max_height)
    w = width * h / height
    return max(2, round(w / 2) * 2), max(2, round(h / 2) * 2)


def _check_clip(path: Path, result: _ClipResult, options: PrepareOptions, analyzer: str) -> None:
    n = result.good.shape[0]
    if n < options.min_clip_seconds * options.fps:
        raise PrepareError(
            f"{path}: {n / options.fps:.2f} s is too short; each video needs at least "
            f"{options.min_clip_seconds:g} s"
        )
    if not result.good.any():
        raise PrepareError(f"{path}: no face found in any of its {n} frames ({analyzer} detector)")


def _write(
    root: Path,
    avatar_id: str,
    results: list[_ClipResult],
    size: tuple[int, int],
    analyzer: str,
    inputs: str,
    options: PrepareOptions,
    latent_encoder: LatentEncoder | None,
) -> PrepareReport:
    fps = options.fps
    motions: list[ClipMotion] = [
        analyse_motion(r.points, r.good, fps) for r in results
    ]
    infos = tuple(
        ClipInfo(
            name=r.name,
            num_frames=r.good.shape[0],
            rest_segments=m.rest_segments,
            gesture_ends=m.gesture_ends,
            bad_frames=frozenset(np.flatnonzero(~r.good).tolist()),
        )
        for r, m in zip(results, motions, strict=True)
    )
    neutral = choose_neutral(infos, motions, fps)
    try:
        idle = build_idle_loop(infos, neutral, fps, options.idle_seconds)
    except ValueError as exc:
        raise PrepareError(f"cannot build an idle loop: {exc}") from None
    extras: dict[str, npt.NDArray[Any]] = {
        f"mouth_mask_{r}": mouth_mask(r) for r in CROP_SIZES
    }
    clips = []
    for i, (r, m) in enumerate(zip(results, motions, strict=True)):
        clips.append(ClipData(info=infos[i], frames=r.frames, geometry=m.geometry))
        extras.update(_face_extras(i, r, size))
        if latent_encoder is not None:
            extras.update(_latents(i, r, latent_encoder))
    meta = {
        "prepare_version": PREPARE_VERSION,
        "inputs": inputs,
        "analyzer": analyzer,
        "options": asdict(options),
        "sources": [{"clip": r.name, "source_fps": round(r.source_fps, 3)} for r in results],
    }
    extras["prepare_meta"] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), np.uint8)
    path = write_frames_avatar(root, avatar_id, clips, neutral, idle, extras, fps)
    reports = tuple(
        ClipReport(r.name, r.source_fps, info.num_frames, len(info.bad_frames),
                   len(info.rest_segments), len(info.gesture_ends))
        for r, info in zip(results, infos, strict=True)
    )
    return PrepareReport(avatar_id, path, size[0], size[1], analyzer, reports)


def _face_extras(i: int, r: _ClipResult, size: tuple[int, int]) -> dict[str, npt.NDArray[Any]]:
    width, height = size
    n = r.good.shape[0]
    geometries: list[PasteGeometry] = [
        paste_geometry(r.box_affines[f], width, height) if r.good[f] else empty_paste_geometry()
        for f in range(n)
    ]
    mh = max(g.mask.shape[0] for g in geometries)
    mw = max(g.mask.shape[1] for g in geometries)
    masks = np.zeros((n, mh, mw), np.uint8)
    for f, g in enumerate(geometries):
        masks[f, : g.mask.shape[0], : g.mask.shape[1]] = g.mask
    out: dict[str, npt.NDArray[Any]] = {
        f"paste_box_{i}": np.array([g.box for g in geometries], np.int32).reshape(n, 4),
        f"paste_mask_{i}": masks,
    }
    for size_r in CROP_SIZES:
        out[f"crop{size_r}_{i}"] = r.crops[size_r]
        affines = np.zeros((n, 2, 3), np.float32)
        for k in np.flatnonzero(r.good).tolist():
            affines[k] = crop_affine(r.box_affines[k], size_r)
        out[f"affine{size_r}_{i}"] = affines
        out[f"paste_inv{size_r}_{i}"] = np.stack(
            [g.inverse[size_r] for g in geometries]).astype(np.float32)
    return out


def _latents(i: int, r: _ClipResult, encoder: LatentEncoder) -> dict[str, npt.NDArray[Any]]:
    res = encoder.resolution
    if res not in CROP_SIZES:
        raise PrepareError(f"latent encoder resolution {res} is not one of {CROP_SIZES}")
    keep = (mouth_mask(res) > 0)[None, :, :, None]  # (1, r, r, 1): README: face x (mask > 0)
    crops = r.crops[res]
    masked, ref = [], []
    for start in range(0, crops.shape[0], 16):
        batch = np.asarray(crops[start : start + 16])  # (B, r, r, 3)
        masked.append(encoder.encode((batch * keep).astype(np.uint8)))
        ref.append(encoder.encode(batch))
    return {f"latent_masked_{i}": np.concatenate(masked), f"latent_ref_{i}": np.concatenate(ref)}


def _input_hash(probes: Sequence[VideoProbe], options: PrepareOptions, analyzer: str,
                encoder: LatentEncoder | None) -> str:
    h = hashlib.blake2b(digest_size=16)
    described = [PREPARE_VERSION, asdict(options), analyzer,
                 None if encoder is None else encoder.resolution]
    h.update(json.dumps(described, sort_keys=True).encode())
    for p in probes:
        with open(p.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0next\0")
    return h.hexdigest()


def _cached_inputs(root: Path, avatar_id: str) -> str | None:
    path = root / avatar_id / "extras" / "prepare_meta.npy"
    try:
        meta = json.loads(np.load(path, allow_pickle=False).tobytes())
    except (OSError, ValueError):
        return None
    value = meta.get("inputs") if isinstance(meta, dict) else None
    return value if isinstance(value, str) else None


def _check_disk(root: Path, probes: Sequence[VideoProbe], size: tuple[int, int],
                options: PrepareOptions) -> None:
    seconds = min(sum(p.seconds for p in probes), options.max_seconds)
    per_frame = size[0] * size[1] * 3 + sum(r * r * 3 for r in CROP_SIZES) + 256 * 256
    need = int(seconds * options.fps * per_frame * 2)  # spool + cache while writing
    probe_dir = root if root.exists() else next(p for p in root.parents if p.exists())
    free = shutil.disk_usage(probe_dir).free
    if need > free:
        raise PrepareError(
            f"about {need / 1e9:.1f} GB of disk needed under {root}, {free / 1e9:.1f} GB free"
        )


# --- reading back ---------------------------------------------------------------------


class FaceCache:
    """Typed access to a prepared avatar's face extras (crops, affines, paste-back)."""

    def __init__(self, avatar: Avatar) -> None:
        self._extras = avatar.extras
        if "paste_box_0" not in self._extras:
            raise KeyError(f"avatar {avatar.id!r} has no face cache (prepare it from video)")

    def _array(self, name: str) -> npt.NDArray[Any]:
        return np.asarray(self._extras[name])

    def crop(self, ref: SourceRef, size: int) -> Frame:
        return np.asarray(self._array(f"crop{size}_{ref.clip}")[ref.frame], np.uint8)

    def affine(self, ref: SourceRef, size: int) -> npt.NDArray[np.float32]:
        return np.asarray(self._array(f"affine{size}_{ref.clip}")[ref.frame], np.float32)

    def mouth_mask(self, size: int) -> npt.NDArray[np.uint8]:
        return self._array(f"mouth_mask_{size}")

    def paste(self, ref: SourceRef) -> PasteGeometry:
        x0, y0, x1, y1 = (int(v) for v in self._array(f"paste_box_{ref.clip}")[ref.frame])
        mask = self._array(f"paste_mask_{ref.clip}")[ref.frame, : max(y1 - y0, 0),
                                                           : max(x1 - x0, 0)]
        inverse = {
            r: self._array(f"paste_inv{r}_{ref.clip}")[ref.frame].astype(np.float64)
            for r in CROP_SIZES
        }
        return PasteGeometry((x0, y0, x1, y1), inverse, np.ascontiguousarray(mask))

    def latents(self, ref: SourceRef) -> tuple[npt.NDArray[Any], npt.NDArray[Any]] | None:
        """(masked, reference) latents of one frame, when they were cached."""
        masked = self._extras.get(f"latent_masked_{ref.clip}")
        ref_latents = self._extras.get(f"latent_ref_{ref.clip}")
        if masked is None or ref_latents is None:
            return None
        return np.asarray(masked)[ref.frame], np.asarray(ref_latents)[ref.frame]
