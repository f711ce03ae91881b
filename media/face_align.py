"""LatentSync's face alignment, crops, mouth mask and paste-back, in numpy and OpenCV.

Alignment (facts in ../shared/manifests/README.md): a similarity transform
from three landmarks (left eyebrow centre, right eyebrow centre, nose centre)
onto a fixed template in a 210 x 280 box (420 x 560 for 512 px), the box
resized to the square crop; the translation is smoothed over frames (0.2
previous + 0.8 current). The 512 px template and box are the 256 px ones
scaled by 2 (as in the reference), so both crops cover the same region of
the frame and share one paste-back box and mask.

Paste-back follows the reference: the crop's rectangle warped back into the
frame, eroded by 2 px, then eroded by twice and blurred by about a twentieth
of its size, so the generated face fades into the frame inside its own
region. Everything that depends only on the source frame (box, inverse
affine, soft mask) is computed once per source frame by `paste_geometry`;
`paste_back` then costs one small warp and one blend per output frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from media.types import Frame

Affine = npt.NDArray[np.float64]  # (2, 3): frame pixel -> crop pixel
Mask = npt.NDArray[np.uint8]

CROP_SIZES = (256, 512)
# The template and box at 256 px (the reference's ratio 2.8 = 256 / 256 * 2.8).
_RATIO_256 = 2.8
TEMPLATE_256 = np.array([[17.0, 20.0], [58.0, 20.0], [37.5, 40.0]]) * _RATIO_256  # (3, 2) in box
BOX_256 = (int(75 * _RATIO_256), int(100 * _RATIO_256))  # (width, height) = (210, 280)
SMOOTH_PREVIOUS = 0.2  # weight of the previous frame's translation
FILL_VALUE = 127  # grey outside the frame, as the reference fills
MASK_PATH = Path(__file__).with_name("face_mask_256.png")  # LatentSync's mask.png


def similarity(src: npt.NDArray[np.floating], dst: npt.NDArray[np.floating]) -> Affine:
    """Least-squares similarity (rotation, uniform scale, translation) taking src onto dst.

    Umeyama's method; a reflection is never returned (the three points of a
    face keep their orientation).
    """
    src64, dst64 = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    mu_s, mu_d = src64.mean(axis=0), dst64.mean(axis=0)
    s, d = src64 - mu_s, dst64 - mu_d
    var_s = float((s**2).sum()) / len(s)
    if var_s < 1e-9:
        raise ValueError("alignment points coincide")
    cov = d.T @ s / len(s)  # (2, 2)
    u, sig, vt = np.linalg.svd(cov)
    sign = np.diag([1.0, float(np.sign(np.linalg.det(u @ vt)) or 1.0)])
    rot = u @ sign @ vt
    scale = float(np.trace(np.diag(sig) @ sign)) / var_s
    lin = scale * rot
    return np.concatenate([lin, (mu_d - lin @ mu_s)[:, None]], axis=1)


class AlignSmoother:
    """Frame-to-box affines of consecutive frames, translation smoothed as the reference does.

    Sans-I/O: `update` once per frame in order; `reset` where the track
    breaks (a frame without a face), so no smoothing crosses a gap.
    """

    def __init__(self) -> None:
        self._translation: npt.NDArray[np.float64] | None = None

    def update(self, align_points: npt.NDArray[np.floating]) -> Affine:
        """(2, 3) affine from the frame to the 210 x 280 box of the 256 px crop."""
        affine = similarity(align_points, TEMPLATE_256)
        if self._translation is not None:
            keep = SMOOTH_PREVIOUS
            affine[:, 2] = keep * self._translation + (1 - keep) * affine[:, 2]
        self._translation = affine[:, 2].copy()
        return affine

    def reset(self) -> None:
        self._translation = None


def _box_size(resolution: int) -> tuple[int, int]:
    k = resolution / 256
    return round(BOX_256[0] * k), round(BOX_256[1] * k)


def crop_affine(box_affine: Affine, resolution: int) -> Affine:
    """(2, 3) frame -> crop pixels for a box affine from `AlignSmoother` (256 px box)."""
    if resolution not in CROP_SIZES:
        raise ValueError(f"crop size must be one of {CROP_SIZES}, got {resolution}")
    bw, bh = _box_size(resolution)
    sx, sy = resolution / bw, resolution / bh
    # cv2.resize maps pixel centres: x' + 0.5 = (x + 0.5) * sx.
    resize = np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5], [0.0, 0.0, 1.0]])
    box = np.vstack([box_affine * (resolution / 256), [0.0, 0.0, 1.0]])
    return np.asarray((resize @ box)[:2], np.float64)


def warp_crop(frame: Frame, box_affine: Affine, resolution: int) -> Frame:
    """(r, r, 3) aligned face: bilinear warp into the box, then a Lanczos resize."""
    bw, bh = _box_size(resolution)
    box = cv2.warpAffine(
        frame, box_affine * (resolution / 256), (bw, bh), flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT, borderValue=(FILL_VALUE,) * 3,
    )
    return np.asarray(
        cv2.resize(box, (resolution, resolution), interpolation=cv2.INTER_LANCZOS4), np.uint8
    )


def mouth_mask(resolution: int) -> Mask:
    """(r, r) uint8 LatentSync mask: 0 over the lower face (regenerated), 255 elsewhere."""
    mask = cv2.imread(str(MASK_PATH), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise FileNotFoundError(f"cannot read {MASK_PATH}")
    if resolution != mask.shape[0]:
        mask = cv2.resize(mask, (resolution, resolution), interpolation=cv2.INTER_LANCZOS4)
    return np.asarray(mask, np.uint8)


def scale_affine(affine: Affine, sx: float, sy: float) -> Affine:
    """The affine for the frame resized by (sx, sy), pixel centres kept: A @ (p' -> p)."""
    unscale = np.array(
        [[1 / sx, 0.0, 0.5 / sx - 0.5], [0.0, 1 / sy, 0.5 / sy - 0.5], [0.0, 0.0, 1.0]]
    )
    return np.asarray(affine @ unscale, np.float64)


# --- paste-back ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PasteGeometry:
    """Where and how a generated crop goes back into one source frame."""

    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in the frame; empty for no face
    inverse: dict[int, Affine]  # crop size -> (2, 3) crop pixel -> box pixel
    mask: Mask  # (y1 - y0, x1 - x0) soft blend weight, 255 = generated face


def paste_geometry(box_affine: Affine, width: int, height: int) -> PasteGeometry:
    """Box, inverse affines and soft mask for one source frame (its `AlignSmoother` affine)."""
    inverses = {
        r: cv2.invertAffineTransform(crop_affine(box_affine, r)).astype(np.float64)
        for r in CROP_SIZES
    }  # crop -> frame
    r = 256
    inverse = inverses[r]
    corners = np.array([[0, 0], [r, 0], [0, r], [r, r]], np.float64) - 0.5
    pts = corners @ inverse[:, :2].T + inverse[:, 2]
    x0, y0 = max(int(math.floor(pts[:, 0].min())), 0), max(int(math.floor(pts[:, 1].min())), 0)
    x1 = min(int(math.ceil(pts[:, 0].max())) + 1, width)
    y1 = min(int(math.ceil(pts[:, 1].max())) + 1, height)
    if x1 - x0 < 4 or y1 - y0 < 4:
        return empty_paste_geometry()
    for inv in inverses.values():
        inv[:, 2] -= (x0, y0)
    ones = np.full((r, r), 255, np.uint8)
    region = cv2.warpAffine(ones, inverse, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    region = cv2.erode(region, np.ones((2, 2), np.uint8))
    edge = int(math.sqrt(float(np.count_nonzero(region > 127)))) // 20
    if edge > 0:
        region = cv2.erode(region, np.ones((2 * edge, 2 * edge), np.uint8))
        size = 2 * edge + 1
        sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8
        region = cv2.GaussianBlur(region, (size, size), sigma)
    return PasteGeometry((x0, y0, x1, y1), inverses, np.asarray(region, np.uint8))


def empty_paste_geometry() -> PasteGeometry:
    zero = np.zeros((2, 3))
    return PasteGeometry((0, 0, 0, 0), {r: zero for r in CROP_SIZES}, np.zeros((0, 0), np.uint8))


def paste_back(frame: Frame, face: Frame, geometry: PasteGeometry, out: Frame | None = None
               ) -> Frame:
    """`frame` with the (r, r, 3) generated face blended in; writes into `out` when given."""
    if out is None:
        out = frame.copy()
    elif out is not frame:
        np.copyto(out, frame)
    x0, y0, x1, y1 = geometry.box
    if x1 <= x0 or y1 <= y0:
        return out
    r = face.shape[0]
    if face.shape != (r, r, 3) or r not in CROP_SIZES:
        raise ValueError(f"face must be (r, r, 3) with r in {CROP_SIZES}, got {face.shape}")
    warped = cv2.warpAffine(face, geometry.inverse[r], (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_REPLICATE)
    region = out[y0:y1, x0:x1]
    m = geometry.mask[:, :, None].astype(np.uint16)  # (h, w, 1)
    blended = (warped.astype(np.uint16) * m + region.astype(np.uint16) * (255 - m) + 127) // 255
    region[...] = blended.astype(np.uint8)
    return out
