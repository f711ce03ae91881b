"""The on-disk avatar cache: `<root>/<avatar_id>/manifest.json` plus kind-specific files.

Kinds:
- "frames": per clip `clip_<i>.npy` (N, H, W, 3) uint8, memory-mapped on load so
  loading takes milliseconds, and `geometry_<i>.npy` (N, 8, 2) float32 in
  FACE_POINTS order; named renderer caches in `extras/<name>.npy`.
- "procedural": `base.png`, `head_mask.png`, `body_mask.png`,
  `base_geometry.npy` and per clip `motion_<i>.npy`; frames are computed on
  demand by `media.procedural.ProceduralSource`.

A write builds the whole avatar in a temporary directory inside `root`
(fsynced, manifest last) and then renames it into place, so no reader ever
sees a partial avatar and a failed write leaves nothing behind. Replacing an
existing avatar swaps it out first: between the two renames the id is briefly
absent (a concurrent load raises AvatarNotFound), never half-written.
`format_version` changes whenever the layout does; older avatars are refused
with a message saying to prepare them again. `content_hash` is a hash of
every input, so a writer can tell whether a cached avatar is current.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from agent.errors import AgentError
from media.avatar import FACE_POINTS, Avatar, ClipInfo, FrameSource, Geometry
from media.procedural import MOTION_FIELDS, Motion, ProceduralRig, ProceduralSource, check_motion
from media.types import Frame, Frames, FrameSpec, SourceRef

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_EXTRA_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_TMP_PREFIX = ".tmp-"


class AvatarCacheError(AgentError):
    """An avatar in the cache is unreadable, inconsistent or from another format."""


class AvatarNotFound(AvatarCacheError, KeyError):
    """No avatar with that id in the cache."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "avatar not found"


def validate_avatar_id(avatar_id: str) -> str:
    """The id unchanged, or ValueError; a valid id is one safe path component."""
    if not isinstance(avatar_id, str) or not _ID_RE.fullmatch(avatar_id):
        raise ValueError(
            f"invalid avatar id {avatar_id!r}: use 1-64 characters of a-z 0-9 _ -, "
            "starting with a letter or digit"
        )
    return avatar_id


@dataclass(frozen=True, slots=True)
class ClipData:
    """One clip of a "frames" avatar as handed to the writer."""

    info: ClipInfo
    frames: Frames  # (N, H, W, 3) uint8
    geometry: npt.NDArray[np.float32]  # (N, 8, 2) float32


@dataclass(frozen=True, slots=True)
class ProceduralClip:
    info: ClipInfo
    motion: Motion  # (N, len(MOTION_FIELDS)) float32


@dataclass(frozen=True, slots=True)
class ProceduralAvatarData:
    """Everything a "procedural" avatar is made of."""

    rig: ProceduralRig
    clips: tuple[ProceduralClip, ...]
    neutral: SourceRef
    idle_loop: tuple[FrameSpec, ...]
    fps: int


def list_avatars(root: Path) -> list[str]:
    """Ids of the complete avatars under root, sorted; [] when root does not exist."""
    if not root.is_dir():
        return []
    return sorted(
        p.name for p in root.iterdir() if _ID_RE.fullmatch(p.name) and (p / MANIFEST).is_file()
    )


def cached_content_hash(root: Path, avatar_id: str) -> str | None:
    """content_hash of a cached avatar of this format version, else None."""
    try:
        manifest = _read_manifest(root / validate_avatar_id(avatar_id))
    except AvatarCacheError:
        return None
    value = manifest.get("content_hash")
    return value if isinstance(value, str) else None


def procedural_content_hash(data: ProceduralAvatarData) -> str:
    meta, arrays = _procedural_parts(data)
    return _hash_inputs("procedural", meta, arrays)


# --- writing -----------------------------------------------------------------


