"""Face detection and landmarks behind one small interface, and a tracker that follows one person.

Analyzers, best first (`make_face_analyzer("auto")` takes the first available):
- "insightface": InsightFace's SCRFD detector and 106-point landmarks, what
  LatentSync was trained with; needs onnxruntime and the user's models in
  `checkpoints/` (`media.face_insight`).
- "dlib": dlib's HOG face detector (built into the library) and the 68-point
  shape predictor of Debian's `libdlib-data` package, run through the
  `dlib-bin` wheel. About 2 px mean error at 512 px on the astronaut photo.
- "haar": OpenCV's Haar face and eye cascades (they ship in the cv2 wheel);
  no landmark model, so the points come from a mean-face template fitted to
  the two detected eyes (or to the face box when the eyes are not found).
  Coarse (several px at 512 px): enough for crops and the CPU mouth, the last
  resort.

Every analyzer returns the same `FaceObservation`: the eight FACE_POINTS and
the three points LatentSync aligns on (eyebrow centres and nose centre).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np
import numpy.typing as npt

from media.avatar import Geometry
from media.types import Frame

Points = npt.NDArray[np.float32]  # (K, 2) x, y pixels

DLIB_MODEL_NAME = "shape_predictor_68_face_landmarks.dat"
# Debian's libdlib-data puts the model here; DLIB_LANDMARKS overrides.
DLIB_MODEL_PATHS = (Path("/usr/share/dlib") / DLIB_MODEL_NAME,)


class FaceModelUnavailable(RuntimeError):
    """An analyzer's library or model file is missing (says what to install)."""


@dataclass(frozen=True, slots=True)
class FaceObservation:
    """One face in one frame, in that frame's pixel coordinates."""

    box: tuple[float, float, float, float]  # x0, y0, x1, y1 (Box)
    score: float  # detector confidence; comparable only within one analyzer
    points: Geometry  # (8, 2) in FACE_POINTS order
    align: Points  # (3, 2) left eyebrow centre, right eyebrow centre, nose centre

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def centre(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2

    def mapped(self, scale: float, dx: float, dy: float) -> FaceObservation:
        """The same face in a frame where this one's point p sits at p / scale + (dx, dy)."""

        def m(p: Points) -> Points:
            return (p / scale + np.array([dx, dy], np.float32)).astype(np.float32)

        x0, y0, x1, y1 = self.box
        box = (x0 / scale + dx, y0 / scale + dy, x1 / scale + dx, y1 / scale + dy)
        return FaceObservation(box, self.score, m(self.points), m(self.align))


Box = tuple[float, float, float, float]  # x0, y0, x1, y1


class FaceAnalyzer(Protocol):
    """Finds faces with landmarks in one RGB frame; holds no per-video state."""

    @property
    def name(self) -> str: ...

    def detect(self, frame: Frame) -> list[FaceObservation]:
        """Every face in the frame, with landmarks."""
        ...

    def landmarks(self, frame: Frame, box: Box, score: float) -> FaceObservation:
        """Landmarks of the face in a box this analyzer's `detect` gave (at another scale)."""
        ...


# --- dlib: HOG detector + 68-point shape predictor -------------------------

# 68-point indices (iBUG 300-W markup) for the FACE_POINTS, in order.
_D68_POINTS: tuple[tuple[int, ...], ...] = (
    tuple(range(36, 42)),  # left_eye: mean of the eye on the image's left
    tuple(range(42, 48)),  # right_eye
    (30,),  # nose_tip
    (48,),  # mouth_left (outer corner)
    (54,),  # mouth_right
    (62,),  # upper_lip: inner upper lip, centre
    (66,),  # lower_lip: inner lower lip, centre
    (8,),  # chin
)
# LatentSync's three alignment points: eyebrow centres (5 points each, as the
# reference averages 5 of InsightFace's) and the nose centre (the centroid of
# the nose, bridge and base, as its commented 13-point variant does).
_D68_ALIGN: tuple[tuple[int, ...], ...] = (
    tuple(range(17, 22)),
    tuple(range(22, 27)),
    tuple(range(27, 36)),
)
# HOG finds faces from about 80 px at upsample 0; detection runs on a copy
# whose longer side is at most this (faces from about 120 px at 1920 wide).
# Pictures smaller than _DLIB_SMALL_SIDE are searched again upsampled once
# (faces from 40 px) when nothing is found at upsample 0.
_DLIB_DETECT_SIDE = 1280
_DLIB_SMALL_SIDE = 400
_DLIB_MIN_SCORE = 0.0


def _mean_points(landmarks: Points, groups: Sequence[Sequence[int]]) -> Points:
    return np.stack([landmarks[list(g)].mean(axis=0) for g in groups]).astype(np.float32)


class DlibAnalyzer:
    """dlib HOG detector + 68-point landmarks (weights from Debian's libdlib-data)."""

    def __init__(self, model_path: Path | None = None) -> None:
        try:
            import dlib
        except ImportError:
            raise FaceModelUnavailable(
                "dlib is not installed (pip install dlib-bin)"
            ) from None
        path = model_path or find_dlib_model()
        if path is None or not path.is_file():
            raise FaceModelUnavailable(
                f"no {DLIB_MODEL_NAME} (apt-get install libdlib-data, or set DLIB_LANDMARKS)"
            )
        self._dlib: Any = dlib
        self._detector: Any = dlib.get_frontal_face_detector()
        self._predictor: Any = dlib.shape_predictor(str(path))

    @property
    def name(self) -> str:
        return "dlib"

    def detect(self, frame: Frame) -> list[FaceObservation]:
        gray = _gray(frame)
        h, w = gray.shape
        scale = min(1.0, _DLIB_DETECT_SIDE / max(h, w))
        small = gray if scale == 1.0 else cv2.resize(
            gray, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA
        )
        rects, scores, _ = self._detector.run(small, 0, _DLIB_MIN_SCORE)
        if not rects and max(small.shape) < _DLIB_SMALL_SIDE:
            rects, scores, _ = self._detector.run(small, 1, _DLIB_MIN_SCORE)
        boxes = [
            (r.left() / scale, r.top() / scale, (r.right() + 1) / scale, (r.bottom() + 1) / scale)
            for r in rects
        ]
        return [self._shape(gray, box, float(s)) for box, s in zip(boxes, scores, strict=True)]

    def landmarks(self, frame: Frame, box: Box, score: float) -> FaceObservation:
        return self._shape(_gray(frame), box, score)

    def _shape(self, gray: npt.NDArray[np.uint8], box: Box, score: float) -> FaceObservation:
        rect = self._dlib.rectangle(
            round(box[0]), round(box[1]), round(box[2]) - 1, round(box[3]) - 1
        )
        shape = self._predictor(gray, rect)
        lm = np.array([[p.x, p.y] for p in shape.parts()], np.float32)  # (68, 2)
        return FaceObservation(
            box, score, _mean_points(lm, _D68_POINTS), _mean_points(lm, _D68_ALIGN)
        )


def _gray(frame: Frame) -> npt.NDArray[np.uint8]:
    return np.asarray(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY), np.uint8)


