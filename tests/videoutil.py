"""Test videos of a person made here: scikit-image's astronaut photo moved by known affines.

No real video of a person can be downloaded, so the tests animate the photo:
still stretches (rest) and one sway-and-nod gesture, written with PyAV in
several containers and codecs. Every frame's true face points are the
hand-annotated points of `media.default_avatar` under that frame's affine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import numpy.typing as npt
from skimage import data as skdata

from media.default_avatar import _FACE_POINTS_512

FACE_CENTRE = (224.0, 130.0)  # rotation centre of the motion, near the nose (512 px photo)

CODECS = {
    "mp4": ("h264", "libx264", {"preset": "ultrafast", "crf": "18"}),
    "webm": ("vp9", "libvpx-vp9", {"deadline": "realtime", "cpu-used": "8", "crf": "24",
                                   "b": "0"}),
    "mkv": ("mpeg4", "mpeg4", {"qscale": "2"}),
}


def astronaut(size: int = 512) -> npt.NDArray[np.uint8]:
    photo = np.asarray(skdata.astronaut(), dtype=np.uint8)  # type: ignore[no-untyped-call]
    if size != 512:
        photo = np.asarray(cv2.resize(photo, (size, size), interpolation=cv2.INTER_AREA), np.uint8)
    return np.ascontiguousarray(photo)


def motion_at(t: float) -> tuple[float, float, float, float]:
    """(tx, ty, angle_deg, scale) at t seconds: still, gesture over [1, 2) s, still after."""
    if not 1.0 <= t < 2.0:
        return 0.0, 0.0, 0.0, 1.0
    u = t - 1.0
    env = math.sin(math.pi * u) ** 2  # 0 with zero speed at both ends
    return 14.0 * env, 6.0 * math.sin(2 * math.pi * u) * env, 4.0 * env, 1.0 + 0.04 * env


def affine_at(t: float, size: int) -> npt.NDArray[np.float64]:
    """(2, 3) photo -> frame affine at time t, for the photo resized to `size`."""
    tx, ty, angle, scale = motion_at(t)
    k = size / 512
    centre = (FACE_CENTRE[0] * k, FACE_CENTRE[1] * k)
    m = np.asarray(cv2.getRotationMatrix2D(centre, angle, scale), np.float64)
    m[:, 2] += np.array([tx * k, ty * k])
    return m


def true_points(t: float, size: int = 512) -> npt.NDArray[np.float64]:
    """(8, 2) hand-annotated FACE_POINTS moved as frame t moves them."""
    k = size / 512
    pts = (_FACE_POINTS_512.astype(np.float64) + 0.5) * k - 0.5
    m = affine_at(t, size)
    return pts @ m[:, :2].T + m[:, 2]


def frame_at(photo: npt.NDArray[np.uint8], t: float) -> npt.NDArray[np.uint8]:
    size = photo.shape[0]
    out = cv2.warpAffine(photo, affine_at(t, size), (size, size), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_REFLECT_101)
    return np.ascontiguousarray(out)


def write_video(
    path: Path,
    frames: Sequence[npt.NDArray[np.uint8]],
    fps: int,
    codec_key: str = "mp4",
    pts: Sequence[int] | None = None,
) -> Path:
    """Encode RGB frames; `pts` in units of 1/(fps * 10) s for irregular timing."""
    _name, encoder, options = CODECS[codec_key]
    h, w = frames[0].shape[:2]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(encoder, rate=fps, options=dict(options))
        assert isinstance(stream, av.VideoStream)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        tick = Fraction(1, fps * 10)
        stream.codec_context.time_base = tick
        for i, picture in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
            frame.pts = (pts[i] if pts is not None else i * 10)
            frame.time_base = tick
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def person_video(
    path: Path,
    seconds: float = 3.0,
    fps: int = 30,
    size: int = 512,
    codec_key: str = "mp4",
    blackout: tuple[int, int] | None = None,
) -> Path:
    """The moving astronaut; frames [a, b) of `blackout` have the head blacked out."""
    photo = astronaut(size)
    frames = []
    for i in range(round(seconds * fps)):
        picture = frame_at(photo, i / fps)
        if blackout is not None and blackout[0] <= i < blackout[1]:
            k = size / 512
            picture = picture.copy()
            picture[int(20 * k) : int(230 * k), int(120 * k) : int(330 * k)] = 0
        frames.append(picture)
    return write_video(path, frames, fps, codec_key)


def still_video(path: Path, picture: npt.NDArray[np.uint8], seconds: float, fps: int = 25
                ) -> Path:
    return write_video(path, [picture] * round(seconds * fps), fps)