def write_frames_avatar(
    root: Path,
    avatar_id: str,
    clips: Sequence[ClipData],
    neutral: SourceRef,
    idle_loop: Sequence[FrameSpec],
    extras: Mapping[str, npt.NDArray[Any]],
    fps: int,
) -> Path:
    """Write (or replace) a "frames" avatar atomically; returns its directory."""
    validate_avatar_id(avatar_id)
    if not clips:
        raise ValueError("an avatar needs at least one clip")
    height, width = clips[0].frames.shape[1:3]
    for i, clip in enumerate(clips):
        n = clip.info.num_frames
        if clip.frames.shape != (n, height, width, 3) or clip.frames.dtype != np.uint8:
            raise ValueError(
                f"clip {i} frames must be {(n, height, width, 3)} uint8, "
                f"got {clip.frames.shape} {clip.frames.dtype}"
            )
        if clip.geometry.shape != (n, len(FACE_POINTS), 2) or clip.geometry.dtype != np.float32:
            raise ValueError(
                f"clip {i} geometry must be {(n, len(FACE_POINTS), 2)} float32, "
                f"got {clip.geometry.shape} {clip.geometry.dtype}"
            )
    for name in extras:
        if not _EXTRA_RE.fullmatch(name):
            raise ValueError(f"invalid extras name {name!r}")
    infos = tuple(c.info for c in clips)
    _check_refs(avatar_id, infos, neutral, idle_loop, width, height)
    meta = _meta(avatar_id, "frames", fps, width, height, infos, neutral, idle_loop)
    arrays: dict[str, npt.NDArray[Any]] = {}
    for i, clip in enumerate(clips):
        arrays[f"clip_{i}.npy"] = clip.frames
        arrays[f"geometry_{i}.npy"] = clip.geometry
    for name, value in extras.items():
        arrays[f"extras/{name}.npy"] = value
    meta["content_hash"] = _hash_inputs("frames", meta, arrays)

    def fill(tmp: Path) -> None:
        (tmp / "extras").mkdir()
        for rel, value in arrays.items():
            _write_array(tmp / rel, value)

    return _commit(root, avatar_id, meta, fill)


def write_procedural_avatar(root: Path, avatar_id: str, data: ProceduralAvatarData) -> Path:
    """Write (or replace) a "procedural" avatar atomically; returns its directory."""
    validate_avatar_id(avatar_id)
    meta, arrays = _procedural_parts(data)
    meta["id"] = avatar_id
    meta["content_hash"] = _hash_inputs("procedural", meta, arrays)
    rig = data.rig

    def fill(tmp: Path) -> None:
        _write_png(tmp / "base.png", rig.base)
        _write_png(tmp / "head_mask.png", _mask_to_u8(rig.head_mask))
        _write_png(tmp / "body_mask.png", _mask_to_u8(rig.body_mask))
        _write_array(tmp / "base_geometry.npy", rig.geometry)
        for i, clip in enumerate(data.clips):
            _write_array(tmp / f"motion_{i}.npy", clip.motion)

    return _commit(root, avatar_id, meta, fill)


def _procedural_parts(
    data: ProceduralAvatarData,
) -> tuple[dict[str, Any], dict[str, npt.NDArray[Any]]]:
    rig = data.rig
    height, width = rig.base.shape[:2]
    for i, clip in enumerate(data.clips):
        check_motion(clip.motion)
        if clip.motion.shape[0] != clip.info.num_frames:
            raise ValueError(
                f"clip {i} has {clip.info.num_frames} frames but {clip.motion.shape[0]} motion rows"
            )
    infos = tuple(c.info for c in data.clips)
    _check_refs("(procedural)", infos, data.neutral, data.idle_loop, width, height)
    meta = _meta("", "procedural", data.fps, width, height, infos, data.neutral, data.idle_loop)
    meta["procedural"] = {
        "motion_fields": list(MOTION_FIELDS),
        "pivot": list(rig.pivot),
        "neck_y": rig.neck_y,
        "eye_size": list(rig.eye_size),
    }
    arrays: dict[str, npt.NDArray[Any]] = {
        "base.png": rig.base,
        "head_mask.png": _mask_to_u8(rig.head_mask),
        "body_mask.png": _mask_to_u8(rig.body_mask),
        "base_geometry.npy": rig.geometry,
    }
    for i, clip in enumerate(data.clips):
        arrays[f"motion_{i}.npy"] = clip.motion
    return meta, arrays


def _commit(root: Path, avatar_id: str, meta: dict[str, Any], fill: Callable[[Path], None]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    target = root / avatar_id
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{avatar_id}-", dir=root))
    old: Path | None = None
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; an avatar is for every reader
        fill(tmp)
        # The manifest goes last: a directory with a manifest is complete.
        _write_bytes(tmp / MANIFEST, json.dumps(meta, indent=1, sort_keys=True).encode())
        _fsync_dir(tmp)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{avatar_id}-old-", dir=root))
            os.replace(target, old / "avatar")
        os.replace(tmp, target)
        _fsync_dir(root)
    except BaseException:
        if old is not None and not target.exists():
            os.replace(old / "avatar", target)  # put the previous version back
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _write_array(path: Path, value: npt.NDArray[Any]) -> None:
    with open(path, "wb") as f:
        np.save(f, value, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_png(path: Path, image: npt.NDArray[np.uint8]) -> None:
    bgr = image[:, :, ::-1] if image.ndim == 3 else image
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(bgr))
    if not ok:
        raise AvatarCacheError(f"cannot encode {path.name}")
    _write_bytes(path, buf.tobytes())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mask_to_u8(mask: npt.NDArray[np.float32]) -> npt.NDArray[np.uint8]:
    return np.round(np.clip(mask, 0.0, 1.0) * 255.0).astype(np.uint8)


def _meta(
    avatar_id: str,
    kind: str,
    fps: int,
    width: int,
    height: int,
    clips: Sequence[ClipInfo],
    neutral: SourceRef,
    idle_loop: Sequence[FrameSpec],
) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "id": avatar_id,
        "kind": kind,
        "fps": fps,
        "width": width,
        "height": height,
        "clips": [
            {
                "name": c.name,
                "num_frames": c.num_frames,
                "tags": list(c.tags),
                "rest_segments": [list(s) for s in c.rest_segments],
                "gesture_ends": list(c.gesture_ends),
                "bad_frames": sorted(c.bad_frames),
            }
            for c in clips
        ],
        "neutral": _ref_to_json(neutral),
        "idle_loop": [_spec_to_json(s) for s in idle_loop],
    }