def find_dlib_model() -> Path | None:
    env = os.environ.get("DLIB_LANDMARKS")
    candidates = [Path(env)] if env else list(DLIB_MODEL_PATHS)
    return next((p for p in candidates if p.is_file()), None)


# --- OpenCV Haar cascades + mean-face template -------------------------------

# A mean face in eye units: eye centres at (-0.5, 0) and (0.5, 0). Eyes, nose
# and mouth corners are InsightFace's 5-point ArcFace template rescaled; the
# lips sit 0.02 above and below the mouth line (closed); the chin is 0.75 eye
# distances under the mouth (average adult proportions). FACE_POINTS order.
_TEMPLATE = np.array(
    [
        [-0.5, 0.0], [0.5, 0.0], [0.003, 0.571], [-0.407, 1.155], [0.421, 1.155],
        [0.007, 1.135], [0.007, 1.175], [0.007, 1.905],
    ],
    np.float32,
)
# Alignment points on the same scale: eyebrows 0.3 above the eyes, the nose
# centroid halfway between the eye line and the nose tip.
_TEMPLATE_ALIGN = np.array([[-0.5, -0.3], [0.5, -0.3], [0.003, 0.32]], np.float32)
# Where Haar face boxes put the eyes, as fractions of the box (x, y).
_HAAR_EYES = np.array([[0.3, 0.38], [0.7, 0.38]], np.float32)
_HAAR_DETECT_SIDE = 480


