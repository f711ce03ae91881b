"""The default avatar: scikit-image's astronaut photo, animated procedurally.

Works out of the box on a CPU machine: the photo ships with scikit-image (no
download), the motion is generated from a seed, and the result is cached as a
"procedural" avatar under `<root>/default`, rebuilt whenever its content hash
(config, fps, format version, picture, motion) changes.

Clip 0 "idle" is a seamless loop that starts (and, one step later, ends) at
the neutral pose; further clips, one per `clip_seconds`, cycle through the
styles calm / emphatic / listening. All motion is small (a few px of sway,
about a degree of roll, nods, a slight lean-in zoom, breathing, blinks) so
that the warp keeps the shoulders and background plausible. Rest segments and
gesture ends are measured on the generated face-point tracks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
from skimage import data as skdata

from agent.config import DefaultAvatarConfig
from media.avatar import Avatar, ClipInfo
from media.avatar_cache import (
    ProceduralAvatarData,
    ProceduralClip,
    cached_content_hash,
    load_avatar,
    procedural_content_hash,
    write_procedural_avatar,
)
from media.prepare_motion import gesture_ends, runs
from media.procedural import MOTION_FIELDS, Motion, ProceduralRig, head_forward
from media.types import FrameSpec, SourceRef

DEFAULT_AVATAR_ID = "default"
IDLE_LOOP_SECONDS = 8.0

# Hand-annotated on the 512 x 512 photo (checked by drawing them), FACE_POINTS order.
_REF_SIZE = 512
_FACE_POINTS_512 = np.array(
    [
        [203.0, 101.5],  # left_eye
        [246.5, 102.5],  # right_eye
        [225.0, 128.0],  # nose_tip
        [202.5, 140.5],  # mouth_left
        [242.0, 140.5],  # mouth_right
        [221.0, 142.5],  # upper_lip (lower edge; she smiles with her upper teeth showing)
        [221.0, 148.5],  # lower_lip (upper edge)
        [221.0, 177.0],  # chin
    ],
    dtype=np.float32,
)
_EYE_SIZE_512 = (11.0, 4.2)  # half width, half height of the eye openings
_PIVOT_512 = (223.0, 205.0)  # base of the neck
_NECK_Y_512 = 200.0
# Head: an ellipse around face and hair, 1 inside r <= _HEAD_INNER, 0 past _HEAD_OUTER.
_HEAD_ELLIPSE_512 = (224.0, 108.0, 84.0, 100.0)
_HEAD_INNER, _HEAD_OUTER = 0.82, 1.1
_BODY_POLYGON_512 = np.array(
    [[15, 512], [25, 330], [80, 255], [150, 190], [300, 190], [350, 250], [372, 330], [380, 512]],
    dtype=np.int32,
)
_BODY_FEATHER_512 = 12.0

# Rest segments: face points within this of neutral, moving slower than this.
_REST_DEVIATION_512 = 2.0
_REST_SPEED_512 = 0.35
_REST_MIN_SECONDS = 0.4
# A gesture: face points faster than _GESTURE_SPEED; it ends below _GESTURE_END_SPEED.
_GESTURE_SPEED_512 = 0.45
_GESTURE_END_SPEED_512 = 0.25
_GESTURE_HOLD_SECONDS = 0.16


@dataclass(frozen=True, slots=True)
class _Style:
    sway_px: float  # head translation amplitude (512 px units)
    roll_deg: float
    nods_per_s: float
    nod_px: float
    zoom: float  # lean-in scale added at the peak of a nod
    tilt_deg: float  # constant roll bias while active (listening)
    rest_every_s: float  # one rest window in the middle per this many seconds


_STYLES: dict[str, _Style] = {
    "calm": _Style(
        sway_px=2.5,
        roll_deg=0.8,
        nods_per_s=0.2,
        nod_px=2.5,
        zoom=0.006,
        tilt_deg=0.0,
        rest_every_s=6.0,
    ),
    "emphatic": _Style(
        sway_px=3.5,
        roll_deg=1.6,
        nods_per_s=0.6,
        nod_px=5.0,
        zoom=0.015,
        tilt_deg=0.0,
        rest_every_s=10.0,
    ),
    "listening": _Style(
        sway_px=1.5,
        roll_deg=0.6,
        nods_per_s=0.25,
        nod_px=3.0,
        zoom=0.004,
        tilt_deg=1.5,
        rest_every_s=5.0,
    ),
}
_STYLE_CYCLE = ("calm", "emphatic", "listening")


def ensure_default_avatar(root: Path, config: DefaultAvatarConfig, fps: int) -> Avatar:
    """The default avatar from the cache under root, built or rebuilt when stale."""
    data = build_default_avatar(config, fps)
    if cached_content_hash(root, DEFAULT_AVATAR_ID) != procedural_content_hash(data):
        write_procedural_avatar(root, DEFAULT_AVATAR_ID, data)
    return load_avatar(root, DEFAULT_AVATAR_ID)


def build_default_avatar(config: DefaultAvatarConfig, fps: int) -> ProceduralAvatarData:
    """Picture, rig and motion of the default avatar (pure: a function of config and fps)."""
    if config.size % 2:
        raise ValueError(f"default avatar size must be even, got {config.size}")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    rig = _astronaut_rig(config.size)
    k = config.size / _REF_SIZE
    rng = np.random.default_rng(config.seed)
    motions: list[tuple[str, tuple[str, ...], Motion]] = [
        ("idle", ("idle",), _idle_motion(fps, k)),
    ]
    for i, seconds in enumerate(config.clip_seconds):
        style = _STYLE_CYCLE[i % len(_STYLE_CYCLE)]
        n = max(round(seconds * fps), 1)
        name = f"{style}_{i // len(_STYLE_CYCLE) + 1}"
        motions.append((name, (style,), _clip_motion(n, fps, k, _STYLES[style], rng)))
    clips = tuple(
        ProceduralClip(info=_measure(name, tags, motion, rig, fps, k), motion=motion)
        for name, tags, motion in motions
    )
    idle = tuple(FrameSpec(SourceRef(0, f)) for f in range(clips[0].info.num_frames))
    return ProceduralAvatarData(
        rig=rig, clips=clips, neutral=SourceRef(0, 0), idle_loop=idle, fps=fps
    )


# --- picture and rig ---------------------------------------------------------


def _astronaut_rig(size: int) -> ProceduralRig:
    # (512, 512, 3) RGB; scikit-image is untyped.
    photo = np.asarray(skdata.astronaut(), dtype=np.uint8)  # type: ignore[no-untyped-call]
    if photo.shape != (_REF_SIZE, _REF_SIZE, 3):
        raise ValueError(f"unexpected astronaut photo shape {photo.shape}")
    k = size / _REF_SIZE
    interp = cv2.INTER_AREA if size < _REF_SIZE else cv2.INTER_CUBIC
    base = np.ascontiguousarray(cv2.resize(photo, (size, size), interpolation=interp), np.uint8)
    head = _ellipse_mask(_REF_SIZE, _HEAD_ELLIPSE_512, _HEAD_INNER, _HEAD_OUTER)
    body = np.zeros((_REF_SIZE, _REF_SIZE), np.float32)
    cv2.fillPoly(body, [_BODY_POLYGON_512], 1.0)
    body = np.asarray(cv2.GaussianBlur(body, (0, 0), _BODY_FEATHER_512), np.float32)
    if size != _REF_SIZE:
        head = np.asarray(
            cv2.resize(head, (size, size), interpolation=cv2.INTER_LINEAR), np.float32
        )
        body = np.asarray(
            cv2.resize(body, (size, size), interpolation=cv2.INTER_LINEAR), np.float32
        )
    # Pixel centres: x_size + 0.5 = (x_512 + 0.5) * k.
    geometry = ((_FACE_POINTS_512 + 0.5) * k - 0.5).astype(np.float32)
    return ProceduralRig(
        base=base,
        geometry=geometry,
        head_mask=np.clip(head, 0.0, 1.0).astype(np.float32),
        body_mask=np.clip(body, 0.0, 1.0).astype(np.float32),
        pivot=(_PIVOT_512[0] * k, _PIVOT_512[1] * k),
        neck_y=_NECK_Y_512 * k,
        eye_size=(_EYE_SIZE_512[0] * k, _EYE_SIZE_512[1] * k),
    )


def _ellipse_mask(
    size: int, ellipse: tuple[float, float, float, float], inner: float, outer: float
) -> npt.NDArray[np.float32]:
    cx, cy, rx, ry = ellipse
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    r = np.sqrt(((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2)
    t = np.clip((outer - r) / (outer - inner), 0.0, 1.0)
    return np.asarray(t * t * (3.0 - 2.0 * t), np.float32)  # smoothstep


# --- motion ------------------------------------------------------------------


def _empty_motion(n: int) -> Motion:
    motion = np.zeros((n, len(MOTION_FIELDS)), np.float32)
    motion[:, MOTION_FIELDS.index("scale")] = 1.0
    return motion


def _idle_motion(fps: int, k: float) -> Motion:
    """A loop of whole periods of T: every term is 0 at t = 0, so frame 0 is neutral."""
    n = round(IDLE_LOOP_SECONDS * fps)
    t = np.arange(n, dtype=np.float64) / n  # one loop = 1
    tau = 2.0 * math.pi
    m = _empty_motion(n)
    m[:, 0] = k * (2.6 * np.sin(tau * t) + 1.0 * np.sin(tau * 3 * t))  # tx
    m[:, 1] = k * (0.8 * np.sin(tau * 2 * t))  # ty
    m[:, 2] = 1.2 * np.sin(tau * t) * np.cos(tau * t)  # roll, deg
    m[:, 3] = 1.0 + 0.006 * 0.5 * (1.0 - np.cos(tau * t))  # slight lean-in, back at the end
    m[:, 4] = k * 1.3 * 0.5 * (1.0 - np.cos(tau * 2 * t))  # two breaths
    for start_s in (2.2, 5.6):
        _add_blink(m, round(start_s * fps), fps)
    return m


def _clip_motion(n: int, fps: int, k: float, style: _Style, rng: np.random.Generator) -> Motion:
    t = np.arange(n, dtype=np.float64) / fps
    env = _activity_envelope(n, fps, style.rest_every_s, rng)  # 0 in rest windows, 1 elsewhere
    m = _empty_motion(n)
    m[:, 0] = k * style.sway_px * env * _smooth_noise(t, rng)
    m[:, 1] = k * 0.4 * style.sway_px * env * _smooth_noise(t, rng)
    m[:, 2] = env * (style.roll_deg * _smooth_noise(t, rng) + style.tilt_deg)
    # Nods: raised-cosine bumps down (and a little lean-in), faded like the sway.
    for start, length in _events(env, fps, style.nods_per_s, (0.45, 0.8), rng):
        bump = 0.5 * (1.0 - np.cos(2.0 * math.pi * np.arange(length) / length))
        bump *= env[start : start + length]
        amp = style.nod_px * rng.uniform(0.7, 1.0)
        m[start : start + length, 1] += k * amp * bump
        m[start : start + length, 2] += rng.uniform(-0.5, 0.5) * bump
        m[start : start + length, 3] += style.zoom * bump
    rate = rng.uniform(0.2, 0.28)
    m[:, 4] = k * 1.3 * 0.5 * (1.0 - np.cos(2.0 * math.pi * rate * t + rng.uniform(0, 6.28)))
    for start, _ in _events(env, fps, 0.3, (0.3, 0.3), rng):
        _add_blink(m, start, fps)
    return m


def _smooth_noise(t: npt.NDArray[np.float64], rng: np.random.Generator) -> npt.NDArray[np.float64]:
    """A sum of slow sinusoids (0.12-0.45 Hz), peak about 1."""
    out = np.zeros_like(t)
    for _ in range(3):
        out += np.sin(2.0 * math.pi * rng.uniform(0.12, 0.45) * t + rng.uniform(0, 6.28))
    return out / 2.0


def _activity_envelope(
    n: int, fps: int, rest_every_s: float, rng: np.random.Generator
) -> npt.NDArray[np.float64]:
    """1 while active, 0 in rest windows (at both ends and one per rest_every_s), 0.3 s ramps."""
    active = np.ones(n, dtype=bool)
    end_rest = round(0.4 * fps)
    active[:end_rest] = False
    active[max(n - end_rest, 0) :] = False
    for _ in range(int(n / fps / rest_every_s)):
        start = int(rng.integers(end_rest, max(n - 3 * fps, end_rest + 1)))
        active[start : start + round(rng.uniform(1.0, 1.6) * fps)] = False
    ramp = max(round(0.3 * fps), 1)
    # Erode the active stretches by the ramp, then smooth with a kernel of the same
    # half width: the envelope is exactly 0 across each rest window.
    near_rest = np.convolve((~active).astype(np.float64), np.ones(2 * ramp + 1), mode="same")
    eroded = (near_rest == 0).astype(np.float64)
    kernel = np.hanning(2 * ramp + 1)
    return np.convolve(eroded, kernel / kernel.sum(), mode="same")


def _events(
    env: npt.NDArray[np.float64],
    fps: int,
    per_s: float,
    seconds: tuple[float, float],
    rng: np.random.Generator,
) -> list[tuple[int, int]]:
    """(start, length) of Poisson events clear of rest windows (env > 0), 0.6 s apart."""
    out: list[tuple[int, int]] = []
    frame = 0
    n = env.shape[0]
    while True:
        frame += max(round(rng.exponential(1.0 / per_s) * fps), round(0.6 * fps))
        length = max(round(rng.uniform(*seconds) * fps), 3)
        if frame + length > n:
            return out
        if (env[frame : frame + length] > 0.0).all():
            out.append((frame, length))
            frame += length


def _add_blink(m: Motion, start: int, fps: int) -> None:
    """Close fast (about 80 ms), open slower (about 160 ms)."""
    profile = np.interp(
        np.arange(round(0.28 * fps) + 1) / fps, [0.0, 0.08, 0.12, 0.28], [0.0, 1.0, 1.0, 0.0]
    )
    col = MOTION_FIELDS.index("blink")
    end = min(start + profile.shape[0], m.shape[0])
    m[start:end, col] = np.maximum(m[start:end, col], profile[: end - start])


# --- measuring the generated motion -------------------------------------------


def face_tracks(motion: Motion, rig: ProceduralRig) -> npt.NDArray[np.float64]:
    """(N, 8, 2) face points of every frame of a clip."""
    pts = rig.geometry.astype(np.float64)
    out = np.empty((motion.shape[0], *pts.shape))
    for f in range(motion.shape[0]):
        fwd = head_forward(motion[f], rig)
        out[f] = pts @ fwd[:, :2].T + fwd[:, 2]
    return out


def _measure(
    name: str, tags: tuple[str, ...], motion: Motion, rig: ProceduralRig, fps: int, k: float
) -> ClipInfo:
    tracks = face_tracks(motion, rig)
    neutral = rig.geometry.astype(np.float64)
    deviation = np.linalg.norm(tracks - neutral, axis=2).max(axis=1)  # (N,)
    step = np.linalg.norm(np.diff(tracks, axis=0), axis=2).max(axis=1)  # (N - 1,)
    speed = np.concatenate([step, step[-1:]]) if step.size else np.zeros(1)
    blink = motion[:, MOTION_FIELDS.index("blink")]
    rest = (deviation <= _REST_DEVIATION_512 * k) & (speed <= _REST_SPEED_512 * k) & (blink == 0)
    return ClipInfo(
        name=name,
        num_frames=motion.shape[0],
        tags=tags,
        rest_segments=runs(rest, max(round(_REST_MIN_SECONDS * fps), 1)),
        gesture_ends=_gesture_ends(speed, k, max(round(_GESTURE_HOLD_SECONDS * fps), 2)),
    )


def _gesture_ends(speed: npt.NDArray[np.float64], k: float, hold: int) -> tuple[int, ...]:
    """After each run above the gesture speed, the first frame that starts `hold` slow frames.

    The hold keeps the turning point of a nod (slow for a frame or two) from
    counting as the end of the gesture.
    """
    fast = speed > _GESTURE_SPEED_512 * k
    slow = speed < _GESTURE_END_SPEED_512 * k
    return gesture_ends(fast, slow, hold)