def _hash_inputs(kind: str, meta: Mapping[str, Any], arrays: Mapping[str, npt.NDArray[Any]]) -> str:
    h = hashlib.blake2b(digest_size=16)
    described = {k: v for k, v in meta.items() if k not in ("id", "content_hash")}
    h.update(json.dumps([kind, described], sort_keys=True).encode())
    for name in sorted(arrays):
        value = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{value.dtype.str}:{value.shape}".encode())
        h.update(value.data)
    return h.hexdigest()


def _check_refs(
    avatar_id: str,
    clips: tuple[ClipInfo, ...],
    neutral: SourceRef,
    idle_loop: Sequence[FrameSpec],
    width: int,
    height: int,
) -> None:
    # Avatar's own checks (refs in range, even size, non-empty loop).
    Avatar(avatar_id, 1, width, height, clips, neutral, tuple(idle_loop), _NoSource())


class _NoSource:
    """Stands in for pictures while only an avatar's metadata is being validated."""

    def frame(self, ref: SourceRef) -> Frame:
        raise RuntimeError("an avatar built for validation has no pictures")

    def geometry(self, ref: SourceRef) -> Geometry:
        raise RuntimeError("an avatar built for validation has no geometry")


# --- reading -----------------------------------------------------------------


class MappedSource:
    """FrameSource of a "frames" avatar: memory-mapped clips, geometry in memory."""

    def __init__(
        self, clips: Sequence[Frames], geometry: Sequence[npt.NDArray[np.float32]]
    ) -> None:
        self._clips = tuple(clips)
        self._geometry = tuple(geometry)

    def frame(self, ref: SourceRef) -> Frame:
        return np.asarray(self._clips[ref.clip][ref.frame])  # read-only view of the map

    def geometry(self, ref: SourceRef) -> Geometry:
        return np.asarray(self._geometry[ref.clip][ref.frame])


def load_avatar(root: Path, avatar_id: str) -> Avatar:
    """Load a cached avatar (pictures stay on disk); AvatarNotFound / AvatarCacheError."""
    directory = root / validate_avatar_id(avatar_id)
    manifest = _read_manifest(directory)
    try:
        clips = tuple(_clip_info(c) for c in manifest["clips"])
        width, height, fps = int(manifest["width"]), int(manifest["height"]), int(manifest["fps"])
        neutral = _ref_from_json(manifest["neutral"])
        idle_loop = tuple(_spec_from_json(s) for s in manifest["idle_loop"])
        kind = manifest["kind"]
    except (KeyError, TypeError, ValueError) as exc:
        raise AvatarCacheError(f"avatar {avatar_id!r}: malformed manifest ({exc!r})") from None
    extras: dict[str, object] = {}
    source: FrameSource
    try:
        if kind == "frames":
            source = _load_frames(directory, clips, width, height)
            extras_dir = directory / "extras"
            if extras_dir.is_dir():
                for path in sorted(extras_dir.glob("*.npy")):
                    extras[path.stem] = np.load(path, mmap_mode="r", allow_pickle=False)
        elif kind == "procedural":
            source = _load_procedural(directory, manifest, clips, width, height)
        else:
            raise AvatarCacheError(f"unknown avatar kind {kind!r}")
        return Avatar(avatar_id, fps, width, height, clips, neutral, idle_loop, source, extras)
    except (OSError, ValueError, KeyError) as exc:
        raise AvatarCacheError(
            f"avatar {avatar_id!r} in {directory} is unreadable: {exc}"
        ) from None


