"""An avatar: source clips of one person, their face geometry, a neutral pose and an idle loop.

The session timeline reads only the metadata (`ClipInfo`, `neutral`,
`idle_loop`); renderers read pictures and geometry through `FrameSource`.
Pictures are never all held in memory: a `FrameSource` computes or maps them
on demand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from media.types import Frame, FrameSpec, SourceRef

# Named face points every avatar provides per source frame, in this order
# (pixel coordinates x, y at the avatar's resolution).
FACE_POINTS: tuple[str, ...] = (
    "left_eye",  # centre of the eye on the image's left
    "right_eye",
    "nose_tip",
    "mouth_left",  # mouth corner on the image's left
    "mouth_right",
    "upper_lip",  # centre of the upper lip's lower edge
    "lower_lip",  # centre of the lower lip's upper edge
    "chin",
)
Geometry = npt.NDArray[np.float32]  # (len(FACE_POINTS), 2)


@dataclass(frozen=True, slots=True)
class ClipInfo:
    """One source clip as the timeline sees it."""

    name: str
    num_frames: int
    tags: tuple[str, ...] = ()
    # [start, end) frame ranges of low motion with the mouth closed: good
    # places to enter or leave the clip and to draw idle material from.
    rest_segments: tuple[tuple[int, int], ...] = ()
    # Frame indices where a gesture ends: natural exits.
    gesture_ends: tuple[int, ...] = ()
    # Frames with no usable face; the timeline avoids them.
    bad_frames: frozenset[int] = frozenset()


class FrameSource(Protocol):
    """Pictures and face geometry of an avatar's source frames."""

    def frame(self, ref: SourceRef) -> Frame: ...

    def geometry(self, ref: SourceRef) -> Geometry: ...


@dataclass(frozen=True, slots=True)
class Avatar:
    """Everything the server knows about one avatar, loaded once and shared read-only."""

    id: str
    fps: int
    width: int
    height: int
    clips: tuple[ClipInfo, ...]
    neutral: SourceRef  # at rest, mouth closed, facing the camera
    # A seamless loop of idle frames; idle_loop[0] shows the neutral pose so
    # that turns end into it and idle video can start at a keyframe there.
    idle_loop: tuple[FrameSpec, ...]
    source: FrameSource
    # Renderer-specific caches (face crops, affines, latents), by name.
    extras: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.clips:
            raise ValueError(f"avatar {self.id!r} has no clips")
        if not self.idle_loop:
            raise ValueError(f"avatar {self.id!r} has an empty idle loop")
        if self.width % 2 or self.height % 2:
            raise ValueError(
                f"avatar {self.id!r} size must be even, got {self.width}x{self.height}"
            )
        self.check_ref(self.neutral)
        for spec in self.idle_loop:
            self.check_ref(spec.source)
            if spec.blend_to is not None:
                self.check_ref(spec.blend_to)

    def check_ref(self, ref: SourceRef) -> None:
        if not 0 <= ref.clip < len(self.clips):
            raise ValueError(f"clip {ref.clip} out of range for avatar {self.id!r}")
        if not 0 <= ref.frame < self.clips[ref.clip].num_frames:
            raise ValueError(
                f"frame {ref.frame} out of range for clip {ref.clip} of avatar {self.id!r}"
            )

    def describe(self) -> dict[str, object]:
        """The public description served under /v1/avatars."""
        return {
            "id": self.id,
            "width": self.width,
            "height": self.height,
            "fps": self.fps,
            "clips": [
                {"name": c.name, "frames": c.num_frames, "tags": list(c.tags)} for c in self.clips
            ],
        }
