"""Procedural source frames: one still picture animated by per-frame motion parameters.

A frame is the base picture with the eyelids lowered for blinks, then warped
by one smooth backward displacement field: the head (inside a feathered head
mask that is 1 on the whole face) moves by a similarity transform about the
neck pivot, and the person rises with breathing, fading to still at the
picture's bottom edge. A clip costs a few floats per frame; a frame costs
about a millisecond at 512 px.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from media.avatar import FACE_POINTS, Geometry
from media.types import Frame, SourceRef

# Columns of a motion array, per frame. Pixels are at the avatar's resolution.
MOTION_FIELDS: tuple[str, ...] = (
    "tx",  # head translation, px
    "ty",
    "angle_deg",  # head roll about the pivot, counter-clockwise on screen
    "scale",  # head scale about the pivot (1 = rest)
    "breath",  # rise of the shoulders and head, px
    "blink",  # eyelid closure, 0 open .. 1 closed
)
Motion = npt.NDArray[np.float32]  # (N, len(MOTION_FIELDS))
Mask = npt.NDArray[np.float32]  # (H, W) in [0, 1]

_FIELD_STEP = 4  # the displacement field is computed on a grid this much coarser
_LEFT_EYE = FACE_POINTS.index("left_eye")
_RIGHT_EYE = FACE_POINTS.index("right_eye")


@dataclass(frozen=True, slots=True)
class ProceduralRig:
    """The still picture and what is needed to animate it."""

    base: Frame  # (H, W, 3) RGB
    geometry: Geometry  # (8, 2) face points of `base`
    head_mask: Mask  # moves with the head; must be 1 at every face point
    body_mask: Mask  # rises with breathing
    pivot: tuple[float, float]  # head rotation centre (base of the neck), px
    neck_y: float  # above this row the person rises by the full breath
    eye_size: tuple[float, float]  # half width, half height of an eye opening, px

    def __post_init__(self) -> None:
        h, w = self.base.shape[:2]
        if self.base.shape != (h, w, 3) or self.base.dtype != np.uint8:
            raise ValueError(
                f"base must be (H, W, 3) uint8, got {self.base.shape} {self.base.dtype}"
            )
        for name, mask in (("head_mask", self.head_mask), ("body_mask", self.body_mask)):
            if mask.shape != (h, w):
                raise ValueError(f"{name} must be {(h, w)}, got {mask.shape}")
        if self.geometry.shape != (len(FACE_POINTS), 2):
            raise ValueError(f"geometry must be ({len(FACE_POINTS)}, 2), got {self.geometry.shape}")
        xs = np.clip(np.round(self.geometry[:, 0]).astype(int), 0, w - 1)
        ys = np.clip(np.round(self.geometry[:, 1]).astype(int), 0, h - 1)
        if float(self.head_mask[ys, xs].min()) < 0.999:
            raise ValueError("head_mask must be 1 at every face point (the face moves rigidly)")


def check_motion(motion: Motion) -> None:
    if motion.ndim != 2 or motion.shape[1] != len(MOTION_FIELDS) or motion.dtype != np.float32:
        raise ValueError(
            f"motion must be (N, {len(MOTION_FIELDS)}) float32, got {motion.shape} {motion.dtype}"
        )
    if not np.isfinite(motion).all():
        raise ValueError("motion has non-finite values")
    if (motion[:, 3] <= 0.5).any() or (motion[:, 3] >= 2.0).any():
        raise ValueError("motion scale must be in (0.5, 2)")
    if (motion[:, 5] < 0).any() or (motion[:, 5] > 1).any():
        raise ValueError("motion blink must be in [0, 1]")


def head_forward(params: npt.NDArray[np.float32], rig: ProceduralRig) -> npt.NDArray[np.float64]:
    """(2, 3) affine taking a base point on the face to where the frame shows it."""
    tx, ty, angle_deg, scale, breath = (float(v) for v in params[:5])
    a = math.radians(angle_deg)
    # Screen y points down, so a counter-clockwise turn on screen is R(-a).
    c, s = math.cos(a) * scale, math.sin(a) * scale
    lin = np.array([[c, s], [-s, c]])
    pv = np.array(rig.pivot)
    off = pv + np.array([tx, ty - breath]) - lin @ pv
    return np.concatenate([lin, off[:, None]], axis=1)


class ProceduralSource:
    """FrameSource of a procedural avatar; thread-safe (holds no mutable state)."""

    def __init__(self, rig: ProceduralRig, motions: Sequence[Motion]) -> None:
        for motion in motions:
            check_motion(motion)
        self._rig = rig
        self._motions = tuple(motions)
        h, w = rig.base.shape[:2]
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
        # Breathing weight: 1 above the neck, fading to 0 at the bottom edge.
        height_w = np.clip((h - ys) / max(h - rig.neck_y, 1.0), 0.0, 1.0)
        head = rig.head_mask
        breath = np.maximum(head, rig.body_mask) * height_w
        # Only the box where something moves is warped; the rest is a copy.
        moving = (head > 0) | (breath > 1e-3)
        rows, cols = np.flatnonzero(moving.any(axis=1)), np.flatnonzero(moving.any(axis=0))
        if rows.size == 0:
            raise ValueError("procedural rig has nothing that moves (empty masks)")
        margin = 2 * _FIELD_STEP
        y0, y1 = max(int(rows[0]) - margin, 0), min(int(rows[-1]) + 1 + margin, h)
        x0, x1 = max(int(cols[0]) - margin, 0), min(int(cols[-1]) + 1 + margin, w)
        self._box = (y0, y1, x0, x1)
        self._grid = np.ascontiguousarray(np.dstack([xs, ys])[y0:y1, x0:x1])  # (h, w, 2)
        # The field is smooth (affine on the face, feathered masks), so it is
        # computed on a grid _FIELD_STEP times coarser and upsampled linearly.
        # Coarse pixel centres sit where cv2.resize's linear mapping expects them.
        bh, bw = y1 - y0, x1 - x0
        ch, cw = -(-bh // _FIELD_STEP), -(-bw // _FIELD_STEP)
        cy = (np.arange(ch, dtype=np.float32) + 0.5) * (bh / ch) - 0.5 + y0
        cx = (np.arange(cw, dtype=np.float32) + 0.5) * (bw / cw) - 0.5 + x0
        cys, cxs = np.meshgrid(cy, cx, indexing="ij")  # (ch, cw) full-resolution coordinates
        head_c = _sample(head, cxs, cys)
        breath_c = _sample(breath, cxs, cys)
        # (ch, cw, 4): one cv2.transform with a (2, 4) matrix gives the whole field.
        self._basis = np.ascontiguousarray(
            np.dstack([head_c * cxs, head_c * cys, head_c, breath_c])
        )

    def frame(self, ref: SourceRef) -> Frame:
        p = self._motions[ref.clip][ref.frame]
        rig = self._rig
        picture = rig.base
        if p[5] > 0.0:
            picture = rig.base.copy()
            for eye in (_LEFT_EYE, _RIGHT_EYE):
                _lower_lid(picture, rig.geometry[eye], rig.eye_size, float(p[5]))
        fwd = head_forward(p, rig)
        back = cv2.invertAffineTransform(fwd)  # (2, 3): output point -> base point
        # Inside the head mask the sample point is back @ (x, y, 1), which
        # already includes the breath; elsewhere the breath column lifts the
        # person (so the head part subtracts it once).
        breath = float(p[4])
        m = np.array(
            [
                [back[0, 0] - 1.0, back[0, 1], back[0, 2], 0.0],
                [back[1, 0], back[1, 1] - 1.0, back[1, 2] - breath, breath],
            ],
            dtype=np.float32,
        )
        y0, y1, x0, x1 = self._box
        coarse = cv2.transform(self._basis, m)  # (ch, cw, 2) backward displacement
        disp = cv2.resize(coarse, (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
        xy = cv2.add(self._grid, disp)  # (h, w, 2) absolute sample points
        out = picture.copy()
        # One (h, w, 2) float map; the stubs miss that map2 may be None.
        out[y0:y1, x0:x1] = cv2.remap(  # type: ignore[call-overload]
            picture, xy, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101
        )
        return out

    def geometry(self, ref: SourceRef) -> Geometry:
        fwd = head_forward(self._motions[ref.clip][ref.frame], self._rig)
        pts = self._rig.geometry.astype(np.float64)
        return (pts @ fwd[:, :2].T + fwd[:, 2]).astype(np.float32)


def _lower_lid(
    picture: Frame, centre: npt.NDArray[np.float32], size: tuple[float, float], closure: float
) -> None:
    """Slide the upper lid (with its lashes) down over one eye, in place.

    A vertical backward remap inside a small box: rows between the brow and
    the new lid edge are squeezed from the rows between the brow and the old
    lid edge, so skin and lash line come down together and nothing is drawn.
    """
    ex, ey = float(centre[0]), float(centre[1])
    rw, rh = size
    h, w = picture.shape[:2]
    x0, x1 = max(int(ex - rw - 2), 0), min(int(math.ceil(ex + rw + 2)), w)
    brow = ey - 3.5 * rh
    y0, y1 = max(int(brow), 0), min(int(math.ceil(ey + 1.5 * rh)), h)
    if x1 <= x0 or y1 <= y0:
        return
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    arc = np.sqrt(np.clip(1.0 - ((xs - ex) / rw) ** 2, 0.0, 1.0))  # (h, w) lid shape
    lid0 = ey - rh * arc  # upper lid edge in the base picture
    lid1 = lid0 + closure * 1.9 * rh * arc  # where it is now
    squeeze = (lid0 - brow) / np.maximum(lid1 - brow, 1e-3)
    map_y = np.where(ys < lid1, brow + (ys - brow) * squeeze, ys).astype(np.float32)
    map_y = np.where(ys < brow, ys, map_y).astype(np.float32)
    picture[y0:y1, x0:x1] = cv2.remap(
        picture, xs, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101
    )


def _sample(mask: Mask, xs: npt.NDArray[np.float32], ys: npt.NDArray[np.float32]) -> Mask:
    """Bilinear samples of a mask at float points."""
    out = cv2.remap(mask, xs, ys, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return np.asarray(out, dtype=np.float32)
