"""Stand-in frames and frame validation for the engine, over a server's avatars.

Both run in render threads (never on the event loop). The stand-in for a
chunk that cannot be shown is its source pictures, blended as the timeline
planned them, with the mouth closed: the head keeps moving as planned and
only the lips stop. (Avatars whose source video shows an open mouth keep
it; the prepared material of the default avatar rests closed.)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from agent.config import ValidationConfig
from agent.validation import Box, Verdict, validate_chunk
from media.avatar import FACE_POINTS, Avatar, Geometry
from media.idle_video import compose
from media.types import Frames, FrameSpec, RenderChunk, RenderResult

_P = {name: i for i, name in enumerate(FACE_POINTS)}


def mouth_box(geometry: Geometry, width: int, height: int) -> Box:
    """Where a renderer may change the picture: the lower face, nose to below the chin,
    a little wider than the cheeks (diffusion renderers repaint all of it)."""
    g = geometry.astype(np.float64)
    eyes = float(np.linalg.norm(g[_P["right_eye"]] - g[_P["left_eye"]]))
    cx = float(g[_P["mouth_left"], 0] + g[_P["mouth_right"], 0]) / 2
    chin = float(g[_P["chin"], 1])
    lips = float(g[_P["upper_lip"], 1] + g[_P["lower_lip"], 1]) / 2
    top = float(g[_P["nose_tip"], 1]) - 0.25 * eyes
    # The jaw drops: the picture changes down to well under the chin.
    bottom = chin + max(0.6 * eyes, 1.4 * (chin - lips)) + 1.0
    half = 1.3 * eyes
    x0, x1 = max(int(cx - half), 0), min(int(np.ceil(cx + half)), width)
    y0, y1 = max(int(top), 0), min(int(np.ceil(bottom)), height)
    return x0, y0, x1, y1


def _geometry(avatar: Avatar, spec: FrameSpec) -> Geometry:
    g = avatar.source.geometry(spec.source)
    if spec.blend_to is None or spec.blend_weight == 0.0:
        return g
    w = spec.blend_weight
    out: Geometry = ((1.0 - w) * g + w * avatar.source.geometry(spec.blend_to)).astype(np.float32)
    return out


class FrameChecks:
    def __init__(self, avatars: Callable[[str], Avatar], config: ValidationConfig) -> None:
        self._avatars = avatars
        self.config = config

    def stand_in(self, chunk: RenderChunk) -> Frames:
        avatar = self._avatars(chunk.avatar)
        return np.stack([compose(avatar, spec) for spec in chunk.frames])  # (F, H, W, 3)

    def validate(self, chunk: RenderChunk, result: RenderResult) -> Verdict:
        """Checks every frame's values and the first and last frames' coherence."""
        avatar = self._avatars(chunk.avatar)
        n = len(chunk.frames)
        picks = [0, n - 1] if n > 1 else [0]
        sources = np.stack([compose(avatar, chunk.frames[i]) for i in picks])  # (2, H, W, 3)
        boxes = [mouth_box(_geometry(avatar, chunk.frames[i]), avatar.width, avatar.height)
                 for i in picks]
        return validate_chunk(result.frames, n, sources, boxes, self.config)
