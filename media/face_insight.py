"""InsightFace's SCRFD detector and 2d106 landmarks through onnxruntime (optional).

This is what LatentSync was trained with (`FaceAnalysis` with the detection
and landmark_2d_106 modules, models under `checkpoints/auxiliary/models/`).
Nothing is downloaded: the user puts `det_10g.onnx` and `2d106det.onnx` (the
buffalo_l pack) there; their licence is InsightFace's (non-commercial
research use for the pretrained models). Needs `onnxruntime` and `onnx` (to
read how the landmark model normalises its input, as InsightFace does).

Pre- and post-processing follow InsightFace's model_zoo: the detector sees
the frame letterboxed into 640 x 640, (x - 127.5) / 128, and decodes
distance-to-anchor boxes and five keypoints per anchor at strides 8, 16, 32
(two anchors each) with NMS at IoU 0.4; the landmark model sees a 192 x 192
crop around the box centre at 1.5x the box's longer side and returns points
in [-1, 1].

The alignment points use LatentSync's exact indices. The eight FACE_POINTS
are taken geometrically from the 106-point groups (contour 0-32, eyes 33-42
and 87-96, mouth 52-71, nose 72-86), so they do not depend on the order of
points inside a group.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from media.face import Box, FaceModelUnavailable, FaceObservation, Points
from media.types import Frame

DET_SIZE = 640
DET_THRESHOLD = 0.5
NMS_IOU = 0.4
_STRIDES = (8, 16, 32)
_ANCHORS = 2
# LatentSync's alignment points in the 106-point markup.
_ALIGN_106 = ((43, 48, 49, 51, 50), (101, 102, 103, 104, 105), (74, 77, 83, 86))
_CONTOUR, _EYE_A, _EYE_B = range(0, 33), range(33, 43), range(87, 97)
_MOUTH, _NOSE = range(52, 72), range(72, 87)
_MODEL_DIRS = ("auxiliary/models/buffalo_l", "auxiliary/models")


class InsightFaceAnalyzer:
    """SCRFD boxes + 2d106 landmarks on onnxruntime's CPU provider."""

    def __init__(self, detector: Path, landmarks: Path) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise FaceModelUnavailable("onnxruntime is not installed") from None
        options = ort.SessionOptions()
        options.log_severity_level = 3
        providers = ["CPUExecutionProvider"]
        self._det: Any = ort.InferenceSession(str(detector), options, providers=providers)
        self._lmk: Any = ort.InferenceSession(str(landmarks), options, providers=providers)
        outputs = self._det.get_outputs()
        if len(outputs) != 9:
            raise FaceModelUnavailable(
                f"{detector.name}: expected SCRFD with keypoints (9 outputs), got {len(outputs)}"
            )
        self._det_outputs = [o.name for o in outputs]
        self._det_input = self._det.get_inputs()[0].name
        lmk_input = self._lmk.get_inputs()[0]
        self._lmk_input = lmk_input.name
        self._lmk_size = int(lmk_input.shape[2])
        self._lmk_mean, self._lmk_std = _landmark_normalisation(landmarks)

    @classmethod
    def from_checkpoints(cls, checkpoints: Path) -> InsightFaceAnalyzer:
        for sub in _MODEL_DIRS:
            d = checkpoints / sub
            det, lmk = d / "det_10g.onnx", d / "2d106det.onnx"
            if det.is_file() and lmk.is_file():
                return cls(det, lmk)
        raise FaceModelUnavailable(
            f"no det_10g.onnx and 2d106det.onnx under {checkpoints}/auxiliary/models/buffalo_l"
        )

    @property
    def name(self) -> str:
        return "insightface"

    def detect(self, frame: Frame) -> list[FaceObservation]:
        return [self.landmarks(frame, box, score) for box, score in self._boxes(frame)]

    def landmarks(self, frame: Frame, box: Box, score: float) -> FaceObservation:
        lm = self._landmarks(frame, np.array(box, np.float64))  # (106, 2)
        align = np.stack([lm[list(g)].mean(axis=0) for g in _ALIGN_106]).astype(np.float32)
        return FaceObservation(box, score, face_points_106(lm), align)

    def _boxes(self, frame: Frame) -> list[tuple[Box, float]]:
        h, w = frame.shape[:2]
        scale = DET_SIZE / max(h, w)
        nh, nw = max(round(h * scale), 1), max(round(w * scale), 1)
        canvas = np.zeros((DET_SIZE, DET_SIZE, 3), np.uint8)
        canvas[:nh, :nw] = cv2.resize(frame, (nw, nh))
        blob = ((canvas.astype(np.float32) - 127.5) / 128.0).transpose(2, 0, 1)[None]  # (1,3,H,W)
        outs = self._det.run(self._det_outputs, {self._det_input: blob})
        boxes, scores = [], []
        for i, stride in enumerate(_STRIDES):
            n = DET_SIZE // stride
            ys, xs = np.mgrid[:n, :n]
            centres = np.repeat(np.stack([xs, ys], -1).reshape(-1, 2) * stride, _ANCHORS, axis=0)
            score = np.asarray(outs[i]).reshape(-1)
            dist = np.asarray(outs[i + 3]).reshape(-1, 4) * stride
            keep = score >= DET_THRESHOLD
            c, d = centres[keep], dist[keep]
            boxes.append(np.concatenate([c - d[:, :2], c + d[:, 2:]], axis=1))
            scores.append(score[keep])
        all_boxes = np.concatenate(boxes) / scale
        all_scores = np.concatenate(scores)
        return [(_box(all_boxes[k]), float(all_scores[k])) for k in _nms(all_boxes, all_scores)]

    def _landmarks(self, frame: Frame, box: npt.NDArray[np.float64]) -> Points:
        size = self._lmk_size
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        s = size / (max(box[2] - box[0], box[3] - box[1]) * 1.5)
        m = np.array([[s, 0.0, size / 2 - cx * s], [0.0, s, size / 2 - cy * s]])
        crop = cv2.warpAffine(frame, m, (size, size), borderValue=(0, 0, 0))
        blob = ((crop.astype(np.float32) - self._lmk_mean) / self._lmk_std).transpose(2, 0, 1)[None]
        pred = np.asarray(self._lmk.run(None, {self._lmk_input: blob})[0]).reshape(-1, 2)[-106:]
        pts = (pred.astype(np.float64) + 1.0) * (size // 2)  # crop pixels
        inv = cv2.invertAffineTransform(m)
        return (pts @ inv[:, :2].T + inv[:, 2]).astype(np.float32)


def _box(v: npt.NDArray[np.float64]) -> Box:
    return float(v[0]), float(v[1]), float(v[2]), float(v[3])


def face_points_106(lm: Points) -> npt.NDArray[np.float32]:
    """The eight FACE_POINTS from 106 landmarks, by geometry within each group."""
    eyes = sorted((lm[list(_EYE_A)].mean(axis=0), lm[list(_EYE_B)].mean(axis=0)),
                  key=lambda p: float(p[0]))
    d = eyes[1] - eyes[0]
    down = np.array([-d[1], d[0]]) / max(float(np.hypot(*d)), 1e-6)  # perpendicular, down
    across = d / max(float(np.hypot(*d)), 1e-6)
    mouth = lm[list(_MOUTH)].astype(np.float64)
    along = mouth @ across
    left, right = mouth[np.argmin(along)], mouth[np.argmax(along)]
    mid = (left + right) / 2
    width = float(np.hypot(*(right - left)))
    # Points on the mouth's centre line, top to bottom: outer upper, inner upper,
    # inner lower, outer lower.
    centre = mouth[np.abs((mouth - mid) @ across) < 0.15 * width]
    centre = centre[np.argsort(centre @ down)]
    if len(centre) >= 4:
        upper, lower = centre[1], centre[-2]
    else:
        upper = lower = mid
    nose = lm[list(_NOSE)].astype(np.float64)
    tip = nose[np.argsort(nose @ down)[-5:]].mean(axis=0)  # the lowest part of the nose
    contour = lm[list(_CONTOUR)].astype(np.float64)
    chin = contour[np.argmax(contour @ down)]
    return np.array([eyes[0], eyes[1], tip, left, right, upper, lower, chin], np.float32)


def _nms(boxes: npt.NDArray[np.float64], scores: npt.NDArray[np.float64]) -> list[int]:
    order = list(np.argsort(-scores))
    keep: list[int] = []
    area = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    while order:
        i = order.pop(0)
        keep.append(int(i))
        rest = np.array(order, int)
        if rest.size == 0:
            break
        xx1 = np.maximum(boxes[i, 0], boxes[rest, 0])
        yy1 = np.maximum(boxes[i, 1], boxes[rest, 1])
        xx2 = np.minimum(boxes[i, 2], boxes[rest, 2])
        yy2 = np.minimum(boxes[i, 3], boxes[rest, 3])
        inter = np.maximum(0.0, xx2 - xx1 + 1) * np.maximum(0.0, yy2 - yy1 + 1)
        iou = inter / (area[i] + area[rest] - inter)
        order = [int(k) for k, o in zip(rest, iou, strict=True) if o <= NMS_IOU]
    return keep


def _landmark_normalisation(path: Path) -> tuple[float, float]:
    """(mean, std) as InsightFace picks them: models that subtract and scale inside take raw."""
    try:
        import onnx
    except ImportError:
        raise FaceModelUnavailable("onnx is not installed (pip install onnx)") from None
    graph = onnx.load(str(path), load_external_data=False).graph
    sub = mul = False
    for i, node in enumerate(graph.node[:8]):
        sub = sub or node.name.startswith(("Sub", "_minus"))
        mul = mul or node.name.startswith(("Mul", "_mul"))
        if i < 3 and node.name == "bn_data":
            sub = mul = True
    return (0.0, 1.0) if sub and mul else (127.5, 128.0)
