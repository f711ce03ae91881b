"""Where a prepared clip rests and where its gestures end, measured on the tracked face points.

Speeds are in eye distances per frame at the avatar rate, so one set of
thresholds holds at any resolution and face size. Head speed combines the
motion of the eyes-and-nose centre, the change of scale and of roll, and is
measured on positions averaged over a few frames so that landmark jitter
does not count as motion.
"Mouth closed" is relative to the clip's own most-closed state (its 10th
percentile of lip gap), since people rest with their lips apart or teeth
showing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from media.avatar import FACE_POINTS, ClipInfo
from media.types import SourceRef
from sessions.idle_loop import IDLE_BLEND_S

# dlib's landmarks on a still face measure under 0.003; Haar's template points
# jitter up to 0.03, so with Haar rest is mostly the calmest-window fallback.
REST_SPEED = 0.008  # head still below this
GESTURE_SPEED = 0.016  # a gesture is faster than this
GESTURE_END_SPEED = 0.008  # and ends where it stays slower than this for GESTURE_HOLD_S
GESTURE_HOLD_S = 0.16
REST_MIN_S = 0.4
MOUTH_CLOSED = 0.05  # lip gap above the clip's most closed, in eye distances
CALM_WINDOW_S = 1.0  # rest window taken when nothing is still enough
_POSE_WINDOW = 9  # frames the head pose is averaged over (centred) before differencing

_P = {name: i for i, name in enumerate(FACE_POINTS)}


@dataclass(frozen=True, slots=True)
class ClipMotion:
    geometry: npt.NDArray[np.float32]  # (N, 8, 2) smoothed, interpolated over bad frames
    speed: npt.NDArray[np.float64]  # (N,) head speed; inf on bad frames
    mouth_gap: npt.NDArray[np.float64]  # (N,) lip gap above the clip's most closed
    roll: npt.NDArray[np.float64]  # (N,) eye-line angle, radians
    rest_segments: tuple[tuple[int, int], ...]
    gesture_ends: tuple[int, ...]
    calm_fallback: bool  # the calmest window was added: nothing was still long enough


def analyse_motion(points: npt.NDArray[np.float32], good: npt.NDArray[np.bool_], fps: int
                   ) -> ClipMotion:
    """Geometry, rest segments and gesture ends of one clip; `points` is NaN on bad frames."""
    n = points.shape[0]
    geometry = smooth_points(fill_gaps(points, good), good)
    eyes = geometry[:, [_P["left_eye"], _P["right_eye"]]].astype(np.float64)  # (N, 2, 2)
    d = eyes[:, 1] - eyes[:, 0]
    iod = np.maximum(np.hypot(d[:, 0], d[:, 1]), 1e-3)  # (N,)
    roll = np.arctan2(d[:, 1], d[:, 0])
    centre = geometry[:, [_P["left_eye"], _P["right_eye"], _P["nose_tip"]]].mean(axis=1)
    # Positions are averaged before differencing: landmark jitter cancels in the
    # average, while averaging per-frame step lengths would keep it.
    pose = np.column_stack([centre, np.log(iod), roll])  # (N, 4)
    pose = np.column_stack([_moving_average(pose[:, k], _POSE_WINDOW) for k in range(4)])
    step = np.zeros(n)
    if n > 1:
        step[1:] = (
            np.hypot(*(np.diff(pose[:, :2], axis=0).T)) / iod[1:]
            + np.abs(np.diff(pose[:, 2]))
            + np.abs(np.diff(pose[:, 3]))
        )
        step[0] = step[1]
    # Frames whose average reaches a bad frame (interpolated points) are not measured.
    bad_near = np.convolve((~good).astype(float), np.ones(_POSE_WINDOW + 1), mode="same") > 0
    speed = np.where(bad_near, np.inf, step)
    gap = (geometry[:, _P["lower_lip"], 1] - geometry[:, _P["upper_lip"], 1]) / iod
    closed = float(np.percentile(gap[good], 10)) if good.any() else 0.0
    mouth_gap = np.maximum(gap - closed, 0.0)
    rest = good & (speed < REST_SPEED) & (mouth_gap < MOUTH_CLOSED)
    segments = runs(rest, max(round(REST_MIN_S * fps), 1))
    calm = False
    if not any(b - a >= _idle_piece(fps) for a, b in segments):
        # Nothing long enough for an idle loop: add the calmest window.
        for a, b in _calmest(speed + mouth_gap, good, fps):
            rest[a:b], calm = True, True
        segments = runs(rest, max(round(REST_MIN_S * fps), 1))
    return ClipMotion(
        geometry=geometry.astype(np.float32),
        speed=speed,
        mouth_gap=mouth_gap,
        roll=roll,
        rest_segments=segments,
        gesture_ends=_gesture_ends(speed, max(round(GESTURE_HOLD_S * fps), 2)),
        calm_fallback=calm,
    )


def fill_gaps(points: npt.NDArray[np.float32], good: npt.NDArray[np.bool_]
              ) -> npt.NDArray[np.float64]:
    """Points linearly interpolated over bad frames (held at the ends); all NaN if none good."""
    out = np.asarray(points, np.float64).copy()
    idx = np.flatnonzero(good)
    if idx.size == 0:
        return np.zeros_like(out)
    frames = np.arange(points.shape[0])
    flat = out.reshape(points.shape[0], -1)
    for c in range(flat.shape[1]):
        flat[:, c] = np.interp(frames, idx, flat[idx, c])
    return flat.reshape(out.shape)


def smooth_points(points: npt.NDArray[np.float64], good: npt.NDArray[np.bool_]
                  ) -> npt.NDArray[np.float64]:
    """A [1, 2, 1] / 4 filter along time inside runs of good frames (no lag, no bleeding)."""
    out = points.copy()
    n = points.shape[0]
    inner = np.zeros(n, bool)
    if n > 2:
        inner[1:-1] = good[1:-1] & good[:-2] & good[2:]
    f = np.flatnonzero(inner)
    out[f] = (points[f - 1] + 2 * points[f] + points[f + 1]) / 4
    return out


def _moving_average(x: npt.NDArray[np.float64], width: int) -> npt.NDArray[np.float64]:
    if x.shape[0] < width:
        return x.copy()
    kernel = np.ones(width) / width
    padded = np.pad(x, (width // 2, width - 1 - width // 2), mode="edge")
    return np.convolve(padded, kernel, mode="valid")


def _idle_piece(fps: int) -> int:
    """The shortest rest piece `build_idle_loop` can use: a crossfade on each side and a frame."""
    return 2 * max(round(IDLE_BLEND_S * fps), 1) + 1


def runs(mask: npt.NDArray[np.bool_], min_len: int) -> tuple[tuple[int, int], ...]:
    """[start, end) ranges of True at least `min_len` long."""
    padded = np.concatenate([[False], mask, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    pairs = zip(edges[0::2].tolist(), edges[1::2].tolist(), strict=True)
    return tuple((a, b) for a, b in pairs if b - a >= min_len)


def _calmest(cost: npt.NDArray[np.float64], good: npt.NDArray[np.bool_], fps: int
             ) -> tuple[tuple[int, int], ...]:
    """The window of good frames with the least mean cost, long enough for an idle loop."""
    length = max(round(CALM_WINDOW_S * fps), _idle_piece(fps))
    n = cost.shape[0]
    if n < length:
        return ()
    finite = np.where(good & np.isfinite(cost), cost, 0.0)
    bad = (~good | ~np.isfinite(cost)).astype(np.int64)
    csum = np.concatenate([[0.0], np.cumsum(finite)])
    cbad = np.concatenate([[0], np.cumsum(bad)])
    totals = csum[length:] - csum[:-length]
    totals[(cbad[length:] - cbad[:-length]) > 0] = np.inf
    start = int(np.argmin(totals))
    return ((start, start + length),) if math.isfinite(totals[start]) else ()


def _gesture_ends(speed: npt.NDArray[np.float64], hold: int) -> tuple[int, ...]:
    """After each run above the gesture speed, the first frame that starts `hold` slow frames."""
    fast = np.isfinite(speed) & (speed > GESTURE_SPEED)
    return gesture_ends(fast, speed < GESTURE_END_SPEED, hold)


def gesture_ends(fast: npt.NDArray[np.bool_], slow: npt.NDArray[np.bool_], hold: int
                 ) -> tuple[int, ...]:
    """After each run of `fast` frames, the first frame that starts `hold` `slow` frames
    (the shared rule of prepared and generated avatars)."""
    ends: list[int] = []
    n = fast.shape[0]
    f = 0
    while f < n:
        if fast[f]:
            g = f
            while g < n and not slow[g : g + hold].all():
                g += 1
            if g + hold <= n:
                ends.append(g)
            f = g
        f += 1
    return tuple(ends)


def choose_neutral(clips: Sequence[ClipInfo], motions: Sequence[ClipMotion], fps: int
                   ) -> SourceRef:
    """The stillest, most closed-mouthed, most upright rest frame; ValueError if none.

    Frames with room for the idle loop's crossfades on both sides inside their
    rest segment come first, so the loop passes through the neutral pose.
    """
    x = max(round(IDLE_BLEND_S * fps), 1)
    best: tuple[bool, float, SourceRef] | None = None
    for c, (clip, motion) in enumerate(zip(clips, motions, strict=True)):
        for lo, hi in clip.rest_segments:
            for f in range(lo, hi):
                if f in clip.bad_frames:
                    continue
                roomy = lo + x <= f < hi - x
                cost = float(motion.speed[f] + motion.mouth_gap[f] + abs(motion.roll[f]))
                key = (not roomy, cost, SourceRef(c, f))
                if best is None or key[:2] < best[:2]:
                    best = key
    if best is None:
        raise ValueError("no rest frame in any clip (nothing still with the mouth closed)")
    return best[2]
