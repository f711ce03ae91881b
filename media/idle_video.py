"""Pictures of an avatar's idle loop, composed from source frames (shared by all sessions)."""

from __future__ import annotations

import cv2
import numpy as np

from media.avatar import Avatar
from media.types import Frame, FrameSpec


def compose(avatar: Avatar, spec: FrameSpec) -> Frame:
    """The source picture of a spec, blended in image space when it has a blend."""
    a = avatar.source.frame(spec.source)
    if spec.blend_to is None or spec.blend_weight == 0.0:
        return np.ascontiguousarray(a)
    b = avatar.source.frame(spec.blend_to)
    w = spec.blend_weight
    out = cv2.addWeighted(np.ascontiguousarray(a), 1.0 - w, np.ascontiguousarray(b), w, 0.0)
    return np.asarray(out, dtype=np.uint8)


def idle_frames(avatar: Avatar, width: int, height: int) -> list[Frame]:
    frames = [compose(avatar, spec) for spec in avatar.idle_loop]
    if (width, height) != (avatar.width, avatar.height):
        frames = [np.asarray(cv2.resize(f, (width, height), interpolation=cv2.INTER_AREA),
                             dtype=np.uint8) for f in frames]
    return frames
