"""Face analyzers on the astronaut photo, the tracker, LatentSync alignment, crops, paste-back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from media.default_avatar import _FACE_POINTS_512
from media.face import (
    DlibAnalyzer,
    FaceAnalyzer,
    FaceModelUnavailable,
    FaceObservation,
    FaceTracker,
    HaarAnalyzer,
    make_face_analyzer,
)
from media.face_align import (
    BOX_256,
    TEMPLATE_256,
    AlignSmoother,
    crop_affine,
    mouth_mask,
    paste_back,
    paste_geometry,
    similarity,
    warp_crop,
)
from tests.videoutil import astronaut

pytestmark = pytest.mark.unit


def _dlib() -> DlibAnalyzer:
    try:
        return DlibAnalyzer()
    except FaceModelUnavailable as exc:
        pytest.skip(str(exc))


def _point_errors(analyzer: FaceAnalyzer) -> np.ndarray:
    faces = analyzer.detect(astronaut())
    assert faces, f"{analyzer.name} found no face on the astronaut photo"
    face = max(faces, key=lambda f: f.score)
    x0, y0, x1, y1 = face.box
    assert x0 < 203 < x1 and y0 < 140 < y1  # the box holds her eyes and mouth
    return np.asarray(np.linalg.norm(face.points - _FACE_POINTS_512, axis=1))  # (8,) px at 512


def test_dlib_points_match_the_hand_annotation() -> None:
    err = _point_errors(_dlib())
    # Face about 90 px wide; measured: mean 1.8 px, worst 3.2 px (the inner lower lip).
    assert err.mean() < 2.5 and err.max() < 4.0, err


def test_haar_template_points_are_coarse_but_on_the_face() -> None:
    err = _point_errors(HaarAnalyzer())
    # Eyes are detected (about 1-2 px); the rest is a mean-face template:
    # measured mean 7.6 px, worst 15 px (mouth corners sit low on her smile).
    assert err[:2].max() < 4.0, err
    assert err.mean() < 10.0 and err.max() < 20.0, err


def test_auto_takes_the_best_available() -> None:
    analyzer = make_face_analyzer("auto")
    try:
        DlibAnalyzer()
    except FaceModelUnavailable:
        assert analyzer.name == "haar"
    else:
        assert analyzer.name in ("insightface", "dlib")
    with pytest.raises(ValueError, match="unknown face analyzer"):
        make_face_analyzer("magic")


def test_no_face_on_a_blank_picture() -> None:
    blank = np.full((240, 320, 3), 90, np.uint8)
    assert HaarAnalyzer().detect(blank) == []
    assert _dlib().detect(blank) == []


def _two_people() -> tuple[np.ndarray, tuple[float, float]]:
    """A 640 x 512 frame: the photo at the centre and a smaller copy at the left edge."""
    photo = astronaut()
    frame = np.full((512, 640, 3), 200, np.uint8)
    frame[:, 64:576] = photo
    small = photo[40:240, 120:330][::2, ::2]  # (100, 105) her head, half size
    frame[300:400, 0:105] = small
    return frame, (224.0 + 64, 130.0)


def test_tracker_keeps_the_same_person() -> None:
    frame, centre = _two_people()
    analyzer = HaarAnalyzer()  # fast; finds both heads
    assert len(analyzer.detect(frame)) >= 2
    tracker = FaceTracker(analyzer)
    first = tracker.update(frame)
    assert first is not None and abs(first.centre[0] - centre[0]) < 30
    # Her face blacked out: the other person is not taken instead.
    hidden = frame.copy()
    hidden[20:230, 120 + 64 : 330 + 64] = 0
    assert tracker.update(hidden) is None
    again = tracker.update(frame)
    assert again is not None and abs(again.centre[0] - centre[0]) < 30


def test_observation_mapping_round_trips() -> None:
    pts = np.arange(16, dtype=np.float32).reshape(8, 2)
    obs = FaceObservation((10, 20, 30, 40), 1.0, pts, pts[:3])
    back = obs.mapped(0.5, 100, 50)
    assert back.box == (120, 90, 160, 130)
    np.testing.assert_allclose(back.points, pts * 2 + [100, 50])


# --- alignment -----------------------------------------------------------------


def _similar(angle: float, scale: float, t: tuple[float, float]) -> np.ndarray:
    c, s = np.cos(angle) * scale, np.sin(angle) * scale
    return np.array([[c, -s, t[0]], [s, c, t[1]]])


def test_similarity_recovers_a_known_transform() -> None:
    src = np.array([[100.0, 120.0], [160.0, 118.0], [131.0, 170.0]])
    m = _similar(0.2, 1.7, (-30.0, 12.0))
    dst = src @ m[:, :2].T + m[:, 2]
    np.testing.assert_allclose(similarity(src, dst), m, atol=1e-9)
    # Mirrored points get the best rotation, never a reflection.
    mirrored = dst * [-1, 1]
    assert np.linalg.det(similarity(src, mirrored)[:, :2]) > 0
    with pytest.raises(ValueError, match="coincide"):
        similarity(np.ones((3, 2)), dst)


def test_smoother_blends_translation_only() -> None:
    pts = TEMPLATE_256 / 2 + 40  # a face at half the template size
    smoother = AlignSmoother()
    first = smoother.update(pts)
    np.testing.assert_allclose(pts @ first[:, :2].T + first[:, 2], TEMPLATE_256, atol=1e-9)
    moved = smoother.update(pts + [10.0, 0.0])
    exact = similarity(pts + [10.0, 0.0], TEMPLATE_256)
    np.testing.assert_allclose(moved[:, :2], exact[:, :2])
    np.testing.assert_allclose(moved[:, 2], 0.2 * first[:, 2] + 0.8 * exact[:, 2])
    smoother.reset()
    np.testing.assert_allclose(smoother.update(pts + [10.0, 0.0]), exact)


@pytest.mark.parametrize("size", [256, 512])
def test_crop_affine_predicts_where_a_point_lands(size: int) -> None:
    frame = np.zeros((400, 500, 3), np.uint8)
    dot = (231.0, 167.0)
    frame[167, 231] = 255
    pts = np.array([[200.0, 150.0], [262.0, 154.0], [229.0, 185.0]])
    box_affine = similarity(pts, TEMPLATE_256)
    crop = warp_crop(frame, box_affine, size)
    assert crop.shape == (size, size, 3)
    gray = crop[:, :, 0].astype(np.float64)
    ys, xs = np.mgrid[0:size, 0:size]
    found = ((xs * gray).sum() / gray.sum(), (ys * gray).sum() / gray.sum())
    expect = crop_affine(box_affine, size) @ [*dot, 1.0]
    assert np.hypot(found[0] - expect[0], found[1] - expect[1]) < 0.6, (found, expect)
    assert BOX_256 == (210, 280)


def test_paste_back_of_the_frames_own_crop_changes_little() -> None:
    frame = astronaut()
    face = HaarAnalyzer().detect(frame)[0]
    box_affine = AlignSmoother().update(face.align)
    geometry = paste_geometry(box_affine, 512, 512)
    x0, y0, x1, y1 = geometry.box
    assert 0 <= x0 < x1 <= 512 and 0 <= y0 < y1 <= 512
    assert geometry.mask.shape == (y1 - y0, x1 - x0)
    for size in (256, 512):
        out = paste_back(frame, warp_crop(frame, box_affine, size), geometry)
        diff = np.abs(out.astype(int) - frame.astype(int))
        assert diff.mean() < 0.5 and np.percentile(diff[y0:y1, x0:x1], 99) < 25
    red = np.zeros((256, 256, 3), np.uint8)
    red[..., 0] = 255
    out = paste_back(frame, red, geometry)
    cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
    assert tuple(out[cy, cx]) == (255, 0, 0)  # the centre is all generated face
    outside = np.ones((512, 512), bool)
    outside[y0:y1, x0:x1] = False
    assert (out[outside] == frame[outside]).all()  # nothing outside the box changes
    # Written in place when asked.
    target = frame.copy()
    assert paste_back(target, red, geometry, out=target) is target
    np.testing.assert_array_equal(target, out)


def test_mouth_mask_covers_the_lower_face() -> None:
    for size in (256, 512):
        mask = mouth_mask(size)
        assert mask.shape == (size, size) and mask.dtype == np.uint8
        assert mask[size // 8, size // 2] == 255  # forehead kept
        assert mask[size * 3 // 4, size // 2] == 0  # mouth and chin regenerated


# --- InsightFace through onnxruntime, on ONNX graphs with known outputs ----------------


def _constant_model(path: Path, input_shape: list[int], outputs: dict[str, np.ndarray]) -> Path:
    """An ONNX model that ignores its input and returns fixed tensors (InsightFace's I/O)."""
    onnx = pytest.importorskip("onnx")
    from onnx import helper, numpy_helper

    nodes = [helper.make_node("Constant", [], [name], value=numpy_helper.from_array(v, name))
             for name, v in outputs.items()]
    graph = helper.make_graph(
        nodes, "fixed",
        [helper.make_tensor_value_info("input.1", onnx.TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, list(v.shape))
         for n, v in outputs.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _scrfd_outputs(boxes: list[tuple[int, int, tuple[float, float, float, float], float]]
                   ) -> dict[str, np.ndarray]:
    """SCRFD's 9 outputs (scores, boxes, keypoints per stride) with given detections.

    Each detection: (stride, anchor index, (left, top, right, bottom) in strides, score).
    """
    out: dict[str, np.ndarray] = {}
    for kind, width in (("score", 1), ("bbox", 4), ("kps", 10)):
        for stride in (8, 16, 32):
            n = (640 // stride) ** 2 * 2
            out[f"{kind}_{stride}"] = np.zeros((n, width), np.float32)
    for stride, anchor, dist, score in boxes:
        out[f"score_{stride}"][anchor, 0] = score
        out[f"bbox_{stride}"][anchor] = dist
    return out


def test_insightface_decodes_boxes_and_landmarks(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from media.face_insight import InsightFaceAnalyzer

    models = tmp_path / "auxiliary" / "models" / "buffalo_l"
    models.mkdir(parents=True)
    # A 320 px frame is letterboxed at scale 2. Anchor 338 of stride 32 sits at
    # (288, 256) in the 640 px input; the face box there is (200, 160)-(360, 360).
    face = (2.75, 3.0, 2.25, 3.25)
    _constant_model(models / "det_10g.onnx", [1, 3, 640, 640], _scrfd_outputs([
        (32, 338, face, 0.9),
        (32, 339, face, 0.7),  # the same face again, one anchor over: suppressed by NMS
        (16, 2 * (5 * 40 + 5), (1.0, 1.0, 1.0, 1.0), 0.6),  # another face at (80, 80), 32 px wide
        (16, 2 * (30 * 40 + 30), (1.0, 1.0, 1.0, 1.0), 0.3),  # under the threshold
    ]))
    rng = np.random.default_rng(3)
    pred = rng.uniform(-0.5, 0.5, (106, 2)).astype(np.float32)
    _constant_model(models / "2d106det.onnx", [1, 3, 192, 192], {"fc1": pred.reshape(1, 212)})
    analyzer = make_face_analyzer("insightface", tmp_path)
    assert isinstance(analyzer, InsightFaceAnalyzer) and analyzer.name == "insightface"
    faces = analyzer.detect(np.zeros((320, 240, 3), np.uint8))
    assert [round(f.score, 2) for f in faces] == [0.9, 0.6]
    np.testing.assert_allclose(faces[0].box, (100, 80, 180, 180), atol=1e-4)
    np.testing.assert_allclose(faces[1].box, (32, 32, 48, 48), atol=1e-4)
    # Landmarks: [-1, 1] in a 192 px crop at 1.5x the box's longer side around its centre.
    scale = 192 / (100 * 1.5)
    expect = ((pred + 1) * 96 - 96) / scale + [140, 130]  # (106, 2) frame pixels
    np.testing.assert_allclose(faces[0].align[0], expect[[43, 48, 49, 51, 50]].mean(0), atol=1e-3)
    np.testing.assert_allclose(faces[0].align[1], expect[101:106].mean(0), atol=1e-3)
    np.testing.assert_allclose(faces[0].align[2], expect[[74, 77, 83, 86]].mean(0), atol=1e-3)
    assert faces[0].points.shape == (8, 2)
    with pytest.raises(FaceModelUnavailable, match="det_10g.onnx"):
        make_face_analyzer("insightface", tmp_path / "elsewhere")