class HaarAnalyzer:
    """OpenCV Haar face + eye cascades; points from a mean-face template (coarse)."""

    def __init__(self) -> None:
        base = Path(cv2.data.haarcascades)  # type: ignore[attr-defined]
        self._face = cv2.CascadeClassifier(str(base / "haarcascade_frontalface_alt2.xml"))
        self._eye = cv2.CascadeClassifier(str(base / "haarcascade_eye.xml"))
        if self._face.empty() or self._eye.empty():
            raise FaceModelUnavailable(f"OpenCV Haar cascades missing under {base}")

    @property
    def name(self) -> str:
        return "haar"

    def detect(self, frame: Frame) -> list[FaceObservation]:
        gray = np.asarray(cv2.equalizeHist(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)), np.uint8)
        h, w = gray.shape
        scale = min(1.0, _HAAR_DETECT_SIDE / max(h, w))
        small = gray if scale == 1.0 else cv2.resize(
            gray, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA
        )
        min_side = max(24, round(min(small.shape) * 0.08))
        rects, _, weights = self._face.detectMultiScale3(
            small, 1.1, 4, minSize=(min_side, min_side), outputRejectLevels=True
        )
        out = []
        for (x, y, bw, bh), weight in zip(np.asarray(rects).reshape(-1, 4), np.ravel(weights),
                                          strict=True):
            box = (x / scale, y / scale, (x + bw) / scale, (y + bh) / scale)
            out.append(self._fit(gray, box, float(weight)))
        return out

    def landmarks(self, frame: Frame, box: Box, score: float) -> FaceObservation:
        gray = np.asarray(cv2.equalizeHist(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)), np.uint8)
        return self._fit(gray, box, score)

    def _fit(self, gray: npt.NDArray[np.uint8], box: Box, score: float) -> FaceObservation:
        points, align = _fit_template(self._eyes(gray, box))
        return FaceObservation(box, score, points, align)

    def _eyes(self, gray: npt.NDArray[np.uint8], box: Box) -> Points:
        """Centres of the two eyes: detected when a plausible pair is found, else from the box."""
        x0, y0, x1, y1 = (round(v) for v in box)
        bw, bh = x1 - x0, y1 - y0
        guess = (_HAAR_EYES * np.array([bw, bh], np.float32) + np.array([x0, y0], np.float32))
        top = gray[max(y0 + bh // 6, 0) : max(y0 + bh * 11 // 20, 0), max(x0, 0) : max(x1, 0)]
        if top.size == 0:
            return guess.astype(np.float32)
        min_eye = max(8, bw // 10)
        found = self._eye.detectMultiScale(top, 1.1, 3, minSize=(min_eye, min_eye),
                                           maxSize=(bw // 3, bw // 3))
        oy = max(y0 + bh // 6, 0)
        centres = [(ex + ew / 2 + max(x0, 0), ey + eh / 2 + oy)
                   for ex, ey, ew, eh in np.asarray(found).reshape(-1, 4)]
        left = [c for c in centres if c[0] < x0 + bw / 2]
        right = [c for c in centres if c[0] >= x0 + bw / 2]
        best: tuple[float, Points] | None = None
        for a in left:
            for b in right:
                # A pair: level within 15% of the box, 25-60% of the box apart.
                if abs(a[1] - b[1]) > 0.15 * bh or not 0.25 * bw < b[0] - a[0] < 0.6 * bw:
                    continue
                pair = np.array([a, b], np.float32)
                cost = float(np.abs(pair - guess).sum())
                if best is None or cost < best[0]:
                    best = (cost, pair)
        return guess.astype(np.float32) if best is None else best[1]


def _fit_template(eyes: Points) -> tuple[Geometry, Points]:
    """The template's points under the similarity that puts its eyes on `eyes`."""
    centre = eyes.mean(axis=0)
    d = eyes[1] - eyes[0]
    # (x, y) -> centre + x * d + y * perp(d), perp pointing down the face.
    basis = np.array([[d[0], -d[1]], [d[1], d[0]]], np.float32)  # columns: d, perp(d)
    points = (_TEMPLATE @ basis.T + centre).astype(np.float32)
    align = (_TEMPLATE_ALIGN @ basis.T + centre).astype(np.float32)
    return points, align


# --- choosing an analyzer ----------------------------------------------------

ANALYZERS = ("auto", "insightface", "dlib", "haar")


def make_face_analyzer(name: str, checkpoints: Path = Path("checkpoints")) -> FaceAnalyzer:
    """The named analyzer, or with "auto" the best one available; FaceModelUnavailable."""
    if name not in ANALYZERS:
        raise ValueError(f"unknown face analyzer {name!r}; choose from {', '.join(ANALYZERS)}")
    if name in ("auto", "insightface"):
        from media.face_insight import InsightFaceAnalyzer

        try:
            return InsightFaceAnalyzer.from_checkpoints(checkpoints)
        except FaceModelUnavailable:
            if name == "insightface":
                raise
    if name in ("auto", "dlib"):
        try:
            return DlibAnalyzer()
        except FaceModelUnavailable:
            if name == "dlib":
                raise
    return HaarAnalyzer()


# --- following one person through a video -------------------------------------

# The region searched around the last position is scaled so that the face is
# this wide: large enough for every detector, small enough to be fast.
_ROI_FACE_PX = 110
_ROI_MARGIN = 0.8  # region = face box grown by this many face widths on each side
_MIN_IOU = 0.3
_REACQUIRE_FRAMES = 25  # after this many misses any face may be taken again


class FaceTracker:
    """Follows one person: the largest, most central face first, then the one nearest it.

    Each frame is searched first in a region around the last position (small
    and fast), then, when that misses, over the whole frame; a face far from
    the last position is taken only after `_REACQUIRE_FRAMES` misses. A face
    found over the whole frame is measured again in its region, so every
    point of the track comes from the same path.
    Sans-I/O: one `update` per frame, in order.
    """

    def __init__(self, analyzer: FaceAnalyzer) -> None:
        self._analyzer = analyzer
        self._last: FaceObservation | None = None
        self._misses = 0

    def update(self, frame: Frame) -> FaceObservation | None:
        last = self._last
        if last is not None and self._misses == 0:
            found = _best_overlap(self._search_near(frame, last), last)
            if found is not None:
                self._last = found
                return found
        faces = self._analyzer.detect(frame)
        if last is None or self._misses >= _REACQUIRE_FRAMES:
            chosen = _most_prominent(faces, frame.shape[1], frame.shape[0])
        else:
            chosen = _best_overlap(faces, last) or _nearest(faces, last)
        if chosen is None:
            self._misses += 1
            return None
        # Measured again the way the following frames will be (in the region
        # around it), so the track has no step where it switches to that path.
        chosen = _best_overlap(self._search_near(frame, chosen), chosen) or chosen
        self._last, self._misses = chosen, 0
        return chosen

    def _search_near(self, frame: Frame, last: FaceObservation) -> list[FaceObservation]:
        h, w = frame.shape[:2]
        x0, y0, x1, y1 = last.box
        pad = _ROI_MARGIN * last.width
        rx0, ry0 = max(int(x0 - pad), 0), max(int(y0 - pad), 0)
        rx1, ry1 = min(int(math.ceil(x1 + pad)), w), min(int(math.ceil(y1 + pad)), h)
        roi = frame[ry0:ry1, rx0:rx1]
        scale = _ROI_FACE_PX / max(last.width, 1.0)
        if abs(scale - 1.0) > 0.1:
            size = (max(round(roi.shape[1] * scale), 1), max(round(roi.shape[0] * scale), 1))
            interp = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
            roi = np.asarray(cv2.resize(roi, size, interpolation=interp), np.uint8)
        else:
            scale = 1.0
        found = [f.mapped(scale, rx0, ry0)
                 for f in self._analyzer.detect(np.ascontiguousarray(roi))]
        if scale < 1.0:  # landmarks at full resolution, not at the reduced scale
            found = [self._analyzer.landmarks(frame, f.box, f.score) for f in found]
        return found


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _best_overlap(faces: list[FaceObservation], last: FaceObservation) -> FaceObservation | None:
    scored = [(_iou(f.box, last.box), f) for f in faces]
    scored = [(iou, f) for iou, f in scored if iou >= _MIN_IOU]
    return max(scored, key=lambda t: t[0])[1] if scored else None


def _nearest(faces: list[FaceObservation], last: FaceObservation) -> FaceObservation | None:
    """A face of similar size within one face width of the last position."""
    lx, ly = last.centre
    near = []
    for f in faces:
        fx, fy = f.centre
        dist = math.hypot(fx - lx, fy - ly)
        if dist < last.width and 0.6 < f.width / last.width < 1.6:
            near.append((dist, f))
    return min(near, key=lambda t: t[0])[1] if near else None


def _most_prominent(faces: list[FaceObservation], width: int, height: int
                    ) -> FaceObservation | None:
    """Largest and most central: area discounted by the distance from the frame centre.

    Faces scoring under half the best score are left out first: a weak
    detection (a pattern that looks like a face) never wins on size alone.
    """
    if not faces:
        return None
    top = max(f.score for f in faces)
    faces = [f for f in faces if f.score >= 0.5 * top] if top > 0 else faces

    def weight(f: FaceObservation) -> float:
        fx, fy = f.centre
        off = math.hypot((fx - width / 2) / width, (fy - height / 2) / height)  # 0 .. 0.71
        return f.width**2 * (1.0 - off)

    return max(faces, key=weight)