def _read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise AvatarNotFound(f"no avatar {directory.name!r} in {directory.parent}") from None
    except OSError as exc:
        raise AvatarCacheError(f"cannot read {path}: {exc.strerror}") from None
    try:
        manifest = json.loads(raw)
    except ValueError:
        raise AvatarCacheError(f"{path} is not valid JSON") from None
    if not isinstance(manifest, dict):
        raise AvatarCacheError(f"{path} must hold a JSON object")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise AvatarCacheError(
            f"avatar {directory.name!r} has format version {version}, this build reads "
            f"{FORMAT_VERSION}: prepare it again"
        )
    return manifest


def _load_frames(
    directory: Path, clips: tuple[ClipInfo, ...], width: int, height: int
) -> MappedSource:
    pictures: list[Frames] = []
    geometry: list[npt.NDArray[np.float32]] = []
    for i, info in enumerate(clips):
        frames = np.load(directory / f"clip_{i}.npy", mmap_mode="r", allow_pickle=False)
        geo = np.load(directory / f"geometry_{i}.npy", allow_pickle=False)
        n = info.num_frames
        if frames.shape != (n, height, width, 3) or frames.dtype != np.uint8:
            raise ValueError(
                f"clip_{i}.npy is {frames.shape} {frames.dtype}, want {(n, height, width, 3)} uint8"
            )
        if geo.shape != (n, len(FACE_POINTS), 2) or geo.dtype != np.float32:
            raise ValueError(
                f"geometry_{i}.npy is {geo.shape} {geo.dtype}, "
                f"want {(n, len(FACE_POINTS), 2)} float32"
            )
        pictures.append(frames)
        geometry.append(geo)
    return MappedSource(pictures, geometry)


def _load_procedural(
    directory: Path, manifest: dict[str, Any], clips: tuple[ClipInfo, ...], width: int, height: int
) -> ProceduralSource:
    spec = manifest["procedural"]
    if tuple(spec["motion_fields"]) != MOTION_FIELDS:
        raise ValueError(f"motion fields {spec['motion_fields']} differ from {list(MOTION_FIELDS)}")
    base = _read_png(directory / "base.png", color=True)
    if base.shape != (height, width, 3):
        raise ValueError(f"base.png is {base.shape}, want {(height, width, 3)}")
    rig = ProceduralRig(
        base=base,
        geometry=np.load(directory / "base_geometry.npy", allow_pickle=False),
        head_mask=_read_png(directory / "head_mask.png", color=False).astype(np.float32) / 255.0,
        body_mask=_read_png(directory / "body_mask.png", color=False).astype(np.float32) / 255.0,
        pivot=(float(spec["pivot"][0]), float(spec["pivot"][1])),
        neck_y=float(spec["neck_y"]),
        eye_size=(float(spec["eye_size"][0]), float(spec["eye_size"][1])),
    )
    motions = []
    for i, info in enumerate(clips):
        motion = np.load(directory / f"motion_{i}.npy", allow_pickle=False)
        if motion.shape[0] != info.num_frames:
            raise ValueError(f"motion_{i}.npy has {motion.shape[0]} rows, want {info.num_frames}")
        motions.append(motion)
    return ProceduralSource(rig, motions)


def _read_png(path: Path, *, color: bool) -> npt.NDArray[np.uint8]:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR if color else cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise OSError(f"cannot read image {path.name}")
    return np.ascontiguousarray(image[:, :, ::-1] if color else image, dtype=np.uint8)


def _clip_info(raw: Mapping[str, Any]) -> ClipInfo:
    return ClipInfo(
        name=str(raw["name"]),
        num_frames=int(raw["num_frames"]),
        tags=tuple(str(t) for t in raw["tags"]),
        rest_segments=tuple((int(a), int(b)) for a, b in raw["rest_segments"]),
        gesture_ends=tuple(int(g) for g in raw["gesture_ends"]),
        bad_frames=frozenset(int(b) for b in raw["bad_frames"]),
    )


def _ref_to_json(ref: SourceRef) -> dict[str, int]:
    return {"clip": ref.clip, "frame": ref.frame}


def _ref_from_json(raw: Mapping[str, Any]) -> SourceRef:
    return SourceRef(int(raw["clip"]), int(raw["frame"]))


def _spec_to_json(spec: FrameSpec) -> dict[str, Any]:
    return {
        "source": _ref_to_json(spec.source),
        "blend_to": None if spec.blend_to is None else _ref_to_json(spec.blend_to),
        "blend_weight": spec.blend_weight,
        "speech": spec.speech,
    }


def _spec_from_json(raw: Mapping[str, Any]) -> FrameSpec:
    blend = raw["blend_to"]
    return FrameSpec(
        source=_ref_from_json(raw["source"]),
        blend_to=None if blend is None else _ref_from_json(blend),
        blend_weight=float(raw["blend_weight"]),
        speech=bool(raw["speech"]),
    )
