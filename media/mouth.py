"""Audio-driven mouth for the CPU renderer: per-frame mouth shape from audio, and the warp.

Mouth shape. Frame k's features come from a 40 ms window ending 20 ms past
the frame's end (`LOOKAHEAD_SAMPLES`): the level of the voiced band
(100-2000 Hz, so hisses open the mouth little) opens the mouth, the ratio of
2-4 kHz to 200-1000 Hz energy spreads (high: "ee") or rounds (low: "oo") it.
Attack/release smoothing runs over the `HISTORY_FRAMES` frames before k from
a closed mouth, so a frame's shape is a function of its frame index and the
turn's audio up to 20 ms past it, whatever the chunking. Every window has the
same length and is analysed on its own, so results are bit-identical.

Warp. In a box around the mouth, a smooth backward displacement field opens
the lips: the source is split along the line between the lips, everything
below moves down with the jaw (lens-shaped at the lips, the whole jaw further
down, fading out under the chin), the upper lip lifts a little, the corners
move out (spread) or in (round). The gap between the moved lips is filled
with a dark mouth interior with a hint of teeth, anti-aliased on its edges.
Every displacement fades to zero inside the box, so the box has no seam.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from media.avatar import FACE_POINTS, Geometry
from media.types import Audio, Frame, samples_per_frame

WINDOW_SAMPLES = 640  # 40 ms analysis window
LOOKAHEAD_SAMPLES = 320  # the window ends 20 ms past the frame's end
HISTORY_FRAMES = 16  # smoothing memory; release 0.55 ** 16 < 1e-4
_RATE = 16_000
_ATTACK, _RELEASE, _SPREAD_RATE = 0.7, 0.45, 0.5
_FLOOR_DB, _FULL_DB = -50.0, -16.0  # voiced-band level: closed .. fully open
_RATIO_MID_DB, _RATIO_SPAN_DB = -27.0, 9.0  # high/low band ratio: neutral, +-1 spread
_CLOSED_BELOW = 0.02  # openings under this are exactly closed

_HANN = np.hanning(WINDOW_SAMPLES).astype(np.float32)
_FREQS = np.fft.rfftfreq(WINDOW_SAMPLES, 1.0 / _RATE)
_VOICED = (_FREQS >= 100) & (_FREQS < 2000)
_LOW = (_FREQS >= 200) & (_FREQS < 1000)
_HIGH = (_FREQS >= 2000) & (_FREQS < 4000)
# Parseval with a Hann window: mean power of the window = sum|X|^2 / (N * sum(w^2)) * 2.
_POWER_NORM = 2.0 / (WINDOW_SAMPLES * float(np.sum(_HANN.astype(np.float64) ** 2)))

_P = {name: i for i, name in enumerate(FACE_POINTS)}


@dataclass(frozen=True, slots=True)
class MouthTrack:
    """Mouth shape of consecutive frames."""

    opening: npt.NDArray[np.float32]  # (F,) 0 closed .. 1 wide open
    spread: npt.NDArray[np.float32]  # (F,) -1 rounded .. 1 spread


def mouth_track(audio: Audio, first_frame: int, num_frames: int, fps: int) -> MouthTrack:
    """Mouth shapes of frames [first_frame, first_frame + num_frames) of a turn."""
    spf = samples_per_frame(fps)
    start = first_frame - HISTORY_FRAMES
    feats = np.array(
        [_frame_targets(audio, k, spf) for k in range(start, first_frame + num_frames)],
        dtype=np.float32,
    )  # (HISTORY + F, 2): opening target, spread target
    opening = np.zeros(num_frames, np.float32)
    spread = np.zeros(num_frames, np.float32)
    # Lane j smooths frames (k - HISTORY .. k] for k = first_frame + j from rest.
    for i in range(HISTORY_FRAMES + 1):
        target = feats[i : i + num_frames]  # (F, 2)
        rate = np.where(target[:, 0] > opening, _ATTACK, _RELEASE).astype(np.float32)
        opening = opening + rate * (target[:, 0] - opening)
        spread = spread + np.float32(_SPREAD_RATE) * (target[:, 1] - spread)
    closed = opening < _CLOSED_BELOW
    return MouthTrack(
        opening=np.where(closed, 0.0, opening).astype(np.float32),
        spread=np.where(closed, 0.0, spread).astype(np.float32),
    )


def _frame_targets(audio: Audio, k: int, spf: int) -> tuple[float, float]:
    end = (k + 1) * spf + LOOKAHEAD_SAMPLES
    begin = end - WINDOW_SAMPLES
    if end <= 0 or begin >= audio.shape[0]:
        return 0.0, 0.0
    window = np.zeros(WINDOW_SAMPLES, np.float32)
    lo, hi = max(begin, 0), min(end, audio.shape[0])
    window[lo - begin : hi - begin] = audio[lo:hi]
    power = np.abs(np.fft.rfft(window * _HANN)) ** 2 * _POWER_NORM  # (321,)
    voiced_db = 10.0 * math.log10(float(power[_VOICED].sum()) + 1e-12)
    opening = min(max((voiced_db - _FLOOR_DB) / (_FULL_DB - _FLOOR_DB), 0.0), 1.0)
    ratio_db = 10.0 * math.log10(
        (float(power[_HIGH].sum()) + 1e-12) / (float(power[_LOW].sum()) + 1e-12)
    )
    spread = min(max((ratio_db - _RATIO_MID_DB) / _RATIO_SPAN_DB, -1.0), 1.0)
    return opening, spread * min(1.0, 4.0 * opening)  # no shape without voice


# --- the warp -----------------------------------------------------------------


def _smoothstep(edge0: float, edge1: float, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return np.asarray(t * t * (3.0 - 2.0 * t), np.float32)


def open_mouth(out: Frame, geometry: Geometry, opening: float, spread: float) -> None:
    """Open the mouth of `out` (in place) by `opening` in [0, 1] with `spread` in [-1, 1]."""
    if opening <= 0.0 and spread == 0.0:
        return
    g = geometry.astype(np.float32)
    left, right = g[_P["mouth_left"]], g[_P["mouth_right"]]
    centre = (left + right) / 2.0
    hw = float(np.linalg.norm(right - left)) / 2.0
    eyes = float(np.linalg.norm(g[_P["right_eye"]] - g[_P["left_eye"]]))
    if hw < 1.0 or eyes < 2.0:
        raise ValueError(f"degenerate face geometry (mouth half width {hw:.2f} px)")
    u = (right - left) / (2.0 * hw)  # along the mouth, to the image's right
    v = np.array([-u[1], u[0]], np.float32)  # down the face
    b_gap = float(((g[_P["upper_lip"]] + g[_P["lower_lip"]]) / 2.0 - centre) @ v)
    b_chin = float((g[_P["chin"]] - centre) @ v)
    b_nose = min(float((g[_P["nose_tip"]] - centre) @ v), -2.0)
    below = max(b_chin - b_gap, 4.0)  # lip gap to chin
    drop = opening * 0.21 * eyes  # lower lip moves down this far
    lift = opening * 0.05 * eyes  # upper lip moves up
    # Corners move out (+) or in (-): spreading is subtle, rounding pulls them well in.
    widen = hw * (0.10 * max(spread, 0.0) + 0.22 * min(spread, 0.0) - 0.06 * opening)

    # The box, in mouth coordinates (a along u, b along v), and its image bbox. Every
    # displacement below is zero outside |a| < 2.4 hw, b_nose < b < b_chin + 1.2 below.
    a_max = 2.4 * hw + 1.0
    b_top, b_bot = b_nose - 1.0, b_chin + 1.2 * below + 1.0
    corners = np.array(
        [centre + a * u + b * v for a in (-a_max, a_max) for b in (b_top, b_bot)], np.float32
    )
    h, w = out.shape[:2]
    x0, y0 = np.maximum(np.floor(corners.min(axis=0)).astype(int), 0)
    x1, y1 = np.minimum(np.ceil(corners.max(axis=0)).astype(int) + 1, (w, h))
    if x1 <= x0 or y1 <= y0:
        return
    xs = np.arange(x0, x1, dtype=np.float32) - centre[0]  # (w,)
    ys = np.arange(y0, y1, dtype=np.float32)[:, None] - centre[1]  # (h, 1)
    a = xs * u[0] + ys * u[1]  # (h, w)
    b = xs * v[0] + ys * v[1]

    # Corners: horizontal forward motion, windowed to the lower face.
    reach_b = b * np.where(b > 0, 1.0 / b_chin, -1.0 / b_nose).astype(np.float32)
    rho2 = (a * (1.0 / (2.2 * hw))) ** 2 + reach_b**2
    window = 1.0 - _smoothstep(0.2, 1.0, rho2)
    x = np.clip(a * (1.0 / hw), -1.0, 1.0)
    a_src = a - (widen * x * (1.5 - 0.5 * x * x)) * window  # odd, flat at the corners

    lens = np.maximum(1.0 - (a_src * (1.0 / hw)) ** 2, 0.0)  # 1 mid-mouth, 0 at the corners
    mid = b_gap * lens  # the line between the lips
    top, bot = mid - lift * lens, mid + drop * lens  # edges of the opened gap
    # Above: the upper lip lifts, fading out halfway to the nose.
    b_fade = 0.6 * b_nose
    lift_w = _smoothstep(0.0, 1.0, (b - b_fade) / np.maximum(top - b_fade, 1e-3))
    b_above = b + lift * lens * lift_w
    # Below: lips open lens-shaped; further down the whole jaw drops; under the chin it fades.
    jaw = 1.0 - _smoothstep(0.0, 2.4 * hw, np.abs(a_src))
    t = _smoothstep(0.0, 0.35 * below, b - bot)
    fall = 1.0 - _smoothstep(b_chin, b_chin + 1.2 * below, b)
    b_below = b - drop * (lens + t * (jaw - lens)) * fall
    b_src = np.where(b < mid, b_above, b_below)
    map_x = centre[0] + a_src * u[0] + b_src * v[0]
    map_y = centre[1] + a_src * u[1] + b_src * v[1]
    warped = np.asarray(
        cv2.remap(out, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101), np.uint8
    )
    _paint_gap(warped, b, top, bot, lens, eyes)
    out[y0:y1, x0:x1] = warped


def _paint_gap(
    region: Frame,
    b: npt.NDArray[np.float32],
    top: npt.NDArray[np.float32],
    bot: npt.NDArray[np.float32],
    lens: npt.NDArray[np.float32],
    eyes: float,
) -> None:
    """Fill the opened gap (top < b < bot) with the mouth interior, anti-aliased over a pixel."""
    near = (lens > 0) & (b > top - 1.0) & (b < bot + 1.0)
    rows, cols = np.flatnonzero(near.any(axis=1)), np.flatnonzero(near.any(axis=0))
    if rows.size == 0:
        return
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    b, top, bot, lens = b[box], top[box], bot[box], lens[box]
    alpha = np.clip(np.minimum(b - top, bot - b) + 0.5, 0.0, 1.0) * (lens > 0)
    gap = np.maximum(bot - top, 1e-3)
    rel = np.clip((b - top) / gap, 0.0, 1.0)  # 0 at the upper lip, 1 at the lower
    # Dark throat, a little lighter and redder toward the tongue.
    tongue = 0.6 * _smoothstep(0.45, 1.0, rel) * lens
    # Upper teeth: a light band under the upper lip, fading to the corners.
    teeth_px = np.maximum(np.minimum(0.06 * eyes, 0.3 * gap), 0.5)
    teeth = 0.8 * (1.0 - _smoothstep(0.5, 1.0, (b - top) / teeth_px)) * _smoothstep(0.3, 0.7, lens)
    colour = _THROAT + tongue[..., None] * (_TONGUE - _THROAT)  # (h, w, 3)
    colour += teeth[..., None] * (_TEETH - colour)
    pixels = region[box].astype(np.float32)
    pixels += alpha[..., None] * (colour - pixels)
    region[box] = np.clip(pixels + 0.5, 0, 255).astype(np.uint8)


_THROAT = np.array([38.0, 13.0, 13.0], np.float32)
_TONGUE = np.array([150.0, 62.0, 64.0], np.float32)
_TEETH = np.array([232.0, 225.0, 212.0], np.float32)
